r"""Post-training of a pre-trained recommender with a group policy loss (PAPER.md section 7).

  python -m oxyjax.rl.train --gin_file=gin_configs/modes/rl.gin \
      --gin.INIT_MODEL_DIR="'runs/beauty'" --gin.MODEL_DIR="'runs/beauty_rl'" \
      --gin_bindings="oxyjax.rl.losses.PolicyLossConfig.name = 'gspo'"

Starts from a pre-training run's model artifact (`<INIT_MODEL_DIR>/artifact`: config, SID table,
pools, weights), and is built from the pre-training parts: `experiment.from_artifact`,
`trainer.TrainStateFactory`, `trainer.restore_or_init` (resume this run, else the artifact's
weights), `trainer.train_loop` with `ProgressHook`, `EvalHook` (validation every
`eval_every_steps`, best weights by validation `select_metric` (default recall@10), the starting weights included as step
0) and `CheckpointHook` (state + prompt-iterator position + validation history: a killed run
resumes exactly), then `train.evaluate_final` on test once with the best weights, written with
the run's own artifact. One step = one batch of prompts: a rollout of G candidates per prompt
(`rl.step.make_rollout_step`, rewards and group advantages included), then
`updates_per_rollout` optimizer updates (`rl.step.make_update_step`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oxyjax import checkpoints
from oxyjax import cli
from oxyjax import experiment as experiment_lib
from oxyjax import partitioning
from oxyjax import rescoring as rescoring_lib
from oxyjax import train as pretrain
from oxyjax import trainer as trainer_lib
from oxyjax.artifact import ModelArtifact, artifact_dir
from oxyjax.data import pipeline
from oxyjax.evaluation import Evaluator
from oxyjax.models.encoder_decoder import EncoderDecoder
from oxyjax.rl import ranking_model
from oxyjax.rl import rewards as rewards_lib
from oxyjax.rl import step as step_lib
from oxyjax.rl import losses as policy_losses
from oxyjax.rl.losses import PolicyLossConfig
from oxyjax.rl.rewards import RewardWeights
from oxyjax.rl.step import RolloutConfig
from oxyjax.trainer import OptimizerConfig

DEFAULT_GIN_FILE = os.path.join(experiment_lib.REPO_ROOT, "gin_configs", "modes", "rl.gin")


SIMILARITY_SPACES = ("auto", "text", "model")


def item_embeddings(exp: experiment_lib.Experiment, params, space: str = "auto") -> tuple[np.ndarray, str]:
  """What the similarity and diversity rewards compare, by `space`:

  * ``"text"``: the frozen MiniLM text embeddings of every item (the 2018 data: also the space of
    search queries); refused for a dataset without item text. Computed once per catalogue and
    cached (`sid.build.item_text_embeddings`): about 6 min on one CPU core for Office's 3,460 items.
  * ``"model"``: the starting model's own item representation (item-ID + SID-code embeddings,
    frozen at the start).
  * ``"auto"``: text where every domain has item text, else the model's."""
  from oxyjax.sid import build as sid_build

  if space not in SIMILARITY_SPACES:
    raise ValueError(f"similarity_space must be one of {SIMILARITY_SPACES}, got {space!r}")
  if space != "model":
    try:
      if exp.catalogue is not None:
        return experiment_lib._text_embeddings(exp.catalogue), "text (all-MiniLM-L6-v2)"
      return sid_build.item_text_embeddings(exp.dataset), "text (all-MiniLM-L6-v2)"
    except ValueError as e:  # no item text
      if space == "text":
        raise ValueError(f"similarity_space 'text': {e}") from None
  codes = exp.model.sid_codes
  items = np.arange(codes.shape[0], dtype=np.int32)
  item_e, side_e, _ = exp.model.network.apply({"params": params}, jnp.asarray(items), jnp.asarray(codes), None,
                                              method=EncoderDecoder._behaviour_parts)
  return np.asarray(item_e + side_e, np.float32), "the starting model's item embeddings"


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array (the rows of its host batch), in order:
  one copy of each addressable shard (replicas over non-batch mesh axes dropped), by row offset."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(jax.device_get(shards[k])) for k in sorted(shards)])


PROMPTS = ("all", "recent")


