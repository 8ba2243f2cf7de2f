"""Item embeddings learned for next-item prediction: a small SASRec-style model in JAX.

A source of semantic IDs for catalogues without text (the Amazon 2014 data), beside the
co-occurrence PPMI-SVD of ``embeddings.collaborative_embeddings``. It sees only the users'
TRAINING sequences (``build.training_sequences``: each user's longest training history plus
its target), so a validation or test target never shapes an embedding.

Model (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation"), with the full-softmax
cross-entropy of Klenitskiy & Vasilev 2023 instead of SASRec's one sampled negative:

* item embedding ``E [num_items + 1, dim]`` (row 0 padding), scaled by ``sqrt(dim)``, plus a
  learned position embedding counted from the END of the sequence (so the most recent item
  always has position 0, whatever the padded length);
* ``num_blocks`` pre-LayerNorm causal self-attention blocks (``num_heads`` heads, GELU MLP
  of width ``4 * dim``), dropout after the embedding, attention and MLP;
* output logits ``h . E^T`` (tied weights), padding logit masked; the loss at every real
  position is the cross-entropy of the next training item over the whole catalogue, summed
  over positions and divided by their number (a weighted sum with its denominator).

The SID source is the learned input/output table ``E``, L2-normalised. Items that never occur
in a training sequence get no gradient; like ``collaborative_embeddings`` they get a random unit
vector from a Gaussian seeded by ``seed``, so their row does not depend on anything in the data.

Batches: sequences (last ``max_len + 1`` items) are grouped into a few padded length buckets
and each batch holds about ``tokens_per_batch`` positions, so a short-sequence dataset (Beauty's
median training sequence is 6 items) wastes little compute on padding and only a handful of
shapes are compiled. The epoch order is drawn from ``seed``; everything is deterministic on one
machine.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from oxyjax.sid import embeddings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Size and training of the SASRec item-embedding model. The shape is SASRec's (64-d, 2
  blocks, 1 head, 50 positions). 40 epochs at learning rate 2e-3 is a compute budget (about
  12 min for Beauty on 2 CPU cores: 10 epochs took 175 s), not a converged model: the Beauty training loss is
  still falling slowly at the end (9.26 -> 5.70, docs/sids.md). Not tuned on validation or test."""

  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  max_len: int = 50
  dropout_rate: float = 0.3
  learning_rate: float = 2e-3
  weight_decay: float = 0.0
  num_epochs: int = 40
  tokens_per_batch: int = 2048
  length_buckets: tuple[int, ...] = (4, 8, 16, 32, 50)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["length_buckets"] = list(self.length_buckets)
    return d


class SASRec(nn.Module):
  num_items: int
  dim: int
  num_blocks: int
  num_heads: int
  max_len: int
  dropout_rate: float

  def setup(self):
    self.item_embed = nn.Embed(self.num_items + 1, self.dim,
                               embedding_init=nn.initializers.normal(stddev=self.dim ** -0.5))
    self.pos_embed = nn.Embed(self.max_len, self.dim, embedding_init=nn.initializers.normal(stddev=0.02))
    self.blocks = [_Block(self.dim, self.num_heads, self.dropout_rate) for _ in range(self.num_blocks)]
    self.final_ln = nn.LayerNorm()
    self.drop = nn.Dropout(self.dropout_rate)

  def __call__(self, seq: jax.Array, *, train: bool, last_only: bool = False) -> jax.Array:
    """``seq [B, L]`` left-padded with 0 -> next-item logits ``[B, L, num_items + 1]``; with
    ``last_only`` only the last position's ``[B, num_items + 1]`` (scoring: the catalogue-wide
    output product is then one row per user, not L)."""
    length = seq.shape[1]
    valid = seq > 0
    pos = jnp.arange(length - 1, -1, -1)  # distance from the last position
    x = self.item_embed(seq) * math.sqrt(self.dim) + self.pos_embed(pos)[None]
    x = self.drop(x, deterministic=not train) * valid[..., None]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None, None] & valid[:, None, None, :]
    for block in self.blocks:
      x = block(x, mask, train=train) * valid[..., None]
    h = self.final_ln(x[:, -1] if last_only else x)
    logits = self.item_embed.attend(h)
    return logits.at[..., 0].set(-1e9)  # never predict padding


class _Block(nn.Module):
  dim: int
  num_heads: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                                        deterministic=not train)(h, h, mask=mask)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.dim)(h)
    h = nn.Dense(self.dim)(nn.gelu(h))
    return x + nn.Dropout(self.dropout_rate)(h, deterministic=not train)


