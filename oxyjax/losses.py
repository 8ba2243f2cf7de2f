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


Q2I_VARIANCES = ("mean", "per_dimension", "generalized")
_Q2I_VARIANCE_EPS = {"mean": 1e-8, "per_dimension": 1e-4, "generalized": 1e-4}  # why: `q2i_loss`


@dataclasses.dataclass(frozen=True)
class Q2IConfig:
  """The Q2I loss (PAPER.md section 5): L = L_NTP + weight * L_Q2I.

  weight: lambda (0 disables Q2I). variance_weight: lambda_r. decorrelation_weight: lambda_d.
  variance: how `log Var(X)` is read (`q2i_loss`): 'mean' (log of the per-dimension variance
  averaged over dimensions), 'per_dimension' (the mean over dimensions of each dimension's log
  variance) or 'generalized' (the log determinant of the batch covariance over d): see `q2i_loss`.
  """

  weight: float = 0.0
  variance_weight: float = 0.1
  decorrelation_weight: float = 0.1
  variance: str = "mean"

  def __post_init__(self):
    if self.variance not in Q2I_VARIANCES:
      raise ValueError(f"Q2IConfig.variance must be one of {Q2I_VARIANCES}, got {self.variance!r}")


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _dimension_variances(x: jax.Array, w: jax.Array, n: jax.Array) -> jax.Array:
  """[d]: each dimension's variance over the (weighted) batch."""
  mean = jnp.sum(x * w[:, None], axis=0) / n
  return jnp.sum(jnp.square(x - mean) * w[:, None], axis=0) / n



def _covariance(x: jax.Array, w: jax.Array, n: jax.Array) -> jax.Array:
  """[d, d]: the (weighted) batch covariance."""
  c = (x - jnp.sum(x * w[:, None], axis=0) / n) * w[:, None]
  return c.T @ c / n


def q2i_loss(query: jax.Array, target: jax.Array, weights: jax.Array, *, variance_weight: float,
             decorrelation_weight: float, variance: str = "mean",
             eps: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Query-to-item loss, PAPER.md section 5, over one batch:

    L_Q2I = -(1/B) sum_i q_i.t_i  -  lambda_r log(Var(Q) Var(T))  +  lambda_d (1/(B^2-B)) sum_{i!=j} (q_i.q_j)^2

  with q_i, t_i L2-normalised. The paper does not define Var(X) further; three readings:
  - `variance='mean'`: log of the per-dimension variance over the batch averaged over dimensions,
    `log(mean_k var_k(X) + eps)` with eps 1e-8. For unit vectors with batch mean m this is
    `(1 - |m|^2) / d` whatever their directions, so it only sees a collapse onto one point: a batch
    on two opposite directions scores like a spread-out one (docs/multi_scenario.md, session 20).
  - `variance='per_dimension'`: `mean_k log(var_k(X) + eps)`, eps 1e-4 (a floor 1/156 of a unit
    vector's per-dimension variance in 64 dimensions, which bounds the gradient of a dead
    dimension). Equal to the first when every dimension has the same variance and larger
    (Jensen) otherwise: it is the log of the geometric mean of the variances. It sees a batch on
    a few axis-aligned directions, but not one on +-u with u spread evenly over the dimensions
    (every var_k is then 1/d), which is what training found (docs/multi_scenario.md, session 21).
  - `variance='generalized'`: the generalised variance, `log det(Cov(X) + eps I) / d`, eps 1e-4:
    the log of the geometric mean of the covariance's eigenvalues. The same value as the others
    for an isotropic batch (Cov = I/d), and a batch on +-u in any direction has d - 1 eigenvalues
    at zero and pays about `(d - 1) / d * log(eps / (1/d))` per tower.
  Rows with weight 0 (padding) take no part: every batch mean is weighted, and the
  decorrelation term averages over pairs of real rows. Unlike NTP this is a batch-level loss:
  with gradient accumulation it is computed per microbatch.

  Args:
    query: [B, d] IGR queries psi_q(...). target: [B, d] target-item representations psi_i(...).
    weights: [B] (0 for padding rows; only > 0 matters).

  Returns:
    (loss, parts) with parts = {'alignment', 'variance', 'decorrelation'} (unweighted terms).
  """
  if variance not in Q2I_VARIANCES:
    raise ValueError(f"Q2I variance must be one of {Q2I_VARIANCES}, got {variance!r}")
  q, t = _l2_normalize(query), _l2_normalize(target)
  w = (weights > 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  alignment = -jnp.sum(jnp.sum(q * t, axis=-1) * w) / n
  eps = _Q2I_VARIANCE_EPS[variance] if eps is None else eps
  if variance == "generalized":
    eye = eps * jnp.eye(q.shape[-1], dtype=jnp.float32)
    logdet = lambda x: jnp.linalg.slogdet(_covariance(x, w, n) + eye)[1] / x.shape[-1]
    variance_term = -(logdet(q) + logdet(t))
  else:
    vq, vt = _dimension_variances(q, w, n), _dimension_variances(t, w, n)
    if variance == "mean":
      variance_term = -jnp.log(jnp.mean(vq) * jnp.mean(vt) + eps)
    else:
      variance_term = -(jnp.mean(jnp.log(vq + eps)) + jnp.mean(jnp.log(vt + eps)))
  pair = w[:, None] * w[None, :] * (1.0 - jnp.eye(q.shape[0], dtype=jnp.float32))
  gram = q @ q.T
  decorrelation = jnp.sum(jnp.square(gram) * pair) / jnp.maximum(jnp.sum(pair), 1.0)
  loss = alignment + variance_weight * variance_term + decorrelation_weight * decorrelation
  return loss, {"alignment": alignment, "variance": variance_term, "decorrelation": decorrelation}
