"""Length-bucketed batches: same examples per epoch, less padding, deterministic, resumable."""

import jax
import numpy as np
import flax.linen as nn

from oxyjax.data import feature_converter
from oxyjax.data.pipeline import BatchIterator, ExampleArrays
from oxyjax.models.encoder_decoder import EncoderDecoder, ModelConfig


def _arrays(n=1000, h=20, seed=0):
  rng = np.random.default_rng(seed)
  lens = np.minimum(rng.geometric(0.15, n), h).astype(np.int32)
  hist = np.zeros((n, h), np.int32)
  for i, l in enumerate(lens):
    hist[i, :l] = rng.integers(1, 50, l)
  z = np.zeros(n, np.int32)
  return ExampleArrays(hist, lens, np.arange(n, dtype=np.int32) % 49 + 1, z, z.copy())


def _epoch(it):
  return [it.next_global_indices() for _ in range(it.batches_per_epoch)]


def test_bucketed_epoch_visits_the_same_examples_with_less_padding():
  arr = _arrays()
  plain = _epoch(BatchIterator(arr, 32, seed=3))
  bucketed = _epoch(BatchIterator(arr, 32, seed=3, bucket_by_length=True, bucket_window=8))
  assert sorted(np.concatenate(plain)) == sorted(np.concatenate(bucketed))
  width = lambda batches: np.mean([arr.history_len[b].max() for b in batches])  # noqa: E731
  assert width(bucketed) < 0.7 * width(plain)


def test_bucketed_iterator_is_deterministic_and_resumable():
  arr = _arrays()
  a = BatchIterator(arr, 32, seed=1, bucket_by_length=True)
  first = [a.next_global_indices() for _ in range(45)]  # crosses an epoch boundary (31/epoch)
  b = BatchIterator(arr, 32, seed=1, bucket_by_length=True)
  for _ in range(20):
    b.next_global_indices()
  c = BatchIterator(arr, 32, seed=1, bucket_by_length=True)
  c.restore(b.state())
  rest = [c.next_global_indices() for _ in range(25)]
  for x, y in zip(first[20:], rest):
    np.testing.assert_array_equal(x, y)


def test_trimming_padding_columns_does_not_change_the_model_output():
  cfg = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                    dropout_rate=0.0, sid_vocab_sizes=(8, 8), num_item_embeddings=50, max_history=20)
  codes = np.random.default_rng(0).integers(0, 8, (50, 2)).astype(np.int32)
  arr = _arrays(64)
  short = arr.take(np.flatnonzero(arr.history_len <= 6)[:8])
  batch = feature_converter.convert(short, codes)
  trimmed = feature_converter.trim_history(batch)
  assert trimmed["history_items"].shape[1] == 8
  net = EncoderDecoder(cfg)
  params = nn.unbox(net.init(jax.random.key(0), batch)["params"])
  np.testing.assert_allclose(net.apply({"params": params}, batch), net.apply({"params": params}, trimmed), atol=1e-5)
