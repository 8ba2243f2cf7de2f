r"""Trains a generative recommender; evaluates on validation during training and on test at the end.

The library function `train(*, ...)` takes plain keyword arguments. Gin appears only in
`__main__` (t5x style):

  python -m oxyjax.train --gin_file=gin_configs/experiments/beauty.gin \
      --gin_bindings='train.batch_size = 512' --gin.MODEL_DIR=\"/tmp/run\"

`--gin_file` repeats (later wins); `--gin_bindings` repeats; `--gin.NAME=VALUE` is shorthand
for the binding `NAME = VALUE`. Without flags the quickstart config runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from oxyjax import checkpoints
from oxyjax import distributed
from oxyjax import flops as flops_lib
from oxyjax import losses
from oxyjax import metrics as metrics_lib
from oxyjax import partitioning
from oxyjax.data import feature_converter
from oxyjax.data import pipeline
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.models.rec_model import RecModel
from oxyjax.sid import build as sid_build
from oxyjax.sid.trie import PrefixTrie

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ====================================================================== configs
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then cosine (or linear / constant) decay."""

  learning_rate: float = 1e-3
  warmup_steps: int = 500
  decay: str = "cosine"  # cosine | linear | constant
  end_learning_rate_ratio: float = 0.05
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  # > 0: also keep an exponential moving average of the weights (Polyak averaging), with the
  # warm-up d_t = min(ema_decay, (1 + t) / (10 + t)). Evaluation, the best-on-validation
  # checkpoint and the final metrics then use the average; the raw weights are still scored
  # at every evaluation (logged as validation_raw/...).
  ema_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class SIDConfig:
  """How the semantic-ID table is obtained: loaded from `path`, or built and cached."""

  path: str | None = None
  num_levels: int = 3
  codebook_size: int = 256
  embedding: str = "auto"  # auto | text | collaborative
  balance: str = "residual"  # which k-means levels use balanced assignment: residual | none | all
  seed: int = 0
  cache_dir: str | None = None  # default: <repo>/.cache/sid/<dataset>_<settings>


@dataclasses.dataclass(frozen=True)
class InstructionsConfig:
  """Reasoning instructions I_r (PAPER.md section 1) read from the near-line store.

  Examples whose instruction is missing, stale (older than `max_age_s`) or a fallback get
  the model's learned default instruction; the counts are logged per split.
  """

  store: str | None = None  # instruction store written by `python -m oxyjax.instructions.generate`
  scenario: str = "homepage"
  max_age_s: float | None = None  # None: never stale
  # Also evaluate each final split on just the examples that carry a generated instruction
  # (reported as '<split>_with_instruction'); works for models that do not read I_r too, so
  # that every ablation row is compared on the same examples.
  evaluate_covered_subset: bool = True


def instruction_coverage(dataset: str, split: str, cfg: InstructionsConfig) -> np.ndarray:
  """[N] bool: which examples of `split` have a fresh generated instruction in the store."""
  from oxyjax.data import readers
  from oxyjax.instructions.store import InstructionStore

  ds = readers.load_dataset(dataset)
  _, present, _ = InstructionStore(cfg.store, create=False).lookup_embeddings(
      ds, ds.split(split), scenario=cfg.scenario, now=time.time(), max_age_s=cfg.max_age_s)
  return present


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
  end = cfg.learning_rate * cfg.end_learning_rate_ratio
  if cfg.decay == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1), end)
  elif cfg.decay == "linear":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
         optax.linear_schedule(cfg.learning_rate, end, max(total_steps - warmup, 1))], [warmup])
  elif cfg.decay == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)), optax.constant_schedule(cfg.learning_rate)],
        [warmup])
  else:
    raise ValueError(f"unknown decay {cfg.decay!r}; expected cosine | linear | constant")
  # No weight decay on norms, biases and 1-d parameters.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
  )
  return tx, schedule


