"""The unified reward mapping: each component, per-scenario weights, and R* of the real target."""

import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.rl import rewards


def test_components_and_target_reward():
  emb = np.asarray([[0, 0], [1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)  # items 1..4
  items = jnp.asarray([[1, 2, 3, -1], [4, 4, 1, 2]])
  valid = items >= 0
  target = jnp.asarray([3, 1])
  scenario = jnp.asarray([0, 1])
  w = rewards.weight_table({"a": rewards.RewardWeights(format=1, hit=2, similarity=3, diversity=4),
                            "b": rewards.RewardWeights(format=0, hit=1, similarity=0, diversity=0)}, ["a", "b"])
  out = rewards.compute(items, valid, target, scenario, item_embeddings=emb, weights=w)
  c = {k: np.asarray(v) for k, v in out.components.items()}
  np.testing.assert_array_equal(c["format"], [[1, 1, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(c["hit"], [[0, 0, 1, 0], [0, 0, 1, 0]])
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(c["similarity"][0], [s, s, 1, 0], rtol=1e-6)  # cosine to the target (item 3)
  # diversity of item 1 in row 0: 1 - mean(cos(1,2)=0, cos(1,3)=s) over the 2 other real members
  np.testing.assert_allclose(c["diversity"][0, 0], 1 - s / 2, rtol=1e-6)
  assert c["diversity"][0, 3] == 0  # the empty beam
  # two copies of item 4 in row 1: each sees the other at cosine 1
  np.testing.assert_allclose(c["diversity"][1, 0], 1 - (1 + -1 + 0) / 3, rtol=1e-6, atol=1e-7)
  total = np.asarray(out.total)
  np.testing.assert_allclose(total[0], 1 * c["format"][0] + 2 * c["hit"][0] + 3 * c["similarity"][0]
                             + 4 * c["diversity"][0], rtol=1e-6)
  np.testing.assert_allclose(total[1], c["hit"][1], rtol=1e-6)  # scenario b: hit only
  # R*: the target as one more candidate: format 1, hit 1, similarity 1, diversity vs the group
  t_div = 1 - (s + s + 1) / 3
  np.testing.assert_allclose(float(out.r_star[0]), 1 + 2 + 3 + 4 * t_div, rtol=1e-6)
  assert float(out.r_star[1]) == 1.0
  # A candidate equal to the target scores R* but for its diversity against itself.
  assert total[0, 2] == pytest.approx(1 + 2 + 3 + 4 * c["diversity"][0, 2], rel=1e-6)


def test_weight_table_errors():
  with pytest.raises(ValueError, match=r"unknown scenario\(s\) \['nope'\]"):
    rewards.weight_table({"nope": rewards.RewardWeights()}, ["a"])
  table = rewards.weight_table({"a": rewards.RewardWeights(ranking=1.0)}, ["a"])
  with pytest.raises(ValueError, match="no ranking model"):
    rewards.check_weights(table, has_ranking_model=False)
  rewards.check_weights(table, has_ranking_model=True)
  table = rewards.weight_table({"a": rewards.RewardWeights(scorer=1.0)}, ["a"])
  with pytest.raises(ValueError, match="no second stage"):
    rewards.check_weights(table, has_ranking_model=False, has_scorer=False)
  rewards.check_weights(table, has_ranking_model=False, has_scorer=True)


def test_the_scorer_component_and_its_part_of_r_star():
  emb = np.eye(5, dtype=np.float32)
  items = jnp.asarray([[1, 2, -1], [3, 4, 1]])
  valid = items >= 0
  target = jnp.asarray([2, 4])
  p = jnp.asarray([[0.2, 0.1, 0.7], [0.05, 0.3, 0.01]])
  w = rewards.weight_table({}, ["a"], rewards.RewardWeights(format=0, hit=1, similarity=0, diversity=0, scorer=3))
  out = rewards.compute(items, valid, target, jnp.zeros(2, jnp.int32), item_embeddings=emb, weights=w,
                        scorer=p, target_scorer=jnp.asarray([0.1, 0.3]))
  np.testing.assert_allclose(np.asarray(out.components["scorer"]), [[0.2, 0.1, 0], [0.05, 0.3, 0.01]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.total), [[0.6, 1.3, 0], [0.15, 1.9, 0.03]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.r_star), [1.3, 1.9], rtol=1e-6)


def test_rank_penalty_follows_the_policy_order_only_in_groups_with_the_target():
  """MiniOneRec's ranking-aware rule reward: -d(r) / sum_j d(j), d(r) = 1 / log2(r + 2), for the
  non-target candidates of a group that holds the target, r the rank by the policy's score."""
  emb = np.eye(6, dtype=np.float32)
  items = jnp.asarray([[1, 2, 3, 4], [1, 2, 3, 4], [2, 2, 5, -1]])
  valid = items >= 0
  target = jnp.asarray([3, 5, 5])
  scores = jnp.asarray([[-1.0, -3.0, -2.0, -0.5], [-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -2.0, 0.0]])
  w = rewards.weight_table({}, ["a"], rewards.RewardWeights(format=0, hit=1, similarity=0, diversity=0,
                                                            rank_penalty=1))
  out = rewards.compute(items, valid, target, jnp.zeros(3, jnp.int32), item_embeddings=emb, weights=w,
                        order_scores=scores)
  pen = np.asarray(out.components["rank_penalty"])
  norm = sum(1 / np.log2(j + 2) for j in range(4))
  # row 0: ranks by score are item 4 (0), 1 (1), 3 (2, the target), 2 (3)
  np.testing.assert_allclose(pen[0], [-1 / np.log2(3) / norm, -1 / np.log2(5) / norm, 0, -1 / norm], rtol=1e-6)
  assert np.all(pen[1] == 0)  # the target is not in the group: no penalty anywhere
  # row 2: the two copies of item 2 tie at rank 0; the empty beam (its score ignored) gets nothing
  np.testing.assert_allclose(pen[2], [-1 / norm, -1 / norm, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.total), np.asarray(out.components["hit"]) + pen, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.r_star), [1, 1, 1])  # the target: hit 1, no penalty
  # Without scores the component is 0 (and so is its part of the total).
  plain = rewards.compute(items, valid, target, jnp.zeros(3, jnp.int32), item_embeddings=emb, weights=w)
  assert np.all(np.asarray(plain.components["rank_penalty"]) == 0)
