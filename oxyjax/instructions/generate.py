"""The near-line job: write a contextual reasoning instruction per (dataset, user, cutoff).

  python -m oxyjax.instructions.generate --dataset=industrial --splits=test,validation \\
      --train_fraction=0.1 --store=.cache/instructions --backend=smollm --batch_size=32 \\
      --max_examples=300

Steps (``run_job``):
1. select examples: every example of ``--splits`` (in that order) plus a seeded random
   ``--train_fraction`` of the training examples; ``--max_examples`` keeps the first N;
   duplicates of a store key are dropped;
2. build each context from the history only (``prompt.context_for_example``) and skip the
   examples whose stored record does not need a refresh (``store.needs_refresh``);
3. sort the rest by prompt length (less padding), run the backend ``--batch_size`` chats at a
   time, keep the first sentence (``prompt.postprocess``), embed the sentences with the
   sentence encoder (all-MiniLM-L6-v2, batched), and publish every ``--chunk_size`` records
   as one atomic shard (a killed job keeps every published chunk);
4. a batch whose backend call raises ``BackendError`` is logged and skipped (nothing is
   written: those rows are retried by the next run and read as ``present=False`` meanwhile);
   an empty sentence is stored with status ``fallback`` and a zero embedding.

Progress goes to stderr (examples done/total, instructions/s, ETA); the final line prints the
end-to-end instructions/s (LLM + embedding + store writes, model loading excluded).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from oxyjax.instructions import prompt as prompt_lib
from oxyjax.instructions.llm import Backend, BackendError
from oxyjax.instructions.store import InstructionRecord, InstructionStore, needs_refresh, record_key

PROG = "python -m oxyjax.instructions.generate"

__all__ = ["JobStats", "select_examples", "run_job", "main"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobStats:
  selected: int = 0  # examples selected (after de-duplication of store keys)
  fresh: int = 0  # skipped: stored record still valid
  generated: int = 0  # written with status "generated"
  fallback: int = 0  # written with status "fallback" (empty sentence)
  failed: int = 0  # backend errors: nothing written
  seconds: float = 0.0  # wall time of the generation loop

  @property
  def instructions_per_s(self) -> float:
    done = self.generated + self.fallback
    return done / self.seconds if self.seconds > 0 else 0.0


def select_examples(dataset, splits: Sequence[str], train_fraction: float = 0.0, seed: int = 0,
                    max_examples: Optional[int] = None, user_fraction: float = 1.0) -> list:
  """All examples of ``splits`` (in order), then a seeded ``train_fraction`` of ``train``.

  ``user_fraction`` < 1 keeps only the examples of a seeded random subset of users (every
  selected split of the same users: a smaller experiment whose users are fully covered).
  """
  out = []
  for s in splits:
    if s == "train":
      raise ValueError("pass the training examples with --train_fraction, not --splits=train")
    out.extend(dataset.split(s))
  if train_fraction > 0:
    if not 0 < train_fraction <= 1:
      raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    n = int(round(train_fraction * len(dataset.train)))
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset.train), size=n, replace=False))
    out.extend(dataset.train[i] for i in idx)
  if user_fraction < 1.0:
    if not 0 < user_fraction <= 1:
      raise ValueError(f"user_fraction must be in (0, 1], got {user_fraction}")
    chosen = user_subset(dataset.num_users, user_fraction, seed)
    out = [ex for ex in out if chosen[ex.user]]
  if max_examples is not None:
    out = out[:max_examples]
  return out


def user_subset(num_users: int, user_fraction: float, seed: int = 0) -> np.ndarray:
  """[num_users + 1] bool: the seeded random users an instruction job with ``user_fraction`` covers."""
  return np.random.default_rng([seed, 7]).random(num_users + 1) < user_fraction


class _Progress:
  def __init__(self, total: int, stream=None, every_s: float = 2.0):
    self.total, self.stream, self.every_s = total, stream or sys.stderr, every_s
    self.t0 = time.time()
    self.last = 0.0

  def update(self, done: int, written: int, force: bool = False) -> None:
    """``done``: examples processed (incl. failures); ``written``: instructions stored."""
    now = time.time()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    dt = max(now - self.t0, 1e-9)
    eta = (self.total - done) * dt / done if done > 0 else float("inf")
    eta_s = "?" if eta == float("inf") else f"{eta:.0f}s"
    print(f"[instructions] {done}/{self.total} examples, {written / dt:.2f} instructions/s, "
          f"ETA {eta_s}", file=self.stream, flush=True)


def prompt_for(dataset, example, scenario: str, max_items: int,
               context_fn: Callable[..., prompt_lib.UserContext] = prompt_lib.context_for_example):
  """(store key, prompt context, context key) of one example: step 2's input."""
  ctx = context_fn(dataset, example, scenario=scenario, max_items=max_items)
  return record_key(dataset, example, scenario), ctx, prompt_lib.context_key(ctx)


