r"""A second stage for the decoder's final beams: re-scoring by a sequential recommender.

Constrained beam search (`oxyjax.decoding`) retrieves each row's K distinct valid items with the
generative model's joint log-likelihood ``log p_gen(item | history)``. A SASRec model
(`oxyjax.sid.sasrec`: causal self-attention, full-softmax next-item cross-entropy) trained on the
same TRAINING sequences scores them, and they are reordered by the log-linear combination (a
product of experts)

    log p_gen(item) + weight * log softmax_SASRec(item | history)        (`rerank`)

With ``union`` k > 0 the candidates are the beams and SASRec's k best items that are not beams
(and are items of the row's pool); each gets its ``log p_gen`` from `RecModel.path_log_probs`
(the joint log-probability beam search scores, computed as beam search computes it). The generative
model sees an item through its semantic-ID path, which ties similar items together; SASRec has one
free embedding per item; the two make different errors. ``weight`` 0 is the generative model
alone. `Rescorer` is the second stage `Evaluator(second_stage=...)` applies; `RescoringConfig`
sets it for the training command (`train.train(rescoring=...)`, off unless its weight is
non-zero; the default configuration's weight and union were chosen by the defaults rule on the
validation splits of all four shipped datasets, docs/results.md). `SecondStage` is the one
traceable function both evaluation (`Rescorer`) and the exported serving program
(`oxyjax.export`) run; a training run with re-scoring on saves its stage into
``<model_dir>/second_stage``, which the export picks up.

A multi-scenario run has one stage for every scenario: one scorer over the joint catalogue,
trained on every domain's training sequences (`dataset_sequences` with the domains), SASRec's
extra items taken from each row's own pool, and a weight per scenario
(`RescoringConfig.scenario_weights`; a search row's target is named by its query, which SASRec
does not read, so its scenario may want a smaller weight, chosen on validation:
benchmarks/rerank_eval.py gives each scenario its own curve).

    python -m oxyjax.rescoring --dataset=beauty [--out=DIR]
    python -m oxyjax.rescoring --domains=office,industrial     # a multi-scenario run's catalogue

trains SASRec on the dataset's training split only (``build.training_sequences``: a validation
or test target never shapes it) and saves an Orbax parameter checkpoint whose metadata holds the
model config, the item count and the digest of the training sequences, by default into the cache
the training command reads (`get_scorer`: keyed by that digest and every setting);
`SASRecScorer.load` refuses a scorer trained on other sequences than the dataset's it scores for.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from oxyjax import checkpoints
from oxyjax.data import readers
from oxyjax.sid import build
from oxyjax.sid import sasrec as sasrec_lib

KIND = "oxyjax.rescoring.SASRecScorer"
RUN_STAGE_DIR = "second_stage"  # <model_dir>/second_stage: a run's stage, saved by training with re-scoring on
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sequences_digest(sequences: Sequence[Sequence[int]]) -> str:
  """Content digest of the training sequences a scorer is trained on (order and items)."""
  h = hashlib.sha256()
  for s in sequences:
    h.update(np.asarray(list(s), np.int64).tobytes())
    h.update(b"|")
  return h.hexdigest()[:16]


def right_aligned(history_items: np.ndarray, history_mask: np.ndarray, max_len: int) -> np.ndarray:
  """The model's left-aligned histories ``[B, S]`` (oldest first, 0-padded at the end) as SASRec's
  input: the most recent ``max_len`` items, right-aligned (0-padded at the start)."""
  history_items = np.asarray(history_items, np.int32)
  lengths = np.asarray(history_mask, bool).sum(axis=1)
  out = np.zeros((history_items.shape[0], max_len), np.int32)
  for i, n in enumerate(lengths):
    row = history_items[i, :n][-max_len:]
    if len(row):
      out[i, max_len - len(row):] = row
  return out


@dataclasses.dataclass
class SASRecScorer:
  """A trained SASRec (config, params) and what it was trained on."""

  config: sasrec_lib.SASRecConfig
  num_items: int
  params: Any
  digest: str  # `sequences_digest` of its training sequences
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.model = model = sasrec_lib.make_model(self.num_items, self.config)

    def next_item(p, seq):
      return jax.nn.log_softmax(model.apply({"params": p}, seq, train=False, last_only=True))

    self._log_probs = jax.jit(lambda p, seq, items: jnp.take_along_axis(next_item(p, seq), items, axis=1))
    self._top_k = jax.jit(lambda p, seq, k, allowed: jax.lax.top_k(jnp.where(allowed, next_item(p, seq), -jnp.inf), k),
                          static_argnums=2)

  def log_probs(self, history_items: np.ndarray, history_mask: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``log softmax_SASRec(item | history)`` over the whole catalogue, at ``items [B, K]``
    (item 0, an empty beam, gets the padding logit's share: about -1e9). Histories as the
    model's features (``history_items`` / ``history_mask``, left-aligned)."""
    seq = right_aligned(history_items, history_mask, self.config.max_len)
    items = np.asarray(items, np.int32)
    if items.size and items.max() > self.num_items:
      raise ValueError(f"item index {int(items.max())} out of range for a scorer of {self.num_items} items")
    return np.asarray(self._log_probs(self.params, seq, items))

  def top_k(self, history_items: np.ndarray, history_mask: np.ndarray, k: int,
            pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SASRec alone: its ``k`` best items ``[B, k]`` and their log-probs (over the whole
    catalogue), among the items of ``pool`` (item indices; default: every item and the padding)."""
    seq = right_aligned(history_items, history_mask, self.config.max_len)
    allowed = np.ones(self.num_items + 1, bool)
    if pool is not None:
      allowed[:] = False
      allowed[np.asarray(pool, np.int64)] = True
    lp, items = self._top_k(self.params, seq, k, allowed)
    return np.asarray(items), np.asarray(lp)

  def save(self, directory: str, stage: dict[str, Any] | None = None) -> None:
    """An Orbax parameter checkpoint with the config and the training digest as metadata
    (`checkpoints.save_params`: an older save is replaced only once this one is complete);
    ``stage`` (`SecondStage.save`): its weight and union, kept in ``info["stage"]``."""
    info = {**self.info, "stage": stage} if stage else self.info
    meta = {"kind": KIND, "config": self.config.to_dict(), "num_items": self.num_items, "digest": self.digest,
            "info": info, "step": 0}
    checkpoints.save_params(directory, self.params, meta, log=lambda *_: None)

  @classmethod
  def load(cls, directory: str, *, sequences: Sequence[Sequence[int]] | None = None,
           num_items: int | None = None) -> "SASRecScorer":
    """Loads a saved scorer; with ``sequences`` (the training sequences of the dataset it will
    score) and ``num_items``, refuses one trained on anything else."""
    params, meta = checkpoints.load_params(directory, None, log=lambda *_: None)
    if meta.get("kind") != KIND:
      raise ValueError(f"{directory}: not a SASRec scorer (python -m oxyjax.rescoring)")
    cfg = dict(meta["config"])
    cfg["length_buckets"] = tuple(cfg["length_buckets"])
    config = sasrec_lib.SASRecConfig(**cfg)
    if num_items is not None and num_items != meta["num_items"]:
      raise ValueError(f"{directory}: the scorer has {meta['num_items']} items, the model {num_items}")
    if sequences is not None and sequences_digest(sequences) != meta["digest"]:
      raise ValueError(f"{directory}: the scorer was trained on other training sequences (digest {meta['digest']}, "
                       f"this dataset's {sequences_digest(sequences)}): retrain it")
    return cls(config, int(meta["num_items"]), params, meta["digest"], meta.get("info", {}))


def rerank(items: np.ndarray, policy_scores: np.ndarray, ranker_logits: np.ndarray,
           weight: float) -> tuple[np.ndarray, np.ndarray]:
  """A second stage over the policy's beams: each row's ``items [B, K]`` reordered by
  ``policy_scores + weight * ranker_logits`` (both ``[B, K]``: the beams' log-probabilities and the
  ranker's logits of the same items), best first. Empty beams (item < 1 or a score of -inf) stay
  last; ties keep the policy's order, so ``weight = 0`` returns the beams unchanged.
  Returns ``(items [B, K], fused scores [B, K])`` (-inf for the empty beams)."""
  items = np.asarray(items)
  policy_scores = np.asarray(policy_scores, np.float64)
  ranker_logits = np.asarray(ranker_logits, np.float64)
  if not (items.shape == policy_scores.shape == ranker_logits.shape) or items.ndim != 2:
    raise ValueError(f"items, policy_scores and ranker_logits must be the same [B, K], got "
                     f"{items.shape}, {policy_scores.shape}, {ranker_logits.shape}")
  if not np.isfinite(weight):
    raise ValueError(f"weight must be finite, got {weight}")
  live = (items > 0) & np.isfinite(policy_scores)
  # weight 0 must not mix in the ranker at all (0 * a non-finite logit is NaN).
  fused = policy_scores if weight == 0 else policy_scores + weight * ranker_logits
  fused = np.where(live, fused, -np.inf)
  order = np.argsort(-fused, axis=1, kind="stable")
  return np.take_along_axis(items, order, 1), np.take_along_axis(fused, order, 1)


@dataclasses.dataclass(frozen=True)
class RescoringConfig:
  """The second stage of evaluation (and of the default configuration, where the defaults rule
  picked it). ``weight`` 0 turns it off: the beams in beam-search order. ``union`` k > 0 also
  ranks SASRec's k best items that are not beams beside them (each costs the policy a scored
  path). ``sasrec``: the scorer's shape and training; ``seed``: its training seed (fixed, so that runs of several seeds share one cached scorer)."""

  weight: float = 0.0
  union: int = 10
  sasrec: sasrec_lib.SASRecConfig = sasrec_lib.SASRecConfig()
  seed: int = 0
  cache_dir: str | None = None  # default: <repo>/.cache/rescoring/<dataset>_<training digest>_<settings>
  # A multi-scenario run: {scenario name: weight} for the scenarios whose weight is not `weight`
  # (chosen per scenario on validation: benchmarks/rerank_eval.py reports each scenario's curve).
  scenario_weights: Any = ()

  def __post_init__(self):
    pairs = self.scenario_weights.items() if isinstance(self.scenario_weights, dict) else self.scenario_weights
    object.__setattr__(self, "scenario_weights", tuple(sorted((str(k), float(v)) for k, v in pairs)))

  @property
  def enabled(self) -> bool:
    return self.weight != 0.0 or any(w != 0.0 for _, w in self.scenario_weights)

  def stage_weights(self, scenarios: Sequence[str]) -> tuple[float, ...]:
    """One weight per scenario id (``scenarios[i]``: scenario i's name), or () (``weight`` for
    every row) without `scenario_weights`; a name that is not one of ``scenarios`` is refused."""
    given = dict(self.scenario_weights)
    unknown = sorted(set(given) - set(scenarios))
    if unknown:
      raise ValueError(f"RescoringConfig.scenario_weights: {unknown} not among this run's scenarios "
                       f"{list(scenarios)}")
    return tuple(given.get(name, self.weight) for name in scenarios) if given else ()


def sasrec_window(history_items: jax.Array, history_mask: jax.Array, max_len: int) -> jax.Array:
  """Traceable `right_aligned`: the most recent ``max_len`` items of each left-aligned history
  ``[B, S]``, right-aligned (0-padded at the start)."""
  n = history_mask.astype(jnp.int32).sum(axis=1, keepdims=True)  # [B, 1]
  idx = n - max_len + jnp.arange(max_len, dtype=jnp.int32)[None]  # [B, max_len]
  got = jnp.take_along_axis(history_items.astype(jnp.int32), jnp.maximum(idx, 0), axis=1, mode="clip")
  return jnp.where(idx >= 0, got, 0)


@dataclasses.dataclass
class SecondStage:
  """The second stage as one traceable function, for evaluation (`Rescorer`) and for the exported
  serving program (`oxyjax.export`): a trained scorer, its weight and the union size.

  `apply` takes the policy's beams ``items, scores [B, W]`` (beam search's output: -1 / -inf for
  an empty beam) and returns ``(items [B, W + union], fused scores)``, best first, -1 / -inf for an
  empty candidate. The candidates are the beams and, with ``union`` k > 0, SASRec's best k items
  among those that are valid items of the row's pool (``trie.find`` from ``batch["pool_root"]``)
  and not already beams; an extra item's policy score is its joint log-probability
  (`RecModel.path_log_probs`, computed as beam search computes it), a beam's is its beam score.

  ``scenario_weights`` (a multi-scenario model's stage): one weight per scenario id, each row fused
  with its scenario's (``batch["scenario"]``), so that one stage serves scenarios that want
  different weights (a search row's target is named by its query, which SASRec does not read);
  empty: ``weight`` for every row. A row whose weight is 0 has its candidates ordered by the
  policy's joint log-probability alone (its beams in beam-search order, SASRec's extra items
  placed among them by their policy scores)."""

  scorer: SASRecScorer
  weight: float
  union: int = 0
  scenario_weights: tuple[float, ...] = ()

  def __post_init__(self):
    self.weight, self.union = float(self.weight), int(self.union)
    self.scenario_weights = tuple(float(w) for w in self.scenario_weights)
    if not all(np.isfinite((self.weight, *self.scenario_weights))) or self.union < 0:
      raise ValueError(f"second stage: weights must be finite and union >= 0, got {self.weight}, "
                       f"{self.scenario_weights}, {self.union}")

  def settings(self) -> dict[str, Any]:
    """What a summary or a serving directory records of the stage (the scorer's digest beside it)."""
    out = {"weight": self.weight, "union": self.union, "digest": self.scorer.digest}
    return {**out, "scenario_weights": list(self.scenario_weights)} if self.scenario_weights else out

  def describe(self) -> str:
    """The weights and union, for logs."""
    weights = (f"weights by scenario {', '.join(f'{w:g}' for w in self.scenario_weights)}" if self.scenario_weights
               else f"weight {self.weight:g}")
    return f"{weights}, union {self.union}"

  def check_scenarios(self, num_scenarios: int, where: str) -> None:
    """A stage with per-scenario weights fits only a model of as many scenarios."""
    if self.scenario_weights and len(self.scenario_weights) != num_scenarios:
      raise ValueError(f"{where}: the second stage has weights for {len(self.scenario_weights)} scenarios, the model "
                       f"{num_scenarios}")

  @property
  def params(self):
    return self.scorer.params

  def log_softmax(self, stage_params, batch):
    """Traceable: SASRec's next-item log-probabilities ``[B, num_items + 1]`` for ``batch``'s histories."""
    seq = sasrec_window(batch["history_items"], batch["history_mask"], self.scorer.config.max_len)
    logits = self.scorer.model.apply({"params": stage_params}, seq, train=False, last_only=True)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  def fused_scores(self, policy, sasrec, scenario=None):
    """Traceable: ``policy + weight * sasrec`` per candidate, unsorted (`fuse` orders by it);
    ``scenario [B]`` picks each row's weight where the stage has one per scenario. A weight-0 row
    is ``policy`` itself (0 * a non-finite log-prob would be NaN)."""
    if self.scenario_weights:
      if scenario is None:
        raise ValueError("a second stage with per-scenario weights needs each row's scenario id")
      weight = jnp.asarray(self.scenario_weights, jnp.float32)[jnp.asarray(scenario, jnp.int32)][:, None]
      return jnp.where(weight == 0, policy, policy + weight * sasrec)
    return policy if self.weight == 0 else policy + self.weight * sasrec

  def candidates(self, model, params, stage_params, batch, trie, sid_codes, items, scores, context=None,
                 normalize: str = "vocab"):
    """Traceable: ``(candidates [B, W + union], policy log-probs, SASRec log-probs)``, -1 / -inf
    for an empty candidate. ``stage_params``: the scorer's parameters; ``sid_codes [num_items +
    1, L]``: the SID table (to score and pool-check SASRec's items); ``context``: the policy's
    `RecModel.encode` of ``batch`` where the caller has it (the beam search's), else recomputed;
    ``normalize``: the beam search's ('vocab' or 'last_valid'), so the extra items' policy scores
    are computed as the beams' were."""
    lp = self.log_softmax(stage_params, batch)  # [B, num_items + 1]
    cand, policy = items, scores
    if self.union:
      # SASRec's best `union` items that are valid items of the row's pool and not beams, looked
      # for among its top union + W + 1 (every one of them when the pool is the whole catalogue:
      # at most W beams and the padding item 0 are passed over); only they are scored by the policy.
      _, top = jax.lax.top_k(lp, min(self.union + items.shape[1] + 1, lp.shape[1]))  # [B, M]
      found = trie.find(jnp.asarray(sid_codes)[top], batch.get("pool_root")) == top
      ok = found & (top > 0) & ~(top[:, :, None] == items[:, None, :]).any(axis=2)
      first = jnp.argsort(~ok, axis=1, stable=True)[:, :self.union]  # the first `union` ok, in SASRec's order
      extra, new = jnp.take_along_axis(top, first, axis=1), jnp.take_along_axis(ok, first, axis=1)
      codes = jnp.asarray(sid_codes)[extra]  # [B, k, L]
      extra_policy = model.path_log_probs(params, batch, codes, context, normalize=normalize, trie=trie)
      cand = jnp.concatenate([items, jnp.where(new, extra, -1)], axis=1)
      policy = jnp.concatenate([scores, jnp.where(new, extra_policy, -jnp.inf)], axis=1)
    live = (cand > 0) & jnp.isfinite(policy)
    sasrec = jnp.take_along_axis(lp, jnp.maximum(cand, 0), axis=1)
    return jnp.where(live, cand, -1), jnp.where(live, policy, -jnp.inf), sasrec

  def fuse(self, cand, policy, sasrec, scenario=None):
    """Traceable: the candidates ordered by ``policy + weight * sasrec``, best first, ties in
    candidate order (the beams' first); ``(items, fused scores)``, -1 / -inf for empty ones.
    ``scenario [B]``: each row's scenario id, which picks its weight from ``scenario_weights``."""
    live = cand > 0
    fused = jnp.where(live, self.fused_scores(policy, sasrec, scenario), -jnp.inf)
    order = jnp.argsort(-fused, axis=1, stable=True)
    fused = jnp.take_along_axis(fused, order, axis=1)
    return jnp.where(jnp.isfinite(fused), jnp.take_along_axis(cand, order, axis=1), -1), fused

  def apply(self, model, params, stage_params, batch, trie, sid_codes, items, scores, context=None,
            normalize: str = "vocab"):
    """Traceable: `candidates`, then `fuse` (see the class docstring)."""
    return self.fuse(*self.candidates(model, params, stage_params, batch, trie, sid_codes, items, scores, context,
                                      normalize), batch.get("scenario"))

  def save(self, directory: str) -> None:
    """The scorer's Orbax checkpoint (`SASRecScorer.save`) with the weights and union."""
    self.scorer.save(directory, stage={"weight": self.weight, "union": self.union,
                                       "scenario_weights": list(self.scenario_weights)})

  @classmethod
  def load(cls, directory: str, **kwargs) -> "SecondStage":
    scorer = SASRecScorer.load(directory, **kwargs)
    stage = scorer.info.get("stage")
    if not stage:
      raise ValueError(f"{directory}: a SASRec scorer without a second stage's weight and union (write one with "
                       "SecondStage.save, or pass the weight and union)")
    return cls(scorer, float(stage["weight"]), int(stage["union"]), tuple(stage.get("scenario_weights") or ()))

  @classmethod
  def of_run(cls, model_dir: str, which: str | None = "auto", *, num_items: int, num_scenarios: int = 1,
             log=print) -> "SecondStage | None":
    """The stage to serve a run with: ``"auto"`` the run's own (``<model_dir>/second_stage``,
    written by a training run with re-scoring on) where it has one, ``"none"`` (or None) no
    second stage, else the directory of a saved stage (refused if it has other items, or weights
    for another number of scenarios)."""
    if which in (None, "none"):
      return None
    path = os.path.join(model_dir, RUN_STAGE_DIR) if which == "auto" else which
    if not checkpoints.has_checkpoint(path):
      if which == "auto":
        return None
      raise FileNotFoundError(f"{path}: no second stage there (a run with re-scoring on writes "
                              f"<run>/{RUN_STAGE_DIR})")
    stage = cls.load(path, num_items=num_items)
    stage.check_scenarios(num_scenarios, path)
    log(f"[oxyjax] second stage from {path}: SASRec ({stage.describe()})")
    return stage


class Rescorer:
  """``(params, features, items [b, K], scores [b, K]) -> items [b, K + union]``: `SecondStage.apply`
  under jit for `Evaluator(second_stage=...)` (the same function the serving program runs);
  empty candidates last as 0. `parts` gives the candidates and both scores, for sweeping the
  weight (benchmarks/rerank_eval.py). SASRec reads the history the policy reads (its most recent
  ``ModelConfig.max_history`` items, 20 for the small model), though it was trained on windows of
  up to ``SASRecConfig.max_len`` (50). ``trie``: the pool SASRec's extra items must belong to
  (each call may name another: a multi-scenario model's evaluation decodes each scenario over its
  own pool, and its stage must add only items of that pool)."""

  def __init__(self, model, stage: SecondStage, sid_codes: np.ndarray, trie, partitioner, normalize: str = "vocab"):
    self.stage, self.partitioner = stage, partitioner
    # Replicated on the policy's mesh: one jit call reads them beside the policy's sharded params.
    self.stage_params, self.sid_codes = jax.device_put(
        (stage.params, np.asarray(sid_codes, np.int32)), partitioner.replicated())
    self._tries: dict[int, tuple[Any, Any]] = {}
    self.trie = self._placed(trie)
    # `normalize`: how the beams it gets were scored ('vocab' or 'last_valid'; `SecondStage.candidates`)
    self._apply = jax.jit(functools.partial(stage.apply, model, normalize=normalize))
    self._candidates = jax.jit(functools.partial(stage.candidates, model, normalize=normalize))

  def _placed(self, trie):
    """``trie`` replicated on the mesh, placed once per trie object."""
    if id(trie) not in self._tries:  # the trie is kept beside its copy, so its id is not reused
      self._tries[id(trie)] = (trie, jax.device_put(trie, self.partitioner.replicated()))
    return self._tries[id(trie)][1]

  def _run(self, fn, params, feats, items, scores, trie=None):
    trie = self.trie if trie is None else self._placed(trie)
    with jax.set_mesh(self.partitioner.mesh), self.partitioner.rules_context():
      return fn(params, self.stage_params, feats, trie, self.sid_codes, jnp.asarray(items, jnp.int32),
                jnp.asarray(scores, jnp.float32))

  def parts(self, params, feats, items, scores, trie=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(candidates [b, C] (0: empty), policy log-probs (-inf: empty), SASRec log-probs)``."""
    cand, policy, sasrec = (np.asarray(x) for x in self._run(self._candidates, params, feats, items, scores, trie))
    return np.maximum(cand, 0), policy, sasrec

  def __call__(self, params, feats, items, scores, trie=None) -> np.ndarray:
    out, _ = self._run(self._apply, params, feats, items, scores, trie)
    return np.maximum(np.asarray(out), 0)


def train(sequences: Sequence[Sequence[int]], num_items: int,
          config: sasrec_lib.SASRecConfig = sasrec_lib.SASRecConfig(), *, seed: int = 0) -> SASRecScorer:
  """Trains a scorer on TRAINING ``sequences`` (never validation or test targets)."""
  params, info = sasrec_lib.fit_sasrec(sequences, num_items, config, seed=seed)
  return SASRecScorer(config, num_items, params, sequences_digest(sequences), {**info, "seed": seed})


def scorer_cache_dir(dataset: str, digest: str, cfg: RescoringConfig) -> str:
  """``<root>/<dataset>_<training-sequence digest>_<settings hash>``: a scorer's cache, keyed by
  the content it was trained on and every setting it depends on."""
  root = cfg.cache_dir or os.path.join(_REPO_ROOT, ".cache", "rescoring")
  blob = json.dumps({"sasrec": cfg.sasrec.to_dict(), "seed": cfg.seed}, sort_keys=True).encode()
  return os.path.join(root, f"{dataset}_{digest}_{hashlib.sha256(blob).hexdigest()[:10]}")


def get_scorer(dataset: str, cfg: RescoringConfig, log=print, domains: Sequence[str] | None = None) -> SASRecScorer:
  """The dataset's scorer (a catalogue's, with ``domains``: `dataset_sequences`): from its cache
  when one was trained on the same training sequences with the same settings, else trained
  (training split only) and cached. A save is an Orbax checkpoint, finalised only when complete,
  so a crash mid-save never leaves a scorer that loads."""
  sequences, num_items = dataset_sequences(dataset, domains)
  path = scorer_cache_dir(dataset, sequences_digest(sequences), cfg)
  if checkpoints.has_checkpoint(path):
    log(f"[oxyjax] re-scoring: SASRec scorer from {path}")
    return SASRecScorer.load(path, sequences=sequences, num_items=num_items)
  log(f"[oxyjax] re-scoring: training the SASRec scorer on {len(sequences)} training sequences -> {path}")
  scorer = train(sequences, num_items, cfg.sasrec, seed=cfg.seed)
  scorer.save(path)
  return scorer


def dataset_sequences(dataset: str, domains: Sequence[str] | None = None) -> tuple[list[list[int]], int]:
  """``(training sequences, num_items)`` of a registered dataset (train split only); with
  ``domains`` (a multi-scenario run's catalogue, `ModelArtifact.domains`), every domain's
  training sequences in the joint catalogue's item indices: the logs the scenarios are built from."""
  if domains:
    from oxyjax.data.catalogue import Catalogue

    ds = Catalogue.load(list(domains)).as_dataset()
  else:
    ds = readers.load_dataset(dataset)
  return build.training_sequences(ds.train), ds.num_items


def artifact_sequences(artifact) -> tuple[list[list[int]], int]:
  """`dataset_sequences` of the data a model artifact was built from (one dataset or a catalogue)."""
  return dataset_sequences(artifact.dataset, artifact.domains or None)


def _define_flags(fv: flags.FlagValues = flags.FLAGS):
  """The CLI's flags, defined only when it runs (other entry points that import this module, such
  as `oxyjax.export`, have flags of the same names)."""
  flags.DEFINE_string("dataset", None, "a registered dataset (beauty, sports, office, industrial, ...)", flag_values=fv)
  flags.DEFINE_list("domains", None, "instead of --dataset: a multi-scenario run's catalogue (its artifact's "
                    "domains, e.g. office,industrial), trained on every domain's training sequences", flag_values=fv)
  flags.DEFINE_string("out", None, "the scorer's directory (default: the cache the training command reads, "
                      "<repo>/.cache/rescoring/<dataset>_<training digest>_<settings>)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "training seed", flag_values=fv)
  for field in dataclasses.fields(sasrec_lib.SASRecConfig):  # --num_epochs, --dim, --dropout_rate, ...
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(type(field.default))
    if define is not None:
      define(field.name, field.default, f"SASRecConfig.{field.name}", flag_values=fv)


def _sasrec_config(fl) -> sasrec_lib.SASRecConfig:
  """The SASRec settings the CLI's flags give (each flag a `SASRecConfig` field of that name)."""
  return dataclasses.replace(sasrec_lib.SASRecConfig(), **{
      f.name: getattr(fl, f.name) for f in dataclasses.fields(sasrec_lib.SASRecConfig) if f.name in fl})


def main(argv):
  del argv
  fl = flags.FLAGS
  if bool(fl.dataset) == bool(fl.domains):
    raise app.UsageError("give --dataset or --domains")
  config = _sasrec_config(fl)
  if fl.domains:
    from oxyjax.data.catalogue import Catalogue

    name = Catalogue.load(fl.domains).name  # what a multi-scenario run's cache is keyed by
  else:
    name = fl.dataset
  if fl.out is None:
    scorer = get_scorer(name, RescoringConfig(sasrec=config, seed=fl.seed), domains=fl.domains)
    out = scorer_cache_dir(name, scorer.digest, RescoringConfig(sasrec=config, seed=fl.seed))
  else:
    sequences, num_items = dataset_sequences(name, fl.domains)
    scorer = train(sequences, num_items, config, seed=fl.seed)
    scorer.save(out := fl.out)
  print(f"[rescoring] {name}: {scorer.num_items} items, train loss by epoch "
        f"{scorer.info.get('train_loss_per_epoch')}, {scorer.info.get('wall_time_s')} s -> {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
