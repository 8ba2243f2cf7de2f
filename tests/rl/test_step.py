"""The post-training update: ratio exactly 1 when the policy has not moved; the same loss and
gradient on 1 and 8 fake devices and with gradient accumulation; the policy really moves toward
high-reward candidates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oxyjax import partitioning
from oxyjax import trainer
from oxyjax.rl import losses, rewards, step
from tests.test_train_step import _rounding_tol

G = 8


def _rollouts(tiny, cfg, b=8, seed=0):
  batch, _ = tiny.batch(b, seed=seed)
  table = rewards.weight_table({}, ["s0"])
  emb = np.random.default_rng(1).normal(size=(tiny.sid_codes.shape[0], 16)).astype(np.float32)
  fn = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb))
  rl, stats = fn(tiny.params, batch, tiny.forest, jax.random.key(seed))
  return {**batch, **jax.tree.map(np.asarray, rl)}, stats


def _loss_and_grads(tiny, batch, loss_cfg, part, accum=1, temperature=1.0):
  """Loss and gradient (summed, divided by the denominator) of the policy loss on `part`."""
  def f(params, b, trie):
    fn = step.make_policy_loss_fn(tiny.model, trie, loss_cfg, temperature)
    grads, loss_sum, aux = trainer.accumulate_gradients(fn, params, b, jax.random.key(0), accum)
    d = jnp.maximum(aux["denominator"], 1.0)
    return loss_sum / d, jax.tree.map(lambda g: g / d, grads), aux

  with jax.set_mesh(part.mesh), part.rules_context():
    sb = {k: jax.device_put(v, part.data_sharding(np.ndim(v))) for k, v in batch.items()}
    return jax.tree.map(np.asarray, jax.jit(f)(tiny.params, sb, tiny.forest))


def test_ratio_is_exactly_one_when_the_policy_has_not_moved(tiny):
  """On-policy (one update per rollout), pi_old is the loss's own forward pass with the gradient
  stopped: every ratio is exactly 1.0, for every registered loss."""
  cfg = step.RolloutConfig(method="sample", group_size=G)
  batch, _ = _rollouts(tiny, cfg)
  for name in sorted(set(losses.names()) - losses.NEEDS_TARGET):  # S-DPO has no ratio: its own test below
    fn = jax.jit(step.make_policy_loss_fn(tiny.model, tiny.forest, losses.PolicyLossConfig(name=name), 1.0))
    _, aux = jax.device_get(fn(tiny.params, batch, jax.random.key(0)))
    assert aux["ratio_mean/sum"] == aux["ratio_mean/den"], name  # a sum of n ratios, each exactly 1.0
    assert aux["ratio_abs_dev/sum"] == 0.0, name


def test_stored_old_logprobs_give_ratio_one_up_to_rounding(tiny):
  """With several updates per rollout pi_old is scored at rollout time by another compiled
  program (the same function): the ratio is 1 up to float32 rounding of the log-probs (~1e-6)."""
  cfg = step.RolloutConfig(method="beam", group_size=G, updates_per_rollout=2)
  batch, _ = _rollouts(tiny, cfg)
  assert "rl_logp_old" in batch
  one = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  _, _, aux = _loss_and_grads(tiny, batch, losses.PolicyLossConfig(name="grpo"), one)
  assert abs(aux["ratio_mean/sum"] / aux["ratio_mean/den"] - 1.0) < 1e-5
  assert aux["ratio_abs_dev/sum"] / aux["ratio_abs_dev/den"] < 1e-5


def test_same_loss_and_gradient_on_eight_devices_and_with_accumulation(tiny):
  """The rl arrays ride along each prompt's row, so a data shard or microbatch holds whole groups;
  the loss is a sum over sequences and its denominator. Eight devices (data 2 x fsdp 2 x tensor 2)
  and 2-way accumulation only reorder sums: agreement within _rounding_tol (tests/test_train_step.py)
  of the largest gradient element, the same bound as the pre-training step."""
  assert jax.device_count() == 8
  cfg = step.RolloutConfig(method="sample", group_size=G, updates_per_rollout=2)
  batch, _ = _rollouts(tiny, cfg, seed=3)
  # a moved policy, so that the ratios and the clips are not trivial
  batch["rl_logp_old"] = batch["rl_logp_old"] + np.random.default_rng(0).normal(0, 0.05, batch["rl_logp_old"].shape)
  loss_cfg = losses.PolicyLossConfig(name="sa_gcpo")
  one = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  eight = partitioning.Partitioner({"data": 2, "fsdp": 2, "tensor": 2})
  ref_loss, ref_g, _ = _loss_and_grads(tiny, batch, loss_cfg, one)
  tol = _rounding_tol(tiny.model.config, batch["scenario"].shape[0] * G)
  for part, accum in ((eight, 1), (one, 2)):
    loss, g, _ = _loss_and_grads(tiny, batch, loss_cfg, part, accum)
    np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol * abs(ref_loss))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_g), jax.tree.leaves(g)):
      np.testing.assert_allclose(b, a, rtol=0, atol=tol * float(np.abs(a).max()) + 1e-30,
                                 err_msg=f"{jax.tree_util.keystr(path)} ({part.mesh.shape}, accum {accum})")
  # A dropped microbatch would be far outside: the loss of half the prompts differs.
  half = {k: v[::2] for k, v in batch.items()}
  loss_half, _, _ = _loss_and_grads(tiny, half, loss_cfg, one)
  assert abs(loss_half - ref_loss) > 100 * tol * abs(ref_loss)


def test_updates_raise_the_reward(tiny):
  """A few SA-GCPO updates with a hit-only reward make the sampled groups hit the target more."""
  cfg = step.RolloutConfig(method="sample", group_size=16)
  table = rewards.weight_table({"s0": rewards.RewardWeights(format=0.0, hit=1.0, similarity=0.0,
                                                                diversity=0.0)}, ["s0"])
  emb = np.eye(tiny.sid_codes.shape[0], dtype=np.float32)
  roll = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb))
  tx = optax.adam(3e-3)
  update = jax.jit(step.make_update_step(tiny.model, tx, losses.PolicyLossConfig(name="sa_gcpo")))
  batch, _ = tiny.batch(8, seed=7)
  state = {"params": tiny.params, "opt_state": tx.init(tiny.params), "step": jnp.zeros((), jnp.int32)}
  hits = []
  for i in range(40):
    rl, stats = roll(state["params"], batch, tiny.forest, jax.random.key(i))
    hits.append(float(stats["reward/hit"]))
    state, m = update(state, {**batch, **rl}, tiny.forest)
    assert np.isfinite(float(m["loss"]))
  assert np.mean(hits[-5:]) > np.mean(hits[:5]) + 0.1, hits


def test_sdpo_step_starts_at_log_one_plus_g_and_raises_the_target(tiny):
  """S-DPO in the step: the rollout scores the group and the real target under the frozen
  reference; at the reference every implicit reward is 0, so each row's loss is log(1 + G') with G'
  its real candidates other than the target (float32 rounding of the log-prob sums only); a few
  updates from there raise the target's log-prob and bring it into more beam groups."""
  cfg = step.RolloutConfig(method="beam", group_size=G)
  table = rewards.weight_table({}, ["s0"])
  emb = np.eye(tiny.sid_codes.shape[0], dtype=np.float32)
  roll = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb))
  batch, _ = tiny.batch(16, seed=5)
  rl, _ = roll(tiny.params, batch, tiny.forest, jax.random.key(0), tiny.params)
  rl = jax.tree.map(np.asarray, rl)
  assert rl["rl_is_target"].any() and not rl["rl_is_target"].all(axis=1).any()
  np.testing.assert_array_equal(rl["rl_is_target"], (rl["rl_items"] == batch["target_items"][:, None]) & (rl["rl_seq_weight"] > 0))
  loss_cfg = losses.PolicyLossConfig(name="sdpo", dpo_beta=1.0)
  fn = jax.jit(step.make_policy_loss_fn(tiny.model, tiny.forest, loss_cfg, 1.0))
  loss_sum, aux = jax.device_get(fn(tiny.params, {**batch, **rl}, jax.random.key(0)))
  n_rej = ((rl["rl_seq_weight"] > 0) & ~rl["rl_is_target"]).sum(1)
  np.testing.assert_allclose(loss_sum / aux["denominator"], np.mean(np.log1p(n_rej)), rtol=1e-5)
  assert abs(aux["dpo/margin/sum"]) / aux["dpo/margin/den"] < 1e-5

  tx = optax.adam(3e-3)
  update = jax.jit(step.make_update_step(tiny.model, tx, loss_cfg))
  state = {"params": tiny.params, "opt_state": tx.init(tiny.params), "step": jnp.zeros((), jnp.int32)}
  found = []
  for i in range(15):
    rl, stats = roll(state["params"], batch, tiny.forest, jax.random.key(i), tiny.params)
    found.append(float(stats["groups/target_in_group"]))
    state, m = update(state, {**batch, **rl}, tiny.forest)
    assert np.isfinite(float(m["loss"]))
  assert m["dpo/margin"] > 0.5 and m["dpo/preferred"] > 0.9, m
  assert found[-1] > found[0] + 0.2, found


