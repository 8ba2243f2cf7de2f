r"""A second stage for the decoder's final beams: re-scoring by a sequential recommender.

Constrained beam search (`oxyjax.decoding`) retrieves each row's K distinct valid items with the
generative model's joint log-likelihood ``log p_gen(item | history)``. A SASRec model
(`oxyjax.sid.sasrec`: causal self-attention, full-softmax next-item cross-entropy) trained on the
same TRAINING sequences scores them, and they are reordered by the log-linear combination (a
product of experts)

    log p_gen(item) + weight * log softmax_SASRec(item | history)        (`rerank`)

With ``union`` k > 0 the candidates are the beams and SASRec's own top k items (each item once);
an item beam search did not return gets its ``log p_gen`` by teacher forcing
(`RecModel.path_log_probs`, the same joint log-probability beam search scores). The generative
model sees an item through its semantic-ID path, which ties similar items together; SASRec has one
free embedding per item; the two make different errors. ``weight`` 0 is the generative model
alone. `Rescorer` is the second stage `Evaluator(second_stage=...)` applies; `RescoringConfig`
sets it for the training command (`train.train(rescoring=...)`, off unless its weight is
non-zero; the default configuration's weight and union were chosen by the defaults rule on the
validation splits of all four shipped datasets, docs/results.md). Not yet part of the exported
serving function (`oxyjax.export`, `oxyjax.serve`): a server answers with the beams alone.

    python -m oxyjax.rescoring --dataset=beauty [--out=DIR]

trains SASRec on the dataset's training split only (``build.training_sequences``: a validation
or test target never shapes it) and saves an Orbax parameter checkpoint whose metadata holds the
model config, the item count and the digest of the training sequences, by default into the cache
the training command reads (`get_scorer`: keyed by that digest and every setting);
`SASRecScorer.load` refuses a scorer trained on other sequences than the dataset's it scores for.
"""

from __future__ import annotations

