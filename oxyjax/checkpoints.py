"""Orbax checkpointing: the train state and the data iterator position, saved together.

Restore order (MaxText style), decided in `train.py`:
  1. the latest readable checkpoint in `model_dir/checkpoints` (resume this run), else
  2. `init_checkpoint` (load given weights), else
  3. fresh initialisation.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash mid-save leaves the previous good checkpoint as the latest one. A finished checkpoint
whose files are damaged (truncated, missing, undecodable) is set aside, never deleted: moved
to `model_dir/checkpoints_unreadable/<step>-<UTC time>` with one log line naming it, and the
next older one is tried (`Checkpointer.restore_latest`; the same rule for the best weights,
`load_params`). A checkpoint that reads but does not fit this run (another model or
optimizer) is not damage: `CheckpointMismatchError`, nothing is moved.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


UNREADABLE_DIR = "checkpoints_unreadable"  # beside `checkpoints/` and `best/`: where unreadable steps go


class CheckpointMismatchError(ValueError):
  """The saved train state is another tree or shape than this run's (a different model or
  optimizer, weight averaging switched on or off): not damage, so nothing is set aside."""


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint is unreadable and no readable one is left, or it could not be set aside."""


def _error_chain(e: BaseException | None) -> list[BaseException]:
  chain: list[BaseException] = []
  while e is not None and len(chain) < 32 and not any(e is x for x in chain):
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  line = lines[0].strip() if lines else ""
  line = line.split(" See full TensorStore details")[0]  # Orbax's wrapper: the spec dump adds nothing
  return f"{type(e).__name__}: {line}".rstrip(": ")


# TensorStore raises ValueError("<absl status code>: ...") when a file does not read or decode.
_TENSORSTORE_READ_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "INVALID_ARGUMENT")


def is_unreadable_error(e: BaseException) -> bool:
  """Whether `e`, raised while restoring a checkpoint, says the checkpoint's files are damaged
  or missing: a TensorStore read or decode error (also as wrapped by Orbax: "Encountered error
  while reading array ..."), a JSON file that does not parse, a missing file or item. Not: a
  train state that does not match this run's, running out of memory, anything else (a bug, a
  wrong target): those propagate, and no checkpoint is set aside for them."""
  chain = _error_chain(e)
  if any(isinstance(x, (CheckpointMismatchError, MemoryError)) or "RESOURCE_EXHAUSTED" in str(x) for x in chain):
    return False
  for x in chain:
    msg = str(x).lstrip()
    if isinstance(x, (OSError, json.JSONDecodeError, UnicodeDecodeError)):  # OSError: FileNotFoundError too
      return True
    if msg.startswith(_TENSORSTORE_READ_CODES) or msg.startswith("Encountered error while reading") \
        or msg.startswith("Found incomplete checkpoint"):
      return True
    if isinstance(x, KeyError) and "was not found in the checkpoint" in msg:
      return True
  return False


def _describe(e: BaseException, limit: int = 500) -> str:
  """The error's first line and, when it wraps others (Orbax wraps TensorStore's), the innermost one's."""
  chain = _error_chain(e)
  text = _first_line(chain[0]) + (f" <- {_first_line(chain[-1])}" if len(chain) > 1 else "")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def set_aside(path: str, aside_dir: str, name: str) -> str:
  """Moves the directory `path` to `aside_dir/<name>-<UTC time>` (never deletes); returns where."""
  os.makedirs(aside_dir, exist_ok=True)
  dest = os.path.join(aside_dir, f"{name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}")
  base, n = dest, 1
  while os.path.exists(dest):
    dest, n = f"{base}-{n}", n + 1
  os.rename(path, dest)
  return dest


def _quiet_dropped_reads() -> None:
  """Installed before a restore is tried. When a checkpoint is unreadable: Orbax reads an
  array's chunks concurrently, and when one read fails the others are dropped un-awaited. Python
  reports each of those at
  garbage-collection time with its TensorStore traceback (hundreds of lines), in two ways: as
  "Exception ignored in <coroutine _read_array_index_...>" (`sys.unraisablehook`) and, for the
  tasks Orbax wrapped them in, as asyncio's "Task exception was never retrieved" (an error
  record on the `asyncio` logger). Both repeat the one-line message already logged. And the
  reads TensorStore still completes after Orbax's event loop has closed on the failure each try
  to hand their result to that loop from a TensorStore thread: asyncio's "Event loop is closed"
  from `call_soon_threadsafe`, one unraisable exception per dropped read (dozens to hundreds,
  by timing: `_is_closed_loop_callback`), noise about results nobody waits for. Drop these,
  and only these (any other unraisable exception or asyncio error still prints)."""
  import logging
  import sys

  previous = sys.unraisablehook
  if getattr(previous, "_oxyjax_quiet_reads", False):
    return

  def hook(unraisable):
    where = repr(getattr(unraisable, "object", ""))
    exc = unraisable.exc_value
    if exc is not None and is_unreadable_error(exc) and "_read_array" in where:
      return
    if unraisable.object is None and _is_closed_loop_callback(exc, unraisable.exc_traceback):
      return
    previous(unraisable)

  hook._oxyjax_quiet_reads = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_keep_unless_dropped_orbax_read)


