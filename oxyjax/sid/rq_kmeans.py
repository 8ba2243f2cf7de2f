"""Residual k-means (RQ-KMeans) in JAX: the quantiser behind semantic IDs.

Level 1 clusters the item embeddings; level ``l + 1`` clusters the residuals left after
subtracting each item's level-``l`` centroid. An item's code path is its cluster index at
each level. ``fit`` learns the codebooks, ``encode`` maps vectors to ``[N, L]`` codes.

Per level:

* **Initialisation: k-means++** (Arthur & Vassilvitskii 2007), jit-compiled as one
  ``lax.fori_loop`` over the ``C`` centres. The first centre is drawn uniformly; each later
  one with probability proportional to the squared distance to the nearest centre chosen so
  far. The draw is a single uniform variate searched in the cumulative distance mass, so the
  result depends only on ``seed`` (deterministic for a fixed seed). ``init_sample_size``
  optionally runs it on a seeded random subset of rows (exact k-means++ costs ``C`` passes
  over the data; Lloyd iterations fix up the rest).
* **Lloyd iterations**, jit-compiled as one ``lax.while_loop``: assign every point to its
  nearest centre, move each centre to the mean of its points; stop after ``num_iters``
  iterations or as soon as no assignment changes.
* **Chunked distances.** Assignment never materialises the full ``N x C`` distance matrix:
  rows are processed ``batch_size`` at a time under ``lax.map`` (``||x||^2 - 2 x.c + ||c||^2``,
  then argmin), so peak memory is ``batch_size x C`` -- 3 x 8192 codes over ~1M x 256 inputs
  fits on one accelerator or a laptop.
* **Empty clusters** are re-seeded from far points. Rule: after an assignment, let
  ``e_1 < e_2 < ...`` be the indices of the clusters that received no point; cluster ``e_k``
  is moved onto the point with the ``k``-th largest squared distance to its assigned centre
  (ties broken by the lower row index). Those points are the worst-served ones, so the next
  assignment hands them (at least) to the re-seeded centre. The number of re-seeds is
  recorded per level in ``RQKMeans.num_reseeded``.
* **Balanced assignment (optional, ``balanced=True``).** Plain k-means minimises squared error,
  and at the deeper levels that concentrates items: the residuals of items in tight level-1
  clusters are all tiny, so one near-zero centre absorbs them and many items end up sharing
  a full path (a long collision level). The balanced variant gives every cluster about the
  same mass: each assignment step solves the entropic optimal transport from the points
  (uniform mass) to the clusters (mass ``1/C`` each) with log-domain Sinkhorn (chunked like
  the distances, warm-started across Lloyd iterations, temperature ``balance_temperature``
  times the mean squared distance to the initial centres). Its column potentials ``g`` act as
  per-cluster prices: a point goes to ``argmin_c ||x - c||^2 - eps * g_c``. The prices are kept
  in ``RQKMeans.bias`` so ``encode`` reproduces the training assignment. The Sinkhorn form keeps
  it one jit program; each Lloyd iteration costs ``1 + sinkhorn_iters`` assignment passes.
  docs/sids.md measures its effect on the four benchmarks.

If a level asks for more codes than there are points (``N < C``), the codebook size is clamped
to ``N`` with a warning (``RQKMeans.codebook_sizes`` holds the sizes actually used).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# Default number of distance-matrix elements per chunk (batch_size * C): 2^22 float32 = 16 MiB.
_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class RQKMeans:
  """A fitted residual k-means quantiser.

  Attributes:
    codebooks: ``[L, C_max, D]`` float32 centroids; level ``l`` uses rows ``:codebook_sizes[l]``
      (rows beyond are zero and never assigned).
    bias: ``[L, C_max]`` float32 per-code assignment offsets: the prices of the balanced
      assignment (zeros for plain k-means levels). ``encode`` picks ``argmin d2 + bias``.
    balanced: per level, whether the level was fit with balanced assignment.
    codebook_sizes: codes per level actually used (after clamping to ``N``).
    inertia: per level, mean squared distance of the (residual) points to their centre after
      the final assignment.
    num_iters_run: Lloyd iterations executed per level (fewer than asked when converged).
    num_reseeded: empty-cluster re-seeds per level, summed over iterations.
  """

  codebooks: np.ndarray
  codebook_sizes: tuple[int, ...]
  bias: np.ndarray | None = None
  balanced: tuple[bool, ...] = ()
  inertia: tuple[float, ...] = ()
  num_iters_run: tuple[int, ...] = ()
  num_reseeded: tuple[int, ...] = ()

  def __post_init__(self):
    if self.bias is None:
      object.__setattr__(self, "bias", np.zeros(self.codebooks.shape[:2], np.float32))
    if not self.balanced:
      object.__setattr__(self, "balanced", (False,) * len(self.codebook_sizes))

  @property
  def num_levels(self) -> int:
    return len(self.codebook_sizes)

  @property
  def dim(self) -> int:
    return int(self.codebooks.shape[-1])


def _default_batch_size(n: int, c: int) -> int:
  return int(max(1, min(n, max(256, _CHUNK_ELEMENTS // max(c, 1)))))


def _pad_rows(x: np.ndarray | jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Pads ``x [N, D]`` to a multiple of ``batch_size`` rows; returns it and a validity mask."""
  n = x.shape[0]
  n_pad = -(-n // batch_size) * batch_size
  x = jnp.asarray(x, jnp.float32)
  valid = jnp.arange(n_pad) < n
  if n_pad != n:
    x = jnp.concatenate([x, jnp.zeros((n_pad - n, x.shape[1]), x.dtype)], axis=0)
  return x, valid


def _sq_dist(xb: jax.Array, centres: jax.Array, c_sq: jax.Array) -> jax.Array:
  """``[B, D] x [C, D] -> [B, C]`` squared distances (``||x||^2 - 2 x.c + ||c||^2``, clipped at 0)."""
  x_sq = jnp.sum(xb * xb, axis=-1, keepdims=True)
  return jnp.maximum(x_sq - 2.0 * (xb @ centres.T) + c_sq[None, :], 0.0)


def _assign(x: jax.Array, centres: jax.Array, batch_size: int, bias: jax.Array | None = None):
  """Nearest centre per row, chunked. x ``[N, D]`` (N a multiple of batch_size), centres ``[C, D]``.

  With ``bias [C]`` the choice is ``argmin_c d2(x, c) + bias_c`` (the balanced assignment's
  prices). Returns ``(assignment [N] int32, squared distance to the chosen centre [N])``.
  """
  n, d = x.shape
  c_sq = jnp.sum(centres * centres, axis=-1)
  if bias is None:
    bias = jnp.zeros_like(c_sq)

  def one_chunk(xb):
    d2 = _sq_dist(xb, centres, c_sq)
    idx = jnp.argmin(d2 + bias[None, :], axis=-1).astype(jnp.int32)
    return idx, jnp.take_along_axis(d2, idx[:, None], axis=-1)[:, 0]

  idx, dist = jax.lax.map(one_chunk, x.reshape(n // batch_size, batch_size, d))
  return idx.reshape(n), dist.reshape(n)


def _sinkhorn_prices(x, valid, centres, g, eps, *, iters: int, batch_size: int):
  """Log-domain Sinkhorn for the entropic transport of the points onto equal-mass clusters.

  Cost ``d2 / eps``, uniform row marginals over the valid points, uniform column marginals
  ``1 / C``. Returns the column potentials ``g [C]`` after ``iters`` row+column updates (one
  chunked pass each, warm-started from ``g``); ``argmin_c d2 - eps * g_c`` is then the
  (nearly) balanced hard assignment.
  """
  n, d = x.shape
  c = centres.shape[0]
  c_sq = jnp.sum(centres * centres, axis=-1)
  log_r = -jnp.log(jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32))
  log_c = -jnp.log(jnp.float32(c))
  chunks = (x.reshape(n // batch_size, batch_size, d), valid.reshape(n // batch_size, batch_size))

  def one_pass(_, g):
    def chunk(col, inp):
      xb, vb = inp
      s = -_sq_dist(xb, centres, c_sq) / eps
      f = log_r - jax.nn.logsumexp(s + g[None, :], axis=-1)  # row potentials of this chunk
      t = jnp.where(vb[:, None], s + f[:, None], -jnp.inf)
      return jnp.logaddexp(col, jax.nn.logsumexp(t, axis=0)), None

    col, _ = jax.lax.scan(chunk, jnp.full((c,), -jnp.inf, jnp.float32), chunks)
    return log_c - col

  return jax.lax.fori_loop(0, iters, one_pass, g)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_plus_plus(key: jax.Array, x: jax.Array, valid: jax.Array, *, num_clusters: int) -> jax.Array:
  """k-means++ seeding. x ``[N, D]``, valid ``[N]`` bool -> centres ``[num_clusters, D]``.

  Deterministic for a fixed ``key``. Invalid (padding) rows are never chosen.
  """
  n, d = x.shape
  x = x.astype(jnp.float32)
  x_sq = jnp.sum(x * x, axis=-1)
  w = valid.astype(jnp.float32)
  keys = jax.random.split(key, num_clusters)

  def sample(k, mass):
    # One uniform variate in the cumulative mass: O(N), exactly reproducible.
    cdf = jnp.cumsum(mass)
    u = jax.random.uniform(k, (), jnp.float32) * cdf[-1]
    i = jnp.searchsorted(cdf, u, side="right")
    return jnp.clip(i, 0, n - 1)

  first = sample(keys[0], w)
  c0 = x[first]
  min_d2 = jnp.maximum(x_sq - 2.0 * (x @ c0) + jnp.dot(c0, c0), 0.0) * w
  centres = jnp.zeros((num_clusters, d), jnp.float32).at[0].set(c0)

  def body(j, carry):
    centres, min_d2 = carry
    total = jnp.sum(min_d2)
    # All remaining mass zero (fewer distinct points than clusters): fall back to uniform.
    mass = jnp.where(total > 0, min_d2, w)
    i = sample(keys[j], mass)
    c = x[i]
    d2 = jnp.maximum(x_sq - 2.0 * (x @ c) + jnp.dot(c, c), 0.0) * w
    return centres.at[j].set(c), jnp.minimum(min_d2, d2)

  centres, _ = jax.lax.fori_loop(1, num_clusters, body, (centres, min_d2))
  return centres


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters", "batch_size", "balanced",
                                             "sinkhorn_iters"))
def _lloyd(x, valid, centres, temperature=0.1, *, num_clusters: int, num_iters: int, batch_size: int,
           balanced: bool = False, sinkhorn_iters: int = 20):
  """Lloyd iterations with empty-cluster re-seeding (see module docstring for the rules).

  Returns ``(centres [C, D], assignment [N], bias [C], inertia, iterations, re-seeds)``; ``bias``
  is zero unless ``balanced``.
  """
  n = x.shape[0]
  k_far = min(num_clusters, n)
  w = valid.astype(jnp.float32)
  zero_bias = jnp.zeros((num_clusters,), jnp.float32)

  def plain_assign(centres):
    idx, dist = _assign(x, centres, batch_size)
    return jnp.where(valid, idx, num_clusters), dist * w  # padding -> dropped segment

  idx0, dist0 = plain_assign(centres)
  # Entropic temperature in the data's own units: a fraction of the mean squared distance.
  eps = temperature * jnp.maximum(jnp.sum(dist0) / jnp.maximum(jnp.sum(w), 1.0), 1e-12)

  def assign(centres, g):
    if not balanced:
      idx, dist = plain_assign(centres)
      return idx, dist, g, zero_bias
    g = _sinkhorn_prices(x, valid, centres, g, eps, iters=sinkhorn_iters, batch_size=batch_size)
    bias = -eps * (g - jnp.max(g))
    idx, dist = _assign(x, centres, batch_size, bias)
    return jnp.where(valid, idx, num_clusters), dist * w, g, bias

  def update(idx, dist, centres):
    sums = jax.ops.segment_sum(x, idx, num_segments=num_clusters)
    counts = jax.ops.segment_sum(w, idx, num_segments=num_clusters)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0
    # The e-th empty cluster (in index order) takes the e-th farthest point.
    _, far = jax.lax.top_k(dist, k_far)
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k_far - 1)
    reseed = x[far[rank]]
    new = jnp.where(empty[:, None], reseed, means)
    return new, jnp.sum(empty).astype(jnp.int32)

  idx0, dist0, g0, bias0 = assign(centres, zero_bias)

  def cond(s):
    it, changed = s[0], s[5]
    return jnp.logical_and(it < num_iters, changed)

  def body(s):
    it, centres, idx, dist, g, _, reseeded, _ = s
    centres, n_empty = update(idx, dist, centres)
    new_idx, new_dist, g, bias = assign(centres, g)
    changed = jnp.any(new_idx != idx) | (n_empty > 0)
    return it + 1, centres, new_idx, new_dist, g, changed, reseeded + n_empty, bias

  it, centres, idx, dist, _, _, reseeded, bias = jax.lax.while_loop(
      cond, body, (jnp.int32(0), centres, idx0, dist0, g0, jnp.bool_(True), jnp.int32(0), bias0))
  inertia = jnp.sum(dist) / jnp.maximum(jnp.sum(w), 1.0)
  return centres, idx, bias, inertia, it, reseeded


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _assign_and_subtract(x, centres, bias, *, batch_size: int):
  idx, _ = _assign(x, centres, batch_size, bias)
  return idx, x - centres[idx]


def _level_sizes(codebook_size: int | Sequence[int], num_levels: int) -> tuple[int, ...]:
  if isinstance(codebook_size, (int, np.integer)):
    sizes = (int(codebook_size),) * num_levels
  else:
    sizes = tuple(int(c) for c in codebook_size)
    if len(sizes) != num_levels:
      raise ValueError(f"codebook_size has {len(sizes)} entries but num_levels={num_levels}")
  if num_levels < 1 or any(c < 1 for c in sizes):
    raise ValueError(f"need num_levels >= 1 and every codebook size >= 1, got {num_levels}, {sizes}")
  return sizes


def fit(x: np.ndarray | jax.Array, *, num_levels: int, codebook_size: int | Sequence[int],
        num_iters: int = 20, seed: int = 0, batch_size: int | None = None,
        init_sample_size: int | None = None, balanced: bool | Sequence[bool] = False,
        balance_temperature: float = 0.1, sinkhorn_iters: int = 10) -> RQKMeans:
  """Fits residual k-means.

  Args:
    x: ``[N, D]`` float32 inputs (e.g. item embeddings).
    num_levels: number of k-means levels ``L``.
    codebook_size: codes per level, one int for all levels or a tuple of ``L``. Clamped to
      ``N`` (with a warning) when ``N`` is smaller.
    num_iters: maximum Lloyd iterations per level (stops early when assignments settle).
    seed: PRNG seed; the fit is deterministic for a fixed seed, inputs and backend.
    batch_size: rows per distance chunk (peak memory ``batch_size x C`` floats); default keeps
      a chunk at about 16 MiB.
    init_sample_size: if set and smaller than ``N``, k-means++ runs on that many rows drawn
      at random (seeded); Lloyd always uses all rows.
    balanced: balanced assignment (one bool for all levels or one per level): see the module
      docstring. Off by default (plain k-means).
    balance_temperature: entropic temperature of the balancing, as a fraction of the mean
      squared distance to the nearest initial centre (smaller: closer to equal sizes, slower).
    sinkhorn_iters: Sinkhorn passes per Lloyd iteration (warm-started from the previous
      iteration's prices, so a few suffice; each costs about one assignment pass).

  Returns:
    The fitted ``RQKMeans`` (codebooks ``[L, C_max, D]``).
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"x must be a non-empty [N, D] array, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("x contains NaN or inf")
  n, d = x.shape
  sizes = list(_level_sizes(codebook_size, num_levels))
  for l, c in enumerate(sizes):
    if c > n:
      logger.warning("level %d: codebook size %d > number of points %d; clamping to %d", l, c, n, n)
      sizes[l] = n
  if isinstance(balanced, (bool, np.bool_)):
    balanced = (bool(balanced),) * num_levels
  balanced = tuple(bool(b) for b in balanced)
  if len(balanced) != num_levels:
    raise ValueError(f"balanced has {len(balanced)} entries but num_levels={num_levels}")
  key = jax.random.PRNGKey(seed)
  residual = jnp.asarray(x)
  books, biases, inertia, iters, reseeds = [], [], [], [], []
  for level, c in enumerate(sizes):
    t0 = time.perf_counter()
    key, k_init, k_sub = jax.random.split(key, 3)
    bs = batch_size or _default_batch_size(n, c)
    xp, valid = _pad_rows(residual, bs)
    if init_sample_size is not None and init_sample_size < n:
      m = max(int(init_sample_size), c)
      rows = jax.random.choice(k_sub, n, (m,), replace=False)
      init = kmeans_plus_plus(k_init, residual[rows], jnp.ones((m,), bool), num_clusters=c)
    else:
      init = kmeans_plus_plus(k_init, xp, valid, num_clusters=c)
    centres, _, bias, level_inertia, it, reseeded = _lloyd(
        xp, valid, init, jnp.float32(balance_temperature), num_clusters=c, num_iters=int(num_iters),
        batch_size=bs, balanced=balanced[level], sinkhorn_iters=int(sinkhorn_iters))
    _, res = _assign_and_subtract(xp, centres, bias, batch_size=bs)
    residual = res[:n]
    books.append(np.asarray(centres))
    biases.append(np.asarray(bias))
    inertia.append(float(level_inertia))
    iters.append(int(it))
    reseeds.append(int(reseeded))
    logger.info("rq-kmeans level %d: C=%d iters=%d inertia=%.5g reseeded=%d (%.1fs)",
                level, c, iters[-1], inertia[-1], reseeds[-1], time.perf_counter() - t0)
  c_max = max(sizes)
  codebooks = np.zeros((num_levels, c_max, d), np.float32)
  bias = np.zeros((num_levels, c_max), np.float32)
  for l, (b, p) in enumerate(zip(books, biases)):
    codebooks[l, : b.shape[0]] = b
    bias[l, : p.shape[0]] = p
  return RQKMeans(codebooks=codebooks, codebook_sizes=tuple(sizes), bias=bias, balanced=balanced,
                  inertia=tuple(inertia), num_iters_run=tuple(iters), num_reseeded=tuple(reseeds))


def encode(model: RQKMeans, x: np.ndarray | jax.Array, *, batch_size: int | None = None) -> np.ndarray:
  """Quantises ``x [N, D]`` with a fitted model -> codes ``[N, L]`` int32.

  Per level: ``argmin_c ||r - c||^2 + bias_c`` (``bias`` is zero for plain k-means levels), then
  the residual ``r`` moves on to the next level.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[1] != model.dim:
    raise ValueError(f"x must be [N, {model.dim}], got shape {x.shape}")
  n = x.shape[0]
  if n == 0:
    return np.zeros((0, model.num_levels), np.int32)
  codes = []
  residual = jnp.asarray(x)
  for level, c in enumerate(model.codebook_sizes):
    bs = batch_size or _default_batch_size(n, c)
    xp, _ = _pad_rows(residual, bs)
    idx, res = _assign_and_subtract(xp, jnp.asarray(model.codebooks[level, :c]),
                                    jnp.asarray(model.bias[level, :c]), batch_size=bs)
    codes.append(np.asarray(idx[:n]))
    residual = res[:n]
  return np.stack(codes, axis=1).astype(np.int32)


def _benchmark(argv: Sequence[str] | None = None) -> None:
  """Times fit + encode on random Gaussian data: ``python -m oxyjax.sid.rq_kmeans --help``."""
  import argparse
  p = argparse.ArgumentParser(description="Time residual k-means on random data.")
  p.add_argument("--num_points", type=int, default=100_000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--num_levels", type=int, default=3)
  p.add_argument("--codebook_size", type=int, default=8192)
  p.add_argument("--num_iters", type=int, default=10)
  p.add_argument("--init_sample_size", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--balanced", action="store_true")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  x = np.random.default_rng(args.seed).standard_normal((args.num_points, args.dim), np.float32)
  t0 = time.perf_counter()
  model = fit(x, num_levels=args.num_levels, codebook_size=args.codebook_size,
              num_iters=args.num_iters, seed=args.seed, init_sample_size=args.init_sample_size,
              balanced=args.balanced)
  t1 = time.perf_counter()
  codes = encode(model, x)
  t2 = time.perf_counter()
  paths = np.unique(codes, axis=0).shape[0]
  print(f"backend={jax.default_backend()} devices={jax.device_count()} N={args.num_points} D={args.dim} "
        f"L={args.num_levels} C={args.codebook_size} num_iters={args.num_iters} "
        f"init_sample_size={args.init_sample_size} balanced={args.balanced}")
  print(f"fit {t1 - t0:.1f}s  encode {t2 - t1:.1f}s  iters/level={model.num_iters_run} "
        f"inertia/level={[round(v, 3) for v in model.inertia]} reseeded/level={model.num_reseeded} "
        f"distinct paths={paths}/{args.num_points}")


if __name__ == "__main__":
  _benchmark()
