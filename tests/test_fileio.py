"""oxyjax.fileio: a write that fails or is killed never replaces the good file; locks exclude."""

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from oxyjax import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leftovers(d):
  return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "summary.json"
  fileio.write_json(path, {"good": 1})

  def half_then_fail(f):
    f.write(b'{"bad": ')
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    fileio.atomic_write(path, half_then_fail)
  assert json.loads(path.read_text()) == {"good": 1}
  assert _leftovers(tmp_path) == []


def test_a_write_killed_mid_way_leaves_the_old_file(tmp_path):
  """kill -9 while the new version is half written: the name still holds the old version whole."""
  path = tmp_path / "cache.npy"
  fileio.save_npy(path, np.arange(5))
  child = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from oxyjax import fileio\n"
       "def slow(f):\n"
       "  f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
       f"fileio.atomic_write({str(path)!r}, slow)\n"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "writing"
  assert len(_leftovers(tmp_path)) == 1  # the half-written temporary exists beside the good file
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=30)
  np.testing.assert_array_equal(np.load(path), np.arange(5))


def test_text_and_json_bytes_and_permissions(tmp_path):
  obj = {"b": [1, 2.5], "a": "±"}
  p = fileio.write_json(tmp_path / "sub" / "x.json", obj, indent=1, sort_keys=True)  # makes sub/
  assert p.read_bytes() == json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")
  t = fileio.write_text(tmp_path / "x.md", "± 0.0003\n")
  assert t.read_bytes() == "± 0.0003\n".encode("utf-8")
  # The default permissions (as `open` gives under this umask), not mkstemp's owner-only 0600.
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(t).st_mode) == 0o666 & ~umask
  fileio.save_npz(tmp_path / "a.npz", codes=np.eye(2, dtype=np.int32))
  np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["codes"], np.eye(2, dtype=np.int32))


def test_file_lock_excludes_another_process_until_released(tmp_path):
  lock = tmp_path / "locks" / ".entry.lock"
  probe = ("import fcntl, sys\n"
           "f = open(sys.argv[1], 'a+')\n"
           "try:\n"
           "  fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
           "except BlockingIOError:\n"
           "  print('held')\n")

  def other_process_sees():
    return subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True,
                          timeout=60).stdout.strip()

  with fileio.file_lock(lock):
    assert lock.exists()
    assert other_process_sees() == "held"
  assert other_process_sees() == "free"
