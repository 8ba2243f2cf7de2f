"""Residual k-means: recovery of known clusters, determinism, chunking, edge cases."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.sid import rq_kmeans


def _is_permutation_of(codes: np.ndarray, labels: np.ndarray) -> bool:
  """codes agree with labels up to relabelling (a bijection between the two)."""
  pairs = set(zip(labels.tolist(), codes.tolist()))
  return len(pairs) == len(set(labels.tolist())) == len(set(codes.tolist()))


def _blobs(rng, num_clusters=8, dim=16, n=800, scale=10.0, noise=0.1):
  centres = rng.normal(size=(num_clusters, dim)) * scale
  labels = rng.permutation(np.arange(n) % num_clusters)
  return (centres[labels] + rng.normal(size=(n, dim)) * noise).astype(np.float32), labels


def test_level1_recovers_separated_clusters():
  x, labels = _blobs(np.random.default_rng(0))
  model = rq_kmeans.fit(x, num_levels=2, codebook_size=8, num_iters=20, seed=0)
  codes = rq_kmeans.encode(model, x)
  assert codes.shape == (800, 2) and codes.dtype == np.int32
  assert _is_permutation_of(codes[:, 0], labels)
  assert model.codebooks.shape == (2, 8, 16)


def test_second_level_clusters_the_residual():
  rng = np.random.default_rng(1)
  coarse = rng.normal(size=(4, 8)) * 20.0
  fine = rng.normal(size=(3, 8)) * 2.0
  a = rng.permutation(np.arange(600) % 4)
  b = rng.permutation(np.arange(600) % 3)
  x = (coarse[a] + fine[b] + rng.normal(size=(600, 8)) * 0.05).astype(np.float32)
  model = rq_kmeans.fit(x, num_levels=2, codebook_size=(4, 3), num_iters=30, seed=0)
  codes = rq_kmeans.encode(model, x)
  assert model.codebook_sizes == (4, 3)
  assert model.codebooks.shape == (2, 4, 8)
  assert _is_permutation_of(codes[:, 0], a)
  assert _is_permutation_of(codes[:, 1], b)


def test_kmeans_plus_plus_is_deterministic():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(300, 5)), jnp.float32)
  valid = jnp.ones((300,), bool)
  c1 = rq_kmeans.kmeans_plus_plus(jax.random.PRNGKey(7), x, valid, num_clusters=10)
  c2 = rq_kmeans.kmeans_plus_plus(jax.random.PRNGKey(7), x, valid, num_clusters=10)
  c3 = rq_kmeans.kmeans_plus_plus(jax.random.PRNGKey(8), x, valid, num_clusters=10)
  np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
  assert not np.array_equal(np.asarray(c1), np.asarray(c3))
  # Every centre is a data point, and they are distinct.
  d = np.abs(np.asarray(c1)[:, None, :] - np.asarray(x)[None]).sum(-1).min(1)
  assert np.all(d == 0)
  assert np.unique(np.asarray(c1), axis=0).shape[0] == 10


def test_kmeans_plus_plus_never_picks_padding():
  x = np.zeros((20, 3), np.float32)
  x[:4] = np.eye(4, 3) + 1.0
  x[4:] = 1e6  # padding rows: huge distance, would dominate if not masked
  valid = jnp.arange(20) < 4
  c = np.asarray(rq_kmeans.kmeans_plus_plus(jax.random.PRNGKey(0), jnp.asarray(x), valid, num_clusters=4))
  assert np.all(np.abs(c).max(1) < 10)


def test_fit_is_deterministic_and_chunking_invariant():
  x, _ = _blobs(np.random.default_rng(3), num_clusters=5, n=301, noise=2.0)
  m1 = rq_kmeans.fit(x, num_levels=2, codebook_size=6, num_iters=10, seed=4)
  m2 = rq_kmeans.fit(x, num_levels=2, codebook_size=6, num_iters=10, seed=4)
  np.testing.assert_array_equal(m1.codebooks, m2.codebooks)
  m3 = rq_kmeans.fit(x, num_levels=2, codebook_size=6, num_iters=10, seed=4, batch_size=7)
  np.testing.assert_allclose(m1.codebooks, m3.codebooks, atol=1e-4)
  np.testing.assert_array_equal(rq_kmeans.encode(m1, x), rq_kmeans.encode(m1, x, batch_size=13))


def test_empty_cluster_is_reseeded_from_far_point():
  rng = np.random.default_rng(5)
  x = np.concatenate([rng.normal(size=(50, 2)) * 0.1, rng.normal(size=(50, 2)) * 0.1 + 5.0]).astype(np.float32)
  xp, valid = rq_kmeans._pad_rows(x, 32)
  init = jnp.asarray([[0.0, 0.0], [5.0, 5.0], [1000.0, 1000.0]], jnp.float32)  # third gets nothing
  centres, idx, _, _, _, reseeded = rq_kmeans._lloyd(xp, valid, init, num_clusters=3, num_iters=10, batch_size=32)
  idx = np.asarray(idx)[:100]
  assert int(reseeded) >= 1
  assert np.all(np.bincount(idx, minlength=3) > 0)
  assert np.abs(np.asarray(centres)).max() < 10


def test_codebook_clamped_when_fewer_points_than_codes(caplog):
  x = np.random.default_rng(6).normal(size=(5, 4)).astype(np.float32)
  with caplog.at_level(logging.WARNING):
    model = rq_kmeans.fit(x, num_levels=2, codebook_size=8, num_iters=5, seed=0)
  assert model.codebook_sizes == (5, 5)
  assert "clamping" in caplog.text
  codes = rq_kmeans.encode(model, x)
  assert np.unique(codes[:, 0]).size == 5  # each point is its own centre


def test_bad_inputs():
  with pytest.raises(ValueError, match="entries"):
    rq_kmeans.fit(np.zeros((10, 2), np.float32), num_levels=3, codebook_size=(2, 2), num_iters=1)
  with pytest.raises(ValueError, match="NaN"):
    rq_kmeans.fit(np.full((10, 2), np.nan, np.float32), num_levels=1, codebook_size=2, num_iters=1)
  model = rq_kmeans.fit(np.random.default_rng(0).normal(size=(10, 2)), num_levels=1, codebook_size=2, num_iters=2)
  with pytest.raises(ValueError, match="must be"):
    rq_kmeans.encode(model, np.zeros((3, 5), np.float32))


def _hub_data(seed=0):
  """High-dimensional core of 320 points (scale 0.1) inside 80 spread ones (scale 1).

  Plain k-means hands nearly the whole core to one centre (the hub effect behind residual-level
  collisions) and spends the other centres on the spread points.
  """
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.normal(size=(320, 32)) * 0.1, rng.normal(size=(80, 32))]).astype(np.float32)


def test_balanced_assignment_spreads_the_hub_and_encode_reproduces_it():
  x = _hub_data()
  plain = rq_kmeans.fit(x, num_levels=1, codebook_size=16, num_iters=30, seed=0)
  bal = rq_kmeans.fit(x, num_levels=1, codebook_size=16, num_iters=30, seed=0, balanced=True)
  sizes_plain = np.bincount(rq_kmeans.encode(plain, x)[:, 0], minlength=16)
  sizes_bal = np.bincount(rq_kmeans.encode(bal, x)[:, 0], minlength=16)
  assert sizes_plain.max() >= 200
  assert sizes_bal.max() <= 50 and sizes_bal.min() >= 8  # mean 25
  assert bal.balanced == (True,) and plain.balanced == (False,)
  np.testing.assert_array_equal(plain.bias, 0.0)
  # encode uses the stored prices: the same codes as the last training assignment.
  xp, valid = rq_kmeans._pad_rows(x, 64)
  init = rq_kmeans.kmeans_plus_plus(jax.random.PRNGKey(0), xp, valid, num_clusters=16)
  centres, idx, bias, *_ = rq_kmeans._lloyd(xp, valid, init, 0.1, num_clusters=16, num_iters=30,
                                            batch_size=64, balanced=True)
  model = rq_kmeans.RQKMeans(codebooks=np.asarray(centres)[None], codebook_sizes=(16,),
                             bias=np.asarray(bias)[None], balanced=(True,))
  np.testing.assert_array_equal(rq_kmeans.encode(model, x)[:, 0], np.asarray(idx)[:400])
