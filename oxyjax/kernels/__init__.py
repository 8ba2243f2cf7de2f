"""Fused / hand-written kernels (Pallas where it pays, with plain-XLA references)."""

from oxyjax.kernels.igr_attention import full_attention_reference
from oxyjax.kernels.igr_attention import igr_attention
from oxyjax.kernels.igr_attention import igr_attention_reference
from oxyjax.kernels.igr_attention import igr_select

__all__ = ["full_attention_reference", "igr_attention", "igr_attention_reference", "igr_select"]
