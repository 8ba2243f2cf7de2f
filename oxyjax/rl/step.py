"""The two jitted halves of one post-training step: rollout (+ rewards, advantages) and update.

    rollout_step(params, batch, trie, rng[, ref_params]) -> (rl arrays, rollout stats)
    update_step(state, batch + rl arrays, trie) -> (state, metrics)

The update reuses the pre-training parts (`trainer.accumulate_gradients`,
`trainer.apply_gradients`): the policy loss (oxyjax/rl/losses.py) returns a sum and its
denominator, microbatches split the prompts (each row carries its whole group, so a group is never
split across microbatches or data shards), and every diagnostic is a (sum, denominator) pair
divided only after the accumulation.

On-policy with one update per rollout (``updates_per_rollout = 1``, the default), pi_old is the
update's own forward pass with the gradient stopped, so the ratio is exactly 1 and the loss's
gradient is the advantage-weighted policy gradient. With more updates per rollout, pi_old is
scored teacher-forced at rollout time (`rollout.policy_logprobs`, the same distribution).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from oxyjax import trainer
from oxyjax.rl import losses as policy_losses
from oxyjax.rl import rewards as rewards_lib
from oxyjax.rl import rollout as rollout_lib


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """method: 'sample' (temperature sampling, with replacement) or 'beam' (the G best distinct
  valid paths). group_size: G. temperature: of the policy, in rollouts and in the loss alike.
  updates_per_rollout: optimizer steps per batch of rollouts (1 = on-policy).
  advantage_ddof / advantage_eps / advantage_scale ('std' or 'none'): see `losses.group_advantages`."""

  method: str = "sample"
  group_size: int = 16
  temperature: float = 1.0
  updates_per_rollout: int = 1
  advantage_ddof: int = 1
  advantage_eps: float = 1e-6
  advantage_scale: str = "std"


# How a group is ordered for the rank_penalty reward: by the policy's sequence log-prob, or as the
# second stage ranks what it serves (`make_rollout_step`).
RANK_ORDERS = ("policy", "stage")


def _features(batch: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in batch.items() if not k.startswith("rl_")}


def fill_empty(codes: jax.Array, valid: jax.Array) -> jax.Array:
  """Empty beams (codes -1) take the group's first path, so that scoring them stays finite (their
  weight is 0): a NaN there would reach the gradient through the mask."""
  return jnp.where(valid[..., None], codes, codes[:, :1])


def with_target(codes: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
  """``[B, G + 1, L]``: the group's paths and, last, the row's real target path (scored in the same
  teacher-forced pass, the encoder once per row)."""
  return jnp.concatenate([codes, batch["target_codes"][:, None].astype(codes.dtype)], axis=1)


def make_rollout_step(model, cfg: RolloutConfig, reward_weights, item_embeddings, *, with_reference: bool = False,
                      ranker=None, stage=None, rank_order: str = "policy"):
  """``(params, batch, trie, rng[, ref_params, ranker_params, stage_params]) -> (rl arrays, stats)``, to be jitted.

  reward_weights: ``[num_scenarios, len(rewards_lib.COMPONENTS)]`` (`rewards.weight_table`); item_embeddings ``[N+1, D]``
  for the similarity and diversity rewards. The anchor of the similarity is the query
  embedding on rows whose instruction is present and whose embedding has the items' width
  (search), else the target item. ranker: a `ranking_model.RankingModel` (with its params passed
  as `ranker_params`): the ranking reward of a candidate (and of the real target, for ``R*``) is
  its probability ``sigmoid(logit)`` under the ranking model; None: no ranking reward.
  stage: a `rescoring.SecondStage` (its scorer's params passed as `stage_params`), or None. Its
  scorer gives the ``scorer`` reward (SASRec's probability of each candidate and of the real
  target) where that weight is non-zero, and with ``rank_order='stage'`` the group is ranked for
  the ``rank_penalty`` reward as the stage ranks what it serves, by ``policy + weight * SASRec``
  (the policy's sequence log-prob here being the rollout distribution's, renormalised over each
  prefix's valid children, where the served stage fuses beam search's joint log-probability over
  the whole code vocabulary); ``rank_order='policy'``: by the policy's alone.
  """
  if rank_order not in RANK_ORDERS:
    raise ValueError(f"rank_order must be one of {RANK_ORDERS}, got {rank_order!r}")
  use_scorer = rewards_lib.uses(reward_weights, "scorer")
  if stage is None and (rank_order == "stage" or use_scorer):
    raise ValueError("rank_order 'stage' and the scorer reward need the second stage (stage=None was given)")
  reward_weights = jnp.asarray(reward_weights, jnp.float32)
  item_embeddings = jnp.asarray(item_embeddings, jnp.float32)

  def rollout_step(params, batch, trie, rng, ref_params=None, ranker_params=None, stage_params=None):
    feats = _features(batch)
    ro = rollout_lib.rollout(cfg.method, model, params, feats, trie, group_size=cfg.group_size, rng=rng,
                             temperature=cfg.temperature)
    real = ro.valid & (batch["weights"] > 0)[:, None]
    target = batch["target_items"]
    anchor = None
    q = feats.get("instruction_embedding")
    if q is not None and q.shape[-1] == item_embeddings.shape[-1]:
      anchor = jnp.where(feats["instruction_mask"][:, None], q, item_embeddings[target])
    ranking = target_ranking = None
    if ranker is not None:
      ranking, target_ranking = jax.lax.stop_gradient(ranker.reward(ranker_params, feats, ro.items, target))
    order = policy_order = ro.logp.sum(-1)
    scorer = target_scorer = None
    if rank_order == "stage" or use_scorer:
      sasrec_all = jax.lax.stop_gradient(stage.log_softmax(stage_params, feats))  # [B, N + 1]
      sasrec = jnp.take_along_axis(sasrec_all, jnp.maximum(ro.items, 0), axis=1)
      if use_scorer:
        scorer = jnp.exp(sasrec)
        target_scorer = jnp.exp(jnp.take_along_axis(sasrec_all, target[:, None], axis=1)[:, 0])
      if rank_order == "stage":  # the group in the order the served list would have it
        order = jax.lax.stop_gradient(stage.fused_scores(policy_order, sasrec, batch["scenario"]))
    rw = rewards_lib.compute(ro.items, real, target, batch["scenario"], item_embeddings=item_embeddings,
                             weights=reward_weights, anchor=anchor, ranking=ranking, target_ranking=target_ranking,
                             order_scores=order, scorer=scorer, target_scorer=target_scorer)
    adv, flat = policy_losses.group_advantages(rw.total, real, ddof=cfg.advantage_ddof, eps=cfg.advantage_eps,
                                               scale=cfg.advantage_scale)
    codes = fill_empty(ro.codes, ro.valid)
    out = {"rl_codes": codes, "rl_items": ro.items, "rl_advantages": adv, "rl_rewards": rw.total, "rl_r_star": rw.r_star,
           "rl_seq_weight": real.astype(jnp.float32)}
    if cfg.updates_per_rollout > 1:
      out["rl_logp_old"] = jax.lax.stop_gradient(
          rollout_lib.policy_logprobs(model, params, feats, codes, trie, temperature=cfg.temperature))
    if ref_params is not None:  # the group and the real target's path under the frozen reference
      ref = jax.lax.stop_gradient(rollout_lib.policy_logprobs(
          model, ref_params, feats, with_target(codes, batch), trie, temperature=cfg.temperature))
      out["rl_logp_ref"], out["rl_target_logp_ref"] = ref[:, :-1], ref[:, -1]
      out["rl_is_target"] = (ro.items == target[:, None]) & real
    rows = (batch["weights"] > 0).astype(jnp.float32)
    n_rows, n_cand = jnp.maximum(rows.sum(), 1.0), jnp.maximum(real.sum(), 1.0)
    same = (ro.items[:, :, None] == ro.items[:, None, :]) & real[:, :, None] & real[:, None, :]
    distinct = jnp.sum(real / jnp.maximum(same.sum(-1), 1)) / n_cand  # distinct items / candidates
    stats = {f"reward/{k}": jnp.sum(v * real) / n_cand for k, v in rw.components.items()}
    stats.update({
        "reward/total": jnp.sum(rw.total * real) / n_cand,
        "reward/r_star": jnp.sum(rw.r_star * rows) / n_rows,
        "reward/std_in_group": jnp.sum(jnp.std(jnp.where(real, rw.total, 0.0), axis=-1) * rows) / n_rows,
        "groups/target_in_group": jnp.sum(jnp.any((ro.items == target[:, None]) & real, -1) * rows) / n_rows,
        "groups/no_spread": jnp.sum(flat * rows) / n_rows,
        "groups/distinct_fraction": distinct,
        "advantage/abs_mean": jnp.sum(jnp.abs(adv) * real) / n_cand,
        "advantage/positive_fraction": jnp.sum((adv > 0) * real) / n_cand,
        "rollout/logp_mean": jnp.sum(ro.logp.sum(-1) * real) / n_cand,
    })
    if use_scorer:  # does the scorer rank the real target above the group?
      stats["reward/scorer_target"] = jnp.sum(target_scorer * rows) / n_rows
      stats["reward/scorer_target_above_group"] = jnp.sum((target_scorer[:, None] > scorer) * real) / n_cand
    if rank_order == "stage":  # how often the stage puts another candidate first
      first = lambda x: jnp.argmax(jnp.where(real, x, -jnp.inf), axis=-1)  # noqa: E731
      stats["rollout/stage_changes_first"] = jnp.sum((first(order) != first(policy_order)) * rows) / n_rows
    if ranker is not None:  # does the reward service rank the real target above the group?
      stats["reward/ranking_target"] = jnp.sum(target_ranking * rows) / n_rows
      stats["reward/ranking_target_above_group"] = jnp.sum(
          (target_ranking[:, None] > ranking) * real) / n_cand
    return out, stats

  return rollout_step


def make_policy_loss_fn(model, trie, loss_cfg: policy_losses.PolicyLossConfig, temperature: float):
  """``(params, batch, rng) -> (loss_sum, aux)`` of the policy loss on a batch with rl arrays
  (the signature `trainer.accumulate_gradients` takes; aux values are all sums)."""

  def loss_fn(params, batch, rng):
    del rng  # no dropout in post-training: pi_theta must be the distribution that was sampled
    codes = batch["rl_codes"]
    needs_target = loss_cfg.name in policy_losses.NEEDS_TARGET
    scored = with_target(codes, batch) if needs_target else codes
    logp, entropy = rollout_lib.policy_logprobs(model, params, _features(batch), scored, trie,
                                                temperature=temperature, return_entropy=True)
    target_logp = None
    if needs_target:
      logp, target_logp, entropy = logp[:, :-1], logp[:, -1], entropy[:, :-1]
    seq_w = batch["rl_seq_weight"]
    tmask = jnp.broadcast_to((seq_w > 0)[..., None], logp.shape).astype(jnp.float32)
    logp = jnp.where(tmask > 0, logp, 0.0)
    old = batch.get("rl_logp_old")
    old = jax.lax.stop_gradient(logp) if old is None else jnp.where(tmask > 0, old, 0.0)
    inp = policy_losses.PolicyLossInputs(logp=logp, logp_old=old, token_mask=tmask, seq_weight=seq_w,
                                         advantages=batch["rl_advantages"], rewards=batch["rl_rewards"],
                                         r_star=batch["rl_r_star"], logp_ref=batch.get("rl_logp_ref"),
                                         target_logp=target_logp, target_logp_ref=batch.get("rl_target_logp_ref"),
                                         is_target=batch.get("rl_is_target"))
    out = policy_losses.compute(inp, loss_cfg)
    aux = {"denominator": out.denominator}
    for k, (s, d) in out.stats.items():
      aux[f"{k}/sum"], aux[f"{k}/den"] = s, d
    aux["entropy/sum"], aux["entropy/den"] = jnp.sum(entropy * tmask), jnp.sum(tmask)
    return out.loss_sum, aux

  return loss_fn


def make_update_step(model, tx: optax.GradientTransformation, loss_cfg: policy_losses.PolicyLossConfig, *,
                     temperature: float = 1.0, grad_accum_steps: int = 1, ema_decay: float = 0.0):
  """``(state, batch, trie) -> (state, metrics)``, to be jitted."""

  def update_step(state, batch, trie):
    loss_fn = make_policy_loss_fn(model, trie, loss_cfg, temperature)
    grads, loss_sum, aux = trainer.accumulate_gradients(loss_fn, state["params"], batch, jax.random.key(0),
                                                        grad_accum_steps)
    denom = jnp.maximum(aux["denominator"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    new_state = trainer.apply_gradients(state, grads, tx, ema_decay)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads)}
    for k in aux:
      if k.endswith("/sum"):
        name = k[:-4]
        metrics[name] = aux[k] / jnp.maximum(aux[name + "/den"], 1.0)
    return new_state, metrics

  return update_step
