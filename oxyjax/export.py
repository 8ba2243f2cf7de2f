r"""Exports a trained model for serving: `jax.export` of the whole request path, in one directory.

  python -m oxyjax.export --model_dir=runs/quickstart                 # -> runs/quickstart/serving
  python -m oxyjax.export --model_dir=runs/mixture --beam_sizes=20,256 --batch_sizes=1,2,4,8,16,32,64

The serving function is one compiled program per (batch bucket B, beam W): the encoder runs
once per request row, the decoder runs with its KV cache, and the beams are expanded, scored
and pruned inside it (`RecModel.predict`), constrained to the row's candidate pool: every pool
the model serves (one per scenario, or the artifact's pools) is one trie (`PrefixTrie.forest`)
and each row starts at its pool's root (`pool_root`), so one program serves every scenario.

  serve(params, features, trie) -> (items [B, W] int32, scores [B, W] float32)

`params` is the parameter tree, `features` the dict of `SERVING_FEATURES` arrays the model
reads (host arrays from `predict.build_request`, padded to B rows), `trie` the forest's four
CSR arrays. With a second stage (`rescoring.SecondStage`: the run's SASRec re-scoring, saved by
training into `<model_dir>/second_stage`) the same program also runs it after the beam search:

  serve(params, features, trie, stage_params, sid_codes) -> (items [B, W + union], fused scores)

the beams and SASRec's `union` best items of the row's pool that are not beams, ordered by
log p + weight * log p_SASRec (the function evaluation runs, `rescoring.Rescorer`). Directory
layout (format `oxyjax.serving_export`, version `SERVING_VERSION`):

  serving.json            format, version, buckets, beam sizes, score normalisation, the
                          feature and parameter specs the programs were traced with (the
                          weight products' dtype, `--matmul_dtype`, among them), each
                          pool's root, the artifact's content digest, the platforms
  serve_b{B}_w{W}.jaxexport   serialised `jax.export.Exported`, one per bucket and beam
  forest.npz              the pools' trie (child_start, child_code, child_node, leaf_item)
  second_stage/           (with a second stage) the SASRec scorer's Orbax checkpoint, its
                          weight and union (`SecondStage.save`)
  artifact/               the model artifact (SID table, items and titles, pools, scenarios,
                          text embeddings) with `params/`: the very weights exported
  users.jsonl             (--user_histories) each user's latest behaviours, for requests that
                          give a user id and no history (a stand-in for a profile service)

The server (`oxyjax.serve`) loads this directory alone: no gin file, no training code path, no
tracing of the model; the Flax network is never traced or initialised. Batch sizes are
buckets: a batch of n requests runs in one or more buckets (`serve.ServingModel.plan`), padded
with empty rows (inference is row-wise, see tests/models/test_batch_independence.py, so padding
never changes a row's answer). The directory is written next to its final place and renamed in when complete; an older export is
moved aside to `<out>.replaced-<UTC time>`, never deleted.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from oxyjax import fileio

PROG = "python -m oxyjax.export"
SERVING_FORMAT = "oxyjax.serving_export"
SERVING_VERSION = 2  # 2: the optional second stage (a version-1 directory reads as one without it)
MANIFEST = "serving.json"
# What `RecModel.predict` reads of a batch (init_decode + decode_step); targets are not inputs.
SERVING_FEATURES = ("history_items", "history_codes", "history_mask", "history_text", "scenario",
                    "trigger_items", "trigger_codes", "trigger_text", "instruction_embedding",
                    "instruction_mask", "pool_root")
TRIE_FIELDS = ("child_start", "child_code", "child_node", "leaf_item")
USERS_FILE = "users.jsonl"
STAGE_DIR = "second_stage"  # in a serving directory


class ExportError(ValueError):
  """A missing or inconsistent serving export (the message names the file)."""


def program_name(batch: int, beam: int) -> str:
  return f"serve_b{batch}_w{beam}.jaxexport"


def serving_pools(artifact) -> list[str]:
  """The pools a server decodes over: one per scenario, else every pool of the artifact."""
  return [sc["name"] for sc in artifact.scenarios] if artifact.scenarios else sorted(artifact.pools)


def feature_spec(model) -> dict[str, tuple[tuple[int, ...], str]]:
  """name -> (shape without the batch dim, dtype) of the serving inputs of `model`."""
  row = model.convert_features({"history": np.zeros((1, model.config.max_history), np.int32),
                                "target": np.zeros((1,), np.int32), "scenario": np.zeros((1,), np.int32),
                                "pool_root": np.zeros((1,), np.int32)})
  return {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in row.items() if k in SERVING_FEATURES}


def param_spec(params) -> list[list[Any]]:
  """[path, shape, dtype] of every parameter leaf, in flattening order."""
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [[jax.tree_util.keystr(p), list(np.shape(x)), str(x.dtype)] for p, x in leaves]


def serving_fn(model, beam_size: int, normalize: str = "vocab", stage=None):
  """The request path, traceable: ``(params, features, trie, *stage_args) -> (items, scores)``.
  Constrained beam search over ``trie`` (each row from its ``pool_root`` where the features
  have one); with a `rescoring.SecondStage` (``stage_args``: its parameters and the SID table),
  the stage's re-ranked candidates and fused scores. The exported programs and the in-process
  `predict.Predictor` both run it."""

  def serve(params, features, trie, *stage_args):
    context = model.encode(params, features)  # once per request: the beam search and the stage read it
    out = model.predict(params, features, trie, beam_size=beam_size, normalize=normalize, context=context)
    if stage is None:
      return out.items, out.scores
    stage_params, sid_codes = stage_args
    return stage.apply(model, params, stage_params, features, trie, sid_codes, out.items, out.scores, context,
                       normalize)

  return serve


def make_serve_fn(model, trie_static: dict[str, Any], beam_size: int, normalize: str = "vocab", stage=None):
  """The function that is exported: `serving_fn` with the trie as its four CSR arrays
  (``trie_static``: its static fields)."""
  from oxyjax.sid.trie import PrefixTrie

  fn = serving_fn(model, beam_size, normalize, stage)

  def serve(params, features, trie_arrays, *stage_args):
    return fn(params, features, PrefixTrie(*trie_arrays, **trie_static), *stage_args)

  return serve


def export_model(model, params, artifact, out_dir: str, *, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 beam_sizes: Sequence[int] = (20,), normalize: str = "vocab", step: int = 0,
                 platforms: Sequence[str] | None = None, second_stage=None, matmul_dtype: str | None = None,
                 log=print) -> str:
  """Writes the serving directory for `model` with `params` (see the module docstring), with
  `second_stage` (a `rescoring.SecondStage`) inside the programs where given; returns it.

  `matmul_dtype` (default: the model's, float32): the programs' weight products
  (`ModelConfig.matmul_dtype`). With bfloat16 the programs take the `layers.WEIGHT_KERNELS` in
  bfloat16 (the manifest's parameter dtypes, which the server casts the saved float32 weights to
  at load), so a request never rounds a weight."""
  import jax
  from jax import export as jax_export

  from oxyjax import checkpoints
  from oxyjax.models import layers

  batch_sizes = sorted({int(b) for b in batch_sizes})
  beam_sizes = sorted({int(w) for w in beam_sizes})
  if not batch_sizes or batch_sizes[0] < 1 or not beam_sizes or beam_sizes[0] < 1:
    raise ValueError(f"batch and beam sizes must be positive, got {batch_sizes}, {beam_sizes}")
  if second_stage is not None:
    if normalize not in ("vocab", "last_valid"):
      raise ValueError("the second stage fuses the beams' joint log-probabilities: export it with normalize "
                       "'vocab' or 'last_valid'")
    if second_stage.scorer.num_items != artifact.num_items:
      raise ValueError(f"the second stage's scorer has {second_stage.scorer.num_items} items, the artifact "
                       f"{artifact.num_items}: it was trained for another catalogue")
    second_stage.check_scenarios(len(artifact.scenarios), "export")
  pools = serving_pools(artifact)
  forest, roots = artifact.pool_forest(pools)
  trie_arrays = tuple(np.asarray(getattr(forest, f)) for f in TRIE_FIELDS)
  trie_static = {"num_levels": forest.num_levels, "max_children": tuple(forest.max_children),
                 "vocab_sizes": tuple(forest.vocab_sizes)}
  if matmul_dtype is not None and matmul_dtype != model.config.matmul_dtype:
    model = model.with_matmul_dtype(matmul_dtype)
  matmul_dtype = model.config.matmul_dtype
  spec = feature_spec(model)
  params = jax.tree_util.tree_map(np.asarray, params)
  program_params = params if matmul_dtype == "float32" else layers.cast_weight_kernels(params, matmul_dtype)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    abstract_params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), program_params)
    abstract_trie = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in trie_arrays)
    stage_args, stage_info = (), None
    if second_stage is not None:
      stage_params = jax.tree_util.tree_map(np.asarray, second_stage.params)
      sid_codes = np.asarray(artifact.sid_table.codes, np.int32)
      stage_args = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (stage_params, sid_codes))
      second_stage.save(os.path.join(tmp, STAGE_DIR))
      stage_info = {"directory": STAGE_DIR, **second_stage.settings(), "num_items": second_stage.scorer.num_items,
                    "params": param_spec(stage_params), "sid_codes": list(sid_codes.shape)}
    programs = {}
    for w in beam_sizes:
      fn = jax.jit(make_serve_fn(model, trie_static, w, normalize, second_stage))
      for b in batch_sizes:
        feats = {k: jax.ShapeDtypeStruct((b,) + shape, np.dtype(dt)) for k, (shape, dt) in spec.items()}
        exp = jax_export.export(fn, platforms=platforms)(abstract_params, feats, abstract_trie, *stage_args)
        name = program_name(b, w)
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(exp.serialize())
        programs[f"{b}x{w}"] = name
        log(f"[export] {name}: batch {b}, beam {w}, platforms {list(exp.platforms)}")
    np.savez(os.path.join(tmp, "forest.npz"), **dict(zip(TRIE_FIELDS, trie_arrays)))
    art_dir = os.path.join(tmp, "artifact")
    saved = dataclasses.replace(artifact, directory=None)
    saved.save(art_dir, keep_params=False)
    checkpoints.save_params(os.path.join(art_dir, "params"), params, {"step": int(step)}, log=log)
    manifest = {
        "format": SERVING_FORMAT, "version": SERVING_VERSION, "batch_sizes": batch_sizes,
        "beam_sizes": beam_sizes, "normalize": normalize, "programs": programs,
        "features": {k: [list(s), d] for k, (s, d) in spec.items()}, "params": param_spec(program_params),
        "matmul_dtype": matmul_dtype,
        "pools": pools, "roots": roots, "trie": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in trie_static.items()},
        "artifact_digest": saved.content_digest(), "weights_step": int(step), "second_stage": stage_info,
        "platforms": list(platforms) if platforms else [jax.default_backend()],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.isdir(out_dir):
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
      os.rename(out_dir, f"{out_dir}.replaced-{stamp}")
      log(f"[export] the previous export was moved to {out_dir}.replaced-{stamp}")
    os.rename(tmp, out_dir)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def write_user_histories(artifact, path: str, max_items: int | None = None) -> int:
  """Writes each user's latest behaviours (the test example's history and its target: everything
  the data knows) as JSON lines {"domain", "user", "history"} for the server's user-id requests;
  raw item ids as the artifact spells them. Refuses data other than the artifact's."""
  from oxyjax.data import readers
  from oxyjax.data.catalogue import Catalogue

  domains = artifact.domains or [artifact.dataset]
  got = Catalogue.load(domains).fingerprint if artifact.domains else readers.dataset_fingerprint(artifact.dataset)
  if artifact.data_fingerprint is not None and got != artifact.data_fingerprint:
    raise ValueError(f"the data of {domains} (fingerprint {got}) is not the data the artifact was built from "
                     f"({artifact.data_fingerprint}): user histories would name other items")
  max_items = max_items or artifact.model_config.max_history
  multi = len(domains) > 1
  lines = []
  for d in domains:
    ds = readers.load_dataset(d)
    latest = {}
    for ex in ds.test:  # a user's later test example (longer history) replaces an earlier one
      if ex.user not in latest or len(ex.history) >= len(latest[ex.user].history):
        latest[ex.user] = ex
    for u, ex in sorted(latest.items()):
      seq = [ds.raw_item_ids[i] for i in tuple(ex.history) + (ex.target,)][-max_items:]
      lines.append(json.dumps({"domain": d, "user": ds.raw_user_ids[u],
                               "history": [f"{d}/{x}" for x in seq] if multi else seq}) + "\n")
  fileio.write_text(path, "".join(lines))
  return len(lines)


