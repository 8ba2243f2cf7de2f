"""build_sid_table on small fake datasets (the real builds are recorded in docs/sids.md)."""

import dataclasses
import json

import numpy as np
import pytest

from oxyjax.sid import build
from oxyjax.sid.table import SIDTable


@dataclasses.dataclass
class FakeDataset:
  name: str
  num_items: int
  train: list
  validation: list
  test: list
  item_meta: list | None = None

  def item_text(self, i):
    m = self.item_meta[i]
    return f"Title: {m['title']}. Brand: {m['brand']}." if m else ""


def _prefixes(user, seq):
  return [(user, tuple(seq[:i]), seq[i]) for i in range(1, len(seq))]


def _fake(num_items=60, with_text=False, seed=0):
  """Users buy within one of 3 item groups (1..57); 58 is never bought; 59, 60 are only held-out targets."""
  rng = np.random.default_rng(seed)
  train, valid, test = [], [], []
  for u in range(1, 121):
    lo = 1 + (u % 3) * 19
    seq = rng.integers(lo, lo + 19, size=rng.integers(3, 8)).tolist()
    train += _prefixes(u, seq)
    valid.append((u, tuple(seq), 59))
    test.append((u, tuple(seq) + (59,), 60))
  meta = None
  if with_text:
    meta = [None] + [{"title": f"item {i}", "brand": f"brand{(i - 1) // 19}"} for i in range(1, num_items + 1)]
  return FakeDataset("fake", num_items, train, valid, test, meta)


def test_training_sequences_use_longest_history_only():
  train = _prefixes(1, [5, 6, 7, 8]) + _prefixes(2, [9, 3]) + _prefixes(1, [5, 6])
  assert build.training_sequences(train) == [[5, 6, 7, 8], [9, 3]]


def test_build_collaborative_writes_table_and_report(tmp_path):
  ds = _fake()
  table, report = build.build_with_report("fake", num_levels=2, codebook_size=4, dataset=ds, seed=0,
                                          out_dir=tmp_path, num_iters=10, collaborative_dim=8)
  assert table.codes.shape == (61, 3)
  assert np.unique(table.codes[1:], axis=0).shape[0] == 60
  assert table.codebook_sizes[:2] == (4, 4)
  assert table.meta["embedding"]["source"] == "collaborative"
  # Item 58 and the held-out targets 59, 60 are not in the training sequences.
  assert table.meta["embedding"]["num_items_without_interactions"] == 3
  assert report["level1_purity"] is None
  loaded = SIDTable.load(tmp_path / "sid_table")
  np.testing.assert_array_equal(loaded.codes, table.codes)
  assert "SIDs: fake" in (tmp_path / "sid_report.md").read_text()
  assert json.loads((tmp_path / "sid_report.json").read_text())["collision"] == report["collision"]
  # Deterministic.
  again = build.build_sid_table("fake", num_levels=2, codebook_size=4, dataset=ds, seed=0,
                                num_iters=10, collaborative_dim=8)
  np.testing.assert_array_equal(again.codes, table.codes)


class _FakeEncoder:
  calls = 0

  def __init__(self, max_length=256):
    self.dim = 384

  def encode(self, texts, batch_size=32):
    _FakeEncoder.calls += 1
    rng = np.random.default_rng(0)
    brand_dirs = rng.normal(size=(8, 384))
    out = np.stack([brand_dirs[int(t.split("brand")[1][0])] + 0.01 * rng.normal(size=384) for t in texts])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_build_auto_uses_text_and_caches_embeddings(tmp_path, monkeypatch):
  monkeypatch.setattr(build.emb_lib, "SentenceEncoder", _FakeEncoder)
  _FakeEncoder.calls = 0
  ds = _fake(with_text=True)
  table, report = build.build_with_report("fake", num_levels=2, codebook_size=4, dataset=ds,
                                          out_dir=tmp_path, num_iters=10)
  assert table.meta["embedding"]["source"] == "text"
  assert (tmp_path / "item_embeddings.npy").exists()
  assert report["label"] == "brand" and report["level1_purity"] == pytest.approx(1.0)
  assert not report["wall_time_s"]["embedding_cached"]
  _, report2 = build.build_with_report("fake", num_levels=2, codebook_size=4, dataset=ds,
                                       out_dir=tmp_path, num_iters=10)
  assert _FakeEncoder.calls == 1 and report2["wall_time_s"]["embedding_cached"]
  ds.item_meta[1] = {"title": "renamed", "brand": "brand0"}  # texts changed -> cache is stale
  build.build_with_report("fake", num_levels=2, codebook_size=4, dataset=ds, out_dir=tmp_path, num_iters=10)
  assert _FakeEncoder.calls == 2


