"""The data fingerprint and the prepared TFDS data follow the raw files' content (issue 13)."""

import os
import shutil

import pytest

from oxyjax.data import pipeline, readers

from .conftest import write_2014


def test_fingerprint_follows_the_bytes_not_the_path(tiny2014, tmp_path):
    readers.clear_cache()
    f = tiny2014 / "amazon2014" / "Beauty.txt"
    fp = readers.dataset_fingerprint("beauty", tiny2014)
    assert len(fp) == 16 and readers.dataset_fingerprint("oxyjax_beauty", tiny2014) == fp
    copy = tmp_path / "copy"
    shutil.copytree(tiny2014, copy)
    assert readers.dataset_fingerprint("beauty", copy) == fp  # same bytes elsewhere
    # An in-place edit of the same size (and a different mtime) is seen through the memo.
    st = f.stat()
    f.write_bytes(f.read_bytes().replace(b"1 10 11 12 13", b"1 10 11 12 14"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert f.stat().st_size == st.st_size
    assert readers.dataset_fingerprint("beauty", tiny2014) != fp
    with pytest.raises(readers.DataError, match="file not found"):
        readers.dataset_fingerprint("sports", tiny2014)


def test_seqio_source_follows_raw_data_edits(tiny2014, tmp_path):
    """The seqio path in one process: after an edit it reads the new data, not the old records."""
    pytest.importorskip("seqio")
    cache = tmp_path / "tfds"
    before = pipeline.load_split("beauty", "train", 4, data_dir=tiny2014, tfds_dir=cache)
    assert len(before) == 3
    write_2014(tiny2014 / "amazon2014" / "Beauty.txt", ["1 10 11 12 13 14"])
    for split in readers.SPLITS:
        s = pipeline.load_split("beauty", split, 4, data_dir=tiny2014, tfds_dir=cache)
        r = pipeline.load_split("beauty", split, 4, source="readers", data_dir=tiny2014)
        assert s.equals(r), split
    assert len(pipeline.load_split("beauty", "train", 4, data_dir=tiny2014, tfds_dir=cache)) == 2


def test_prepared_data_of_other_raw_files_is_refused(tiny2014, tmp_path):
    """A prepared directory whose records come from other raw files (copied or renamed by hand)
    is refused, naming the directory, instead of being served."""
    pytest.importorskip("seqio")
    from oxyjax.data import tfds_builders

    cache = tmp_path / "tfds"
    old = tfds_builders.prepare("beauty", data_dir=tiny2014, tfds_dir=cache)
    old_root = tfds_builders.prepared_dir("beauty", tiny2014, cache)
    write_2014(tiny2014 / "amazon2014" / "Beauty.txt", ["1 10 11 12 13 14"])
    new_root = tfds_builders.prepared_dir("beauty", tiny2014, cache)
    assert new_root != old_root and old.info.metadata["fingerprint"] in old_root.name
    shutil.copytree(old_root, new_root)  # the old records under the new data's name
    with pytest.raises(ValueError, match=f"{new_root.name}.*other raw files"):
        tfds_builders.prepare("beauty", data_dir=tiny2014, tfds_dir=cache)
