"""The jitted, sharded train step: 8 fake CPU devices vs one device; gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

from oxyjax import partitioning
from oxyjax import train as train_lib
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.models.rec_model import RecModel

CFG = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                  dropout_rate=0.1, max_history=8)


def _model_and_batches(n_batches=3, batch_size=16):
  rng = np.random.default_rng(0)
  codes = np.concatenate([np.zeros((1, 3), np.int32), rng.integers(0, 8, (40, 3)).astype(np.int32)])
  model = RecModel(CFG, codes)
  batches = []
  for _ in range(n_batches):
    hist = rng.integers(0, 41, (batch_size, CFG.max_history)).astype(np.int32)
    ex = {"history": hist, "target": rng.integers(1, 41, batch_size), "scenario": np.zeros(batch_size)}
    batches.append(model.convert_features(ex))
  return model, batches


OPT = train_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
TOTAL_STEPS = 10  # the schedule's length: lr 0 at step 0, 1e-2 at step 1, then cosine decay
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


def _recording(tx):
  """`tx`, also keeping in its state the gradients that the train step handed it at its last
  step (summed over microbatches and divided by the token count), for the test to read."""

  def init(params):
    return {"tx": tx.init(params), "grads": jax.tree.map(jnp.zeros_like, params)}

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state["tx"], params)
    return updates, {"tx": inner, "grads": grads}

  return optax.GradientTransformation(init, update)


class _Trainer:
  """The jitted, sharded train step of `model` on `part` (AdamW per OPT), as train.py runs it."""

  def __init__(self, model, part, example_batch, grad_accum=1, record_grads=False):
    tx, _ = train_lib.make_optimizer(OPT, TOTAL_STEPS)
    tx = _recording(tx) if record_grads else tx
    self.part = part

    def init_state(rng):
      params = model.init(rng, model.dummy_batch(2))
      return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    with jax.set_mesh(part.mesh), part.rules_context():
      boxed = jax.eval_shape(init_state, jax.random.key(0))
      self.shardings = part.params_shardings(boxed)
      self._init = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=self.shardings)
      self._step = jax.jit(train_lib.make_train_step(model, tx, grad_accum),
                           in_shardings=(self.shardings,
                                         {k: part.data_sharding(v.ndim) for k, v in example_batch.items()},
                                         part.replicated()),
                           out_shardings=(self.shardings, part.replicated()))

  def init(self):
    with jax.set_mesh(self.part.mesh), self.part.rules_context():
      return self._init(jax.random.key(0))

  def step(self, state, batch):
    """One step from `state`, which may live on another mesh (it is copied onto this one)."""
    with jax.set_mesh(self.part.mesh), self.part.rules_context():
      state = jax.device_put(state, self.shardings)
      return self._step(state, self.part.shard_batch(batch), jax.random.key(1))


def _run(model, batches, part, grad_accum=1):
  trainer = _Trainer(model, part, batches[0], grad_accum)
  state, losses = trainer.init(), []
  for b in batches:
    state, m = trainer.step(state, b)
    losses.append(float(m["loss"]))
  return jax.device_get(state["params"]), losses, state


def _rounding_tol(cfg, rows: int) -> float:
  """How far apart, relatively, float32 rounding can put a loss or a gradient computed two ways
  (another mesh, another accumulation): both only reorder sums, and a sum of n float32 terms,
  in any order, is within n * eps of the exact sum relative to the sum of the terms'
  magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 3.1; the worst case, not
  the typical sqrt(n) * eps). n is the longest chain of sums behind one gradient element:
  forward and backward (x2) through every block (encoder: attention, MLP; decoder:
  self-attention, cross-attention, MLP; the logits), each summing over the norm, the query,
  key, value and output projections (4 x emb_dim), the scores (head_dim), softmax and values
  over the positions (2 x (max_history + levels)) and the MLP (mlp_dim); then the sum over the
  tokens of `rows` examples. For the tiny models here n ~ 3,000: the bound is ~3.5e-4, taken
  against the leaf's largest gradient (the scale of the terms). Measured gaps are ~1e-6 (8
  devices against 1, AVX2); a lost microbatch or a gradient 0.1% off is outside."""
  levels = len(cfg.sid_vocab_sizes)
  positions = cfg.max_history + levels
  blocks = 2 * cfg.num_encoder_layers + 3 * cfg.num_decoder_layers + 1
  per_block = 4 * cfg.emb_dim + cfg.head_dim + 2 * positions + cfg.mlp_dim
  tokens = rows * positions
  return (2 * blocks * per_block + tokens) * EPS32


def _adam_drift_bound(n_steps: int, opt=OPT, total_steps: int = TOTAL_STEPS) -> float:
  """How far apart, per element, two AdamW runs (`opt`) can be after n steps, whatever their
  gradients, so whatever rounding did. Step t moves an element by lr_t * |m_hat / (sqrt(v_hat)
  + eps)|, plus weight decay, which only shrinks a gap (factor 1 - lr_t * wd). Cauchy-Schwarz on
  m = (1-b1) sum_s b1^(t-s) g_s against v = (1-b2) sum_s b2^(t-s) g_s^2 bounds the ratio by
  c_t = (1-b1)/(1-b1^t) * sqrt((1-b2^t)/(1-b2) * sum_{k<t} (b1^2/b2)^k) (1 at t = 1, ~1.7 in
  the limit for b1 = 0.9, b2 = 0.98). So the gap is at most 2 * sum_t lr_t * c_t.

  Rounding alone may use much of this: where an element's gradient is mostly rounding noise (a
  sum that cancels), Adam divides it by its own size and moves the element by up to lr_t
  either way, so two meshes drift apart a little more at every step (one element of 2,048 by
  6e-5 after 6 steps on AVX-512, against 1e-5 allowed before). The bound is sound but weak: it
  catches a NaN, a wrong schedule or wrong parameters on one mesh, not a wrong gradient (any
  two gradient sequences stay within it). The per-step loss and gradient comparison does that."""
  _, schedule = train_lib.make_optimizer(opt, total_steps)
  b1, b2 = opt.b1, opt.b2
  total = 0.0
  for t in range(1, n_steps + 1):
    c = (1 - b1) / (1 - b1**t) * np.sqrt((1 - b2**t) / (1 - b2) * np.sum((b1**2 / b2) ** np.arange(t)))
    total += float(schedule(t - 1)) * c
  return 2 * total


def _assert_trains_like(model, batches, ref, other):
  """`other` trains `model` on `batches` as `ref` does; each is (partitioner, grad_accum).

  1. At every step both start from the same state (ref's, copied onto other's mesh) and see the
     same batch: their losses and gradients must agree within float32 rounding
     (_rounding_tol). This is the strong check, and the only one that can see a wrong gradient.
  2. Their initial parameters agree (initialisation is elementwise: up to a few ulp).
  3. Other also trains on its own: after the steps its parameters must be within
     _adam_drift_bound of ref's. A tighter check of two free runs is unsound: Adam amplifies
     rounding (see there), and by how much depends on the CPU's kernels.
  Returns ref's final parameters and losses, and other's losses and final state.
  """
  (ref_part, ref_accum), (other_part, other_accum) = ref, other
  r = _Trainer(model, ref_part, batches[0], ref_accum, record_grads=True)
  o = _Trainer(model, other_part, batches[0], other_accum, record_grads=True)
  tol = _rounding_tol(model.config, batches[0]["scenario"].shape[0])
  state = r.init()
  init_ref = jax.device_get(state["params"])
  ref_losses = []
  for t, b in enumerate(batches):
    new_state, m_ref = r.step(state, b)
    twin, m_other = o.step(state, b)
    ref_losses.append(float(m_ref["loss"]))
    np.testing.assert_allclose(float(m_other["loss"]), ref_losses[-1], rtol=tol, err_msg=f"loss at step {t}")
    g_ref, g_other = jax.device_get((new_state["opt_state"]["grads"], twin["opt_state"]["grads"]))
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_other)):
      np.testing.assert_allclose(b_, a, rtol=0, atol=tol * float(np.abs(a).max()),
                                 err_msg=f"gradient of {jax.tree_util.keystr(path)} at step {t}")
    state = new_state
  params_ref = jax.device_get(state["params"])

  state_other = o.init()
  init_other = jax.device_get(state_other["params"])
  # Initialisation is elementwise (no sums to reorder): equal but for the last bits of a
  # transcendental that a vector and a scalar loop may evaluate differently.
  jax.tree.map(lambda a, b_: np.testing.assert_allclose(b_, a, rtol=8 * EPS32, atol=0), init_ref, init_other)
  other_losses = []
  for b in batches:
    state_other, m = o.step(state_other, b)
    other_losses.append(float(m["loss"]))
  assert all(np.isfinite(other_losses)), other_losses
  drift = _adam_drift_bound(len(batches))
  for (path, a), b_, a0, b0 in zip(jax.tree_util.tree_leaves_with_path(params_ref),
                                   jax.tree.leaves(jax.device_get(state_other["params"])),
                                   jax.tree.leaves(init_ref), jax.tree.leaves(init_other)):
    # The gap at the start, Adam's drift, and one rounding of p + update per step and run.
    bound = np.abs(b0 - a0) + drift + len(batches) * EPS32 * np.abs(a)
    gap = np.abs(b_ - a)
    assert (gap <= bound).all(), (f"{jax.tree_util.keystr(path)}: after {len(batches)} steps the runs differ by "
                                  f"{gap.max():.3g}, more than Adam's drift bound {drift:.3g}")
  return params_ref, ref_losses, other_losses, state_other


def test_eight_device_mesh_matches_one_device():
  """Same losses and gradients at every step on data=2 x fsdp=2 x tensor=2 as on one device
  (dropout on: the masks do not depend on the mesh); see _assert_trains_like."""
  assert jax.device_count() == 8, "tests must run with 8 fake CPU devices (see tests/conftest.py)"
  model, batches = _model_and_batches()
  one = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  part8 = partitioning.Partitioner({"data": 2, "fsdp": 2, "tensor": 2})
  _, _, _, state8 = _assert_trains_like(model, batches, (one, 1), (part8, 1))
  # The parameters really are sharded: an (embed, mlp) kernel is split over fsdp x tensor.
  wi = state8["params"]["encoder_layers_0"]["mlp"]["wi"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  assert len({str(s.index) for s in wi.addressable_shards}) == 4


def test_gradient_accumulation_matches_one_big_batch():
  """4 microbatches give the loss and gradients of the whole batch, at every step."""
  cfg_nodrop = ModelConfig(**{**CFG.__dict__, "dropout_rate": 0.0})
  _, batches = _model_and_batches()
  model = RecModel(cfg_nodrop, np.asarray(_model_and_batches()[0].sid_codes))
  part = partitioning.Partitioner({"data": 2}, devices=jax.devices()[:2])
  _assert_trains_like(model, batches, (part, 1), (part, 4))


def test_loss_decreases_on_a_fixed_batch():
  model, batches = _model_and_batches(n_batches=1)
  part = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  _, losses, _ = _run(model, batches * 8, part)
  assert losses[-1] < losses[0] - 0.3, losses


def test_bfloat16_computation_keeps_float32_parameters_and_learns():
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16", "dropout_rate": 0.0})
  _, batches = _model_and_batches(n_batches=1)
  model = RecModel(cfg, np.asarray(_model_and_batches()[0].sid_codes))
  part = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  params, losses, _ = _run(model, batches * 6, part)
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.2, losses
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_ema_of_the_weights_follows_the_polyak_recurrence():
  model, batches = _model_and_batches(n_batches=4)
  part = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 10)
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(2)))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "ema_params": params}
  step = jax.jit(train_lib.make_train_step(model, tx, 1, ema_decay=0.5))
  expected = jax.device_get(params)
  for t, b in enumerate(batches):
    state, _ = step(state, b, jax.random.key(1))
    d = min(0.5, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, 0.31: the warm-up, not yet 0.5
    expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, jax.device_get(state["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state["ema_params"]), expected)
  gaps = jax.tree.leaves(jax.tree.map(lambda e, p: float(np.abs(e - p).max()), state["ema_params"], state["params"]))
  assert max(gaps) > 1e-4  # the average really lags the weights
