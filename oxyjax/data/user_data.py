"""Your own interaction log as a dataset, from gin, with no code changes.

  # gin_configs/data/toy_shop.gin
  oxyjax.train.train.dataset = @user_dataset()
  user_dataset.name = 'toy_shop'
  user_dataset.interactions = 'data/examples/toy_shop/interactions.csv'
  user_dataset.items = 'data/examples/toy_shop/items.csv'

Gin calls `user_dataset` when `train` is called: it registers the files under the name
(`readers.register_dataset`, format `interactions`, see `readers.read_interactions` for the
format and the leave-one-out rule) and returns the name, which every part of oxyjax then uses
like a built-in dataset's (caches are keyed by the files' content).
"""

from __future__ import annotations

import os
from pathlib import Path

import gin

from oxyjax.data import readers

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _resolve(path: str, what: str) -> str:
  """An absolute path: as given if absolute; else relative to the current directory when the file
  is there, else to the repository root."""
  p = Path(os.path.expanduser(path))
  if p.is_absolute():
    found = p
  elif p.exists():
    found = p.resolve()
  else:
    found = _REPO_ROOT / p
  if not found.is_file():
    raise readers.DataError(found, f"{what} file not found (given as {path!r})")
  return str(found)


@gin.configurable
def user_dataset(name: str = gin.REQUIRED, interactions: str = gin.REQUIRED, items: str | None = None,
                 min_interactions: int = 3) -> str:
  """Registers an interaction log (CSV/TSV: user, item, timestamp[, action]) and an optional item
  file (item, title, brand, categories, description) as dataset `name`; returns `name`."""
  path = _resolve(interactions, "interactions")
  spec = readers.DatasetSpec(
      name=name, format="interactions", path=path, description=f"user interaction log {path}",
      items_path=_resolve(items, "items") if items else "", min_interactions=int(min_interactions))
  return readers.register_dataset(spec)
