"""Full-catalogue ranking metrics (Recall / NDCG / HR @K) from decoded top-K item lists.

Conventions (the project's PAPER.md, section 8): leave-one-out evaluation, one relevant item per
example, every item ranked (no negative sampling). The ranked list of an example is the
decoder's beams, best first (`oxyjax.decoding.beam_search` items; ``-1`` = no item).

All metrics are computed from an integer histogram of the target's rank (plus the number
of examples), so `MetricsAccumulator` gives bit-identical results under any batching,
merge order or number of hosts: merging is adding integer arrays.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from oxyjax import fileio

DEFAULT_KS = (1, 5, 10, 20)


def target_ranks(pred_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of each target in its prediction list, ``-1`` if absent.

  Args:
    pred_items: ``[N, K]`` ranked item lists, best first; ``-1`` means no item.
    targets: ``[N]`` the one relevant item per example.

  Returns:
    ``[N] int64``; the first occurrence counts if an item is repeated.
  """
  pred_items = np.asarray(pred_items)
  targets = np.asarray(targets)
  if pred_items.ndim != 2 or targets.shape != pred_items.shape[:1]:
    raise ValueError(f"pred_items must be [N, K] and targets [N], got {pred_items.shape} "
                     f"and {targets.shape}")
  hit = (pred_items == targets[:, None]) & (pred_items >= 0)
  return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)


class MetricsAccumulator:
  """Additive accumulator of ranking metrics; `merge` sums across batches or hosts.

  State: ``rank_counts[r]`` = number of counted examples whose target was at rank ``r``
  (``r < max(ks)``), and ``count`` = number of counted examples. Both are integers, so
  the result does not depend on how the examples were batched.
  """

  def __init__(self, ks: Sequence[int] = DEFAULT_KS):
    self.ks = tuple(sorted({int(k) for k in ks}))
    if not self.ks or self.ks[0] < 1:
      raise ValueError(f"ks must be positive, got {ks}")
    self.rank_counts = np.zeros(self.ks[-1], dtype=np.int64)
    self.count = 0

  def add(self, pred_items: np.ndarray, targets: np.ndarray,
          mask: Optional[np.ndarray] = None) -> "MetricsAccumulator":
    """Counts a batch: ``pred_items [N, K]`` (K >= max(ks)), ``targets [N]``,
    ``mask [N]`` bool (False = padding example, not counted)."""
    pred_items = np.asarray(pred_items)
    if pred_items.ndim == 2 and pred_items.shape[1] < self.ks[-1]:
      raise ValueError(f"@{self.ks[-1]} needs at least {self.ks[-1]} predictions per example, "
                       f"got {pred_items.shape[1]}")
    ranks = target_ranks(pred_items, targets)
    if mask is not None:
      mask = np.asarray(mask)
      if mask.shape != ranks.shape:
        raise ValueError(f"mask must be [N]={ranks.shape}, got {mask.shape}")
      if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError("mask must be boolean (or 0/1): weights would break exactness")
      ranks = ranks[mask.astype(bool)]
    self.count += int(ranks.size)
    hits = ranks[(ranks >= 0) & (ranks < self.ks[-1])]
    self.rank_counts += np.bincount(hits, minlength=self.ks[-1])
    return self

  update = add  # the usual name in metric libraries (clu, keras)

  def merge(self, other: "MetricsAccumulator") -> "MetricsAccumulator":
    """Adds another accumulator (same ks) into this one and returns self."""
    if other.ks != self.ks:
      raise ValueError(f"cannot merge ks {other.ks} into {self.ks}")
    self.rank_counts += other.rank_counts
    self.count += other.count
    return self

  def result(self) -> dict[str, float]:
    """``recall@k``, ``ndcg@k``, ``hr@k`` for each k, and ``num_examples``.

    With no examples counted every metric is NaN.
    """
    out: dict[str, float] = {}
    n = self.count
    gains = 1.0 / np.log2(np.arange(self.ks[-1], dtype=np.float64) + 2.0)
    for k in self.ks:
      hits = int(self.rank_counts[:k].sum())
      out[f"recall@{k}"] = hits / n if n else math.nan
      out[f"ndcg@{k}"] = float(np.dot(self.rank_counts[:k], gains[:k])) / n if n else math.nan
      # One relevant item per example: the target's SID path is among the top-k beams
      # exactly when the target item is, so HR@k == Recall@k.
      out[f"hr@{k}"] = out[f"recall@{k}"]
    out["num_examples"] = float(n)
    return out


