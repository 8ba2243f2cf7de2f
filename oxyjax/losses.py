"""Training losses. Every loss returns a weighted *sum* and its *denominator*, so that a
mean is identical under any batching, gradient accumulation or sharding (tunix style)."""

from __future__ import annotations

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
