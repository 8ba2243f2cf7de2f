"""The SASRec SID source (oxyjax/sid/sasrec.py): trained on the training split only, and it learns."""

import numpy as np
import pytest

from oxyjax.sid import build, sasrec
from tests.sid.test_build import FakeDataset, _fake, _prefixes

# Tiny settings: the fake data has 60 items and 120 short sequences.
TINY = sasrec.SASRecConfig(dim=16, num_blocks=1, num_heads=1, max_len=8, dropout_rate=0.0, learning_rate=1e-2,
                           num_epochs=15, tokens_per_batch=128, length_buckets=(4, 8))


def _recording(monkeypatch):
  """Records every embedding matrix the builder quantises."""
  seen = []
  real = sasrec.sasrec_embeddings

  def wrapped(*args, **kwargs):
    emb, info = real(*args, **kwargs)
    seen.append(emb)
    return emb, info

  monkeypatch.setattr(build.sasrec_lib, "sasrec_embeddings", wrapped)
  return seen


def test_heldout_items_never_shape_the_embedding(monkeypatch):
  """Two datasets with the same training split but different validation and test splits: one
  whose held-out targets are sentinel items 59 and 60 (never in training), one whose held-out
  examples re-use training items. If the builder let a held-out example into SASRec's training
  data, the sentinels would get a learned row and the two embeddings would differ."""
  seen = _recording(monkeypatch)
  a = _fake()
  rng = np.random.default_rng(1)
  b = FakeDataset("fake", a.num_items, list(a.train),
                  [(u, h + (int(rng.integers(1, 58)),), int(rng.integers(1, 58))) for u, h, _ in a.validation],
                  [(u, h, int(rng.integers(1, 58))) for u, h, _ in a.test])
  ta, ra = build.build_with_report("fake", num_levels=2, codebook_size=4, dataset=a, embedding="sasrec",
                                   sasrec=TINY, num_iters=10)
  tb, rb = build.build_with_report("fake", num_levels=2, codebook_size=4, dataset=b, embedding="sasrec",
                                   sasrec=TINY, num_iters=10)
  assert len(seen) == 2
  # Same training data, same seed, same machine and code path: bit-identical.
  np.testing.assert_array_equal(seen[0], seen[1])
  np.testing.assert_array_equal(ta.codes, tb.codes)
  assert ra["embedding"]["train_loss_per_epoch"] == rb["embedding"]["train_loss_per_epoch"]
  # Items 58 (never bought), 59, 60 (held-out only) have no training interaction.
  assert ra["embedding"]["num_items_without_interactions"] == 3
  # The held-out co-occurrence report does use validation, and differs between the two.
  assert ra["heldout_cooccurrence"] != rb["heldout_cooccurrence"]


def test_unseen_items_get_a_seeded_random_row_independent_of_training():
  seqs_a = [[1, 2, 3], [2, 3, 4]]
  seqs_b = [[4, 3, 2, 1], [1, 4]]
  ea, _ = sasrec.sasrec_embeddings(seqs_a, 6, TINY, seed=3)
  eb, _ = sasrec.sasrec_embeddings(seqs_b, 6, TINY, seed=3)
  np.testing.assert_array_equal(ea[5:], eb[5:])  # items 5, 6 never occur
  assert not np.allclose(ea[1:5], eb[1:5])
  np.testing.assert_array_equal(ea[0], 0.0)
  np.testing.assert_allclose(np.linalg.norm(ea[1:], axis=1), 1.0, rtol=1e-5)


def test_sasrec_learns_the_item_groups():
  """Users buy within one of three groups of 19 items; after training, an item's nearest
  neighbours (cosine) are mostly in its own group (chance: 18/56 = 0.32)."""
  ds = _fake()
  seqs = build.training_sequences(ds.train)
  emb, info = sasrec.sasrec_embeddings(seqs, ds.num_items, TINY, seed=0)
  losses = info["train_loss_per_epoch"]
  assert losses[-1] < losses[0] - 0.5
  x = emb[1:58]
  group = (np.arange(57)) // 19
  sim = x @ x.T
  np.fill_diagonal(sim, -np.inf)
  nn5 = np.argsort(-sim, axis=1)[:, :5]
  same = (group[nn5] == group[:, None]).mean()
  assert same > 0.8, same


def test_bucketing_keeps_every_position_once():
  cfg = sasrec.SASRecConfig(max_len=5, length_buckets=(2, 4), tokens_per_batch=8)
  seqs = [[1, 2], [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [3]]
  buckets = sasrec._bucket_batches(seqs, cfg)
  assert sorted(buckets) == [2, 4, 5]
  # The long sequence keeps its last max_len + 1 items; the one-item sequence has no target.
  x, y = buckets[5]
  np.testing.assert_array_equal(x, [[7, 8, 9, 10, 11]])
  np.testing.assert_array_equal(y, [[8, 9, 10, 11, 12]])
  batches = sasrec._epoch_batches(buckets, cfg, np.random.default_rng(0))
  targets = sorted(int(t) for _, by in batches for t in by.ravel() if t)
  assert targets == sorted([2, 2, 3, 4, 8, 9, 10, 11, 12])


def test_sid_settings_key_the_sasrec_cache():
  s = build.sid_settings(num_levels=3, codebook_size=256, embedding="sasrec", balance="residual", seed=0)
  assert s["sasrec"] == sasrec.SASRecConfig().to_dict()
  d = build.sid_cache_dir("beauty", "abc", num_levels=3, codebook_size=256, embedding="sasrec",
                          balance="residual", seed=0, root="/x")
  assert d.name.startswith("beauty_abc_sasrec-") and d.name.endswith("_3x256_residual_s0")


def test_last_only_is_the_last_positions_logits():
  """Scoring reads only the last position (`last_only`, the second stage's path): the same logits
  as the full output's last row, up to float32 reassociation of a 16-d product (1e-5)."""
  import jax

  model = sasrec.make_model(30, TINY)
  seq = np.array([[0, 0, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 2]], np.int32)
  params = model.init(jax.random.key(0), seq, train=False)["params"]
  full = np.asarray(model.apply({"params": params}, seq, train=False))
  last = np.asarray(model.apply({"params": params}, seq, train=False, last_only=True))
  assert full.shape == (2, 8, 31) and last.shape == (2, 31)
  np.testing.assert_allclose(last, full[:, -1], rtol=1e-5, atol=1e-5)