def test_build_rejects_text_without_text():
  with pytest.raises(ValueError, match="no item text"):
    build.build_sid_table("fake", embedding="text", dataset=_fake())
  with pytest.raises(ValueError, match="embedding must be"):
    build.build_sid_table("fake", embedding="image", dataset=_fake())


def test_fused_embeddings_average_the_squared_distances_of_the_parts():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 3))
  b[4] = 0.0  # an item with no signal in the second source
  x = build.fused_embeddings(a, b)
  assert x.shape == (5, 10) and x.dtype == np.float32
  unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
  sq = lambda m, i, j: float(np.sum((m[i] - m[j]) ** 2))
  for i, j in ((0, 1), (2, 3)):
    assert sq(x, i, j) == pytest.approx((sq(unit(a), i, j) + sq(unit(b), i, j)) / 2, rel=1e-5)
  np.testing.assert_array_equal(x[4, 7:], 0.0)  # a zero row stays zero, not NaN


def test_text_plus_collaborative_is_built_from_the_training_split_only(monkeypatch):
  """Same training split, different held-out splits (sentinel items 59 and 60 only held out in
  one): the matrix quantised is the same, and the items without a training interaction (58, 59,
  60) are placed by their text alone (zero collaborative half), not by a held-out signal."""
  monkeypatch.setattr(build.emb_lib, "SentenceEncoder", _FakeEncoder)
  seen = []
  fit = build.rq_kmeans.fit
  monkeypatch.setattr(build.rq_kmeans, "fit", lambda x, **kw: seen.append(np.asarray(x)) or fit(x, **kw))
  a = _fake(with_text=True)
  rng = np.random.default_rng(1)
  b = FakeDataset("fake", a.num_items, list(a.train),
                  [(u, h + (int(rng.integers(1, 58)),), int(rng.integers(1, 58))) for u, h, _ in a.validation],
                  [(u, h, int(rng.integers(1, 58))) for u, h, _ in a.test], a.item_meta)
  kw = dict(num_levels=2, codebook_size=4, embedding="text+collaborative", num_iters=10, collaborative_dim=8)
  ta, ra = build.build_with_report("fake", dataset=a, **kw)
  tb, _ = build.build_with_report("fake", dataset=b, **kw)
  np.testing.assert_array_equal(seen[0], seen[1])
  np.testing.assert_array_equal(ta.codes, tb.codes)
  assert seen[0].shape == (60, 384 + 8) and ra["embedding"]["source"] == "text+collaborative"
  assert ra["embedding"]["num_items_without_interactions"] == 3
  np.testing.assert_array_equal(seen[0][57:, 384:], 0.0)  # items 58, 59, 60
  assert np.all(np.linalg.norm(seen[0][:57, 384:], axis=1) > 0.5)  # 1/sqrt(2) for every trained item
  text = _FakeEncoder().encode([a.item_text(i) for i in range(1, 61)])  # what the builder's encoder returned
  np.testing.assert_allclose(seen[0][57:, :384], text[57:] / np.sqrt(2), rtol=1e-6)
