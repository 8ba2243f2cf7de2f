"""Policy losses against NumPy references; SA-GCPO's gradient at ratio 1; the group clip;
advantage normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.rl import losses

EPS32 = float(np.finfo(np.float32).eps)


def _inputs(seed=0, b=3, g=5, t=4, spread=0.3):
  rng = np.random.default_rng(seed)
  logp_old = np.log(rng.uniform(0.05, 0.9, (b, g, t)))
  logp = logp_old + rng.normal(0, spread, (b, g, t))  # ratios around 1, some far outside the clips
  mask = np.ones((b, g, t))
  seq_w = np.ones((b, g))
  seq_w[0, -1] = 0.0  # one padding candidate
  rewards = rng.normal(size=(b, g))
  adv = rng.normal(size=(b, g)) * seq_w
  r_star = rng.normal(size=(b,))
  ref = logp_old + rng.normal(0, 0.1, (b, g, t))
  # S-DPO: the real target's path; in row 1 it is also candidate 2; in row 2 it has no valid path
  target_ref = np.log(rng.uniform(0.05, 0.9, (b, t)))
  target = target_ref + rng.normal(0, spread, (b, t))
  is_target = np.zeros((b, g), bool)
  is_target[1, 2] = True
  if b > 2:
    target_ref[2, -1] = target[2, -1] = -np.inf
  return dict(logp=logp, logp_old=logp_old, token_mask=mask, seq_weight=seq_w, advantages=adv, rewards=rewards,
              r_star=r_star, logp_ref=ref, target_logp=target, target_logp_ref=target_ref, is_target=is_target)


def _jax_inputs(d):
  return losses.PolicyLossInputs(**{k: jnp.asarray(v, bool if k == "is_target" else jnp.float32) for k, v in d.items()})


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_gated(d, cfg, adv):
  r = np.exp(d["logp"] - d["logp_old"])
  a = adv[..., None]
  tau = np.where(a > 0, cfg.tau_pos, cfg.tau_neg)
  obj = _sigmoid(tau * (r - 1)) * 4 / tau * a
  per_seq = obj.mean(-1)
  return -(per_seq * d["seq_weight"]).sum(), d["seq_weight"].sum()


def np_group_clip(adv, rewards, r_star, balance=False):
  clipped = (adv > 0) & (rewards < r_star[:, None])
  out = np.where(clipped, 0.0, adv)
  if balance:
    for b in range(out.shape[0]):
      if clipped[b].any():
        pos, neg = out[b][out[b] > 0].sum(), -out[b][out[b] < 0].sum()
        scale = min(pos / neg, 1.0) if neg > 0 else 1.0
        out[b] = np.where(out[b] < 0, out[b] * scale, out[b])
  return out


def np_sa_gcpo(d, cfg):
  adv = np_group_clip(d["advantages"], d["rewards"], d["r_star"], cfg.group_clip_balance)
  return _np_gated(d, cfg, adv)


def np_sapo(d, cfg):
  return _np_gated(d, cfg, d["advantages"])


def np_gspo(d, cfg):
  s = np.exp((d["logp"] - d["logp_old"]).mean(-1))
  a = d["advantages"]
  obj = np.minimum(s * a, np.clip(s, 1 - cfg.gspo_eps_low, 1 + cfg.gspo_eps_high) * a)
  return -(obj * d["seq_weight"]).sum(), d["seq_weight"].sum()


def np_grpo(d, cfg):
  r = np.exp(d["logp"] - d["logp_old"])
  a = d["advantages"][..., None]
  obj = np.minimum(r * a, np.clip(r, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
  if cfg.kl_beta:
    x = d["logp_ref"] - d["logp"]
    obj = obj - cfg.kl_beta * (np.exp(x) - x - 1)
  return -(obj.mean(-1) * d["seq_weight"]).sum(), d["seq_weight"].sum()


def np_sdpo(d, cfg):
  h = cfg.dpo_beta * (d["logp"].sum(-1) - d["logp_ref"].sum(-1))
  loss, rows = 0.0, 0
  for b in range(h.shape[0]):
    if not np.isfinite(d["target_logp_ref"][b].sum()):
      continue  # the target has no valid path: the row is skipped
    h_pos = cfg.dpo_beta * (d["target_logp"][b].sum() - d["target_logp_ref"][b].sum())
    rejected = (d["seq_weight"][b] > 0) & ~d["is_target"][b]
    if rejected.any():
      x = h[b][rejected] - h_pos
      loss += np.log1p(np.sum(np.exp(x)))  # -log sigmoid(-log sum exp x)
      loss -= cfg.dpo_nll_weight * d["target_logp"][b].mean()
      rows += 1
  return loss, rows


REFERENCES = {"sa_gcpo": np_sa_gcpo, "sapo": np_sapo, "gspo": np_gspo, "grpo": np_grpo, "sdpo": np_sdpo}


def test_every_registered_loss_has_a_reference():
  assert losses.names() == sorted(REFERENCES)
  with pytest.raises(ValueError, match="unknown policy loss 'ppo'.*grpo"):
    losses.get("ppo")


@pytest.mark.parametrize("name,extra", [("sa_gcpo", {}), ("sapo", {}), ("gspo", {}), ("grpo", {}),
                                        ("grpo", {"kl_beta": 0.05}), ("sa_gcpo", {"tau_pos": 2.0, "tau_neg": 0.5}),
                                        ("sa_gcpo", {"group_clip_balance": True}),
                                        ("sdpo", {}), ("sdpo", {"dpo_beta": 0.3, "dpo_nll_weight": 0.5})])
def test_loss_matches_numpy_reference(name, extra):
  """Float32 against float64 on the same inputs: a few dozen float32 operations per term and a
  sum of ~60 terms, so a relative gap of 1e-5 is far outside rounding (~100 eps)."""
  cfg = losses.PolicyLossConfig(name=name, **extra)
  for seed in range(3):
    d = _inputs(seed, spread=0.3 if name != "gspo" else 1e-3)  # GSPO's clip is +-4e-4 wide
    out = losses.compute(_jax_inputs(d), cfg)
    ref_sum, ref_den = REFERENCES[name](d, cfg)
    np.testing.assert_allclose(float(out.denominator), ref_den, rtol=0)
    np.testing.assert_allclose(float(out.loss_sum), ref_sum, rtol=1e-5, atol=1e-6)


def test_clips_are_active_in_the_reference_inputs():
  """The inputs above exercise the clips (else the references would not test them)."""
  d = _inputs(0)
  cfg = losses.PolicyLossConfig(name="grpo")
  out = losses.compute(_jax_inputs(d), cfg)
  frac = float(out.stats["clip_fraction"][0] / out.stats["clip_fraction"][1])
  assert 0.05 < frac < 0.95
  d = _inputs(0, spread=1e-3)
  out = losses.compute(_jax_inputs(d), losses.PolicyLossConfig(name="gspo"))
  frac = float(out.stats["clip_fraction"][0] / out.stats["clip_fraction"][1])
  assert 0.05 < frac < 0.95


@pytest.mark.parametrize("name,balance", [("sa_gcpo", False), ("sa_gcpo", True), ("sapo", False)])
def test_gradient_at_ratio_one_is_the_advantage_weighted_logprob_gradient(name, balance):
  """At r = 1 the gate's slope is 4 p (1 - p) = 1, so d J / d logp_it = Gamma(A_i) / |y_i| per real
  sequence (J as a sum; the loss is -J)."""
  d = _inputs(1)
  d["logp"] = d["logp_old"].copy()
  inp = _jax_inputs(d)
  cfg = losses.PolicyLossConfig(name=name, tau_pos=1.3, tau_neg=0.7, group_clip_balance=balance)

  def f(logp):
    return losses.compute(inp._replace(logp=logp), cfg).loss_sum

  grad = np.asarray(jax.grad(f)(inp.logp))
  adv = d["advantages"]
  if name == "sa_gcpo":
    adv = np_group_clip(adv, d["rewards"], d["r_star"], balance)
  expect = -(adv * d["seq_weight"])[..., None] / d["logp"].shape[-1] * np.ones_like(d["logp"])
  np.testing.assert_allclose(grad, expect, rtol=4 * EPS32, atol=4 * EPS32)


def test_group_clip_zeroes_exactly_the_positive_advantages_below_the_target():
  adv = jnp.asarray([[1.0, -1.0, 0.5, 2.0], [0.3, 0.0, -0.2, 1.0]])
  rew = jnp.asarray([[0.2, 0.1, 0.9, 1.5], [3.0, 1.0, 0.0, 0.5]])
  r_star = jnp.asarray([1.0, 0.5])
  out, clipped = losses.group_clip(adv, rew, r_star)
  expect_clipped = np.asarray([[True, False, True, False], [False, False, False, False]])
  np.testing.assert_array_equal(np.asarray(clipped), expect_clipped)
  np.testing.assert_array_equal(np.asarray(out), np.where(expect_clipped, 0.0, np.asarray(adv)))
  # ... and SA-GCPO's loss equals SAPO's on the clipped advantages.
  d = _inputs(2, b=2, g=4)
  d.update(advantages=np.asarray(adv), rewards=np.asarray(rew), r_star=np.asarray(r_star))
  sa = losses.compute(_jax_inputs(d), losses.PolicyLossConfig(name="sa_gcpo"))
  d["advantages"] = np.asarray(out)
  so = losses.compute(_jax_inputs(d), losses.PolicyLossConfig(name="sapo"))
  assert float(sa.loss_sum) == float(so.loss_sum)
  assert float(sa.stats["group_clip_fraction"][0]) == 2.0


def test_balanced_group_clip_restores_each_clipped_group_to_zero_sum():
  """Zero-sum advantages (as `group_advantages` makes them): after the paper's clip a group with a
  clipped entry sums below zero; balancing scales its negatives so it sums to zero, keeps the
  order of the surviving advantages, zeroes a group whose positives were all clipped, and leaves
  a group with nothing clipped exactly as it was."""
  rew = jnp.asarray([[0.2, 0.1, 0.9, 1.5, -1.0], [3.0, 1.0, 0.0, 0.5, 0.4], [0.9, 0.1, 0.2, 0.3, 0.5]])
  w = jnp.ones_like(rew)
  adv, _ = losses.group_advantages(rew, w)
  r_star = jnp.asarray([1.0, -5.0, 2.0])  # row 0: some positives clipped; row 1: none; row 2: all
  plain, clipped = losses.group_clip(adv, rew, r_star)
  bal, clipped_b = losses.group_clip(adv, rew, r_star, balance=True)
  np.testing.assert_array_equal(np.asarray(clipped), np.asarray(clipped_b))
  assert np.asarray(clipped).sum(axis=1).tolist() == [1, 0, 2]
  sums_plain, sums_bal = np.asarray(plain).sum(1), np.asarray(bal).sum(1)
  assert sums_plain[0] < -0.1 and sums_plain[2] < -0.1
  # Each row sums to zero up to the rounding of five float32 terms of order 1.
  np.testing.assert_allclose(sums_bal, 0.0, atol=8 * EPS32)
  np.testing.assert_array_equal(np.asarray(bal)[1], np.asarray(adv)[1])
  np.testing.assert_array_equal(np.asarray(bal)[2], 0.0)
  b0, p0 = np.asarray(bal)[0], np.asarray(plain)[0]
  np.testing.assert_array_equal(b0[p0 >= 0], p0[p0 >= 0])  # positives (and zeros) untouched
  np.testing.assert_array_equal(np.argsort(b0[p0 < 0]), np.argsort(p0[p0 < 0]))
  np.testing.assert_allclose(b0, np_group_clip(np.asarray(adv, np.float64), np.asarray(rew), np.asarray(r_star),
                                               True)[0], rtol=4 * EPS32, atol=4 * EPS32)
  d = _inputs(2, b=3, g=5)
  d.update(advantages=np.asarray(adv), rewards=np.asarray(rew), r_star=np.asarray(r_star), seq_weight=np.ones((3, 5)))
  out = losses.compute(_jax_inputs(d), losses.PolicyLossConfig(name="sa_gcpo", group_clip_balance=True))
  kept = float(out.stats["negative_advantage_kept"][0] / out.stats["negative_advantage_kept"][1])
  assert 0.0 < kept < 1.0


def test_group_advantages():
  rewards = jnp.asarray([[1.0, 2.0, 3.0, 10.0], [0.5, 0.5, 0.5, 0.5], [1.0, 3.0, 7.0, 0.0]])
  weights = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], jnp.float32)
  adv, flat = losses.group_advantages(rewards, weights, ddof=1, eps=1e-6)
  np.testing.assert_array_equal(np.asarray(flat), [False, True, False])
  r = np.asarray([1.0, 2.0, 3.0, 10.0])
  np.testing.assert_allclose(np.asarray(adv[0]), (r - r.mean()) / (r.std(ddof=1) + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(adv[1]), 0.0)  # no spread: no signal
  r = np.asarray([1.0, 3.0, 7.0])  # the padding candidate takes no part and gets 0
  np.testing.assert_allclose(np.asarray(adv[2, :3]), (r - r.mean()) / (r.std(ddof=1) + 1e-6), rtol=1e-6)
  assert float(adv[2, 3]) == 0.0
  adv0, _ = losses.group_advantages(rewards, weights, ddof=0)
  np.testing.assert_allclose(np.asarray(adv0[0]), (rewards[0] - 4.0) / (np.std(np.asarray(rewards[0])) + 1e-6),
                             rtol=1e-6)
  # scale='none' (Dr. GRPO): centred only, so a group's pull follows its reward spread; the same
  # flat groups and padding get 0.
  raw, flat_raw = losses.group_advantages(rewards, weights, scale="none")
  np.testing.assert_array_equal(np.asarray(flat_raw), np.asarray(flat))
  np.testing.assert_allclose(np.asarray(raw[0]), np.asarray(rewards[0]) - 4.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(raw[2, :3]), [-2.6666667, -0.6666667, 3.3333333], rtol=1e-6)
  assert float(raw[2, 3]) == 0.0 and np.all(np.asarray(raw[1]) == 0.0)
  small, _ = losses.group_advantages(0.1 * rewards, weights, scale="none")
  np.testing.assert_allclose(np.asarray(small), 0.1 * np.asarray(raw), rtol=1e-5, atol=1e-7)
  std_small, _ = losses.group_advantages(0.1 * rewards, weights)  # the std scale ignores a reward's scale
  np.testing.assert_allclose(np.asarray(std_small), np.asarray(adv), rtol=1e-4)
  with pytest.raises(ValueError, match="advantage scale"):
    losses.group_advantages(rewards, weights, scale="mad")


def test_loss_sums_are_additive_over_batch_splits():
  """Sum and denominator of two halves add up to those of the whole (what accumulation and
  sharding rely on), for every loss."""
  d = _inputs(3, b=4)
  for name in losses.names():
    cfg = losses.PolicyLossConfig(name=name, kl_beta=0.1 if name == "grpo" else 0.0)
    whole = losses.compute(_jax_inputs(d), cfg)
    halves = [losses.compute(_jax_inputs({k: v[s] for k, v in d.items()}), cfg)
              for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(float(halves[0].loss_sum + halves[1].loss_sum), float(whole.loss_sum), rtol=1e-6)
    assert float(halves[0].denominator + halves[1].denominator) == float(whole.denominator)


def test_sdpo_raises_the_target_against_the_group_from_the_reference():
  """At the reference (pi_theta = pi_ref, every h = 0) a row's loss is softplus(logsumexp_i (h_i -
  h_pos)), so with G' rejected candidates d loss / d h_pos = -G'/(G' + 1) and d loss / d h_i =
  1/(G' + 1), times beta for each token's log-prob, over the rows counted: the target's path is
  raised and every rejected one lowered. The candidate that is the target, padding, and a row
  whose target has no valid path get no gradient."""
  d = _inputs(0)
  d["logp_ref"], d["target_logp_ref"] = d["logp"].copy(), d["target_logp"].copy()
  beta = 0.5
  cfg = losses.PolicyLossConfig(name="sdpo", dpo_beta=beta)

  def loss(logp, target_logp):
    inp = _jax_inputs(d)._replace(logp=logp, target_logp=target_logp)
    out = losses.compute(inp, cfg)
    return out.loss_sum / out.denominator

  g_group, g_target = jax.grad(loss, argnums=(0, 1))(jnp.asarray(d["logp"], jnp.float32),
                                                     jnp.asarray(d["target_logp"], jnp.float32))
  g_group, g_target = np.asarray(g_group), np.asarray(g_target)
  rows = 2  # row 2's target has no valid path
  for b, n_rej in ((0, 4), (1, 4)):  # row 0: one padding candidate; row 1: candidate 2 is the target
    np.testing.assert_allclose(g_target[b], -beta * n_rej / (n_rej + 1) / rows, rtol=1e-5)
    rejected = (d["seq_weight"][b] > 0) & ~d["is_target"][b]
    np.testing.assert_allclose(g_group[b][rejected], beta / (n_rej + 1) / rows, rtol=1e-5)
    np.testing.assert_array_equal(g_group[b][~rejected], 0.0)
  np.testing.assert_array_equal(g_group[2], 0.0)
  np.testing.assert_array_equal(g_target[2], 0.0)
  with pytest.raises(ValueError, match="sdpo needs"):
    losses.compute(_jax_inputs(d)._replace(target_logp=None), cfg)