def _numpy_rank_penalty(order, valid, hit):
  """rewards.rank_penalty from its definition: in a group holding the target, every other real
  candidate gets -d(r) / sum_j d(j), d(r) = 1 / log2(r + 2), r the real candidates ranked strictly above."""
  b, g = order.shape
  norm = sum(1.0 / np.log2(j + 2.0) for j in range(g))
  out = np.zeros((b, g))
  for i in range(b):
    if not hit[i].any():
      continue
    for j in range(g):
      if valid[i, j] and not hit[i, j]:
        r = int(np.sum(valid[i] & (order[i] > order[i, j])))
        out[i, j] = -1.0 / np.log2(r + 2.0) / norm
  return out


def _tiny_scorer(tiny, seed):
  """A small SASRec scorer over the tiny model's items, trained on random sequences."""
  from oxyjax import rescoring
  from oxyjax.sid import sasrec

  n_items = tiny.sid_codes.shape[0] - 1
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(1, n_items + 1, 6).tolist() for _ in range(60)]
  return rescoring.train(seqs, n_items, sasrec.SASRecConfig(dim=16, num_blocks=1, max_len=8, num_epochs=2,
                                                            length_buckets=(8,)))


def test_rank_penalty_ranks_each_group_as_the_second_stage_would_serve_it(tiny):
  """With a second stage the rank_penalty reward ranks a group by policy + weight * SASRec (the
  served order); the reference recomputes both scores outside the rollout program. Weight 0 is
  the policy's own order; a large weight changes the order of some groups (and so their rewards).
  Ranks compare float scores of two programs: a near-tie could flip, so the candidates' fused
  scores are checked to be apart by more than the two programs can differ (scores under 30 in
  magnitude, a few float32 operations each: ~1e-5; checked against 1e-4)."""
  from oxyjax import rescoring
  from oxyjax.rl import rollout as rollout_lib

  scorer = _tiny_scorer(tiny, seed=3)
  cfg = step.RolloutConfig(method="beam", group_size=G)
  table = rewards.weight_table({}, ["s0"], rewards.RewardWeights(format=0.0, hit=1.0, similarity=0.0,
                                                                 diversity=0.0, rank_penalty=1.0))
  emb = np.eye(tiny.sid_codes.shape[0], dtype=np.float32)
  batch, _ = tiny.batch(32, seed=5)
  plain, _ = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb))(tiny.params, batch, tiny.forest,
                                                                           jax.random.key(0))
  rewards_by_weight = {}
  for w in (0.0, 4.0):
    stage = rescoring.SecondStage(scorer, w, 0)
    rl, stats = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb, stage=stage, rank_order="stage"))(
        tiny.params, batch, tiny.forest, jax.random.key(0), None, None, scorer.params)
    rl = jax.tree.map(np.asarray, rl)
    items, valid = rl["rl_items"], rl["rl_items"] > 0
    logp = np.asarray(rollout_lib.policy_logprobs(tiny.model, tiny.params, batch, rl["rl_codes"], tiny.forest))
    sas = np.take_along_axis(np.asarray(stage.log_softmax(scorer.params, batch)), np.maximum(items, 0), axis=1)
    order = logp.sum(-1) + w * sas
    gaps = np.abs(order[:, :, None] - order[:, None, :])[valid[:, :, None] & valid[:, None, :]]
    assert gaps[gaps > 0].min() > 1e-4
    hit = (items == np.asarray(batch["target_items"])[:, None]) & valid
    assert hit.any(axis=1).sum() >= 4  # groups holding their target: the penalty is not all zeros
    np.testing.assert_allclose(rl["rl_rewards"], hit + _numpy_rank_penalty(order, valid, hit), rtol=0, atol=1e-6)
    rewards_by_weight[w] = (rl["rl_rewards"], float(stats["rollout/stage_changes_first"]))
  np.testing.assert_array_equal(rewards_by_weight[0.0][0], np.asarray(plain["rl_rewards"]))
  assert rewards_by_weight[0.0][1] == 0.0 and rewards_by_weight[4.0][1] > 0.0
  assert not np.array_equal(rewards_by_weight[4.0][0], rewards_by_weight[0.0][0])


