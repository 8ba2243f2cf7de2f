"""The near-line job on Apache Beam (DirectRunner) writes the same store records as the
one-machine command, skips fresh records, survives a down backend, and a job that dies before
its publish step leaves the store as it was."""

from __future__ import annotations

import io

import numpy as np
import pytest

from oxyjax.instructions import beam_job
from oxyjax.instructions.generate import run_job, select_examples
from oxyjax.instructions.store import InstructionStore
from tests.instructions.conftest import DownBackend, EchoBackend, HashEncoder, make_dataset

OPTIONS = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"]


def _records(store):
  """Everything of a record but its creation time, by key."""
  return {r.key: (r.text, r.status, r.context_key, r.model_version, r.max_items, r.embedding.tobytes())
          for r in store.records()}


def _examples():
  ds = make_dataset()
  # test + validation + half the training examples: 12 + 12 + 24 examples; test and
  # validation of one user have different histories, so 48 distinct keys minus duplicates.
  return select_examples(ds, ["test", "validation"], train_fraction=0.5, seed=1)


def _beam(path, backend=EchoBackend, **kw):
  return beam_job.run_pipeline(make_dataset, _examples(), str(path), backend_fn=backend, encoder_fn=HashEncoder,
                               batch_size=5, pipeline_options=OPTIONS, **kw)


def test_beam_pipeline_writes_the_same_records_as_the_one_machine_job(tmp_path):
  ds, examples = make_dataset(), _examples()
  one = InstructionStore(tmp_path / "one")
  want = run_job(ds, examples, one, EchoBackend(), HashEncoder(), batch_size=5, chunk_size=7,
                 progress_stream=io.StringIO())
  got = _beam(tmp_path / "beam")
  a, b = _records(InstructionStore(tmp_path / "one")), _records(InstructionStore(tmp_path / "beam"))
  assert len(a) == want.generated + want.fallback > 20
  assert a == b
  assert (got.selected, got.generated, got.fallback, got.failed) == (want.selected, want.generated,
                                                                     want.fallback, want.failed)
  # The staging directory is gone; only shards and the manifest are left.
  assert sorted(p.name for p in (tmp_path / "beam").iterdir() if not p.name.startswith("shard-")) == ["manifest.json"]

  # A second run finds every record fresh and writes nothing.
  again = _beam(tmp_path / "beam")
  assert again.fresh == len(a) and again.generated == 0
  assert _records(InstructionStore(tmp_path / "beam")) == b


def test_backend_down_writes_nothing_and_the_store_keeps_its_records(tmp_path):
  _beam(tmp_path)
  before = _records(InstructionStore(tmp_path))
  stats = _beam(tmp_path, backend=DownBackend, max_age_s=0.0)  # every record is now too old: all retried
  assert stats.failed == len(before) and stats.generated == 0
  assert _records(InstructionStore(tmp_path)) == before


def test_a_job_that_dies_before_publishing_changes_nothing(tmp_path, monkeypatch):
  _beam(tmp_path)
  before = _records(InstructionStore(tmp_path))

  def die(self, files):
    raise KeyboardInterrupt("killed before the publish step")

  monkeypatch.setattr(InstructionStore, "publish", die)
  with pytest.raises(KeyboardInterrupt):
    _beam(tmp_path, max_age_s=0.0)  # would regenerate (and change) every record
  assert _records(InstructionStore(tmp_path)) == before


def test_publish_refuses_a_bad_shard_before_the_manifest_changes(tmp_path):
  _beam(tmp_path / "s")
  store = InstructionStore(tmp_path / "s")
  before = _records(store)
  bad = tmp_path / "bad.npz"
  np.savez(bad, dataset=np.array(["x"]))
  with pytest.raises(ValueError, match="missing field"):
    store.publish([bad])
  assert _records(InstructionStore(tmp_path / "s")) == before
