"""Rollouts from the constrained policy: always valid items of the row's pool, distinct for beam
search, sampled from exactly the distribution that the loss scores, the encoder run once per
prompt."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.models.encoder_decoder import EncoderDecoder
from oxyjax.rl import rollout


def _run(tiny, method, batch, g, seed=0, temperature=1.0):
  fn = jax.jit(lambda p, b, t, r: rollout.rollout(method, tiny.model, p, b, t, group_size=g, rng=r,
                                                  temperature=temperature))
  return jax.tree.map(np.asarray, fn(tiny.params, batch, tiny.forest, jax.random.key(seed)))


@pytest.mark.parametrize("method", ["sample", "beam"])
def test_rollouts_are_valid_items_of_each_rows_pool(tiny, method):
  batch, pools = tiny.batch(6)
  g = 16
  ro = _run(tiny, method, batch, g)
  assert ro.codes.shape == (6, g, 3) and ro.items.shape == (6, g) and ro.logp.shape == (6, g, 3)
  for b, p in enumerate(pools):
    live = ro.valid[b]
    assert live.all() if method == "sample" else live.sum() == min(g, len(tiny.members[p]))
    assert set(ro.items[b][live].tolist()) <= set(tiny.members[p].tolist())
    np.testing.assert_array_equal(ro.codes[b][live], tiny.sid_codes[ro.items[b][live]])
    assert np.all(np.isfinite(ro.logp[b][live])) and np.all(ro.logp[b][live] <= 0)
  if method == "beam":  # distinct, best first
    for b in range(6):
      live = ro.items[b][ro.valid[b]]
      assert len(set(live.tolist())) == live.size
      seq = ro.logp[b].sum(-1)[ro.valid[b]]
      assert np.all(np.diff(seq) <= 1e-5)


def test_beam_rollout_is_the_valid_normalised_beam_search(tiny):
  batch, _ = tiny.batch(4, seed=1)
  ro = _run(tiny, "beam", batch, 8)
  pred = jax.jit(lambda p, b, t: tiny.model.predict(p, b, t, beam_size=8, normalize="valid"))(
      tiny.params, batch, tiny.forest)
  np.testing.assert_array_equal(ro.items, np.asarray(pred.items))
  # Its per-token log-probs are the teacher-forced ones; their sum is the search's score up to
  # float32 rounding of a 3-term sum of log-softmaxes over <= 5 children (~10 eps of |score|).
  np.testing.assert_allclose(ro.logp.sum(-1), np.asarray(pred.scores), rtol=1e-5, atol=1e-5)


def test_sampled_logprobs_are_the_teacher_forced_policy(tiny):
  """The per-token log-probs recorded while sampling (incremental decoding with a cache) equal
  the teacher-forced ones of `policy_logprobs` (one pass over the whole path): the same
  distribution, computed two ways. Float32 rounding of the two attention orders: the logits are
  sums of ~emb_dim x layers terms of size ~|logit|, so ~1e-5 relative; we allow 1e-4."""
  batch, _ = tiny.batch(6, seed=2)
  for temperature in (1.0, 0.7):
    ro = _run(tiny, "sample", batch, 16, seed=3, temperature=temperature)
    tf = jax.jit(lambda p, b, c, t: rollout.policy_logprobs(tiny.model, p, b, c, t, temperature=temperature))(
        tiny.params, batch, ro.codes, tiny.forest)
    np.testing.assert_allclose(np.asarray(tf), ro.logp, rtol=1e-4, atol=1e-4)


def test_sampling_follows_the_policy_distribution(tiny):
  """Empirical item frequencies of many samples for one prompt against pi(item) = exp(sum of
  its token log-probs): every item's count within 5 binomial standard deviations (+1)."""
  batch, _ = tiny.batch(1, seed=4, pools=[1])
  g = 4096
  ro = _run(tiny, "sample", batch, g, seed=5)
  counts = collections.Counter(ro.items[0].tolist())
  pool = tiny.members[1]
  codes = jnp.asarray(tiny.sid_codes[pool][None])
  lp = jax.jit(lambda p, b, c, t: rollout.policy_logprobs(tiny.model, p, b, c, t))(tiny.params, batch, codes,
                                                                                  tiny.forest)
  prob = np.exp(np.asarray(lp).sum(-1))[0]
  np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-5)  # a distribution over the pool's items
  assert prob.max() > 3.0 / len(pool)  # far from uniform: the test can tell distributions apart
  for item, p in zip(pool, prob):
    sd = np.sqrt(g * p * (1 - p))
    assert abs(counts.get(int(item), 0) - g * p) <= 5 * sd + 1, (item, counts.get(int(item), 0), g * p)


@pytest.mark.parametrize("method", ["sample", "beam"])
def test_encoder_runs_once_per_prompt(tiny, method, monkeypatch):
  seen = []
  original = EncoderDecoder.encode

  def spy(self, batch, deterministic=True):
    seen.append(batch["history_items"].shape)
    return original(self, batch, deterministic)

  monkeypatch.setattr(EncoderDecoder, "encode", spy)
  batch, _ = tiny.batch(3, seed=6)
  jax.jit(lambda p, b, t, r: rollout.rollout(method, tiny.model, p, b, t, group_size=8, rng=r)).lower(
      tiny.params, batch, tiny.forest, jax.random.key(0))
  # sample: one encoder pass; beam: one for the search and one for the teacher-forced scores.
  assert seen and all(s[0] == 3 for s in seen) and len(seen) == (1 if method == "sample" else 2)
