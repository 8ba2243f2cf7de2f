"""TFDS builders and seqio tasks agree with the readers fast path."""

import os

import numpy as np
import pytest

from oxyjax.data import pipeline, readers

from .conftest import REAL_DATA, write_2014

pytest.importorskip("seqio")


def test_tfds_prepare_reuse_and_rebuild(tiny2014, tmp_path):
    from oxyjax.data import tfds_builders

    cache = tmp_path / "tfds"
    b = tfds_builders.prepare("beauty", data_dir=tiny2014, tfds_dir=cache)
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        "train": 3, "validation": 3, "test": 3}
    assert b.info.metadata["num_items"] == 10
    first = next(b.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
    assert first["history"].tolist() == [1, 2, 3] and first["target"] == 4
    assert first["user"] == 1 and first["scenario"] == 0
    stamp = os.path.getmtime(b.data_dir)
    b2 = tfds_builders.prepare("beauty", data_dir=tiny2014, tfds_dir=cache)
    assert b2.data_dir == b.data_dir and os.path.getmtime(b.data_dir) == stamp  # reused

    # the seqio path with custom dirs equals the readers path, and truncates to the tail
    for split in readers.SPLITS:
        s = pipeline.load_split("beauty", split, 2, data_dir=tiny2014, tfds_dir=cache)
        r = pipeline.load_split("beauty", split, 2, source="readers", data_dir=tiny2014)
        assert s.equals(r), split

    # editing the raw data prepares a fresh directory
    write_2014(tiny2014 / "amazon2014" / "Beauty.txt", ["1 10 11 12 13 14"])
    readers.clear_cache()
    b3 = tfds_builders.prepare("beauty", data_dir=tiny2014, tfds_dir=cache)
    assert b3.data_dir != b.data_dir and b3.info.splits["train"].num_examples == 2
    assert len(list(cache.iterdir())) >= 2


@pytest.mark.skipif(not (REAL_DATA / "amazon2018").exists(), reason="no real data")
def test_seqio_task_matches_readers_industrial():
    from oxyjax.data import tasks

    task = tasks.get_task("industrial")
    assert task.name == "oxyjax_industrial"
    assert task.output_features["history"].vocabulary.vocab_size == 3687
    assert task.output_features["target"].add_eos is False
    for split in readers.SPLITS:
        for h in (10, 3):
            s = pipeline.load_split("oxyjax_industrial", split, h)
            r = pipeline.load_split("industrial", split, h, source="readers")
            assert len(s) == len(r) > 4000 or split == "train"
            assert s.equals(r), (split, h)
    assert len(r) > 0 and np.all(r.history_len >= 1)


def test_all_tasks_registered():
    import seqio

    from oxyjax.data import tasks  # noqa: F401

    for name in ("oxyjax_beauty", "oxyjax_sports", "oxyjax_industrial", "oxyjax_office"):
        assert name in seqio.TaskRegistry.names()
