"""An embedded, crash-safe store of generated instructions (no server).

Layout of a store directory::

  manifest.json        {"format": "oxyjax-instructions", "version": 1,
                        "dim": 384, "shards": ["shard-00000.npz", ...]}
  shard-00000.npz      one write (a chunk of records), never modified after it is published
  shard-00001.npz
  *.tmp                leftovers of an interrupted write: ignored (removed by ``compact``)

A shard holds parallel arrays, one row per record (numpy ``.npz``, no pickles):
``dataset, user, history_key, scenario, text, model_version, context_key, status`` (unicode),
``cutoff`` (int64), ``created_at`` (float64 unix seconds), ``embedding`` (float32 ``[n, dim]``),
``max_items`` (int64: history items the prompt showed; shards written before it existed read
as the generator's default, 5).

Key: ``(dataset, user raw id, cutoff = len(history), scenario, history_key)``. ``history_key``
(a hash of the history's raw item ids, ``prompt.history_key``) is needed because in the
amazon2018 data two examples of one user can have the same history *length* (histories are
windows of at most 10 items): 569 such pairs in industrial.

Writes (``put``) are atomic (``oxyjax.fileio``): the shard is written to a ``.<name>.*.tmp`` file in
the store directory, flushed and fsync'ed, ``os.replace``d to its final name; then the manifest, which
lists the shard, is written the same way (and the directory fsync'ed). A crash anywhere before
the manifest's ``os.replace`` leaves the previous manifest -- and so exactly the previously
stored records -- in place (an unlisted shard is ignored and overwritten later). Later shards
win for the same key. One writer at a time (the near-line job); readers open a snapshot.

Refresh policy (``needs_refresh``): a record is regenerated when there is none, when its
``context_key`` differs from the current context's (new behaviour, new prompt version), or
when it is older than ``max_age_s``. Status ``fallback`` records (the LLM gave no usable
sentence) follow the same rule. ``lookup_embeddings`` returns ``present=False`` for missing,
stale and fallback rows; the model then uses its learned default instruction.

Tie to the data: a record is tied to the content it was generated from by its key (the
history's raw item ids, via ``history_key``) and by ``context_key`` (the prompt context: the
titles and brands of the history items shown, the scenario, ``PROMPT_VERSION``). A lookup
rebuilds each found record's context from the dataset as it is now (``max_items`` as stored)
and serves the record only if its ``context_key`` still matches: a record whose source
changed (edited titles, another ``OXYJAX_DATA_DIR``) counts as ``stale``, exactly the records
the generator would regenerate. So one store survives data edits: only the changed records
stop being served, and the next generation run refreshes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from oxyjax import fileio

__all__ = ["InstructionRecord", "InstructionStore", "needs_refresh", "record_key", "STATUSES"]

log = logging.getLogger(__name__)

FORMAT = "oxyjax-instructions"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATUSES = ("generated", "fallback")
_STR_FIELDS = ("dataset", "user", "history_key", "scenario", "text", "model_version", "context_key",
               "status")
_ALL_FIELDS = _STR_FIELDS + ("cutoff", "created_at", "embedding")
DEFAULT_MAX_ITEMS = 5  # the generator's default; assumed for shards without a max_items field

Key = tuple[str, str, int, str, str]


@dataclasses.dataclass(frozen=True)
class InstructionRecord:
  """One stored instruction. ``embedding`` is float32 ``[dim]`` (zeros for ``fallback``)."""

  dataset: str
  user: str  # raw user id
  cutoff: int  # len(history)
  scenario: str
  history_key: str
  text: str
  embedding: np.ndarray
  model_version: str
  created_at: float  # unix seconds
  context_key: str
  status: str = "generated"
  max_items: int = DEFAULT_MAX_ITEMS  # history items shown in the prompt (rebuilds the context)

  @property
  def key(self) -> Key:
    return (self.dataset, self.user, int(self.cutoff), self.scenario, self.history_key)


def record_key(dataset, example, scenario: str = "homepage") -> Key:
  """The store key of ``example`` of ``dataset`` (a ``SequenceDataset``)."""
  from oxyjax.instructions.prompt import history_key
  return (dataset.name, dataset.raw_user_ids[example.user], len(example.history), scenario,
          history_key(dataset, example))


def needs_refresh(record: Optional[InstructionRecord], ctx_key: str, now: float,
                  max_age_s: Optional[float]) -> bool:
  """True when ``record`` is missing, was built from another context, or is too old.

  ``max_age_s=None`` means records never expire by age.
  """
  if record is None or record.context_key != ctx_key:
    return True
  return max_age_s is not None and now - record.created_at > max_age_s


def write_shard_file(path: str | os.PathLike, records: Sequence[InstructionRecord], dim: int = 384) -> None:
  """Writes ``records`` as one shard file at ``path``, atomically (a batch job's workers write
  shards outside the store; ``InstructionStore.publish`` moves them in)."""
  arrays: dict[str, np.ndarray] = {f: np.array([str(getattr(r, f)) for r in records], dtype=str)
                                   for f in _STR_FIELDS}
  arrays["cutoff"] = np.array([int(r.cutoff) for r in records], np.int64)
  arrays["max_items"] = np.array([int(r.max_items) for r in records], np.int64)
  arrays["created_at"] = np.array([float(r.created_at) for r in records], np.float64)
  emb = np.zeros((len(records), dim), np.float32)
  for i, r in enumerate(records):
    if r.status not in STATUSES:
      raise ValueError(f"record {r.key}: status {r.status!r} not in {STATUSES}")
    e = np.asarray(r.embedding, np.float32).reshape(-1)
    if e.shape != (dim,):
      raise ValueError(f"record {r.key}: embedding has shape {e.shape}, expected ({dim},)")
    emb[i] = e
  arrays["embedding"] = emb
  fileio.save_npz(path, **arrays)


class InstructionStore:
  """Instruction records in a directory (see the module docstring for format and guarantees).

  >>> store = InstructionStore(".cache/instructions")
  >>> store.put([record, ...])                         # one atomic shard
  >>> emb, present, stats = store.lookup_embeddings(dataset, dataset.test, "homepage")
  """

  def __init__(self, path: str | os.PathLike, dim: int = 384, create: bool = True):
    self.path = Path(path)
    self.dim = int(dim)
    if create:
      self.path.mkdir(parents=True, exist_ok=True)
    elif not self.path.is_dir():
      raise FileNotFoundError(f"{self.path}: instruction store directory not found")
    self._records: dict[Key, InstructionRecord] = {}
    self._shards: list[str] = []
    self.reload()

  # ------------------------------------------------------------------ reading
  @property
  def manifest_path(self) -> Path:
    return self.path / MANIFEST

  def _read_manifest(self) -> list[str]:
    p = self.manifest_path
    if not p.exists():
      return []
    try:
      m = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{p}: corrupt instruction store manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
      raise ValueError(f"{p}: not an instruction store manifest (format != {FORMAT!r})")
    if m.get("version") != FORMAT_VERSION:
      raise ValueError(f"{p}: unsupported store version {m.get('version')!r} (expected {FORMAT_VERSION})")
    if int(m.get("dim", -1)) != self.dim:
      raise ValueError(f"{p}: store has embedding dim {m.get('dim')}, expected {self.dim}")
    shards = m.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, str) and "/" not in s for s in shards):
      raise ValueError(f"{p}: field 'shards' must be a list of file names")
    return shards

  def _read_shard(self, name: str) -> list[InstructionRecord]:
    p = self.path / name
    try:
      with np.load(p, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    except FileNotFoundError as e:
      raise ValueError(f"{p}: shard listed in {self.manifest_path} is missing") from e
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise ValueError(f"{p}: corrupt instruction store shard: {e}") from e
    missing = [f for f in _ALL_FIELDS if f not in data]
    if missing:
      raise ValueError(f"{p}: corrupt instruction store shard: missing field(s) {missing}")
    n = len(data["dataset"])
    for f in _ALL_FIELDS:
      if len(data[f]) != n:
        raise ValueError(f"{p}: corrupt instruction store shard: field {f!r} has {len(data[f])} rows, expected {n}")
    emb = data["embedding"]
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[1] != self.dim:
      raise ValueError(f"{p}: field 'embedding' must be float32 [n, {self.dim}], got {emb.dtype} {emb.shape}")
    max_items = data.get("max_items")
    if max_items is None:
      max_items = np.full((n,), DEFAULT_MAX_ITEMS, np.int64)
    elif len(max_items) != n:
      raise ValueError(f"{p}: corrupt instruction store shard: field 'max_items' has {len(max_items)} rows, expected {n}")
    out = []
    for i in range(n):
      status = str(data["status"][i])
      if status not in STATUSES:
        raise ValueError(f"{p}: row {i}: field 'status' is {status!r}, expected one of {STATUSES}")
      out.append(InstructionRecord(
          dataset=str(data["dataset"][i]), user=str(data["user"][i]), cutoff=int(data["cutoff"][i]),
          scenario=str(data["scenario"][i]), history_key=str(data["history_key"][i]),
          text=str(data["text"][i]), embedding=emb[i], model_version=str(data["model_version"][i]),
          created_at=float(data["created_at"][i]), context_key=str(data["context_key"][i]),
          status=status, max_items=int(max_items[i])))
    return out

  def reload(self) -> None:
    """Re-reads the manifest and its shards (a consistent snapshot of the last complete write)."""
    shards = self._read_manifest()
    records: dict[Key, InstructionRecord] = {}
    for name in shards:
      for r in self._read_shard(name):
        records[r.key] = r
    self._shards, self._records = shards, records

  def __len__(self) -> int:
    return len(self._records)

  def records(self) -> list[InstructionRecord]:
    return list(self._records.values())

  def get(self, dataset: str, user: str, cutoff: int, scenario: str,
          history_key: str) -> Optional[InstructionRecord]:
    """The record for a key, or ``None``. ``dataset`` is the dataset name, ``user`` the raw id."""
    return self._records.get((dataset, user, int(cutoff), scenario, history_key))

  def get_for_example(self, dataset, example, scenario: str = "homepage") -> Optional[InstructionRecord]:
    return self._records.get(record_key(dataset, example, scenario))

  def lookup_embeddings(self, dataset, examples: Sequence, scenario: str = "homepage",
                        now: Optional[float] = None, max_age_s: Optional[float] = None
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Embeddings of the stored instructions of ``examples`` (of ``dataset``, a SequenceDataset).

    Returns ``(emb [N, dim] float32, present [N] bool, stats)``; rows without a usable
    instruction (missing; built from a context that no longer matches the data, see the
    module docstring; status ``fallback``; or older than ``max_age_s`` at ``now``) are zeros
    with ``present=False``. ``stats`` counts ``generated`` (present), ``missing``, ``stale``
    (source changed, or too old) and ``fallback`` rows. ``now`` defaults to the current
    time; ``max_age_s=None`` disables the age check.
    """
    from oxyjax.instructions import prompt as prompt_lib

    now = time.time() if now is None else float(now)
    n = len(examples)
    emb = np.zeros((n, self.dim), np.float32)
    present = np.zeros((n,), bool)
    stats = {"generated": 0, "missing": 0, "stale": 0, "fallback": 0}
    changed = 0
    item_cache: dict = {}  # sanitised item strings, shared by the examples of this call
    for i, ex in enumerate(examples):
      r = self._records.get(record_key(dataset, ex, scenario))
      if r is None:
        stats["missing"] += 1
        continue
      ctx = prompt_lib.context_for_example(dataset, ex, scenario=scenario, max_items=r.max_items,
                                           item_cache=item_cache)
      if prompt_lib.context_key(ctx) != r.context_key:
        stats["stale"] += 1
        changed += 1
      elif r.status != "generated":
        stats["fallback"] += 1
      elif max_age_s is not None and now - r.created_at > max_age_s:
        stats["stale"] += 1
      else:
        emb[i] = r.embedding
        present[i] = True
        stats["generated"] += 1
    log.info("instructions %s/%s: %d examples: %s", dataset.name, scenario, n, stats)
    if changed:
      log.warning("instruction store %s: %d of the %d %s/%s examples have a record generated from a "
                  "context that no longer matches the data (edited item text, or other data); not "
                  "served, counted as stale; rerun oxyjax.instructions.generate to refresh them",
                  self.path, changed, n, dataset.name, scenario)
    return emb, present, stats

  # ------------------------------------------------------------------ writing
  def _next_shard_name(self) -> str:
    used = set(self._shards) | {p.name for p in self.path.glob("shard-*.npz")}
    nums = [int(s[6:-4]) for s in used if s.startswith("shard-") and s[6:-4].isdigit()]
    return f"shard-{max(nums, default=-1) + 1:05d}.npz"

  def _write_shard(self, name: str, records: Sequence[InstructionRecord]) -> None:
    write_shard_file(self.path / name, records, self.dim)

  def _write_manifest(self, shards: list[str]) -> None:
    fileio.write_json(self.manifest_path, {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim,
                                           "shards": shards}, indent=1)

  def put(self, records: Iterable[InstructionRecord]) -> int:
    """Publishes ``records`` as one new shard, atomically. Returns the number written."""
    records = list(records)
    if not records:
      return 0
    for r in records:
      if r.status not in STATUSES:
        raise ValueError(f"record {r.key}: status {r.status!r} not in {STATUSES}")
    name = self._next_shard_name()
    self._write_shard(name, records)
    shards = self._shards + [name]
    self._write_manifest(shards)
    self._shards = shards
    for r in records:
      self._records[r.key] = r
    return len(records)

  def publish(self, shard_files: Sequence[str | os.PathLike]) -> int:
    """Moves shard files written elsewhere (`write_shard_file`, e.g. by the workers of
    `oxyjax.instructions.beam_job`) into the store and lists them all in one atomic manifest
    write: readers see every one of them or none. A file that does not read as a shard raises
    (naming it) before the manifest changes. Returns the number of records published."""
    files = [Path(f) for f in shard_files]
    if not files:
      return 0
    names, used = [], set(self._shards) | {p.name for p in self.path.glob("shard-*.npz")}
    for f in files:
      nums = [int(s[6:-4]) for s in used if s.startswith("shard-") and s[6:-4].isdigit()]
      name = f"shard-{max(nums, default=-1) + 1:05d}.npz"
      used.add(name)
      os.replace(f, self.path / name)  # unlisted until the manifest below: ignored by readers
      names.append(name)
    new = {}
    for name in names:
      for r in self._read_shard(name):
        new[r.key] = r
    shards = self._shards + names
    self._write_manifest(shards)
    self._shards = shards
    self._records.update(new)
    return sum(1 for _ in new)

  def compact(self) -> None:
    """Rewrites the live records into one shard (atomically), then deletes the old files."""
    old = set(self._shards)
    name = self._next_shard_name()
    live = self.records()
    if live:
      self._write_shard(name, live)
    self._write_manifest([name] if live else [])
    self._shards = [name] if live else []
    for p in self.path.iterdir():
      if (p.name in old or p.name.endswith(".tmp")) and p.name not in self._shards:
        try:
          p.unlink()
        except OSError:
          pass
