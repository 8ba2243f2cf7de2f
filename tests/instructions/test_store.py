"""InstructionStore: round trip, lookups, crash safety, corruption errors, refresh policy."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from oxyjax.instructions import prompt as prompt_lib
from oxyjax.instructions import store as store_lib
from oxyjax.instructions.store import InstructionRecord, InstructionStore, needs_refresh, record_key


def _records(dataset, examples, *, created_at=1000.0, status="generated", text="needs glue",
             version="m1", max_items=5):
  out = []
  for i, ex in enumerate(examples):
    key = record_key(dataset, ex)
    emb = np.full((384,), i + 1, np.float32)
    ck = prompt_lib.context_key(prompt_lib.context_for_example(dataset, ex, max_items=max_items))
    out.append(InstructionRecord(dataset=key[0], user=key[1], cutoff=key[2], scenario=key[3],
                                 history_key=key[4], text=f"{text} {i}", embedding=emb,
                                 model_version=version, created_at=created_at, context_key=ck,
                                 status=status, max_items=max_items))
  return out


def test_round_trip_and_lookup(tmp_path, tiny_dataset):
  exs = tiny_dataset.test[:6]
  st = InstructionStore(tmp_path / "s")
  st.put(_records(tiny_dataset, exs[:3], created_at=1000.0))
  st.put(_records(tiny_dataset, exs[3:4], created_at=100.0))  # will be stale
  st.put(_records(tiny_dataset, exs[4:5], status="fallback"))
  again = InstructionStore(tmp_path / "s")
  assert len(again) == 5
  r = again.get_for_example(tiny_dataset, exs[1])
  assert r.text == "needs glue 1" and r.model_version == "m1" and r.created_at == 1000.0
  assert r.embedding.dtype == np.float32 and r.embedding.shape == (384,)
  assert again.get(*record_key(tiny_dataset, exs[0])).text == "needs glue 0"
  emb, present, stats = again.lookup_embeddings(tiny_dataset, exs, "homepage", now=1500.0, max_age_s=600)
  assert emb.shape == (6, 384) and emb.dtype == np.float32
  assert present.tolist() == [True, True, True, False, False, False]
  assert stats == {"generated": 3, "missing": 1, "stale": 1, "fallback": 1}
  np.testing.assert_array_equal(emb[1], np.full(384, 2, np.float32))
  assert not emb[3:].any()
  # a later write of the same key wins
  again.put(_records(tiny_dataset, exs[:1], text="updated"))
  assert InstructionStore(tmp_path / "s").get_for_example(tiny_dataset, exs[0]).text == "updated 0"


def test_crash_during_shard_write_keeps_previous(tmp_path, tiny_dataset, monkeypatch):
  exs = tiny_dataset.test[:4]
  st = InstructionStore(tmp_path)
  st.put(_records(tiny_dataset, exs[:2]))

  def partial_savez(f, **arrays):
    f.write(b"PK\x03\x04 half a zip")
    raise OSError("simulated crash while writing the shard")

  monkeypatch.setattr(store_lib.np, "savez", partial_savez)
  with pytest.raises(OSError, match="simulated crash"):
    st.put(_records(tiny_dataset, exs[2:]))
  monkeypatch.undo()
  fresh = InstructionStore(tmp_path)
  assert len(fresh) == 2 and fresh.get_for_example(tiny_dataset, exs[0]).text == "needs glue 0"


def test_crash_before_manifest_publish_keeps_previous(tmp_path, tiny_dataset, monkeypatch):
  exs = tiny_dataset.test[:4]
  st = InstructionStore(tmp_path)
  st.put(_records(tiny_dataset, exs[:2]))
  real_replace = os.replace

  def replace(src, dst):
    if str(dst).endswith(store_lib.MANIFEST):
      raise OSError("simulated crash before publishing the manifest")
    return real_replace(src, dst)

  monkeypatch.setattr(store_lib.os, "replace", replace)
  with pytest.raises(OSError, match="simulated crash"):
    st.put(_records(tiny_dataset, exs[2:]))
  monkeypatch.undo()
  fresh = InstructionStore(tmp_path)  # the new shard exists on disk but is not listed
  assert len(fresh) == 2
  fresh.put(_records(tiny_dataset, exs[2:]))  # the next write succeeds
  assert len(InstructionStore(tmp_path)) == 4


def test_stray_temp_files_are_ignored(tmp_path, tiny_dataset):
  st = InstructionStore(tmp_path)
  st.put(_records(tiny_dataset, tiny_dataset.test[:2]))
  (tmp_path / "shard-00001.npz.999.tmp").write_bytes(b"garbage from a killed writer")
  (tmp_path / "manifest.json.999.tmp").write_text("{not json")
  fresh = InstructionStore(tmp_path)
  assert len(fresh) == 2
  fresh.put(_records(tiny_dataset, tiny_dataset.test[2:3]))
  assert len(InstructionStore(tmp_path)) == 3
  fresh.compact()
  assert not list(tmp_path.glob("*.tmp"))
  assert len(InstructionStore(tmp_path)) == 3 and len(list(tmp_path.glob("shard-*.npz"))) == 1


def test_corrupt_files_raise_naming_the_file(tmp_path, tiny_dataset):
  st = InstructionStore(tmp_path)
  st.put(_records(tiny_dataset, tiny_dataset.test[:2]))
  shard = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["shards"][0]
  shard.write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="shard-00000.npz"):
    InstructionStore(tmp_path)
  (tmp_path / "manifest.json").write_text("{broken")
  with pytest.raises(ValueError, match="manifest.json"):
    InstructionStore(tmp_path)


def test_refresh_policy():
  rec = InstructionRecord(dataset="d", user="u", cutoff=3, scenario="homepage", history_key="h",
                          text="t", embedding=np.zeros(384, np.float32), model_version="m",
                          created_at=1000.0, context_key="abc")
  assert needs_refresh(None, "abc", 1000.0, 300)
  assert not needs_refresh(rec, "abc", 1200.0, 300)  # same context, young enough
  assert needs_refresh(rec, "abc", 1301.0, 300)  # too old
  assert needs_refresh(rec, "xyz", 1001.0, 300)  # context changed
  assert not needs_refresh(rec, "abc", 1e12, None)  # no age limit


def _retitled(dataset, item, title):
  meta = list(dataset.item_meta)
  meta[item] = dataclasses.replace(meta[item], title=title)
  return dataclasses.replace(dataset, item_meta=meta)


def test_lookup_does_not_serve_records_whose_source_changed(tmp_path, tiny_dataset):
  """A record is served only while the context it was generated from still matches the data:
  after an item's title changes, the records whose prompt showed that item count as stale."""
  exs = tiny_dataset.test[:6]
  st = InstructionStore(tmp_path / "s")
  st.put(_records(tiny_dataset, exs[:3]))
  st.put(_records(tiny_dataset, exs[3:], max_items=2))  # prompts that showed 2 items
  assert st.lookup_embeddings(tiny_dataset, exs, now=1000.0)[1].all()
  # Retitle the most recent history item of example 0, and the oldest item of example 3 (which
  # its 2-item prompt did not show).
  edited = _retitled(tiny_dataset, exs[0].history[-1], "a different product")
  edited = _retitled(edited, exs[3].history[0], "another different product")
  retitled = {exs[0].history[-1], exs[3].history[0]}
  shown = [ex.history[-(5 if i < 3 else 2):] for i, ex in enumerate(exs)]
  affected = {i for i in range(6) if retitled & set(shown[i])}
  assert 0 in affected and 3 not in affected and len(affected) < 6
  again = InstructionStore(tmp_path / "s")
  emb, present, stats = again.lookup_embeddings(edited, exs, now=1000.0)
  assert np.flatnonzero(~present).tolist() == sorted(affected)
  assert stats == {"generated": 6 - len(affected), "missing": 0, "stale": len(affected), "fallback": 0}
  assert not emb[~present].any()
  # The same key with a regenerated record (current context) is served again.
  again.put(_records(edited, exs[:1]))
  assert again.lookup_embeddings(edited, exs[:1], now=1000.0)[1].all()


def test_shards_without_max_items_read_as_the_default(tmp_path, tiny_dataset):
  st = InstructionStore(tmp_path)
  st.put(_records(tiny_dataset, tiny_dataset.test[:2]))
  shard = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["shards"][0]
  with np.load(shard) as z:
    arrays = {k: z[k] for k in z.files if k != "max_items"}
  np.savez(shard, **arrays)  # a shard written before the field existed
  old = InstructionStore(tmp_path)
  assert {r.max_items for r in old.records()} == {store_lib.DEFAULT_MAX_ITEMS}
  assert old.lookup_embeddings(tiny_dataset, tiny_dataset.test[:2], now=1000.0)[1].all()
