"""Policy losses for post-training, registered by name (PAPER.md section 7).

    sa_gcpo  soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau (tau_pos / tau_neg by the sign of
             the advantage) and the group clip Gamma(A_i) = 0 if A_i > 0 and R_i < R*
             (optionally balanced: `group_clip`'s ``balance``)
    sapo     the same soft gate, no group clip (Qwen's SAPO)
    gspo     sequence-level ratio (geometric mean of the token ratios), hard clip
    grpo     token-level ratio, hard clip 1 +/- eps, optional KL (k3) to a frozen reference
    sdpo     softmax DPO (Chen et al., 2024, "On Softmax Direct Preference Optimization for
             Recommendation"): the real target is the preferred path and every other candidate
             of the group a rejected one, against the frozen starting policy as the reference

Every loss is vectorised over ``[B, G, T]`` (B prompts, G candidates per prompt, T tokens of a
candidate's SID path) and, like the pre-training losses (oxyjax/losses.py), returns a *sum* and
its *denominator*: ``J = (1/#sequences) sum_i (1/|y_i|) sum_t obj_{i,t}``, with the sum over
sequences taken here and the division done by the step after summing over microbatches and data
shards, so the loss and its gradient do not change with gradient accumulation or sharding.
Diagnostics are returned the same way: ``(sum, denominator)`` pairs, see `PolicyLossOutput`.

`group_advantages` normalises rewards within each group (the choice is documented there);
`group_clip` is SA-GCPO's Gamma. A new loss registers with ``@register("name")`` and is picked
in gin by ``PolicyLossConfig.name`` (the registries of tunix and verl do the same).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Which policy loss and its settings.

  name: a registered loss (`names()`): sa_gcpo | sapo | gspo | grpo.
  clip_eps / clip_eps_high: GRPO's hard clip ``[1 - clip_eps, 1 + clip_eps_high]`` of the token
    ratio (clip_eps_high None = clip_eps).
  gspo_eps_low / gspo_eps_high: GSPO's clip of the sequence ratio (the GSPO paper's 3e-4 / 4e-4:
    a sequence ratio is a geometric mean of token ratios, so it moves far less than they do).
  tau_pos / tau_neg: the soft gate's temperature for positive / negative advantages (SAPO's
    public defaults 1.0 / 1.05; PAPER.md leaves their values and order open).
  kl_beta: weight of the KL(pi_theta || pi_ref) penalty (k3 estimator), GRPO only; needs
    reference log-probs.
  dpo_beta: S-DPO's beta, the scale of the implicit reward ``beta log(pi_theta / pi_ref)``.
  dpo_nll_weight: S-DPO only, a weight on the real target's negative log-likelihood (mean over its
    tokens) added to each row's loss, as RPO (Pang et al., 2024) adds to DPO: DPO alone can widen
    the margins by lowering the rejected paths while the preferred one falls too.
  group_clip_balance: SA-GCPO only. False (the paper's Gamma): the clipped positive advantages are
    zeroed and nothing else changes, so a group that had any clipped is left with advantages
    that sum to less than zero. True: in such a group the negative advantages are scaled by the
    same factor so that the group's advantages sum to zero again (`group_clip`).
  """

  name: str = "sa_gcpo"
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  gspo_eps_low: float = 3e-4
  gspo_eps_high: float = 4e-4
  tau_pos: float = 1.0
  tau_neg: float = 1.05
  kl_beta: float = 0.0
  dpo_beta: float = 1.0
  dpo_nll_weight: float = 0.0
  group_clip_balance: bool = False


# Losses that also score the real target's path (teacher-forced, `PolicyLossInputs.target_logp`)
# and compare with the frozen reference policy.
NEEDS_TARGET = frozenset({"sdpo"})


def needs_reference(cfg: PolicyLossConfig) -> bool:
  """Whether the loss needs the frozen reference policy's log-probs."""
  return bool(cfg.kl_beta) or cfg.name in NEEDS_TARGET


