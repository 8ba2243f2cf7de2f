"""Local TFDS builders (no download) over the raw files read by :mod:`oxyjax.data.readers`.

One ``GeneratorBasedBuilder`` per dataset (``oxyjax_beauty``, ``oxyjax_sports``,
``oxyjax_industrial``, ``oxyjax_office``) with splits ``train`` / ``validation`` /
``test`` and features::

    user     int64            dense user index (1..num_users)
    history  Sequence(int64)  item indices, oldest first (full history, not truncated)
    target   int64            item index (1..num_items)
    scenario int64            0 for now

Examples keep the reader's order (``disable_shuffling=True``, integer keys), so a split
read back with ``shuffle_files=False`` is the reader's list, row for row.
``info.metadata`` holds ``num_items``, ``num_users``, ``fingerprint``.

Prepared data lives under ``<tfds_dir>/<dataset>-<fingerprint>/oxyjax_<dataset>/<VERSION>/``
where ``tfds_dir`` defaults to ``$OXYJAX_TFDS_DIR`` or ``<repo>/.cache/tfds`` and the
fingerprint hashes the reader version and the raw files' bytes: editing the data or
bumping ``readers.READER_VERSION`` prepares a fresh directory; an existing one is never
rewritten.  Preparation is lazy (:func:`prepare` on first use), serialised across
processes with a file lock, and TFDS itself writes into a temporary directory that it
renames into place, so an interrupted run leaves no half-written dataset.

This module imports TensorFlow / TFDS; import it only where they are needed.
"""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from oxyjax import fileio  # noqa: E402
from oxyjax.data import readers  # noqa: E402

__all__ = [
    "BUILDER_VERSION",
    "BUILDERS",
    "default_tfds_dir",
    "prepared_dir",
    "prepare",
    "OxyjaxBeauty",
    "OxyjaxSports",
    "OxyjaxIndustrial",
    "OxyjaxOffice",
]

log = logging.getLogger(__name__)


