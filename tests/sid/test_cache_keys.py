"""SID tables and item embeddings are keyed by the content they were built from (issue 13).

The base case: a SID table cached for one `Beauty.txt` must not be served for another (before
this was fixed, a 12,101-row table served an 11,924-item dataset, with no message). The data
here is a tiny synthetic `amazon2014/Beauty.txt` in a temporary `OXYJAX_DATA_DIR`, and the
default cache root (`<repo>/.cache/sid`) is redirected to the temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from oxyjax.data import readers
from oxyjax.sid import build
from oxyjax.sid import table as table_lib
from oxyjax.sid.table import SIDTable

SETTINGS = dict(num_levels=2, codebook_size=4, embedding="collaborative", balance="residual", seed=0)


def _write_beauty(data_dir: Path, num_items: int, seed: int = 0) -> Path:
  """80 users of 6 random items each, plus one user who bought every item (so all appear)."""
  rng = np.random.default_rng(seed)
  lines = [" ".join(map(str, [u, *rng.choice(np.arange(1, num_items + 1), size=6, replace=False)]))
           for u in range(1, 81)]
  lines.append(" ".join(map(str, [999, *range(1, num_items + 1)])))
  path = data_dir / "amazon2014" / "Beauty.txt"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture
def env(tmp_path, monkeypatch):
  """A temporary OXYJAX_DATA_DIR with a 40-item Beauty.txt, the SID cache root under tmp_path,
  and a counter of the builds."""
  data = tmp_path / "data"
  _write_beauty(data, 40)
  monkeypatch.setenv("OXYJAX_DATA_DIR", str(data))
  monkeypatch.setattr(build, "_REPO_ROOT", tmp_path / "repo")
  readers.clear_cache()
  builds = []
  real = build.build_with_report

  def counting(*a, **kw):
    builds.append(a[0] if a else kw.get("dataset_name"))
    return real(*a, **kw)

  monkeypatch.setattr(build, "build_with_report", counting)
  yield dataclasses.make_dataclass("Env", ["data", "root", "builds"])(data, tmp_path / "repo" / ".cache" / "sid",
                                                                      builds)
  readers.clear_cache()


def test_default_cache_is_keyed_by_the_data(env):
  t1 = build.load_or_build_sid_table("beauty", **SETTINGS)
  assert t1.num_items == 40 and len(env.builds) == 1
  fp1 = readers.dataset_fingerprint("beauty")
  again = build.load_or_build_sid_table("beauty", **SETTINGS)  # same data: the cache, no build
  assert len(env.builds) == 1 and np.array_equal(again.codes, t1.codes)

  # Edit the file (more items): a new table, in its own cache directory; never the old one.
  _write_beauty(env.data, 50)
  t2 = build.load_or_build_sid_table("beauty", **SETTINGS)
  assert t2.num_items == 50 == readers.load_dataset("beauty").num_items
  assert len(env.builds) == 2
  assert t1.meta["dataset_fingerprint"] == fp1 and t1.meta["settings"]["codebook_size"] == 4
  assert t2.meta["dataset_fingerprint"] == readers.dataset_fingerprint("beauty") != fp1
  assert len([p for p in env.root.iterdir() if p.name.startswith(f"beauty_{fp1}_")]) == 1
  assert len([p for p in env.root.iterdir() if p.name.startswith("beauty_")]) == 2

  # Another data directory with the first file's bytes: the first cache again (content, not path).
  other = env.data.parent / "other_data"
  _write_beauty(other, 40)
  t3 = build.load_or_build_sid_table("beauty", **SETTINGS, data_dir=other)
  assert len(env.builds) == 2 and np.array_equal(t3.codes, t1.codes)


def test_table_of_other_data_is_refused_naming_file_data_and_mismatch(env, tmp_path):
  cache = tmp_path / "my_cache"
  t1 = build.load_or_build_sid_table("beauty", **SETTINGS, cache_dir=cache)
  assert t1.num_items == 40
  _write_beauty(env.data, 50)
  fp2 = readers.dataset_fingerprint("beauty")
  # An explicit cache directory is not keyed by the data: its table is checked, and refused.
  with pytest.raises(build.SIDTableMismatch) as e:
    build.load_or_build_sid_table("beauty", **SETTINGS, cache_dir=cache)
  msg = str(e.value)
  assert str(cache / "sid_table.json") in msg and "'beauty'" in msg and "Beauty.txt" in msg
  assert "40 rows for 50 items" in msg and fp2 in msg and t1.meta["dataset_fingerprint"] in msg
  # A table given by path: the same check.
  with pytest.raises(ValueError, match=r"sid_table\.npz.*40 rows for 50 items"):
    build.load_or_build_sid_table("beauty", **SETTINGS, path=cache / "sid_table.npz")
  # Same number of items, other content: the fingerprint still tells them apart.
  _write_beauty(env.data, 40, seed=1)
  with pytest.raises(ValueError, match="built from data with fingerprint"):
    build.load_or_build_sid_table("beauty", **SETTINGS, path=cache / "sid_table")
  # A hand-made table without provenance is checked on its rows only (and then accepted).
  bare = SIDTable(codes=t1.codes, codebook_sizes=t1.codebook_sizes)
  bare.save(tmp_path / "bare" / "t")
  assert build.load_or_build_sid_table("beauty", **SETTINGS, path=tmp_path / "bare" / "t").num_items == 40


def test_explicit_cache_dir_with_other_settings_is_refused(env, tmp_path):
  cache = tmp_path / "my_cache"
  build.load_or_build_sid_table("beauty", **SETTINGS, cache_dir=cache)
  with pytest.raises(build.SIDTableMismatch, match=r"seed 0 \(wanted 1\)"):
    build.load_or_build_sid_table("beauty", **{**SETTINGS, "seed": 1}, cache_dir=cache)
  # The default cache keys every setting: another seed is another table.
  build.load_or_build_sid_table("beauty", **SETTINGS)
  build.load_or_build_sid_table("beauty", **{**SETTINGS, "seed": 1})
  assert len([p for p in env.root.iterdir() if p.name.startswith("beauty_")]) == 2


def test_tree_quantizer_is_its_own_cached_table(env):
  residual = build.load_or_build_sid_table("beauty", **SETTINGS)
  tree = build.load_or_build_sid_table("beauty", **SETTINGS, quantizer="tree")
  assert len(env.builds) == 2 and len([p for p in env.root.iterdir() if p.is_dir()]) == 2
  assert tree.meta["method"] == "tree-kmeans+collision-level" and tree.meta["settings"]["quantizer"] == "tree"
  assert "quantizer" not in residual.meta["settings"]
  assert len(np.unique(tree.codes[1:], axis=0)) == 40  # the collision level makes every path unique
  assert np.array_equal(build.load_or_build_sid_table("beauty", **SETTINGS, quantizer="tree").codes, tree.codes)
  assert len(env.builds) == 2  # served from its cache


def test_half_written_cache_is_rebuilt_and_a_good_one_is_kept(env, monkeypatch):
  real_savez = table_lib.np.savez

  def crash(f, **arrays):
    f.write(b"PK\x03\x04 half a zip")
    raise OSError("simulated crash while writing the SID table")

  monkeypatch.setattr(table_lib.np, "savez", crash)
  with pytest.raises(OSError, match="simulated crash"):
    build.load_or_build_sid_table("beauty", **SETTINGS)
  monkeypatch.setattr(table_lib.np, "savez", real_savez)
  (d,) = [p for p in env.root.iterdir() if p.is_dir()]
  assert not (d / "sid_table.npz").exists() and not (d / "sid_table.json").exists()
  assert not list(d.glob("*.tmp"))
  t = build.load_or_build_sid_table("beauty", **SETTINGS)  # rebuilt cleanly
  assert t.num_items == 40 and len(env.builds) == 2
  good = (d / "sid_table.npz").read_bytes(), (d / "sid_table.json").read_bytes()

  # A codes file from another save (or a torn copy) next to the header: rebuilt, with a warning.
  (d / "sid_table.npz").write_bytes(b"not a zip")
  assert np.array_equal(build.load_or_build_sid_table("beauty", **SETTINGS).codes, t.codes)
  assert len(env.builds) == 3
  assert ((d / "sid_table.npz").read_bytes(), (d / "sid_table.json").read_bytes()) == good
  # A good cache is served as it is, not rewritten.
  stamp = (d / "sid_table.json").stat().st_mtime_ns
  build.load_or_build_sid_table("beauty", **SETTINGS)
  assert len(env.builds) == 3 and (d / "sid_table.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- text embeddings


@dataclasses.dataclass
class _TextDataset:
  name: str
  num_items: int
  train: list
  item_meta: list

  def item_text(self, i):
    return f"Title: {self.item_meta[i]['title']}. Brand: {self.item_meta[i]['brand']}."


class _FakeEncoder:
  calls = 0

  def __init__(self, max_length=256):
    self.dim = 384

  def encode(self, texts, batch_size=32):
    _FakeEncoder.calls += 1
    out = np.stack([np.random.default_rng(len(t)).normal(size=384) for t in texts])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_text_embedding_cache_is_keyed_by_texts_and_encoder_version(tmp_path, monkeypatch):
  monkeypatch.setattr(build.emb_lib, "SentenceEncoder", _FakeEncoder)
  _FakeEncoder.calls = 0
  ds = _TextDataset("fake", 12, [], [None] + [{"title": f"item {i}", "brand": f"b{i % 3}"} for i in range(1, 13)])
  kw = dict(num_levels=1, codebook_size=3, dataset=ds, out_dir=tmp_path, num_iters=5)
  build.build_with_report("fake", **kw)
  build.build_with_report("fake", **kw)
  assert _FakeEncoder.calls == 1  # cached
  # Another version of the encoder's package: the cache is not reused.
  monkeypatch.setattr(build, "_package_version", lambda name: "999.0")
  build.build_with_report("fake", **kw)
  assert _FakeEncoder.calls == 2
  record = json.loads((tmp_path / "item_embeddings.json").read_text())
  assert record["encoder_package"] == build.TEXT_ENCODER_PACKAGE and record["encoder_package_version"] == "999.0"