def select_prompts(arrays: pipeline.ExampleArrays, prompts: str, per_user: int = 1) -> pipeline.ExampleArrays:
  """The training examples post-training draws its prompts from. ``all``: every one. ``recent``:
  each user's last ``per_user`` training examples in the split's (chronological) order. The last
  one's target is the user's latest training item, the nearest in time to the held-out validation
  and test targets, and its history is the longest the model was trained on for that user; more
  than one per user gives more distinct prompts (a run of many steps revisits each one less often)
  at the cost of older targets. Rows keep the reader's order."""
  if prompts == "all":
    return arrays
  if prompts != "recent":
    raise ValueError(f"unknown prompts {prompts!r}; expected one of {PROMPTS}")
  if int(per_user) < 1:
    raise ValueError(f"prompts_per_user must be at least 1, got {per_user!r}")
  users = np.asarray(arrays.user)
  order = np.argsort(users, kind="stable")  # each user's rows together, in reader order
  sorted_users = users[order]
  group_end = np.searchsorted(sorted_users, sorted_users, side="right")
  from_end = group_end - 1 - np.arange(users.size)  # 0 = the user's last row
  return arrays.take(np.sort(order[from_end < int(per_user)]))


def train_rl(
    *,
    init_model_dir: str,
    model_dir: str,
    num_steps: int = 200,
    batch_size: int = 64,
    prompts: str = "all",
    prompts_per_user: int = 1,
    rollout: RolloutConfig = RolloutConfig(),
    loss: PolicyLossConfig = PolicyLossConfig(),
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5, warmup_steps=0, decay="constant",
                                                 weight_decay=0.0),
    reward_weights: Mapping[str, RewardWeights] | None = None,
    default_reward: RewardWeights = RewardWeights(),
    ranking_model_dir: str | None = None,
    ranker_refresh: ranking_model.RefreshConfig = ranking_model.RefreshConfig(),
    mesh_shape: dict[str, int] | None = None,
    grad_accum_steps: int = 1,
    seed: int = 0,
    eval_every_steps: int = 50,
    eval_max_examples: int | None = 2000,
    eval_batch_size: int = 256,
    eval_beam_size: int = 20,
    select_metric: str | None = None,
    final_eval_splits: Sequence[str] = ("test",),
    final_eval_max_examples: int | None = None,
    checkpoint_every_steps: int = 50,
    keep_checkpoints: int = 2,
    log_every_steps: int = 10,
    stop_after_steps: int | None = None,
    data_source: str = "seqio",
    similarity_space: str = "auto",
    second_stage: str | None = "auto",
    rank_order: str = "policy",
    verbose: bool = True,
) -> pretrain.TrainResult:
  """Post-trains the model of `init_model_dir` into `model_dir` for `num_steps` rollout steps of
  `batch_size` training prompts, `rollout.group_size` candidates each.

  prompts, prompts_per_user: which training examples are prompts (`select_prompts`), in each
  scenario; prompts_per_user applies to ``recent``.
  reward_weights: per scenario name (a single-dataset model's one scenario is its dataset name);
  the others take `default_reward`. With `loss.kl_beta` > 0 the starting weights are the frozen
  reference policy. ranking_model_dir: a ranking model trained for this artifact
  (`python -m oxyjax.rl.ranking_model`), the reward service of the ``ranking`` component; without
  one, every ranking weight must be 0. ranker_refresh: keep training that ranker on the policy's
  own candidates as the policy moves (`ranking_model.RefreshConfig`; its state is checkpointed
  with the policy's under the key ``ranker``). similarity_space: the item embeddings the similarity
  and diversity rewards compare (`item_embeddings`: ``auto``, ``text`` or ``model``).
  second_stage: the re-ranking stage of the final evaluation and of this run's export
  (`rescoring.SecondStage.of_run` of `init_model_dir`): ``auto`` the starting run's own where it
  has one (a default pre-training run does), ``none``, or a saved stage's directory. With one, the
  test results are the stage's ranking of the post-trained policy's beams, with the beams alone
  under ``<split>_beams``, as in a pre-training run's summary; it is saved into
  `<model_dir>/second_stage`. The validation that selects the best step reads the beams alone.
  rank_order: how a group is ranked for the ``rank_penalty`` reward: ``policy`` by the policy's
  sequence log-prob, ``stage`` as that second stage ranks what it serves (`step.make_rollout_step`).
  The same stage's scorer is the reward service of the ``scorer`` component (`rewards`): with
  that weight non-zero the run needs a stage.
  """
  t_start = time.time()
  log = print if verbose else (lambda *a, **k: None)
  if similarity_space not in SIMILARITY_SPACES:
    raise ValueError(f"similarity_space must be one of {SIMILARITY_SPACES}, got {similarity_space!r}")
  part = partitioning.Partitioner(mesh_shape)
  if batch_size % (grad_accum_steps * part.data_parallel_size):
    raise ValueError(f"batch_size {batch_size} must be divisible by grad_accum_steps x data-parallel size "
                     f"({grad_accum_steps} x {part.data_parallel_size})")
  trainer_lib.check_same_across_hosts(seed=seed, **{"global batch_size": batch_size})
  init_art = ModelArtifact.load(artifact_dir(init_model_dir))
  exp = experiment_lib.from_artifact(init_art, partitioner=part, data_source=data_source, log=log)
  exp.check_data()
  model = exp.model
  stage = rescoring_lib.SecondStage.of_run(init_model_dir, second_stage, num_items=init_art.num_items,
                                           num_scenarios=len(exp.scenarios), log=log)
  if stage is not None:  # refused before any training (the evaluator below fuses joint log-probs: 'vocab')
    pretrain.check_second_stage("vocab", None, field="second_stage")
  if rank_order not in step_lib.RANK_ORDERS:
    raise ValueError(f"rank_order must be one of {step_lib.RANK_ORDERS}, got {rank_order!r}")
  if rank_order == "stage" and stage is None:
    raise ValueError("rank_order 'stage' ranks each group as the second stage would: it needs one "
                     f"(second_stage {second_stage!r} gives none for {init_model_dir})")

  # ---- prompts: the training examples (each scenario's, sampled by its rate), each row's pool
  forest, root_of_scenario = exp.scenario_forest()
  if exp.scenarios:
    names = [s.name for s in exp.scenarios]
    it = pipeline.MixtureBatchIterator([select_prompts(s.splits["train"], prompts, prompts_per_user) for s in exp.scenarios],
                                       [s.config.rate for s in exp.scenarios], batch_size, seed=seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())
  else:
    names = [exp.dataset]
    it = pipeline.BatchIterator(select_prompts(exp.load_split("train"), prompts, prompts_per_user), batch_size, seed=seed, process_index=jax.process_index(),
                                process_count=jax.process_count())
  scenario_ids = [s.id for s in exp.scenarios] if exp.scenarios else [0]
  table = np.tile(default_reward.as_array(), (max(scenario_ids) + 1, 1))
  table[scenario_ids] = rewards_lib.weight_table(reward_weights, names, default_reward)
  rewards_lib.check_weights(table, has_ranking_model=ranking_model_dir is not None, has_scorer=stage is not None)
  # The stage's scorer runs in the rollouts only where the group order or the scorer reward reads it.
  rollout_stage = stage if rank_order == "stage" or rewards_lib.uses(table, "scorer") else None
  stage_params = rollout_stage and jax.device_put(rollout_stage.params, part.replicated())
  ranker = ranker_params = None
  if ranking_model_dir:
    ranker, ranker_params, ranker_meta = ranking_model.load(ranking_model_dir, init_art, part)
    log(f"[oxyjax] ranking reward from {ranking_model_dir} (step {ranker_meta['step']}, held-out AUC "
        + ", ".join(f"{k} {v:.4f}" for k, v in ranker_meta["results"]["validation"].items() if k.startswith("auc_"))
        + " on validation)")

  refresh = ranker_refresh.updates_per_step
  if refresh and ranker is None:
    raise ValueError("ranker_refresh.updates_per_step > 0 needs a ranking model (ranking_model_dir)")

  # ---- state: resume this run, else the pre-trained weights (and the ranker's, when it trains too)
  mu = rollout.updates_per_rollout
  tx, schedule = trainer_lib.make_optimizer(optimizer, num_steps * mu)
  factory = trainer_lib.TrainStateFactory(model, part, tx)
  if refresh:
    rtx, _ = trainer_lib.make_optimizer(OptimizerConfig(learning_rate=ranker_refresh.learning_rate, warmup_steps=0,
                                                        decay="constant", weight_decay=ranker_refresh.weight_decay),
                                        num_steps * refresh)
    factory = trainer_lib.JointStateFactory(factory, {"ranker": trainer_lib.TrainStateFactory(ranker, part, rtx)},
                                            start_params={"ranker": ranker_params})
    log(f"[oxyjax] the ranking model keeps training on the policy's candidates: {ranker_refresh}")
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints,
                                  save_every_steps=checkpoint_every_steps)
  init_params_dir = os.path.join(artifact_dir(init_model_dir), "params")
  state, data_state = trainer_lib.restore_or_init(factory, ckpt=ckpt, init_rng=jax.random.key(seed),
                                                  init_checkpoint=init_params_dir, log=log)
  exp.artifact = dataclasses.replace(init_art)  # this run's artifact: the same model, its own weights
  pretrain.save_artifact(exp, model_dir, resuming=data_state is not None, log=log)
  # The starting weights (also after a resume): the frozen reference and item embeddings.
  init_params, _ = checkpoints.load_params(init_params_dir, factory.params_abstract)
  ref_params = init_params if policy_losses.needs_reference(loss) else None
  emb, emb_kind = item_embeddings(exp, init_params, similarity_space)
  per_user_note = f", {prompts_per_user} per user" if prompts == "recent" else ""
  log(f"[oxyjax] post-training {init_model_dir} -> {model_dir}: loss {loss.name}, {rollout.method} rollouts, "
      f"G={rollout.group_size}, {batch_size} prompts/step ({prompts} training examples{per_user_note}), {num_steps} steps x {mu} update(s); similarity on {emb_kind}; "
      f"reward weights {dict(zip(names, table[scenario_ids].tolist()))}; groups ranked for rank_penalty by the {rank_order}")

  # ---- the jitted halves and the step function
  with jax.set_mesh(part.mesh), part.rules_context():
    rollout_step = jax.jit(step_lib.make_rollout_step(model, rollout, table, emb, ranker=ranker, stage=rollout_stage,
                                                      rank_order=rank_order))
    update_step = jax.jit(step_lib.make_update_step(model, tx, loss, temperature=rollout.temperature,
                                                    grad_accum_steps=grad_accum_steps),
                          donate_argnums=(0,))
    if refresh:
      ranker_step = jax.jit(trainer_lib.make_train_step(ranker, rtx, 1), donate_argnums=(0,))
  base_rng = jax.random.key(seed + 1)

  def host_batch():
    ex = next(it)
    batch = model.convert_features(ex)
    batch["pool_root"] = root_of_scenario[np.asarray(batch["scenario"], np.int64)]
    return batch

  def step_fn(state, batch):
    with jax.set_mesh(part.mesh), part.rules_context():
      sharded = part.shard_batch(batch)
      n = state["step"] // mu
      t0 = time.time()
      rl, stats = rollout_step(state["params"], sharded, forest, jax.random.fold_in(base_rng, n), ref_params,
                               state["ranker"]["params"] if refresh else ranker_params, stage_params)
      jax.block_until_ready(rl)
      t1 = time.time()
      if refresh:  # the ranker learns this step's candidates as negatives (its rewards above came before)
        rbatch = ranker.refresh_batch(batch, local_rows(rl["rl_items"]), np.random.default_rng([seed, int(n)]),
                                      ranker_refresh.policy_negatives)
        rstate = state.pop("ranker")
        for _ in range(refresh):
          rstate, rmetrics = ranker_step(rstate, part.shard_batch(rbatch), base_rng)
        stats.update({"ranker/loss": rmetrics["loss"], "ranker/accuracy": rmetrics["token_accuracy"]})
      full = {**sharded, **rl}
      for _ in range(mu):
        state, metrics = update_step(state, full, forest)
      if refresh:
        state["ranker"] = rstate
      jax.block_until_ready(metrics)
      t2 = time.time()
    return state, {**metrics, **stats, "time/rollout_s": t1 - t0, "time/update_s": t2 - t1}

  evaluator = Evaluator(model, part, exp.trie(), beam_size=eval_beam_size, batch_size=eval_batch_size,
                        select_metric=select_metric)
  logger = trainer_lib.ProgressLogger(model_dir if jax.process_index() == 0 else None, num_steps, batch_size,
                                      enabled=verbose and jax.process_index() == 0)
  best = checkpoints.BestCheckpointer(os.path.join(model_dir, "best"), metric=evaluator.headline_metric, log=log)
  if data_state is not None:
    best.verify(factory.params_abstract)
  eval_hook = trainer_lib.EvalHook(pretrain.make_validation(exp, evaluator, eval_max_examples), every=eval_every_steps,
                                   best=best, logger=logger, metric=evaluator.headline_metric,
                                   description=f"random {eval_max_examples}", log=log)
  ckpt_hook = trainer_lib.CheckpointHook(ckpt, iterator=it, hooks=[eval_hook])
  hooks = [trainer_lib.ProgressHook(logger, every=log_every_steps, schedule=schedule, log=log), eval_hook, ckpt_hook]
  if data_state is not None:
    ckpt_hook.restore_data_state(data_state)
  step0 = int(jax.device_get(state["step"])) // mu
  if step0 == 0 and eval_every_steps:  # the starting weights are a candidate too (step 0)
    eval_hook.after_step(trainer_lib.StepInfo(0, num_steps, state, {}, {}, stopping=False))

  train_t0 = time.time()
  state, step, stopped = trainer_lib.train_loop(state, step_fn=step_fn, next_batch=host_batch, start_step=step0,
                                                total_steps=num_steps, hooks=hooks, stop_after_steps=stop_after_steps)
  for h in hooks:
    h.close()
  best_step = best.best_step()
  if stopped:
    log(f"[oxyjax] stopping early at step {step} (stop_after_steps)")
    ckpt.close(), best.close()
    return pretrain.TrainResult(state, step, None, None, best_step, time.time() - t_start, eval_hook.history)
  train_seconds = time.time() - train_t0
  params, weights_step = state["params"], step
  if best_step is not None:
    params, _ = best.restore(factory.params_abstract)
    weights_step = best_step
    log(f"[oxyjax] final evaluation uses the best validation checkpoint (step {best_step})")
  checkpoints.save_params(exp.artifact.params_dir, params, {"step": weights_step, "rl_steps": step,
                                                           "loss": loss.name, "init": init_model_dir})
  if stage is None:
    results = pretrain.evaluate_final(exp, evaluator, params, final_eval_splits, log, final_eval_max_examples)
  else:
    results = pretrain.stage_results(exp, evaluator, params, final_eval_splits, stage, part, log,
                                     final_eval_max_examples, model_dir, field="second_stage")
  if refresh:
    save_refreshed_ranker(exp, ranker, state["ranker"]["params"], params, os.path.join(model_dir, "ranker"),
                          init_art, ranking_model_dir, step, eval_max_examples, log)
  if jax.process_index() == 0:
    pretrain.write_summary(model_dir, exp.dataset, {
        "dataset": exp.dataset, "init_model_dir": init_model_dir, "ranking_model_dir": ranking_model_dir,
        "loss": dataclasses.asdict(loss),
        "ranker_refresh": dataclasses.asdict(ranker_refresh),
        "rollout": dataclasses.asdict(rollout), "steps": step, "train_seconds": train_seconds,
        "second_stage": stage and stage.settings(), "rank_order": rank_order,
        "reward_weights": {n: dict(zip(rewards_lib.COMPONENTS, table[i].tolist())) for n, i in zip(names, scenario_ids)},
        "best_step": best_step, "results": results, "validation_history": eval_hook.history}, merge=False)
  ckpt.close(), best.close()
  return pretrain.TrainResult(state, step, results.get("validation", results.get("validation/mean")),
                              results.get("test", results.get("test/mean")), best_step, time.time() - t_start,
                              eval_hook.history)


