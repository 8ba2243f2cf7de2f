"""Transformer building blocks with logical axis names on every parameter and activation.

Logical names used here (mapped to mesh axes only by `oxyjax.partitioning`):
  batch, beam, length, embed, mlp, heads, kv, vocab.
Parameters are kept in `param_dtype` (float32); computation runs in `dtype` (float32 or
bfloat16); softmax and normalisation statistics are always float32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
NEG_INF = -1e9  # additive mask value; finite so that fully-masked rows stay NaN-free

# Initialisers (T5-style scale: variance 1/fan_in).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Annotates an activation with logical axes (no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm (T5 style: scale only, no bias, no mean subtraction)."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class Embed(nn.Module):
  """A lookup table [num_embeddings, features] with logical axes ('vocab', 'embed')."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  embedding_init: Callable = default_embed_init

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features),
        jnp.float32,
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)


class MlpBlock(nn.Module):
  """Gated-GELU feed-forward block (T5.1.1): wo(gelu(wi_0 x) * wi_1 x).

  A mixture-of-experts block with the same call signature plugs in here later.
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d = x.shape[-1]
    lead = ("batch",) + (None,) * (x.ndim - 3) + ("length",)
    wi_kernel = self.param(
        "wi", nn.with_logical_partitioning(default_kernel_init, ("embed", None, "mlp")), (d, 2, self.mlp_dim),
        jnp.float32)
    wi = jnp.einsum("...d,dgm->...gm", x, wi_kernel.astype(self.dtype))
    h = nn.gelu(wi[..., 0, :], approximate=True) * wi[..., 1, :]
    h = constrain(h, lead + ("mlp",))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    wo_kernel = self.param(
        "wo", nn.with_logical_partitioning(default_kernel_init, ("mlp", "embed")), (self.mlp_dim, d), jnp.float32)
    out = jnp.einsum("...m,md->...d", h, wo_kernel.astype(self.dtype))
    return constrain(out, lead + ("embed",))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
  """Scaled dot-product attention.

  q: [..., Tq, H, Dh]; k, v: [..., Tk, H, Dh] with the same leading dims as q, or with fewer
  leading dims (then k/v are shared across q's extra middle dims — used to share one encoder
  output across all beams without copying it). bias broadcasts to [..., H, Tq, Tk].
  Returns [..., Tq, H, Dh].
  """
  extra = q.ndim - k.ndim
  if extra:
    # q: [B, W, Tq, H, D], k: [B, Tk, H, D] -> fold beams into the query axis. Only a
    # key-padding bias ([B, 1.., 1, 1, Tk]) can be shared this way.
    b = q.shape[0]
    qf = q.reshape((b, -1) + q.shape[-2:])  # [B, W*Tq, H, D]
    folded_bias = None if bias is None else bias.reshape((b, 1, 1, bias.shape[-1]))
    return dot_product_attention(qf, k, v, folded_bias).reshape(q.shape)
  depth = q.shape[-1]
  # (No preferred_element_type: XLA:CPU has no bf16 x bf16 -> f32 dot; TPU/GPU accumulate
  # bf16 products in f32 internally anyway.)
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32)
  logits = logits / jnp.sqrt(depth).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("...hqk,...khd->...qhd", weights, v)


class Attention(nn.Module):
  """Multi-head attention with separable projections.

  `project_q(x)`, `project_kv(x)` return [..., T, H, Dh]; `attend(q, k, v, bias)` applies
  attention and the output projection. `__call__` does all three for self-attention.
  """

  num_heads: int
  head_dim: int
  embed_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(default_kernel_init, ("embed", "heads", "kv"))
    shape = (self.embed_dim, self.num_heads, self.head_dim)
    self.wq = self.param("query", init, shape, jnp.float32)
    self.wk = self.param("key", init, shape, jnp.float32)
    self.wv = self.param("value", init, shape, jnp.float32)
    self.wo = self.param(
        "out", nn.with_logical_partitioning(default_kernel_init, ("heads", "kv", "embed")),
        (self.num_heads, self.head_dim, self.embed_dim), jnp.float32,
    )
    self.dropout = nn.Dropout(self.dropout_rate)

  def _heads_axes(self, ndim):
    return ("batch",) + (None,) * (ndim - 4) + ("length", "heads", "kv")

  def project_q(self, x):
    q = jnp.einsum("...d,dhk->...hk", x, self.wq.astype(self.dtype))
    return constrain(q, self._heads_axes(q.ndim))

  def project_kv(self, x):
    k = jnp.einsum("...d,dhk->...hk", x, self.wk.astype(self.dtype))
    v = jnp.einsum("...d,dhk->...hk", x, self.wv.astype(self.dtype))
    return constrain(k, self._heads_axes(k.ndim)), constrain(v, self._heads_axes(v.ndim))

  def attend(self, q, k, v, bias, deterministic: bool = True):
    out = dot_product_attention(q, k, v, bias)
    out = self.dropout(out, deterministic=deterministic)
    y = jnp.einsum("...hk,hkd->...d", out, self.wo.astype(self.dtype))
    return constrain(y, ("batch",) + (None,) * (y.ndim - 3) + ("length", "embed"))

  def __call__(self, x_q, x_kv, bias, deterministic: bool = True):
    k, v = self.project_kv(x_kv)
    return self.attend(self.project_q(x_q), k, v, bias, deterministic)
