"""Crash-safe file writes and cross-process locks: the one place oxyjax replaces a file.

Every file that may already hold a good version (a cache entry, a run summary, a metrics table, a
store manifest, a SID table) is written by `atomic_write`: into a fresh temporary file beside it,
flushed and fsync'ed, then `os.replace`d onto its name, and the directory fsync'ed. A crash at
any point (kill -9 included) leaves either the old file or the new one, never half of either; a
failed write removes its temporary file. The temporary file is created with the process's
default permissions (as `open` gives), so a result on a shared disk stays readable to others.

Directories that must appear whole (model artifacts, exports, Orbax checkpoints) are built under a
temporary name and renamed by their own writers; this module is for single files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def fsync_dir(path: PathLike) -> None:
  """Makes a rename inside ``path`` durable (best effort: not every filesystem supports it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Any], object], *, text: bool = False) -> Path:
  """Calls ``write(f)`` on a temporary file beside ``path`` (binary, or UTF-8 text with ``text=True``),
  then puts it in place atomically. Creates missing parent directories. Returns ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    with (open(tmp, "x", encoding="utf-8") if text else open(tmp, "xb")) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise
  fsync_dir(path.parent)
  return path


def write_bytes(path: PathLike, data: bytes) -> Path:
  return atomic_write(path, lambda f: f.write(data))


def write_text(path: PathLike, text: str) -> Path:
  return atomic_write(path, lambda f: f.write(text), text=True)


def write_json(path: PathLike, obj: Any, **dumps_kwargs) -> Path:
  """``json.dumps(obj, **dumps_kwargs)``, atomically (the same bytes `json.dump` would write)."""
  return write_text(path, json.dumps(obj, **dumps_kwargs))


def save_npy(path: PathLike, array: np.ndarray) -> Path:
  return atomic_write(path, lambda f: np.save(f, array))


def save_npz(path: PathLike, **arrays: np.ndarray) -> Path:
  return atomic_write(path, lambda f: np.savez(f, **arrays))


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
  """An exclusive `flock` on ``path`` (created if missing) for the block: one process at a time
  builds a shared cache entry; the others wait, then find it built."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
