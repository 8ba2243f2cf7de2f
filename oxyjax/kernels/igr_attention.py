r"""Gathered Instruction-Guided Retrieval (IGR) attention.

One operation for PAPER.md section 4: score a user's whole long-term history against the
instruction query, keep a hard top-K, gather those K behaviours and attend over only them,
so that attention cost and memory grow with K, not with the history length L.

Shapes (B batch, L history length, d item width, d_r retrieval width, Tq attention queries,
H heads, Dh head width, K = `k`):

  history          [B, L, d]       item representations h_j = psi_i(...), already computed
  history_mask     [B, L]    bool  True for a real behaviour, False for padding
  retrieval_query  [B, d_r]        IGR query q = psi_q(...)
  history_keys     [B, L, d_r]     what the query is compared with (may be `history` itself)
  q                [B, Tq, H, Dh]  attention queries (already projected)
  wk, wv           [d, H, Dh]      key / value projections, applied to the K gathered rows only

Returns `(attn_out [B, Tq, H, Dh], topk_idx [B, K] int32, topk_scores [B, K] float32,
topk_mask [B, K] bool)`.

Selection contract
  * relevance = dot product of the L2-normalised query and L2-normalised keys (cosine; a
    zero vector is normalised with eps=1e-12 and scores 0); padding scores -inf.
  * `topk_idx` is sorted by descending score; equal scores are broken by the lower history
    index among exactly equal float32 scores (the order `lax.top_k` guarantees, as does
    `np.argsort(-s, kind="stable")`).
  * If fewer than K behaviours are valid, the remaining slots hold the lowest-index padding
    positions with `topk_scores == -inf` and `topk_mask == False`. Masked slots are zeroed
    before projection and get exactly zero attention weight, so whatever a padded history
    row holds (even NaN) never reaches the output or its gradient.
  * A user with no valid behaviour at all gets `attn_out == 0` (not NaN, not a uniform mean).

Attention: softmax(q . k / sqrt(Dh) [or `scale`]) over the valid selected slots, float32
statistics, the same convention as `oxyjax.models.layers.dot_product_attention`.

Gradients
  * The selected set is discrete: nothing flows through `topk_idx`.
  * `attn_out` is differentiable w.r.t. `history` (through the gathered rows: the gradient
    is scattered back to the K selected rows and is exactly zero on every other row), `q`,
    `wk` and `wv`.
  * `attn_out` does not depend on `retrieval_query` / `history_keys` except through the hard
    top-K, so their gradient from `attn_out` is zero. The retrieval space is trained by the
    separate Q2I loss (PAPER.md section 5). `topk_scores` stays differentiable (the cosine of
    each selected pair) for callers that want a soft gate; unused, it contributes nothing.
  * The Pallas path is forward-only as a kernel: its backward pass (a `custom_vjp`) is the
    XLA formulation over the same K gathered rows.

Implementations (`igr_attention(..., implementation=)`):
  * 'xla' (and the default, 'auto', on every platform): scoring without materialising
    normalised keys, `lax.top_k`, one row gather of [B, K, d], then attention over the K rows.
    Two exact algebraic forms, picked statically by FLOP count (`absorb=None`): project the K
    rows to keys/values (one matmul with wk|wv concatenated), or fold wk into the queries and
    wv after the weighted sum (cheaper when Tq*H is small against K, the IGR serving case).
    Nothing of size [B, L, H, Dh] exists. Under a mesh it is ordinary XLA, partitioned by
    the compiler like the rest of the model (on 8 CPU devices XLA all-gathers the [B, L]
    scores for `lax.top_k`'s TopK call; the K-row attention stays per device).
  * 'pallas' (only when asked for): the selection stays in XLA; one Pallas kernel gathers the
    K rows and runs the attention. Two variants: 'gpu' (Triton style: grid (B, H), one vector
    gather load of the K rows, Tq and K padded to powers of two >= 16; written for d and Dh
    powers of two >= 16) and 'tpu' (Mosaic style: indices scalar-prefetched to SMEM, K row
    DMAs from HBM into a VMEM scratch, grid (B,), Tq and K padded to multiples of 8). Both
    have run only in interpret mode on CPU (the tests); neither has been compiled for, or
    run on, a real GPU/TPU, so neither is known to lower, to be correct there or to be
    faster than 'xla'. That is why 'auto' does not pick them.
    Inside a mesh (`jax.set_mesh`, the trainer's context) the Pallas path (selection and
    kernel) runs under `jax.shard_map` over the mesh axes that shard the logical 'batch'
    axis (the active flax logical-axis rules, else `oxyjax.partitioning.DEFAULT_RULES`):
    each device runs the selection, the kernel and its XLA backward pass on its own rows,
    with no collective, since every row is independent (the gradients of the replicated
    wk/wv are summed over the batch shards by shard_map's transpose). Without the wrapper,
    on 8 CPU devices in interpret mode, the program all-gathers the whole batch (history
    included) onto every device and returns the attention output replicated, and the 'tpu'
    variant's interpreter callbacks are pinned to device 0; a compiled kernel would be an
    opaque custom call to XLA's partitioner, which is expected to replicate it likewise (not
    seen: no device run). Outside a mesh, or when no batch mesh axis divides B, the path
    runs unwrapped.

`igr_attention_reference` is the readable plain-jnp definition; `full_attention_reference`
attends over the whole history (all L rows projected) and exists for the benchmark only.
"""