def _is_closed_loop_callback(exc: BaseException | None, tb) -> bool:
  """Whether `exc` is asyncio's RuntimeError("Event loop is closed") raised by
  `loop.call_soon_threadsafe` called from outside Python (a TensorStore thread handing a read's
  result to the loop): its traceback holds asyncio's frames only, and that call among them."""
  if not (type(exc) is RuntimeError and str(exc) == "Event loop is closed"):  # pylint: disable=unidiomatic-typecheck
    return False
  frames = []
  while tb is not None:
    frames.append(tb.tb_frame.f_code)
    tb = tb.tb_next
  return (bool(frames) and any(f.co_name == "call_soon_threadsafe" for f in frames)
          and all(f"{os.sep}asyncio{os.sep}" in f.co_filename for f in frames))


def _raised_in_orbax(exc: BaseException) -> bool:
  tb = exc.__traceback__
  while tb is not None:
    if f"orbax{os.sep}checkpoint" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _keep_unless_dropped_orbax_read(record) -> bool:
  """The `asyncio` logger filter of `_quiet_dropped_reads`: False (drop) for asyncio's report of
  an un-awaited Orbax read that failed unreadable: a Task ("Task exception was never retrieved",
  the task's repr names Orbax's coroutine) or the gather that held several of them
  ("_GatheringFuture exception was never retrieved", known by Orbax's frames in the traceback)."""
  exc = record.exc_info[1] if record.exc_info else None
  msg = record.getMessage()
  return not (exc is not None and "never retrieved" in msg and is_unreadable_error(exc)
              and (f"orbax{os.sep}checkpoint" in msg or _raised_in_orbax(exc)))


def _restore_newest_readable(manager: ocp.CheckpointManager, restore: Callable[[int], Any], *, what: str,
                             aside_dir: str, aside_prefix: str = "", log=print) -> tuple[Any, int]:
  """`((step, restore(step)) or None, number of steps set aside)`, trying the manager's steps
  newest first. A step whose files do not read (`is_unreadable_error`) is logged in one line,
  moved to `aside_dir/<aside_prefix><step>-<UTC time>` and the next older one is tried; any
  other error propagates. With several processes nothing is moved (the hosts would have to
  agree on it first): UnreadableCheckpointError names the step to move away by hand."""
  moved = 0
  _quiet_dropped_reads()  # before the reads: their dropped siblings may be reported at any later time
  while (step := manager.latest_step()) is not None:
    try:
      return (step, restore(step)), moved
    except Exception as e:  # pylint: disable=broad-except
      if not is_unreadable_error(e):
        raise
      reason = _describe(e)
    _set_aside_step(manager, step, reason, what=what, aside_dir=aside_dir, aside_prefix=aside_prefix, log=log)
    moved += 1
  return None, moved


