"""The composite instruction token (INSTR) and the IGR towers psi_q / psi_i.

PAPER.md section 3: INSTR, the decoder token right after BOS, fuses the scenario
instruction I_s and the reasoning instruction I_r (an LLM-written sentence, embedded by the
sentence encoder; see `oxyjax.instructions`). The fusion operator is [open] in the paper;
ours is a sum in model space:

  i_s   = scenario_embedding[scenario] (+ W_t trigger item, if any)      [B, D]
  i_r   = I_r where an instruction is present, else a learned default   [B, Dr]
          (RMS-normalised when ModelConfig.normalize_instruction)
  INSTR = i_s + W_r i_r                                                  [B, D]

The learned default lives in the instruction space (before W_r), so a missing, stale or
failed instruction is replaced by one trained vector and everything downstream is shared.

PAPER.md section 4 (IGR): the retrieval query q = psi_q([i_s ; i_r]) and the item tower
h = psi_i([item-ID emb ; side emb ; text emb]), shared by history items and the target
(`ItemTower` is called on both), so that Q2I (section 5) aligning q with the target makes
sim(q, h_j) a relevance score over the history.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from oxyjax.models import layers


class Dense(nn.Module):
  """x [..., in] @ kernel [in, features] (+ bias), with logical axes on the kernel."""

  features: int
  axes: tuple[Optional[str], Optional[str]] = (None, "embed")
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(layers.default_kernel_init, self.axes),
                        (x.shape[-1], self.features), jnp.float32)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class InstructionToken(nn.Module):
  """Per-example instruction inputs -> (INSTR [B, D], i_s [B, D], i_r [B, Dr] or None).

  Attributes:
    num_scenarios: size of the scenario vocabulary (scenario 0 is the default scenario).
    emb_dim: model width D.
    instruction_dim: width Dr of the embedded reasoning instruction (0: no I_r input).
    normalize: RMS-normalise i_r before W_r (unit mean square per row). A sentence encoder's
      embeddings are L2-normalised, so each of their Dr coordinates has mean square 1/Dr, while
      W_r's fan-in initialisation assumes unit-variance inputs: unnormalised, W_r i_r starts about
      sqrt(Dr) (about 20 for MiniLM) times smaller than i_s, whose embedding has unit variance.
  """

  num_scenarios: int
  emb_dim: int
  instruction_dim: int = 0
  dtype: Any = jnp.float32
  normalize: bool = False

  @nn.compact
  def __call__(self, scenario: jax.Array, instruction_embedding: jax.Array | None = None,
               instruction_mask: jax.Array | None = None, trigger: jax.Array | None = None):
    i_s = layers.Embed(self.num_scenarios, self.emb_dim, dtype=self.dtype, name="scenario_embed")(scenario)
    if trigger is not None:  # I_s = (scenario, trigger item): one token fusing both (a sum)
      i_s = i_s + Dense(self.emb_dim, (None, "embed"), use_bias=False, dtype=self.dtype,
                        name="trigger_projection")(trigger)
    if not self.instruction_dim:
      return i_s, i_s, None
    default = self.param("default_instruction", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.05), (None,)), (self.instruction_dim,), jnp.float32)
    b = scenario.shape[0]
    if instruction_embedding is None:  # no instruction at all: the learned default for every row
      i_r = jnp.broadcast_to(default, (b, self.instruction_dim))
    else:
      present = instruction_mask if instruction_mask is not None else jnp.ones((b,), bool)
      i_r = jnp.where(present[:, None], instruction_embedding.astype(jnp.float32), default[None])
    if self.normalize:
      i_r = i_r * jax.lax.rsqrt(jnp.mean(jnp.square(i_r), axis=-1, keepdims=True) + 1e-12)
    i_r = i_r.astype(self.dtype)
    instr = i_s + Dense(self.emb_dim, (None, "embed"), use_bias=False, dtype=self.dtype, name="fuse_reasoning")(i_r)
    return instr, i_s, i_r


class QueryTower(nn.Module):
  """psi_q: [i_s ; i_r] -> retrieval query [B, igr_dim] (a 2-layer MLP)."""

  emb_dim: int
  igr_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, i_s: jax.Array, i_r: jax.Array | None) -> jax.Array:
    x = i_s if i_r is None else jnp.concatenate([i_s, i_r.astype(i_s.dtype)], axis=-1)
    x = nn.gelu(Dense(self.emb_dim, (None, "embed"), dtype=self.dtype, name="hidden")(x))
    return Dense(self.igr_dim, ("embed", None), dtype=self.dtype, name="out")(x)


class ItemTower(nn.Module):
  """psi_i: [item-ID emb ; side emb ; text emb] -> item representation [..., igr_dim].

  Called on history behaviours and on the training target with the same parameters.
  """

  emb_dim: int
  igr_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, item_emb: jax.Array, side_emb: jax.Array, text_emb: jax.Array | None) -> jax.Array:
    parts = [item_emb, side_emb] + ([] if text_emb is None else [text_emb.astype(item_emb.dtype)])
    x = jnp.concatenate(parts, axis=-1)
    x = nn.gelu(Dense(self.emb_dim, (None, "embed"), dtype=self.dtype, name="hidden")(x))
    return Dense(self.igr_dim, ("embed", None), dtype=self.dtype, name="out")(x)
