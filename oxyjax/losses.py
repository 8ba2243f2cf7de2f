"""Training losses. Every loss returns a weighted *sum* and its *denominator*, so that a
mean is identical under any batching, gradient accumulation or sharding (tunix style)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def next_token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                             label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cross entropy over SID tokens.

  Args:
    logits: [B, L, V] float32 (invalid codes already at a large negative value).
    targets: [B, L] int codes.
    weights: [B] per-example weights (0 for padding examples; action weights later).
    label_smoothing: mass spread uniformly over the valid codes of each level.

  Returns:
    (loss_sum, denominator, correct_sum): sum over tokens of weight * nll, sum of token
    weights, and the weighted count of tokens whose argmax is the target.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    valid = logits > -1e8
    uniform = -jnp.sum(jnp.where(valid, logp, 0.0), -1) / jnp.maximum(valid.sum(-1), 1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  w = jnp.broadcast_to(weights[:, None].astype(jnp.float32), nll.shape)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w), jnp.sum(correct * w)


@dataclasses.dataclass(frozen=True)
class Q2IConfig:
  """The Q2I loss (PAPER.md section 5): L = L_NTP + weight * L_Q2I.

  weight: lambda (0 disables Q2I). variance_weight: lambda_r. decorrelation_weight: lambda_d.
  """

  weight: float = 0.0
  variance_weight: float = 0.1
  decorrelation_weight: float = 0.1


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _batch_variance(x: jax.Array, w: jax.Array, n: jax.Array) -> jax.Array:
  """Var(X): per-dimension variance over the (weighted) batch, averaged over dimensions."""
  mean = jnp.sum(x * w[:, None], axis=0) / n
  return jnp.mean(jnp.sum(jnp.square(x - mean) * w[:, None], axis=0) / n)


def q2i_loss(query: jax.Array, target: jax.Array, weights: jax.Array, *, variance_weight: float,
             decorrelation_weight: float, eps: float = 1e-8) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Query-to-item loss, PAPER.md section 5, over one batch:

    L_Q2I = -(1/B) sum_i q_i.t_i  -  lambda_r log(Var(Q) Var(T))  +  lambda_d (1/(B^2-B)) sum_{i!=j} (q_i.q_j)^2

  with q_i, t_i L2-normalised. Var(X) is the per-dimension variance over the batch,
  averaged over dimensions (our reading: the paper does not define it further); `eps` keeps
  the log finite for a collapsed batch. Rows with weight 0 (padding) take no part: every
  batch mean is weighted, and the decorrelation term averages over pairs of real rows.
  Unlike NTP this is a batch-level loss: with gradient accumulation it is computed per
  microbatch.

  Args:
    query: [B, d] IGR queries psi_q(...). target: [B, d] target-item representations psi_i(...).
    weights: [B] (0 for padding rows; only > 0 matters).

  Returns:
    (loss, parts) with parts = {'alignment', 'variance', 'decorrelation'} (unweighted terms).
  """
  q, t = _l2_normalize(query), _l2_normalize(target)
  w = (weights > 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  alignment = -jnp.sum(jnp.sum(q * t, axis=-1) * w) / n
  variance = -jnp.log(_batch_variance(q, w, n) * _batch_variance(t, w, n) + eps)
  pair = w[:, None] * w[None, :] * (1.0 - jnp.eye(q.shape[0], dtype=jnp.float32))
  gram = q @ q.T
  decorrelation = jnp.sum(jnp.square(gram) * pair) / jnp.maximum(jnp.sum(pair), 1.0)
  loss = alignment + variance_weight * variance + decorrelation_weight * decorrelation
  return loss, {"alignment": alignment, "variance": variance, "decorrelation": decorrelation}
