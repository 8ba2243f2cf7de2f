"""Mixture of experts: routing and capacity against NumPy, the balancing loss, an MoE model that
learns, decodes, and shards over a (data, fsdp, tensor, expert) mesh of 8 fake devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from oxyjax import partitioning
from oxyjax.models import moe
from oxyjax.models.encoder_decoder import EncoderDecoder, ModelConfig
from oxyjax.models.rec_model import RecModel
from tests import test_train_step as tts


# ---------------------------------------------------------------------- NumPy reference
def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_route(logits, k, capacity):
  """Loop reference: top-k, gates (renormalised for k > 1), choice-major slots, drops."""
  g, s, e = logits.shape
  probs = _softmax(logits.astype(np.float64))
  dispatch = np.zeros((g, s, e, capacity))
  combine = np.zeros((g, s, e, capacity))
  for gi in range(g):
    order = np.argsort(-probs[gi], axis=-1, kind="stable")[:, :k]  # [S, k]
    gates = probs[gi][np.arange(s)[:, None], order]
    if k > 1:
      gates = gates / gates.sum(-1, keepdims=True)
    fill = np.zeros(e, int)
    for j in range(k):  # all first choices, then all second choices
      for t in range(s):
        ex = order[t, j]
        if fill[ex] < capacity:
          dispatch[gi, t, ex, fill[ex]] = 1.0
          combine[gi, t, ex, fill[ex]] = gates[t, j]
        fill[ex] += 1
  return dispatch, combine, probs


def np_balance_loss(logits, k):
  probs = _softmax(logits.astype(np.float64))
  g, s, e = probs.shape
  out = []
  for gi in range(g):
    top = np.argsort(-probs[gi], axis=-1, kind="stable")[:, :k]
    f = np.bincount(top.ravel(), minlength=e) / (k * s)
    p = probs[gi].mean(0)
    out.append(e * np.sum(f * p))
  return float(np.mean(out))


@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 3), (2, 16), (3, 2)])
def test_routing_matches_numpy(k, capacity):
  logits = np.random.default_rng(k * 10 + capacity).normal(size=(3, 16, 4)).astype(np.float32) * 2
  dispatch, combine, probs, top_i, kept = jax.jit(moe.route, static_argnums=(1, 2))(jnp.asarray(logits), k, capacity)
  ref_d, ref_c, ref_p = np_route(logits, k, capacity)
  np.testing.assert_array_equal(np.asarray(dispatch), ref_d)
  np.testing.assert_allclose(np.asarray(combine), ref_c, atol=1e-6)
  np.testing.assert_allclose(np.asarray(probs), ref_p, atol=1e-6)
  # Capacity: no expert slot holds more than one token, no expert holds more than `capacity`.
  assert np.asarray(dispatch).sum(1).max() <= 1
  assert np.asarray(kept).sum() == ref_d.sum()
  if capacity == 16:  # S tokens: nothing can be dropped
    assert np.asarray(kept).all()
  else:
    assert not np.asarray(kept).all(), "the test case should exercise drops"
  np.testing.assert_allclose(float(moe.load_balancing_loss(probs, top_i)), np_balance_loss(logits, k), rtol=1e-5)


def test_uniform_router_balance_loss_is_one_and_overflow_passes_through():
  """Zero router: uniform probabilities (balance loss exactly 1); ties go to the lowest expert
  indices, so expert 0 overflows and tokens beyond its capacity get a zero MoE output."""
  e, s, d = 4, 8, 6
  block = moe.MoeBlock(mlp_dim=5, num_experts=e, num_experts_per_token=1, capacity_factor=1.0, group_size=s)
  x = jax.random.normal(jax.random.key(0), (2, s, d))
  params = nn.unbox(jax.jit(block.init)(jax.random.key(1), x)["params"])
  params["router"] = jnp.zeros_like(params["router"])
  y, state = jax.jit(lambda p, x: block.apply({"params": p}, x, deterministic=False, mutable=["intermediates"]))(
      params, x)
  aux = moe.collect_aux_losses(state["intermediates"])
  np.testing.assert_allclose(float(aux["moe_aux_loss"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux["moe_z_loss"]), np.log(e) ** 2, rtol=1e-6)
  cap = moe.expert_capacity(s, e, 1, 1.0)
  assert cap == 2
  y = np.asarray(y)
  # Kept tokens (the first `cap` of each group): gate 1/E times expert 0's MLP.
  wi, wo = np.asarray(params["wi"][0]), np.asarray(params["wo"][0])
  h = np.einsum("bsd,dfm->bsfm", np.asarray(x), wi)
  ref = np.einsum("bsm,md->bsd", np.asarray(jax.nn.gelu(h[..., 0, :], approximate=True)) * h[..., 1, :], wo) / e
  np.testing.assert_allclose(y[:, :cap], ref[:, :cap], atol=1e-5)
  np.testing.assert_array_equal(y[:, cap:], 0.0)


def test_moe_block_matches_dense_reference_without_drops():
  """Inference (deterministic) never drops, whatever the training capacity and group size:
  y = sum over the top-k experts of gate * expert(x), token by token."""
  e, k, d, m = 4, 2, 6, 5
  # In training these would drop: groups of one 5-token row, 10 assignments for 4 experts x C = 2.
  block = moe.MoeBlock(mlp_dim=m, num_experts=e, num_experts_per_token=k, capacity_factor=0.5, group_size=10)
  x = jax.random.normal(jax.random.key(0), (3, 5, d))
  params = nn.unbox(jax.jit(block.init)(jax.random.key(1), x)["params"])
  y = np.asarray(jax.jit(block.apply)({"params": params}, x))
  xn, p = np.asarray(x, np.float64), {n: np.asarray(v, np.float64) for n, v in params.items()}
  probs = _softmax(xn @ p["router"])
  ref = np.zeros_like(xn)
  for idx in np.ndindex(xn.shape[:-1]):
    top = np.argsort(-probs[idx])[:k]
    gates = probs[idx][top] / probs[idx][top].sum()
    for ex, gate in zip(top, gates):
      h = np.einsum("d,dfm->fm", xn[idx], p["wi"][ex])
      act = np.asarray(jax.nn.gelu(jnp.asarray(h[0]), approximate=True), np.float64) * h[1]
      ref[idx] += gate * act @ p["wo"][ex]
  np.testing.assert_allclose(y, ref, atol=1e-4)


def test_groups_and_capacity():
  assert moe.rows_per_group(16, 8, 32) == 4
  assert moe.rows_per_group(12, 8, 40) == 4  # 5 does not divide 12
  assert moe.rows_per_group(16, 8, 0) == 1
  assert moe.rows_per_group(16, 100, 32) == 1
  assert moe.rows_per_group(16, 4, 64, num_shards=8) == 2  # a group never straddles two shards
  assert moe.rows_per_group(16, 4, 64, num_shards=3) == 16  # uneven shards: all rows
  assert moe.expert_capacity(32, 8, 2, 1.25) == 10
  assert moe.expert_capacity(32, 8, 2, 0.0) == 32
  assert moe.expert_capacity(4, 24, 2, 1.25) == 1


def test_layer_selection():
  cfg = ModelConfig(num_experts=4, moe_every_n_layers=2)
  assert [moe.layer_uses_moe(cfg, f"encoder_layers_{i}") for i in range(4)] == [False, True, False, True]
  assert not moe.layer_uses_moe(ModelConfig(), "encoder_layers_1")


# ---------------------------------------------------------------------- the model
MOE_CFG = dataclasses.replace(tts.CFG, dropout_rate=0.0, num_experts=4, num_experts_per_token=2,
                              moe_group_size=16)  # 2 encoder / 4 decoder rows: the same groups on 1 and 8 devices


def _init(model):
  """Boxed parameters from key 0 (as tests/test_train_step.py's _run), jitted: eager init is slow."""
  return jax.jit(lambda r: model.init(r, model.dummy_batch(2)))(jax.random.key(0))


def _moe_model_and_batches(cfg=MOE_CFG, n_batches=3):
  base, batches = tts._model_and_batches(n_batches)
  return RecModel(cfg, base.sid_codes), batches


def test_moe_parameters_and_aux_loss_in_loss_fn():
  model, batches = _moe_model_and_batches()
  boxed = _init(model)
  for stack, n in (("encoder_layers", MOE_CFG.num_encoder_layers), ("decoder_layers", MOE_CFG.num_decoder_layers)):
    for i in range(n):
      mlp = boxed[f"{stack}_{i}"]["mlp"]
      assert mlp["wi"].value.shape == (4, 32, 2, 64) and mlp["wi"].names == ("expert", "embed", None, "mlp")
      assert mlp["wo"].value.shape == (4, 64, 32) and mlp["wo"].names == ("expert", "mlp", "embed")
  params = nn.unbox(boxed)
  batch = batches[0]
  unweighted = RecModel(dataclasses.replace(MOE_CFG, moe_aux_loss_weight=0.0), model.sid_codes)

  @jax.jit
  def run(p):  # one compilation for both
    return model.loss_fn(p, batch, None), unweighted.loss_fn(p, batch, None)[0]

  (loss_sum, aux), loss_sum0 = run(params)
  assert 0.5 < float(aux["moe_aux_loss"]) < 4.0
  # loss_sum / denominator gains exactly weight * aux.
  np.testing.assert_allclose(float(loss_sum - loss_sum0) / float(aux["denominator"]),
                             MOE_CFG.moe_aux_loss_weight * float(aux["moe_aux_loss"]), rtol=1e-4)


def test_moe_decoding_matches_teacher_forcing():
  """Incremental decoding through MoE layers equals teacher forcing: inference routes each row
  alone and drops nothing, so a token's FFN output does not depend on how it is batched."""
  cfg = dataclasses.replace(MOE_CFG, dropout_rate=0.0)
  model, batches = _moe_model_and_batches(cfg)
  net, batch = model.network, {k: jnp.asarray(v) for k, v in batches[0].items()}
  params = nn.unbox(_init(model))
  logits = jax.jit(net.apply)({"params": params}, batch)
  ctx = jax.jit(lambda p, b: net.apply({"params": p}, b, method=EncoderDecoder.init_decode))(params, batch)
  step = jax.jit(lambda p, lvl, prev, cache, ctx: net.apply({"params": p}, lvl, prev, cache, ctx,
                                                            method=EncoderDecoder.decode_step), static_argnums=1)
  b = batch["scenario"].shape[0]
  cache, prev = None, jnp.zeros((b, 1), jnp.int32)
  for level in range(model.config.num_levels):
    step_logits, cache = step(params, level, prev, cache, ctx)
    np.testing.assert_allclose(step_logits[:, 0], logits[:, level], atol=1e-4)
    prev = batch["target_codes"][:, level:level + 1]


@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "moe"])
def test_expert_tensor_data_mesh_matches_one_device(num_experts):
  """Trains 6 steps on 1 device and on data=2 x tensor=2 x expert=2: the same losses and
  gradients at every step (within float32 rounding; tests/test_train_step.py's
  _assert_trains_like derives the tolerances), and the loss decreases."""
  assert jax.device_count() == 8
  model, batches = _moe_model_and_batches(dataclasses.replace(MOE_CFG, num_experts=num_experts), n_batches=1)
  batches = batches * 6  # one fixed batch: the loss must also go down
  one = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  part8 = partitioning.Partitioner({"data": 2, "fsdp": 1, "tensor": 2, "expert": 2})
  p1, l1, l8, state8 = tts._assert_trains_like(model, batches, (one, 1), (part8, 1))
  assert all(np.isfinite(l1)) and l1[-1] < l1[0] - 0.3, l1
  assert l8[-1] < l8[0] - 0.3, l8
  if num_experts:  # the router learns (its gradient is not zero)
    p0 = nn.unbox(_init(model))
    for name in ("encoder_layers_0", "decoder_layers_0"):
      assert np.abs(p1[name]["mlp"]["router"] - np.asarray(p0[name]["mlp"]["router"])).max() > 1e-4
  wi = state8["params"]["decoder_layers_0"]["mlp"]["wi"]
  if num_experts:
    assert wi.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", None, "tensor")
    assert len({str(s.index) for s in wi.addressable_shards}) == 4  # 2 experts x 2 tensor shards
    assert wi.addressable_shards[0].data.shape == (2, 32, 2, 32)
  else:
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
