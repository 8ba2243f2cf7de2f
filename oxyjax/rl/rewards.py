"""Unified reward mapping (PAPER.md section 7): one scenario-aware weighted sum of components.

    R_i = w_format * format_i + w_hit * hit_i + w_similarity * similarity_i
          + w_ranking * ranking_i + w_diversity * diversity_i

  format      1 for a valid item of the scenario's pool (an empty beam: 0). The constrained
              rollouts only produce valid items, so this is 1 for every real candidate; it is
              kept so that the mapping is the paper's and an unconstrained sampler would be scored.
  hit         1 when the candidate is the real target item.
  similarity  cosine between the candidate's item embedding and the prompt's anchor: the target
              item's embedding, or the query's embedding for search (the caller picks the anchor
              and the embedding space they share).
  ranking     a ranking model's score of (history, candidate), given by the caller as ``[B, G]``
              scores (the reward service). None = no ranking model: its weight must then be 0.
  diversity   1 - the mean cosine between the candidate and the group's other real candidates.
  rank_penalty  the ranking-aware rule reward of MiniOneRec (Kong et al., 2025): in a group that holds
              the real target, every other candidate gets ``-d(r) / sum_j d(j)`` with
              ``d(r) = 1 / log2(r + 2)``, r its 0-based rank in the group by the policy's own
              sequence log-prob (for beam rollouts, its beam position; j over the G slots), so
              the wrong items the policy ranks highest are pushed down most. The target and every
              candidate of a group without the target get 0. It needs the candidates' scores
              (``order_scores``); without them it is 0.
  scorer      the second stage's scorer (oxyjax/rescoring.py: a SASRec model trained on the same
              training split) as a reward service: its next-item probability of the candidate given
              the prompt's history, ``p_SASRec(item | history)`` (softmax over the whole catalogue), given
              by the caller as ``[B, G]`` (and the target's own as ``[B]`` for ``R*``). None: its weight must be 0.

``R*``, the reward of the real target for the prompt, is computed with the same mapping (format 1,
hit 1, the target's own similarity, ranking and diversity against the group), as SA-GCPO's group
clip needs. Every component is returned so that the step can log it. Weights are per scenario
(`RewardWeights`, set in gin per scenario name) and gathered per row by the batch's scenario id.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

COMPONENTS = ("format", "hit", "similarity", "ranking", "diversity", "rank_penalty", "scorer")


@dataclasses.dataclass(frozen=True)
class RewardWeights:
  """The weight of each reward component for one scenario."""

  format: float = 0.1
  hit: float = 1.0
  similarity: float = 0.5
  ranking: float = 0.0
  diversity: float = 0.1
  rank_penalty: float = 0.0
  scorer: float = 0.0

  def as_array(self) -> np.ndarray:
    return np.asarray([getattr(self, c) for c in COMPONENTS], np.float32)


def weight_table(weights: Mapping[str, RewardWeights] | None, scenario_names: Sequence[str],
                 default: RewardWeights = RewardWeights()) -> np.ndarray:
  """``[num_scenarios, len(COMPONENTS)]`` weights by scenario id (names in scenario-id order); a scenario not
  in `weights` takes `default`. An unknown name in `weights` is an error."""
  weights = dict(weights or {})
  unknown = sorted(set(weights) - set(scenario_names))
  if unknown:
    raise ValueError(f"reward weights given for unknown scenario(s) {unknown}; scenarios: {list(scenario_names)}")
  return np.stack([weights.get(n, default).as_array() for n in scenario_names])


class Rewards(NamedTuple):
  total: jax.Array  # [B, G]
  r_star: jax.Array  # [B]
  components: dict[str, jax.Array]  # name -> [B, G]
  target_components: dict[str, jax.Array]  # name -> [B]


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def compute(items: jax.Array, valid: jax.Array, target: jax.Array, scenario: jax.Array, *,
            item_embeddings: jax.Array, weights: jax.Array, anchor: jax.Array | None = None,
            ranking: jax.Array | None = None, target_ranking: jax.Array | None = None,
            order_scores: jax.Array | None = None, scorer: jax.Array | None = None,
            target_scorer: jax.Array | None = None) -> Rewards:
  """Rewards of a group of candidates per prompt (inside jit).

  Args:
    items: ``[B, G]`` candidate item indices (-1 for an empty beam). valid: ``[B, G]`` bool.
    target: ``[B]`` the real target item index. scenario: ``[B]`` scenario ids.
    item_embeddings: ``[N + 1, D]`` one vector per item (row 0 padding).
    weights: ``[num_scenarios, len(COMPONENTS)]`` (`weight_table`).
    anchor: ``[B, D]`` what similarity is measured against (default: the target's embedding).
    ranking / target_ranking: ``[B, G]`` / ``[B]`` ranking-model scores, or None.
    order_scores: ``[B, G]`` the policy's score of each candidate (its sequence log-prob), which
      orders the group for ``rank_penalty``; None: that component is 0.
    scorer / target_scorer: ``[B, G]`` / ``[B]`` the second stage's scorer probabilities, or None.
  """
  w = jnp.asarray(weights, jnp.float32)[scenario]  # [B, len(COMPONENTS)]
  if ranking is None:
    ranking = jnp.zeros(items.shape, jnp.float32)
    target_ranking = jnp.zeros(target.shape, jnp.float32)
  if scorer is None:
    scorer = jnp.zeros(items.shape, jnp.float32)
    target_scorer = jnp.zeros(target.shape, jnp.float32)
  emb = _normalize(jnp.asarray(item_embeddings))
  cand = emb[jnp.maximum(items, 0)] * valid[..., None]  # [B, G, D]
  tgt = emb[target]  # [B, D]
  anchor = tgt if anchor is None else _normalize(anchor)
  v = valid.astype(jnp.float32)
  sim = jnp.einsum("bgd,bd->bg", cand, anchor)
  pair = jnp.einsum("bgd,bhd->bgh", cand, cand)  # cosine between members
  n_other = jnp.maximum(jnp.sum(v, -1, keepdims=True) - 1.0, 1.0)
  diversity = (1.0 - (jnp.sum(pair * v[:, None, :], -1) - jnp.sum(cand * cand, -1)) / n_other) * v
  hit = ((items == target[:, None]) & valid).astype(jnp.float32)
  comps = {"format": v, "hit": hit, "similarity": sim * v, "ranking": ranking.astype(jnp.float32) * v,
           "diversity": diversity, "rank_penalty": rank_penalty(order_scores, valid, hit),
           "scorer": scorer.astype(jnp.float32) * v}
  # The real target, scored as one more candidate of the group (against all its real members).
  t_div = 1.0 - jnp.sum(jnp.einsum("bgd,bd->bg", cand, tgt) * v, -1) / jnp.maximum(jnp.sum(v, -1), 1.0)
  t_comps = {"format": jnp.ones(target.shape, jnp.float32), "hit": jnp.ones(target.shape, jnp.float32),
             "similarity": jnp.sum(tgt * anchor, -1), "ranking": target_ranking.astype(jnp.float32),
             "diversity": t_div, "rank_penalty": jnp.zeros(target.shape, jnp.float32),
             "scorer": target_scorer.astype(jnp.float32)}
  total = sum(w[:, i, None] * comps[c] for i, c in enumerate(COMPONENTS))
  r_star = sum(w[:, i] * t_comps[c] for i, c in enumerate(COMPONENTS))
  return Rewards(total=total * v, r_star=r_star, components=comps, target_components=t_comps)


def rank_penalty(scores: jax.Array | None, valid: jax.Array, hit: jax.Array) -> jax.Array:
  """``[B, G]`` the rank_penalty component (see the module doc); 0 where ``scores`` is None.
  Ties (a sampled item drawn twice) share the better rank: r counts the real candidates scored
  strictly higher."""
  if scores is None:
    return jnp.zeros(hit.shape, jnp.float32)
  g = hit.shape[-1]
  s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  rank = jnp.sum(s[:, None, :] > s[:, :, None], axis=-1).astype(jnp.float32)  # [B, G]
  disc = 1.0 / jnp.log2(rank + 2.0)
  norm = jnp.sum(1.0 / jnp.log2(jnp.arange(g, dtype=jnp.float32) + 2.0))
  has_target = jnp.any(hit > 0, axis=-1, keepdims=True)
  return jnp.where(has_target & valid & (hit == 0), -disc / norm, 0.0)


def uses(table: np.ndarray, component: str) -> bool:
  """Whether any scenario of a `weight_table` gives ``component`` a non-zero weight."""
  return bool(np.any(np.asarray(table)[:, COMPONENTS.index(component)] != 0))


def check_weights(table: np.ndarray, has_ranking_model: bool, has_scorer: bool = False) -> None:
  if not has_ranking_model and uses(table, "ranking"):
    raise ValueError("a ranking reward weight is set but no ranking model is given: set "
                     "RewardWeights.ranking = 0 or pass a ranking model")
  if not has_scorer and uses(table, "scorer"):
    raise ValueError("a scorer reward weight is set but the run has no second stage whose scorer could give it: "
                     "set RewardWeights.scorer = 0 or start from a run with a second stage (second_stage)")