from __future__ import annotations

import functools
import math
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from oxyjax.partitioning import DEFAULT_RULES

_EPS = 1e-12


# ----------------------------------------------------------------------------- helpers


def _check_shapes(history, history_mask, retrieval_query, history_keys, q, wk, wv, k):
  b, l, d = history.shape
  if history_mask.shape != (b, l):
    raise ValueError(f"history_mask {history_mask.shape} != {(b, l)}")
  if retrieval_query.ndim != 2 or retrieval_query.shape[0] != b:
    raise ValueError(f"retrieval_query must be [B, d_r], got {retrieval_query.shape}")
  if history_keys.shape != (b, l, retrieval_query.shape[1]):
    raise ValueError(f"history_keys {history_keys.shape} != {(b, l, retrieval_query.shape[1])}")
  if q.ndim != 4 or q.shape[0] != b:
    raise ValueError(f"q must be [B, Tq, H, Dh], got {q.shape}")
  if wk.shape != (d,) + q.shape[2:] or wv.shape != wk.shape:
    raise ValueError(f"wk {wk.shape} / wv {wv.shape} must be {(d,) + q.shape[2:]}")
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= l:
    raise ValueError(f"k must be a Python int in [1, L={l}], got {k!r}")


def _scale(q, scale):
  return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS * _EPS))


def _masked_softmax(logits, mask):
  """Softmax over the last axis restricted to `mask` (broadcastable); all-masked rows -> 0."""
  logits = jnp.where(mask, logits, -jnp.inf)
  m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


# ----------------------------------------------------------------------------- reference


@functools.partial(jax.jit, static_argnames=("k", "scale"))
def igr_attention_reference(history, history_mask, retrieval_query, history_keys, q, wk, wv, *, k: int,
                            scale: float | None = None):
  """Readable definition: score all L, top-K, gather, project the K rows, masked attention."""
  _check_shapes(history, history_mask, retrieval_query, history_keys, q, wk, wv, k)
  scores = jnp.einsum("bd,bld->bl", _l2_normalize(retrieval_query), _l2_normalize(history_keys))
  scores = jnp.where(history_mask, scores, -jnp.inf)
  topk_scores, topk_idx = lax.top_k(scores, k)  # ties: lower index first
  topk_mask = jnp.take_along_axis(history_mask, topk_idx, axis=1)

  x = jnp.take_along_axis(history, topk_idx[:, :, None], axis=1)  # [B, K, d]
  x = jnp.where(topk_mask[:, :, None], x, 0)
  keys = jnp.einsum("bkd,dhe->bkhe", x, wk)
  values = jnp.einsum("bkd,dhe->bkhe", x, wv)
  logits = jnp.einsum("bqhe,bkhe->bhqk", q, keys, preferred_element_type=jnp.float32) * _scale(q, scale)
  weights = _masked_softmax(logits, topk_mask[:, None, None, :])
  out = jnp.einsum("bhqk,bkhe->bqhe", weights.astype(values.dtype), values).astype(q.dtype)
  return out, topk_idx.astype(jnp.int32), topk_scores, topk_mask


