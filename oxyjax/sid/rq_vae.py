"""RQ-VAE semantic IDs (TIGER) and LETTER's collaborative and diversity regularisation.

TIGER (Rajput et al. 2023) quantises item embeddings with a residual-quantised VAE rather than
k-means on the raw embeddings: an MLP encoder maps each item's content embedding to a small
latent ``z``, ``L`` codebooks quantise ``z`` residually (code ``k_l = argmin ||r_l - e_{l,k}||``,
``r_{l+1} = r_l - e_{l,k_l}``), and an MLP decoder reconstructs the input from the sum of the
chosen codewords. LETTER (Wang et al., CIKM 2024, "Learnable Item Tokenization for Generative
Recommendation") adds two terms to the RQ-VAE's loss:

* **collaborative regularisation** (weight ``cf_weight``, LETTER's alpha): an in-batch
  contrastive loss between each item's quantised latent and its collaborative embedding (here:
  the SASRec item table of ``sasrec.py``, trained on the TRAINING sequences only, at the latent's
  width): ``CE(softmax_j <z_q,i, h_j>, i)``. Items with no training interaction have a random
  collaborative row (``embeddings.unit_rows``) and are left out of this term (weight 0); LETTER
  itself does not have such items.
* **diversity regularisation** (weight ``diversity_weight``, LETTER's beta): the codewords of
  each level are clustered into ``diversity_clusters`` groups (re-clustered every
  ``refresh_every`` steps; balanced k-means, ``rq_kmeans`` with the Sinkhorn assignment, in
  place of LETTER's size-constrained k-means); for each item, its level-``l`` codeword is pulled
  towards a random other codeword of the same group and away from all others,
  ``CE(softmax_{j != k} <e_k, e_j>, positive)``, so codes are assigned more evenly.

The loss, per batch (every term a mean with its denominator):

  ``mse(decoder(z_st), x) + mean_l [ mse(e_l, sg(r_l)) + mu mse(sg(e_l), r_l) + beta div_l ]
  + alpha cf``

with ``z_st = z + sg(z_q - z)`` (the straight-through estimator) and ``r_{l+1} = sg(r_l - e_l)``,
as in LETTER's reference code: each level's codebook is trained on fixed residuals, and the
encoder is trained through the level-1 commitment, the reconstruction and the collaborative term.
Codebooks start from k-means of the initial encoder's latents (balanced, as LETTER's constrained
k-means). Training draws batches from a seeded permutation per epoch; the final codes are the
plain ``argmin`` per level of every item's latent (no Sinkhorn at encoding), and the collision
level is added by ``SIDTable`` as for k-means codes. The codes are a function of the inputs, the
settings and ``seed`` (deterministic on one machine and backend).

Defaults follow LETTER's published settings where they apply (latent 32, codebooks 3 x 256,
MLP 512-256-128-64, AdamW 1e-3, batch 1024, mu 0.25, alpha 0.02, beta 1e-4, 10 groups); the
number of steps is a compute budget for 2 CPU cores (LETTER trains for thousands of epochs on a
GPU), not a tuned value.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from oxyjax.sid import rq_kmeans

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Shape and training of the RQ-VAE. ``cf_weight = diversity_weight = 0`` is TIGER's RQ-VAE;
  ``LETTER`` (below) sets LETTER's two weights."""

  latent_dim: int = 32
  hidden_dims: tuple[int, ...] = (512, 256, 128, 64)
  num_steps: int = 3000
  batch_size: int = 1024
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  commitment_weight: float = 0.25
  cf_weight: float = 0.0
  diversity_weight: float = 0.0
  diversity_clusters: int = 10
  # Every this many steps: codewords no batch chose since the last refresh restart at random
  # residuals of the last batch, and (with diversity) the codeword groups are re-clustered.
  refresh_every: int = 50
  init_kmeans_iters: int = 50
  # Balanced (Sinkhorn) assignment in training and for the final codes; 0: plain argmin, with
  # which the level-1 codebook collapses here (47 of 256 codes used on Office after 300 steps).
  sinkhorn_epsilon: float = 0.05
  sinkhorn_iters: int = 50

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["hidden_dims"] = list(self.hidden_dims)
    return d


