"""The model artifact: a round trip keeps every part, and a missing, damaged or newer artifact
fails with an error that names the file."""

import json
import os

import numpy as np
import pytest

from oxyjax import artifact as artifact_lib
from oxyjax.artifact import ArtifactError, ModelArtifact
from oxyjax.data import readers
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.sid.table import SIDTable, SIDTableError


def _artifact(num_items=40, titles=True, seed=0):
  rng = np.random.default_rng(seed)
  codes = np.stack([rng.integers(0, 4, num_items), rng.integers(0, 4, num_items), rng.integers(0, 4, num_items)], 1)
  table = SIDTable.from_kmeans_codes(codes, (4, 4, 4))
  cfg = ModelConfig(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                    max_history=5, sid_vocab_sizes=table.codebook_sizes, num_item_embeddings=num_items + 1)
  raw = [""] + [f"item{i:03d}" for i in range(1, num_items + 1)]
  return ModelArtifact(model_config=cfg, sid_table=table, raw_item_ids=raw,
                       item_titles=([""] + [f"Title {i}" for i in range(1, num_items + 1)]) if titles else None,
                       pools={"all": np.arange(1, num_items + 1), "even": np.arange(2, num_items + 1, 2)},
                       dataset="toy", data_fingerprint="abc123", instructions={"scenario": "homepage"})


def test_round_trip_keeps_every_part(tmp_path):
  a = _artifact()
  a.save(str(tmp_path / "artifact"))
  b = ModelArtifact.load(str(tmp_path / "artifact"))
  assert b.model_config == a.model_config  # tuples come back as tuples
  np.testing.assert_array_equal(b.sid_table.codes, a.sid_table.codes)
  assert b.raw_item_ids == a.raw_item_ids and b.item_titles == a.item_titles
  assert set(b.pools) == {"all", "even"} and np.array_equal(b.pools["even"], a.pools["even"])
  assert b.differences(a) == [] and b.content_digest() == a.content_digest()
  assert b.instructions == {"scenario": "homepage"} and b.data_fingerprint == "abc123"
  # The decoder's constraint of a pool holds exactly that pool's items.
  assert sorted(b.trie("even").paths()[1].tolist()) == list(range(2, 41, 2))
  np.testing.assert_array_equal(b.item_indices(["item007", "item001"]), [7, 1])
  assert b.title(7) == "Title 7"
  with pytest.raises(KeyError, match="unknown item id 'nope'"):
    b.item_indices(["item001", "nope"])


def test_an_artifact_written_before_a_config_field_existed_keeps_its_digest(tmp_path):
  """A ModelConfig field added after an artifact was written is absent from its artifact.json:
  it loads with the field's default, its content digest is still the one written (so exported
  bundles and ranking models keyed by it stay valid), and rewriting it keeps that digest; damage
  to what the digest covers is still caught."""
  import dataclasses

  a = _artifact()
  field = "normalize_instruction"  # added in session 18; any field at its default stands in
  old = dataclasses.replace(a, absent_config_fields=(field,))  # what an older oxyjax wrote
  assert field not in old.config_record() and old.content_digest() != a.content_digest()
  path = str(tmp_path / "artifact")
  old.save(path)
  header = json.load(open(os.path.join(path, "artifact.json")))
  assert field not in header["model_config"]
  b = ModelArtifact.load(path)
  assert getattr(b.model_config, field) == getattr(ModelConfig(), field)
  assert b.content_digest() == header["content_digest"] == old.content_digest()
  b.save(str(tmp_path / "again"))
  assert ModelArtifact.load(str(tmp_path / "again")).content_digest() == old.content_digest()
  header["model_config"]["emb_dim"] = 32  # another model under the same digest: refused
  json.dump(header, open(os.path.join(path, "artifact.json"), "w"))
  with pytest.raises(ArtifactError, match="content digest"):
    ModelArtifact.load(path)


