r"""The near-line instruction job as an Apache Beam pipeline (DirectRunner here; the same code on
Dataflow, Flink or Spark).

  python -m oxyjax.instructions.beam_job --dataset=office --splits=test --store=.cache/instructions \
      --pipeline_options="--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_threading"

The steps are those of the one-machine command (`oxyjax.instructions.generate`, kept as the
one-machine path) as transforms:

  examples -> BuildPrompts   context from the history only, store key, skip fresh records
           -> CombinePerKey  one prompt per store key (duplicate examples)
           -> BatchElements  `--batch_size` chats per LLM call
           -> Generate       LLM (the backend is built once per worker, `setup`), first sentence,
                             sentence-encoder embedding; a BackendError skips the batch (retried
                             by the next run), an empty sentence is a `fallback` record
           -> WriteShards    each batch of records as one shard file, written atomically into
                             `<store>/staging-<job id>/` (outside the manifest: readers ignore it)
  then the driver publishes every staged shard with one manifest write
  (`InstructionStore.publish`): a job killed anywhere leaves the store exactly as before (plus
  ignored staged files); a finished one adds all its records at once.

Workers read the store (for the refresh check) and the dataset themselves, from `store` and
`dataset_fn`, so on a cluster both must be reachable by the workers (a shared or object-store
file system). Counters (selected, fresh, generated, fallback, failed) are Beam metrics.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import uuid
from typing import Any, Callable, Sequence


def _import_beam():
  """apache_beam logs a warning on the root logger at import when the GCP client libraries are
  absent (not needed here); keep it off stderr without touching the caller's logging set-up."""
  root = logging.getLogger()
  level, handler = root.level, logging.NullHandler()
  root.addHandler(handler)  # logging.warning() would otherwise install a stderr handler
  root.setLevel(logging.ERROR)
  try:
    import apache_beam
  finally:
    root.setLevel(level)
    root.removeHandler(handler)
  return apache_beam


beam = _import_beam()
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from oxyjax.instructions.generate import JobStats, make_records, prompt_for
from oxyjax.instructions.llm import BackendError
from oxyjax.instructions.store import InstructionStore, needs_refresh, write_shard_file

PROG = "python -m oxyjax.instructions.beam_job"
NAMESPACE = "oxyjax.instructions"
log = logging.getLogger(__name__)


def _first(values):
  return next(iter(values))  # the examples of one store key have the same history: the same prompt


def _count_fresh(key):
  Metrics.counter(NAMESPACE, "fresh").inc()
  return key


class BuildPrompts(beam.DoFn):
  """(example) -> (store key, (messages, context key)) for the examples that need a record."""

  def __init__(self, dataset_fn, store_path: str, scenario: str, max_items: int, max_age_s, now: float):
    self.dataset_fn, self.store_path = dataset_fn, store_path
    self.scenario, self.max_items, self.max_age_s, self.now = scenario, max_items, max_age_s, now

  def setup(self):
    self.dataset = self.dataset_fn()
    self.store = InstructionStore(self.store_path)  # a read-only snapshot for the refresh check

  def process(self, example):
    from oxyjax.instructions import prompt as prompt_lib

    key, ctx, ck = prompt_for(self.dataset, example, self.scenario, self.max_items)
    if not needs_refresh(self.store.get(*key), ck, self.now, self.max_age_s):
      yield beam.pvalue.TaggedOutput("fresh", key)
      return
    yield key, (prompt_lib.build_messages(ctx), ck)


class Generate(beam.DoFn):
  """A batch of (key, (messages, context key)) -> its store records (LLM + sentence encoder)."""

  def __init__(self, backend_fn: Callable[[], Any], encoder_fn: Callable[[], Any], dim: int, max_items: int,
               now_fn: Callable[[], float] = time.time):
    self.backend_fn, self.encoder_fn, self.dim, self.max_items, self.now_fn = (
        backend_fn, encoder_fn, dim, max_items, now_fn)
    self.generated = Metrics.counter(NAMESPACE, "generated")
    self.fallback = Metrics.counter(NAMESPACE, "fallback")
    self.failed = Metrics.counter(NAMESPACE, "failed")

  def setup(self):
    self.backend, self.encoder = self.backend_fn(), self.encoder_fn()

  def process(self, batch):
    batch = sorted(batch)  # the batch's order does not depend on the runner's
    try:
      raw = self.backend.generate([messages for _, (messages, _) in batch])
      if len(raw) != len(batch):
        raise BackendError(f"backend returned {len(raw)} texts for {len(batch)} chats")
    except BackendError as e:
      self.failed.inc(len(batch))
      log.warning("instructions: backend failed for %d examples, skipped: %s", len(batch), e)
      return
    records = make_records([(key, ck) for key, (_, ck) in batch], raw, self.encoder, self.dim,
                           str(self.backend.version), self.now_fn(), self.max_items)
    n_gen = sum(r.status == "generated" for r in records)
    self.generated.inc(n_gen)
    self.fallback.inc(len(records) - n_gen)
    yield records