TIGER = RQVAEConfig()
LETTER = RQVAEConfig(cf_weight=0.02, diversity_weight=1e-4)


class _MLP(nn.Module):
  """Dense layers of widths ``dims`` with ReLU between them (none after the last)."""

  dims: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, d in enumerate(self.dims):
      x = nn.Dense(d)(x)
      if i < len(self.dims) - 1:
        x = nn.relu(x)
    return x


def _sq_dist(r: jax.Array, book: jax.Array) -> jax.Array:
  return (jnp.sum(r * r, -1, keepdims=True) - 2.0 * r @ book.T + jnp.sum(book * book, -1)[None, :])


def sinkhorn_assign(d: jax.Array, epsilon: float, iters: int) -> jax.Array:
  """Balanced assignment of ``B`` rows to ``C`` codes from squared distances ``d [B, C]``: the
  argmax of the entropic optimal-transport plan with uniform row and code masses (log-domain
  Sinkhorn), distances first mapped to ``[-1, 1]`` as in LETTER's code. ``epsilon <= 0``: argmin."""
  if epsilon <= 0:
    return jnp.argmin(d, axis=-1)
  mid = 0.5 * (jnp.max(d) + jnp.min(d))
  log_k = -(d - mid) / (jnp.max(d) - mid + 1e-5) / epsilon
  b, c = d.shape
  f, g = jnp.zeros((b,)), jnp.zeros((c,))

  def body(_, fg):
    f, g = fg
    g = -jnp.log(c) - jax.nn.logsumexp(log_k + f[:, None], axis=0)
    f = -jnp.log(b) - jax.nn.logsumexp(log_k + g[None, :], axis=1)
    return f, g

  _, g = jax.lax.fori_loop(0, iters, body, (f, g))
  return jnp.argmax(log_k + g[None, :], axis=-1)


def quantize(z: jax.Array, codebooks: jax.Array, epsilon: float = 0.0, iters: int = 50):
  """Residual quantisation of ``z [B, D]`` with ``codebooks [L, C, D]`` -> ``(codes [B, L],
  codewords [L, B, D], residuals [L, B, D])``; ``residuals[l]`` is what level ``l`` quantised,
  ``r_{l+1} = sg(r_l - e_l)``. Codes by ``sinkhorn_assign`` (``epsilon``, ``iters``)."""
  r = z
  codes, words, residuals = [], [], []
  for level in range(codebooks.shape[0]):
    d = _sq_dist(jax.lax.stop_gradient(r), jax.lax.stop_gradient(codebooks[level]))
    k = sinkhorn_assign(d, epsilon, iters)
    e = codebooks[level][k]
    codes.append(k)
    words.append(e)
    residuals.append(r)
    r = jax.lax.stop_gradient(r - e)
  return jnp.stack(codes, 1), jnp.stack(words), jnp.stack(residuals)


