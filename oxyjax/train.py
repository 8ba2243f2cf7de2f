r"""Trains a generative recommender; evaluates on validation during training and on test at the end.

  python -m oxyjax.train --gin_file=gin_configs/experiments/beauty.gin \
      --gin_bindings='oxyjax.train.train.batch_size = 512' --gin.MODEL_DIR="'/tmp/run'"

`--gin_file` repeats (later wins); `--gin_bindings` repeats; `--gin.NAME=VALUE` is shorthand
for the binding `NAME = VALUE`. Without flags the quickstart config runs
(gin_configs/modes/quickstart.gin). Gin files (searched under the repo and gin_configs/):
run modes in modes/, model sizes in models/, experiments in experiments/, slow-thinking
ablation rows in slow_thinking/.

The library function `train(*, ...)` takes plain keyword arguments; gin appears only in
`main` (t5x style). It wires the parts: `experiment.setup` (data, SIDs, model, artifact),
`trainer.restore_or_init`, `trainer.train_loop` with its hooks, `evaluation.Evaluator`.
`evaluate_run` evaluates a run's artifact without the training split or the optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from oxyjax import checkpoints
from oxyjax import cli
from oxyjax import experiment as experiment_lib
from oxyjax import fileio
from oxyjax import flops as flops_lib
from oxyjax import losses
from oxyjax import metrics as metrics_lib
from oxyjax import partitioning
from oxyjax import rescoring as rescoring_lib
from oxyjax import trainer as trainer_lib
from oxyjax.artifact import ArtifactError, ModelArtifact, artifact_dir
from oxyjax.data import feature_converter
from oxyjax.data import pipeline
from oxyjax.data import user_data  # noqa: F401  (gin: user_dataset)
from oxyjax.data.scenarios import ScenarioConfig  # noqa: F401  (gin: oxyjax.train.ScenarioConfig)
from oxyjax.evaluation import BEAMS_PREFIX, Evaluator
from oxyjax.experiment import (InstructionsConfig, SIDConfig, instruction_coverage, load_instructions,  # noqa: F401
                               load_sid_table)
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.rescoring import RescoringConfig  # noqa: F401  (gin: oxyjax.train.RescoringConfig)
from oxyjax.trainer import OptimizerConfig, make_optimizer, make_train_step  # noqa: F401  (gin and callers)

REPO_ROOT = experiment_lib.REPO_ROOT
DEFAULT_GIN_FILE = os.path.join(REPO_ROOT, "gin_configs", "modes", "quickstart.gin")


@dataclasses.dataclass
class TrainResult:
  state: Any
  final_step: int
  validation: dict[str, float] | None
  test: dict[str, float] | None
  best_step: int | None
  train_seconds: float
  history: list[dict[str, float]]


def evaluate_final(exp: experiment_lib.Experiment, evaluator: Evaluator, params, splits: Sequence[str],
                    log=print, max_examples: int | None = None) -> dict[str, dict[str, float]]:
  """Every split in full (and, with an instruction store, the examples that carry an instruction);
  with scenarios, one row per scenario ('<split>/<scenario>', decoded over its pool) and their mean
  ('<split>/mean')."""
  results: dict[str, dict[str, float]] = {}
  instructions = exp.instructions
  for split in splits:
    if exp.scenarios:
      rows = evaluator.scenarios(params, exp.eval_sets(split), max_examples, exp.trie)
      if instructions.store and instructions.evaluate_covered_subset:
        rows.update(covered_scenario_rows(evaluator, params, exp, split, max_examples))
      for name, r in rows.items():
        name = name if "/" in name else f"{split}/{name}"
        results[name] = r
        log(f"[oxyjax] {exp.dataset} {name} (beam {evaluator.beam_size}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(r.items())))
      continue
    arrays = exp.load_split(split)
    evaluated = {split: arrays}
    if instructions.store and instructions.evaluate_covered_subset:
      covered = arrays.extras.get("instruction_mask")  # already looked up when the model reads I_r
      if covered is None:
        covered = instruction_coverage(exp.dataset, split, instructions)
      if covered.any():
        evaluated[f"{split}_with_instruction"] = arrays.take(np.flatnonzero(covered))
    for name, subset in evaluated.items():
      results[name] = evaluator(params, subset, max_examples)
      log(f"[oxyjax] {exp.dataset} {name} ({len(subset)} examples, beam {evaluator.beam_size}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results[name].items())))
  return results


def check_rescoring(rescoring: RescoringConfig, scenarios: Sequence[str], score_normalization: str,
                    level_weights) -> None:
  """Before any training: the per-scenario weights name this run's ``scenarios`` (their names, by
  id; empty for one dataset), and with re-scoring on, `check_second_stage`."""
  rescoring.stage_weights(scenarios)
  if rescoring.enabled:
    check_second_stage(score_normalization, level_weights, field="RescoringConfig.weight")


def check_second_stage(score_normalization: str, level_weights, *, field: str) -> None:
  """A second stage needs one process and the beams' joint log-probabilities (the scores it
  fuses); `field` names the setting that asked for it."""
  if jax.process_count() != 1:
    raise ValueError(f"{field}: re-scoring runs in one process (not with several processes)")
  if score_normalization not in ("vocab", "last_valid") or level_weights is not None:
    raise ValueError(f"{field}: re-scoring fuses the beams' joint log-probabilities; it needs "
                     "eval_score_normalization 'vocab' (or 'last_valid') and no eval_level_weights")


def final_results(exp: experiment_lib.Experiment, evaluator: Evaluator, params, splits: Sequence[str],
                  rescoring: RescoringConfig, partitioner: partitioning.Partitioner, log=print,
                  max_examples: int | None = None, model_dir: str | None = None) -> dict[str, dict[str, float]]:
  """`evaluate_final`, and with re-scoring on, `stage_results` with the dataset's scorer (trained,
  or read from its content-keyed cache)."""
  if not rescoring.enabled:
    return evaluate_final(exp, evaluator, params, splits, log, max_examples)
  names = [s.name for s in exp.scenarios]  # by scenario id
  check_rescoring(rescoring, names, evaluator.score_normalization, evaluator.level_weights)
  scorer = rescoring_lib.get_scorer(exp.dataset, rescoring, log, domains=exp.artifact.domains)
  stage = rescoring_lib.SecondStage(scorer, rescoring.weight, rescoring.union, rescoring.stage_weights(names))
  return stage_results(exp, evaluator, params, splits, stage, partitioner, log, max_examples, model_dir)


def stage_results(exp: experiment_lib.Experiment, evaluator: Evaluator, params, splits: Sequence[str],
                  stage: rescoring_lib.SecondStage, partitioner: partitioning.Partitioner, log=print,
                  max_examples: int | None = None, model_dir: str | None = None,
                  field: str = "RescoringConfig.weight") -> dict[str, dict[str, float]]:
  """`evaluate_final` with `stage` re-ranking the beams: its metrics under `<split>` and the beams
  alone (from the same decoding pass) under `<split>_beams`; the stage is saved into
  `<model_dir>/second_stage` for `oxyjax.export`. `field`: the setting named in a refusal."""
  check_second_stage(evaluator.score_normalization, evaluator.level_weights, field=field)
  stage.check_scenarios(len(exp.scenarios), field)
  if model_dir is not None and jax.process_index() == 0:
    stage.save(os.path.join(model_dir, rescoring_lib.RUN_STAGE_DIR))  # what `oxyjax.export` serves with the model
  rescorer = rescoring_lib.Rescorer(exp.model, stage, exp.artifact.sid_table.codes, evaluator.trie, partitioner,
                                    evaluator.score_normalization)
  rescored = Evaluator(exp.model, partitioner, evaluator.trie, beam_size=evaluator.beam_size,
                       batch_size=evaluator.batch_size, ks=evaluator.ks, second_stage=rescorer)
  log(f"[oxyjax] re-scoring the beams ({stage.describe()}); "
      f"'{BEAMS_PREFIX}<metric>' is the beams alone")
  results = {}
  for name, r in evaluate_final(exp, rescored, params, splits, log, max_examples).items():
    results[name] = {k: v for k, v in r.items() if not k.startswith(BEAMS_PREFIX)}
    results[f"{name}_beams"] = {k[len(BEAMS_PREFIX):]: v for k, v in r.items() if k.startswith(BEAMS_PREFIX)}
  return results


def with_default_instruction(arrays: pipeline.ExampleArrays) -> pipeline.ExampleArrays:
  """The same rows reading the learned default instruction instead of any generated one."""
  return arrays.with_extras(instruction_mask=np.zeros(len(arrays), bool),
                            instruction_embedding=np.zeros_like(arrays.extras["instruction_embedding"]))


def covered_scenario_rows(evaluator: Evaluator, params, exp: experiment_lib.Experiment, split: str,
                          max_examples: int | None = None) -> dict[str, dict[str, float]]:
  """For each scenario with generated instructions in `split` (not search, whose rows carry their
  query): its covered rows as they are ('<split>/<scenario>_with_instruction') and the same rows
  with the learned default instruction instead ('..._with_instruction_as_default'), decoded by the
  same weights: what the generated instruction changes for this model."""
  rows = {}
  for s in exp.scenarios:
    arrays = s.splits[split]
    mask = arrays.extras.get("instruction_mask")
    if s.config.kind == "search" or mask is None or not mask.any():
      continue
    covered = arrays.take(np.flatnonzero(mask))
    as_default = with_default_instruction(covered)
    trie = exp.trie(s.name)
    rows[f"{split}/{s.name}_with_instruction"] = evaluator(params, covered, max_examples, trie)
    rows[f"{split}/{s.name}_with_instruction_as_default"] = evaluator(params, as_default, max_examples, trie)
  return rows


def make_validation(exp: experiment_lib.Experiment, evaluator: Evaluator, max_examples: int | None):
  """``params -> metrics`` on (a fixed random `max_examples` of) validation, what `EvalHook` calls;
  with scenarios one row per scenario ('<scenario>/<metric>') and their mean (plain names)."""
  valid: list[pipeline.ExampleArrays] = []  # loaded at the first evaluation

  def validate(params):
    if exp.scenarios:
      rows = evaluator.scenarios(params, exp.eval_sets("validation"), max_examples, exp.trie)
      out = dict(rows.pop("mean", {}))
      for name, r in rows.items():
        out.update({f"{name.split('/', 1)[1]}/{k}": v for k, v in r.items() if k != "num_examples"})
      return out
    if not valid:
      valid.append(exp.load_split("validation"))
    return evaluator(params, valid[0], max_examples)

  return validate


def write_summary(model_dir: str, dataset: str, summary: dict[str, Any], merge: bool) -> None:
  """run_summary.json (atomic) and metrics/metrics.{json,md}; `merge` keeps the training record."""
  path = os.path.join(model_dir, "run_summary.json")
  if merge and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    summary = {**old, "results": {**old.get("results", {}), **summary["results"]}}
  metrics_lib.write_metrics({f"{dataset}/{s}": r for s, r in summary["results"].items()},
                            os.path.join(model_dir, "metrics"))
  fileio.write_json(path, summary, indent=1)


def save_artifact(exp: experiment_lib.Experiment, model_dir: str, resuming: bool, log=print) -> None:
  """Writes `<model_dir>/artifact` (process 0); a resumed run's artifact must describe the same model."""
  path = artifact_dir(model_dir)
  if os.path.isfile(os.path.join(path, "artifact.json")):
    try:
      old = ModelArtifact.load(path)
      diff = exp.artifact.differences(old)
    except (ArtifactError, ValueError) as e:
      old, diff = None, [f"unreadable ({e})"]
    if resuming and diff and old is not None:  # an unreadable one is set aside and written anew
      raise ValueError(f"{path}: this run's model differs from the one being resumed: {'; '.join(diff)}. "
                       "Use a new model_dir (or restore the data and settings the run was started with).")
    if not diff:
      exp.artifact.directory = os.path.abspath(path)
      return
  replaced = exp.artifact.save(path, keep_params=False) if jax.process_index() == 0 else None
  exp.artifact.directory = os.path.abspath(path)
  log(f"[oxyjax] model artifact: {path}" + (f" (the one of another model there was moved to {replaced})"
                                            if replaced else ""))


