"""Feature conversion: item-level examples -> the model's encoder/decoder arrays.

An example (see `oxyjax.data.pipeline.ExampleArrays`) holds item indices; the model reads
behaviour tokens (item id + SID codes per behaviour) and the target's SID path. The lookup is
a NumPy gather on the host (cheap: [B, S, L] int32), so the device program sees only dense
int arrays with static shapes.
"""

from __future__ import annotations

import numpy as np

MODEL_FEATURES = ("history_items", "history_codes", "history_mask", "scenario", "target_codes",
                  "target_items", "weights")


def convert(examples, sid_codes: np.ndarray,
            weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Converts a batch of examples to model features.

  Args:
    examples: an ExampleArrays, or a mapping with 'history' [B, S] (0 = padding), 'target' [B], 'scenario' [B].
    sid_codes: [num_items + 1, L] int32 SID table (row 0 unused).
    weights: optional [B] example weights (e.g. 0 for padding rows of an eval batch).

  Returns:
    history_items [B,S] int32, history_codes [B,S,L] int32, history_mask [B,S] bool,
    scenario [B] int32, target_codes [B,L] int32, target_items [B] int32, weights [B] float32.
  """
  if hasattr(examples, "as_dict"):  # an ExampleArrays
    examples = examples.as_dict()
  history = np.asarray(examples["history"], np.int32)
  target = np.asarray(examples["target"], np.int32)
  if history.size and (history.max() >= sid_codes.shape[0] or history.min() < 0):
    raise ValueError(f"history item index out of range for a SID table of {sid_codes.shape[0] - 1} items")
  if target.size and (target.max() >= sid_codes.shape[0] or target.min() < 0):
    raise ValueError(f"target item index out of range for a SID table of {sid_codes.shape[0] - 1} items")
  b = history.shape[0]
  return {
      "history_items": history,
      "history_codes": sid_codes[history].astype(np.int32),
      "history_mask": history > 0,
      "scenario": np.asarray(examples.get("scenario", np.zeros(b)), np.int32),
      "target_codes": sid_codes[target].astype(np.int32),
      "target_items": target,
      "weights": np.ones(b, np.float32) if weights is None else np.asarray(weights, np.float32),
  }


def trim_history(batch: dict[str, np.ndarray], multiple: int = 4) -> dict[str, np.ndarray]:
  """Drops trailing all-padding history columns, keeping a multiple of `multiple` columns.

  Histories are left-aligned, so columns past the longest history in the batch hold only
  padding; the model's recency positions come from the mask and do not change. Rounding
  to a multiple bounds the number of distinct shapes (and compilations).
  """
  s = batch["history_mask"].shape[1]
  longest = int(batch["history_mask"].sum(axis=1).max(initial=1))
  keep = min(s, max(multiple, -(-longest // multiple) * multiple))
  if keep == s:
    return batch
  out = dict(batch)
  for k in ("history_items", "history_codes", "history_mask", "history_text"):
    if k in batch:
      out[k] = batch[k][:, :keep]
  return out