def make_records(keys: Sequence[tuple], raw_texts: Sequence[str], encoder: Any, dim: int, version: str,
                 created: float, max_items: int) -> list[InstructionRecord]:
  """Step 3 after the LLM: first sentences, their embeddings (batched) and the store records of
  ``keys`` ((store key, context key) pairs); an empty sentence is a ``fallback`` record."""
  texts = [prompt_lib.postprocess(t) for t in raw_texts]
  ok = [i for i, t in enumerate(texts) if t]
  emb = np.zeros((len(keys), dim), np.float32)
  if ok:
    emb[ok] = np.asarray(encoder.encode([texts[i] for i in ok]), np.float32)
  return [InstructionRecord(dataset=key[0], user=key[1], cutoff=key[2], scenario=key[3], history_key=key[4],
                            text=texts[i], embedding=emb[i], model_version=version, created_at=created,
                            context_key=ck, status="generated" if texts[i] else "fallback", max_items=max_items)
          for i, (key, ck) in enumerate(keys)]


def run_job(dataset, examples: Sequence, store: InstructionStore, backend: Backend,
            encoder: Any, *, scenario: str = "homepage", max_items: int = 5,
            batch_size: int = 32, chunk_size: int = 256, max_age_s: Optional[float] = None,
            now_fn: Callable[[], float] = time.time,
            context_fn: Callable[..., prompt_lib.UserContext] = prompt_lib.context_for_example,
            progress_stream=None) -> JobStats:
  """Generates, embeds and stores instructions for ``examples`` (see the module docstring).

  ``encoder`` needs ``encode(list[str]) -> [N, 384] float32`` (``SentenceEncoder``).
  ``context_fn(dataset, example, scenario=..., max_items=...)`` builds the prompt context
  (tests pass a deliberately leaky one to check ``prompt.find_leaks``).
  """
  stats = JobStats()
  seen = set()
  todo = []  # (key, ctx, ctx_key, user message length)
  now = now_fn()
  for ex in examples:
    key = record_key(dataset, ex, scenario)
    if key in seen:
      continue
    seen.add(key)
    key, ctx, ck = prompt_for(dataset, ex, scenario, max_items, context_fn)
    if not needs_refresh(store.get(*key), ck, now, max_age_s):
      stats.fresh += 1
      continue
    todo.append((key, ctx, ck))
  stats.selected = len(seen)
  todo.sort(key=lambda r: len(prompt_lib.build_messages(r[1])[-1]["content"]))
  log.info("instructions: %d selected, %d fresh, %d to generate (backend %s)",
           stats.selected, stats.fresh, len(todo), getattr(backend, "version", "?"))
  progress = _Progress(len(todo), progress_stream)
  pending: list[InstructionRecord] = []
  t0 = time.time()
  for s in range(0, len(todo), batch_size):
    batch = todo[s:s + batch_size]
    try:
      raw = backend.generate([prompt_lib.build_messages(ctx) for _, ctx, _ in batch])
      if len(raw) != len(batch):
        raise BackendError(f"backend returned {len(raw)} texts for {len(batch)} chats")
    except BackendError as e:
      stats.failed += len(batch)
      log.warning("instructions: backend failed for %d examples (%d..%d), skipped: %s",
                  len(batch), s, s + len(batch) - 1, e)
      progress.update(s + len(batch), stats.generated + stats.fallback)
      continue
    records = make_records([(key, ck) for key, _, ck in batch], raw, encoder, store.dim, str(backend.version),
                           now_fn(), max_items)
    pending += records
    stats.generated += sum(r.status == "generated" for r in records)
    stats.fallback += sum(r.status == "fallback" for r in records)
    if len(pending) >= chunk_size:
      store.put(pending)
      pending = []
    progress.update(s + len(batch), stats.generated + stats.fallback)
  store.put(pending)
  stats.seconds = time.time() - t0
  progress.update(len(todo), stats.generated + stats.fallback, force=True)
  return stats