def load_instructions(arrays: pipeline.ExampleArrays, dataset: str, split: str, cfg: InstructionsConfig,
                      instruction_dim: int, log=print) -> pipeline.ExampleArrays:
  """Attaches `instruction_embedding` [N, Dr] and `instruction_mask` [N] to a split's arrays.

  Rows follow the reader's order (as `pipeline.load_split` does), so row i is the split's
  i-th example. Without a store every row uses the learned default.
  """
  n = len(arrays)
  if not cfg.store:
    emb, present = np.zeros((n, instruction_dim), np.float32), np.zeros((n,), bool)
    log(f"[oxyjax] {dataset} {split}: no instruction store; all {n} examples use the learned default instruction")
  else:
    from oxyjax.data import readers
    from oxyjax.instructions.store import InstructionStore

    ds = readers.load_dataset(dataset)
    examples = ds.split(split)
    if len(examples) != n:
      raise ValueError(f"{dataset} {split}: {len(examples)} reader examples but {n} rows")
    if not os.path.isdir(cfg.store):
      raise FileNotFoundError(f"instruction store {cfg.store!r} does not exist; write it with "
                              f"`python -m oxyjax.instructions.generate --dataset={dataset} --store={cfg.store}`")
    emb, present, stats = InstructionStore(cfg.store, dim=instruction_dim, create=False).lookup_embeddings(
        ds, examples, scenario=cfg.scenario, now=time.time(), max_age_s=cfg.max_age_s)
    if emb.shape != (n, instruction_dim):
      raise ValueError(f"instruction store {cfg.store}: embeddings {emb.shape}, model expects [{n}, {instruction_dim}]")
    log(f"[oxyjax] {dataset} {split}: {int(present.sum())}/{n} examples carry a generated instruction "
        f"({stats}); the rest use the learned default")
  return arrays.with_extras(instruction_embedding=np.asarray(emb, np.float32), instruction_mask=np.asarray(present, bool))


def load_sid_table(dataset: str, cfg: SIDConfig):
  """Loads the SID table from cfg.path, or builds it (and caches it) for the dataset."""
  from oxyjax.sid.table import SIDTable

  if cfg.path:
    return SIDTable.load(cfg.path)
  key = f"{dataset}_{cfg.embedding}_{cfg.num_levels}x{cfg.codebook_size}_{cfg.balance}_s{cfg.seed}"
  out_dir = cfg.cache_dir or os.path.join(REPO_ROOT, ".cache", "sid", key)
  table_path = os.path.join(out_dir, "sid_table")
  if os.path.exists(table_path + ".npz"):
    return SIDTable.load(table_path)
  # Item embeddings depend only on the dataset: one cache shared by every SID setting.
  return sid_build.build_sid_table(dataset, num_levels=cfg.num_levels, codebook_size=cfg.codebook_size,
                                   embedding=cfg.embedding, seed=cfg.seed, out_dir=out_dir, balance=cfg.balance,
                                   embedding_cache_dir=os.path.join(REPO_ROOT, ".cache", "sid", dataset))


# ====================================================================== steps
def ema_update(ema_params, new_params, step, decay: float):
  """One Polyak-averaging step: d = min(decay, (1 + step) / (10 + step)) (step counts from 0)."""
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, new_params)


def _eval_params(state):
  """The weights that evaluation and the best checkpoint use: the EMA when there is one."""
  return state.get("ema_params", state["params"])


