r"""Top-K recommendations for one user's history, from a model artifact alone.

  python -m oxyjax.predict --model_dir=runs/quickstart --history=12,13,14 --top_k=10
  python -m oxyjax.predict --model_dir=runs/mixture --scenario=office_search --query='ink cartridge' \
      --history=office/12,office/40
  python -m oxyjax.predict --model_dir=runs/mixture --scenario=office_i2i --trigger=office/7

`--model_dir` is a run directory (its `artifact/`) or an artifact directory itself. The
history is the user's behaviours as raw item ids, oldest first. Nothing else is read: no
training data, no optimizer state, no cache. The weights are the artifact's `params/`
(written when training ends); for a run directory whose training has not finished, the
best-on-validation weights or the newest checkpoint's parameters.

A multi-scenario model answers any of its scenarios (`--scenario=<name>`), from that
scenario's pool only: `homepage` reads the history; `item_to_item` the item being looked at
(`--trigger`, appended to the history as its most recent behaviour, with the scenario's
context length kept); `search` a query text (`--query`, lower-cased and embedded by the
sentence encoder as I_r, as the training queries were). Raw item ids of a several-domain
model are `<domain>/<raw id>`.

Prints one line per item: rank, raw item id, score (the beam search's log-probability of the
item's SID path), title where the data has one. A run trained with re-scoring on has its SASRec
second stage in `<run>/second_stage` (`rescoring.SecondStage`); it is used by default
(`--second_stage=auto`): the beams and SASRec's top items of the pool, ordered by the fused
score log p + weight * log p_SASRec, which is then the score printed (the exported serving
program runs the same function, `export.serving_fn`). `--json` prints the same as JSON.
An unknown item id or scenario, an empty history or query, or a missing artifact ends with
a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

PROG = "python -m oxyjax.predict"


class Predictor:
  """A model artifact loaded for answering: `recommend(raw_history) -> [(raw_id, score, title)]`.

  Runs on one device (a request is one row; batch-independent inference makes the answer the
  same as inside any evaluation batch)."""

  def __init__(self, path: str, *, beam_size: int = 20, pool: str = "all", second_stage: str | None = "auto",
               matmul_dtype: str | None = None, normalize: str = "vocab", log=lambda *a, **k: None):
    import jax

    from oxyjax import experiment as experiment_lib
    from oxyjax import export as export_lib
    from oxyjax import partitioning
    from oxyjax import rescoring
    from oxyjax import train as train_lib
    from oxyjax import trainer as trainer_lib
    from oxyjax.artifact import ModelArtifact, artifact_dir

    run_dir = None
    if not os.path.isfile(os.path.join(path, "artifact.json")):
      run_dir, path = path, artifact_dir(path)
    self.artifact = ModelArtifact.load(path)
    self.partitioner = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    self.experiment = experiment_lib.from_artifact(self.artifact, partitioner=self.partitioner, read_data=False,
                                                   log=log)
    self.model = self.experiment.model
    if matmul_dtype is not None:  # the weight products' dtype (an inference option, see `oxyjax.export`)
      self.model = self.model.with_matmul_dtype(matmul_dtype)
    abstract = trainer_lib.TrainStateFactory(self.model, self.partitioner).params_abstract
    if run_dir is not None:
      self.params, self.step = train_lib.load_eval_weights(run_dir, abstract, log=log)
    else:
      from oxyjax import checkpoints

      if not checkpoints.has_checkpoint(self.artifact.params_dir):
        raise FileNotFoundError(f"{self.artifact.params_dir}: the artifact has no weights yet (its run has not "
                                "finished); pass the run directory to use its best or latest checkpoint")
      self.params, meta = checkpoints.load_params(self.artifact.params_dir, abstract)
      self.step = int(meta.get("step", 0))
    self.pool = pool
    self.trie = self.experiment.trie(pool)
    self.beam_size = beam_size
    # `second_stage`: see `rescoring.SecondStage.of_run` ('auto': the run's own, if it has one).
    self.second_stage = rescoring.SecondStage.of_run(
        run_dir, second_stage, num_items=self.artifact.num_items, num_scenarios=len(self.artifact.scenarios),
        log=log) if run_dir is not None else None
    self._stage_args = () if self.second_stage is None else jax.device_put(
        (self.second_stage.params, np.asarray(self.artifact.sid_table.codes, np.int32)), self.partitioner.replicated())
    # `normalize`: the beam search's score normalisation (an inference option, see `oxyjax.export`)
    self._predict = jax.jit(export_lib.serving_fn(self.model, beam_size, normalize, stage=self.second_stage))
    from oxyjax.sid.embeddings import QueryEmbedder

    self.embed = QueryEmbedder()  # a typed instruction or a search query -> I_r (MiniLM, loaded on first use)

  def scenario(self, name: str | int) -> dict:
    return find_scenario(self.artifact, name)

  def recommend(self, raw_history: Sequence[str], *, top_k: int = 10, scenario: int | str = 0,
                instruction: str | None = None, trigger: str | None = None,
                query: str | None = None) -> list[tuple[str, float, str | None]]:
    import jax

    if top_k > self.beam_size:
      raise ValueError(f"top_k {top_k} is larger than the beam size {self.beam_size}")
    req = build_request(self.artifact, self.model, raw_history, scenario=scenario, instruction=instruction,
                        trigger=trigger, query=query, embed=self.embed)
    trie = self.experiment.trie(req.pool) if self.pool == "all" else self.trie
    batch = req.features
    part = self.partitioner
    with jax.set_mesh(part.mesh), part.rules_context():
      items, scores = self._predict(self.params, part.shard_batch(batch), trie, *self._stage_args)
    got_items, scores = np.asarray(items)[0], np.asarray(scores)[0]
    return [(self.artifact.raw_item_ids[i], float(s), self.artifact.title(int(i)))
            for i, s in zip(got_items[:top_k], scores[:top_k]) if i > 0]


@dataclasses.dataclass
class Request:
  """One request turned into model inputs: `features` (one row of the model's arrays), the
  scenario (None for a model without named scenarios), the pool it decodes over, and the item
  indices of the history the model reads (trigger included)."""

  features: dict[str, np.ndarray]
  scenario: dict | None
  pool: str
  items: np.ndarray


def find_scenario(artifact, name: str | int) -> dict:
  """The artifact's scenario by name (or id); a one-line error lists the known ones."""
  for sc in artifact.scenarios:
    if name in (sc["name"], sc["id"], str(sc["id"])):
      return sc
  known = [sc["name"] for sc in artifact.scenarios]
  raise ValueError(f"unknown scenario {name!r}; this model serves {known}" if known else
                   f"unknown scenario {name!r}: this model has no named scenarios (use --scenario=<id>)")


def build_request(artifact, model, raw_history: Sequence[str], *, scenario: int | str = 0,
                  instruction: str | None = None, trigger: str | None = None, query: str | None = None,
                  instruction_embedding: np.ndarray | None = None, embed=None, pool: str = "all") -> Request:
  """Validates one request against the artifact and builds its model inputs (host NumPy, batch 1).

  `embed(text) -> [Dr]` embeds an instruction or query text (the sentence encoder);
  `instruction_embedding` is an already embedded I_r (the near-line store's). A bad field
  raises ValueError (KeyError for an unknown item id) naming it."""
  from oxyjax.data import pipeline
  from oxyjax.data.readers import Example

  raw_history = [r for r in raw_history if r]
  cfg = model.config
  kind, sc = None, None
  if artifact.scenarios:
    sc = find_scenario(artifact, scenario)
    scenario, kind = int(sc["id"]), sc["kind"]
    pool = sc["name"] if pool == "all" else pool
  elif not isinstance(scenario, int) and not str(scenario).isdigit():
    raise ValueError(f"unknown scenario {scenario!r}: this model has no named scenarios")
  scenario = int(scenario)
  if not 0 <= scenario < cfg.num_scenarios:
    raise ValueError(f"scenario {scenario} is out of range: the model knows {cfg.num_scenarios} scenario(s)")
  if trigger and kind != "item_to_item":
    raise ValueError(f"--trigger is for item_to_item scenarios, not {kind or 'this model'}")
  if query is not None and kind != "search":
    raise ValueError(f"--query is for search scenarios, not {kind or 'this model'}")
  if kind == "item_to_item":
    if not trigger:
      raise ValueError(f"scenario {sc['name']!r} is item-to-item: give the item being looked at (--trigger)")
    raw_history = raw_history + [trigger]
  if sc is not None:  # the scenario's cut of the history, the rule its training rows were built by
    from oxyjax.data.scenarios import ScenarioConfig

    raw_history = list(ScenarioConfig(**{k: v for k, v in sc.items() if k != "id"}).kept_behaviours(raw_history))
  if not raw_history:
    raise ValueError("the history is empty: give at least one item id")
  items = artifact.item_indices(raw_history)
  arrays = pipeline.examples_to_arrays([Example(user=0, history=tuple(int(i) for i in items), target=0)],
                                       cfg.max_history, scenario=scenario)
  if cfg.scenario_triggers:
    arrays = arrays.with_extras(trigger=np.asarray([items[-1] if kind == "item_to_item" else 0], np.int32))
  if kind == "search":
    from oxyjax.data.scenarios import normalise_query

    if instruction or instruction_embedding is not None:
      raise ValueError("a search scenario's I_r is its query: give --query, not --instruction")
    instruction = normalise_query(query or "")
    if not instruction:
      raise ValueError(f"scenario {sc['name']!r} is search: give a non-empty query (--query)")
  if cfg.instruction_dim:
    emb, present = np.zeros((1, cfg.instruction_dim), np.float32), np.zeros((1,), bool)
    if instruction:
      if cfg.instruction_dim != 384:
        raise ValueError(f"the model reads {cfg.instruction_dim}-d instructions; the sentence encoder gives 384")
      emb, present = np.asarray(embed(instruction), np.float32).reshape(1, -1), np.ones((1,), bool)
    elif instruction_embedding is not None:
      emb = np.asarray(instruction_embedding, np.float32).reshape(1, -1)
      if emb.shape[1] != cfg.instruction_dim:
        raise ValueError(f"instruction embedding of size {emb.shape[1]}; the model reads {cfg.instruction_dim}")
      present = np.ones((1,), bool)
    arrays = arrays.with_extras(instruction_embedding=emb, instruction_mask=present)
  elif instruction or instruction_embedding is not None:
    raise ValueError("this model reads no instruction (instruction_dim = 0)")
  return Request(features=model.convert_features(arrays), scenario=sc, pool=pool, items=items)


def _define_flags():
  from absl import flags

  flags.DEFINE_string("model_dir", None, "A run directory (uses its artifact/) or an artifact directory.")
  flags.DEFINE_list("history", [], "The user's behaviours as raw item ids, oldest first, comma-separated.")
  flags.DEFINE_integer("top_k", 10, "How many items to print.")
  flags.DEFINE_integer("beam_size", 20, "Beam width of the constrained beam search (>= top_k).")
  flags.DEFINE_string("scenario", "0", "Scenario: its name for a multi-scenario model (it decodes over that "
                      "scenario's pool), else the scenario id (I_s).")
  flags.DEFINE_string("trigger", None, "item_to_item scenarios: the raw id of the item being looked at.")
  flags.DEFINE_string("query", None, "search scenarios: the query text.")
  flags.DEFINE_string("pool", "all", "Candidate pool of the artifact the items come from.")
  flags.DEFINE_string("instruction", None, "A reasoning instruction I_r as text (embedded with the sentence "
                      "encoder), for models that read one; default: the learned default instruction.")
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.DEFINE_string("second_stage", "auto", "'auto': the run's SASRec re-scoring stage (<model_dir>/second_stage) "
                      "where it has one; 'none': the beams alone; or the directory of a saved stage.")


def main(argv: Sequence[str]) -> None:
  from absl import flags

  from oxyjax import cli
  from oxyjax.artifact import ArtifactError

  fl = flags.FLAGS
  cli.require_dir(PROG, "model_dir", fl.model_dir, "a run directory or an artifact directory")

  try:
    predictor = Predictor(fl.model_dir, beam_size=fl.beam_size, pool=fl.pool, second_stage=fl.second_stage)
    recs = predictor.recommend(fl.history, top_k=fl.top_k, scenario=fl.scenario, instruction=fl.instruction,
                               trigger=fl.trigger, query=fl.query)
  except (ArtifactError, FileNotFoundError, KeyError, ValueError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise SystemExit(f"{PROG}: {msg}") from None
  if fl.json:
    print(json.dumps({"history": list(fl.history), "weights_step": predictor.step,
                      "ranking": "second_stage" if predictor.second_stage else "beams",
                      "items": [{"rank": r, "item_id": i, "score": s, "title": t}
                                for r, (i, s, t) in enumerate(recs, 1)]}, indent=1))
    return
  for r, (item, score, title) in enumerate(recs, 1):
    print(f"{r:>3}  {item}  {score:.4f}" + (f"  {title}" if title else ""))


def run():
  from oxyjax import cli

  _define_flags()
  cli.run(main, PROG)


if __name__ == "__main__":
  run()
