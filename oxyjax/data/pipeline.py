"""Split -> numpy ``ExampleArrays``; deterministic, checkpointable, host-sharded batches.

Importing this module does not import TensorFlow: the seqio path (``source="seqio"``)
imports :mod:`oxyjax.data.tasks` on first use; ``source="readers"`` never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from oxyjax.data import readers

__all__ = [
    "ExampleArrays",
    "examples_to_arrays",
    "load_split",
    "BatchIterator",
    "MixtureBatchIterator",
    "eval_batches",
    "num_eval_batches",
]

_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_FIELDS = ("history", "history_len", "target", "user", "scenario")


@dataclasses.dataclass
class ExampleArrays:
    """One row per example (see docs/design.md, "Item indices").

    history      [N, H] int32  left-aligned, oldest first, the most recent H items, 0-padded
    history_len  [N]    int32  number of valid entries of ``history`` (<= H)
    target       [N]    int32  item index (0 only in padding rows)
    user         [N]    int32  dense user index (0 only in padding rows)
    scenario     [N]    int32
    extras       {name: [N, ...]}  optional per-example features carried along with the rows
                 (e.g. ``instruction_embedding`` [N, 384], ``instruction_mask`` [N])
    """

    history: np.ndarray
    history_len: np.ndarray
    target: np.ndarray
    user: np.ndarray
    scenario: np.ndarray
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for f in _FIELDS:
            setattr(self, f, np.asarray(getattr(self, f), dtype=np.int32))
        if self.history.ndim != 2:
            raise ValueError(f"history must be [N, H], got shape {self.history.shape}")
        n = self.history.shape[0]
        for f in _FIELDS[1:]:
            a = getattr(self, f)
            if a.shape != (n,):
                raise ValueError(f"{f} must have shape ({n},), got {a.shape}")
        self.extras = {k: np.asarray(v) for k, v in self.extras.items()}
        for k, v in self.extras.items():
            if k in _FIELDS or v.shape[:1] != (n,):
                raise ValueError(f"extra feature {k!r} must have {n} rows and not shadow a field, got {v.shape}")

    def __len__(self) -> int:
        return int(self.history.shape[0])

    @property
    def max_history(self) -> int:
        return int(self.history.shape[1])

    def take(self, indices) -> "ExampleArrays":
        idx = np.asarray(indices, dtype=np.int64)
        return ExampleArrays(**{f: np.take(getattr(self, f), idx, axis=0) for f in _FIELDS},
                             extras={k: np.take(v, idx, axis=0) for k, v in self.extras.items()})

    def with_extras(self, **extras: np.ndarray) -> "ExampleArrays":
        """A copy with more per-example features (e.g. the reasoning-instruction embedding)."""
        return ExampleArrays(**{f: getattr(self, f) for f in _FIELDS}, extras={**self.extras, **extras})

    def as_dict(self) -> dict[str, np.ndarray]:
        return {**{f: getattr(self, f) for f in _FIELDS}, **self.extras}

    @classmethod
    def zeros(cls, n: int, max_history: int) -> "ExampleArrays":
        z = np.zeros((n,), np.int32)
        return cls(np.zeros((n, max_history), np.int32), z, z.copy(), z.copy(), z.copy())

    @classmethod
    def concatenate(cls, parts: Sequence["ExampleArrays"]) -> "ExampleArrays":
        if not parts:
            raise ValueError("nothing to concatenate")
        keys = set(parts[0].extras)
        if any(set(p.extras) != keys for p in parts):
            raise ValueError("cannot concatenate ExampleArrays with different extra features")
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS},
                   extras={k: np.concatenate([p.extras[k] for p in parts]) for k in keys})

    def equals(self, other: "ExampleArrays") -> bool:
        return (all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _FIELDS)
                and set(self.extras) == set(other.extras)
                and all(np.array_equal(v, other.extras[k]) for k, v in self.extras.items()))


def examples_to_arrays(
    examples: Sequence[readers.Example], max_history: int, scenario: int = 0
) -> ExampleArrays:
    """Reader examples -> ``ExampleArrays`` keeping the most recent ``max_history`` items."""
    if max_history <= 0:
        raise ValueError(f"max_history must be positive, got {max_history}")
    n = len(examples)
    out = ExampleArrays.zeros(n, max_history)
    hist, hlen = out.history, out.history_len
    for i, ex in enumerate(examples):
        h = ex.history[-max_history:]
        hist[i, : len(h)] = h
        hlen[i] = len(h)
    if n:
        out.target[:] = [ex.target for ex in examples]
        out.user[:] = [ex.user for ex in examples]
    out.scenario[:] = scenario
    return out


def _canonical_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in readers.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {readers.SPLITS}")
    return s


def _seqio_task(key: str, data_dir, tfds_dir):
    from oxyjax.data import tasks  # lazy: imports tensorflow / seqio

    if data_dir is None and tfds_dir is None:
        return tasks.get_task(key)
    tag = hashlib.sha1(f"{os.fspath(data_dir or '')}|{os.fspath(tfds_dir or '')}".encode())
    return tasks.register_task(
        f"{tasks.task_name(key)}_{tag.hexdigest()[:10]}", key, data_dir=data_dir, tfds_dir=tfds_dir
    )


def _load_split_seqio(key, split, max_history, data_dir, tfds_dir, batch_size) -> ExampleArrays:
    import tensorflow as tf

    task = _seqio_task(key, data_dir, tfds_dir)
    ds = task.get_dataset(
        sequence_length={"history": max_history}, split=split, shuffle=False, num_epochs=1
    )
    ds = ds.map(
        lambda ex: {
            "history": ex["history"],
            "history_len": tf.size(ex["history"], out_type=tf.int32),
            "target": ex["target"],
            "user": ex["user"],
            "scenario": ex["scenario"],
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.padded_batch(
        batch_size,
        padded_shapes={"history": [max_history], "history_len": [], "target": [],
                       "user": [], "scenario": []},
    )
    ds = ds.prefetch(2)
    parts = [ExampleArrays(**b) for b in ds.as_numpy_iterator()]
    return ExampleArrays.concatenate(parts) if parts else ExampleArrays.zeros(0, max_history)


def load_split(
    name: str,
    split: str,
    max_history: int,
    *,
    source: str = "seqio",
    data_dir: Optional[os.PathLike | str] = None,
    tfds_dir: Optional[os.PathLike | str] = None,
    batch_size: int = 8192,
) -> ExampleArrays:
    """Materialise a split of a dataset into ``ExampleArrays``, in the reader's order.

    ``name``: ``'beauty'`` or the task name ``'oxyjax_beauty'`` (also sports, industrial,
    office).  ``split``: ``'train'`` | ``'validation'`` | ``'test'``.
    ``source='seqio'`` reads the seqio task (prepares its TFDS data on first use);
    ``source='readers'`` builds the same arrays straight from the raw-file readers
    without TensorFlow.  ``data_dir`` / ``tfds_dir`` override the raw data directory and
    the TFDS cache (default ``$OXYJAX_DATA_DIR`` or ``<repo>/data``; ``$OXYJAX_TFDS_DIR``
    or ``<repo>/.cache/tfds``).
    """
    key = readers.resolve_dataset_name(name)
    split = _canonical_split(split)
    if max_history <= 0:
        raise ValueError(f"max_history must be positive, got {max_history}")
    if source == "readers":
        ds = readers.load_dataset(key, data_dir)
        return examples_to_arrays(ds.split(split), max_history)
    if source == "seqio":
        return _load_split_seqio(key, split, max_history, data_dir, tfds_dir, batch_size)
    raise ValueError(f"unknown source {source!r}; expected 'seqio' or 'readers'")


# --------------------------------------------------------------------------- training batches


class BatchIterator:
    """Infinite, deterministic, checkpointable training batches over ``ExampleArrays``.

    Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(N)`` in global
    batches of ``global_batch_size`` (the remainder is dropped).  Each process yields its
    own contiguous slice of every global batch: rows
    ``[process_index * B / P, (process_index + 1) * B / P)``, so the global batch order
    does not depend on ``process_count`` and the processes' slices concatenate to the
    one-process batch.

    ``state()`` is a small JSON-able dict (``seed``, ``epoch``, ``position`` = index of
    the next batch in the epoch, plus ``global_batch_size`` / ``num_examples`` as a
    guard); ``restore(state)`` resumes exactly after the last yielded batch.
    """

    def __init__(
        self,
        arrays: ExampleArrays,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        bucket_by_length: bool = False,
        bucket_window: int = 64,
    ):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} not divisible by process_count {process_count}"
            )
        if len(arrays) < global_batch_size:
            raise ValueError(
                f"{len(arrays)} examples is fewer than one global batch of {global_batch_size}"
            )
        self.arrays = arrays
        self.global_batch_size = int(global_batch_size)
        self.per_process_batch_size = self.global_batch_size // process_count
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.batches_per_epoch = len(arrays) // self.global_batch_size
        self.bucket_by_length = bool(bucket_by_length)
        self.bucket_window = int(bucket_window)
        self.epoch = 0
        self.position = 0
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.arrays)
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._perm = np.arange(n)
            if self.bucket_by_length:
                self._perm = self._bucket(self._perm, epoch)
            self._perm_epoch = epoch
        return self._perm

    def _bucket(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        """Groups examples of similar history length into the same batch.

        The epoch's permutation is cut into windows of ``bucket_window`` global batches;
        within a window examples are stably sorted by history length, cut into batches,
        and the batches' order is shuffled (seeded by (seed, epoch, window)). Every example
        is still visited once per epoch; a batch then needs only as many history columns
        as its longest member, which removes most encoder padding.
        """
        b = self.global_batch_size
        usable = self.batches_per_epoch * b
        head, tail = perm[:usable], perm[usable:]
        out = []
        for w0 in range(0, usable, b * self.bucket_window):
            win = head[w0 : w0 + b * self.bucket_window]
            win = win[np.argsort(self.arrays.history_len[win], kind="stable")]
            batches = win.reshape(-1, b)
            order = np.random.default_rng([self.seed, epoch, w0]).permutation(len(batches))
            out.append(batches[order].reshape(-1))
        return np.concatenate(out + [tail])

    def next_global_indices(self) -> np.ndarray:
        """Indices (into ``arrays``) of the next *global* batch; advances the iterator."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        b = self.global_batch_size
        idx = self._permutation(self.epoch)[self.position * b : (self.position + 1) * b]
        self.position += 1
        return idx

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> ExampleArrays:
        idx = self.next_global_indices()
        p = self.per_process_batch_size
        return self.arrays.take(idx[self.process_index * p : (self.process_index + 1) * p])

    def state(self) -> dict[str, int]:
        epoch, position = self.epoch, self.position
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        return {
            "seed": self.seed,
            "epoch": int(epoch),
            "position": int(position),
            "global_batch_size": self.global_batch_size,
            "num_examples": len(self.arrays),
        }

    def restore(self, state: dict[str, Any]) -> None:
        for k in ("global_batch_size", "num_examples"):
            mine = self.global_batch_size if k == "global_batch_size" else len(self.arrays)
            if k in state and int(state[k]) != mine:
                raise ValueError(f"cannot restore: state has {k}={state[k]}, iterator has {mine}")
        position = int(state["position"])
        if not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"position {position} out of range 0..{self.batches_per_epoch}")
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.position = position
        self._perm_epoch = None