def test_from_a_real_dataset_holds_raw_ids_and_titles():
  ds = readers.load_dataset("office")
  rng = np.random.default_rng(0)
  codes = np.stack([rng.integers(0, 64, ds.num_items), rng.integers(0, 64, ds.num_items)], 1)
  table = SIDTable.from_kmeans_codes(codes, (64, 64))
  a = ModelArtifact.from_dataset(ds, table, ModelConfig(sid_vocab_sizes=table.codebook_sizes),
                                 data_fingerprint=readers.dataset_fingerprint("office"))
  i = 5
  assert a.raw_item_ids[i] == ds.raw_item_ids[i] and a.title(i) == (ds.item_meta[i].title or None)
  assert a.pools["all"].tolist() == list(range(1, ds.num_items + 1))
  small = SIDTable.from_kmeans_codes(codes[:-1], (64, 64))
  with pytest.raises(ArtifactError, match=f"{ds.num_items - 1:,} items but dataset 'office' has {ds.num_items:,}"):
    ModelArtifact.from_dataset(ds, small, ModelConfig(), data_fingerprint=None)


def test_differences_name_what_changed():
  a, b = _artifact(), _artifact(seed=1)
  diff = a.differences(b)
  assert any(d.startswith("sid_table") for d in diff)
  c = _artifact()
  c.data_fingerprint = "other"
  assert a.differences(c) == ["data_fingerprint (other -> abc123)"]


@pytest.mark.parametrize("damage, message", [
    ("missing_header", "artifact.json is missing"),
    ("newer_version", "version 99"),
    ("unknown_config_field", "fields this oxyjax does not know: \\['future_knob'\\]"),
    ("missing_items", "items.json"),
    ("items_of_another_run", "content digest"),
])
def test_damaged_artifact_names_the_file(tmp_path, damage, message):
  path = tmp_path / "artifact"
  _artifact().save(str(path))
  header = json.loads((path / "artifact.json").read_text())
  if damage == "missing_header":
    os.remove(path / "artifact.json")
  elif damage == "newer_version":
    header["version"] = 99
  elif damage == "unknown_config_field":
    header["model_config"]["future_knob"] = 1
  elif damage == "missing_items":
    os.remove(path / "items.json")
  elif damage == "items_of_another_run":
    items = json.loads((path / "items.json").read_text())
    items["raw_item_ids"][3] = "someone_else"
    (path / "items.json").write_text(json.dumps(items))
  if damage in ("newer_version", "unknown_config_field"):
    (path / "artifact.json").write_text(json.dumps(header))
  with pytest.raises(ArtifactError, match=message):
    ModelArtifact.load(str(path))


def test_damaged_sid_table_is_named(tmp_path):
  path = tmp_path / "artifact"
  _artifact().save(str(path))
  with open(path / "sid_table.npz", "r+b") as f:
    f.truncate(100)
  with pytest.raises(SIDTableError, match="sid_table.npz"):
    ModelArtifact.load(str(path))


def test_a_failed_save_leaves_the_previous_artifact_and_its_weights(tmp_path, monkeypatch):
  path = tmp_path / "artifact"
  old = _artifact()
  old.save(str(path))
  (path / "params").mkdir()
  (path / "params" / "marker").write_text("weights")
  new = _artifact(seed=1)

  def boom(*a, **k):
    raise OSError("disk full (test)")

  monkeypatch.setattr(artifact_lib.np, "savez", boom)
  with pytest.raises(OSError, match="disk full"):
    new.save(str(path))
  monkeypatch.undo()
  assert ModelArtifact.load(str(path)).differences(old) == []
  assert sorted(os.listdir(tmp_path)) == ["artifact"]  # no temporary directory left behind
  new.save(str(path))  # a complete save replaces it and keeps the weights
  assert ModelArtifact.load(str(path)).differences(new) == []
  assert (path / "params" / "marker").read_text() == "weights"


def test_saving_another_models_artifact_keeps_the_old_one_aside(tmp_path):
  path = tmp_path / "artifact"
  _artifact().save(str(path))
  (path / "params").mkdir()
  (path / "params" / "marker").write_text("old weights")
  other = _artifact(seed=1)
  replaced = other.save(str(path), keep_params=False)
  assert not (path / "params").exists()  # the new model gets no stale weights
  assert ModelArtifact.load(str(path)).differences(other) == []
  assert open(os.path.join(replaced, "params", "marker")).read() == "old weights"  # never deleted
  assert ModelArtifact.load(replaced).differences(_artifact()) == []
