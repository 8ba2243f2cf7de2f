"""Prefix-constrained beam search over semantic-ID paths; the constraint is an argument.

`beam_search` runs entirely inside the caller's `jax.jit`: the trie (`PrefixTrie`) is an
ordinary pytree argument, so another candidate pool whose arrays have the same shapes and
the same static fields (see `PrefixTrie.pad`) reuses the compiled program.

Step-function contract (docs/design.md)::

    step_fn(level: int, prev_codes [B, w] int32, cache) -> (logits [B, w, V_level] float32, cache)

(``V_level`` is the model's vocabulary at that level, at least ``trie.vocab_sizes[level]``.)

``level`` is a Python int (the loop over levels is unrolled: ``L`` is small and each level
may have its own static shapes); ``w = 1`` at level 0 and ``beam_size`` after. At level 0
``prev_codes`` is all zeros (a placeholder: the model's BOS/instruction tokens are its own
business); at level ``l > 0`` it holds the code each beam chose at level ``l - 1``
(``0`` for an empty beam, whose logits are ignored). Cache leaves have leading dims
``[B, w, ...]``; the search reorders them along axis 1 by the parent beam of each
surviving beam (a ``w = 1`` cache is thereby broadcast to ``beam_size``).

Scores are sums over levels of ``log_softmax`` over the full level vocabulary, taken only
at the codes the trie allows (``normalize="vocab"``, the default: the path's joint
log-probability under the model, so the ranking equals that of the model's distribution
conditioned on a valid item). ``normalize="valid"`` instead takes each level's
``log_softmax`` over the trie's children of the beam's prefix only (a locally normalised
distribution over valid items: an only child scores 0). ``normalize="last_valid"`` takes the
vocabulary's ``log_softmax`` at every level but the last, and the prefix's children's at the last
(for SID tables whose last level is the collision index that tells apart the items sharing their
first ``L - 1`` codes: an item alone under its prefix scores the joint log-probability of those
codes). Under ``"valid"`` and ``"last_valid"`` the last level needs logits only for beams whose
prefix has two or more children, so the search runs the last step on those beams alone,
gathered into ``ceil(w / 4)`` or ``ceil(w / 2)`` rows when every row of the batch has that few
(else on all of them; `_last_level_logits`): each beam's score is the same either way, and much
of the last step, a third of a 4-level search's decoder work at a wide beam, goes. (So at that
level a step function cannot forbid an only child by its logit; forbid it in the trie, e.g.
`PrefixTrie.subset`. Without ``return_cache`` only: a returned cache needs every beam's step.)
``level_weights`` (optional, one non-negative float per level) calibrates the levels: a path scores ``sum_l w_l log p_l``, so a
level whose probabilities are over- or under-confident for ranking counts less or more; the
beams are pruned on the weighted partial sums. ``None`` (all 1) is the joint log-probability.
A path whose score is ``-inf`` is
never returned (so a step function may also forbid codes by giving them ``-inf`` logits);
when fewer than ``beam_size`` paths are available, the remaining beams have item ``-1``,
codes ``-1`` and score ``-inf``. Returned beams are distinct valid paths sorted by score, best first.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oxyjax.sid.trie import PrefixTrie

StepFn = Callable[[int, jax.Array, Any], tuple[jax.Array, Any]]


class BeamSearchOutput(NamedTuple):
  """Result of `beam_search`, best beam first.

  items: ``[B, W] int32`` item index of each beam's leaf, ``-1`` for an empty beam.
  codes: ``[B, W, L] int32`` code path of each beam, ``-1`` for an empty beam.
  scores: ``[B, W] float32`` total log-probability, ``-inf`` for an empty beam.
  cache: the step function's cache after the last level, reordered to the returned
    beams (``None`` unless ``return_cache=True``).
  """

  items: jax.Array
  codes: jax.Array
  scores: jax.Array
  cache: Any = None


def reorder_cache(cache: Any, parent: jax.Array) -> Any:
  """Gathers every cache leaf ``[B, w, ...]`` along axis 1 with ``parent [B, W]`` -> ``[B, W, ...]``."""

  def gather(x):
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] != parent.shape[0]:
      raise ValueError(f"cache leaves must be [B={parent.shape[0]}, w, ...], got {x.shape}")
    idx = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1, mode="clip")

  return jax.tree_util.tree_map(gather, cache)


NORMALIZATIONS = ("vocab", "valid", "last_valid")


def _last_level_logits(step_fn: StepFn, level: int, prev_codes: jax.Array, cache: Any, need: jax.Array) -> jax.Array:
  """The last level's logits ``[B, w, V]`` float32, correct at the beams where ``need [B, w]``.

  The step runs on the needed beams only, gathered with their caches (in beam order, padded with
  other beams) into the smallest of ``ceil(w / 4)`` and ``ceil(w / 2)`` rows that holds every
  batch row's, with zeros at the other beams; when a row needs more, on every beam. One
  `jax.lax.switch`, so only the branch taken runs.
  """
  b, w = need.shape
  caps = sorted({c for c in (-(-w // 4), -(-w // 2)) if c < w})

  def gathered(cap):
    def run(_):
      pick = jnp.argsort(~need, axis=1, stable=True)[:, :cap]  # [B, cap]: the needed beams first
      sub, _ = step_fn(level, jnp.take_along_axis(prev_codes, pick, axis=1), reorder_cache(cache, pick))
      out = jnp.zeros((b, w) + sub.shape[2:], jnp.float32)
      return out.at[jnp.arange(b)[:, None], pick].set(sub.astype(jnp.float32))
    return run

  def every(_):
    return step_fn(level, prev_codes, cache)[0].astype(jnp.float32)

  most = jnp.max(need.sum(axis=1))
  branch = sum((most > c).astype(jnp.int32) for c in caps)  # caps is not empty: w > 1 here
  return jax.lax.switch(branch, [gathered(c) for c in caps] + [every], None)


def beam_search(
    step_fn: StepFn,
    init_cache: Any,
    trie: PrefixTrie,
    *,
    batch_size: int,
    beam_size: int,
    return_cache: bool = False,
    normalize: str = "vocab",
    root: jax.Array | None = None,
    level_weights: tuple[float, ...] | None = None,
) -> BeamSearchOutput:
  """Prefix-constrained beam search: the ``beam_size`` best valid paths per batch row.

  Args:
    step_fn: ``(level, prev_codes [B, w], cache) -> (logits [B, w, V_level], cache)``;
      see the module docstring.
    init_cache: pytree whose leaves are ``[B, 1, ...]`` (or ``[]``/``None`` for none).
    trie: the valid paths (a traced pytree argument; its static fields fix the shapes).
    batch_size: ``B``.
    beam_size: ``W`` (any positive size; may exceed the number of items).
    return_cache: also return the cache after the last step, reordered to the returned
      beams (costs one more gather per leaf).
    normalize: ``"vocab"`` (log-softmax over the level's full vocabulary), ``"valid"``
      (over the prefix's valid children only) or ``"last_valid"`` (``"vocab"``, but ``"valid"``
      at the last level); see the module docstring.
    root: optional ``[B] int32`` start node of each row (default node 0): with a forest of
      candidate pools (`PrefixTrie.forest`), row ``b`` starting at its pool's root returns
      only that pool's items, so one batch can mix pools.
    level_weights: optional per-level weights of the log-probabilities (see the module docstring).

  Returns:
    `BeamSearchOutput` with ``items [B, W]``, ``codes [B, W, L]``, ``scores [B, W]``,
    best first; empty beams (fewer than ``W`` valid paths) have ``-1`` / ``-inf``.
  """
  B, W, L = int(batch_size), int(beam_size), trie.num_levels
  if W < 1 or B < 1:
    raise ValueError(f"batch_size and beam_size must be positive, got {B}, {W}")
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  num_edges = trie.child_code.shape[0]
  if level_weights is not None:
    level_weights = tuple(float(x) for x in level_weights)
    if len(level_weights) != L or any(not np.isfinite(x) or x < 0 for x in level_weights):
      raise ValueError(f"level_weights must be {L} finite non-negative floats (one per level), got {level_weights}")

  # Live beams: node in the trie, score, and the codes chosen so far.
  node = jnp.zeros((B, 1), jnp.int32) if root is None else jnp.asarray(root, jnp.int32).reshape(B, 1)
  score = jnp.zeros((B, 1), jnp.float32)
  path = jnp.zeros((B, 1, 0), jnp.int32)
  prev_codes = jnp.zeros((B, 1), jnp.int32)
  cache = init_cache
  neg_inf = jnp.float32(-jnp.inf)

  for level in range(L):
    w = node.shape[1]
    k = trie.max_children[level]
    start = trie.child_start[node]  # [B, w]
    count = trie.child_start[node + 1] - start
    over_valid = normalize == "valid" or (normalize == "last_valid" and level == L - 1)
    skip_only_children = over_valid and level == L - 1 and w > 1 and not return_cache
    if skip_only_children:
      # An only child scores 0 whatever its logit: only beams with siblings need the step.
      logits = _last_level_logits(step_fn, level, prev_codes, cache, (count > 1) & (score > neg_inf))
    else:
      logits, cache = step_fn(level, prev_codes, cache)
    vocab = trie.vocab_sizes[level]
    # The model may have a wider vocabulary than the trie's codes use (e.g. one size for
    # every level, or a trie built from a pool): any V >= vocab_sizes[level] is fine.
    if logits.ndim != 3 or logits.shape[:2] != (B, w) or logits.shape[2] < vocab:
      raise ValueError(f"step_fn(level={level}) returned logits {logits.shape}, "
                       f"expected {(B, w)} + (V >= {vocab},)")
    logits = logits.astype(jnp.float32)

    offs = jnp.arange(k, dtype=jnp.int32)
    edge = jnp.minimum(start[..., None] + offs, num_edges - 1)  # [B, w, k]
    is_child = offs < count[..., None]
    valid = is_child & (score[..., None] > neg_inf)
    code = trie.child_code[edge]  # [B, w, k]
    child_logits = jnp.take_along_axis(logits, code, axis=-1, mode="clip")  # [B, w, k]
    # log_softmax taken only where needed: logits[child] - logsumexp(logits) over the
    # vocabulary, or over the valid children (a dead beam's -inf gives NaN, dropped below).
    if not over_valid:
      lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, w, 1]
    else:
      lse = jax.nn.logsumexp(jnp.where(is_child, child_logits, neg_inf), axis=-1, keepdims=True)
    lp = child_logits - lse  # over the valid children, an only child gets 0
    if skip_only_children:  # 0 also where the step did not run for its beam (logits of 0)
      lp = jnp.where(count[..., None] == 1, 0.0, lp)
    if level_weights is not None and level_weights[level] != 1.0:
      lp = lp * level_weights[level]
    # NaN (a broken step function) must not take a beam: treat it as -inf.
    cand = jnp.where(valid & ~jnp.isnan(lp), score[..., None] + lp, neg_inf)  # [B, w, k]
    if w > 1 and k > W:
      # At most W children of one beam can survive: pre-select them per beam so the
      # batch-wide top-k runs over w * W candidates instead of w * k (large codebooks).
      cand, pick = jax.lax.top_k(cand, W)
      edge = jnp.take_along_axis(edge, pick, axis=-1)
      code = jnp.take_along_axis(code, pick, axis=-1)
      k = W
    cand = cand.reshape(B, w * k)
    if w * k < W:  # fewer candidates than beams (e.g. level 0): pad with empty ones
      cand = jnp.pad(cand, ((0, 0), (0, W - w * k)), constant_values=-jnp.inf)
    score, flat = jax.lax.top_k(cand, W)  # [B, W], sorted descending
    flat = jnp.minimum(flat, w * k - 1)  # padding slots -> any real slot (they are dead)
    parent = (flat // k).astype(jnp.int32)
    chosen_edge = jnp.take_along_axis(edge.reshape(B, w * k), flat, axis=1)
    chosen_code = jnp.take_along_axis(code.reshape(B, w * k), flat, axis=1)
    alive = score > neg_inf
    node = jnp.where(alive, trie.child_node[chosen_edge], 0)
    prev_codes = jnp.where(alive, chosen_code, 0)
    path = jnp.concatenate(
        [jnp.take_along_axis(path, parent[..., None], axis=1), prev_codes[..., None]], axis=-1)
    if level + 1 < L or return_cache:
      cache = reorder_cache(cache, parent)

  alive = score > neg_inf
  items = jnp.where(alive, trie.leaf_item[node], -1)
  codes = jnp.where(alive[..., None], path, -1)
  return BeamSearchOutput(items=items.astype(jnp.int32), codes=codes.astype(jnp.int32),
                          scores=score, cache=cache if return_cache else None)


# ---------------------------------------------------------------------- reference (tests)


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def exhaustive_topk(
    logprob_fn: Callable[[int, np.ndarray], np.ndarray],
    trie: PrefixTrie,
    k: int,
    *,
    normalize: bool | str = True,
    level_weights: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Brute-force reference (NumPy, one example): scores every valid path, keeps the top ``k``.

  Args:
    logprob_fn: ``(level, prefixes [P, level] int) -> [P, V_level]`` scores of the next
      code after each prefix. With ``normalize=True`` these are logits and are
      log-softmaxed over the full vocabulary (what `beam_search` does with step logits);
      with ``normalize="valid"`` over each prefix's valid next codes only, and with
      ``normalize="last_valid"`` so at the last level and over the vocabulary before it.
    trie: the valid paths.
    k: how many to return.
    level_weights: per-level weights of the scores, as in `beam_search`.

  Returns:
    ``(items [k] int32, codes [k, L] int32, scores [k] float64)`` best first, padded with
    ``-1`` / ``-inf`` like `beam_search` (paths scoring ``-inf`` are dropped).
  """
  codes, items = trie.paths()
  total = np.zeros(items.size, dtype=np.float64)
  for level in range(trie.num_levels):
    prefixes = codes[:, :level]
    scores = np.asarray(logprob_fn(level, prefixes), dtype=np.float64)
    if normalize == "valid" or (normalize == "last_valid" and level == trie.num_levels - 1):
      # mask each path's row to the codes that follow its prefix
      allowed = np.zeros(scores.shape, bool)
      for prefix in {tuple(p) for p in prefixes.tolist()}:
        rows = np.all(prefixes == np.asarray(prefix, dtype=prefixes.dtype), axis=1)
        allowed[np.ix_(rows, np.unique(codes[rows, level]))] = True
      scores = _log_softmax_np(np.where(allowed, scores, -np.inf))
    elif normalize:
      scores = _log_softmax_np(scores)
    weight = 1.0 if level_weights is None else float(level_weights[level])
    total += weight * np.take_along_axis(scores, codes[:, level:level + 1].astype(np.int64), axis=1)[:, 0]
  keep = np.flatnonzero(total > -np.inf)
  order = keep[np.argsort(-total[keep], kind="stable")][:k]
  out_items = np.full(k, -1, np.int32)
  out_codes = np.full((k, trie.num_levels), -1, np.int32)
  out_scores = np.full(k, -np.inf, np.float64)
  out_items[:order.size] = items[order]
  out_codes[:order.size] = codes[order]
  out_scores[:order.size] = total[order]
  return out_items, out_codes, out_scores
