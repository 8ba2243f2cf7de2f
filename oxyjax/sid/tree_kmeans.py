"""Hierarchical (tree) k-means: semantic IDs whose every level is fit within its parent.

Residual k-means (``rq_kmeans``) shares one codebook per level across all parents: code ``b`` at
level 2 means the same residual direction under every level-1 code. A tree quantiser instead
splits each node's items into at most ``C_l`` children by k-means on those items alone, the way
DSI builds document IDs and tree recommenders (TDM, RecForest) build their balanced item trees:
a code's meaning is "this part of my parent's items", so a prefix names a set of items that are
close to each other, at every depth.

Per level ``l`` (``codebook_size[l] = C``) and per node (the items sharing the first ``l`` codes):

* ``n <= C`` items: each gets its own child, no k-means.
* ``n > C``: k-means with ``C`` clusters on the node's items (``rq_kmeans``' k-means++ and Lloyd
  iterations, the balanced Sinkhorn assignment where ``balanced[l]``, so a balanced tree has
  children of about equal size: the "hierarchy-aware balanced codes" of docs/sids.md).
* **Child order.** Children are numbered by the distance of their centre (or, for single-item
  children, the item) to the node's mean, nearest first, ties by index. A token then means the
  same thing under every parent (``0`` = the most central part of the parent), so the decoder's
  per-level token embeddings share something across parents.

The node's k-means key is ``fold_in(level key, node index)`` with nodes in sorted prefix order, so
the codes depend only on ``x``, the settings and ``seed``. Rows are padded to a power of two so
the jit programs compile once per row bucket and level, not once per node.

``fit_codes`` returns the ``[N, L]`` codes (the collision level is added by ``SIDTable``, as for
residual codes) and a per-level summary. Codes are a function of the fitted items only: there is
no ``encode`` for new items (a new item needs a rebuild, as with the collision level).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oxyjax.sid import rq_kmeans

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TreeLevel:
  """What fitting one level did: nodes split, how many needed k-means, and the mean squared
  distance of each item to its child's centre (``inertia``; 0 for single-item children)."""

  codebook_size: int
  num_nodes: int
  num_kmeans_nodes: int
  inertia: float
  seconds: float


def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _chunk(rows: int, c: int) -> int:
  """The largest power of two dividing ``rows`` (a power of two) within ``rq_kmeans``' chunk budget."""
  cap = max(256, rq_kmeans._CHUNK_ELEMENTS // max(c, 1))
  return min(rows, 1 << (cap.bit_length() - 1))


def _node_kmeans(key: jax.Array, xs: np.ndarray, c: int, *, num_iters: int, balanced: bool,
                 balance_temperature: float, sinkhorn_iters: int) -> tuple[np.ndarray, np.ndarray]:
  """k-means of one node's items ``xs [n, D]`` (n > c) -> (child index [n], centres [c, D])."""
  n = xs.shape[0]
  rows = _bucket(n)
  bs = _chunk(rows, c)
  xp = jnp.zeros((rows, xs.shape[1]), jnp.float32).at[:n].set(xs)
  valid = jnp.arange(rows) < n
  init = rq_kmeans.kmeans_plus_plus(key, xp, valid, num_clusters=c)
  centres, idx, _, _, _, _ = rq_kmeans._lloyd(
      xp, valid, init, jnp.float32(balance_temperature), num_clusters=c, num_iters=int(num_iters),
      batch_size=bs, balanced=balanced, sinkhorn_iters=int(sinkhorn_iters))
  return np.asarray(idx[:n]), np.asarray(centres)


def _order_by_distance(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """Ranks (0 = nearest to ``centre``) of ``points [k, D]``; ties by index."""
  d2 = np.sum((points - centre[None, :]) ** 2, axis=-1)
  order = np.lexsort((np.arange(len(points)), d2))
  rank = np.empty(len(points), np.int64)
  rank[order] = np.arange(len(points))
  return rank


def fit_codes(x: np.ndarray, *, num_levels: int, codebook_size: int | Sequence[int], num_iters: int = 50,
              seed: int = 0, balanced: bool | Sequence[bool] = True, balance_temperature: float = 0.1,
              sinkhorn_iters: int = 10) -> tuple[np.ndarray, list[TreeLevel]]:
  """Tree k-means codes of ``x [N, D]`` -> ``(codes [N, L] int32, per-level TreeLevel)``.

  ``codebook_size``: children per node at each level (one int or ``L`` ints); ``balanced``: one
  bool or one per level (the balanced assignment of ``rq_kmeans``); the rest as ``rq_kmeans.fit``.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"x must be a non-empty [N, D] array, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("x contains NaN or inf")
  sizes = rq_kmeans._level_sizes(codebook_size, num_levels)
  if isinstance(balanced, (bool, np.bool_)):
    balanced = (bool(balanced),) * num_levels
  balanced = tuple(bool(b) for b in balanced)
  if len(balanced) != num_levels:
    raise ValueError(f"balanced has {len(balanced)} entries but num_levels={num_levels}")
  n = x.shape[0]
  codes = np.zeros((n, num_levels), np.int64)
  node = np.zeros(n, np.int64)  # each item's node at the current level, numbered in sorted prefix order
  levels = []
  key = jax.random.PRNGKey(seed)
  for level, c in enumerate(sizes):
    t0 = time.perf_counter()
    key, level_key = jax.random.split(key)
    num_nodes = int(node.max()) + 1
    sq_err = 0.0
    fitted = 0
    # Each node's items in index order, from one stable sort (not a scan of all items per node).
    by_node = np.argsort(node, kind="stable")
    groups = np.split(by_node, np.cumsum(np.bincount(node, minlength=num_nodes))[:-1])
    for j, members in enumerate(groups):
      xs = x[members]
      mean = xs.mean(axis=0)
      if len(members) <= c:
        codes[members, level] = _order_by_distance(xs, mean)
        continue
      fitted += 1
      child, centres = _node_kmeans(jax.random.fold_in(level_key, j), xs, c, num_iters=num_iters,
                                    balanced=balanced[level], balance_temperature=balance_temperature,
                                    sinkhorn_iters=sinkhorn_iters)
      codes[members, level] = _order_by_distance(centres, mean)[child]
      sq_err += float(np.sum((xs - centres[child]) ** 2))
    # The next level's nodes: distinct prefixes, numbered in sorted order.
    _, node = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
    node = node.reshape(-1)
    counts = np.bincount(node)
    levels.append(TreeLevel(codebook_size=c, num_nodes=num_nodes, num_kmeans_nodes=fitted, inertia=sq_err / n,
                            seconds=round(time.perf_counter() - t0, 2)))
    logger.info("tree-kmeans level %d: C=%d nodes=%d (k-means in %d), largest child %d items (%.1fs)",
                level, c, num_nodes, fitted, int(counts.max()), levels[-1].seconds)
  return codes.astype(np.int32), levels