import dataclasses
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
    model = sasrec_lib.make_model(self.num_items, self.config)
    next_item = lambda p, seq: jax.nn.log_softmax(model.apply({"params": p}, seq, train=False)[:, -1])  # noqa: E731
    self._log_probs = jax.jit(lambda p, seq, items: jnp.take_along_axis(next_item(p, seq), items, axis=1))
    self._top_k = jax.jit(lambda p, seq, k: jax.lax.top_k(next_item(p, seq), k), static_argnums=2)

  def log_probs(self, history_items: np.ndarray, history_mask: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``log softmax_SASRec(item | history)`` over the whole catalogue, at ``items [B, K]``
    (item 0, an empty beam, gets the padding logit's share: about -1e9). Histories as the
    model's features (``history_items`` / ``history_mask``, left-aligned)."""
    seq = right_aligned(history_items, history_mask, self.config.max_len)
    items = np.asarray(items, np.int32)
    if items.size and items.max() > self.num_items:
      raise ValueError(f"item index {int(items.max())} out of range for a scorer of {self.num_items} items")
    return np.asarray(self._log_probs(self.params, seq, items))

  def top_k(self, history_items: np.ndarray, history_mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec alone over the whole catalogue: its ``k`` best items ``[B, k]`` and their log-probs."""
    seq = right_aligned(history_items, history_mask, self.config.max_len)
    lp, items = self._top_k(self.params, seq, k)
    return np.asarray(items), np.asarray(lp)

  def save(self, directory: str) -> None:
    """An Orbax parameter checkpoint with the config and the training digest as metadata
    (`checkpoints.save_params`: an older save is replaced only once this one is complete)."""
    meta = {"kind": KIND, "config": self.config.to_dict(), "num_items": self.num_items, "digest": self.digest,
            "info": self.info, "step": 0}
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


def union(beams: np.ndarray, extra: np.ndarray) -> np.ndarray:
  """``[B, K + k]``: each row's beams, then the items of ``extra [B, k]`` that are not among them
  (a repeated item becomes 0, an empty slot, so every live candidate appears once)."""
  beams, extra = np.asarray(beams), np.asarray(extra)
  seen = (extra[:, :, None] == beams[:, None, :]).any(axis=2)
  return np.concatenate([beams, np.where(seen | (extra < 1), 0, extra)], axis=1)


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
  ranks SASRec's top k items beside the beams. ``sasrec``: the scorer's shape and training;
  ``seed``: its training seed (fixed, so that runs of several seeds share one cached scorer)."""

  weight: float = 0.0
  union: int = 20
  sasrec: sasrec_lib.SASRecConfig = sasrec_lib.SASRecConfig()
  seed: int = 0
  cache_dir: str | None = None  # default: <repo>/.cache/rescoring/<dataset>_<training digest>_<settings>

  @property
  def enabled(self) -> bool:
    return self.weight != 0.0


class Rescorer:
  """``(params, features, items [b, K], scores [b, K]) -> items [b, C]``: the policy's beams
  (with ``union``, plus SASRec's top ``union`` items, each scored by the policy's joint
  log-probability, `RecModel.path_log_probs`) reordered by ``log p_policy + weight * log p_SASRec``
  (`rerank`); empty candidates last as 0. For `Evaluator(second_stage=...)`. SASRec reads the
  history the policy reads (its most recent ``ModelConfig.max_history`` items, 20 for the small
  model), though it was trained on windows of up to ``SASRecConfig.max_len`` (50)."""

  def __init__(self, model, scorer: SASRecScorer, sid_codes: np.ndarray, partitioner, *, weight: float,
               union: int = 0):
    self.model, self.scorer, self.sid_codes, self.partitioner = model, scorer, np.asarray(sid_codes), partitioner
    self.weight, self.union = float(weight), int(union)
    self._path_log_probs = jax.jit(model.path_log_probs)
    self.max_beam_score_error = 0.0  # |recomputed joint log-prob - beam score| over live beams

  def candidates(self, params, feats, items, scores) -> tuple[np.ndarray, np.ndarray]:
    """``(items [b, C], policy log-probs [b, C])``: the beams, or with ``union`` the beams and
    SASRec's extra items (-inf for an empty slot)."""
    items, scores = np.asarray(items), np.asarray(scores)
    if not self.union:
      return items, scores
    extra, _ = self.scorer.top_k(feats["history_items"], feats["history_mask"], self.union)
    cand = union(items, extra)
    with jax.set_mesh(self.partitioner.mesh), self.partitioner.rules_context():
      joint = np.asarray(self._path_log_probs(params, feats, self.sid_codes[np.maximum(cand, 0)]))
    live = items > 0  # the recomputed joint log-prob of a beam is its beam-search score
    err = np.abs(joint[:, :items.shape[1]] - scores)[live]
    self.max_beam_score_error = max(self.max_beam_score_error, float(err.max(initial=0.0)))
    return cand, np.where(cand > 0, joint, -np.inf)

  def score(self, feats, items) -> np.ndarray:
    return self.scorer.log_probs(feats["history_items"], feats["history_mask"], np.maximum(items, 0))

  def __call__(self, params, feats, items, scores) -> np.ndarray:
    cand, policy = self.candidates(params, feats, items, scores)
    reordered, fused = rerank(cand, policy, self.score(feats, cand), self.weight)
    return np.where(np.isfinite(fused), reordered, 0)


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


def get_scorer(dataset: str, cfg: RescoringConfig, log=print) -> SASRecScorer:
  """The dataset's scorer: from its cache when one was trained on the same training sequences with
  the same settings, else trained (training split only) and cached. A save is an Orbax checkpoint,
  finalised only when complete, so a crash mid-save never leaves a scorer that loads."""
  sequences, num_items = dataset_sequences(dataset)
  path = scorer_cache_dir(dataset, sequences_digest(sequences), cfg)
  if checkpoints.has_checkpoint(path):
    log(f"[oxyjax] re-scoring: SASRec scorer from {path}")
    return SASRecScorer.load(path, sequences=sequences, num_items=num_items)
  log(f"[oxyjax] re-scoring: training the SASRec scorer on {len(sequences)} training sequences -> {path}")
  scorer = train(sequences, num_items, cfg.sasrec, seed=cfg.seed)
  scorer.save(path)
  return scorer


def dataset_sequences(dataset: str) -> tuple[list[list[int]], int]:
  """``(training sequences, num_items)`` of a registered dataset (train split only)."""
  ds = readers.load_dataset(dataset)
  return build.training_sequences(ds.train), ds.num_items


_DATASET = flags.DEFINE_string("dataset", None, "a registered dataset (beauty, sports, office, industrial, ...)")
_OUT = flags.DEFINE_string("out", None, "the scorer's directory (default: the cache the training command reads, "
                           "<repo>/.cache/rescoring/<dataset>_<training digest>_<settings>)")
_SEED = flags.DEFINE_integer("seed", 0, "training seed")
_EPOCHS = flags.DEFINE_integer("num_epochs", sasrec_lib.SASRecConfig.num_epochs, "training epochs")


def main(argv):
  del argv
  if not _DATASET.value:
    raise app.UsageError("--dataset is required")
  config = dataclasses.replace(sasrec_lib.SASRecConfig(), num_epochs=_EPOCHS.value)
  if _OUT.value is None:
    scorer = get_scorer(_DATASET.value, RescoringConfig(sasrec=config, seed=_SEED.value))
    out = scorer_cache_dir(_DATASET.value, scorer.digest, RescoringConfig(sasrec=config, seed=_SEED.value))
  else:
    sequences, num_items = dataset_sequences(_DATASET.value)
    scorer = train(sequences, num_items, config, seed=_SEED.value)
    scorer.save(out := _OUT.value)
  print(f"[rescoring] {_DATASET.value}: {scorer.num_items} items, train loss by epoch "
        f"{scorer.info.get('train_loss_per_epoch')}, {scorer.info.get('wall_time_s')} s -> {out}")


if __name__ == "__main__":
  app.run(main)
