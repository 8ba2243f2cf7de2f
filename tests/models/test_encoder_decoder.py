"""The network: teacher forcing vs incremental decoding, logical axes, masking, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from oxyjax.models.encoder_decoder import EncoderDecoder, ModelConfig

CFG = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2,
                  dropout_rate=0.0, sid_vocab_sizes=(8, 8, 5), num_item_embeddings=50, max_history=6)


def _batch(seed=0, b=3):
  rng = np.random.default_rng(seed)
  s, l = CFG.max_history, CFG.num_levels
  hist = rng.integers(1, 50, (b, s)).astype(np.int32)
  hist[0, 4:] = 0
  hist[1, 1:] = 0
  return dict(history_items=hist, history_codes=rng.integers(0, 5, (b, s, l)).astype(np.int32),
              history_mask=hist > 0, scenario=np.zeros(b, np.int32),
              target_codes=np.stack([rng.integers(0, v, b) for v in (8, 8, 5)], 1).astype(np.int32))


@pytest.fixture(scope="module")
def net_params():
  net = EncoderDecoder(CFG)
  boxed = net.init(jax.random.key(0), _batch())["params"]
  return net, boxed


def test_every_parameter_has_logical_axes(net_params):
  _, boxed = net_params
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim


def test_incremental_decoding_matches_teacher_forcing(net_params):
  net, boxed = net_params
  params = nn.unbox(boxed)
  batch = _batch(1)
  logits = net.apply({"params": params}, batch)
  ctx = net.apply({"params": params}, batch, method=EncoderDecoder.init_decode)
  cache, prev = None, jnp.zeros((3, 1), jnp.int32)
  for level in range(CFG.num_levels):
    step_logits, cache = net.apply({"params": params}, level, prev, cache, ctx, method=EncoderDecoder.decode_step)
    np.testing.assert_allclose(step_logits[:, 0], logits[:, level], atol=1e-4)
    prev = jnp.asarray(batch["target_codes"][:, level:level + 1])


def test_beams_share_the_encoder_and_stay_independent(net_params):
  """Two beams with different prefixes give the same logits as separate single-beam runs."""
  net, boxed = net_params
  params = nn.unbox(boxed)
  batch = _batch(2)
  ctx = net.apply({"params": params}, batch, method=EncoderDecoder.init_decode)
  lg0, cache = net.apply({"params": params}, 0, jnp.zeros((3, 1), jnp.int32), None, ctx,
                         method=EncoderDecoder.decode_step)
  cache2 = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=1), cache)
  prev = jnp.asarray([[1, 4], [0, 7], [2, 2]], jnp.int32)
  lg_two, _ = net.apply({"params": params}, 1, prev, cache2, ctx, method=EncoderDecoder.decode_step)
  for beam in range(2):
    lg_one, _ = net.apply({"params": params}, 1, prev[:, beam:beam + 1], cache, ctx,
                          method=EncoderDecoder.decode_step)
    np.testing.assert_allclose(lg_two[:, beam], lg_one[:, 0], atol=1e-5)


def test_codes_beyond_a_level_vocabulary_are_masked(net_params):
  net, boxed = net_params
  logits = net.apply({"params": nn.unbox(boxed)}, _batch())
  assert np.all(np.asarray(logits[:, 2, 5:]) < -1e8)  # level 3 has 5 codes
  assert np.all(np.asarray(logits[:, :2, :]) > -1e8)


def test_padding_positions_do_not_change_the_output(net_params):
  net, boxed = net_params
  params = nn.unbox(boxed)
  a = _batch(3)
  b = {k: v.copy() for k, v in a.items()}
  b["history_codes"][~b["history_mask"]] = 3  # garbage under the padding mask
  np.testing.assert_allclose(net.apply({"params": params}, a), net.apply({"params": params}, b), atol=1e-5)


def test_history_order_matters(net_params):
  """Recency positions are real: reversing a history changes the prediction."""
  net, boxed = net_params
  params = nn.unbox(boxed)
  a = _batch(4)
  b = {k: v.copy() for k, v in a.items()}
  b["history_items"][2] = b["history_items"][2][::-1]
  b["history_codes"][2] = b["history_codes"][2][::-1]
  la, lb = net.apply({"params": params}, a), net.apply({"params": params}, b)
  assert np.abs(np.asarray(la[2]) - np.asarray(lb[2])).max() > 1e-4
  np.testing.assert_allclose(la[:2], lb[:2], atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "minimal"])
def test_remat_gives_the_same_loss_gradients_and_parameter_names(policy):
  """Rematerialised layers recompute the forward pass (dropout masks included) exactly."""
  base = dataclasses.replace(CFG, dropout_rate=0.3)
  batch = _batch(3)
  results = []
  for cfg in (base, dataclasses.replace(base, remat_policy=policy)):
    net = EncoderDecoder(cfg)
    params = nn.unbox(net.init(jax.random.key(0), batch)["params"])

    def loss(p, key=jax.random.key(7)):
      logits = net.apply({"params": p}, batch, deterministic=False, rngs={"dropout": key})
      lp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(lp, jnp.asarray(batch["target_codes"])[..., None], -1).mean()

    results.append((params, *jax.jit(jax.value_and_grad(loss))(params)))
    assert float(loss(params, jax.random.key(8))) != float(results[-1][1])  # dropout is really on
  (p0, l0, g0), (p1, l1, g1) = results
  assert jax.tree.structure(p0) == jax.tree.structure(p1)  # checkpoints stay interchangeable
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_unknown_remat_policy_is_rejected():
  net = EncoderDecoder(dataclasses.replace(CFG, remat_policy="everything"))
  with pytest.raises(ValueError, match="remat_policy"):
    net.init(jax.random.key(0), _batch())


def test_weight_product_in_bfloat16_rounds_the_operands_and_accumulates_in_float32():
  """`layers.weight_product` with matmul_dtype bfloat16 is the exact product of the operands rounded
  to bfloat16, up to float32 accumulation: the product of two bfloat16 numbers (8-bit significands)
  is exact in float32, so the only error left is summing K float32 terms, at most
  gamma_K * sum_i |x_i w_i| per element, gamma_K = K u / (1 - K u), u = eps32 / 2 (Higham,
  Accuracy and Stability of Numerical Algorithms, eq. 3.5). The unrounded operands' product falls
  outside that bound (the rounding took place); float32 (the default) is the plain einsum."""
  from oxyjax.models import layers

  rng = np.random.default_rng(0)
  k = 64
  x = rng.standard_normal((16, k)).astype(np.float32)
  w = rng.standard_normal((k, 48)).astype(np.float32)
  got = np.asarray(layers.weight_product("td,dv->tv", jnp.asarray(x), jnp.asarray(w), jnp.float32, jnp.bfloat16))
  assert got.dtype == np.float32
  xb, wb = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, w))
  u = np.finfo(np.float32).eps / 2
  bound = k * u / (1 - k * u) * (np.abs(xb) @ np.abs(wb))
  assert np.all(np.abs(got - xb @ wb) <= bound)
  unrounded = x.astype(np.float64) @ w.astype(np.float64)
  assert np.any(np.abs(unrounded - xb @ wb) > bound)
  np.testing.assert_array_equal(np.asarray(layers.weight_product("td,dv->tv", x, w, jnp.float32)),
                                np.asarray(jnp.einsum("td,dv->tv", x, w)))
  # A product with a batch dimension (a teacher-forced pass's per-level output kernels), which
  # XLA:CPU has no bfloat16 -> float32 kernel for: the same rounded operands, within the same bound.
  xs, ws = x.reshape(2, 8, k), rng.standard_normal((2, k, 48)).astype(np.float32)
  got = np.asarray(layers.weight_product("tbd,tdv->tbv", jnp.asarray(xs), jnp.asarray(ws), jnp.float32, jnp.bfloat16))
  xb, wb = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (xs, ws))
  assert np.all(np.abs(got - xb @ wb) <= k * u / (1 - k * u) * (np.abs(xb) @ np.abs(wb)))


def test_matmul_dtype_is_checked_and_casts_only_the_weight_kernels(net_params):
  """An unknown `ModelConfig.matmul_dtype` is refused, naming the field; `cast_weight_kernels`
  turns exactly the `WEIGHT_KERNELS` leaves (attention projections, MLP and output kernels) into
  bfloat16, and every one of those names is a parameter of the network."""
  from oxyjax.models import layers

  with pytest.raises(ValueError, match="matmul_dtype"):
    dataclasses.replace(CFG, matmul_dtype="float8").jnp_matmul_dtype
  params = nn.unbox(net_params[1])
  cast = layers.cast_weight_kernels(params, jnp.bfloat16)
  names = set()
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(cast)):
    name = path[-1].key
    names.add(name)
    assert after.dtype == (jnp.bfloat16 if name in layers.WEIGHT_KERNELS else before.dtype), jax.tree_util.keystr(path)
  assert layers.WEIGHT_KERNELS <= names
