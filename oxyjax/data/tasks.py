"""The seqio task registry: one task per dataset, all registered here.

Tasks ``oxyjax_beauty``, ``oxyjax_sports``, ``oxyjax_industrial``, ``oxyjax_office``:

* source: a :class:`seqio.TfdsDataSource` over the local builder of
  :mod:`oxyjax.data.tfds_builders`, prepared on first use (reading the raw files from
  ``$OXYJAX_DATA_DIR`` / ``<repo>/data``, caching under ``$OXYJAX_TFDS_DIR`` /
  ``<repo>/.cache/tfds``; both resolved when the task is first used).
* preprocessor :func:`keep_recent_history`: casts to int32 and keeps the most recent
  ``sequence_length["history"]`` items (seqio's own trimming would keep the *oldest*).
* output features ``history`` (rank 1) and ``target`` (rank 0), both int32 with a
  :class:`seqio.PassThroughVocabulary` of size ``num_items + 1`` (ids ``1..num_items``,
  ``0`` padding), ``add_eos=False``.  ``user`` and ``scenario`` (int32 scalars) pass
  through alongside.

Splits: ``train``, ``validation``, ``test``.  Read with
``task.get_dataset(sequence_length={"history": H}, split=..., shuffle=False)`` to get the
reader's order.

No ``oxyjax_amazon2018_text`` mixture: seqio requires every task of a mixture to use
the same vocabulary per feature, and the two amazon2018 datasets have different item
catalogues (3,686 vs 3,459 items) in separate id spaces -- item 5 of Industrial is not
item 5 of Office.  A shared vocabulary would need a joint item index (one id space over
both catalogues), which the per-dataset contract (items ``1..num_items``) does not
have; so the mixture is not registered.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from oxyjax.data import readers, tfds_builders  # noqa: E402  (tfds_builders hides GPUs from TF)

__all__ = [
    "TASK_NAMES",
    "task_name",
    "PreparedTfdsDataSource",
    "DatasetVocabulary",
    "keep_recent_history",
    "register_task",
    "get_task",
]

log = logging.getLogger(__name__)

TASK_NAMES = {key: f"oxyjax_{key}" for key in readers.DATASETS}


def task_name(name: str) -> str:
    """``'beauty'`` / ``'oxyjax_beauty'`` -> ``'oxyjax_beauty'`` (also for registered user datasets)."""
    key = readers.resolve_dataset_name(name)
    return TASK_NAMES.get(key, f"oxyjax_{key}")


class PreparedTfdsDataSource(seqio.TfdsDataSource):
    """A ``seqio.TfdsDataSource`` over an oxyjax builder, prepared lazily on first use.

    ``data_dir`` / ``tfds_dir`` default to the environment / repo defaults, resolved at
    every use (not at import), so setting ``OXYJAX_DATA_DIR`` before using a task works.
    Every use also checks the raw data's fingerprint (``readers.dataset_fingerprint``,
    memoised on the files' size/mtime) against the one the held builder was prepared from:
    when the raw files changed (edited, or ``OXYJAX_DATA_DIR`` now points at other files)
    the source switches to the builder prepared for the new content instead of serving the
    old records.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: Optional[os.PathLike | str] = None,
        tfds_dir: Optional[os.PathLike | str] = None,
    ):
        self._dataset_key = readers.resolve_dataset_name(dataset)
        self._raw_data_dir = data_dir
        self._tfds_dir = tfds_dir
        self._loader = None
        self._builder = None
        self._fingerprint = None  # of the raw data the held builder was prepared from
        self._lock = threading.Lock()
        # Skip TfdsDataSource.__init__ (it wants the tfds name/dir now); set its state.
        seqio.DataSource.__init__(self, splits=readers.SPLITS, caching_permitted=True)

    def builder(self):
        """The TFDS builder prepared from the raw data as it is now (prepares when needed)."""
        fingerprint = readers.dataset_fingerprint(self._dataset_key, self._raw_data_dir)
        with self._lock:
            if self._builder is None or self._fingerprint != fingerprint:
                if self._builder is not None:
                    log.info("%s: raw data changed (fingerprint %s -> %s); using its own prepared data",
                             self._dataset_key, self._fingerprint, fingerprint)
                b = tfds_builders.prepare(self._dataset_key, self._raw_data_dir, self._tfds_dir)
                self._builder, self._loader = b, None
                self._fingerprint = b.info.metadata.get("fingerprint")
            return self._builder

    @property
    def tfds_dataset(self) -> seqio.utils.LazyTfdsLoader:
        self.builder()  # re-prepares (and drops the loader) when the raw data changed
        with self._lock:
            if self._loader is None:
                b = self._builder
                self._loader = seqio.utils.LazyTfdsLoader(
                    f"{b.name}:{b.version}", data_dir=os.fspath(b.data_dir_root)
                )
            return self._loader

    @property
    def splits(self):
        return self._splits

    @property
    def num_items(self) -> int:
        return int(self.builder().info.metadata["num_items"])

    @property
    def num_users(self) -> int:
        return int(self.builder().info.metadata["num_users"])

    def __str__(self):
        return f"{self.__class__.__name__}(dataset={self._dataset_key!r})"

    def __repr__(self):
        return (
            f"{self.__class__.__name__}(dataset={self._dataset_key!r}, "
            f"data_dir={self._raw_data_dir!r}, tfds_dir={self._tfds_dir!r})"
        )