def diversity_loss(book: jax.Array, codes: jax.Array, groups: jax.Array, key: jax.Array) -> jax.Array:
  """LETTER's diversity term for one level: ``book [C, D]``, the batch's ``codes [B]``, each
  codeword's group ``groups [C]``. The positive of row ``i`` is a uniformly drawn other codeword
  of its code's group; rows whose group has no other codeword do not count (weight 0)."""
  c = book.shape[0]
  e = book[codes]
  sim = e @ book.T  # [B, C]
  not_self = jnp.arange(c)[None, :] != codes[:, None]
  same = (groups[None, :] == groups[codes][:, None]) & not_self
  gumbel = jax.random.gumbel(key, sim.shape)
  positive = jnp.argmax(jnp.where(same, gumbel, -jnp.inf), axis=-1)
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.where(not_self, sim, -1e9), positive)
  w = same.any(-1).astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def cf_loss(z_q: jax.Array, cf: jax.Array, weight: jax.Array) -> jax.Array:
  """LETTER's collaborative term: in-batch softmax of ``<z_q_i, cf_j>`` against ``j = i``,
  averaged over the rows with ``weight`` 1 (items with a learned collaborative embedding)."""
  logits = z_q @ cf.T
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(z_q.shape[0]))
  return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class RQVAE:
  """The encoder, decoder and codebooks (``params``) and the loss of one configuration."""

  def __init__(self, input_dim: int, codebook_sizes: Sequence[int], config: RQVAEConfig):
    if len(set(codebook_sizes)) != 1:
      raise ValueError(f"the RQ-VAE needs one codebook size for every level, got {list(codebook_sizes)}")
    self.config = config
    self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
    self.encoder = _MLP(tuple(config.hidden_dims) + (config.latent_dim,))
    self.decoder = _MLP(tuple(reversed(config.hidden_dims)) + (input_dim,))

  def init(self, key: jax.Array, x: jax.Array) -> dict[str, Any]:
    k_enc, k_dec = jax.random.split(key)
    enc = self.encoder.init(k_enc, x[:1])["params"]
    dec = self.decoder.init(k_dec, jnp.zeros((1, self.config.latent_dim)))["params"]
    books = jnp.zeros((len(self.codebook_sizes), self.codebook_sizes[0], self.config.latent_dim))
    return {"encoder": enc, "decoder": dec, "codebooks": books}

  def encode(self, params, x: jax.Array) -> jax.Array:
    return self.encoder.apply({"params": params["encoder"]}, x)

  def loss(self, params, x, cf, cf_rows, groups, key):
    """Total loss and its parts for a batch ``x [B, D_in]`` with collaborative rows ``cf [B, D]``
    (``cf_rows [B]``: 1 where the row is a learned embedding)."""
    cfg = self.config
    z = self.encode(params, x)
    codes, words, residuals = quantize(z, params["codebooks"], cfg.sinkhorn_epsilon, cfg.sinkhorn_iters)
    z_q = words.sum(0)
    z_st = z + jax.lax.stop_gradient(z_q - z)
    recon = jnp.mean((self.decoder.apply({"params": params["decoder"]}, z_st) - x) ** 2)
    codebook = jnp.mean((words - jax.lax.stop_gradient(residuals)) ** 2, axis=(1, 2))
    commit = jnp.mean((jax.lax.stop_gradient(words) - residuals) ** 2, axis=(1, 2))
    parts = {"recon": recon, "codebook": codebook.mean(), "commitment": commit.mean()}
    quant = codebook + cfg.commitment_weight * commit
    if cfg.diversity_weight:
      keys = jax.random.split(key, len(self.codebook_sizes))
      div = jnp.stack([diversity_loss(params["codebooks"][l], codes[:, l], groups[l], keys[l])
                       for l in range(len(self.codebook_sizes))])
      quant = quant + cfg.diversity_weight * div
      parts["diversity"] = div.mean()
    total = recon + quant.mean()
    if cfg.cf_weight:
      c = cf_loss(z_st, cf, cf_rows)
      total = total + cfg.cf_weight * c
      parts["cf"] = c
    parts["total"] = total
    return total, (parts, codes, residuals)


def _codeword_groups(codebooks: np.ndarray, num_groups: int, seed: int) -> np.ndarray:
  """``[L, C]`` balanced k-means group of every codeword, per level (LETTER's constrained k-means)."""
  out = []
  for level, book in enumerate(codebooks):
    g = min(num_groups, book.shape[0])
    km = rq_kmeans.fit(book, num_levels=1, codebook_size=g, num_iters=20, seed=seed + level, balanced=True)
    out.append(rq_kmeans.encode(km, book)[:, 0])
  return np.stack(out).astype(np.int32)