class PolicyLossInputs(NamedTuple):
  """One batch of groups. Shapes: B prompts, G candidates, T tokens.

  logp: ``[B, G, T]`` log-probs of the sampled tokens under the policy being trained.
  logp_old: ``[B, G, T]`` the same under the policy that sampled them (no gradient).
  token_mask: ``[B, G, T]`` 1 for a real token, 0 for padding.
  seq_weight: ``[B, G]`` 1 for a real candidate, 0 for padding (an empty beam, a padding prompt).
  advantages: ``[B, G]`` (from `group_advantages`).
  rewards: ``[B, G]`` and r_star ``[B]``: each candidate's reward and that of the real target
    under the same mapping (SA-GCPO's group clip).
  logp_ref: ``[B, G, T]`` a frozen reference policy's log-probs, or None (GRPO's KL).
  target_logp / target_logp_ref: ``[B, T]`` the real target's path under the policy being trained
    and under the reference; is_target ``[B, G]`` which candidates are the target (S-DPO).
  """

  logp: jax.Array
  logp_old: jax.Array
  token_mask: jax.Array
  seq_weight: jax.Array
  advantages: jax.Array
  rewards: jax.Array
  r_star: jax.Array
  logp_ref: jax.Array | None = None
  target_logp: jax.Array | None = None
  target_logp_ref: jax.Array | None = None
  is_target: jax.Array | None = None


class PolicyLossOutput(NamedTuple):
  """``loss = loss_sum / denominator`` once summed over microbatches and shards.

  stats: diagnostic ``name -> (sum, denominator)``; the reported value is ``sum / denominator``
  after the same summation (so it, too, is independent of the batching).
  """

  loss_sum: jax.Array
  denominator: jax.Array
  stats: dict[str, tuple[jax.Array, jax.Array]]


