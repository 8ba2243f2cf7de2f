"""Mixture-of-experts feed-forward layer (GShard / Switch style, one-hot dispatch and combine).

`MoeBlock` has MlpBlock's call signature (`x [..., T, D], deterministic -> [..., T, D]`) and
MlpBlock's expert shape: each expert is a gated-GELU MLP wo(gelu(wi_0 x) * wi_1 x), with
parameters stacked over experts:

  router  [D, E]          logical ("embed", None)          float32 routing
  wi      [E, D, 2, M]    logical ("expert", "embed", None, "mlp")
  wo      [E, M, D]       logical ("expert", "mlp", "embed")

Routing (per token, in float32): p = softmax(x W_router); the k experts with the largest p are
chosen; the gates are p of the chosen experts, renormalised to sum to 1 when k > 1 (GShard
top-2); with k = 1 the gate is the raw probability (Switch), so the router gets a gradient.

Groups and capacity. Training (`deterministic=False`): tokens are split into groups (whole rows
of the leading dims, at most `group_size` tokens per group, never straddling two shards of the
batch; `group_size` <= 0: one group per row). The grouping, and so the routing, is the same on
any mesh where every batch shard holds a multiple of the group's rows (otherwise groups shrink
to fit a shard). Every expert takes at most C = min(S, ceil(k * S * capacity_factor / E)) tokens
per group of S tokens. Slots are filled choice-major (all first choices of a group, in token
order, before any second choice), as in GShard. An assignment beyond capacity is dropped: its
gate contributes nothing, and a token dropped by all its choices gets a zero output, i.e. it
passes through the layer's residual connection unchanged. `capacity_factor <= 0` means no
dropping (C = S). So in training one row's output depends on the other rows of its group
(which tokens got the slots): the standard trade of capacity-limited MoE training.

Inference (`deterministic=True`: evaluation, teacher-forced scoring, beam-search decoding) is
batch-independent: every row is its own group (S = the row's T tokens) and nothing is dropped
(C = S), so each token's output is sum over its top-k experts of gate * expert(x), a function
of that token alone. A row's scores then do not depend on the batch size, on its position, on
padding rows or on its neighbours (tests/models/test_batch_independence.py), and incremental
decoding equals teacher forcing. Cost: the dispatch tensors are [rows, T, E, T] (memory
O(tokens * E * T), not O(tokens * group_size)), and the experts run on E * T slots per row, i.e.
E / k times the FLOPs of the k active experts (the unused slots hold zeros); a sorted / ragged
grouped matmul would remove that overhead.

The dispatch mask [G, S, E, C] (0/1) and combine weights [G, S, E, C] (gates) turn the
token->expert routing into two einsums, so the layer is jit-friendly (static shapes) and
shards by annotation: the group axis is sharded like the batch before dispatch, the expert
axis over the `expert` mesh axis after it (XLA inserts the all-to-all).

Auxiliary losses (sown into the "intermediates" collection, unweighted, one per layer):
  moe_aux_loss: load balancing, E * sum_e f_e * P_e averaged over groups, where
      f_e = fraction of the group's k*S top-k assignments (before capacity) that chose e and
      P_e = mean router probability of e; equals 1 for a perfectly uniform router.
  moe_z_loss:   router z-loss (ST-MoE), mean over tokens of logsumexp(router logits)^2.
When deterministic the groups are single rows, so moe_aux_loss is then the per-row statistic
averaged over rows (typically larger than the training value for the same router; a diagnostic).
`collect_aux_losses` averages each over the MoE layers of a model.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from oxyjax.models import layers

Dtype = Any

# Experts: fan-in excludes the leading expert axis (each expert initialised like an MlpBlock).
expert_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))


def expert_capacity(group_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert per group of `group_tokens` tokens."""
  if capacity_factor <= 0:
    return group_tokens
  return max(1, min(group_tokens, int(math.ceil(k * group_tokens * capacity_factor / num_experts))))