def fit_codes(x: np.ndarray, *, num_levels: int, codebook_size: int | Sequence[int],
              config: RQVAEConfig = TIGER, cf: np.ndarray | None = None, cf_mask: np.ndarray | None = None,
              seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """Trains an RQ-VAE on ``x [N, D_in]`` and returns ``(codes [N, L] int32, info)``.

  ``cf [N, config.latent_dim]`` (rows aligned with ``x``) and ``cf_mask [N]`` (the rows with a
  learned collaborative embedding) are needed when ``config.cf_weight > 0``. ``info`` has the loss
  parts at the first and last logged steps, the codebook usage and the wall time.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"x must be an [N, D] array with N >= 2, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("x contains NaN or inf")
  n = x.shape[0]
  # One global scale so the mean squared element is 1 (unit-norm text rows have elements of about
  # 1/sqrt(D)): the loss weights then mean what they mean for LETTER's unnormalised LLM embeddings.
  x = x / max(float(np.sqrt(np.mean(x * x))), 1e-12)
  sizes = list(rq_kmeans._level_sizes(codebook_size, num_levels))
  sizes = [min(c, n) for c in sizes]
  cfg = config
  if cfg.cf_weight:
    if cf is None or cf.shape != (n, cfg.latent_dim):
      raise ValueError(f"cf_weight > 0 needs cf of shape {(n, cfg.latent_dim)}, got "
                       f"{None if cf is None else cf.shape}")
    cf = np.asarray(cf, np.float32)
    cf_mask = np.ones(n, bool) if cf_mask is None else np.asarray(cf_mask, bool)
  else:
    cf = np.zeros((n, cfg.latent_dim), np.float32)
    cf_mask = np.zeros(n, bool)

  t0 = time.perf_counter()
  model = RQVAE(x.shape[1], sizes, cfg)
  key = jax.random.PRNGKey(seed)
  key, k_init = jax.random.split(key)
  params = model.init(k_init, jnp.asarray(x))
  # Codebooks from (balanced) residual k-means of the initial latents.
  z0 = np.asarray(jax.jit(model.encode)(params, jnp.asarray(x)))
  km = rq_kmeans.fit(z0, num_levels=num_levels, codebook_size=sizes, num_iters=cfg.init_kmeans_iters, seed=seed,
                     balanced=True)
  params["codebooks"] = jnp.asarray(km.codebooks)
  tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, cfb, wb, groups, k):
    (_, (parts, codes, residuals)), grads = jax.value_and_grad(model.loss, has_aux=True)(
        params, xb, cfb, wb, groups, k)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, parts, codes, residuals

  batch = min(cfg.batch_size, n)
  rng = np.random.default_rng([seed, 3])
  order, pos = rng.permutation(n), 0
  groups = np.zeros((num_levels, sizes[0]), np.int32)
  log = []
  used = np.zeros((num_levels, sizes[0]), np.int64)
  restarted = 0
  for s in range(cfg.num_steps):
    if s and s % cfg.refresh_every == 0:
      books = np.array(params["codebooks"])
      dead = used == 0
      if dead.any():  # dead codewords restart at residuals of the last batch (as SoundStream's VQ)
        for level in range(num_levels):
          rows = np.flatnonzero(dead[level])
          books[level, rows] = np.asarray(residuals[level])[rng.choice(batch, rows.size, replace=rows.size > batch)]
        params = {**params, "codebooks": jnp.asarray(books)}
        restarted += int(dead.sum())
      used[:] = 0
    if cfg.diversity_weight and s % cfg.refresh_every == 0:
      groups = _codeword_groups(np.asarray(params["codebooks"]), cfg.diversity_clusters, seed)
    if pos + batch > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + batch]
    pos += batch
    key, k = jax.random.split(key)
    params, opt_state, parts, codes, residuals = step(
        params, opt_state, x[idx], cf[idx], cf_mask[idx].astype(np.float32), jnp.asarray(groups), k)
    codes = np.asarray(codes)
    for level in range(num_levels):
      np.add.at(used[level], codes[:, level], 1)
    if s == 0 or (s + 1) % max(1, cfg.num_steps // 10) == 0:
      log.append({"step": s + 1, **{k_: round(float(v), 6) for k_, v in parts.items()}})
      logger.info("rq-vae step %d/%d: %s", s + 1, cfg.num_steps, log[-1])

  z = jax.jit(model.encode)(params, jnp.asarray(x))
  codes = np.asarray(jax.jit(lambda p, z: quantize(z, p["codebooks"], cfg.sinkhorn_epsilon,
                                                     cfg.sinkhorn_iters)[0])(params, z), np.int32)
  usage = [int(np.unique(codes[:, l]).size) for l in range(num_levels)]
  info = {"config": cfg.to_dict(), "codebook_sizes": sizes, "loss_log": log, "codes_used": usage,
          "cf_rows": int(cf_mask.sum()), "codewords_restarted": restarted, "wall_time_s": round(time.perf_counter() - t0, 2)}
  return codes, info