def test_the_scorer_reward_is_the_second_stages_probability_of_each_candidate(tiny):
  """RewardWeights.scorer: the stage's SASRec probability of each candidate (and of the real target,
  for R*), against a NumPy recomputation from the scorer itself; and where it binds, the group clip.
  In a group without its target every reward is w * p < hit + w * p(target) = R*, so every
  candidate with a positive advantage is one SA-GCPO's group clip zeroes."""
  from oxyjax import rescoring

  scorer = _tiny_scorer(tiny, seed=4)
  stage = rescoring.SecondStage(scorer, 1.5, 0)
  cfg = step.RolloutConfig(method="beam", group_size=G)
  w = 2.0
  table = rewards.weight_table({}, ["s0"], rewards.RewardWeights(format=0.0, hit=1.0, similarity=0.0,
                                                                 diversity=0.0, scorer=w))
  emb = np.eye(tiny.sid_codes.shape[0], dtype=np.float32)
  batch, _ = tiny.batch(32, seed=5)
  with pytest.raises(ValueError, match="need the second stage"):
    step.make_rollout_step(tiny.model, cfg, table, emb)
  rl, stats = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb, stage=stage))(
      tiny.params, batch, tiny.forest, jax.random.key(0), None, None, scorer.params)
  rl = jax.tree.map(np.asarray, rl)
  items, valid = rl["rl_items"], rl["rl_items"] > 0
  target = np.asarray(batch["target_items"])
  p_all = np.exp(np.asarray(stage.log_softmax(scorer.params, batch), np.float64))
  np.testing.assert_allclose(p_all.sum(-1), 1.0, rtol=1e-5)  # a distribution over the catalogue
  p = np.take_along_axis(p_all, np.maximum(items, 0), axis=1)
  hit = (items == target[:, None]) & valid
  # float32 exp of a float32 log-softmax, compared with the float64 exp of the same: ~1e-7 relative.
  np.testing.assert_allclose(rl["rl_rewards"], (hit + w * p) * valid, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(rl["rl_r_star"], 1.0 + w * p_all[np.arange(len(target)), target], rtol=1e-5)
  assert 0.0 <= float(stats["reward/scorer_target_above_group"]) <= 1.0
  no_target = ~hit.any(axis=1) & (valid.sum(1) > 1)
  assert no_target.sum() >= 4
  positive = (rl["rl_advantages"] > 0) & valid & no_target[:, None]
  assert positive.sum() > 0  # the scorer spreads the rewards of groups without their target
  gated, clipped = losses.group_clip(jnp.asarray(rl["rl_advantages"]), jnp.asarray(rl["rl_rewards"]),
                                     jnp.asarray(rl["rl_r_star"]))
  np.testing.assert_array_equal(np.asarray(gated)[positive], 0.0)
  assert np.all(np.asarray(clipped)[positive])