def save_refreshed_ranker(exp, ranker, ranker_params, policy_params, out_dir: str, art: ModelArtifact,
                          source_dir: str, step: int, eval_max_examples: int | None, log) -> None:
  """The ranker as it ended post-training, as a ranking-model run directory (`ranking_model.load`
  reads it), with its held-out validation AUC against uniform and popular pool items and against
  the post-trained policy's own top candidates (`auc_policy`: is it still not fooled by them?)."""
  from oxyjax.evaluation import fixed_subset

  valid = fixed_subset(exp.load_split("validation"), eval_max_examples)
  beams = ranking_model.PolicyCandidates(exp, policy_params, 21, 256)(valid)
  auc = ranking_model.evaluate_auc(ranker, ranker_params, valid, num_negatives=20, policy_items=beams)
  log("[oxyjax] the refreshed ranking model, validation AUC: " + ", ".join(f"{k} {v:.4f}" for k, v in auc.items()))
  if jax.process_index() == 0:
    checkpoints.save_params(os.path.join(out_dir, "params"), ranker_params, {"step": int(step)}, log=log)
    ranking_model.write_ranker_json(out_dir, {
        "config": dataclasses.asdict(ranker.config), "policy_artifact": art.content_digest(),
        "init_model_dir": source_dir, "refreshed_for_steps": int(step), "step": int(step),
        "results": {"validation": auc}})


def run():
  cli.run_gin_entry(train_rl, DEFAULT_GIN_FILE, "python -m oxyjax.rl.train")


if __name__ == "__main__":
  from oxyjax.rl import train as _train_module

  _train_module.run()
