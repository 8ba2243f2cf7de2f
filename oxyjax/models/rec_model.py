"""Thin model wrapper (t5x style): the network plus its loss, its decoding and its features.

`RecModel` owns:
  * `network`: the pure Flax `EncoderDecoder`;
  * `loss_fn`: next-token cross-entropy over the target's SID path (sum + denominator);
  * `predict`: prefix-constrained beam search over a `PrefixTrie` passed as an argument;
  * `convert_features`: item-level examples -> model arrays via the SID table (plus the
    frozen item text embeddings and the per-example reasoning instruction, when configured).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oxyjax import decoding
from oxyjax import losses
from oxyjax.data import feature_converter
from oxyjax.models import moe
from oxyjax.models.encoder_decoder import EncoderDecoder, ModelConfig


class RecModel:
  """A generative recommender: encoder-decoder over behaviours, generating SID paths."""

  def __init__(self, config: ModelConfig, sid_codes: np.ndarray, *, label_smoothing: float = 0.0,
               item_text_embeddings: np.ndarray | None = None, q2i: losses.Q2IConfig = losses.Q2IConfig(),
               action_weights: Mapping[int, float] | None = None):
    """config: architecture (data-dependent fields are filled here); sid_codes [N+1, L].

    item_text_embeddings: [N+1, Dt] frozen text embeddings (row 0 = padding), needed when
      config.text_dim > 0. q2i: the Q2I loss (needs IGR). action_weights: NTP weight per action
      type id (PAPER.md section 5: purchase > cart > click), used for examples with an 'action'.
    """
    sid_codes = np.asarray(sid_codes, np.int32)
    vocab_sizes = tuple(int(x) for x in sid_codes[1:].max(axis=0) + 1)
    if config.sid_vocab_sizes is None:
      config = dataclasses.replace(config, sid_vocab_sizes=vocab_sizes)
    elif any(v < need for v, need in zip(config.sid_vocab_sizes, vocab_sizes)) or \
        len(config.sid_vocab_sizes) != len(vocab_sizes):
      raise ValueError(f"model sid_vocab_sizes {config.sid_vocab_sizes} cannot hold the SID table {vocab_sizes}")
    if config.num_item_embeddings is None:
      config = dataclasses.replace(config, num_item_embeddings=int(sid_codes.shape[0]))
    self.config = config
    self.sid_codes = sid_codes
    if config.text_dim:
      if item_text_embeddings is None or item_text_embeddings.shape != (sid_codes.shape[0], config.text_dim):
        got = None if item_text_embeddings is None else item_text_embeddings.shape
        raise ValueError(f"text_dim={config.text_dim} needs item_text_embeddings of shape "
                         f"{(sid_codes.shape[0], config.text_dim)}, got {got}")
      item_text_embeddings = np.asarray(item_text_embeddings, np.float32)
    self.item_text_embeddings = item_text_embeddings if config.text_dim else None
    if q2i.weight and not config.use_igr:
      raise ValueError("the Q2I loss trains the IGR retrieval space: set ModelConfig.igr_top_k > 0")
    self.q2i = q2i
    self.action_weights = dict(action_weights) if action_weights else None
    self.label_smoothing = label_smoothing
    self.network = EncoderDecoder(config)

  def with_matmul_dtype(self, matmul_dtype: str) -> "RecModel":
    """This model with its weight products in ``matmul_dtype`` (`ModelConfig.matmul_dtype`): an
    inference option over the same parameters, e.g. bfloat16 for a serving export."""
    config = dataclasses.replace(self.config, matmul_dtype=str(matmul_dtype))
    config.jnp_matmul_dtype  # noqa: B018  (validates the name)
    model = copy.copy(self)
    model.config, model.network = config, EncoderDecoder(config)
    return model

  # ---------------------------------------------------------------- features
  def convert_features(self, examples: Mapping[str, np.ndarray], weights=None) -> dict[str, np.ndarray]:
    """Examples (an ExampleArrays or a dict) -> the model's feature dict (host NumPy)."""
    ex = examples.as_dict() if hasattr(examples, "as_dict") else examples
    if self.action_weights and "action" in ex:
      table = np.ones(max(self.action_weights) + 1, np.float32)
      for a, w in self.action_weights.items():
        table[a] = w
      action_w = table[np.asarray(ex["action"], np.int64)]
      weights = action_w if weights is None else np.asarray(weights, np.float32) * action_w
    out = feature_converter.convert(ex, self.sid_codes, weights)
    if self.item_text_embeddings is not None:
      out["history_text"] = self.item_text_embeddings[out["history_items"]]
      out["target_text"] = self.item_text_embeddings[out["target_items"]]
    if self.config.scenario_triggers:
      b = out["scenario"].shape[0]
      trig = ex.get("trigger")
      trig = np.zeros((b,), np.int32) if trig is None else np.asarray(trig, np.int32)
      if trig.size and (trig.max() >= self.sid_codes.shape[0] or trig.min() < 0):
        raise ValueError(f"trigger item index out of range for a SID table of {self.sid_codes.shape[0] - 1} items")
      out["trigger_items"], out["trigger_codes"] = trig, self.sid_codes[trig]
      if self.item_text_embeddings is not None:
        out["trigger_text"] = self.item_text_embeddings[trig]
    if "pool_root" in ex:
      out["pool_root"] = np.asarray(ex["pool_root"], np.int32)
    if self.config.instruction_dim:
      b = out["scenario"].shape[0]
      emb = ex.get("instruction_embedding")
      out["instruction_embedding"] = (np.zeros((b, self.config.instruction_dim), np.float32) if emb is None
                                      else np.asarray(emb, np.float32))
      present = ex.get("instruction_mask")
      out["instruction_mask"] = np.zeros((b,), bool) if present is None else np.asarray(present, bool)
    return out

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.config.max_history, self.config.num_levels
    out = {
        "history_items": np.ones((batch_size, s), np.int32),
        "history_codes": np.zeros((batch_size, s, l), np.int32),
        "history_mask": np.ones((batch_size, s), bool),
        "scenario": np.zeros((batch_size,), np.int32),
        "target_codes": np.zeros((batch_size, l), np.int32),
        "target_items": np.ones((batch_size,), np.int32),
        "weights": np.ones((batch_size,), np.float32),
    }
    if self.config.text_dim:
      out["history_text"] = np.zeros((batch_size, s, self.config.text_dim), np.float32)
      out["target_text"] = np.zeros((batch_size, self.config.text_dim), np.float32)
    if self.config.scenario_triggers:
      out["trigger_items"] = np.zeros((batch_size,), np.int32)
      out["trigger_codes"] = np.zeros((batch_size, l), np.int32)
      if self.config.text_dim:
        out["trigger_text"] = np.zeros((batch_size, self.config.text_dim), np.float32)
    if self.config.instruction_dim:
      out["instruction_embedding"] = np.zeros((batch_size, self.config.instruction_dim), np.float32)
      out["instruction_mask"] = np.zeros((batch_size,), bool)
    return out

  # ---------------------------------------------------------------- training
  def init(self, rng: jax.Array, batch: Mapping[str, Any]):
    """Boxed (logically partitioned) parameters."""
    return self.network.init({"params": rng}, batch, deterministic=True)["params"]

  def loss_fn(self, params, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None):
    """Returns (loss_sum, aux) with aux = {'denominator', 'correct'} (token level)."""
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    use_q2i = bool(self.q2i.weight)
    use_moe = self.config.num_experts > 0  # MoE layers sow their auxiliary losses
    out = self.network.apply({"params": params}, batch, deterministic=deterministic, rngs=rngs,
                             return_retrieval=use_q2i, mutable=["intermediates"] if use_moe else False)
    out, moe_state = out if use_moe else (out, None)
    logits, retrieval = out if use_q2i else (out, None)
    loss_sum, denom, correct = losses.next_token_cross_entropy(
        logits, batch["target_codes"], batch["weights"], self.label_smoothing)
    aux = {"denominator": denom, "correct": correct}
    if use_q2i:
      # A batch-level loss: scaled by the token denominator so that dividing the sum by it
      # (as the train step does) gives L_NTP + lambda * L_Q2I.
      q2i, parts = losses.q2i_loss(retrieval["query"], retrieval["target"], batch["weights"],
                                   variance_weight=self.q2i.variance_weight,
                                   decorrelation_weight=self.q2i.decorrelation_weight,
                                   variance=self.q2i.variance)
      loss_sum = loss_sum + self.q2i.weight * q2i * jax.lax.stop_gradient(denom)
      aux.update({"q2i_loss": q2i, **{f"q2i_{k}": v for k, v in parts.items()}})
    if use_moe:
      # Batch-level MoE losses (means over MoE layers), scaled by the token denominator like Q2I,
      # so that loss_sum / denominator = L_NTP + w_aux * L_balance + w_z * L_z.
      moe_losses = moe.collect_aux_losses(moe_state.get("intermediates"))
      moe_total = (self.config.moe_aux_loss_weight * moe_losses["moe_aux_loss"]
                   + self.config.moe_router_z_loss_weight * moe_losses["moe_z_loss"])
      loss_sum = loss_sum + moe_total * jax.lax.stop_gradient(denom)
      aux.update(moe_losses)
    return loss_sum, aux

  # ---------------------------------------------------------------- decoding
  def encode(self, params, batch: Mapping[str, jax.Array]):
    """The decoder's context for `batch` (the encoder's output and what the decoder reads of
    it): what `predict` and `path_log_probs` compute first, passed to both when a program runs
    the two on the same rows (the serving program with a second stage) so the encoder runs once."""
    return self.network.apply({"params": params}, batch, method=EncoderDecoder.init_decode)

  def predict(self, params, batch: Mapping[str, jax.Array], trie, *, beam_size: int,
              normalize: str = "vocab", level_weights: tuple[float, ...] | None = None, context=None
              ) -> decoding.BeamSearchOutput:
    """Top-`beam_size` distinct valid items per example, by constrained beam search
    (`normalize`, `level_weights`: how each level's scores are normalised and weighted, see
    `decoding.beam_search`; `context`: `encode`'s output for `batch`, computed here if None)."""
    context = self.encode(params, batch) if context is None else context

    def step_fn(level, prev_codes, cache):
      return self.network.apply({"params": params}, level, prev_codes, cache, context,
                                method=EncoderDecoder.decode_step)

    # `pool_root` [B] (optional): each row's root in a forest of pools (PrefixTrie.forest).
    return decoding.beam_search(step_fn, None, trie, batch_size=batch["scenario"].shape[0], beam_size=beam_size,
                                normalize=normalize, root=batch.get("pool_root"), level_weights=level_weights)

  def path_log_probs(self, params, batch: Mapping[str, jax.Array], codes: jax.Array, context=None, *,
                     normalize: str = "vocab", trie=None) -> jax.Array:
    """The joint log-probability ``[B, G]`` of given SID paths ``codes [B, G, L]``: the score
    `predict` gives a beam with ``normalize="vocab"`` and no level weights, for items beam search
    did not return (`oxyjax.rescoring`'s union). ``normalize="last_valid"`` (with the ``trie`` the
    search ran over, each row from its ``pool_root``) gives `predict`'s score under that option:
    the last level's log-softmax over the children of the path's prefix. The encoder and the
    [BOS, INSTR] prefix run once per row (beam search's level-0 step), then the G paths' levels 1..L-1 in one teacher-forced
    pass over that cached prefix (`EncoderDecoder.decode_paths`: the same attention as L-1 cached
    steps, one decoder pass; a pass of the whole group from scratch would run the prefix G
    times). `context`: `encode`'s output for `batch`, computed here if None."""
    if normalize not in ("vocab", "last_valid") or (normalize == "last_valid" and trie is None):
      raise ValueError(f"path_log_probs takes normalize 'vocab', or 'last_valid' with a trie; got {normalize!r}")
    safe = jnp.maximum(codes, 0)  # padding candidates (-1): any path; the caller masks them
    b, g, levels = safe.shape
    if normalize == "last_valid" and levels < 2:
      raise ValueError("normalize 'last_valid' needs paths of two or more levels")
    context = self.encode(params, batch) if context is None else context
    logits, cache = self.network.apply({"params": params}, 0, jnp.zeros((b, 1), jnp.int32), None, context,
                                       method=EncoderDecoder.decode_step)  # [B, 1, V]
    total = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), safe[..., 0], axis=1)
    if levels > 1:
      cache = decoding.reorder_cache(cache, jnp.zeros((b, g), jnp.int32))  # the prefix's cache for every path
      logits = self.network.apply({"params": params}, safe[..., :-1], cache, context,
                                  method=EncoderDecoder.decode_paths)  # [B, G, L-1, V]
      logits = logits.astype(jnp.float32)
      lp = jax.nn.log_softmax(logits)
      picked = jnp.take_along_axis(lp, safe[..., 1:, None], axis=-1)[..., 0]  # [B, G, L-1]
      if normalize == "last_valid":  # as `decoding.beam_search` scores the last level
        child, is_child = trie.last_level_children(safe[..., :-1], batch.get("pool_root"))
        last = logits[..., -1, :]
        lse = jax.nn.logsumexp(jnp.where(is_child, jnp.take_along_axis(last, child, axis=-1), -jnp.inf), axis=-1)
        own = jnp.take_along_axis(last, safe[..., -1:], axis=-1)[..., 0] - lse
        picked = picked.at[..., -1].set(jnp.where(is_child.sum(-1) == 1, 0.0, own))
      for level in range(1, levels):  # summed level by level, as beam search sums a beam's score
        total = total + picked[..., level - 1]
    return total
