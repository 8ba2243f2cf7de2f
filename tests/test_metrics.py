"""Tests for oxyjax.metrics: hand-computed values, batching invariance, writers."""

import json
import math

import numpy as np
import pytest

from oxyjax.metrics import MetricsAccumulator, ranking_metrics, target_ranks, write_metrics


def test_hand_computed_values():
  preds = np.array([[3, 1, 2, -1],
                    [5, 6, 7, 8],
                    [9, -1, -1, -1],
                    [1, 2, 3, 4]])
  targets = np.array([1, 8, 4, 7])
  np.testing.assert_array_equal(target_ranks(preds, targets), [1, 3, -1, -1])
  m = ranking_metrics(preds, targets, ks=(1, 2, 4))
  assert m["recall@1"] == 0.0
  assert m["recall@2"] == pytest.approx(1 / 4)
  assert m["recall@4"] == pytest.approx(2 / 4)
  assert m["ndcg@1"] == 0.0
  assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 4)
  assert m["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 4)
  for k in (1, 2, 4):
    assert m[f"hr@{k}"] == m[f"recall@{k}"]
  assert m["num_examples"] == 4.0
  assert MetricsAccumulator((1, 2, 4)).update(preds, targets).result() == m


def test_top1_hit_and_first_occurrence():
  m = ranking_metrics(np.array([[7, 7, 1]]), np.array([7]), ks=(1, 3))
  assert m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0 and m["ndcg@3"] == 1.0


def test_minus_one_never_matches():
  m = ranking_metrics(np.array([[-1, -1]]), np.array([-1]), ks=(2,))
  assert m["recall@2"] == 0.0


def test_mask_drops_rows():
  preds = np.array([[1, 2], [3, 4], [5, 6]])
  targets = np.array([1, 9, 6])
  m = ranking_metrics(preds, targets, ks=(1, 2), mask=np.array([True, False, True]))
  assert m["num_examples"] == 2.0
  assert m["recall@1"] == 0.5 and m["recall@2"] == 1.0
  assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
  with pytest.raises(ValueError):
    ranking_metrics(preds, targets, ks=(1,), mask=np.array([0.5, 1.0, 1.0]))


def test_errors():
  with pytest.raises(ValueError, match="predictions"):
    ranking_metrics(np.zeros((2, 5), int), np.zeros(2, int), ks=(10,))
  with pytest.raises(ValueError):
    ranking_metrics(np.zeros((2, 5), int), np.zeros(3, int), ks=(1,))
  with pytest.raises(ValueError):
    MetricsAccumulator(ks=(1,)).merge(MetricsAccumulator(ks=(1, 2)))


def test_empty_is_nan():
  m = MetricsAccumulator(ks=(1,)).result()
  assert math.isnan(m["recall@1"]) and m["num_examples"] == 0.0


def naive_metrics(preds, targets, ks):
  out = {}
  for k in ks:
    rec, ndcg = [], []
    for p, t in zip(preds.tolist(), targets.tolist()):
      top = p[:k]
      if t in top:
        r = top.index(t)
        rec.append(1.0)
        ndcg.append(1.0 / math.log2(r + 2))
      else:
        rec.append(0.0)
        ndcg.append(0.0)
    out[f"recall@{k}"] = sum(rec) / len(rec)
    out[f"ndcg@{k}"] = sum(ndcg) / len(ndcg)
  return out


@pytest.mark.parametrize("seed", range(5))
def test_accumulator_batching_invariance_and_naive_agreement(seed):
  rng = np.random.default_rng(seed)
  n, k_max, num_items = 503, 25, 40
  # distinct items per row (like decoded beams), some -1 padding at the end
  preds = np.stack([rng.permutation(num_items)[:k_max] + 1 for _ in range(n)])
  pad = rng.integers(0, 6, size=n)
  preds[np.arange(k_max)[None, :] >= k_max - pad[:, None]] = -1
  targets = rng.integers(1, num_items + 1, size=n)
  ks = (1, 5, 10, 20)

  whole = ranking_metrics(preds, targets, ks)
  want = naive_metrics(preds, targets, ks)
  for key, v in want.items():
    assert whole[key] == pytest.approx(v, rel=1e-12)

  # random batch boundaries, merged in a random order, as if across hosts
  cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
  parts = [MetricsAccumulator(ks).add(p, t) for p, t in
           zip(np.split(preds, cuts), np.split(targets, cuts))]
  total = MetricsAccumulator(ks)
  for i in rng.permutation(len(parts)):
    total.merge(parts[i])
  assert total.result() == whole  # bit-identical

  # masking rows out equals dropping them
  mask = rng.random(n) < 0.7
  assert ranking_metrics(preds, targets, ks, mask=mask) == ranking_metrics(
      preds[mask], targets[mask], ks)


def test_write_metrics(tmp_path):
  metrics = {
      "oxyjax_beauty": ranking_metrics(np.array([[1, 2, 3, 4, 5]]), np.array([2]), ks=(1, 5)),
      "oxyjax_sports": ranking_metrics(np.array([[1, 2, 3, 4, 5]]), np.array([9]), ks=(1, 5)),
  }
  json_path, md_path = write_metrics(metrics, str(tmp_path / "eval"))
  with open(json_path) as f:
    assert json.load(f) == metrics
  lines = open(md_path).read().strip().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[0] == "dataset" and header[1:4] == ["recall@1", "ndcg@1", "hr@1"]
  assert "num_examples" in header
  assert len(lines) == 4 and lines[2].startswith("| oxyjax_beauty |")
  row = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")]))
  assert row["recall@5"] == "1.0000" and row["ndcg@5"] == f"{1 / math.log2(3):.4f}"


def test_per_example_means_are_the_accumulated_metrics_and_the_paired_difference():
  from oxyjax.metrics import paired_difference, per_example

  rng = np.random.default_rng(0)
  ranks_a = rng.integers(-1, 25, 500)
  ranks_b = np.where(rng.random(500) < 0.8, ranks_a, rng.integers(-1, 25, 500))
  acc = MetricsAccumulator(ks=(1, 5, 10, 20))
  preds = np.full((500, 20), -1)  # a list with the target at each row's rank
  targets = np.arange(1, 501)
  ok = (ranks_a >= 0) & (ranks_a < 20)
  preds[np.flatnonzero(ok), ranks_a[ok]] = targets[ok]
  res = acc.add(preds, targets).result()
  for m in ("recall@5", "recall@10", "hr@1", "ndcg@5", "ndcg@10", "ndcg@20"):
    assert per_example(ranks_a, m).mean() == pytest.approx(res[m], rel=1e-12)
  mean, se = paired_difference(ranks_a, ranks_b, "recall@10")
  d = per_example(ranks_b, "recall@10") - per_example(ranks_a, "recall@10")
  assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(500))
  assert paired_difference(ranks_a, ranks_a, "ndcg@10") == (0.0, 0.0)  # identical models: no difference
  with pytest.raises(ValueError, match="unknown metric"):
    per_example(ranks_a, "mrr@10")