def train(
    *,
    dataset: str | None = None,
    scenarios: Sequence[ScenarioConfig] = (),
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
    eval_level_weights: Sequence[float] | None = None,
    select_metric: str | None = None,
    final_eval_splits: Sequence[str] = ("validation", "test"),
    final_eval_max_examples: int | None = None,
    rescoring: RescoringConfig = RescoringConfig(),
    checkpoint_every_steps: int = 1000,
    keep_checkpoints: int = 3,
    async_checkpointing: bool = True,
    init_checkpoint: str | None = None,
    log_every_steps: int = 50,
    stop_after_steps: int | None = None,
    eval_only: bool = False,
    verbose: bool = True,
) -> TrainResult:
  """Trains `model_config` on `dataset` ('beauty', 'sports', 'industrial', 'office', or a registered
  user dataset), or on `scenarios`: one model for every scenario, trained on their seqio mixture
  (rates from each ScenarioConfig), evaluated per scenario over its own pool; the best
  checkpoint is chosen by the scenarios' mean validation recall@10.

  The global batch of `batch_size` examples is split into `grad_accum_steps` microbatches.
  Training length is `num_train_steps`, else `num_epochs` over the training split.
  With `model_dir`: the model artifact is written to `<model_dir>/artifact` (weights added at
  the end), checkpoints (state + data position) are saved every `checkpoint_every_steps` and
  at the end, and a rerun resumes from the newest readable one.
  `eval_every_steps` > 0 evaluates on (up to `eval_max_examples` of) validation and keeps the
  best weights by validation `select_metric` (default recall@10; 'ndcg@10' etc.; with scenarios
  the scenarios' mean) (Orbax, `<model_dir>/best`); the final evaluation uses those weights.
  `final_eval_max_examples` evaluates a fixed random subset of each final split (quick runs and
  tests; default None: every example).
  `eval_score_normalization` ('vocab', 'valid' or 'last_valid') is the beam search's per-level
  normalisation and `eval_level_weights` (one weight per SID level, default all 1) its per-level
  calibration of the log-probabilities (`decoding.beam_search`).
  `rescoring` (off unless its weight is non-zero): the final evaluation also reorders the beams
  (and SASRec's top items) by `rescoring.Rescorer`, a SASRec scorer trained on the training split
  (cached by content), and reports those metrics as `<split>` and the beams alone as
  `<split>_beams`; checkpoint selection during training uses the beams alone.
  `length_bucketing` batches examples of similar history length together and trims
  padding columns to a multiple of `bucket_multiple` (fewer encoder FLOPs; a few compiled
  shapes: a larger multiple compiles fewer shapes and needs less compile-time memory).
  `stop_after_steps` stops early (after a checkpoint) as if the job were killed: for tests.
  `eval_only` trains nothing: `evaluate_run` evaluates the artifact in `model_dir` (with
  `init_checkpoint`'s weights when given) on `final_eval_splits`, and merges the results into
  `<model_dir>/run_summary.json`.
  """
  t_start = time.time()
  log = print if verbose else (lambda *a, **k: None)
  part = partitioning.Partitioner(mesh_shape, dcn_mesh_shape=dcn_mesh_shape)
  log(f"[oxyjax] devices: {jax.device_count()} x {jax.devices()[0].platform} ({jax.process_count()} processes); {part}")
  if eval_only:
    if not model_dir:
      raise ValueError("eval_only evaluates a run: set model_dir (it must hold <model_dir>/artifact)")
    return evaluate_run(model_dir, partitioner=part, splits=final_eval_splits, weights=init_checkpoint,
                        instructions=instructions, data_source=data_source, eval_batch_size=eval_batch_size,
                        eval_beam_size=eval_beam_size, eval_score_normalization=eval_score_normalization,
                        eval_level_weights=eval_level_weights, max_examples=final_eval_max_examples,
                        rescoring=rescoring, log=log)
  if batch_size % grad_accum_steps:
    raise ValueError(f"batch_size {batch_size} is not divisible by grad_accum_steps {grad_accum_steps}")
  # Multi-host: decisions every process must share (no-ops for one process).
  trainer_lib.check_same_across_hosts(seed=seed, **{"global batch_size": batch_size})
  if batch_size % part.data_parallel_size:
    raise ValueError(f"batch_size {batch_size} must be divisible by the data-parallel size {part.data_parallel_size}")
  if (batch_size // grad_accum_steps) % part.data_parallel_size:
    raise ValueError("each microbatch must be divisible by the data-parallel size")

  # ---- set-up: data, SIDs, model, artifact
  if bool(scenarios) == bool(dataset):
    raise ValueError("train on a dataset or on scenarios: set exactly one of dataset= and scenarios=")
  check_rescoring(rescoring, [s.name for s in scenarios or ()], eval_score_normalization, eval_level_weights)
  if scenarios:
    exp = experiment_lib.setup_scenarios(scenarios=scenarios, model_config=model_config, sid=sid, partitioner=part,
                                         label_smoothing=label_smoothing, q2i=q2i, instructions=instructions, log=log)
    dataset = exp.dataset
  else:
    exp = experiment_lib.setup(dataset=dataset, model_config=model_config, sid=sid, instructions=instructions,
                               partitioner=part, label_smoothing=label_smoothing, q2i=q2i, data_source=data_source,
                               log=log)
  model, cfg = exp.model, exp.config
  if exp.scenarios:  # the mixture's tasks, read through seqio, sampled by the mixture's rates
    from oxyjax.data import scenario_tasks  # imports TensorFlow
    names, parts, rates = scenario_tasks.mixture_parts(exp.mixture, "train", cfg.max_history)
    it = pipeline.MixtureBatchIterator(parts, rates, batch_size, seed=seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())
    train_arrays = it.arrays
    log(f"[oxyjax] mixture {exp.mixture.name}: " + ", ".join(
        f"{n} {len(p)} examples, rate {r:g}" for n, p, r in zip(names, parts, rates)))
  else:
    train_arrays = exp.load_split("train")
  steps_per_epoch = max(1, len(train_arrays) // batch_size)
  total_steps = int(num_train_steps or math.ceil(num_epochs * steps_per_epoch))
  log(f"[oxyjax] {dataset}: {len(train_arrays)} training examples, {exp.artifact.num_items} items, SID levels "
      f"{cfg.sid_vocab_sizes}; {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of batch {batch_size}")
  # Length bucketing trims each batch to its longest history; with several processes the
  # trimmed width would differ per host, so it is single-process only for now.
  bucketing = length_bucketing and jax.process_count() == 1 and not exp.scenarios
  if not exp.scenarios:
    it = pipeline.BatchIterator(train_arrays, batch_size, seed=seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), bucket_by_length=bucketing)

  # ---- state: restore this run, else given weights, else initialise
  tx, schedule = make_optimizer(optimizer, total_steps)
  factory = trainer_lib.TrainStateFactory(model, part, tx, ema=optimizer.ema_decay > 0)
  log(f"[oxyjax] model: {factory.num_params / 1e6:.2f}M parameters, {cfg}")
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints,
                                  save_every_steps=checkpoint_every_steps,
                                  async_save=async_checkpointing) if model_dir else None
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  state, data_state = trainer_lib.restore_or_init(factory, ckpt=ckpt, init_rng=init_rng,
                                                  init_checkpoint=init_checkpoint, log=log)
  if model_dir:
    save_artifact(exp, model_dir, resuming=data_state is not None, log=log)

  # ---- the step function and the hooks
  train_step = jax.jit(
      make_train_step(model, tx, grad_accum_steps, optimizer.ema_decay),
      in_shardings=(factory.shardings, factory.batch_shardings(), part.replicated()),
      out_shardings=(factory.shardings, part.replicated()),
      donate_argnums=(0,),
  )

  def host_batch():
    batch = model.convert_features(next(it))
    return feature_converter.trim_history(batch, multiple=bucket_multiple) if bucketing else batch

  def step_fn(state, batch):
    with jax.set_mesh(part.mesh), part.rules_context():
      return train_step(state, part.shard_batch(batch), train_rng)

  def tokens(batch):
    return batch_size * (batch["history_items"].shape[1] + cfg.num_levels + 2)

  def step_flops(state, batch):  # lowered again for the first batch shape, but the compilation is cached
    with jax.set_mesh(part.mesh), part.rules_context():
      sharded = part.shard_batch(batch)
      compiled = train_step.lower(state, sharded, train_rng).compile()
    f, how = flops_lib.train_step_flops(compiled, jax.device_count(), num_params=factory.num_params,
                                        tokens_per_step=tokens(batch))
    kind = jax.devices()[0].device_kind
    log(f"[oxyjax] train step {sharded['history_items'].shape}: {f:.3e} FLOPs ({how}); device {kind}, "
        f"peak FLOP/s {flops_lib.peak_flops_per_device(kind) or 'unknown (no MFU)'}")
    return f, tokens(batch)

  evaluator = Evaluator(model, part, exp.trie(), beam_size=eval_beam_size, batch_size=eval_batch_size,
                        score_normalization=eval_score_normalization, level_weights=eval_level_weights,
                        select_metric=select_metric)
  logger = trainer_lib.ProgressLogger(model_dir if jax.process_index() == 0 else None, total_steps, batch_size,
                                      enabled=verbose and jax.process_index() == 0)
  validate = make_validation(exp, evaluator, eval_max_examples)
  best = checkpoints.BestCheckpointer(os.path.join(model_dir, "best"), metric=evaluator.headline_metric,
                                      log=log) if model_dir else None
  if best is not None and data_state is not None:
    best.verify(factory.params_abstract)  # unreadable best weights are set aside, not died on at the end
  eval_hook = trainer_lib.EvalHook(validate, every=eval_every_steps, best=best, logger=logger,
                                   metric=evaluator.headline_metric, description=f"random {eval_max_examples}",
                                   log=log)
  hooks: list[trainer_lib.HookBase] = [
      trainer_lib.ProgressHook(logger, every=log_every_steps, schedule=schedule, flops_fn=step_flops,
                               tokens_fn=tokens, log=log),
      eval_hook]
  if ckpt is not None:
    ckpt_hook = trainer_lib.CheckpointHook(ckpt, iterator=it, hooks=[eval_hook])
    if data_state is not None:
      ckpt_hook.restore_data_state(data_state)
    hooks.append(ckpt_hook)

  # ---- the loop
  step0 = int(jax.device_get(state["step"]))
  train_t0 = time.time()
  state, step, stopped = trainer_lib.train_loop(state, step_fn=step_fn, next_batch=host_batch, start_step=step0,
                                                total_steps=total_steps, hooks=hooks,
                                                stop_after_steps=stop_after_steps)
  best_step = best.best_step() if best is not None else None
  for h in hooks:
    h.close()
  if stopped:
    log(f"[oxyjax] stopping early at step {step} (stop_after_steps)")
    for closeable in (ckpt, best):
      if closeable is not None:
        closeable.close()
    return TrainResult(state, step, None, None, best_step, time.time() - t_start, eval_hook.history)
  train_seconds = time.time() - train_t0
  log(f"[oxyjax] trained to step {step} in {train_seconds:.1f}s "
      f"({(step - step0) * batch_size / max(train_seconds, 1e-9):.0f} examples/s this run)")

  # ---- final evaluation on the best-on-validation weights; they become the artifact's weights
  params, weights_step = trainer_lib.eval_params(state), step
  if best_step is not None:
    try:
      params, _ = best.restore(factory.params_abstract)
      weights_step = best_step
      log(f"[oxyjax] final evaluation uses the best validation checkpoint (step {best_step})")
    except checkpoints.UnreadableCheckpointError as e:
      best_step = None
      log(f"[oxyjax] {e}: the final evaluation uses the final weights")
  if model_dir:
    checkpoints.save_params(exp.artifact.params_dir, params,
                            {"step": weights_step, "train_steps": step, "ema": optimizer.ema_decay > 0})
  results = final_results(exp, evaluator, params, final_eval_splits, rescoring, part, log, final_eval_max_examples,
                          model_dir)
  if model_dir and jax.process_index() == 0 and results:
    write_summary(model_dir, dataset, {
        "dataset": dataset, "steps": step, "train_seconds": train_seconds, "best_step": best_step,
        "parameters": factory.num_params, "results": results, "validation_history": eval_hook.history}, merge=False)
  for closeable in (ckpt, best):
    if closeable is not None:
      closeable.close()
  return TrainResult(state, step, results.get("validation", results.get("validation/mean")),
                     results.get("test", results.get("test/mean")), best_step, time.time() - t_start,
                     eval_hook.history)


