"""The composite instruction token (INSTR) that follows BOS in the decoder.

PAPER.md section 3: INSTR fuses the scenario instruction I_s = (scenario, trigger item) and
the reasoning instruction I_r (an embedded LLM-written sentence). This module is the single
place where that fusion happens, so that later parts only add inputs here:

  INSTR = scenario_embedding[scenario]                   (now)
        (+ trigger item representation, + W_r I_r)       (reasoning instructions, issue 4)

Today only the scenario part is real; the fusion operator for I_r is added with issue 4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from oxyjax.models import layers


class InstructionToken(nn.Module):
  """Maps per-example instruction inputs to one INSTR vector per example.

  Attributes:
    num_scenarios: size of the scenario vocabulary (scenario 0 is the default scenario).
    emb_dim: model width.
  """

  num_scenarios: int
  emb_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, scenario: jax.Array) -> jax.Array:
    """scenario: [B] int32 -> INSTR embedding [B, emb_dim]."""
    table = layers.Embed(self.num_scenarios, self.emb_dim, dtype=self.dtype, name="scenario_embed")
    return table(scenario)