def per_example(ranks: np.ndarray, metric: str) -> np.ndarray:
  """``[N]`` one example's value of ``recall@k`` / ``hr@k`` (1 if the target ranks < k) or
  ``ndcg@k`` (``1 / log2(rank + 2)`` then) from `target_ranks`; their mean is the metric that
  `MetricsAccumulator` gives."""
  name, k = metric.split("@")
  ranks = np.asarray(ranks)
  hit = (ranks >= 0) & (ranks < int(k))
  if name in ("recall", "hr"):
    return hit.astype(np.float64)
  if name == "ndcg":
    return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
  raise ValueError(f"unknown metric {metric!r}; expected recall@k, hr@k or ndcg@k")


def paired_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, metric: str) -> tuple[float, float]:
  """(mean of b - a, its standard error) of `metric` over the same examples decoded by two
  models: the paired test that tells a small change from noise (the standard error of one
  model's recall on n rows is sqrt(p (1 - p) / n); the paired one counts only the examples the
  two models disagree on). SE = std(differences, ddof=1) / sqrt(n)."""
  a, b = per_example(ranks_a, metric), per_example(ranks_b, metric)
  if a.shape != b.shape:
    raise ValueError(f"paired metrics need the same examples, got {a.shape} and {b.shape}")
  d = b - a
  n = d.size
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else math.nan


def ranking_metrics(
    pred_items: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    mask: Optional[np.ndarray] = None,
) -> dict[str, float]:
  """Full-catalogue Recall@k, NDCG@k and HR@k for one relevant item per example.

  Args:
    pred_items: ``[N, K]`` int ranked item lists, best first; ``-1`` = no item.
      ``K`` must be at least ``max(ks)``.
    targets: ``[N]`` int, the held-out item of each example.
    ks: cut-offs.
    mask: optional ``[N]`` bool; False rows (padding) are not counted.

  Returns:
    ``{"recall@k", "ndcg@k", "hr@k" for k in ks, "num_examples"}``, means over counted
    examples:

    - ``recall@k``: 1 if the target is among the first k predictions;
    - ``ndcg@k``: ``1 / log2(rank + 2)`` with ``rank`` the target's 0-based position if
      ``rank < k``, else 0 (the ideal DCG of one relevant item is 1);
    - ``hr@k``: the target's full SID path is among the top-k beams. Every item has a
      unique path and each example has exactly one target, so this equals ``recall@k``
      (reported under both names because papers use both).
  """
  return MetricsAccumulator(ks).add(pred_items, targets, mask).result()


def _metric_order(names: Sequence[str]) -> list[str]:
  def key(name: str):
    base, _, k = name.partition("@")
    order = {"recall": 0, "ndcg": 1, "hr": 2}
    return (0, int(k), order.get(base, 3), base) if k.isdigit() else (1, 0, 0, name)
  return sorted(names, key=key)


def write_metrics(metrics_by_dataset: Mapping[str, Mapping[str, float]],
                  out_dir: str) -> tuple[str, str]:
  """Writes ``metrics.json`` and a markdown table ``metrics.md`` (one row per dataset).

  Returns the two paths.
  """
  os.makedirs(out_dir, exist_ok=True)
  data = {str(ds): {str(k): float(v) for k, v in m.items()} for ds, m in metrics_by_dataset.items()}
  json_path = os.path.join(out_dir, "metrics.json")
  fileio.write_text(json_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
  names = _metric_order(sorted({k for m in data.values() for k in m}))
  lines = ["| dataset | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for ds, m in data.items():
    cells = []
    for name in names:
      v = m.get(name)
      if v is None:
        cells.append("")
      elif name == "num_examples":
        cells.append(f"{int(v)}")
      else:
        cells.append(f"{v:.4f}")
    lines.append(f"| {ds} | " + " | ".join(cells) + " |")
  md_path = os.path.join(out_dir, "metrics.md")
  fileio.write_text(md_path, "\n".join(lines) + "\n")
  return json_path, md_path