def load_eval_weights(model_dir: str, abstract_params, weights: str | None = None, log=print):
  """The weights a run is evaluated (or served) with, and their step. In order: `weights` (a
  parameter checkpoint directory) when given; else the artifact's params/ (written when
  training ended); else the best-on-validation weights (`best/`); else the parameters of the
  newest train checkpoint (read without the optimizer state)."""
  for path, what in ((weights, "given weights"), (os.path.join(artifact_dir(model_dir), "params"), "artifact weights"),
                     (os.path.join(model_dir, "best"), "best validation weights")):
    if path and checkpoints.has_checkpoint(path):
      params, meta = checkpoints.load_params(path, abstract_params)
      log(f"[oxyjax] evaluating the {what} {path} ({meta})")
      return params, int(meta.get("step", 0))
    if path == weights and weights:
      raise FileNotFoundError(f"no parameter checkpoint under {weights}")
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  restored = checkpoints.restore_latest_params(ckpt_dir, abstract_params, log=log)
  if restored is None:
    raise FileNotFoundError(f"{model_dir} holds no weights: no artifact params/, best/ or readable checkpoint")
  step, params = restored
  log(f"[oxyjax] evaluating the parameters of {ckpt_dir} step {step}")
  return params, step


def evaluate_run(model_dir: str, *, partitioner: partitioning.Partitioner, splits: Sequence[str] = ("test",),
                 weights: str | None = None, instructions: InstructionsConfig | None = None,
                 data_source: str = "seqio", eval_batch_size: int = 256, eval_beam_size: int = 20,
                 eval_score_normalization: str = "vocab", eval_level_weights: Sequence[float] | None = None,
                 max_examples: int | None = None, rescoring: RescoringConfig = RescoringConfig(),
                 write_results: bool = True, log=print) -> TrainResult:
  """Evaluates a run from its artifact alone (no training split, no optimizer state) on
  `splits`, and (`write_results`) merges the results into `<model_dir>/run_summary.json` (and
  with re-scoring on saves its stage into `<model_dir>/second_stage`)."""
  t0 = time.time()
  art = ModelArtifact.load(artifact_dir(model_dir))
  exp = experiment_lib.from_artifact(art, partitioner=partitioner, instructions=instructions,
                                     data_source=data_source, log=log)
  exp.check_data()
  factory = trainer_lib.TrainStateFactory(exp.model, partitioner)
  params, step = load_eval_weights(model_dir, factory.params_abstract, weights, log=log)
  evaluator = Evaluator(exp.model, partitioner, exp.trie(), beam_size=eval_beam_size, batch_size=eval_batch_size,
                        score_normalization=eval_score_normalization, level_weights=eval_level_weights)
  results = final_results(exp, evaluator, params, splits, rescoring, partitioner, log, max_examples,
                          model_dir if write_results else None)
  if write_results and jax.process_index() == 0 and results:
    write_summary(model_dir, exp.dataset, {"dataset": exp.dataset, "results": results}, merge=True)
  return TrainResult({"params": params}, step, results.get("validation"), results.get("test"), None,
                     time.time() - t0, [])


# ====================================================================== gin edge
def run():
  cli.run_gin_entry(train, DEFAULT_GIN_FILE, "python -m oxyjax.train")


if __name__ == "__main__":
  # Re-import under the package name so gin files can refer to `oxyjax.train.train`.
  from oxyjax import train as _train_module

  _train_module.run()