class MixtureBatchIterator:
    """Infinite, deterministic, checkpointable training batches drawn from several tasks by rate.

    ``parts[t]`` are task ``t``'s examples, ``rates[t]`` its mixture rate (``seqio.Mixture``
    rates, relative).  Global batch ``k``: the number of rows of each task is a multinomial
    draw of ``global_batch_size`` rows with probabilities ``rates / sum(rates)`` (seeded by
    ``(seed, k)``), so over many batches each task's share of the rows follows its rate;
    each task hands out its rows from its own stream of epoch permutations
    (``default_rng([seed, t, epoch]).permutation(N_t)``, every example once per epoch), and the
    rows of the batch are then shuffled together (seeded by ``(seed, k)``), so each process's
    contiguous slice mixes the tasks.  Slicing over processes is as `BatchIterator`'s.

    ``state()`` holds the batch counter and every task's (epoch, position); ``restore`` resumes
    exactly after the last yielded batch.  No length bucketing (rows of different tasks differ
    in history length anyway).
    """

    def __init__(self, parts: Sequence[ExampleArrays], rates: Sequence[float], global_batch_size: int, *,
                 seed: int = 0, process_index: int = 0, process_count: int = 1):
        if len(parts) != len(rates) or not parts:
            raise ValueError(f"need one rate per task, got {len(parts)} tasks and {len(rates)} rates")
        rates = np.asarray(rates, np.float64)
        if not np.all(rates > 0):
            raise ValueError(f"mixture rates must be positive, got {rates.tolist()}")
        if any(len(p) == 0 for p in parts):
            raise ValueError("every task of the mixture needs at least one training example")
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be positive and divisible by "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
        self.parts = list(parts)
        self.arrays = ExampleArrays.concatenate(self.parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.probabilities = rates / rates.sum()
        self.global_batch_size = int(global_batch_size)
        self.per_process_batch_size = self.global_batch_size // process_count
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seed = int(seed)
        self.step = 0
        self.cursors = [[0, 0] for _ in self.parts]  # per task: (epoch, position in the epoch)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Batches per pass over all tasks' examples (for reporting epochs)."""
        return max(1, len(self.arrays) // self.global_batch_size)

    def _perm(self, t: int, epoch: int) -> np.ndarray:
        key = (t, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != t}
            self._perms[key] = np.random.default_rng([self.seed, t, epoch]).permutation(len(self.parts[t]))
        return self._perms[key]

    def _take(self, t: int, count: int) -> np.ndarray:
        out = []
        epoch, pos = self.cursors[t]
        n = len(self.parts[t])
        while count:
            m = min(count, n - pos)
            out.append(self._perm(t, epoch)[pos: pos + m] + self.offsets[t])
            pos, count = pos + m, count - m
            if pos == n:
                epoch, pos = epoch + 1, 0
        self.cursors[t] = [epoch, pos]
        return np.concatenate(out) if out else np.zeros((0,), np.int64)

    def next_global_indices(self) -> np.ndarray:
        """Indices (into ``arrays``, all tasks concatenated) of the next global batch."""
        rng = np.random.default_rng([self.seed, 1 << 20, self.step])
        counts = rng.multinomial(self.global_batch_size, self.probabilities)
        idx = np.concatenate([self._take(t, int(c)) for t, c in enumerate(counts)])
        self.step += 1
        return idx[rng.permutation(idx.size)]

    def task_of(self, indices: np.ndarray) -> np.ndarray:
        """Task number of each row index (into ``arrays``)."""
        return np.searchsorted(self.offsets, np.asarray(indices), side="right") - 1

    def __iter__(self) -> "MixtureBatchIterator":
        return self

    def __next__(self) -> ExampleArrays:
        idx = self.next_global_indices()
        p = self.per_process_batch_size
        return self.arrays.take(idx[self.process_index * p: (self.process_index + 1) * p])

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "cursors": [list(c) for c in self.cursors],
                "global_batch_size": self.global_batch_size, "num_examples": [len(p) for p in self.parts]}

    def restore(self, state: dict[str, Any]) -> None:
        mine = {"global_batch_size": self.global_batch_size, "num_examples": [len(p) for p in self.parts]}
        for k, v in mine.items():
            if k in state and state[k] != v:
                raise ValueError(f"cannot restore: state has {k}={state[k]}, iterator has {v}")
        if len(state["cursors"]) != len(self.parts):
            raise ValueError(f"cannot restore: state has {len(state['cursors'])} tasks, iterator {len(self.parts)}")
        self.seed = int(state.get("seed", self.seed))
        self.step = int(state["step"])
        self.cursors = [[int(e), int(p)] for e, p in state["cursors"]]
        self._perms = {}


# --------------------------------------------------------------------------- evaluation batches


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def eval_batches(
    arrays: ExampleArrays,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[ExampleArrays, np.ndarray]]:
    """All examples in order, in global batches of ``batch_size``; the last one padded.

    Yields ``(batch, mask)`` with ``mask [batch_size // process_count] bool`` true for real
    rows; padding rows are all zeros.  With several processes each yields its contiguous
    slice of each global batch (every process yields the same number of batches).
    """
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be positive and divisible by {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
    n = len(arrays)
    per = batch_size // process_count
    for b in range(num_eval_batches(n, batch_size)):
        start = b * batch_size + process_index * per
        idx = np.arange(start, start + per)
        mask = idx < n
        batch = arrays.take(np.where(mask, idx, 0))
        if not mask.all():
            pad = ~mask
            for f in _FIELDS:
                getattr(batch, f)[pad] = 0
            for v in batch.extras.values():
                v[pad] = 0
        yield batch, mask
