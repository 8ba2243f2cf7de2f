"""Shared fixtures: a small text dataset with sentinel titles, fake backends and encoder."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from oxyjax.data.readers import Example, ItemMeta, SequenceDataset
from oxyjax.instructions.llm import BackendError


def sentinel(item: int) -> str:
  return f"ZQ{item:05d}XJ"


def make_dataset(num_users: int = 12, num_items: int = 40, seed: int = 0) -> SequenceDataset:
  """Synthetic dataset: every item's title is a unique sentinel string ``ZQ<item>XJ``."""
  rng = np.random.default_rng(seed)
  test, validation, train = [], [], []
  for u in range(1, num_users + 1):
    seq = [int(x) for x in rng.choice(np.arange(1, num_items + 1), size=8, replace=False)]
    test.append(Example(u, tuple(seq[:-1]), seq[-1]))
    validation.append(Example(u, tuple(seq[:-2]), seq[-2]))
    for k in range(2, 6):
      train.append(Example(u, tuple(seq[:k]), seq[k]))
  meta = [None] + [ItemMeta(title=sentinel(i), brand="") for i in range(1, num_items + 1)]
  return SequenceDataset(
      name="tiny", num_items=num_items, num_users=num_users,
      raw_item_ids=[""] + [f"I{i}" for i in range(1, num_items + 1)],
      item_index={f"I{i}": i for i in range(1, num_items + 1)},
      raw_user_ids=[""] + [f"U{u}" for u in range(1, num_users + 1)],
      user_index={f"U{u}": u for u in range(1, num_users + 1)},
      train=train, validation=validation, test=test, item_meta=meta)


class EchoBackend:
  """Returns the quoted strings of the user message, space-separated (no sentence end)."""

  version = "echo-v0"

  def __init__(self):
    self.calls = 0

  def generate(self, messages_batch):
    self.calls += 1
    out = []
    for msgs in messages_batch:
      user = "\n".join(m["content"] for m in msgs if m["role"] != "system")
      out.append(" ".join(re.findall(r'"([^"]*)"', user)))
    return out


class DownBackend:
  version = "down-v0"

  def __init__(self):
    self.calls = 0

  def generate(self, messages_batch):
    self.calls += 1
    raise BackendError("backend is down")


class HashEncoder:
  """Deterministic stand-in for SentenceEncoder: unit vectors from a hash of the text."""

  dim = 384

  def encode(self, texts, batch_size: int = 64):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, t in enumerate(texts):
      seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
      v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
      out[i] = v / np.linalg.norm(v)
    return out


@pytest.fixture
def tiny_dataset():
  return make_dataset()
