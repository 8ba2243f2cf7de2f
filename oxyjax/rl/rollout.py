"""Rollouts from the constrained policy, and the same policy's teacher-forced log-probs.

The policy that post-training optimises is the model's next-code distribution **renormalised
over the trie's valid children** of each prefix, at a temperature:

    pi(c | x, prefix) = softmax_{c' in children(prefix)}(logits(c') / temperature)[c]

so every candidate it can produce is a valid item of the row's pool (the row's root in a forest
of pools, `PrefixTrie.forest`). `sample` draws G candidates per prompt from exactly this
distribution; `beam` takes the G best paths under it (`decoding.beam_search` with
``normalize="valid"``, distinct by construction); `policy_logprobs` scores given paths under it,
teacher-forced, with the same trie mask and temperature, so the ratio pi_theta / pi_old that the
losses (oxyjax/rl/losses.py) take compares the probabilities of the distribution actually
sampled. Both rollouts and the scorer run the encoder once per prompt: the G candidates share it
as ``[B, G, ...]`` decoder rows (`EncoderDecoder.group_logits`, `decode_step` with w = G).

Layout: ``[B, G, ...]`` with each group on one row of B; a batch sharded over B never splits a
group (``reshape(B * G, ...)`` gives the contiguous ``[B*G, ...]`` layout).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from oxyjax import decoding
from oxyjax.models.encoder_decoder import EncoderDecoder
from oxyjax.sid.trie import PrefixTrie

NEG_INF = float("-inf")


class Rollout(NamedTuple):
  """G candidates per prompt.

  codes: ``[B, G, L] int32`` SID paths (``-1`` for an empty beam).
  items: ``[B, G] int32`` item index (``-1`` for an empty beam).
  logp: ``[B, G, L] float32`` per-token log-probs under the sampling policy at rollout time
    (``0`` for an empty beam's tokens).
  valid: ``[B, G] bool`` a real candidate (False only for empty beams).
  """

  codes: jax.Array
  items: jax.Array
  logp: jax.Array
  valid: jax.Array


def _children(trie: PrefixTrie, node: jax.Array, level: int):
  """(codes, next nodes, is_child) ``[..., k]`` of each node's children at ``level``."""
  k = trie.max_children[level]
  start = trie.child_start[node]
  count = trie.child_start[node + 1] - start
  offs = jnp.arange(k, dtype=jnp.int32)
  edge = jnp.minimum(start[..., None] + offs, trie.child_code.shape[0] - 1)
  return trie.child_code[edge], trie.child_node[edge], offs < count[..., None]


def children_logprobs(logits: jax.Array, trie: PrefixTrie, node: jax.Array, level: int, temperature: float):
  """The policy at one level: log pi over each node's children ``[..., k]`` (-inf off the
  children), their codes, next nodes and which of the k slots are children. logits ``[..., V]`` for prefixes ending at ``node [...]``."""
  code, nxt, is_child = _children(trie, node, level)
  child_logits = jnp.take_along_axis(logits.astype(jnp.float32), code, axis=-1, mode="clip") / temperature
  lp = jax.nn.log_softmax(jnp.where(is_child, child_logits, NEG_INF), axis=-1)
  return jnp.where(is_child, lp, NEG_INF), code, nxt, is_child


def _entropy(lp: jax.Array) -> jax.Array:
  p = jnp.exp(lp)
  return -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1)


def _roots(batch: Mapping[str, jax.Array], b: int) -> jax.Array:
  root = batch.get("pool_root")
  return jnp.zeros((b,), jnp.int32) if root is None else jnp.asarray(root, jnp.int32).reshape(b)