def _define_flags() -> None:
  from absl import flags

  from oxyjax import cli

  flags.DEFINE_string("dataset", None, "industrial or office (datasets with item text)", required=True)
  flags.DEFINE_string("splits", "test,validation", "comma-separated: validation,test")
  flags.DEFINE_float("train_fraction", 0.0, "seeded random fraction of training examples to add")
  flags.DEFINE_integer("seed", 0, "seed of the example and user selection")
  flags.DEFINE_float("user_fraction", 1.0, "keep only a seeded random subset of users (all their selected examples)")
  flags.DEFINE_integer("max_examples", None, "keep the first N selected examples")
  flags.DEFINE_string("store", ".cache/instructions", "store directory")
  flags.DEFINE_string("scenario", "homepage", "scenario the instructions are written for")
  flags.DEFINE_integer("max_items", 5, "recent history items in the prompt")
  flags.DEFINE_string("backend", "smollm", "smollm | openai (gin: make_backend)")
  flags.DEFINE_string("base_url", None, "openai backend: server root URL")
  flags.DEFINE_string("model", None, "openai backend: model name")
  flags.DEFINE_integer("batch_size", 32, "prompts per LLM call")
  flags.DEFINE_integer("max_new_tokens", None, "smollm backend")
  flags.DEFINE_integer("chunk_size", 256, "records per atomic store write")
  flags.DEFINE_float("max_age_s", None, "regenerate records older than this (default: never by age)")
  cli.define_gin_flags()  # gin files configure make_backend, SmolLMBackend, OpenAIBackend


def examples_from_flags(dataset, args) -> list:
  """Step 1 with the flags' settings (--splits, --train_fraction, --seed, --max_examples, --user_fraction)."""
  splits = [s.strip() for s in args.splits.split(",") if s.strip()]
  return select_examples(dataset, splits, args.train_fraction, args.seed, args.max_examples, args.user_fraction)


def backend_kwargs(args) -> dict[str, Any]:
  """`make_backend` keyword arguments from the flags (the backend's own ones only)."""
  kwargs: dict[str, Any] = {}
  if args.backend == "smollm":
    kwargs["batch_size"] = args.batch_size
    if args.max_new_tokens is not None:
      kwargs["max_new_tokens"] = args.max_new_tokens
  else:
    if args.base_url:
      kwargs["base_url"] = args.base_url
    if args.model:
      kwargs["model"] = args.model
  return kwargs


def main(argv: Sequence[str]) -> JobStats:
  """The job, with the flags `cli.run` parsed (`python -m oxyjax.instructions.generate --help`)."""
  from absl import flags

  from oxyjax import cli
  from oxyjax.data.readers import load_dataset
  from oxyjax.instructions.llm import make_backend
  from oxyjax.sid.embeddings import SentenceEncoder

  del argv  # flags only: cli.run refuses positional arguments
  args = flags.FLAGS
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  cli.parse_gin(args)
  t_load = time.time()
  dataset = load_dataset(args.dataset)
  examples = examples_from_flags(dataset, args)
  backend = make_backend(name=args.backend, **backend_kwargs(args))
  encoder = SentenceEncoder()
  store = InstructionStore(args.store)
  print(f"[instructions] loaded dataset {dataset.name}, backend {backend.version}, encoder and "
        f"store {store.path} ({len(store)} records) in {time.time() - t_load:.1f}s", flush=True)
  stats = run_job(dataset, examples, store, backend, encoder, scenario=args.scenario,
                  max_items=args.max_items, batch_size=args.batch_size,
                  chunk_size=args.chunk_size, max_age_s=args.max_age_s)
  print(f"[instructions] done: {stats.selected} selected, {stats.fresh} fresh, "
        f"{stats.generated} generated, {stats.fallback} fallback, {stats.failed} failed; "
        f"{stats.seconds:.1f}s, {stats.instructions_per_s:.3f} instructions/s end to end",
        flush=True)
  return stats


def run() -> None:
  from oxyjax import cli

  _define_flags()
  cli.run(main, PROG)


if __name__ == "__main__":
  # Re-import under the package name so gin bindings refer to oxyjax.instructions.*.
  from oxyjax.instructions import generate as _generate_module

  _generate_module.run()
