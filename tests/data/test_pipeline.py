"""ExampleArrays, BatchIterator (determinism, resume, host sharding), eval batches."""

import json
import subprocess
import sys

import numpy as np
import pytest

from oxyjax.data import pipeline
from oxyjax.data.pipeline import BatchIterator, ExampleArrays, eval_batches
from oxyjax.data.readers import Example

from .conftest import REPO


def make_arrays(n=103, h=4):
    rng = np.random.default_rng(0)
    lens = rng.integers(1, h + 1, size=n)
    hist = np.zeros((n, h), np.int32)
    for i, L in enumerate(lens):
        hist[i, :L] = rng.integers(1, 50, size=L)
    return ExampleArrays(hist, lens, np.arange(1, n + 1), np.arange(n) + 1000, np.zeros(n))


def test_examples_to_arrays_keeps_most_recent_left_aligned():
    ex = [Example(1, (5, 6, 7, 8), 9), Example(2, (3,), 4)]
    a = pipeline.examples_to_arrays(ex, max_history=3)
    np.testing.assert_array_equal(a.history, [[6, 7, 8], [3, 0, 0]])
    np.testing.assert_array_equal(a.history_len, [3, 1])
    np.testing.assert_array_equal(a.target, [9, 4])
    np.testing.assert_array_equal(a.user, [1, 2])
    assert a.history.dtype == np.int32 and len(a) == 2
    t = a.take([1])
    assert len(t) == 1 and t.target[0] == 4


def test_load_split_readers(tiny2014):
    a = pipeline.load_split("beauty", "valid", 2, source="readers", data_dir=tiny2014)
    np.testing.assert_array_equal(a.history, [[1, 2], [5, 0], [8, 3]])
    np.testing.assert_array_equal(a.history_len, [2, 1, 2])
    np.testing.assert_array_equal(a.target, [3, 6, 9])


def _batches(it, k):
    return [next(it) for _ in range(k)]


def _same(xs, ys):
    return len(xs) == len(ys) and all(x.equals(y) for x, y in zip(xs, ys))


def test_iterator_deterministic_and_epochs():
    arrays = make_arrays()
    a = _batches(BatchIterator(arrays, 10, seed=3), 25)
    b = _batches(BatchIterator(arrays, 10, seed=3), 25)
    c = _batches(BatchIterator(arrays, 10, seed=4), 25)
    assert _same(a, b) and not _same(a, c)
    assert all(len(x) == 10 for x in a)
    # 10 batches per epoch (3 examples dropped), each example at most once per epoch
    epoch0 = np.concatenate([x.target for x in a[:10]])
    epoch1 = np.concatenate([x.target for x in a[10:20]])
    assert len(set(epoch0)) == 100 and len(set(epoch1)) == 100
    assert not np.array_equal(epoch0, epoch1)
    it = BatchIterator(arrays, 10, seed=3)
    _batches(it, 10)
    assert it.state() == {"seed": 3, "epoch": 1, "position": 0,
                          "global_batch_size": 10, "num_examples": 103}


@pytest.mark.parametrize("k", [0, 4, 10, 13])
def test_iterator_restore_mid_epoch(k):
    arrays = make_arrays()
    ref = _batches(BatchIterator(arrays, 10, seed=7), 25)
    it = BatchIterator(arrays, 10, seed=7)
    _batches(it, k)
    state = json.loads(json.dumps(it.state()))
    resumed = BatchIterator(arrays, 10, seed=0)  # seed comes from the state
    resumed.restore(state)
    assert _same(_batches(resumed, 25 - k), ref[k:])


def test_iterator_restore_rejects_other_shape():
    arrays = make_arrays()
    state = BatchIterator(arrays, 10).state()
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchIterator(arrays, 20).restore(state)


def test_host_sharding_concatenates_to_single_process():
    arrays = make_arrays()
    one = BatchIterator(arrays, 12, seed=1)
    hosts = [BatchIterator(arrays, 12, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(20):  # crosses epoch boundaries (8 batches per epoch)
        g = next(one)
        parts = [next(h) for h in hosts]
        assert all(len(p) == 6 for p in parts)
        assert ExampleArrays.concatenate(parts).equals(g)
    # resume one host from the other's state: same position in the global order
    h = BatchIterator(arrays, 12, seed=1, process_index=1, process_count=2)
    h.restore(hosts[0].state())
    nxt = next(one)
    assert h.state()["epoch"] == one.state()["epoch"]
    assert next(h).equals(nxt.take(np.arange(6, 12)))


def test_eval_batches_pad_and_mask():
    arrays = make_arrays(n=23)
    out = list(eval_batches(arrays, 10))
    assert len(out) == 3
    batch, mask = out[-1]
    assert len(batch) == 10 and mask.sum() == 3 and mask[:3].all()
    assert (batch.history[3:] == 0).all() and (batch.target[3:] == 0).all()
    full = ExampleArrays.concatenate([b for b, _ in out])
    m = np.concatenate([m for _, m in out])
    assert full.take(np.flatnonzero(m)).equals(arrays)
    two = [list(eval_batches(arrays, 10, process_index=i, process_count=2)) for i in range(2)]
    for (b, m), (b0, m0), (b1, m1) in zip(out, *two):
        assert ExampleArrays.concatenate([b0, b1]).equals(b)
        np.testing.assert_array_equal(np.concatenate([m0, m1]), m)


def test_no_tensorflow_on_import():
    code = (
        "import sys; import oxyjax.data.pipeline as p, oxyjax.data.readers;"
        "p.ExampleArrays.zeros(2, 3);"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported';"
        "assert 'seqio' not in sys.modules; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
