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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from oxyjax.kernels.igr_attention import igr_attention
from oxyjax.models import instruction
from oxyjax.models import layers
from oxyjax.models import moe

NEG_INF = layers.NEG_INF
MATMUL_DTYPES = ("float32", "bfloat16")  # ModelConfig.matmul_dtype


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
  # Operand dtype of the weight products (attention projections, MLPs, output layer): float32, or
  # bfloat16 = bf16 operands accumulated in float32 (layers.weight_product), an inference choice
  # for CPUs with AVX-512 BF16 (`python -m oxyjax.export --matmul_dtype=bfloat16`; docs/serving.md)
  matmul_dtype: str = "float32"
  max_history: int = 20
  num_scenarios: int = 1
  use_item_id_embedding: bool = True
  # Slow-thinking inputs (issue 4; PAPER.md sections 3-5). 0 disables each part.
  text_dim: int = 0  # width of the frozen item text embeddings fed per behaviour (MiniLM: 384)
  instruction_dim: int = 0  # width of the embedded reasoning instruction I_r (MiniLM: 384)
  # RMS-normalise I_r before its projection W_r (instruction.InstructionToken): an L2-normalised
  # sentence embedding otherwise enters INSTR about sqrt(instruction_dim) times weaker than I_s
  normalize_instruction: bool = False
  igr_recent: int = 0  # IGR: the most recent behaviours always kept (0 = IGR off: all max_history)
  igr_top_k: int = 0  # IGR: long-term behaviours kept by instruction relevance
  igr_dim: int = 64  # IGR: width of the retrieval space shared by psi_q and psi_i
  # Gathered IGR attention (oxyjax.kernels.igr_attention): 'auto' = 'xla' on every platform;
  # 'pallas' only when asked (run only in interpret mode on CPU, never compiled for a GPU/TPU).
  igr_implementation: str = "auto"
  # I_s = (scenario, trigger item): take the most recent behaviour as the trigger item (the
  # item-to-item reading of next-item prediction); False: the scenario alone (homepage-like).
  use_trigger_item: bool = False
  # Multi-scenario (oxyjax.data.scenarios): I_s = (scenario, the example's own trigger item),
  # from the batch features trigger_items [B] / trigger_codes [B, L] (/ trigger_text [B, Dt]);
  # trigger 0 (homepage, search) takes a learned default trigger vector.
  scenario_triggers: bool = False
  # Filled from data when None:
  sid_vocab_sizes: Optional[tuple[int, ...]] = None  # codes per SID level (incl. the collision level)
  num_item_embeddings: Optional[int] = None  # item-ID table rows; ids are taken modulo this
  # Mixture of experts (issue 3; oxyjax/models/moe.py, docs/design.md 'MoE').
  num_experts: int = 0  # experts per MoE FFN; 0 = dense MlpBlock everywhere
  num_experts_per_token: int = 1  # top-k
  # Training only: slots per expert = ceil(k * S * factor / E) per group of S tokens. Inference
  # (deterministic) routes each row alone with no drops, so it is batch-independent (moe.py).
  expert_capacity_factor: float = 1.25
  moe_aux_loss_weight: float = 0.01  # load-balancing loss weight (mean over MoE layers)
  moe_every_n_layers: int = 1  # layer i is MoE when i % n == n - 1 (1: every layer)
  moe_router_z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE uses 1e-3)
  moe_group_size: int = 512  # training: tokens per routing group (whole rows); <= 0: one group per row
  # Rematerialisation of each encoder/decoder layer in the backward pass (MaxText's
  # remat_policy): 'none' keeps every activation; 'full' keeps only each layer's input and
  # recomputes the rest (least memory, about one more forward pass); 'minimal' keeps the
  # matmul outputs and recomputes the elementwise work (norms, GELU, dropout masks, softmax).
  remat_policy: str = "none"

  @property
  def use_igr(self) -> bool:
    return self.igr_top_k > 0

  @property
  def encoder_length(self) -> int:
    """Behaviour tokens the encoder sees: all history, or [IGR summary, recent, top-K]."""
    return 1 + self.igr_recent + self.igr_top_k if self.use_igr else self.max_history

  @property
  def num_levels(self) -> int:
    return len(self.sid_vocab_sizes)

  @property
  def max_vocab(self) -> int:
    return max(self.sid_vocab_sizes)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_matmul_dtype(self):
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"ModelConfig.matmul_dtype must be one of {MATMUL_DTYPES}, got {self.matmul_dtype!r}")
    return jnp.dtype(self.matmul_dtype)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _maybe_remat(layer_cls, cfg: ModelConfig, deterministic_argnum: int):
  """`layer_cls` wrapped in nn.remat per cfg.remat_policy (parameter names are unchanged)."""
  if cfg.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"ModelConfig.remat_policy={cfg.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
  policy = REMAT_POLICIES[cfg.remat_policy]
  if policy is None:
    return layer_cls
  # static_argnums counts `self` as 0; `deterministic` is a Python bool that selects dropout.
  return nn.remat(layer_cls, static_argnums=(deterministic_argnum,), policy=policy)


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
    h = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate, dt, cfg.jnp_matmul_dtype,
                         name="attention")(
        h, h, bias, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = layers.RMSNorm(dtype=dt, name="pre_mlp_norm")(x)
    h = moe.make_mlp(cfg, self.name, dt, name="mlp")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Self-attention (causal, cacheable), cross-attention to the encoder, MLP."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt = cfg.jnp_dtype
    self.pre_self_attention_norm = layers.RMSNorm(dtype=dt)
    self.self_attention = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate, dt,
                                           cfg.jnp_matmul_dtype)
    self.pre_cross_attention_norm = layers.RMSNorm(dtype=dt)
    self.cross_attention = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate, dt,
                                            cfg.jnp_matmul_dtype)
    self.pre_mlp_norm = layers.RMSNorm(dtype=dt)
    self.mlp = moe.make_mlp(cfg, self.name, dt)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def cross_kv(self, encoded):
    """Encoder keys/values for this layer, computed once per request: ([B,S,H,Dh], [B,S,H,Dh])."""
    return self.cross_attention.project_kv(encoded)

  def __call__(self, x, self_cache, cross_k, cross_v, enc_bias, deterministic):
    """x: [..., T_new, D]; self_cache: None or (k, v) [..., T_old, H, Dh] with x's leading dims.

    Returns (y, (k, v)) where (k, v) covers all T_old + T_new positions.
    """
    h = self.pre_self_attention_norm(x)
    q, k, v = self.self_attention.project_qkv(h)
    if self_cache is not None:
      k = jnp.concatenate([self_cache[0], k], axis=-3)
      v = jnp.concatenate([self_cache[1], v], axis=-3)
    bias = _causal_bias(x.shape[-2], k.shape[-3])
    h = self.self_attention.attend(q, k, v, bias, deterministic)
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
    if cfg.scenario_triggers:
      if cfg.use_trigger_item:
        raise ValueError("use_trigger_item and scenario_triggers both set the trigger: choose one")
      self.default_trigger = self.param("default_trigger", nn.with_logical_partitioning(small, ("embed",)),
                                        (cfg.emb_dim,), jnp.float32)
    self.instruction = instruction.InstructionToken(cfg.num_scenarios, cfg.emb_dim, cfg.instruction_dim, dt,
                                                    normalize=cfg.normalize_instruction)
    if cfg.text_dim:
      self.text_projection = instruction.Dense(cfg.emb_dim, (None, "embed"), use_bias=False, dtype=dt)
    if cfg.use_igr:
      if cfg.igr_top_k > cfg.max_history or cfg.igr_recent >= cfg.max_history:
        raise ValueError(f"IGR needs igr_top_k ({cfg.igr_top_k}) <= max_history and igr_recent "
                         f"({cfg.igr_recent}) < max_history ({cfg.max_history})")
      self.query_tower = instruction.QueryTower(cfg.emb_dim, cfg.igr_dim, dt)
      self.item_tower = instruction.ItemTower(cfg.emb_dim, cfg.igr_dim, dt)
      self.igr_attention_query = instruction.Dense(cfg.num_heads * cfg.head_dim, (None, None), dtype=dt)
      kv_init = nn.with_logical_partitioning(layers.default_kernel_init, ("embed", "heads", "kv"))
      self.igr_wk = self.param("igr_wk", kv_init, (cfg.emb_dim, cfg.num_heads, cfg.head_dim), jnp.float32)
      self.igr_wv = self.param("igr_wv", kv_init, (cfg.emb_dim, cfg.num_heads, cfg.head_dim), jnp.float32)
      self.igr_summary_out = instruction.Dense(cfg.emb_dim, (None, "embed"), use_bias=False, dtype=dt)
      self.segment_embed = layers.Embed(3, cfg.emb_dim, dt, small)  # IGR summary / recent / retrieved
    encoder_layer = _maybe_remat(EncoderLayer, cfg, 3)  # (self, x, bias, deterministic)
    decoder_layer = _maybe_remat(DecoderLayer, cfg, 6)  # (self, x, cache, k, v, bias, deterministic)
    self.encoder_layers = [encoder_layer(cfg) for _ in range(cfg.num_encoder_layers)]
    self.encoder_norm = layers.RMSNorm(dtype=dt)
    self.decoder_layers = [decoder_layer(cfg) for _ in range(cfg.num_decoder_layers)]
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

  def _behaviour_parts(self, items, codes, text):
    """Per-item embeddings: (item-ID emb, side emb = sum of its SID-code embeddings, text emb).

    items [...], codes [..., L], text [..., Dt] or None. Shared by history behaviours and the
    training target, so the IGR item tower sees both the same way.
    """
    cfg = self.cfg
    side = self.sid_embed(self._sid_token_ids(codes)).sum(axis=-2)
    item = self.item_embed(items % cfg.num_item_embeddings) if cfg.use_item_id_embedding else jnp.zeros_like(side)
    return item, side, (text if cfg.text_dim else None)

  def instruction_inputs(self, batch, trigger=None):
    """(INSTR [B, D], i_s [B, D], i_r [B, Dr] or None) from the batch's instruction features."""
    return self.instruction(batch["scenario"], batch.get("instruction_embedding"), batch.get("instruction_mask"),
                            trigger)

  def encode(self, batch: dict[str, jax.Array], deterministic: bool = True):
    """Encodes the behaviours of `batch` (history_items [B,S], history_codes [B,S,L], history_mask
    [B,S], optional history_text [B,S,Dt]).

    Returns (encoded [B,T,D], enc_bias [B,1,1,T], extras) with T = cfg.encoder_length when IGR is
    on (else S), and extras = {'instr': INSTR [B,D], 'igr_query': q [B,d_r] or None,
    'igr_index': top-K history positions [B,K] or None}.
    """
    cfg = self.cfg
    mask = batch["history_mask"]
    item_e, side_e, text_e = self._behaviour_parts(batch["history_items"], batch["history_codes"],
                                                   batch.get("history_text"))
    x = item_e + side_e
    if text_e is not None:
      x = x + self.text_projection(text_e)
    lengths = mask.sum(axis=-1, keepdims=True)
    trigger = None
    if cfg.use_trigger_item:  # the most recent behaviour's token (before position / masking)
      trigger = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, :, None], axis=1)[:, 0]
    if cfg.scenario_triggers:  # the example's own trigger item, embedded like a behaviour
      t_text = batch.get("trigger_text")
      ti, ts, tt = self._behaviour_parts(batch["trigger_items"], batch["trigger_codes"], t_text)
      t = ti + ts
      if tt is not None:
        t = t + self.text_projection(tt)
      has = (batch["trigger_items"] > 0)[:, None]
      trigger = jnp.where(has, t, self.default_trigger.astype(t.dtype)[None])
    recency = jnp.clip(lengths - 1 - jnp.arange(mask.shape[-1])[None, :], 0, cfg.max_history - 1)
    x = x + self.encoder_position(recency)
    x = x * mask[..., None].astype(x.dtype)
    instr, i_s, i_r = self.instruction_inputs(batch, trigger)
    extras = {"instr": instr, "igr_query": None, "igr_index": None}
    if cfg.use_igr:
      x, mask, extras["igr_query"], extras["igr_index"] = self._igr(x, mask, lengths, item_e, side_e, text_e, i_s, i_r)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = self.input_dropout(x, deterministic=deterministic)
    enc_bias = jnp.where(mask, 0.0, NEG_INF)[:, None, None, :]
    for layer in self.encoder_layers:
      x = layer(x, enc_bias, deterministic)
    return self.encoder_norm(x), enc_bias, extras

  def _igr(self, x, mask, lengths, item_e, side_e, text_e, i_s, i_r):
    """Instruction-Guided Retrieval (PAPER.md section 4) over the long-term behaviours.

    The most recent `igr_recent` behaviours are always kept. The older ones form the
    long-term pool: each is scored against q = psi_q([i_s ; i_r]) by cosine with
    psi_i(behaviour), the top `igr_top_k` are gathered, and one more token attends over just
    those K with the instruction as the query (the gathered IGR attention kernel, whose
    cost grows with K, not the history length). The encoder sees
    [IGR summary, recent R, retrieved K] with a segment embedding for each part.
    """
    cfg = self.cfg
    b, s, _ = x.shape
    r, k = cfg.igr_recent, cfg.igr_top_k
    if s < k:  # a batch trimmed to fewer columns than K: pad back with empty behaviours
      pad = lambda a: jnp.pad(a, [(0, 0), (0, k - s)] + [(0, 0)] * (a.ndim - 2))
      x, mask, item_e, side_e = pad(x), pad(mask), pad(item_e), pad(side_e)
      text_e = None if text_e is None else pad(text_e)
      s = k
    pos = jnp.arange(s)[None, :]
    pool_mask = mask & (pos < lengths - r)
    q = self.query_tower(i_s, i_r)  # [B, d_r]
    keys = self.item_tower(item_e, side_e, text_e)  # [B, S, d_r]
    attn_q = self.igr_attention_query(q).reshape(b, 1, cfg.num_heads, cfg.head_dim)
    out, idx, _, top_mask = igr_attention(
        x, pool_mask, q.astype(jnp.float32), keys.astype(jnp.float32), attn_q, self.igr_wk.astype(x.dtype),
        self.igr_wv.astype(x.dtype), k=k, implementation=cfg.igr_implementation)
    summary = self.igr_summary_out(out.reshape(b, cfg.num_heads * cfg.head_dim))[:, None]
    retrieved = jnp.take_along_axis(x, idx[:, :, None], axis=1) * top_mask[:, :, None].astype(x.dtype)
    recent_pos = lengths - r + jnp.arange(r)[None, :]  # [B, R], may be < 0 for short histories
    recent_mask = recent_pos >= 0
    recent = jnp.take_along_axis(x, jnp.clip(recent_pos, 0, s - 1)[:, :, None], axis=1)
    recent = recent * recent_mask[:, :, None].astype(x.dtype)
    segments = jnp.asarray([0] + [1] * r + [2] * k, jnp.int32)
    tokens = jnp.concatenate([summary, recent, retrieved], axis=1) + self.segment_embed(segments)[None]
    new_mask = jnp.concatenate([pool_mask.any(axis=1, keepdims=True), recent_mask, top_mask], axis=1)
    return tokens, new_mask, q, jnp.where(top_mask, idx, -1)

  def item_representation(self, items, codes, text=None):
    """psi_i of items (e.g. the training target): [..., d_r]. Needs IGR on."""
    item_e, side_e, text_e = self._behaviour_parts(items, codes, text)
    return self.item_tower(item_e, side_e, text_e)

  # ------------------------------------------------------------------ decoder
  def _logits(self, h: jax.Array, first_level: int) -> jax.Array:
    """h [..., T, D] at the positions predicting levels first_level.. -> [..., T, V] float32."""
    t = h.shape[-2]
    md, h = self.cfg.jnp_matmul_dtype, h.astype(jnp.float32)  # logits in float32
    if t == 1:  # a decoder step: one level's kernel, a plain [rows, D] x [D, V] product
      logits = layers.weight_product("...td,dv->...tv", h, self.output_kernel[first_level], jnp.float32, md)
    else:
      kernel = self.output_kernel[first_level : first_level + t]
      logits = layers.weight_product("...td,tdv->...tv", h, kernel, jnp.float32, md)
    sizes = self.cfg.sid_vocab_sizes[first_level : first_level + t]
    if all(size == self.cfg.max_vocab for size in sizes):
      return logits  # every code of these levels exists: nothing to mask
    valid = jnp.arange(self.cfg.max_vocab)[None, :] < jnp.asarray(sizes, jnp.int32)[:, None]
    return jnp.where(valid, logits, NEG_INF)

  def _decoder_stack(self, x, caches, cross_kvs, enc_bias, deterministic):
    new_caches = []
    for layer, cache, (ck, cv) in zip(self.decoder_layers, caches, cross_kvs):
      x, kv = layer(x, cache, ck, cv, enc_bias, deterministic)
      new_caches.append(kv)
    return self.decoder_norm(x), new_caches

  def _prefix_tokens(self, instr):
    """[BOS, INSTR] embeddings [B, 2, D] (with positions 0, 1) from INSTR [B, D]."""
    dt = self.cfg.jnp_dtype
    bos = jnp.broadcast_to(self.bos.astype(dt), instr.shape)
    x = jnp.stack([bos, instr.astype(dt)], axis=1)
    return x + self.decoder_position(jnp.arange(2))[None]

  def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True, return_retrieval: bool = False):
    """Teacher-forced logits [B, L, V] for batch['target_codes'] [B, L].

    With `return_retrieval` (IGR on), returns (logits, {'query': q [B, d_r], 'target': psi_i(target)
    [B, d_r]}) for the Q2I loss.
    """
    encoded, enc_bias, extras = self.encode(batch, deterministic)
    cross_kvs = [layer.cross_kv(encoded) for layer in self.decoder_layers]
    x = self._prefix_tokens(extras["instr"])
    codes = batch["target_codes"][:, :-1]  # s_1 .. s_{L-1} as inputs
    if codes.shape[-1]:
      y = self.sid_embed(self._sid_token_ids(codes)) + self.decoder_position(jnp.arange(2, 1 + self.cfg.num_levels))[None]
      x = jnp.concatenate([x, y], axis=1)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = self.input_dropout(x, deterministic=deterministic)
    h, _ = self._decoder_stack(x, [None] * len(self.decoder_layers), cross_kvs, enc_bias, deterministic)
    logits = self._logits(h[:, 1:], first_level=0)
    if not return_retrieval:
      return logits
    if not self.cfg.use_igr:
      raise ValueError("return_retrieval needs IGR (ModelConfig.igr_top_k > 0)")
    target = self.item_representation(batch["target_items"], batch["target_codes"], batch.get("target_text"))
    return logits, {"query": extras["igr_query"], "target": target}

  def group_logits(self, batch: dict[str, jax.Array], codes: jax.Array) -> jax.Array:
    """Teacher-forced logits [B, G, L, V] of G code paths per row, codes [B, G, L], with the
    encoder run once per row (post-training scores a group of candidates per prompt; no dropout)."""
    cfg = self.cfg
    encoded, enc_bias, extras = self.encode(batch, True)
    cross_kvs = [layer.cross_kv(encoded) for layer in self.decoder_layers]
    b, g = codes.shape[:2]
    x = self._prefix_tokens(extras["instr"])[:, None]
    x = jnp.broadcast_to(x, (b, g) + x.shape[2:])
    if cfg.num_levels > 1:
      y = self.sid_embed(self._sid_token_ids(codes[..., :-1]))
      x = jnp.concatenate([x, y + self.decoder_position(jnp.arange(2, 1 + cfg.num_levels))[None, None]], axis=2)
    h, _ = self._decoder_stack(x, [None] * len(self.decoder_layers), cross_kvs, enc_bias, True)
    return self._logits(h[:, :, 1:], first_level=0)

  # ------------------------------------------------------------------ incremental decoding
  def init_decode(self, batch: dict[str, jax.Array]):
    """Runs the encoder once. Returns the per-request context for `decode_step`."""
    encoded, enc_bias, extras = self.encode(batch)
    cross_kvs = tuple(layer.cross_kv(encoded) for layer in self.decoder_layers)
    return {"cross_kvs": cross_kvs, "enc_bias": enc_bias, "instr": extras["instr"]}

  def decode_step(self, level: int, prev_codes: jax.Array, cache, context):
    """One beam-search step (the step function contract in docs/design.md).

    level: Python int. prev_codes [B, w] (code chosen at level-1; ignored at level 0).
    cache: None at level 0, else per-layer (k, v) [B, w, T, H, Dh].
    Returns (logits [B, w, V] float32, cache).
    """
    if level == 0:
      x = self._prefix_tokens(context["instr"])[:, None]  # [B, 1, 2, D]
      caches = [None] * len(self.decoder_layers)
    else:
      ids = self._sid_token_ids(prev_codes[..., None], first_level=level - 1)  # [B, w, 1]
      x = self.sid_embed(ids) + self.decoder_position(jnp.asarray([level + 1]))[None, None]
      caches = cache
    h, new_caches = self._decoder_stack(x, caches, context["cross_kvs"], context["enc_bias"], True)
    logits = self._logits(h[..., -1:, :], first_level=level)[..., 0, :]
    return logits, tuple(new_caches)

  def decode_paths(self, codes: jax.Array, cache, context):
    """Levels 1..T of given paths in one teacher-forced pass after the prefix: what T
    `decode_step` calls compute, with one decoder pass instead of T.

    codes [B, G, T]: each path's codes of levels 0..T-1 (the inputs); cache: `decode_step`'s
    level-0 cache broadcast to the G paths, per layer (k, v) [B, G, 2, H, Dh].
    Returns logits [B, G, T, V] of levels 1..T.
    """
    t = codes.shape[-1]
    x = self.sid_embed(self._sid_token_ids(codes)) + self.decoder_position(jnp.arange(2, 2 + t))[None, None]
    h, _ = self._decoder_stack(x, cache, context["cross_kvs"], context["enc_bias"], True)
    return self._logits(h, first_level=1)
