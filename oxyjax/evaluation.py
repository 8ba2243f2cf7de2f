"""Evaluation: constrained beam search over a split, full-catalogue Recall / NDCG / HR.

`Evaluator` scores any weights on any `ExampleArrays`; it needs a model, a partitioner and
the decoder's constraint (a `PrefixTrie`), nothing from training (no optimizer, no training
split). `train.evaluate_run` uses it to evaluate a run's artifact.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import numpy as np

from oxyjax import metrics as metrics_lib
from oxyjax import partitioning
from oxyjax.data import pipeline
from oxyjax.sid.trie import PrefixTrie


BEAMS_PREFIX = "beams/"  # with a second stage: the beams' own metrics, beside the second stage's


def fixed_subset(arrays: pipeline.ExampleArrays, max_examples: int | None) -> pipeline.ExampleArrays:
  """A fixed random `max_examples` of `arrays` (all of them when None or more): the files are
  ordered by user id, and the first users are not representative (the first 3,000 of Beauty
  score half the full split's recall)."""
  if max_examples is None or len(arrays) <= max_examples:
    return arrays
  return arrays.take(np.sort(np.random.default_rng(0).choice(len(arrays), max_examples, replace=False)))


def check_select_metric(metric: str, ks: Sequence[int]) -> str:
  """`metric` ('recall@k', 'ndcg@k' or 'hr@k' for a k the evaluator computes), or a ValueError
  naming the choices: a misspelt selection metric would otherwise only fail at the first
  evaluation, after training has run for `eval_every_steps`."""
  name, _, k = metric.partition("@")
  if name in ("recall", "ndcg", "hr") and k.isdigit() and int(k) in ks:
    return metric
  raise ValueError(f"select_metric {metric!r}: expected recall@k, ndcg@k or hr@k with k in {tuple(ks)}")


class Evaluator:
  """Runs constrained beam search over a split and computes full-catalogue metrics."""

  def __init__(self, model, partitioner: partitioning.Partitioner, trie: PrefixTrie, *,
               beam_size: int, batch_size: int, ks: Sequence[int] = (1, 5, 10, 20),
               score_normalization: str = "vocab", level_weights: Sequence[float] | None = None,
               select_metric: str | None = None, second_stage=None):
    """``second_stage`` (optional, e.g. `rescoring.Rescorer`): ``(params, features, items [b, beam],
    scores [b, beam], trie) -> items [b, C]``, a reordering of each row's beams (C >= beam with
    extra candidates, items of the pool ``trie`` decoded over) that the metrics score instead of
    the beam-search order; one process only."""
    self.model, self.partitioner, self.trie = model, partitioner, trie
    self.second_stage = second_stage
    self.score_normalization, self.level_weights = score_normalization, level_weights
    self.beam_size, self.ks = beam_size, tuple(k for k in ks if k <= beam_size)
    self._select_metric = None if select_metric is None else check_select_metric(select_metric, self.ks)
    dp = partitioner.data_parallel_size
    self.batch_size = max(dp, int(math.ceil(batch_size / dp)) * dp)
    self._predict = jax.jit(functools.partial(
        model.predict, beam_size=beam_size, normalize=score_normalization,
        level_weights=None if level_weights is None else tuple(float(x) for x in level_weights)))

  @property
  def headline_metric(self) -> str:
    """The metric the best checkpoint is chosen by: `select_metric` when given, else recall@10 (or
    at the largest k below it)."""
    if self._select_metric is not None:
      return self._select_metric
    return "recall@10" if 10 in self.ks else f"recall@{max(self.ks)}"

  def __call__(self, params, arrays: pipeline.ExampleArrays, max_examples: int | None = None,
               trie: PrefixTrie | None = None) -> dict[str, float]:
    """Metrics of `params` on `arrays` (a fixed random `max_examples` of them when given), decoding
    over `trie` (default: the evaluator's; a scenario's pool for a multi-scenario model). With a
    second stage, the metrics of its order, and those of the beams alone from the same decoding
    pass under ``BEAMS_PREFIX + <metric>``."""
    arrays = fixed_subset(arrays, max_examples)
    acc = metrics_lib.MetricsAccumulator(ks=self.ks)
    trie = self.trie if trie is None else trie  # the second stage adds only items of this pool
    if self.second_stage is None:
      for items, targets, mask in self._decode(params, arrays, trie):
        acc.update(items, targets, mask=mask)
      return acc.result()
    beams_acc = metrics_lib.MetricsAccumulator(ks=self.ks)
    for batch, items, scores, mask in self.beams(params, arrays, trie):
      targets = np.asarray(batch["target_items"])
      beams_acc.update(items, targets, mask=mask)
      acc.update(np.asarray(self.second_stage(params, batch, items, scores, trie)), targets, mask=mask)
    return {**acc.result(), **{BEAMS_PREFIX + k: v for k, v in beams_acc.result().items()}}

  def target_ranks(self, params, arrays: pipeline.ExampleArrays, max_examples: int | None = None,
                   trie: PrefixTrie | None = None) -> np.ndarray:
    """``[N]`` the 0-based rank of each example's target in its decoded list (-1: not in the
    beam), in row order, for per-example (paired) comparisons; the rows are those `__call__`
    scores."""
    ranks = [metrics_lib.target_ranks(items, targets)[mask]
             for items, targets, mask in self._decode(params, fixed_subset(arrays, max_examples), trie)]
    return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)

  def beams(self, params, arrays: pipeline.ExampleArrays, trie: PrefixTrie | None = None):
    """Yields ``(features, items [b, beam], scores [b, beam], mask [b] bool)`` per batch, in row
    order, in one process: the model's features and the beams with their scores, for a second
    stage that reorders them (`rescoring.Rescorer`, `rescoring.rerank`)."""
    if jax.process_count() != 1:
      raise NotImplementedError("Evaluator.beams runs in one process")
    for batch, _, out, mask in self._predict_batches(params, arrays, trie):
      items, scores = jax.device_get((out.items, out.scores))
      yield batch, np.asarray(items), np.asarray(scores), np.asarray(mask, bool)

  def _predict_batches(self, params, arrays: pipeline.ExampleArrays, trie: PrefixTrie | None):
    """Yields ``(host features, sharded features, BeamSearchOutput, mask)`` for this process's
    slice of every global batch (`eval_batches` with the process index)."""
    trie = self.trie if trie is None else trie
    pi, pc = jax.process_index(), jax.process_count()
    if self.batch_size % pc:
      raise ValueError(f"eval batch size {self.batch_size} is not divisible by {pc} processes")
    for examples, mask in pipeline.eval_batches(arrays, self.batch_size, process_index=pi, process_count=pc):
      batch = self.model.convert_features(examples, weights=mask.astype(np.float32))
      with jax.set_mesh(self.partitioner.mesh), self.partitioner.rules_context():
        sharded = self.partitioner.shard_batch(batch)
        out = self._predict(params, sharded, trie)
      yield batch, sharded, out, mask

  def _decode(self, params, arrays: pipeline.ExampleArrays, trie: PrefixTrie | None):
    """Yields ``(items [b, beam], targets [b], mask [b] bool)`` per global batch, on every host."""
    # Several processes: each feeds its slice of every global batch, and the predictions, targets
    # and masks of the whole global batch are gathered from the sharded arrays, so every host
    # computes the same global metrics.
    if self.second_stage is not None:
      trie = self.trie if trie is None else trie
      for batch, items, scores, mask in self.beams(params, arrays, trie):
        yield np.asarray(self.second_stage(params, batch, items, scores, trie)), np.asarray(batch["target_items"]), mask
      return
    for batch, sharded, out, mask in self._predict_batches(params, arrays, trie):
      if jax.process_count() == 1:
        yield np.asarray(jax.device_get(out.items)), np.asarray(batch["target_items"]), np.asarray(mask, bool)
      else:
        from jax.experimental import multihost_utils
        g_mask = self.partitioner.shard_batch({"mask": mask})["mask"]
        items, targets, g_mask = multihost_utils.process_allgather(
            (out.items, sharded["target_items"], g_mask), tiled=True)
        yield np.asarray(items), np.asarray(targets), np.asarray(g_mask, bool)

  def scenarios(self, params, sets, max_examples: int | None = None, trie_of=None) -> dict[str, dict[str, float]]:
    """One row per evaluation set (`{name: (examples, pool)}`, `Experiment.eval_sets`), each decoded
    over its own pool (`trie_of(pool)`), plus 'mean': each metric's unweighted mean over the sets."""
    rows = {name: self(params, arrays, max_examples, trie_of(pool)) for name, (arrays, pool) in sets.items()}
    # Also for one set (then the mean is that set's row): the best checkpoint is chosen by it.
    keys = set.intersection(*(set(r) for r in rows.values()))
    rows["mean"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in sorted(keys) if k != "num_examples"}
    return rows
