"""The ranking model (the reward service): negatives come from the row's pool and are never the
target; the AUC is the pairwise definition; a candidate's score does not depend on the rest of its
group; the model learns a planted preference that an untrained one does not have; and the rollout
step's ranking reward is the ranker's probability of each candidate and of the real target."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from oxyjax import partitioning
from oxyjax import trainer
from oxyjax.data import pipeline
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.rl import ranking_model as rm
from oxyjax.rl import rewards, step

N = 60  # items 1..N
L = (4, 4, 4)
HIST = 6
POLICY = ModelConfig(max_history=HIST, num_scenarios=2, sid_vocab_sizes=L, num_item_embeddings=N + 1)
SMALL = rm.RankerConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=1, dropout_rate=0.0,
                        num_negatives=4, popularity_negatives=0.5)


def _codes():
  rng = np.random.default_rng(0)
  flat = rng.choice(int(np.prod(L)), size=N, replace=False)
  return np.concatenate([np.zeros((1, 3), np.int32), np.stack(np.unravel_index(flat, L), 1).astype(np.int32)])


def _ranker(pools=None, popularity=None, config=SMALL):
  pools = pools or {0: np.arange(1, 31), 1: np.arange(31, N + 1)}
  popularity = np.ones(N + 1) if popularity is None else popularity
  return rm.RankingModel(config, POLICY, _codes(), pools, popularity)


def _planted(n, seed):
  """Histories of one 'taste' (odd or even items of scenario 0's pool 1..30); the target has the
  same parity as the history: a preference a history-aware ranker can learn and a uniform
  negative (half of them the other parity) reveals."""
  rng = np.random.default_rng(seed)
  parity = rng.integers(0, 2, n)
  pick = lambda size: 2 * rng.integers(0, 15, size) + 1 + parity.reshape((-1,) + (1,) * (len(size) - 1))
  hist = pick((n, HIST)).astype(np.int32)
  target = pick((n,)).astype(np.int32)
  return pipeline.ExampleArrays(history=hist, history_len=np.full(n, HIST), target=target, user=np.arange(1, n + 1),
                                scenario=np.zeros(n))


def test_policy_negatives_are_the_policys_first_candidates_other_than_the_target():
  beams = np.asarray([[5, 7, 9, 11], [7, 5, 9, 11], [3, -1, -1, -1]])
  target = np.asarray([7, 7, 8])
  picked, found = rm.policy_negatives(beams, target, 2)
  np.testing.assert_array_equal(picked[:2], [[5, 9], [5, 9]])  # order kept, the target skipped
  np.testing.assert_array_equal(found, [[True, True], [True, True], [True, False]])  # one real beam
  assert picked[2, 0] == 3
  ranker = _ranker(config=dataclasses.replace(SMALL, policy_negatives=2))
  neg = ranker.negatives(np.zeros(3, np.int32), target, 4, np.random.default_rng(0), 0.5, beams)
  np.testing.assert_array_equal(neg[:2, :2], [[5, 9], [5, 9]])
  assert neg[2, 0] == 3 and 1 <= neg[2, 1] <= 30 and neg[2, 1] != 8  # the shortfall drawn from the pool
  assert np.all((neg[:, 2:] >= 1) & (neg[:, 2:] <= 30) & (neg[:, 2:] != target[:, None]))
  with pytest.raises(ValueError, match="policy_negatives"):
    _ranker(config=dataclasses.replace(SMALL, policy_negatives=5))


def test_refresh_batch_takes_the_policys_candidates_as_negatives():
  """Post-training's ranker refresh: each prompt's target (label 1) against its first
  `policy_negatives` candidates other than the target (label 0), the rest from the pool."""
  ranker = _ranker(config=dataclasses.replace(SMALL, num_negatives=4))
  ex = _planted(3, 0)
  feats = {"history_items": ex.history, "history_codes": ranker.sid_codes[ex.history], "history_mask": ex.history > 0,
           "scenario": np.zeros(3, np.int32), "target_items": np.asarray([7, 7, 8], np.int32),
           "weights": np.asarray([1.0, 1.0, 0.0], np.float32)}
  items = np.asarray([[5, 7, 9, 11], [7, 5, 9, 11], [3, -1, -1, -1]])
  b = ranker.refresh_batch(feats, items, np.random.default_rng(0), policy_negatives=2)
  np.testing.assert_array_equal(b["candidates"][:2, :3], [[7, 5, 9], [7, 5, 9]])  # target, then the policy's
  assert b["candidates"][2, 0] == 8 and b["candidates"][2, 1] == 3
  np.testing.assert_array_equal(b["labels"][:, 0], 1.0)
  np.testing.assert_array_equal(b["labels"][:, 1:], 0.0)
  cands = b["candidates"]
  assert np.all((cands[:, 3:] >= 1) & (cands[:, 3:] <= 30)) and np.all(cands[:, 1:] != cands[:, :1])
  np.testing.assert_array_equal(b["candidate_codes"], ranker.sid_codes[cands])
  np.testing.assert_array_equal(b["weights"], feats["weights"])  # padding rows stay out of the loss
  np.testing.assert_array_equal(b["history_items"], ex.history)
  # policy_negatives = 0: every negative from the pool, as in the ranker's own training
  b0 = ranker.refresh_batch(feats, items, np.random.default_rng(0), policy_negatives=0)
  np.testing.assert_array_equal(b0["candidates"][:, 1:],
                                ranker.negatives(np.zeros(3, np.int32), feats["target_items"], 4,
                                                 np.random.default_rng(0), SMALL.popularity_negatives))


def test_negatives_come_from_the_rows_pool_and_never_equal_the_target():
  ranker = _ranker()
  rng = np.random.default_rng(0)
  scenario = np.arange(400) % 2
  target = np.where(scenario == 0, rng.integers(1, 31, 400), rng.integers(31, N + 1, 400))
  for frac in (0.0, 0.5, 1.0):
    neg = ranker.sample_negatives(scenario, target, 7, rng, frac)
    assert neg.shape == (400, 7)
    assert np.all((neg >= 1) & (neg <= 30) | (scenario[:, None] == 1))
    assert np.all((neg >= 31) & (neg <= N) | (scenario[:, None] == 0))
    assert not np.any(neg == target[:, None])
  with pytest.raises(ValueError, match="scenario id 5 has no candidate pool"):
    ranker.sample_negatives(np.asarray([5]), np.asarray([1]), 2, rng, 0.5)


def test_popularity_negatives_follow_training_popularity():
  pop = np.zeros(N + 1)
  pop[3] = 1000.0  # item 3 is 1000 of the 1000 + 30 add-one counts of pool 0
  ranker = _ranker(popularity=pop)
  rng = np.random.default_rng(1)
  target = np.full(2000, 7)
  by_pop = ranker.sample_negatives(np.zeros(2000, int), target, 1, rng, 1.0)
  uniform = ranker.sample_negatives(np.zeros(2000, int), target, 1, rng, 0.0)
  p = 1001.0 / 1030.0
  # Binomial(2000, p): 5 standard deviations is under 0.02; uniform gives item 3 about 1/30.
  assert abs(np.mean(by_pop == 3) - p) < 5 * np.sqrt(p * (1 - p) / 2000)
  assert np.mean(uniform == 3) < 0.1


def test_auc_is_the_pairwise_fraction_with_ties_counting_half():
  rng = np.random.default_rng(0)
  pos = rng.integers(0, 5, 50).astype(float)  # small integers: many ties
  neg = rng.integers(0, 5, (50, 9)).astype(float)
  pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for i, p in enumerate(pos) for n in neg[i]]
  assert rm.auc(pos, neg) == pytest.approx(np.mean(pairs), abs=1e-12)
  assert rm.auc(np.ones(3), np.zeros((3, 2))) == 1.0 and rm.auc(np.zeros(3), np.ones((3, 2))) == 0.0


def test_a_candidates_score_does_not_depend_on_its_group():
  ranker = _ranker()
  params = nn.unbox(ranker.init(jax.random.key(0), ranker.dummy_batch(2)))
  ex = _planted(4, seed=3)
  feats = ranker.make_batch(ex, np.ones((4, 1), np.int32))
  items = np.random.default_rng(0).integers(1, 31, (4, 6)).astype(np.int32)
  score = jax.jit(ranker.score)
  full = np.asarray(score(params, feats, items))
  perm = np.asarray([3, 0, 5, 1, 4, 2])
  shuffled = np.asarray(score(params, feats, items[:, perm]))
  single = np.stack([np.asarray(score(params, feats, items[:, j:j + 1]))[:, 0] for j in range(6)], 1)
  # The same arithmetic per candidate; only XLA's vectorisation over G may regroup float32 sums of
  # width <= 4 * 32 (the MLP input), a few ulps of |logit| <~ 10: 1e-5 absolute is ample and far
  # below any change of one candidate's inputs.
  np.testing.assert_allclose(shuffled, full[:, perm], atol=1e-5)
  np.testing.assert_allclose(single, full, atol=1e-5)


def test_the_ranker_learns_a_planted_preference():
  ranker = _ranker(config=SMALL)
  part = partitioning.Partitioner({"data": 8})  # data-parallel over the 8 fake devices
  tx, _ = trainer.make_optimizer(trainer.OptimizerConfig(learning_rate=3e-3, warmup_steps=10, decay="constant"), 300)
  factory = trainer.TrainStateFactory(ranker, part, tx)
  state = factory.init(jax.random.key(0))
  train, held_out = _planted(2048, seed=0), _planted(512, seed=1)
  it = pipeline.BatchIterator(train, 64, seed=0)
  with jax.set_mesh(part.mesh), part.rules_context():
    train_step = jax.jit(trainer.make_train_step(ranker, tx, 1))
    before = rm.evaluate_auc(ranker, state["params"], held_out, num_negatives=10, batch_size=128)
    for i in range(300):
      ex = next(it)
      neg = ranker.sample_negatives(ex.scenario, ex.target, 4, np.random.default_rng([0, i]), 0.0)
      state, _ = train_step(state, part.shard_batch(ranker.make_batch(ex, neg)), jax.random.key(1))
    after = rm.evaluate_auc(ranker, state["params"], held_out, num_negatives=10, batch_size=128)
  # Half of a uniform negative's draws have the other parity: a ranker that learned the taste
  # ranks those below the target (AUC -> 0.75 and above); an untrained one is at chance.
  assert abs(before["auc_uniform"] - 0.5) < 0.1
  assert after["auc_uniform"] > 0.7, after


def test_rollout_ranking_reward_is_the_rankers_probability(tiny):
  """The rollout step's ranking component (and R*'s) is sigmoid(ranker logit) of each candidate (and
  of the real target), weighted into the total like any other component."""
  from tests.rl.conftest import N_ITEMS

  pools = {0: np.arange(1, N_ITEMS + 1)}
  ranker = rm.RankingModel(SMALL, tiny.model.config, tiny.sid_codes, pools, np.ones(N_ITEMS + 1))
  rparams = nn.unbox(ranker.init(jax.random.key(3), ranker.dummy_batch(2)))
  batch, _ = tiny.batch(6, seed=2)
  w = rewards.RewardWeights(format=0.0, hit=0.0, similarity=0.0, ranking=1.0, diversity=0.0)
  table = rewards.weight_table({"s0": w}, ["s0"])
  emb = np.random.default_rng(1).normal(size=(tiny.sid_codes.shape[0], 16)).astype(np.float32)
  cfg = step.RolloutConfig(method="beam", group_size=4)
  fn = jax.jit(step.make_rollout_step(tiny.model, cfg, table, emb, ranker=ranker))
  rl, stats = fn(tiny.params, batch, tiny.forest, jax.random.key(0), None, rparams)
  by_path = {tuple(c): i for i, c in enumerate(tiny.sid_codes.tolist()) if i > 0}
  items = np.asarray([[by_path[tuple(c)] for c in row] for row in np.asarray(rl["rl_codes"]).tolist()])
  assert np.all(np.asarray(rl["rl_seq_weight"]) > 0)  # every beam is a real candidate here
  want = jax.nn.sigmoid(ranker.score(rparams, batch, items))
  want_target = jax.nn.sigmoid(ranker.score(rparams, batch, batch["target_items"][:, None]))[:, 0]
  # float32 logits of the same network on the same inputs (G = 4 or 1 candidates per row): see
  # test_a_candidates_score_does_not_depend_on_its_group for the tolerance.
  np.testing.assert_allclose(np.asarray(rl["rl_rewards"]), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rl["rl_r_star"]), want_target, atol=1e-5)
  assert 0.0 < float(stats["reward/ranking"]) < 1.0
  # Without a ranker a ranking weight is refused (the mapping would silently score 0).
  with pytest.raises(ValueError, match="ranking reward weight is set but no ranking model"):
    rewards.check_weights(table, has_ranking_model=False)