def make_train_step(model: RecModel, tx: optax.GradientTransformation, grad_accum_steps: int,
                    ema_decay: float = 0.0):
  """(state, batch, rng) -> (state, metrics). Microbatches are interleaved rows (row i goes to
  microbatch i % A) so that each device's shard of the batch is split locally. With
  `ema_decay` > 0 the state also carries `ema_params`, updated after every step."""

  def train_step(state, batch, rng):
    params = state["params"]
    step_rng = jax.random.fold_in(rng, state["step"])
    a = grad_accum_steps

    def micro(i, mb):
      r = jax.random.fold_in(step_rng, i)
      (loss_sum, aux), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, mb, r)
      return grads, loss_sum, aux

    if a == 1:
      grads, loss_sum, aux = micro(0, batch)
    else:
      mbs = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), batch)

      def body(carry, xs):
        i, mb = xs
        return jax.tree.map(jnp.add, carry, micro(i, mb)), None

      zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), jax.eval_shape(lambda: micro(0, jax.tree.map(lambda x: x[0], mbs))))
      (grads, loss_sum, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(a), mbs))
    denom = jnp.maximum(aux["denominator"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": loss_sum / denom, "token_accuracy": aux["correct"] / denom, "grad_norm": optax.global_norm(grads)}
    # Any other auxiliary scalar (Q2I parts, MoE load balance) is averaged over microbatches.
    metrics.update({k: v / a for k, v in aux.items() if k not in ("denominator", "correct")})
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    if ema_decay > 0:
      new_state["ema_params"] = ema_update(state["ema_params"], new_params, state["step"], ema_decay)
    return new_state, metrics

  return train_step


# ====================================================================== evaluation
class Evaluator:
  """Runs constrained beam search over a split and computes full-catalogue metrics."""

  def __init__(self, model: RecModel, partitioner: partitioning.Partitioner, trie: PrefixTrie, *,
               beam_size: int, batch_size: int, ks: Sequence[int] = (1, 5, 10, 20),
               score_normalization: str = "vocab"):
    self.model, self.partitioner, self.trie = model, partitioner, trie
    self.beam_size, self.ks = beam_size, tuple(k for k in ks if k <= beam_size)
    dp = partitioner.data_parallel_size
    self.batch_size = max(dp, int(math.ceil(batch_size / dp)) * dp)
    self._predict = jax.jit(functools.partial(model.predict, beam_size=beam_size, normalize=score_normalization))

  def __call__(self, params, arrays: pipeline.ExampleArrays, max_examples: int | None = None) -> dict[str, float]:
    if max_examples is not None and len(arrays) > max_examples:
      # A fixed random subset: the files are ordered by user id, and the first users are
      # not representative (the first 3,000 of Beauty score half the full split's recall).
      subset = np.sort(np.random.default_rng(0).choice(len(arrays), max_examples, replace=False))
      arrays = arrays.take(subset)
    acc = metrics_lib.MetricsAccumulator(ks=self.ks)
    # Several processes: each feeds its slice of every global batch (`eval_batches` with the
    # process index), and the predictions, targets and masks of the whole global batch are
    # gathered from the sharded arrays, so every host computes the same global metrics.
    pi, pc = jax.process_index(), jax.process_count()
    if self.batch_size % pc:
      raise ValueError(f"eval batch size {self.batch_size} is not divisible by {pc} processes")
    for examples, mask in pipeline.eval_batches(arrays, self.batch_size, process_index=pi, process_count=pc):
      batch = self.model.convert_features(examples, weights=mask.astype(np.float32))
      with jax.set_mesh(self.partitioner.mesh), self.partitioner.rules_context():
        sharded = self.partitioner.shard_batch(batch)
        out = self._predict(params, sharded, self.trie)
      if pc == 1:
        acc.update(np.asarray(jax.device_get(out.items)), batch["target_items"], mask=mask)
      else:
        from jax.experimental import multihost_utils
        g_mask = self.partitioner.shard_batch({"mask": mask})["mask"]
        items, targets, g_mask = multihost_utils.process_allgather(
            (out.items, sharded["target_items"], g_mask), tiled=True)
        acc.update(np.asarray(items), np.asarray(targets), mask=np.asarray(g_mask, bool))
    return acc.result()


# ====================================================================== logging
class ProgressLogger:
  """Console progress line (steps/s, examples/s, loss, ETA) and TensorBoard scalars."""

  def __init__(self, model_dir: str | None, total_steps: int, batch_size: int, enabled: bool = True):
    self.total, self.batch_size, self.enabled = total_steps, batch_size, enabled
    self.writer = None
    if model_dir and enabled:
      try:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(model_dir, "tensorboard"))
      except ImportError:  # pragma: no cover
        self.writer = None
    self._t0, self._step0 = time.time(), None

  def scalars(self, step: int, values: dict[str, float], prefix: str = ""):
    if self.writer:
      for k, v in values.items():
        self.writer.add_scalar(prefix + k, float(v), step)
      self.writer.flush()

  def progress(self, step: int, values: dict[str, float]):
    now = time.time()
    if self._step0 is None:
      self._step0, self._t0 = step, now
      rate = float("nan")
    else:
      rate = (step - self._step0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
    vals = " | ".join(f"{k} {v:.4f}" if abs(v) < 1e6 else f"{k} {v:.3e}" for k, v in values.items())
    if self.enabled:
      print(f"step {step}/{self.total} | {vals} | {rate:.2f} steps/s | {rate * self.batch_size:.0f} ex/s | "
            f"ETA {eta_s}", flush=True)
    self.scalars(step, {**values, "steps_per_second": rate if rate == rate else 0.0}, "train/")

  def close(self):
    if self.writer:
      self.writer.close()


# ====================================================================== train
@dataclasses.dataclass
class TrainResult:
  state: Any
  final_step: int
  validation: dict[str, float] | None
  test: dict[str, float] | None
  best_step: int | None
  train_seconds: float
  history: list[dict[str, float]]


def train(
    *,
    dataset: str,
    model_config: ModelConfig = ModelConfig(),
    optimizer: OptimizerConfig = OptimizerConfig(),
    sid: SIDConfig = SIDConfig(),
    mesh_shape: dict[str, int] | None = None,
    dcn_mesh_shape: dict[str, int] | None = None,
    model_dir: str | None = None,
    batch_size: int = 256,
    num_train_steps: int | None = None,
    num_epochs: float | None = 10.0,
    grad_accum_steps: int = 1,
    seed: int = 0,
    label_smoothing: float = 0.0,
    q2i: losses.Q2IConfig = losses.Q2IConfig(),
    instructions: InstructionsConfig = InstructionsConfig(),
    data_source: str = "seqio",
    length_bucketing: bool = True,
    bucket_multiple: int = 4,
    eval_every_steps: int = 0,
    eval_max_examples: int | None = 2000,
    eval_batch_size: int = 256,
    eval_beam_size: int = 20,
    eval_score_normalization: str = "vocab",
    final_eval_splits: Sequence[str] = ("validation", "test"),
    checkpoint_every_steps: int = 1000,
    keep_checkpoints: int = 3,
    async_checkpointing: bool = True,
    init_checkpoint: str | None = None,
    log_every_steps: int = 50,
    stop_after_steps: int | None = None,
    eval_only: bool = False,
    verbose: bool = True,
) -> TrainResult:
  """Trains `model_config` on `dataset` ('beauty', 'sports', 'industrial', 'office').

  The global batch of `batch_size` examples is split into `grad_accum_steps` microbatches.
  Training length is `num_train_steps`, else `num_epochs` over the training split.
  With `model_dir`, checkpoints (state + data position) are saved every
  `checkpoint_every_steps` and at the end, and a rerun resumes from the latest one.
  `eval_every_steps` > 0 evaluates on (up to `eval_max_examples` of) validation and keeps the
  best weights by validation recall@10; the final test evaluation uses those weights.
  `eval_score_normalization` ('vocab' or 'valid') is the beam search's per-level
  normalisation (`decoding.beam_search`).
  `length_bucketing` batches examples of similar history length together and trims
  padding columns to a multiple of `bucket_multiple` (fewer encoder FLOPs; a few compiled
  shapes: a larger multiple compiles fewer shapes and needs less compile-time memory).
  `stop_after_steps` stops early (after a checkpoint) as if the job were killed: for tests.
  `eval_only` trains nothing: it evaluates the run in `model_dir` (its best-on-validation
  weights, else its latest checkpoint) or `init_checkpoint` on `final_eval_splits`, and
  merges the results into `<model_dir>/run_summary.json`.
  """
  t_start = time.time()
  log = print if verbose else (lambda *a, **k: None)
  if batch_size % grad_accum_steps:
    raise ValueError(f"batch_size {batch_size} is not divisible by grad_accum_steps {grad_accum_steps}")
  part = partitioning.Partitioner(mesh_shape, dcn_mesh_shape=dcn_mesh_shape)
  log(f"[oxyjax] devices: {jax.device_count()} x {jax.devices()[0].platform} ({jax.process_count()} processes); {part}")
  # Multi-host: decisions every process must share (no-ops for one process).
  distributed.assert_same_across_hosts(seed, "seed")
  distributed.assert_same_across_hosts(batch_size, "global batch_size")
  if batch_size % part.data_parallel_size:
    raise ValueError(f"batch_size {batch_size} must be divisible by the data-parallel size {part.data_parallel_size}")
  if (batch_size // grad_accum_steps) % part.data_parallel_size:
    raise ValueError("each microbatch must be divisible by the data-parallel size")

  # ---- data, SIDs, model
  table = load_sid_table(dataset, sid)
  distributed.assert_same_across_hosts(distributed.checksum(table.codes), "SID table codes checksum")
  text = sid_build.item_text_embeddings(dataset) if model_config.text_dim else None
  model = RecModel(model_config, table.codes, label_smoothing=label_smoothing, item_text_embeddings=text, q2i=q2i)
  cfg = model.config

  def load_split(split):
    arrays = pipeline.load_split(dataset, split, cfg.max_history, source=data_source)
    if cfg.instruction_dim:
      arrays = load_instructions(arrays, dataset, split, instructions, cfg.instruction_dim, log)
    return arrays

  train_arrays = load_split("train")
  num_items = table.codes.shape[0] - 1
  trie = PrefixTrie.from_codes(table.codes[1:], np.arange(1, num_items + 1, dtype=np.int32))
  steps_per_epoch = max(1, len(train_arrays) // batch_size)
  total_steps = int(num_train_steps or math.ceil(num_epochs * steps_per_epoch))
  log(f"[oxyjax] {dataset}: {len(train_arrays)} training examples, {num_items} items, SID levels "
      f"{cfg.sid_vocab_sizes}; {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of batch {batch_size}")
  # Length bucketing trims each batch to its longest history; with several processes the
  # trimmed width would differ per host, so it is single-process only for now.
  bucketing = length_bucketing and jax.process_count() == 1
  it = pipeline.BatchIterator(train_arrays, batch_size, seed=seed, process_index=jax.process_index(),
                              process_count=jax.process_count(), bucket_by_length=bucketing)

  # ---- state: abstract shapes -> shardings -> sharded init
  tx, schedule = make_optimizer(optimizer, total_steps)
  dummy = model.dummy_batch(part.data_parallel_size)

  def init_state(rng):
    params = model.init(rng, dummy)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if optimizer.ema_decay > 0:
      state["ema_params"] = params
    return state

  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  with jax.set_mesh(part.mesh), part.rules_context():
    boxed = jax.eval_shape(init_state, init_rng)
    shardings = part.params_shardings(boxed)
    abstract = partitioning.strip_boxes(boxed)
    state_sharded = checkpoints.abstract_with_shardings(abstract, shardings)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  log(f"[oxyjax] model: {n_params / 1e6:.2f}M parameters, {cfg}")

  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints,
                                  save_every_steps=checkpoint_every_steps,
                                  async_save=async_checkpointing) if model_dir else None
  best_dir = os.path.join(model_dir, "best") if model_dir else None
  history: list[dict[str, float]] = []
  best = {"score": -1.0, "step": None}
  restored = ckpt.restore_latest(state_sharded, log=log) if ckpt is not None else None  # unreadable ones set aside
  if restored is not None:
    step0, state, data_state = restored
    it.restore(data_state["iterator"])
    best = checkpoints.check_best(best_dir, data_state.get("best", best), state_sharded["params"], log=log)
    history = data_state.get("history", [])
    log(f"[oxyjax] resumed from {ckpt.directory} step {step0}")
  else:
    with jax.set_mesh(part.mesh), part.rules_context():
      state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(init_rng)
    if init_checkpoint:
      params, meta = checkpoints.load_params(init_checkpoint, state_sharded["params"])
      state = {**state, "params": params}
      if "ema_params" in state:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
      log(f"[oxyjax] loaded weights from {init_checkpoint} ({meta})")

  train_step = jax.jit(
      make_train_step(model, tx, grad_accum_steps, optimizer.ema_decay),
      in_shardings=(shardings, {k: part.data_sharding(np.ndim(v)) for k, v in dummy.items()}, part.replicated()),
      out_shardings=(shardings, part.replicated()),
      donate_argnums=(0,),
  )
  evaluator = Evaluator(model, part, trie, beam_size=eval_beam_size, batch_size=eval_batch_size,
                        score_normalization=eval_score_normalization)
  valid_arrays = None
  logger = ProgressLogger(model_dir if jax.process_index() == 0 else None, total_steps, batch_size,
                          enabled=verbose and jax.process_index() == 0)

  def data_state():
    return {"iterator": it.state(), "best": best, "history": history}

  step = int(jax.device_get(state["step"]))
  if eval_only:
    if ckpt is None or ckpt.latest_step() is None:
      if not init_checkpoint:
        raise ValueError("eval_only needs a model_dir with checkpoints or an init_checkpoint")
    total_steps = step  # nothing to train
  train_t0, examples_seen = time.time(), 0
  window = []
  # MFU: model FLOPs of a step (XLA cost analysis of the compiled step for the first batch
  # shape, else 6 * params * tokens; other shapes, from length bucketing, scaled by their
  # tokens); timed windows start after this run's first (compiling) step.
  flops_ref = None  # (FLOPs, tokens) of the first batch shape
  flops_window = {"t0": None, "flops": 0.0, "steps": 0}
  while step < total_steps:
    host_batch = model.convert_features(next(it))
    if bucketing:
      host_batch = feature_converter.trim_history(host_batch, multiple=bucket_multiple)
    with jax.set_mesh(part.mesh), part.rules_context():
      sharded_batch = part.shard_batch(host_batch)
      state, m = train_step(state, sharded_batch, train_rng)
      tokens = batch_size * (host_batch["history_items"].shape[1] + cfg.num_levels + 2)
      if flops_ref is None:  # lowered again, but the compilation is cached
        flops_ref = flops_lib.train_step_flops(train_step.lower(state, sharded_batch, train_rng).compile(),
                                               jax.device_count(), num_params=n_params, tokens_per_step=tokens)
        log(f"[oxyjax] train step {sharded_batch['history_items'].shape}: {flops_ref[0]:.3e} FLOPs ({flops_ref[1]}); "
            f"device {jax.devices()[0].device_kind}, peak FLOP/s "
            f"{flops_lib.peak_flops_per_device(jax.devices()[0].device_kind) or 'unknown (no MFU)'}")
        flops_ref = (flops_ref[0], tokens)
    step += 1
    examples_seen += batch_size
    window.append(m)
    if flops_window["t0"] is None:
      jax.block_until_ready(m)
      flops_window.update(t0=time.time(), flops=0.0, steps=0)
    else:
      flops_window["flops"] += flops_ref[0] * tokens / flops_ref[1]
      flops_window["steps"] += 1
    if step % log_every_steps == 0 or step == total_steps:
      vals = {k: float(np.mean([float(x[k]) for x in window])) for k in window[0]}
      vals["learning_rate"] = float(schedule(step))
      if flops_window["steps"]:
        dt = (time.time() - flops_window["t0"]) / flops_window["steps"]
        vals.update(flops_lib.utilization(flops_window["flops"] / flops_window["steps"], dt, jax.device_count(),
                                          jax.devices()[0].device_kind))
      logger.progress(step, vals)
      window = []
    if eval_every_steps and (step % eval_every_steps == 0 or step == total_steps):
      if valid_arrays is None:
        valid_arrays = load_split("validation")
      res = evaluator(_eval_params(state), valid_arrays, eval_max_examples)
      history.append({"step": step, **res})
      logger.scalars(step, res, "validation/")
      if "ema_params" in state:  # the raw weights too, to see what the average buys
        raw = evaluator(state["params"], valid_arrays, eval_max_examples)
        history[-1].update({f"raw_{k}": v for k, v in raw.items()})
        logger.scalars(step, raw, "validation_raw/")
        log(f"[oxyjax] step {step} validation, raw weights: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(raw.items()) if k.startswith(("recall", "ndcg"))))
      log(f"[oxyjax] step {step} validation (random {eval_max_examples}"
          f"{', EMA weights' if 'ema_params' in state else ''}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(res.items())))
      score = res.get("recall@10", res.get(f"recall@{max(evaluator.ks)}", 0.0))
      improved = score > best["score"]
      if jax.process_count() > 1:  # a host-0 decision: every host saves (or not) together
        improved = bool(distributed.broadcast_from_host0(np.asarray(improved)))
      if improved and best_dir:
        best = {"score": float(score), "step": step}
        checkpoints.save_params(best_dir, _eval_params(state),
                                {"step": step, "recall@10": float(score), "ema": "ema_params" in state})
    stopping = stop_after_steps is not None and step >= stop_after_steps
    if ckpt is not None:  # one save per step: on the interval, at the end, or when stopping early
      ckpt.save(step, state, data_state(), force=(step == total_steps or stopping))
    if step % log_every_steps == 0:  # the next timed window starts after logging, eval and saving
      flops_window.update(t0=time.time(), flops=0.0, steps=0)
    if stopping:
      if ckpt is not None:
        ckpt.wait()
      log(f"[oxyjax] stopping early at step {step} (stop_after_steps)")
      logger.close()
      return TrainResult(state, step, None, None, best["step"], time.time() - t_start, history)
  train_seconds = time.time() - train_t0
  if ckpt is not None:
    ckpt.wait()
  log(f"[oxyjax] trained to step {step} in {train_seconds:.1f}s "
      f"({examples_seen / max(train_seconds, 1e-9):.0f} examples/s this run)")

  # ---- final evaluation on the best-on-validation weights
  params = _eval_params(state)
  if best["step"] is not None and best_dir:
    params, _ = checkpoints.load_params(best_dir, state_sharded["params"])
    log(f"[oxyjax] final evaluation uses the best validation checkpoint (step {best['step']})")
  results: dict[str, dict[str, float]] = {}
  for split in final_eval_splits:
    arrays = load_split(split)
    evaluated = {split: arrays}
    if instructions.store and instructions.evaluate_covered_subset:
      covered = arrays.extras.get("instruction_mask")  # already looked up when the model reads I_r
      if covered is None:
        covered = instruction_coverage(dataset, split, instructions)
      if covered.any():
        evaluated[f"{split}_with_instruction"] = arrays.take(np.flatnonzero(covered))
    for name, subset in evaluated.items():
      results[name] = evaluator(params, subset, None)
      log(f"[oxyjax] {dataset} {name} ({len(subset)} examples, beam {eval_beam_size}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results[name].items())))
  if model_dir and jax.process_index() == 0 and results:
    summary_path = os.path.join(model_dir, "run_summary.json")
    summary = {"dataset": dataset, "steps": step, "train_seconds": train_seconds, "best_step": best["step"],
               "parameters": n_params, "results": results, "validation_history": history}
    if eval_only and os.path.exists(summary_path):  # keep the training record, update the results
      with open(summary_path) as f:
        old = json.load(f)
      summary = {**old, "results": {**old.get("results", {}), **results}}
    metrics_lib.write_metrics({f"{dataset}/{s}": r for s, r in summary["results"].items()},
                              os.path.join(model_dir, "metrics"))
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=1)
    os.replace(tmp, summary_path)
  logger.close()
  if ckpt is not None:
    ckpt.close()
  return TrainResult(state, step, results.get("validation"), results.get("test"), best["step"],
                     time.time() - t_start, history)


# ====================================================================== gin edge
def _rewrite_gin_shorthand(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Turns `--gin.NAME=VALUE` into gin bindings; returns (remaining argv, bindings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


DEFAULT_GIN_FILE = os.path.join(REPO_ROOT, "gin_configs", "modes", "quickstart.gin")


def main(argv: Sequence[str] | None = None):
  import gin
  from absl import flags

  # Multi-host runtime first, before anything touches a JAX device (no-op for one process).
  distributed.initialize()
  argv = list(sys.argv if argv is None else argv)
  argv, shorthand = _rewrite_gin_shorthand(argv)
  flags.DEFINE_multi_string("gin_file", None, "Gin config files; later files override earlier ones.")
  flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, applied after the files.")
  flags.DEFINE_multi_string("gin_search_paths", [REPO_ROOT, os.path.join(REPO_ROOT, "gin_configs")],
                            "Paths searched for gin files and includes.")
  fl = flags.FLAGS
  fl(argv)
  for p in fl.gin_search_paths:
    gin.add_config_file_search_path(p)
  files = fl.gin_file or [DEFAULT_GIN_FILE]
  gin.parse_config_files_and_bindings(files, list(fl.gin_bindings) + shorthand)
  print("[oxyjax] gin config:\n" + gin.config_str(), flush=True)
  return gin.get_configurable(train)()


if __name__ == "__main__":
  # Re-import under the package name so gin files can refer to `oxyjax.train.train`.
  from oxyjax import train as _train_module

  _train_module.main()
