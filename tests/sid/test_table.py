"""SIDTable: collision level, save/load, corrupted files, quality report on a hand-made table."""

import json
import math

import numpy as np
import pytest

from oxyjax.sid.table import (SIDTable, SIDTableError, add_collision_level, format_report, heldout_cooccurrence,
                              quality_report)

# Hand-made k-means codes for items 1..6 (two levels, codebook sizes 3 and 2):
# paths (0,0) x2, (0,1) x1, (1,0) x3; code 2 of level 1 is never used.
KM_CODES = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [1, 0]], np.int32)


def _table(meta=None):
  return SIDTable.from_kmeans_codes(KM_CODES, (3, 2), meta or {"method": "hand", "seed": 0})


def test_collision_level_makes_paths_unique_in_item_order():
  codes = np.array([[2, 1], [0, 0], [2, 1], [0, 0], [2, 1], [1, 1]])
  full = add_collision_level(codes)
  np.testing.assert_array_equal(full[:, -1], [0, 0, 1, 1, 2, 0])
  assert np.unique(full, axis=0).shape[0] == len(codes)
  big = np.random.default_rng(0).integers(0, 3, size=(500, 2))
  assert np.unique(add_collision_level(big), axis=0).shape[0] == 500


def test_from_kmeans_codes():
  t = _table()
  assert t.codes.shape == (7, 3) and t.codes.dtype == np.int32
  np.testing.assert_array_equal(t.codes[0], [0, 0, 0])
  np.testing.assert_array_equal(t.codes[1:, 2], [0, 1, 0, 0, 1, 2])
  assert t.codebook_sizes == (3, 2, 3)
  assert t.num_items == 6 and t.num_levels == 3


def test_invalid_tables_rejected():
  with pytest.raises(ValueError, match="not unique"):
    SIDTable(np.array([[0, 0], [1, 1], [1, 1]]), (2, 2))
  with pytest.raises(ValueError, match="row 0"):
    SIDTable(np.array([[1, 0], [1, 1]]), (2, 2))
  with pytest.raises(ValueError, match="out of range"):
    SIDTable(np.array([[0, 0], [1, 2]]), (2, 2))
  with pytest.raises(ValueError, match="codebook sizes"):
    SIDTable(np.array([[0, 0], [1, 1]]), (2, 2, 2))


def test_save_load_round_trip(tmp_path):
  t = _table({"method": "hand", "dataset": "toy", "seed": 3})
  npz, js = t.save(tmp_path / "sub" / "sid_table")
  assert npz.name == "sid_table.npz" and js.name == "sid_table.json"
  assert not [p for p in npz.parent.iterdir() if p.name.endswith(".tmp")]
  for path in (tmp_path / "sub" / "sid_table", npz, js):
    u = SIDTable.load(path)
    np.testing.assert_array_equal(u.codes, t.codes)
    assert u.codebook_sizes == t.codebook_sizes
    assert u.meta == {"method": "hand", "dataset": "toy", "seed": 3}


def test_corrupted_and_mismatched_files(tmp_path):
  t = _table()
  npz, js = t.save(tmp_path / "sid_table")
  good_npz = npz.read_bytes()
  npz.write_bytes(good_npz[: len(good_npz) // 2])  # truncated
  with pytest.raises(SIDTableError, match="sid_table.npz"):
    SIDTable.load(npz)
  npz.write_bytes(good_npz)
  js.write_text(js.read_text()[:-20])  # broken JSON
  with pytest.raises(SIDTableError, match="sid_table.json"):
    SIDTable.load(npz)
  # A pair from two different saves: header of t, codes of another table.
  t.save(tmp_path / "sid_table")
  other = SIDTable.from_kmeans_codes(KM_CODES[::-1].copy(), (3, 2))
  other.save(tmp_path / "other")
  npz.write_bytes((tmp_path / "other.npz").read_bytes())
  with pytest.raises(SIDTableError, match="do not match"):
    SIDTable.load(tmp_path / "sid_table")
  with pytest.raises(SIDTableError, match="missing.json"):
    SIDTable.load(tmp_path / "missing")


def test_quality_report_hand_computed():
  labels = [None, "a", "a", "b", "c", "c", None]
  r = quality_report(_table(), labels)
  # 5 of 6 items share their first-2-level path; 2 shared paths; largest has 3 items.
  assert r["collision"] == {"rate": 5 / 6, "num_groups": 2, "max_group_size": 3, "num_distinct_paths": 3}
  l1, l2, l3 = r["levels"]
  # level 1: counts (3, 3, 0) of 3 codes -> 2 used, entropy 1 bit.
  assert (l1["used"], l1["codebook_size"]) == (2, 3)
  assert l1["usage"] == pytest.approx(2 / 3)
  assert l1["entropy_bits"] == pytest.approx(1.0)
  assert l1["perplexity"] == pytest.approx(2.0)
  # level 2: counts (5, 1): H = log2 6 - (5/6) log2 5.
  assert l2["usage"] == 1.0
  assert l2["entropy_bits"] == pytest.approx(math.log2(6) - 5 / 6 * math.log2(5))
  # collision level: counts (3, 2, 1): H = log2 6 - (1/2) log2 3 - 1/3.
  assert l3["collision_level"] and l3["codebook_size"] == 3 and l3["used"] == 3
  assert l3["entropy_bits"] == pytest.approx(math.log2(6) - 0.5 * math.log2(3) - 1 / 3)
  # purity: cluster 0 = {a, a, b} -> 2; cluster 1 = {c, c, unlabelled} -> 2; 5 labelled items.
  assert r["level1_purity"] == pytest.approx(4 / 5)
  assert r["label_coverage"] == pytest.approx(5 / 6)
  assert r["num_labels"] == 3
  assert 0 < r["level1_purity_shuffled"] <= 1
  json.dumps(r)  # serialisable


def test_quality_report_without_labels_and_markdown():
  r = quality_report(_table())
  assert r["level1_purity"] is None and r["level1_purity_shuffled"] is None
  md = format_report(r, title="toy")
  assert "### toy" in md and "0.8333" in md and "null" in md
  assert md.count("\n|") == 2 + 3  # header, separator, one row per level
  with pytest.raises(ValueError, match="labels"):
    quality_report(_table(), ["a"] * 3)


def test_heldout_cooccurrence_counts_shared_prefixes():
  # Items 1..4 with 2 k-means levels + collision level.
  codes = np.array([[0, 0, 0], [1, 1, 0], [1, 2, 0], [2, 1, 0], [1, 1, 1]], np.int32)
  table = SIDTable(codes=codes, codebook_sizes=(3, 3, 2), meta={})
  pairs = np.array([[1, 4], [1, 2], [1, 3], [2, 3]])
  h = heldout_cooccurrence(table, pairs, shuffle_seed=0)
  assert h["num_pairs"] == 4
  # depth 1: (1,4) and (1,2) share code 1; depth 2: only (1,4) shares (1, 1).
  assert h["shared_prefix"] == [0.5, 0.25]
  perm = np.random.default_rng(0).permutation(4)
  a, b = codes[pairs[:, 0]], codes[pairs[perm, 1]]
  assert h["shared_prefix_shuffled"] == [float((a[:, 0] == b[:, 0]).mean()),
                                         float(np.all(a[:, :2] == b[:, :2], axis=1).mean())]
  report = quality_report(table, heldout_pairs=pairs)
  assert report["heldout_cooccurrence"] == h
  assert "held-out next item" in format_report(report)