class DatasetVocabulary(seqio.PassThroughVocabulary):
    """``PassThroughVocabulary`` of size ``num_items + 1``, the size read lazily.

    The size comes from the prepared dataset's metadata, so registering a task does not
    read the data; it is resolved the first time the size (or equality) is needed.
    """

    def __init__(self, source: PreparedTfdsDataSource):
        self._source = source
        self._eos_id = None
        seqio.Vocabulary.__init__(self)  # not PassThroughVocabulary.__init__ (sets _size)

    @property
    def _size(self) -> int:
        return self._source.num_items + 1

    def __str__(self) -> str:
        return f"DatasetVocabulary({self._source._dataset_key!r})"


def keep_recent_history(dataset: tf.data.Dataset, sequence_length=None) -> tf.data.Dataset:
    """int32 features; keep the most recent ``sequence_length['history']`` items."""
    max_len = None
    if sequence_length and sequence_length.get("history") is not None:
        max_len = int(sequence_length["history"])
        if max_len <= 0:
            raise ValueError(f"sequence_length['history'] must be positive, got {max_len}")

    def fn(ex):
        h = tf.cast(ex["history"], tf.int32)
        if max_len is not None:
            h = h[-max_len:]
        return {
            "history": h,
            "target": tf.cast(ex["target"], tf.int32),
            "user": tf.cast(ex["user"], tf.int32),
            "scenario": tf.cast(ex["scenario"], tf.int32),
        }

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def register_task(
    name: str,
    dataset: str,
    *,
    data_dir: Optional[os.PathLike | str] = None,
    tfds_dir: Optional[os.PathLike | str] = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Register a task over ``dataset`` (for other data / cache dirs, e.g. in tests)."""
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            return seqio.TaskRegistry.get(name)
        seqio.TaskRegistry.remove(name)
    source = PreparedTfdsDataSource(dataset, data_dir=data_dir, tfds_dir=tfds_dir)
    vocab = DatasetVocabulary(source)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[keep_recent_history],
        output_features={
            "history": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=1),
            "target": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=0),
        },
        shuffle_buffer_size=100_000,
    )


for _key, _name in TASK_NAMES.items():
    register_task(_name, _key)


def get_task(name: str) -> seqio.Task:
    """The task for ``'beauty'`` / ``'oxyjax_beauty'`` etc.; a registered user dataset's task is
    registered on first use."""
    tname = task_name(name)
    if tname not in seqio.TaskRegistry.names():
        register_task(tname, readers.resolve_dataset_name(name))
    return seqio.get_mixture_or_task(tname)