class WriteShards(beam.DoFn):
  """A batch of records -> one shard file in the staging directory (atomic); yields its path."""

  def __init__(self, staging_dir: str, dim: int):
    self.staging_dir, self.dim = staging_dir, dim

  def process(self, records):
    if not records:
      return
    path = os.path.join(self.staging_dir, f"part-{uuid.uuid4().hex}.npz")
    write_shard_file(path, records, self.dim)
    yield path


def run_pipeline(dataset_fn: Callable[[], Any], examples: Sequence, store_path: str, *,
                 backend_fn: Callable[[], Any], encoder_fn: Callable[[], Any], scenario: str = "homepage",
                 max_items: int = 5, batch_size: int = 32, max_age_s: float | None = None,
                 pipeline_options: PipelineOptions | Sequence[str] | None = None,
                 now_fn: Callable[[], float] = time.time) -> JobStats:
  """Runs the pipeline over `examples` (of the dataset `dataset_fn()` returns) into the store at
  `store_path`, then publishes its shards; returns the job's counts."""
  store = InstructionStore(store_path)  # creates it, so the workers' snapshots open
  staging = os.path.join(store.path, f"staging-{uuid.uuid4().hex[:12]}")
  os.makedirs(staging)
  if pipeline_options is None or not isinstance(pipeline_options, PipelineOptions):
    pipeline_options = PipelineOptions(list(pipeline_options or ["--runner=DirectRunner"]))
  t0 = time.time()
  try:
    p = beam.Pipeline(options=pipeline_options)
    prompts = (p | "Examples" >> beam.Create(list(examples))
               | "BuildPrompts" >> beam.ParDo(BuildPrompts(dataset_fn, str(store.path), scenario, max_items,
                                                           max_age_s, now_fn())).with_outputs("fresh", main="todo"))
    _ = prompts.fresh | "DistinctFresh" >> beam.Distinct() | "CountFresh" >> beam.Map(_count_fresh)
    (prompts.todo
     | "OnePerKey" >> beam.CombinePerKey(_first)
     | "Batch" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
     | "Generate" >> beam.ParDo(Generate(backend_fn, encoder_fn, store.dim, max_items, now_fn))
     | "WriteShards" >> beam.ParDo(WriteShards(staging, store.dim)))
    result = p.run()
    result.wait_until_finish()
    staged = sorted(os.path.join(staging, f) for f in os.listdir(staging) if f.endswith(".npz"))
    store.reload()  # publish on top of the store as it is now
    store.publish(staged)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  counts = {r.key.metric.name: r.committed for r in result.metrics().query()["counters"]}
  stats = JobStats(fresh=counts.get("fresh", 0), generated=counts.get("generated", 0), fallback=counts.get("fallback", 0),
                   failed=counts.get("failed", 0), seconds=time.time() - t0)
  stats.selected = stats.fresh + stats.generated + stats.fallback + stats.failed  # distinct store keys
  return stats


def _define_flags() -> None:
  from absl import flags

  from oxyjax.instructions import generate

  generate._define_flags()
  flags.DEFINE_string("pipeline_options", "--runner=DirectRunner",
                      "Beam pipeline options, space-separated (e.g. --runner=DataflowRunner --project=...).")


def main(argv: Sequence[str]) -> JobStats:
  from absl import flags

  from oxyjax import cli
  from oxyjax.data.readers import load_dataset
  from oxyjax.instructions import generate
  from oxyjax.instructions.llm import make_backend
  from oxyjax.sid.embeddings import SentenceEncoder

  del argv  # flags only: cli.run refuses positional arguments
  args = flags.FLAGS
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  cli.parse_gin(args)
  dataset_fn = functools.partial(load_dataset, args.dataset)
  examples = generate.examples_from_flags(dataset_fn(), args)
  backend_fn = functools.partial(make_backend, args.backend, **generate.backend_kwargs(args))
  stats = run_pipeline(dataset_fn, examples, args.store, backend_fn=backend_fn,
                       encoder_fn=SentenceEncoder, scenario=args.scenario, max_items=args.max_items,
                       batch_size=args.batch_size, max_age_s=args.max_age_s,
                       pipeline_options=args.pipeline_options.split())
  print(f"[instructions/beam] done: {stats.selected} selected, {stats.fresh} fresh, {stats.generated} generated, "
        f"{stats.fallback} fallback, {stats.failed} failed; {stats.seconds:.1f}s", flush=True)
  return stats


def run() -> None:
  from oxyjax import cli

  _define_flags()
  cli.run(main, PROG)


if __name__ == "__main__":
  from oxyjax.instructions import beam_job as _module

  _module.run()
