"""Thin model wrapper (t5x style): the network plus its loss, its decoding and its features.

`RecModel` owns:
  * `network`: the pure Flax `EncoderDecoder`;
  * `loss_fn`: next-token cross-entropy over the target's SID path (sum + denominator);
  * `predict`: prefix-constrained beam search over a `PrefixTrie` passed as an argument;
  * `convert_features`: item-level examples -> model arrays via the SID table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oxyjax import decoding
from oxyjax import losses
from oxyjax.data import feature_converter
from oxyjax.models.encoder_decoder import EncoderDecoder, ModelConfig


class RecModel:
  """A generative recommender: encoder-decoder over behaviours, generating SID paths."""

  def __init__(self, config: ModelConfig, sid_codes: np.ndarray, *, label_smoothing: float = 0.0):
    """config: architecture (data-dependent fields are filled here); sid_codes [N+1, L]."""
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
    self.label_smoothing = label_smoothing
    self.network = EncoderDecoder(config)

  # ---------------------------------------------------------------- features
  def convert_features(self, examples: Mapping[str, np.ndarray], weights=None) -> dict[str, np.ndarray]:
    return feature_converter.convert(examples, self.sid_codes, weights)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.config.max_history, self.config.num_levels
    return {
        "history_items": np.ones((batch_size, s), np.int32),
        "history_codes": np.zeros((batch_size, s, l), np.int32),
        "history_mask": np.ones((batch_size, s), bool),
        "scenario": np.zeros((batch_size,), np.int32),
        "target_codes": np.zeros((batch_size, l), np.int32),
        "target_items": np.ones((batch_size,), np.int32),
        "weights": np.ones((batch_size,), np.float32),
    }

  # ---------------------------------------------------------------- training
  def init(self, rng: jax.Array, batch: Mapping[str, Any]):
    """Boxed (logically partitioned) parameters."""
    return self.network.init({"params": rng}, batch, deterministic=True)["params"]

  def loss_fn(self, params, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None):
    """Returns (loss_sum, aux) with aux = {'denominator', 'correct'} (token level)."""
    deterministic = dropout_rng is None
    rngs = None if deterministic else {"dropout": dropout_rng}
    logits = self.network.apply({"params": params}, batch, deterministic=deterministic, rngs=rngs)
    loss_sum, denom, correct = losses.next_token_cross_entropy(
        logits, batch["target_codes"], batch["weights"], self.label_smoothing)
    return loss_sum, {"denominator": denom, "correct": correct}

  # ---------------------------------------------------------------- decoding
  def predict(self, params, batch: Mapping[str, jax.Array], trie, *, beam_size: int) -> decoding.BeamSearchOutput:
    """Top-`beam_size` distinct valid items per example, by constrained beam search."""
    context = self.network.apply({"params": params}, batch, method=EncoderDecoder.init_decode)

    def step_fn(level, prev_codes, cache):
      return self.network.apply({"params": params}, level, prev_codes, cache, context,
                                method=EncoderDecoder.decode_step)

    return decoding.beam_search(step_fn, None, trie, batch_size=batch["scenario"].shape[0], beam_size=beam_size)
