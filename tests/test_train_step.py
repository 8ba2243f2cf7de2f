"""The jitted, sharded train step: 8 fake CPU devices vs one device; gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
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


def _run(model, batches, part, grad_accum=1):
  tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 10)

  def init_state(rng):
    params = model.init(rng, model.dummy_batch(2))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  with jax.set_mesh(part.mesh), part.rules_context():
    boxed = jax.eval_shape(init_state, jax.random.key(0))
    shardings = part.params_shardings(boxed)
    state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(train_lib.make_train_step(model, tx, grad_accum),
                   in_shardings=(shardings, {k: part.data_sharding(v.ndim) for k, v in batches[0].items()},
                                 part.replicated()),
                   out_shardings=(shardings, part.replicated()))
    losses = []
    for b in batches:
      state, m = step(state, part.shard_batch(b), jax.random.key(1))
      losses.append(float(m["loss"]))
  return jax.device_get(state["params"]), losses, state


def test_eight_device_mesh_matches_one_device():
  assert jax.device_count() == 8, "tests must run with 8 fake CPU devices (see tests/conftest.py)"
  model, batches = _model_and_batches()
  p1, l1, _ = _run(model, batches, partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]))
  part8 = partitioning.Partitioner({"data": 2, "fsdp": 2, "tensor": 2})
  p8, l8, state8 = _run(model, batches, part8)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)
  # The parameters really are sharded: an (embed, mlp) kernel is split over fsdp x tensor.
  wi = state8["params"]["encoder_layers_0"]["mlp"]["wi"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  assert len({str(s.index) for s in wi.addressable_shards}) == 4


def test_gradient_accumulation_matches_one_big_batch():
  cfg_nodrop = ModelConfig(**{**CFG.__dict__, "dropout_rate": 0.0})
  _, batches = _model_and_batches()
  model = RecModel(cfg_nodrop, np.asarray(_model_and_batches()[0].sid_codes))
  part = partitioning.Partitioner({"data": 2}, devices=jax.devices()[:2])
  p1, l1, _ = _run(model, batches, part, grad_accum=1)
  p4, l4, _ = _run(model, batches, part, grad_accum=4)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)


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