LossFn = Callable[[PolicyLossInputs, PolicyLossConfig], PolicyLossOutput]
_REGISTRY: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
  def deco(fn: LossFn) -> LossFn:
    if name in _REGISTRY:
      raise ValueError(f"policy loss {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn

  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> LossFn:
  if name not in _REGISTRY:
    raise ValueError(f"unknown policy loss {name!r}; registered: {', '.join(names())}")
  return _REGISTRY[name]


def compute(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> PolicyLossOutput:
  """The configured loss (``cfg.name``) on one batch of groups."""
  return get(cfg.name)(inputs, cfg)


# ---------------------------------------------------------------------- advantages


ADVANTAGE_SCALES = ("std", "none")


def group_advantages(rewards: jax.Array, weights: jax.Array, *, ddof: int = 1, eps: float = 1e-6,
                     scale: str = "std") -> tuple[jax.Array, jax.Array]:
  """``A_i = (R_i - mean_g R) / (std_g R + eps)`` over each group's real candidates
  (``scale='std'``, the default), or ``A_i = R_i - mean_g R`` (``scale='none'``, Dr. GRPO: Liu
  et al., 2025).

  Why the choice matters: dividing by the group's std makes every group's advantages unit-scale
  whatever its reward spread, so a component that alone separates the candidates of most groups
  (a learned ranker's score, in groups without the target) steers those groups fully, whatever
  its weight. Without the division, a group's pull is proportional to its reward spread, and a
  component's weight sets its share of the gradient.

  The documented choice (docs/rl.md): the standard deviation is the sample one (``ddof=1``, as
  torch.std in TRL / verl's GRPO), taken over the candidates with weight > 0 only; ``eps`` keeps
  a group of (near-)equal rewards finite, and a group whose real rewards are all equal (or that
  has fewer than ``ddof + 1`` real candidates) gets advantage 0 everywhere: it carries no
  ranking signal, so it adds nothing to the gradient (it still counts in the denominator).
  Padding candidates get 0.

  Args:
    rewards: ``[B, G]``. weights: ``[B, G]`` 1 for real candidates, 0 for padding.

  Returns:
    (advantages ``[B, G]``, flat ``[B]`` bool: the groups with no spread).
  """
  w = (weights > 0).astype(jnp.float32)
  r = rewards.astype(jnp.float32)
  n = jnp.sum(w, axis=-1, keepdims=True)
  mean = jnp.sum(r * w, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  dev = (r - mean) * w
  var = jnp.sum(dev * dev, axis=-1, keepdims=True) / jnp.maximum(n - ddof, 1.0)
  std = jnp.sqrt(var)
  r_max = jnp.max(jnp.where(w > 0, r, -jnp.inf), axis=-1, keepdims=True)
  r_min = jnp.min(jnp.where(w > 0, r, jnp.inf), axis=-1, keepdims=True)
  flat = (r_max <= r_min) | (n <= ddof)
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"advantage scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
  adv = jnp.where(flat, 0.0, dev / (std + eps) if scale == "std" else dev)
  return adv * w, flat[:, 0]


def group_clip(advantages: jax.Array, rewards: jax.Array, r_star: jax.Array, *,
               balance: bool = False) -> tuple[jax.Array, jax.Array]:
  """SA-GCPO's Gamma: a positive advantage is zeroed when the candidate's reward is below the real
  target's (``A_i > 0 and R_i < R*``): "best of a bad group" gets no push. Returns (Gamma(A), the
  clipped entries as a bool ``[B, G]``).

  The paper's Gamma leaves a group that had a clipped entry with advantages summing to less than
  zero (they summed to zero before, `group_advantages`), so that group's update lowers the
  probability of its candidates as a whole and moves mass to the rest of the catalogue; under a
  dense reward, where many groups have clipped entries, the policy's entropy rises (docs/rl.md,
  sessions 38 and 40). ``balance=True`` scales such a group's negative advantages by
  ``sum(remaining positive) / sum(|negative|)``: the group sums to zero again, the ranking inside
  it is kept, and a group whose positives were all clipped makes no update. Groups with nothing
  clipped are unchanged.
  """
  clipped = (advantages > 0) & (rewards < r_star[:, None])
  out = jnp.where(clipped, 0.0, advantages)
  if balance:
    pos = jnp.sum(jnp.maximum(out, 0.0), axis=-1, keepdims=True)
    neg = jnp.sum(jnp.maximum(-out, 0.0), axis=-1, keepdims=True)
    scale = jnp.where(jnp.any(clipped, axis=-1, keepdims=True), pos / jnp.maximum(neg, 1e-30), 1.0)
    out = jnp.where(out < 0, out * jnp.minimum(scale, 1.0), out)
  return out, clipped


# ---------------------------------------------------------------------- helpers


def _ratio(inp: PolicyLossInputs) -> jax.Array:
  # log-ratio on real tokens only: padding has logp = logp_old = anything (maybe -inf).
  m = inp.token_mask > 0
  return jnp.exp(jnp.where(m, inp.logp - jax.lax.stop_gradient(inp.logp_old), 0.0))


def _per_sequence(token_obj: jax.Array, inp: PolicyLossInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss_sum, denominator, token weights) for ``J = (1/#seq) sum_i (1/|y_i|) sum_t obj``."""
  m = inp.token_mask.astype(jnp.float32) * (inp.seq_weight > 0)[..., None]
  length = jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  per_seq = jnp.sum(jnp.where(m > 0, token_obj, 0.0), axis=-1) / length
  w = inp.seq_weight.astype(jnp.float32)
  return -jnp.sum(per_seq * w), jnp.sum(w), m


def _token_stats(ratio: jax.Array, m: jax.Array, **fractions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
  n = jnp.sum(m)
  out = {"ratio_mean": (jnp.sum(ratio * m), n),
         "ratio_abs_dev": (jnp.sum(jnp.abs(ratio - 1.0) * m), n)}
  for k, v in fractions.items():
    out[k] = (jnp.sum(v.astype(jnp.float32) * m), n)
  return out


def soft_gate(ratio: jax.Array, tau: jax.Array) -> jax.Array:
  """SAPO / SA-GCPO's ``f(r) = sigmoid(tau (r - 1)) * 4 / tau``: df/dr = 4 p (1 - p), 1 at r = 1."""
  return jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau


def _gated(inp: PolicyLossInputs, cfg: PolicyLossConfig, advantages: jax.Array):
  ratio = _ratio(inp)
  a = advantages[..., None].astype(jnp.float32)
  tau = jnp.where(a > 0, cfg.tau_pos, cfg.tau_neg)
  obj = soft_gate(ratio, tau) * a
  loss_sum, denom, m = _per_sequence(obj, inp)
  p = jax.nn.sigmoid(tau * (ratio - 1.0))
  stats = _token_stats(ratio, m, gate_saturated=(4.0 * p * (1.0 - p)) < 0.5)
  stats["gate_weight"] = (jnp.sum(4.0 * p * (1.0 - p) * m), jnp.sum(m))
  return loss_sum, denom, stats


# ---------------------------------------------------------------------- the losses


@register("sa_gcpo")
def sa_gcpo(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> PolicyLossOutput:
  """J = E[(1/G) sum_i (1/|y_i|) sum_t f(r_it) Gamma(A_i)] (PAPER.md section 7)."""
  adv, clipped = group_clip(inp.advantages, inp.rewards, inp.r_star, balance=cfg.group_clip_balance)
  loss_sum, denom, stats = _gated(inp, cfg, adv)
  w = (inp.seq_weight > 0).astype(jnp.float32)
  stats["group_clip_fraction"] = (jnp.sum(clipped * w), jnp.sum(w))
  # The share of the negative advantages' mass the update keeps (1 without balancing).
  stats["negative_advantage_kept"] = (jnp.sum(jnp.maximum(-adv, 0.0) * w),
                                      jnp.sum(jnp.maximum(-inp.advantages, 0.0) * w))
  return PolicyLossOutput(loss_sum, denom, stats)


@register("sapo")
def sapo(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> PolicyLossOutput:
  """The soft gate with the raw advantages (no group clip)."""
  loss_sum, denom, stats = _gated(inp, cfg, inp.advantages)
  return PolicyLossOutput(loss_sum, denom, stats)


@register("gspo")
def gspo(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> PolicyLossOutput:
  """Sequence ratio s_i = exp(mean_t (logp - logp_old)); obj = min(s A, clip(s) A) per sequence."""
  m = inp.token_mask.astype(jnp.float32) * (inp.seq_weight > 0)[..., None]
  length = jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  log_s = jnp.sum(jnp.where(m > 0, inp.logp - jax.lax.stop_gradient(inp.logp_old), 0.0), axis=-1) / length
  s = jnp.exp(log_s)
  a = inp.advantages.astype(jnp.float32)
  s_clip = jnp.clip(s, 1.0 - cfg.gspo_eps_low, 1.0 + cfg.gspo_eps_high)
  obj = jnp.minimum(s * a, s_clip * a)
  w = inp.seq_weight.astype(jnp.float32)
  clipped = (s * a > s_clip * a)
  stats = {"ratio_mean": (jnp.sum(s * w), jnp.sum(w)), "ratio_abs_dev": (jnp.sum(jnp.abs(s - 1.0) * w), jnp.sum(w)),
           "clip_fraction": (jnp.sum(clipped * w), jnp.sum(w))}
  return PolicyLossOutput(-jnp.sum(obj * w), jnp.sum(w), stats)


@register("grpo")
def grpo(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> PolicyLossOutput:
  """Token ratio with PPO's hard clip, minus kl_beta * k3(pi_theta || pi_ref) per token."""
  ratio = _ratio(inp)
  a = inp.advantages[..., None].astype(jnp.float32)
  high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
  r_clip = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + high)
  obj = jnp.minimum(ratio * a, r_clip * a)
  kl = None
  if cfg.kl_beta:
    if inp.logp_ref is None:
      raise ValueError("grpo with kl_beta > 0 needs reference log-probs (PolicyLossInputs.logp_ref)")
    m0 = inp.token_mask > 0
    d = jnp.where(m0, jax.lax.stop_gradient(inp.logp_ref) - inp.logp, 0.0)
    kl = jnp.exp(d) - d - 1.0  # k3: unbiased, non-negative estimate of KL(pi_theta || pi_ref)
    obj = obj - cfg.kl_beta * kl
  loss_sum, denom, m = _per_sequence(obj, inp)
  stats = _token_stats(ratio, m, clip_fraction=ratio * a > r_clip * a)
  if kl is not None:
    stats["kl_ref"] = (jnp.sum(kl * m), jnp.sum(m))
  return PolicyLossOutput(loss_sum, denom, stats)


@register("sdpo")
def sdpo(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> PolicyLossOutput:
  """Softmax DPO over each group: with the implicit reward ``h(y) = beta log(pi_theta(y) / pi_ref(y))``
  of a whole path (its token log-probs summed), a row's loss is

      -log sigmoid(-log sum_{i rejected} exp(h(y_i) - h(y+)))  =  softplus(logsumexp_i (h(y_i) - h(y+)))
      (+ dpo_nll_weight * the target's mean token negative log-likelihood)

  with y+ the real target and the rejected y_i the row's other real candidates (the target itself,
  where the rollout found it, is not a rejected one). Every prompt with at least one rejected
  candidate carries signal, whether or not the rollout found the target: the group policy losses
  learn only from the groups whose rewards differ. The rewards and advantages are not used. Averaged
  over those prompts (sum and denominator, as the other losses)."""
  for name in ("logp_ref", "target_logp", "target_logp_ref", "is_target"):
    if getattr(inp, name) is None:
      raise ValueError(f"sdpo needs PolicyLossInputs.{name}")
  m = inp.token_mask > 0
  seq = lambda lp, mask: jnp.sum(jnp.where(mask, lp, 0.0), axis=-1)
  h = cfg.dpo_beta * (seq(inp.logp, m) - jax.lax.stop_gradient(seq(inp.logp_ref, m)))  # [B, G]
  # A target outside the row's pool (no valid path: -inf under the reference) cannot be preferred.
  ok = jnp.isfinite(jnp.sum(inp.target_logp_ref, axis=-1))
  tmask = jnp.broadcast_to(ok[:, None], inp.target_logp.shape)
  h_pos = cfg.dpo_beta * (seq(inp.target_logp, tmask) - jax.lax.stop_gradient(seq(inp.target_logp_ref, tmask)))  # [B]
  rejected = (inp.seq_weight > 0) & ~jnp.asarray(inp.is_target, bool) & ok[:, None]
  rows = jnp.any(rejected, axis=-1).astype(jnp.float32)
  z = jax.nn.logsumexp(jnp.where(rejected, h - h_pos[:, None], -jnp.inf), axis=-1)
  z = jnp.where(rows > 0, z, 0.0)
  loss = jax.nn.softplus(z)
  if cfg.dpo_nll_weight:
    loss = loss - cfg.dpo_nll_weight * seq(inp.target_logp, tmask) / inp.target_logp.shape[-1]
  n_rej = jnp.sum(rejected)  # a raw count: the step divides after summing microbatches and shards
  stats = {"dpo/margin": (jnp.sum(jnp.where(rejected, h_pos[:, None] - h, 0.0)), n_rej),
           "dpo/preferred": (jnp.sum(jnp.where(rejected, h < h_pos[:, None], False)), n_rej),
           "dpo/target_logratio": (jnp.sum(h_pos * rows) / cfg.dpo_beta, jnp.sum(rows))}
  return PolicyLossOutput(jnp.sum(loss * rows), jnp.sum(rows), stats)