def policy_logprobs(model, params, batch: Mapping[str, jax.Array], codes: jax.Array, trie: PrefixTrie, *,
                    temperature: float = 1.0, return_entropy: bool = False):
  """Teacher-forced per-token log pi of given paths ``codes [B, G, L]`` (the encoder once per row).

  A token outside its prefix's children gets -inf (an invalid path); padding candidates
  (codes -1) should be masked by the caller. Returns ``[B, G, L]`` (and, with
  ``return_entropy``, the policy's entropy at each level ``[B, G, L]``).
  """
  b, g, num_levels = codes.shape
  safe = jnp.maximum(codes, 0)
  logits = model.network.apply({"params": params}, batch, safe, method=EncoderDecoder.group_logits)
  node = jnp.broadcast_to(_roots(batch, b)[:, None], (b, g))
  out, ent = [], []
  for level in range(num_levels):
    lp, code, nxt, is_child = children_logprobs(logits[:, :, level], trie, node, level, temperature)
    hit = (code == safe[:, :, level:level + 1]) & is_child
    out.append(jnp.max(jnp.where(hit, lp, NEG_INF), axis=-1))
    ent.append(_entropy(lp))
    node = jnp.max(jnp.where(hit, nxt, 0), axis=-1)
  logp = jnp.stack(out, axis=-1)
  return (logp, jnp.stack(ent, axis=-1)) if return_entropy else logp


def sample(model, params, batch: Mapping[str, jax.Array], trie: PrefixTrie, *, group_size: int, rng: jax.Array,
           temperature: float = 1.0) -> Rollout:
  """G independent samples per prompt from the constrained policy (with replacement: a group
  may hold an item twice), inside the caller's jit. The encoder runs once per prompt."""
  b = batch["scenario"].shape[0]
  context = model.encode(params, batch)
  node = jnp.broadcast_to(_roots(batch, b)[:, None], (b, group_size))
  prev, cache, codes, logps = jnp.zeros((b, 1), jnp.int32), None, [], []
  for level in range(trie.num_levels):
    logits, cache = model.network.apply({"params": params}, level, prev, cache, context,
                                        method=EncoderDecoder.decode_step)
    if level == 0:  # one prefix per prompt so far: every candidate starts from it
      logits = jnp.broadcast_to(logits, (b, group_size, logits.shape[-1]))
      cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (b, group_size) + x.shape[2:]), cache)
    lp, code, nxt, _ = children_logprobs(logits, trie, node, level, temperature)
    pick = jax.random.categorical(jax.random.fold_in(rng, level), lp, axis=-1)[..., None]
    logps.append(jnp.take_along_axis(lp, pick, axis=-1)[..., 0])
    prev = jnp.take_along_axis(code, pick, axis=-1)[..., 0]
    node = jnp.take_along_axis(nxt, pick, axis=-1)[..., 0]
    codes.append(prev)
  items = trie.leaf_item[node]
  return Rollout(codes=jnp.stack(codes, -1), items=items, logp=jnp.stack(logps, -1), valid=items >= 0)


def beam(model, params, batch: Mapping[str, jax.Array], trie: PrefixTrie, *, group_size: int,
         temperature: float = 1.0) -> Rollout:
  """The G best distinct valid paths per prompt under the constrained policy, with their
  teacher-forced per-token log-probs (`policy_logprobs`). Fewer items than G in a pool leave
  empty beams (valid False)."""
  b = batch["scenario"].shape[0]
  context = model.encode(params, batch)

  def step_fn(level, prev_codes, cache):
    logits, cache = model.network.apply({"params": params}, level, prev_codes, cache, context,
                                        method=EncoderDecoder.decode_step)
    return logits / temperature, cache

  out = decoding.beam_search(step_fn, None, trie, batch_size=b, beam_size=group_size, normalize="valid",
                             root=batch.get("pool_root"))
  valid = out.items >= 0
  logp = policy_logprobs(model, params, batch, out.codes, trie, temperature=temperature)
  return Rollout(codes=out.codes, items=out.items, logp=jnp.where(valid[..., None], logp, 0.0), valid=valid)


def rollout(method: str, model, params, batch: Mapping[str, Any], trie: PrefixTrie, *, group_size: int,
            rng: jax.Array, temperature: float = 1.0) -> Rollout:
  """``method``: ``"sample"`` or ``"beam"``."""
  if method == "sample":
    return sample(model, params, batch, trie, group_size=group_size, rng=rng, temperature=temperature)
  if method == "beam":
    return beam(model, params, batch, trie, group_size=group_size, temperature=temperature)
  raise ValueError(f"unknown rollout method {method!r}; expected 'sample' or 'beam'")
