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


# The parameters that enter the network only as the weight operand of a matrix product (the
# attention projections, the MLPs' and the output layer's kernels), the ones `matmul_dtype`
# concerns: a serving export stores these in that dtype (`cast_weight_kernels`).
WEIGHT_KERNELS = frozenset({"query", "key", "value", "out", "wi", "wo", "output_kernel"})


def weight_product(eq: str, x: jax.Array, kernel: jax.Array, dtype: Dtype, matmul_dtype: Dtype = jnp.float32):
  """``einsum(eq, x, kernel)`` for a weight kernel, in the activations' ``dtype``.

  With ``matmul_dtype`` float32 (the default) the product runs in ``dtype``, as it always has.
  With bfloat16 both operands are rounded to bfloat16 and the products are accumulated in float32
  (``preferred_element_type``), then the result is cast to ``dtype``: the inference precision of
  TPUs' default matmuls, about twice the float32 rate on a CPU with AVX-512 BF16 (not measured on
  CPUs without it; benchmarks/matmul_rates.py, docs/serving.md "Session 39").
  """
  md = jnp.dtype(matmul_dtype)
  if md == jnp.float32:
    return jnp.einsum(eq, x, kernel.astype(dtype))
  x, kernel = x.astype(md), kernel.astype(md)
  if _batch_labels(eq):
    # XLA:CPU has no bf16 x bf16 -> f32 kernel for a product with batch dimensions (e.g. the
    # per-level output kernels of a teacher-forced pass, the experts' kernels): the same rounded
    # operands multiplied in float32, where each product of two bfloat16 numbers is exact, so the
    # same result up to summation order, without the speed.
    x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
  return jnp.einsum(eq, x, kernel, preferred_element_type=jnp.float32).astype(dtype)


def _batch_labels(eq: str) -> set[str]:
  """The batch dimensions of a two-operand einsum ``eq``: labels of both operands and the output."""
  ins, out = eq.replace("...", "").split("->")
  lhs, rhs = ins.split(",")
  return set(lhs) & set(rhs) & set(out)


def cast_weight_kernels(params: Any, matmul_dtype: Dtype) -> Any:
  """``params`` with every `WEIGHT_KERNELS` leaf in ``matmul_dtype`` (the rest unchanged), so that
  a program run with ``matmul_dtype`` does not round its weights on every call."""
  md = jnp.dtype(matmul_dtype)

  def cast(path, x):
    name = getattr(path[-1], "key", None) if path else None
    return x.astype(md) if name in WEIGHT_KERNELS else x

  return jax.tree_util.tree_map_with_path(cast, params)


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
  matmul_dtype: Dtype = jnp.float32  # `weight_product`

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d = x.shape[-1]
    lead = ("batch",) + (None,) * (x.ndim - 3) + ("length",)
    wi_kernel = self.param(
        "wi", nn.with_logical_partitioning(default_kernel_init, ("embed", None, "mlp")), (d, 2, self.mlp_dim),
        jnp.float32)
    wi = weight_product("...d,dgm->...gm", x, wi_kernel, self.dtype, self.matmul_dtype)
    h = nn.gelu(wi[..., 0, :], approximate=True) * wi[..., 1, :]
    h = constrain(h, lead + ("mlp",))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    wo_kernel = self.param(
        "wo", nn.with_logical_partitioning(default_kernel_init, ("mlp", "embed")), (self.mlp_dim, d), jnp.float32)
    out = weight_product("...m,md->...d", h, wo_kernel, self.dtype, self.matmul_dtype)
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
  matmul_dtype: Dtype = jnp.float32  # `weight_product` (the projections; attention itself stays in dtype)

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

  def _project(self, x, kernels):
    """``x`` times each ``[D, H, Dh]`` kernel, as ONE product with the kernels stacked on a new
    axis (``[D, n, H, Dh]``, heads stay the sharded axis): on CPU a [256, 128] x [128, 384] product
    runs 1.5-2x faster than three [128, 128] ones (benchmarks/matmul_rates.py). Each output
    element is the same dot product over D as with separate kernels. Returns n [..., T, H, Dh]."""
    if len(kernels) == 1:
      y = weight_product("...d,dhk->...hk", x, kernels[0], self.dtype, self.matmul_dtype)
      return [constrain(y, self._heads_axes(y.ndim))]
    w = jnp.stack(kernels, axis=1)  # one dtype: float32, or `matmul_dtype` in a serving export
    y = weight_product("...d,dghk->...ghk", x, w, self.dtype, self.matmul_dtype)
    return [constrain(y[..., i, :, :], self._heads_axes(y.ndim - 1)) for i in range(len(kernels))]

  def project_q(self, x):
    return self._project(x, [self.wq])[0]

  def project_kv(self, x):
    k, v = self._project(x, [self.wk, self.wv])
    return k, v

  def project_qkv(self, x):
    """Self-attention's query, key and value of ``x`` in one product: ``(q, k, v)``."""
    q, k, v = self._project(x, [self.wq, self.wk, self.wv])
    return q, k, v

  def attend(self, q, k, v, bias, deterministic: bool = True):
    out = dot_product_attention(q, k, v, bias)
    out = self.dropout(out, deterministic=deterministic)
    y = weight_product("...hk,hkd->...d", out, self.wo, self.dtype, self.matmul_dtype)
    return constrain(y, ("batch",) + (None,) * (y.ndim - 3) + ("length", "embed"))

  def __call__(self, x_q, x_kv, bias, deterministic: bool = True):
    if x_q is x_kv:
      q, k, v = self.project_qkv(x_q)
    else:
      k, v = self.project_kv(x_kv)
      q = self.project_q(x_q)
    return self.attend(q, k, v, bias, deterministic)
