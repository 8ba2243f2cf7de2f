"""Tree k-means SIDs (``oxyjax/sid/tree_kmeans.py``): every level is fit within its parent node."""

from __future__ import annotations

import numpy as np
import pytest

from oxyjax.sid import build, tree_kmeans


def _nested_blobs(seed: int = 0):
  """4 well-separated blobs, each made of 4 separated sub-blobs of 12 points: a two-level truth.

  Blob centres are 100 apart, sub-blob centres 10 apart within a blob, points 0.1 from their
  sub-blob centre, so any k-means of sensible quality recovers both partitions exactly.
  """
  rng = np.random.default_rng(seed)
  blobs = rng.normal(size=(4, 8)) * 100.0
  x, top, sub = [], [], []
  for b in range(4):
    subs = blobs[b] + rng.normal(size=(4, 8)) * 10.0
    for s in range(4):
      x.append(subs[s] + rng.normal(size=(12, 8)) * 0.1)
      top += [b] * 12
      sub += [4 * b + s] * 12
  perm = rng.permutation(len(top))
  return (np.concatenate(x).astype(np.float32)[perm], np.asarray(top)[perm], np.asarray(sub)[perm])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether the labelings ``a`` and ``b`` split the rows into the same groups."""
  pairs = np.unique(np.stack([a, b], 1), axis=0)
  return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_tree_codes_recover_a_nested_partition_and_stay_within_the_codebook():
  x, top, sub = _nested_blobs()
  codes, levels = tree_kmeans.fit_codes(x, num_levels=3, codebook_size=4, num_iters=30, seed=0, balanced=False)
  assert codes.shape == (192, 3) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < 4
  assert _same_partition(codes[:, 0], top)
  # Level 2 only means something under its parent: (level 1, level 2) is the sub-blob.
  assert _same_partition(codes[:, 0] * 4 + codes[:, 1], sub)
  assert not _same_partition(codes[:, 1], sub)  # the same level-2 token is reused across parents
  assert [lv.num_nodes for lv in levels] == [1, 4, 16]
  assert [lv.num_kmeans_nodes for lv in levels] == [1, 4, 16]  # 12 items > 4 children in every sub-blob
  # Every node has at most 4 children.
  for depth in (1, 2):
    _, node = np.unique(codes[:, :depth], axis=0, return_inverse=True)
    for j in np.unique(node):
      assert len(np.unique(codes[node.reshape(-1) == j, depth])) <= 4


def test_children_are_numbered_nearest_to_the_parent_mean_first():
  # One node of 5 items (<= 8 children): each its own child, ranked by distance to the mean.
  x = np.array([[0.0, 5.0], [0.0, -1.0], [3.0, 0.0], [0.0, 0.5], [-9.0, 0.0]], np.float32)
  codes, levels = tree_kmeans.fit_codes(x, num_levels=1, codebook_size=8, seed=0)
  d = np.sum((x - x.mean(0)) ** 2, axis=1)
  np.testing.assert_array_equal(codes[:, 0], np.argsort(np.argsort(d)))
  assert levels[0].num_kmeans_nodes == 0
  # With k-means (n > C): four tight clusters of 10 on a line at -20, -1, 2 and 25 (mean 1.5), so
  # their centres rank 2, -1, -20, 25 by distance to the node mean.
  rng = np.random.default_rng(0)
  at = np.repeat([-20.0, -1.0, 2.0, 25.0], 10)
  x = np.stack([at, np.zeros_like(at)], 1).astype(np.float32) + rng.normal(size=(40, 2)).astype(np.float32) * 0.01
  codes, levels = tree_kmeans.fit_codes(x, num_levels=1, codebook_size=4, num_iters=30, seed=0, balanced=False)
  np.testing.assert_array_equal(codes[:, 0], np.repeat([2, 1, 0, 3], 10))
  assert levels[0].num_kmeans_nodes == 1


def test_balanced_tree_splits_a_hub_evenly_and_the_fit_is_deterministic():
  rng = np.random.default_rng(1)
  # 320 points in a tight hub and 80 spread out: plain k-means gives the hub few big children.
  x = np.concatenate([rng.normal(size=(320, 16)) * 0.1, rng.normal(size=(80, 16))]).astype(np.float32)
  plain, _ = tree_kmeans.fit_codes(x, num_levels=2, codebook_size=8, num_iters=30, seed=0, balanced=False)
  bal, levels = tree_kmeans.fit_codes(x, num_levels=2, codebook_size=8, num_iters=30, seed=0, balanced=True)
  assert np.bincount(plain[:, 0]).max() >= 200
  sizes = np.bincount(bal[:, 0], minlength=8)
  assert sizes.max() <= 100 and sizes.min() >= 25  # mean 50
  again, _ = tree_kmeans.fit_codes(x, num_levels=2, codebook_size=8, num_iters=30, seed=0, balanced=True)
  np.testing.assert_array_equal(again, bal)
  # Paths: 400 items in at most 64 leaves of a depth-2 tree, so shared paths (the collision
  # level's job) remain; but no leaf is empty-coded: every (node, child) pair that occurs is used.
  assert len(np.unique(bal, axis=0)) <= 64 and levels[1].num_nodes == len(np.unique(bal[:, 0]))


def test_tree_quantizer_through_the_build_and_the_cache_key(tmp_path):
  args = dict(num_levels=3, codebook_size=256, embedding="text", balance="residual", seed=0)
  tree = build.sid_cache_dir("office", "abc", **args, quantizer="tree", root=tmp_path)
  assert tree != build.sid_cache_dir("office", "abc", **args, root=tmp_path)
  # The default keeps its pre-existing key and settings, so tables cached before stay valid.
  assert build.sid_cache_dir("office", "abc", **args, root=tmp_path).name == "office_abc_text_3x256_residual_s0"
  assert "quantizer" not in build.sid_settings(**args)
  assert build.sid_settings(**args, quantizer="tree")["quantizer"] == "tree"
  with pytest.raises(ValueError, match="quantizer must be one of"):
    build.build_with_report("beauty", quantizer="trie", dataset=object())
