"""Orbax checkpointing: the train state and the data iterator position, saved together.

Restore order (MaxText style), decided in `train.py`:
  1. the latest checkpoint in `model_dir/checkpoints` (resume this run), else
  2. `init_checkpoint` (load given weights), else
  3. fresh initialisation.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash mid-save leaves the previous good checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class Checkpointer:
  """Periodic + final saves with keep-N, the data position saved beside the state."""

  def __init__(self, directory: str, *, keep: int = 3, save_every_steps: int = 1000, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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

    A checkpoint whose tree differs from `abstract_state` (another model shape or optimizer,
    or weight averaging switched on or off since the run started) raises a ValueError naming
    the checkpoint and the first differing entry, instead of Orbax's dump of both trees."""
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except ValueError as e:
      lines = str(e).splitlines()
      if not lines or "do not match" not in lines[0]:
        raise
      where = lines[1].strip().rstrip(":") if len(lines) > 1 else "?"
      raise ValueError(
          f"{os.path.join(self.directory, str(step))}: the saved train state does not match this run's at "
          f"'{where}' (a different model shape or optimizer, or OptimizerConfig.ema_decay switched on or off "
          "since the run started). Use a new model_dir, or init_checkpoint to load only the weights.") from None
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_params(directory: str, params, metadata: dict[str, Any]) -> bool:
  """Saves a parameter tree (e.g. the best-on-validation weights), replacing an older one only
  once the new save is complete. Returns False, saving nothing, when `directory` already holds
  this step: a run restarted from an earlier checkpoint reaches the same step again, and the
  weights saved before the restart stay."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  step = int(metadata.get("step", 0))
  if step in mngr.all_steps():
    mngr.close()
    return False
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(metadata)),
            force=True)
  mngr.wait_until_finished()
  mngr.close()
  return True


def load_params(directory: str, abstract_params=None):
  """Loads the parameters saved by `save_params` (latest). Returns (params, metadata)."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no parameter checkpoint under {directory}")
  args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
  out = mngr.restore(step, args=args)
  mngr.close()
  return out["params"], out["meta"]