def _bucket_batches(sequences: Sequence[Sequence[int]], cfg: SASRecConfig) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """Per padded length L: ``(inputs [N, L], targets [N, L])``, left-padded with 0."""
  buckets = sorted(b for b in cfg.length_buckets if b <= cfg.max_len)
  if not buckets or buckets[-1] < cfg.max_len:
    buckets.append(cfg.max_len)
  rows: dict[int, list[tuple[list[int], list[int]]]] = {b: [] for b in buckets}
  for s in sequences:
    s = list(s)[-(cfg.max_len + 1):]
    if len(s) < 2:
      continue
    inp, tgt = s[:-1], s[1:]
    length = next(b for b in buckets if b >= len(inp))
    rows[length].append((inp, tgt))
  out = {}
  for length, rs in rows.items():
    if not rs:
      continue
    x = np.zeros((len(rs), length), np.int32)
    y = np.zeros((len(rs), length), np.int32)
    for i, (inp, tgt) in enumerate(rs):
      x[i, length - len(inp):] = inp
      y[i, length - len(tgt):] = tgt
    out[length] = (x, y)
  return out


def _epoch_batches(buckets, cfg: SASRecConfig, rng: np.random.Generator):
  """One epoch: every row once, in batches of about ``tokens_per_batch`` positions; the last
  batch of a bucket is padded with empty rows (no targets, so no loss)."""
  batches = []
  for length, (x, y) in buckets.items():
    rows = max(1, cfg.tokens_per_batch // length)
    order = rng.permutation(len(x))
    for start in range(0, len(x), rows):
      idx = order[start:start + rows]
      bx = np.zeros((rows, length), np.int32)
      by = np.zeros((rows, length), np.int32)
      bx[:len(idx)], by[:len(idx)] = x[idx], y[idx]
      batches.append((bx, by))
  return [batches[i] for i in rng.permutation(len(batches))]


def make_model(num_items: int, cfg: SASRecConfig) -> SASRec:
  return SASRec(num_items=num_items, dim=cfg.dim, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads,
                max_len=cfg.max_len, dropout_rate=cfg.dropout_rate)


def train_sasrec(sequences: Sequence[Sequence[int]], num_items: int, config: SASRecConfig = SASRecConfig(),
                 *, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """Trains SASRec on ``sequences`` and returns ``(item table [num_items + 1, dim], info)``.

  ``sequences`` are the users' TRAINING item sequences (ints in ``1..num_items``, oldest first);
  never pass validation or test targets. The table is the raw learned ``E`` (row 0 padding);
  ``sasrec_embeddings`` normalises it for quantisation. ``info`` has the loss per epoch and the
  wall time.
  """
  params, info = fit_sasrec(sequences, num_items, config, seed=seed)
  return np.asarray(params["item_embed"]["embedding"], np.float32), info


def fit_sasrec(sequences: Sequence[Sequence[int]], num_items: int, config: SASRecConfig = SASRecConfig(),
               *, seed: int = 0) -> tuple[Any, dict[str, Any]]:
  """`train_sasrec`'s training loop; returns the whole model's ``(params, info)`` (for scoring,
  `oxyjax.rescoring`)."""
  cfg = config
  model = make_model(num_items, cfg)
  buckets = _bucket_batches(sequences, cfg)
  if not buckets:
    raise ValueError("SASRec needs at least one training sequence of two or more items")
  key = jax.random.key(seed)
  init_key, drop_key = jax.random.split(key)
  first = next(iter(buckets.values()))[0][:1]
  params = model.init({"params": init_key}, jnp.asarray(first), train=False)["params"]
  tx = optax.adamw(cfg.learning_rate, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay)
  opt_state = tx.init(params)

  def loss_fn(params, x, y, rng):
    """Mean CE over real positions, with (sum, count) as aux for the epoch's mean."""
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    w = (y > 0).astype(jnp.float32)
    loss_sum, count = (ce * w).sum(), w.sum()
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    (_, (loss_sum, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss_sum, count

  rng = np.random.default_rng([seed, 2])
  t0 = time.perf_counter()
  history = []
  n_steps = 0
  for epoch in range(cfg.num_epochs):
    total, count = jnp.zeros(()), jnp.zeros(())
    for bx, by in _epoch_batches(buckets, cfg, rng):
      drop_key, sub = jax.random.split(drop_key)
      params, opt_state, ls, c = step(params, opt_state, bx, by, sub)
      total, count = total + ls, count + c
      n_steps += 1
    history.append(round(float(total / jnp.maximum(count, 1.0)), 4))
    logger.info("sasrec epoch %d/%d: train loss %.4f", epoch + 1, cfg.num_epochs, history[-1])
  info = {"train_loss_per_epoch": history, "steps": n_steps,
          "num_train_positions": int(sum(int((y > 0).sum()) for _, y in buckets.values())),
          "wall_time_s": round(time.perf_counter() - t0, 2)}
  return params, info


def sasrec_embeddings(sequences: Sequence[Sequence[int]], num_items: int, config: SASRecConfig = SASRecConfig(),
                      *, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """SID-source embeddings ``[num_items + 1, dim]``: SASRec's item table, L2-normalised; items
  absent from every training sequence get a seeded random unit vector; row 0 is zeros."""
  table, info = train_sasrec(sequences, num_items, config, seed=seed)
  seen = np.zeros(num_items + 1, bool)
  for s in sequences:
    seen[np.asarray(list(s), np.int64)] = True
  unseen = ~seen[1:]
  info = {**info, "num_items_without_interactions": int(unseen.sum())}
  return embeddings.unit_rows(table, unseen, seed=seed), info
