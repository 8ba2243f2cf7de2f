"""One seqio task per scenario, all in one `seqio.Mixture` over the catalogue's joint item space.

`register_mixture(catalogue, scenarios, name)` registers, for each `scenarios.Scenario`, the
task ``<name>_<scenario>`` (a `seqio.FunctionDataSource` over the scenario's examples; every
task shares one `seqio.PassThroughVocabulary` of ``catalogue.num_items + 1`` item ids, as
seqio requires of a mixture), and the mixture ``<name>`` with each scenario's `rate`.

The trainer reads the mixture, not a list of its own: `mixture_parts` materialises each task's
training split through seqio (its preprocessors, its features) and returns it with the rate
seqio holds for it (`Mixture.get_rate`), which `pipeline.MixtureBatchIterator` samples by.
(seqio's own `Mixture.get_dataset` samples with `tf.data` and cannot resume mid-epoch to the
same example; the iterator draws with the same rates, deterministically and checkpointably.)

Imports TensorFlow; only the data layer imports this module.
"""

from __future__ import annotations

import os
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from oxyjax.data import pipeline  # noqa: E402
from oxyjax.data import tfds_builders  # noqa: E402,F401  (hides accelerators from TF)
from oxyjax.data.catalogue import Catalogue  # noqa: E402
from oxyjax.data.scenarios import Scenario  # noqa: E402

__all__ = ["register_mixture", "mixture_parts", "task_name"]


def task_name(mixture: str, scenario: str) -> str:
  return f"{mixture}_{scenario}"


def _dataset_fn(scenario: Scenario):
  def fn(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # the examples are in memory; the trainer's iterator shuffles
    if split not in scenario.splits:
      raise ValueError(f"scenario {scenario.name!r} has no split {split!r} (has {sorted(scenario.splits)})")
    return tf.data.Dataset.from_tensor_slices(scenario.splits[split].as_dict())

  return fn


def _cast(dataset: tf.data.Dataset, sequence_length=None) -> tf.data.Dataset:
  """Keeps the most recent `sequence_length['history']` behaviours (ExampleArrays are left-aligned)."""
  max_len = None if not sequence_length else sequence_length.get("history")

  def fn(ex):
    ex = dict(ex)
    h = ex["history"][: ex["history_len"]]
    if max_len is not None:
      h = h[-int(max_len):]
    ex["history"] = h
    ex["history_len"] = tf.size(h, out_type=tf.int32)
    return ex

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def register_mixture(catalogue: Catalogue, scenarios: Sequence[Scenario], name: str) -> seqio.Mixture:
  """(Re)registers one task per scenario and their mixture `name`; returns the mixture."""
  vocab = seqio.PassThroughVocabulary(catalogue.num_items + 1)
  features = {
      "history": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=1),
      "target": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=0),
  }
  entries = []
  for s in scenarios:
    tname = task_name(name, s.name)
    if tname in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(tname)
    source = seqio.FunctionDataSource(_dataset_fn(s), splits=tuple(s.splits),
                                      num_input_examples={k: len(v) for k, v in s.splits.items()})
    seqio.TaskRegistry.add(tname, source=source, preprocessors=[_cast], output_features=features,
                           shuffle_buffer_size=None)
    entries.append((tname, float(s.config.rate)))
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, entries)


def _materialise(task: seqio.Task, split: str, max_history: int) -> pipeline.ExampleArrays:
  ds = task.get_dataset(sequence_length={"history": max_history}, split=split, shuffle=False, num_epochs=1)
  shapes = {k: [max_history] if k == "history" else v.shape.as_list() for k, v in ds.element_spec.items()}
  ds = ds.padded_batch(8192, padded_shapes=shapes).prefetch(2)
  parts = [b for b in ds.as_numpy_iterator()]
  cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
  if cols is None:
    raise ValueError(f"seqio task {task.name!r} has no {split} examples")
  fields = ("history", "history_len", "target", "user", "scenario")
  return pipeline.ExampleArrays(**{f: cols.pop(f) for f in fields}, extras=cols)


def mixture_parts(mixture: seqio.Mixture, split: str, max_history: int) -> tuple[list[str], list[pipeline.ExampleArrays], list[float]]:
  """(task names, each task's `split` as ExampleArrays via seqio, each task's mixture rate)."""
  names, arrays, rates = [], [], []
  for task in mixture.tasks:
    names.append(task.name)
    arrays.append(_materialise(task, split, max_history))
    rates.append(float(mixture.get_rate(task)))
  return names, arrays, rates