def export_run(model_dir: str, out_dir: str | None = None, *, user_histories: bool = False,
               second_stage: str | None = "auto", **kwargs) -> str:
  """Exports a run directory (or an artifact directory) with the weights and the second stage
  `oxyjax.predict` uses (`second_stage`: see `rescoring.SecondStage.of_run`); `user_histories`
  also writes `users.jsonl` (`write_user_histories`) from the data."""
  from oxyjax import predict

  p = predict.Predictor(model_dir, second_stage=second_stage, log=kwargs.get("log", print))
  out_dir = out_dir or os.path.join(model_dir, "serving")
  out = export_model(p.model, p.params, p.artifact, out_dir, step=p.step, second_stage=p.second_stage, **kwargs)
  if user_histories:
    write_user_histories(p.artifact, os.path.join(out, USERS_FILE))
  return out


def _define_flags():
  from absl import flags

  flags.DEFINE_string("model_dir", None, "A run directory (uses its artifact/ and evaluation weights) or an "
                      "artifact directory.")
  flags.DEFINE_string("out", None, "Serving directory to write (default: <model_dir>/serving).")
  flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32", "64"], "Batch buckets, one compiled program "
                    "each (the server runs a batch in the buckets that waste least).")
  flags.DEFINE_list("beam_sizes", ["20", "256"], "Beam widths a request may ask for, one program each.")
  flags.DEFINE_enum("normalize", "vocab", ["vocab", "valid", "last_valid"],
                    "Beam score normalisation (decoding.beam_search).")
  flags.DEFINE_bool("user_histories", False, "Also write users.jsonl: each user's latest behaviours from the data.")
  flags.DEFINE_list("platforms", [], "Platforms to lower for (e.g. cpu,cuda); default: this machine's backend.")
  flags.DEFINE_enum("matmul_dtype", None, ["float32", "bfloat16"], "The programs' weight products "
                    "(ModelConfig.matmul_dtype; default: the model's, float32). bfloat16: bf16 operands accumulated "
                    "in float32, faster on CPUs with AVX-512 BF16; not measured on CPUs without (docs/serving.md).")
  flags.DEFINE_string("second_stage", "auto", "'auto': the run's SASRec re-scoring stage (<model_dir>/second_stage, "
                      "written by a run with re-scoring on) where it has one; 'none': the beams alone; or the "
                      "directory of a saved stage.")


def main(argv: Sequence[str]) -> None:
  from absl import flags

  from oxyjax import cli
  from oxyjax.artifact import ArtifactError

  fl = flags.FLAGS
  cli.require_dir(PROG, "model_dir", fl.model_dir, "a run directory or an artifact directory")
  try:
    out = export_run(fl.model_dir, fl.out, batch_sizes=[int(b) for b in fl.batch_sizes],
                     beam_sizes=[int(w) for w in fl.beam_sizes], normalize=fl.normalize,
                     platforms=fl.platforms or None, user_histories=fl.user_histories,
                     second_stage=fl.second_stage, matmul_dtype=fl.matmul_dtype)
  except (ArtifactError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"{PROG}: {e}") from None
  print(f"[export] wrote {out}")


def run():
  from oxyjax import cli

  _define_flags()
  cli.run(main, PROG)


if __name__ == "__main__":
  run()