@functools.partial(jax.jit, static_argnames=("scale",))
def full_attention_reference(history, history_mask, q, wk, wv, *, scale: float | None = None):
  """Attention over the whole history (every one of the L rows projected). Benchmark baseline."""
  x = jnp.where(history_mask[:, :, None], history, 0)
  keys = jnp.einsum("bld,dhe->blhe", x, wk)
  values = jnp.einsum("bld,dhe->blhe", x, wv)
  logits = jnp.einsum("bqhe,blhe->bhql", q, keys, preferred_element_type=jnp.float32) * _scale(q, scale)
  weights = _masked_softmax(logits, history_mask[:, None, None, :])
  return jnp.einsum("bhql,blhe->bqhe", weights.astype(values.dtype), values).astype(q.dtype)


# ----------------------------------------------------------------------------- selection


def igr_select(history_mask, retrieval_query, history_keys, k: int):
  """Hard top-K by cosine relevance. Returns (topk_idx int32, topk_scores, topk_mask), each [B, K].

  Scoring never writes the normalised keys [B, L, d_r] out: a batched mat-vec with the
  normalised query plus one sum-of-squares pass, combined on [B, L] as dot * rsqrt(|key|^2)
  (the fastest of the forms tried on CPU; it agrees with the reference to float rounding).
  """
  qn = _l2_normalize(retrieval_query)
  keys = history_keys.astype(jnp.float32)
  dots = jnp.einsum("bld,bd->bl", keys, qn)
  norms = jnp.sum(keys * keys, axis=-1)
  scores = dots * lax.rsqrt(jnp.maximum(norms, _EPS * _EPS))
  scores = jnp.where(history_mask, scores, -jnp.inf)
  topk_scores, topk_idx = lax.top_k(scores, k)
  topk_mask = jnp.take_along_axis(history_mask, topk_idx, axis=1)
  return topk_idx.astype(jnp.int32), topk_scores, topk_mask


def _gather_rows(history, idx, mask):
  x = jnp.take_along_axis(history, idx[:, :, None], axis=1)  # [B, K, d]
  return jnp.where(mask[:, :, None], x, 0)


def _absorb_is_cheaper(tq, h, dh, d, k):
  projected = k * h * dh * (2 * d + 2 * tq)  # x@[wk|wv], then q.k and p.v
  absorbed = tq * h * (2 * dh * d + 2 * k * d)  # q@wk^T, qk.x, p.x, ctx@wv
  return absorbed < projected


def _attend_xla(history, idx, mask, q, wk, wv, scale, absorb):
  """Attention over the K gathered rows (no [B, L, ...] intermediate)."""
  x = _gather_rows(history, idx, mask)
  kmask = mask[:, None, None, :]
  if absorb:
    qk = jnp.einsum("bqhe,dhe->bhqd", q * scale, wk)  # wk folded into the queries
    logits = jnp.einsum("bhqd,bkd->bhqk", qk, x, preferred_element_type=jnp.float32)
    weights = _masked_softmax(logits, kmask).astype(x.dtype)
    ctx = jnp.einsum("bhqk,bkd->bhqd", weights, x)
    return jnp.einsum("bhqd,dhe->bqhe", ctx, wv).astype(q.dtype)
  dh = wk.shape[-1]
  kv = jnp.einsum("bkd,dhe->bkhe", x, jnp.concatenate([wk, wv], axis=-1))  # one matmul for K and V
  keys, values = kv[..., :dh], kv[..., dh:]
  logits = jnp.einsum("bqhe,bkhe->bhqk", q, keys, preferred_element_type=jnp.float32) * scale
  weights = _masked_softmax(logits, kmask).astype(values.dtype)
  return jnp.einsum("bhqk,bkhe->bqhe", weights, values).astype(q.dtype)


# ----------------------------------------------------------------------------- Pallas


def _next_pow2(n, lo):
  return max(lo, 1 << (n - 1).bit_length())


