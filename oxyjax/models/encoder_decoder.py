"""The fast-thinking network: a Transformer encoder-decoder over behaviours and SID tokens.

Encoder tokens: one per history behaviour, the sum of
  item-ID embedding + the embeddings of the item's SID codes (one table, per-level offsets)
  + a position embedding counted back from the most recent behaviour.
Decoder tokens: [BOS, INSTR, s_1 .. s_{L-1}]; the output at INSTR predicts s_1, the output at
s_l predicts s_{l+1} (PAPER.md section 3). Logits of level l are over that level's codebook
(padded to the largest codebook; codes beyond a level's size are masked).

Shapes: B batch, S history length, L SID levels, W beams, D emb_dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from oxyjax.models import instruction
from oxyjax.models import layers

NEG_INF = layers.NEG_INF


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. Data-dependent fields (None) are filled from the SID table and dataset."""

  emb_dim: int = 128
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  dropout_rate: float = 0.1
  dtype: str = "float32"  # computation dtype: float32 | bfloat16
  max_history: int = 20
  num_scenarios: int = 1
  use_item_id_embedding: bool = True
  # Filled from data when None:
  sid_vocab_sizes: Optional[tuple[int, ...]] = None  # codes per SID level (incl. the collision level)
  num_item_embeddings: Optional[int] = None  # item-ID table rows; ids are taken modulo this

  @property
  def num_levels(self) -> int:
    return len(self.sid_vocab_sizes)

  @property
  def max_vocab(self) -> int:
    return max(self.sid_vocab_sizes)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


def _causal_bias(t_new: int, t_total: int) -> jax.Array:
  """[1, 1, t_new, t_total] additive mask: new token i sits at position t_total - t_new + i."""
  q_pos = jnp.arange(t_new)[:, None] + (t_total - t_new)
  k_pos = jnp.arange(t_total)[None, :]
  return jnp.where(k_pos <= q_pos, 0.0, NEG_INF)[None, None]


class EncoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic):
    cfg = self.cfg
    dt = cfg.jnp_dtype
    h = layers.RMSNorm(dtype=dt, name="pre_attention_norm")(x)
    h = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate, dt, name="attention")(
        h, h, bias, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = layers.RMSNorm(dtype=dt, name="pre_mlp_norm")(x)
    h = layers.MlpBlock(cfg.mlp_dim, cfg.dropout_rate, dt, name="mlp")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Self-attention (causal, cacheable), cross-attention to the encoder, MLP."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt = cfg.jnp_dtype
    self.pre_self_attention_norm = layers.RMSNorm(dtype=dt)
    self.self_attention = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate, dt)
    self.pre_cross_attention_norm = layers.RMSNorm(dtype=dt)
    self.cross_attention = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate, dt)
    self.pre_mlp_norm = layers.RMSNorm(dtype=dt)
    self.mlp = layers.MlpBlock(cfg.mlp_dim, cfg.dropout_rate, dt)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def cross_kv(self, encoded):
    """Encoder keys/values for this layer, computed once per request: ([B,S,H,Dh], [B,S,H,Dh])."""
    return self.cross_attention.project_kv(encoded)

  def __call__(self, x, self_cache, cross_k, cross_v, enc_bias, deterministic):
    """x: [..., T_new, D]; self_cache: None or (k, v) [..., T_old, H, Dh] with x's leading dims.

    Returns (y, (k, v)) where (k, v) covers all T_old + T_new positions.
    """
    h = self.pre_self_attention_norm(x)
    k, v = self.self_attention.project_kv(h)
    if self_cache is not None:
      k = jnp.concatenate([self_cache[0], k], axis=-3)
      v = jnp.concatenate([self_cache[1], v], axis=-3)
    bias = _causal_bias(x.shape[-2], k.shape[-3])
    h = self.self_attention.attend(self.self_attention.project_q(h), k, v, bias, deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.pre_cross_attention_norm(x)
    h = self.cross_attention.attend(self.cross_attention.project_q(h), cross_k, cross_v, enc_bias, deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.pre_mlp_norm(x)
    x = x + self.dropout(self.mlp(h, deterministic), deterministic=deterministic)
    return x, (k, v)


class EncoderDecoder(nn.Module):
  """The network. Methods: `__call__` (teacher-forced logits), `encode`, `init_decode`, `decode_step`."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt = cfg.jnp_dtype
    self.level_offsets = tuple(int(x) for x in np.cumsum((0,) + tuple(cfg.sid_vocab_sizes[:-1])))
    small = nn.initializers.normal(stddev=0.02 * np.sqrt(cfg.emb_dim))
    self.sid_embed = layers.Embed(int(sum(cfg.sid_vocab_sizes)), cfg.emb_dim, dt, small)
    if cfg.use_item_id_embedding:
      self.item_embed = layers.Embed(cfg.num_item_embeddings, cfg.emb_dim, dt, small)
    self.encoder_position = layers.Embed(cfg.max_history, cfg.emb_dim, dt, small)
    self.decoder_position = layers.Embed(cfg.num_levels + 1, cfg.emb_dim, dt, small)
    self.bos = self.param("bos", nn.with_logical_partitioning(small, ("embed",)), (cfg.emb_dim,), jnp.float32)
    self.instruction = instruction.InstructionToken(cfg.num_scenarios, cfg.emb_dim, dt)
    self.encoder_layers = [EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)]
    self.encoder_norm = layers.RMSNorm(dtype=dt)
    self.decoder_layers = [DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)]
    self.decoder_norm = layers.RMSNorm(dtype=dt)
    self.output_kernel = self.param(
        "output_kernel", nn.with_logical_partitioning(layers.default_kernel_init, (None, "embed", "vocab")),
        (cfg.num_levels, cfg.emb_dim, cfg.max_vocab), jnp.float32,
    )
    self.input_dropout = nn.Dropout(cfg.dropout_rate)

  # ------------------------------------------------------------------ encoder
  def _sid_token_ids(self, codes: jax.Array, first_level: int = 0) -> jax.Array:
    """codes [..., n] of levels first_level.. -> ids into the shared SID embedding table."""
    offsets = jnp.asarray(self.level_offsets[first_level : first_level + codes.shape[-1]], jnp.int32)
    return codes + offsets

  def encode(self, history_items, history_codes, history_mask, deterministic: bool = True):
    """history_items [B,S] int, history_codes [B,S,L] int, history_mask [B,S] bool.

    Returns (encoded [B,S,D], enc_bias [B,1,1,S]).
    """
    cfg = self.cfg
    x = self.sid_embed(self._sid_token_ids(history_codes)).sum(axis=-2)
    if cfg.use_item_id_embedding:
      x = x + self.item_embed(history_items % cfg.num_item_embeddings)
    lengths = history_mask.sum(axis=-1, keepdims=True)
    recency = jnp.clip(lengths - 1 - jnp.arange(history_mask.shape[-1])[None, :], 0, cfg.max_history - 1)
    x = x + self.encoder_position(recency)
    x = x * history_mask[..., None].astype(x.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = self.input_dropout(x, deterministic=deterministic)
    enc_bias = jnp.where(history_mask, 0.0, NEG_INF)[:, None, None, :]
    for layer in self.encoder_layers:
      x = layer(x, enc_bias, deterministic)
    return self.encoder_norm(x), enc_bias

  # ------------------------------------------------------------------ decoder
  def _logits(self, h: jax.Array, first_level: int) -> jax.Array:
    """h [..., T, D] at the positions predicting levels first_level.. -> [..., T, V] float32."""
    t = h.shape[-2]
    kernel = self.output_kernel[first_level : first_level + t]
    logits = jnp.einsum("...td,tdv->...tv", h.astype(jnp.float32), kernel)  # logits in float32
    sizes = jnp.asarray(self.cfg.sid_vocab_sizes[first_level : first_level + t], jnp.int32)
    valid = jnp.arange(self.cfg.max_vocab)[None, :] < sizes[:, None]
    return jnp.where(valid, logits, NEG_INF)

  def _decoder_stack(self, x, caches, cross_kvs, enc_bias, deterministic):
    new_caches = []
    for layer, cache, (ck, cv) in zip(self.decoder_layers, caches, cross_kvs):
      x, kv = layer(x, cache, ck, cv, enc_bias, deterministic)
      new_caches.append(kv)
    return self.decoder_norm(x), new_caches

  def _prefix_tokens(self, scenario):
    """[BOS, INSTR] embeddings [B, 2, D] (with positions 0, 1)."""
    dt = self.cfg.jnp_dtype
    b = scenario.shape[0]
    bos = jnp.broadcast_to(self.bos.astype(dt), (b, self.cfg.emb_dim))
    instr = self.instruction(scenario)
    x = jnp.stack([bos, instr], axis=1)
    return x + self.decoder_position(jnp.arange(2))[None]

  def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits [B, L, V] for batch['target_codes'] [B, L]."""
    encoded, enc_bias = self.encode(
        batch["history_items"], batch["history_codes"], batch["history_mask"], deterministic)
    cross_kvs = [layer.cross_kv(encoded) for layer in self.decoder_layers]
    x = self._prefix_tokens(batch["scenario"])
    codes = batch["target_codes"][:, :-1]  # s_1 .. s_{L-1} as inputs
    if codes.shape[-1]:
      y = self.sid_embed(self._sid_token_ids(codes)) + self.decoder_position(jnp.arange(2, 1 + self.cfg.num_levels))[None]
      x = jnp.concatenate([x, y], axis=1)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = self.input_dropout(x, deterministic=deterministic)
    h, _ = self._decoder_stack(x, [None] * len(self.decoder_layers), cross_kvs, enc_bias, deterministic)
    return self._logits(h[:, 1:], first_level=0)

  # ------------------------------------------------------------------ incremental decoding
  def init_decode(self, batch: dict[str, jax.Array]):
    """Runs the encoder once. Returns the per-request context for `decode_step`."""
    encoded, enc_bias = self.encode(batch["history_items"], batch["history_codes"], batch["history_mask"])
    cross_kvs = tuple(layer.cross_kv(encoded) for layer in self.decoder_layers)
    return {"cross_kvs": cross_kvs, "enc_bias": enc_bias, "scenario": batch["scenario"]}

  def decode_step(self, level: int, prev_codes: jax.Array, cache, context):
    """One beam-search step (the step function contract in docs/design.md).

    level: Python int. prev_codes [B, w] (code chosen at level-1; ignored at level 0).
    cache: None at level 0, else per-layer (k, v) [B, w, T, H, Dh].
    Returns (logits [B, w, V] float32, cache).
    """
    if level == 0:
      x = self._prefix_tokens(context["scenario"])[:, None]  # [B, 1, 2, D]
      caches = [None] * len(self.decoder_layers)
    else:
      ids = self._sid_token_ids(prev_codes[..., None], first_level=level - 1)  # [B, w, 1]
      x = self.sid_embed(ids) + self.decoder_position(jnp.asarray([level + 1]))[None, None]
      caches = cache
    h, new_caches = self._decoder_stack(x, caches, context["cross_kvs"], context["enc_bias"], True)
    logits = self._logits(h[..., -1:, :], first_level=level)[..., 0, :]
    return logits, tuple(new_caches)