def _set_aside_step(manager: ocp.CheckpointManager, step: int, reason: str, *, what: str, aside_dir: str,
                    aside_prefix: str, log=print) -> None:
  """Moves the unreadable `step` out of `manager`'s directory (see `_restore_newest_readable`)."""
  path = os.path.join(str(manager.directory), str(step))
  if jax.process_count() > 1:
    raise UnreadableCheckpointError(
        f"{what} {path} is unreadable ({reason}). With several processes it is not set aside automatically: "
        f"move it out of {manager.directory} (e.g. into {aside_dir}) and restart.")
  try:
    dest = set_aside(path, aside_dir, f"{aside_prefix}{step}")
  except OSError as move_error:
    raise UnreadableCheckpointError(
        f"{what} {path} is unreadable ({reason}) and could not be moved to {aside_dir} "
        f"({_first_line(move_error)}): move it away by hand and restart.") from None
  manager.reload()
  older = manager.latest_step()
  log(f"[oxyjax] {what} {path} is unreadable ({reason}); moved it to {dest}; "
      + (f"trying step {older}" if older is not None else "no older one is left"))


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class Checkpointer:
  """Periodic + final saves with keep-N, the data position saved beside the state."""

  def __init__(self, directory: str, *, keep: int = 3, save_every_steps: int = 1000, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.unreadable_dir = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, save_every_steps), create=True,
            enable_async_checkpointing=async_save),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict[str, Any], *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`). Returns whether a save started."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=force)

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs with shardings. Returns (state, data_state).

    A checkpoint whose tree or array shapes differ from `abstract_state` (another model shape
    or optimizer, or weight averaging switched on or off since the run started) raises
    CheckpointMismatchError (a ValueError) naming the checkpoint and the first differing entry
    (or the shapes), instead of Orbax's dump of both trees."""
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except ValueError as e:
      lines = str(e).splitlines()
      first = lines[0] if lines else ""
      if "do not match" in first:
        where = f"at '{lines[1].strip().rstrip(':') if len(lines) > 1 else '?'}'"
      elif "is not compatible with the stored shape" in first:  # same tree, another array shape
        where = f"({first.split('. Truncating')[0].strip()})"
      else:
        raise
      raise CheckpointMismatchError(
          f"{os.path.join(self.directory, str(step))}: the saved train state does not match this run's "
          f"{where} (a different model shape or optimizer, or OptimizerConfig.ema_decay switched on or off "
          "since the run started). Use a new model_dir, or init_checkpoint to load only the weights.") from None
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, log=print):
    """`(step, state, data_state)` of the newest readable checkpoint, or None when there is none.

    The newest step is tried first. One whose files do not read (a truncated or missing array
    file, a JSON that does not parse: `is_unreadable_error`) is logged in one line naming its
    directory and the error, moved to `<model_dir>/checkpoints_unreadable/<step>-<UTC time>`
    (outside this manager's directory, so Orbax no longer lists it; nothing is deleted), and
    the next older step is tried. None when no readable checkpoint is left (logged when some
    were set aside: the caller then initialises afresh). A checkpoint that reads but does not
    fit `abstract_state` raises CheckpointMismatchError, and any other error propagates: neither
    sets anything aside. With several processes an unreadable checkpoint raises
    UnreadableCheckpointError instead of being moved."""
    found, moved = _restore_newest_readable(self.manager, lambda step: self.restore(step, abstract_state),
                                            what="checkpoint", aside_dir=self.unreadable_dir, log=log)
    if found is None:
      if moved:
        log(f"[oxyjax] no readable checkpoint left in {self.directory} ({moved} set aside in "
            f"{self.unreadable_dir}): starting from scratch")
      return None
    step, (state, data_state) = found
    return step, state, data_state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_params(directory: str, params, metadata: dict[str, Any], *, log=print) -> bool:
  """Saves a parameter tree (e.g. the best-on-validation weights), replacing an older one only
  once the new save is complete. Returns False, saving nothing, when `directory` already holds
  this step: a run restarted from an earlier checkpoint reaches the same step again, and the
  weights saved before the restart stay, unless they no longer read: then they are set aside
  (`load_params`) and saved again."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  step = int(metadata.get("step", 0))
  if step in mngr.all_steps():
    if _params_readable(mngr, step, params, log=log):
      mngr.close()
      return False
    # else the unreadable copy of `step` was set aside: save it again
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(metadata)),
            force=True)
  mngr.wait_until_finished()
  mngr.close()
  return True


def _params_aside(directory: str) -> tuple[str, str]:
  """Where unreadable parameter steps of `directory` go: `<parent>/checkpoints_unreadable/<name>-<step>-<time>`."""
  directory = os.path.abspath(directory)
  return os.path.join(os.path.dirname(directory), UNREADABLE_DIR), os.path.basename(directory) + "-"


def _restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
  args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
  out = mngr.restore(step, args=args)
  return out["params"], out["meta"]


def _params_readable(mngr: ocp.CheckpointManager, step: int, params, log=print) -> bool:
  """Whether `step` of a `save_params` directory reads (into `params`' shapes); if not, it is set aside."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          params)
  try:
    _restore_params(mngr, step, abstract)
    return True
  except Exception as e:  # pylint: disable=broad-except
    if not is_unreadable_error(e):
      raise
    reason = _describe(e)
  aside_dir, prefix = _params_aside(str(mngr.directory))
  _set_aside_step(mngr, step, reason, what="parameter checkpoint", aside_dir=aside_dir, aside_prefix=prefix, log=log)
  return False


def load_params(directory: str, abstract_params=None, *, log=print):
  """Loads the parameters saved by `save_params` (latest readable). Returns (params, metadata).

  The newest step is tried first; one whose files do not read is logged, set aside to
  `<parent>/checkpoints_unreadable/<name>-<step>-<UTC time>` (e.g. `best-6-...`, never deleted)
  and the next older one tried. FileNotFoundError when `directory` holds no step,
  UnreadableCheckpointError (one line, naming it) when none of them reads."""
  if not os.path.isdir(directory):  # a CheckpointManager would create it: a read leaves nothing behind
    raise FileNotFoundError(f"no parameter checkpoint under {directory} (no such directory)")
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"no parameter checkpoint under {directory}")
    aside_dir, prefix = _params_aside(directory)
    found, moved = _restore_newest_readable(mngr, lambda step: _restore_params(mngr, step, abstract_params),
                                            what="parameter checkpoint", aside_dir=aside_dir, aside_prefix=prefix,
                                            log=log)
  finally:
    mngr.close()
  if found is None:
    raise UnreadableCheckpointError(f"no readable parameter checkpoint left under {directory} "
                                    f"({moved} unreadable, set aside in {aside_dir})")
  return found[1]


def has_checkpoint(directory: str | None) -> bool:
  """Whether `directory` holds at least one finished Orbax step."""
  if not directory or not os.path.isdir(directory):
    return False
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    return mngr.latest_step() is not None
  finally:
    mngr.close()


def restore_latest_params(directory: str, abstract_params, log=print):
  """The evaluation weights (`ema_params` when the run keeps an average, else `params`) of the
  newest train checkpoint under `directory`, read without the optimizer state or the data
  position (Orbax partial restore). Returns (step, params) or None."""
  if not has_checkpoint(directory):
    return None
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    step = mngr.latest_step()
    for key in ("ema_params", "params"):
      target = {key: abstract_params}
      try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target),
            partial_restore=True)))
      except (KeyError, ValueError):
        if key == "params":
          raise
        continue  # no average in this run
      return step, out["state"][key]
  finally:
    mngr.close()


class BestCheckpointer:
  """The best weights by a validation metric, kept by Orbax (`best_fn`, `max_to_keep=1`).

  `maybe_save(step, params, metrics)` writes only when `metrics[metric]` is strictly higher
  than the best kept so far (the first evaluation always is), so the earlier of two equal
  scores stays; the best step and its metric are read back from Orbax's own metadata, so a
  restarted run knows them without any bookkeeping of ours. A restarted run that reaches an
  already-saved step again keeps what is there (same weights: the run is deterministic).
  Multi-host: the decision is process 0's, broadcast, and every process saves together."""

  def __init__(self, directory: str, *, metric: str = "recall@10", log=print):
    self.directory, self.metric, self.log = os.path.abspath(directory), metric, log
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[metric], best_mode="max",
                                             keep_checkpoints_without_metrics=False, create=True))

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def best_metric(self) -> float | None:
    step = self.best_step()
    if step is None:
      return None
    m = self.manager.metrics(step)
    return None if m is None else float(m[self.metric])

  def maybe_save(self, step: int, params, metrics: dict[str, Any]) -> bool:
    from oxyjax import distributed

    best = self.best_metric()
    improved = best is None or float(metrics[self.metric]) > best
    if jax.process_count() > 1:  # a host-0 decision: every host saves (or not) together
      import numpy as np
      improved = bool(distributed.broadcast_from_host0(np.asarray(improved)))
    if not improved:
      return False
    if step in self.manager.all_steps() and _params_readable(self.manager, step, params, log=self.log):
      return False  # a restarted run reached this step again: the same weights are there
    meta = {"step": int(step), **{k: (float(v) if not isinstance(v, bool) else v) for k, v in metrics.items()}}
    self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics={k: v for k, v in meta.items() if k != "step"}, force=True)
    self.manager.wait_until_finished()
    return True

  def restore(self, abstract_params):
    """(params, metadata) of the best step. Unreadable ones are set aside (the recovery rule of
    `load_params`); UnreadableCheckpointError when none is left."""
    if self.best_step() is None:
      raise FileNotFoundError(f"no best checkpoint under {self.directory}")
    aside_dir, prefix = _params_aside(self.directory)
    found, moved = _restore_newest_readable(self.manager, lambda step: _restore_params(self.manager, step, abstract_params),
                                            what="best-weights checkpoint", aside_dir=aside_dir, aside_prefix=prefix,
                                            log=self.log)
    if found is None:
      raise UnreadableCheckpointError(f"the best weights under {self.directory} are unreadable "
                                      f"({moved} set aside in {aside_dir})")
    return found[1]

  def verify(self, abstract_params) -> int | None:
    """At a resume: the best step when its weights still read; else they are set aside (logged)
    and the run has no best yet: the next evaluation saves new best weights."""
    if self.best_step() is None:
      return None
    try:
      self.restore(abstract_params)
    except UnreadableCheckpointError as e:
      self.log(f"[oxyjax] {e}: the next evaluation saves new best weights")
    return self.best_step()

  def close(self):
    self.manager.close()
