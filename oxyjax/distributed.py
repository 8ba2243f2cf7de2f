"""Multi-host runtime: one `initialize()` for TPU, GPU and CPU, and cross-host agreement checks.

The environment contract (what the `launch/` scripts export, one process per host or per task):

  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator service
  JAX_NUM_PROCESSES        number of processes (a positive integer)
  JAX_PROCESS_ID           this process's index, 0 .. JAX_NUM_PROCESSES - 1

On GPU and CPU the three values come from the arguments, else these variables, else (under
SLURM) SLURM_NTASKS / SLURM_PROCID; without JAX_COORDINATOR_ADDRESS JAX's own SLURM detection
then picks the coordinator (the first node of the job) and one device per task. On TPU `jax.distributed.initialize()` is called with no arguments
(the TPU runtime knows the slice) unless the variables are set. With none of this set the
process is a single-process job and `initialize()` does nothing.

`initialize()` must run before any JAX computation or device query (`jax.devices()`), and is
idempotent. The checks below are collectives: every process must call them, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "JAX_LOCAL_DEVICE_COUNT"  # CPU only: fake devices per process

_STATE: dict[str, Any] = {"initialized": False}


class HostMismatchError(ValueError):
  """A value that must be identical on every host differs between hosts."""


def _parse_int(raw: str | None, name: str, *, minimum: int) -> int | None:
  if raw is None or str(raw).strip() == "":
    return None
  try:
    value = int(str(raw).strip())
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise ValueError(f"{name}={raw!r} must be >= {minimum}")
  return value


def _check_address(address: str, name: str) -> str:
  address = address.strip()
  m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d+)", address)
  if not m or not 0 < int(m.group(2)) < 65536:
    raise ValueError(f"{name}={address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
  return address


def _detect_platform() -> str:
  """The platform, without initialising any JAX backend (that must wait for initialize)."""
  configured = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if configured:
    return configured.split(",")[0].strip().lower()
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE") or os.path.exists("/dev/accel0") \
      or os.path.exists("/dev/vfio/0"):
    return "tpu"
  if os.path.exists("/dev/nvidia0") or os.environ.get("CUDA_VISIBLE_DEVICES"):
    return "gpu"
  return "cpu"


def is_initialized() -> bool:
  return bool(_STATE["initialized"]) or jax.distributed.is_initialized()


def initialize(platform: str | None = None, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> bool:
  """Initialises JAX's distributed runtime for `platform` ('tpu' | 'gpu' | 'cuda' | 'rocm' | 'cpu';
  default: detected without touching a backend). Returns True when this is (now) a
  multi-process job, False for a single process (nothing done). Idempotent.

  `local_device_count` (CPU only; also env JAX_LOCAL_DEVICE_COUNT): fake CPU devices per process,
  set through `jax_num_cpu_devices` (else `--xla_force_host_platform_device_count` in XLA_FLAGS
  decides). Raises ValueError naming the variable when an environment value is malformed.
  """
  if is_initialized():
    _STATE["initialized"] = True
    return True
  platform = (platform or _detect_platform()).lower()
  env = os.environ
  coord = coordinator_address if coordinator_address is not None else env.get(ENV_COORDINATOR)
  coord_name = "coordinator_address" if coordinator_address is not None else ENV_COORDINATOR
  nproc = _parse_int(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
                     "num_processes" if num_processes is not None else ENV_NUM_PROCESSES, minimum=1)
  pid = _parse_int(process_id if process_id is not None else env.get(ENV_PROCESS_ID),
                   "process_id" if process_id is not None else ENV_PROCESS_ID, minimum=0)
  nproc_name = "num_processes" if num_processes is not None else ENV_NUM_PROCESSES
  pid_name = "process_id" if process_id is not None else ENV_PROCESS_ID
  # SLURM fallback (one task per host): process count and index from the task layout.
  if nproc is None and pid is None and env.get("SLURM_NTASKS") and env.get("SLURM_PROCID") and platform != "tpu":
    nproc = _parse_int(env["SLURM_NTASKS"], "SLURM_NTASKS", minimum=1)
    pid = _parse_int(env["SLURM_PROCID"], "SLURM_PROCID", minimum=0)
    nproc_name, pid_name = "SLURM_NTASKS", "SLURM_PROCID"
  if coord is not None:
    coord = _check_address(coord, coord_name)
  if nproc is not None and pid is not None and pid >= nproc:
    raise ValueError(f"{pid_name}={pid} must be < {nproc_name}={nproc}")

  if platform == "tpu":
    if nproc == 1:
      return False
    if coord is not None and nproc is not None and pid is not None:
      jax.distributed.initialize(coord, nproc, pid)
    else:  # the TPU runtime knows the slice's hosts
      jax.distributed.initialize()
    _STATE["initialized"] = True
    logger.info("jax.distributed initialised on TPU: process %d of %d", jax.process_index(), jax.process_count())
    return True

  given = {coord_name: coord, nproc_name: nproc, pid_name: pid}
  if all(v is None for v in given.values()) or nproc == 1:
    if platform == "cpu":
      _set_cpu_devices(local_device_count)
    return False  # single process
  if nproc is None or pid is None:
    missing = [k for k, v in given.items() if v is None and k != coord_name]
    raise ValueError(f"multi-process run is half configured: {', '.join(missing)} not set "
                     f"(have {', '.join(f'{k}={v}' for k, v in given.items() if v is not None)})")
  if coord is None and not env.get("SLURM_JOB_ID"):
    raise ValueError(f"{ENV_COORDINATOR} is not set (needed with {nproc_name}={nproc}); expected HOST:PORT of process 0")
  if platform == "cpu":
    _set_cpu_devices(local_device_count)
    # Cross-process CPU collectives (psum, all-gather between processes) need an implementation.
    if str(jax.config.values.get("jax_cpu_collectives_implementation") or "none") == "none":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coord is None:  # SLURM without the JAX_* contract: JAX's own SLURM detection (one device per task)
    jax.distributed.initialize()
  else:
    # All three known: no cluster auto-detection, which under SLURM would also restrict each
    # process to one GPU (SLURM_LOCALID); with one process per host every local device is
    # used (JAX_LOCAL_DEVICE_IDS, read by JAX, still restricts them).
    jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid,
                               cluster_detection_method="deactivate")
  _STATE["initialized"] = True
  logger.info("jax.distributed initialised on %s: process %d of %d (coordinator %s)", platform, pid, nproc, coord)
  return True


def _set_cpu_devices(local_device_count: int | None):
  n = _parse_int(local_device_count if local_device_count is not None else os.environ.get(ENV_LOCAL_DEVICE_COUNT),
                 "local_device_count" if local_device_count is not None else ENV_LOCAL_DEVICE_COUNT, minimum=1)
  if n is not None:
    jax.config.update("jax_num_cpu_devices", n)


# ---------------------------------------------------------------------- cross-host values
def broadcast_from_host0(tree):
  """Process 0's values of `tree` (a pytree of arrays/scalars, same shapes on every host) on
  every host, as numpy. A collective: every process must call it."""
  from jax.experimental import multihost_utils

  return multihost_utils.broadcast_one_to_all(tree)


def fingerprint(value) -> str:
  """A stable hex digest of a value: numpy arrays (dtype, shape, bytes), scalars, strings,
  dicts/lists/tuples of those, dataclasses (by their repr)."""
  h = hashlib.sha256()

  def feed(v):
    if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "__array__") and not isinstance(v, (str, bytes)):
      a = np.ascontiguousarray(np.asarray(v))
      h.update(f"nd:{a.dtype.str}:{a.shape}:".encode())
      h.update(a.tobytes())
    elif isinstance(v, dict):
      h.update(b"dict:")
      for k in sorted(v, key=str):
        feed(str(k))
        feed(v[k])
    elif isinstance(v, (list, tuple)):
      h.update(f"seq{len(v)}:".encode())
      for x in v:
        feed(x)
    else:
      h.update(f"{type(v).__name__}:{v!r};".encode())

  feed(value)
  return h.hexdigest()


def _short_repr(value, limit: int = 60) -> str:
  if isinstance(value, np.ndarray) and value.size > 8:
    r = f"array(shape={value.shape}, dtype={value.dtype})"
  else:
    try:
      r = json.dumps(value) if isinstance(value, (int, float, str, bool)) else repr(value)
    except Exception:  # pragma: no cover
      r = repr(value)
  return r if len(r) <= limit else r[: limit - 3] + "..."


def assert_same_across_hosts(value, name: str) -> None:
  """Raises HostMismatchError naming `name` when `value` is not identical on every host.

  Compares a SHA-256 fingerprint (see `fingerprint`) gathered from all processes, so any value
  works (seeds, a config string, an array checksum). The error, raised on every process, lists
  each process's value (short form). A collective: every process must call it. No-op (no
  communication) for a single process.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  digest = np.frombuffer(bytes.fromhex(fingerprint(value)), np.uint8).astype(np.int32)
  shown = _short_repr(value).encode()[:64].ljust(64, b"\0")
  local = np.concatenate([digest, np.frombuffer(shown, np.uint8).astype(np.int32)])
  gathered = np.asarray(multihost_utils.process_allgather(local, tiled=False))  # [P, 32 + 64]
  if (gathered[:, :32] == gathered[:1, :32]).all():
    return
  per_host = [bytes(row[32:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace") for row in gathered]
  groups: dict[bytes, list[int]] = {}
  for i, row in enumerate(gathered):
    groups.setdefault(row[:32].tobytes(), []).append(i)
  detail = "; ".join(f"process {i}: {per_host[i]}" for i in range(len(per_host)))
  raise HostMismatchError(f"{name} differs across hosts ({len(groups)} distinct values over {len(per_host)} "
                          f"processes; this is process {jax.process_index()}): {detail}")


def checksum(array) -> str:
  """Hex digest of an array's dtype, shape and contents (e.g. the SID table's codes)."""
  return fingerprint(np.asarray(array))