def rows_per_group(num_rows: int, row_length: int, group_size: int, num_shards: int = 1) -> int:
  """Rows per routing group: the largest r with r * row_length <= group_size (at least 1) that
  divides the rows of one batch shard (num_rows / num_shards; all rows when not divisible), so
  that no group straddles two batch shards."""
  if group_size <= 0:
    return 1
  local = num_rows // num_shards if num_shards > 1 and num_rows % num_shards == 0 else num_rows
  best = 1
  for r in range(1, local + 1):
    if r * row_length > group_size:
      break
    if local % r == 0:
      best = r
  return best


def batch_shards() -> int:
  """Devices the logical 'batch' axis is split over in the current mesh and rules (1 outside)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("batch",))[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def route(logits: jax.Array, k: int, capacity: int):
  """Top-k routing with per-group capacity.

  logits: [G, S, E] float32 router logits.
  Returns (dispatch [G,S,E,C] float32 0/1, combine [G,S,E,C] float32, probs [G,S,E],
  expert_index [G,S,k] int32, kept [G,S,k] bool).
  """
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  top_p, top_i = jax.lax.top_k(probs, k)  # [G,S,k]
  gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if k > 1 else top_p
  onehot = jax.nn.one_hot(top_i, e, dtype=jnp.int32)  # [G,S,k,E]
  # Choice-major priority: position of each assignment in its expert's buffer.
  cm = jnp.swapaxes(onehot, 1, 2).reshape(g, k * s, e)  # [G, k*S, E]
  pos = jnp.cumsum(cm, axis=1) - 1
  pos = jnp.sum(pos * cm, axis=-1).reshape(g, k, s).swapaxes(1, 2)  # [G,S,k]
  kept = pos < capacity
  slot = jax.nn.one_hot(jnp.where(kept, pos, capacity), capacity, dtype=jnp.float32)  # dropped -> all zero
  sel = onehot.astype(jnp.float32)
  dispatch = jnp.einsum("gske,gskc->gsec", sel, slot)
  combine = jnp.einsum("gske,gskc->gsec", sel * gates[..., None], slot)
  return dispatch, combine, probs, top_i, kept


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary loss E * sum_e f_e P_e, averaged over groups.

  probs [G,S,E]; expert_index [G,S,k] (the top-k choices, before capacity).
  """
  e = probs.shape[-1]
  f = jnp.mean(jax.nn.one_hot(expert_index, e, dtype=jnp.float32), axis=(1, 2))  # [G,E], sums to 1
  p = jnp.mean(probs, axis=1)  # [G,E]
  return jnp.mean(e * jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


class MoeBlock(nn.Module):
  """Top-k mixture of gated-GELU experts; a drop-in replacement for layers.MlpBlock."""

  mlp_dim: int
  num_experts: int
  num_experts_per_token: int = 1
  capacity_factor: float = 1.25  # training only; inference never drops (module docstring)
  group_size: int = 512  # training only; inference routes each row alone
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype = jnp.float32  # the experts' kernels: layers.weight_product

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x [..., T, D] -> [..., T, D]. Training (not deterministic): grouped routing with
    capacity, rows of a group compete for slots. Deterministic: one group per row, no drops."""
    d, e, k = x.shape[-1], self.num_experts, self.num_experts_per_token
    if not 1 <= k <= e:
      raise ValueError(f"num_experts_per_token={k} must be in [1, num_experts={e}]")
    lead_shape, t = x.shape[:-2], x.shape[-2]
    rows = math.prod(lead_shape)
    if deterministic:
      # Batch-independent inference: each row routed alone, no capacity (C = S = T).
      r = 1
    else:
      # Leading dim 0 is the (sharded) batch, so each batch shard holds a contiguous block of rows.
      shards = batch_shards()
      r = rows_per_group(rows, t, self.group_size, shards if lead_shape and lead_shape[0] % shards == 0 else 1)
    g, s = rows // r, r * t
    xg = layers.constrain(x.reshape(g, s, d), ("batch", "length", "embed"))

    router = self.param("router", nn.with_logical_partitioning(layers.default_kernel_init, ("embed", None)),
                        (d, e), jnp.float32)
    logits = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), router)
    capacity = s if deterministic else expert_capacity(s, e, k, self.capacity_factor)
    dispatch, combine, probs, top_i, _ = route(logits, k, capacity)
    self.sow("intermediates", "moe_aux_loss", load_balancing_loss(probs, top_i))
    self.sow("intermediates", "moe_z_loss", router_z_loss(logits))

    dispatch = layers.constrain(dispatch, ("batch", "length", None, None))
    combine = layers.constrain(combine, ("batch", "length", None, None))
    # [E, G, C, D]: experts over the `expert` mesh axis, groups over the remaining batch axes.
    xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(self.dtype), xg)
    xe = layers.constrain(xe, ("expert", "expert_group", None, None))
    wi = self.param("wi", nn.with_logical_partitioning(expert_kernel_init, ("expert", "embed", None, "mlp")),
                    (e, d, 2, self.mlp_dim), jnp.float32)
    h = layers.weight_product("egcd,edfm->egcfm", xe, wi, self.dtype, self.matmul_dtype)
    h = nn.gelu(h[..., 0, :], approximate=True) * h[..., 1, :]
    h = layers.constrain(h, ("expert", "expert_group", None, "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    wo = self.param("wo", nn.with_logical_partitioning(expert_kernel_init, ("expert", "mlp", "embed")),
                    (e, self.mlp_dim, d), jnp.float32)
    ye = layers.weight_product("egcm,emd->egcd", h, wo, self.dtype, self.matmul_dtype)
    ye = layers.constrain(ye, ("expert", "expert_group", None, None))
    y = jnp.einsum("gsec,egcd->gsd", combine.astype(self.dtype), ye)
    y = layers.constrain(y, ("batch", "length", "embed"))
    return y.reshape(x.shape)


# ---------------------------------------------------------------------- model helpers
def layer_uses_moe(cfg, layer_name: str | None) -> bool:
  """Whether the encoder/decoder layer named `layer_name` (e.g. 'encoder_layers_3') gets an MoE FFN.

  With cfg.num_experts > 0, layer i uses MoE when i % moe_every_n_layers == moe_every_n_layers - 1
  (every layer for 1, the odd layers for 2 as in GShard). The index is read from Flax's
  automatic name; a layer without a numeric suffix counts as an MoE layer.
  """
  if cfg.num_experts <= 0:
    return False
  n = max(1, cfg.moe_every_n_layers)
  m = re.search(r"_(\d+)$", layer_name or "")
  return m is None or int(m.group(1)) % n == n - 1


def make_mlp(cfg, layer_name: str | None, dtype, name: str | None = None):
  """MlpBlock or MoeBlock for one encoder/decoder layer, following the ModelConfig."""
  if layer_uses_moe(cfg, layer_name):
    return MoeBlock(cfg.mlp_dim, cfg.num_experts, num_experts_per_token=cfg.num_experts_per_token,
                    capacity_factor=cfg.expert_capacity_factor, group_size=cfg.moe_group_size,
                    dropout_rate=cfg.dropout_rate, dtype=dtype, matmul_dtype=cfg.jnp_matmul_dtype, name=name)
  return layers.MlpBlock(cfg.mlp_dim, cfg.dropout_rate, dtype, cfg.jnp_matmul_dtype, name=name)


def collect_aux_losses(intermediates: Mapping[str, Any] | None) -> dict[str, jax.Array]:
  """Means over MoE layers of the sown 'moe_aux_loss' and 'moe_z_loss' (0 when there are none)."""
  found: dict[str, list] = {"moe_aux_loss": [], "moe_z_loss": []}

  def visit(tree):
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        if key in found:
          found[key].extend(value if isinstance(value, (tuple, list)) else [value])
        else:
          visit(value)

  visit(intermediates or {})
  return {key: (jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in vals])) if vals
                else jnp.zeros((), jnp.float32)) for key, vals in found.items()}