def hide_accelerators_from_tf() -> None:
    """Keep TensorFlow (used here only for tf.data) off GPUs/TPUs so it cannot grab the
    memory JAX needs.  A no-op once TF has initialised its devices."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            pass


hide_accelerators_from_tf()

# Schema version of the prepared records (bump when the features change).
BUILDER_VERSION = "1.0.0"

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_tfds_dir() -> Path:
    """``$OXYJAX_TFDS_DIR`` if set, else ``<repo>/.cache/tfds``."""
    env = os.environ.get("OXYJAX_TFDS_DIR")
    return Path(env) if env else _REPO_ROOT / ".cache" / "tfds"


class _OxyjaxSequenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Next-item examples of one dataset from :func:`readers.load_dataset`."""

    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES = {"1.0.0": "user/history/target/scenario examples from oxyjax.data.readers."}
    DATASET_KEY = ""

    def __init__(self, *, raw_data_dir: Optional[os.PathLike | str] = None,
                 expected_fingerprint: Optional[str] = None, **kwargs):
        self._raw_data_dir = raw_data_dir
        self._expected_fingerprint = expected_fingerprint
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = readers.DATASETS[self.DATASET_KEY]
        return tfds.core.DatasetInfo(
            builder=self,
            description=spec.description,
            features=tfds.features.FeaturesDict(
                {
                    "user": tf.int64,
                    "history": tfds.features.Sequence(tf.int64),
                    "target": tf.int64,
                    "scenario": tf.int64,
                }
            ),
            supervised_keys=None,
            homepage=None,
            disable_shuffling=True,
            # filled in by _split_generators, restored from metadata.json on read
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        ds = readers.load_dataset(self.DATASET_KEY, self._raw_data_dir)
        fingerprint = readers.dataset_fingerprint(self.DATASET_KEY, self._raw_data_dir)
        if self._expected_fingerprint is not None and fingerprint != self._expected_fingerprint:
            # The raw files changed since the target directory was named: do not write the new
            # content under the old fingerprint.
            raise ValueError(
                f"{self.DATASET_KEY}: raw data changed while preparing (fingerprint "
                f"{self._expected_fingerprint} -> {fingerprint}); run again")
        self.info.metadata.update(
            num_items=ds.num_items,
            num_users=ds.num_users,
            fingerprint=fingerprint,
            reader_version=readers.READER_VERSION,
        )
        return {split: self._generate_examples(ds.split(split)) for split in readers.SPLITS}

    def _generate_examples(self, examples):
        for i, ex in enumerate(examples):
            yield i, {
                "user": ex.user,
                "history": list(ex.history),
                "target": ex.target,
                "scenario": 0,
            }


class OxyjaxBeauty(_OxyjaxSequenceBuilder):
    DATASET_KEY = "beauty"


class OxyjaxSports(_OxyjaxSequenceBuilder):
    DATASET_KEY = "sports"


class OxyjaxIndustrial(_OxyjaxSequenceBuilder):
    DATASET_KEY = "industrial"


class OxyjaxOffice(_OxyjaxSequenceBuilder):
    DATASET_KEY = "office"


BUILDERS: dict[str, type[_OxyjaxSequenceBuilder]] = {
    "beauty": OxyjaxBeauty,
    "sports": OxyjaxSports,
    "industrial": OxyjaxIndustrial,
    "office": OxyjaxOffice,
}


def builder_class(name: str) -> type[_OxyjaxSequenceBuilder]:
    """The builder of a dataset; for a registered user dataset one is made on first use."""
    key = readers.resolve_dataset_name(name)
    if key not in BUILDERS:
        camel = "".join(part.capitalize() for part in key.split("_"))
        BUILDERS[key] = types.new_class(f"OxyjaxUser{camel}", (_OxyjaxSequenceBuilder,),
                                        {"skip_registration": True}, lambda ns: ns.update(DATASET_KEY=key))
    return BUILDERS[key]


def prepared_dir(
    name: str,
    data_dir: Optional[os.PathLike | str] = None,
    tfds_dir: Optional[os.PathLike | str] = None,
) -> Path:
    """The TFDS ``data_dir`` a dataset is (or will be) prepared in."""
    key = readers.resolve_dataset_name(name)
    root = Path(tfds_dir) if tfds_dir is not None else default_tfds_dir()
    return root / f"{key}-{readers.dataset_fingerprint(key, data_dir)}"


def prepare(
    name: str,
    data_dir: Optional[os.PathLike | str] = None,
    tfds_dir: Optional[os.PathLike | str] = None,
) -> _OxyjaxSequenceBuilder:
    """Prepare ``name`` (once) and return its builder, ready for ``as_dataset``.

    Reuses a prepared directory when one exists for the same data and reader version
    (the directory is named by the fingerprint); raises ``ValueError`` naming the directory
    if the prepared data there records another fingerprint (a copied or renamed directory).
    """
    key = readers.resolve_dataset_name(name)
    cls = builder_class(key)
    root = prepared_dir(key, data_dir, tfds_dir)
    builder = cls(raw_data_dir=data_dir, data_dir=str(root))
    if builder.is_prepared():
        return _check_fingerprint(builder, root)
    with fileio.file_lock(root.parent / f".{root.name}.lock"):
        builder = cls(raw_data_dir=data_dir, data_dir=str(root),
                      expected_fingerprint=root.name.rsplit("-", 1)[-1])
        if not builder.is_prepared():  # nobody prepared it while we waited
            t0 = time.perf_counter()
            builder.download_and_prepare(
                download_dir=str(root / "downloads"),
                download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False,
                    compute_stats=tfds.download.ComputeStatsMode.SKIP,
                ),
                file_format="tfrecord",
            )
            log.info("prepared TFDS %s in %s (%.1fs)", builder.name, root, time.perf_counter() - t0)
            builder = cls(raw_data_dir=data_dir, data_dir=str(root))
    return _check_fingerprint(builder, root)


def _check_fingerprint(builder: _OxyjaxSequenceBuilder, root: Path) -> _OxyjaxSequenceBuilder:
    expected = root.name.rsplit("-", 1)[-1]
    got = builder.info.metadata.get("fingerprint")
    if got != expected:
        raise ValueError(
            f"prepared TFDS data {builder.data_dir} records data fingerprint {got!r}, but its "
            f"directory {root} is for fingerprint {expected!r}: it was prepared from other raw "
            f"files; delete {root} to prepare it again")
    return builder