def _round_up(n, m):
  return -(-n // m) * m


def _kernel_attend(x, valid_row, qh, wkh, wvh, scale):
  """Shared kernel math for one head: x [K, d] (masked rows already zero), valid_row [1, K]."""
  kh = jnp.dot(x, wkh, preferred_element_type=jnp.float32)  # [K, Dh]
  vh = jnp.dot(x, wvh, preferred_element_type=jnp.float32)
  logits = lax.dot_general(qh.astype(jnp.float32), kh, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32) * scale  # [Tq, K]
  logits = jnp.where(valid_row, logits, -jnp.inf)
  m = jnp.max(logits, axis=1, keepdims=True)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.where(valid_row, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=1, keepdims=True)
  denom = jnp.where(denom > 0, denom, 1.0)
  return jnp.dot(p, vh, preferred_element_type=jnp.float32) / denom  # [Tq, Dh]


def _gpu_kernel(idx_ref, mask_ref, q_ref, wk_ref, wv_ref, hist_ref, out_ref, *, scale):
  # grid (B, H); hist_ref is this batch element's whole [L, d] history (a pointer: only
  # the K indexed rows are loaded, in one gather).
  idx = idx_ref[...]  # [K] int32
  valid = mask_ref[...] != 0  # [K]
  x = hist_ref[idx, :]  # [K, d] gathered rows
  x = jnp.where(valid[:, None], x, jnp.zeros_like(x))
  out = _kernel_attend(x, valid[None, :], q_ref[...], wk_ref[...], wv_ref[...], scale)
  out_ref[...] = out.astype(out_ref.dtype)


def _pad_for_kernel(idx, mask, q, wk, wv, kp, tqp):
  """Pads K to kp and Tq to tqp and lays heads out first, for both Pallas variants.

  Returns idx [B, kp], mask [B, kp] int32, q [B, H, tqp, Dh], wk/wv [H, d, Dh].
  """
  k, tq = idx.shape[1], q.shape[1]
  idx_p = jnp.pad(idx, ((0, 0), (0, kp - k)))
  mask_p = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, kp - k)))
  q_p = jnp.pad(q, ((0, 0), (0, tqp - tq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  return idx_p, mask_p, q_p, wk.transpose(1, 0, 2), wv.transpose(1, 0, 2)


def _pallas_gpu(history, idx, mask, q, wk, wv, scale, interpret):
  b, l, d = history.shape
  _, tq, h, dh = q.shape
  k = idx.shape[1]
  kp, tqp = _next_pow2(k, 16), _next_pow2(tq, 16)
  idx_p, mask_p, q_p, wk_h, wv_h = _pad_for_kernel(idx, mask, q, wk, wv, kp, tqp)
  out = pl.pallas_call(
      functools.partial(_gpu_kernel, scale=scale),
      grid=(b, h),
      in_specs=[
          pl.BlockSpec((None, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((None, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((None, None, tqp, dh), lambda i, j: (i, j, 0, 0)),
          pl.BlockSpec((None, d, dh), lambda i, j: (j, 0, 0)),
          pl.BlockSpec((None, d, dh), lambda i, j: (j, 0, 0)),
          pl.BlockSpec((None, l, d), lambda i, j: (i, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, tqp, dh), lambda i, j: (i, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, tqp, dh), q.dtype),
      interpret=interpret,
      name="igr_gathered_attention_gpu",
  )(idx_p, mask_p, q_p, wk_h, wv_h, history)
  return out.transpose(0, 2, 1, 3)[:, :tq]


def _tpu_kernel(idx_sref, mcol_ref, mrow_ref, q_ref, wk_ref, wv_ref, hist_hbm, out_ref, xbuf, sem, *,
                scale, num_heads):
  # grid (B,); idx_sref [B, K] in SMEM; hist_hbm [B, L, d] stays in HBM; xbuf [K, d] VMEM.
  b = pl.program_id(0)
  kp = xbuf.shape[0]

  def copy(j, row):
    return pltpu.make_async_copy(hist_hbm.at[b, pl.ds(row, 1)], xbuf.at[pl.ds(j, 1)], sem.at[0])

  def start(j, carry):
    copy(j, idx_sref[b, j]).start()
    return carry

  def wait(j, carry):
    copy(j, 0).wait()  # every copy is one [1, d] row: wait K times on the shared semaphore
    return carry

  lax.fori_loop(0, kp, start, 0)
  lax.fori_loop(0, kp, wait, 0)
  x = xbuf[...]
  x = jnp.where(mcol_ref[...] != 0, x, jnp.zeros_like(x))  # [K, 1] mask
  valid_row = mrow_ref[...] != 0  # [1, K]
  for hh in range(num_heads):
    out = _kernel_attend(x, valid_row, q_ref[hh], wk_ref[hh], wv_ref[hh], scale)
    out_ref[hh] = out.astype(out_ref.dtype)



def _pallas_tpu(history, idx, mask, q, wk, wv, scale, interpret):
  b, l, d = history.shape
  _, tq, h, dh = q.shape
  k = idx.shape[1]
  kp, tqp = _round_up(k, 8), _round_up(tq, 8)
  idx_p, m, q_p, wk_h, wv_h = _pad_for_kernel(idx, mask, q, wk, wv, kp, tqp)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b,),
      in_specs=[
          pl.BlockSpec((None, kp, 1), lambda i, idx_ref: (i, 0, 0)),
          pl.BlockSpec((None, 1, kp), lambda i, idx_ref: (i, 0, 0)),
          pl.BlockSpec((None, h, tqp, dh), lambda i, idx_ref: (i, 0, 0, 0)),
          pl.BlockSpec((h, d, dh), lambda i, idx_ref: (0, 0, 0)),
          pl.BlockSpec((h, d, dh), lambda i, idx_ref: (0, 0, 0)),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((None, h, tqp, dh), lambda i, idx_ref: (i, 0, 0, 0)),
      scratch_shapes=[pltpu.VMEM((kp, d), history.dtype), pltpu.SemaphoreType.DMA((1,))],
  )
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, scale=scale, num_heads=h),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, tqp, dh), q.dtype),
      interpret=pltpu.InterpretParams() if interpret else False,
      compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel",)),
      name="igr_gathered_attention_tpu",
  )(idx_p, m[:, :, None], m[:, None, :], q_p, wk_h, wv_h, history)
  return out.transpose(0, 2, 1, 3)[:, :tq]


def _pallas_forward(history, idx, mask, q, wk, wv, scale, variant, interpret):
  if variant == "gpu":
    return _pallas_gpu(history, idx, mask, q, wk, wv, scale, interpret)
  if variant == "tpu":
    return _pallas_tpu(history, idx, mask, q, wk, wv, scale, interpret)
  raise ValueError(f"unknown pallas variant {variant!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attend_pallas(history, idx, mask, q, wk, wv, scale, variant, interpret):
  return _pallas_forward(history, idx, mask, q, wk, wv, scale, variant, interpret)


def _attend_pallas_fwd(history, idx, mask, q, wk, wv, scale, variant, interpret):
  out = _pallas_forward(history, idx, mask, q, wk, wv, scale, variant, interpret)
  return out, (history, idx, mask, q, wk, wv)


def _attend_pallas_bwd(scale, variant, interpret, res, g):
  history, idx, mask, q, wk, wv = res
  f = lambda h_, q_, wk_, wv_: _attend_xla(h_, idx, mask, q_, wk_, wv_, scale, absorb=False)
  _, vjp = jax.vjp(f, history, q, wk, wv)
  gh, gq, gwk, gwv = vjp(g)
  return gh, None, None, gq, gwk, gwv


_attend_pallas.defvjp(_attend_pallas_fwd, _attend_pallas_bwd)


def _batch_mesh_axes(batch: int) -> tuple[str, ...]:
  """Mesh axes of the current (abstract) mesh that shard the logical 'batch' axis.

  The axes come from the active flax logical-axis rules (`Partitioner.rules_context()`), or
  from `oxyjax.partitioning.DEFAULT_RULES` when none are active. Axes missing from the mesh,
  of size 1 or already manual (inside an enclosing shard_map) are skipped; the axes are kept
  in order while their product divides `batch`. () outside a mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = nn.logical_to_mesh_axes(("batch",), nn.get_logical_axis_rules() or DEFAULT_RULES)[0]
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  kept, shards = [], 1
  for a in axes:
    if a not in types or types[a] == AxisType.Manual or mesh.shape[a] == 1:
      continue
    if batch % (shards * mesh.shape[a]):
      break
    kept.append(a)
    shards *= mesh.shape[a]
  return tuple(kept)


def _igr_pallas(history, history_mask, retrieval_query, history_keys, q, wk, wv, k, scale, variant, interpret):
  idx, scores, mask = igr_select(history_mask, retrieval_query, history_keys, k)
  return _attend_pallas(history, idx, mask, q, wk, wv, scale, variant, interpret), idx, scores, mask


def _igr_pallas_on_mesh(history, history_mask, retrieval_query, history_keys, q, wk, wv, k, scale, variant,
                        interpret):
  """The Pallas path, run per batch shard under `jax.shard_map` when a mesh shards the batch.

  The selection goes inside too: XLA does not partition `lax.top_k` over a sharded batch on
  CPU (it all-gathers the [B, L] scores and runs the TopK custom call on the whole batch).
  """
  run = functools.partial(_igr_pallas, k=k, scale=scale, variant=variant, interpret=interpret)
  axes = _batch_mesh_axes(history.shape[0])
  if not axes:
    return run(history, history_mask, retrieval_query, history_keys, q, wk, wv)
  rows = P(axes)
  # check_vma=False: pallas_call and the custom_vjp are not typed for varying manual axes.
  # shard_map's transpose then psums the cotangents of the replicated wk/wv over the axes
  # their spec does not mention (and divides the output cotangents by the size of the mesh
  # axes the outputs are replicated over), which is the batch sum their gradient needs.
  return jax.shard_map(run, in_specs=(rows,) * 5 + (P(), P()), out_specs=(rows,) * 4,
                       check_vma=False)(history, history_mask, retrieval_query, history_keys, q, wk, wv)


# ----------------------------------------------------------------------------- public op


def _resolve(implementation, pallas_variant):
  if implementation in ("auto", "xla"):
    # 'auto' is XLA on every platform: the Pallas kernels have never been compiled for a
    # GPU/TPU. Make 'auto' pick them only after a device run shows them correct and faster.
    return "xla", None
  if implementation == "pallas":
    return "pallas", pallas_variant or ("tpu" if jax.default_backend() == "tpu" else "gpu")
  raise ValueError(f"implementation must be 'auto', 'xla' or 'pallas', got {implementation!r}")


@functools.partial(jax.jit, static_argnames=("k", "implementation", "scale", "absorb", "pallas_variant",
                                             "interpret"))
def igr_attention(history, history_mask, retrieval_query, history_keys, q, wk, wv, *, k: int,
                  implementation: str = "auto", scale: float | None = None, absorb: bool | None = None,
                  pallas_variant: str | None = None, interpret: bool | None = None):
  """Gathered IGR attention (see the module docstring for the contract).

  Args:
    k: number of behaviours kept (static Python int, 1 <= k <= L).
    implementation: 'auto' (= 'xla', on every platform) | 'xla' | 'pallas'. 'pallas' has
      only run in interpret mode on CPU, never compiled for a GPU/TPU.
    scale: logit scale; default 1/sqrt(Dh).
    absorb: 'xla' only: fold wk/wv into the queries/output (True), project the K rows (False),
      or pick by FLOP count (None).
    pallas_variant: 'gpu' | 'tpu'; default from the backend ('tpu' on TPU, else 'gpu').
    interpret: run the Pallas kernel in interpret mode; default True on CPU.
  """
  _check_shapes(history, history_mask, retrieval_query, history_keys, q, wk, wv, k)
  impl, variant = _resolve(implementation, pallas_variant)
  s = _scale(q, scale)
  if impl == "pallas":
    if interpret is None:
      interpret = jax.default_backend() == "cpu"
    return _igr_pallas_on_mesh(history, history_mask, retrieval_query, history_keys, q, wk, wv, k, s, variant,
                               bool(interpret))
  idx, scores, mask = igr_select(history_mask, retrieval_query, history_keys, k)
  if absorb is None:
    absorb = _absorb_is_cheaper(q.shape[1], q.shape[2], q.shape[3], history.shape[-1], k)
  return _attend_xla(history, idx, mask, q, wk, wv, s, absorb), idx, scores, mask
