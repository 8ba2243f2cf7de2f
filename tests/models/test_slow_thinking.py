"""Reasoning instruction in INSTR, IGR inside the encoder, the Q2I loss, action weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from oxyjax import losses
from oxyjax import partitioning
from oxyjax import train as train_lib
from oxyjax.data import pipeline
from oxyjax.models.encoder_decoder import EncoderDecoder, ModelConfig
from oxyjax.models.rec_model import RecModel
from tests.test_train_step import _assert_trains_like

N_ITEMS, TEXT, INSTR = 40, 16, 12
CFG = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                  dropout_rate=0.0, max_history=10, text_dim=TEXT, instruction_dim=INSTR, igr_recent=3,
                  igr_top_k=3, igr_dim=8, use_trigger_item=True)


def _codes(rng):
  return np.concatenate([np.zeros((1, 3), np.int32),
                         np.stack([rng.integers(0, 6, N_ITEMS), rng.integers(0, 6, N_ITEMS), np.arange(N_ITEMS)],
                                  1).astype(np.int32)])


def _model(cfg=CFG, q2i_weight=0.0, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(N_ITEMS + 1, TEXT)).astype(np.float32)
  text[0] = 0
  return RecModel(cfg, _codes(rng), item_text_embeddings=text if cfg.text_dim else None,
                  q2i=losses.Q2IConfig(weight=q2i_weight))


def _examples(b=8, seed=1, max_history=10):
  rng = np.random.default_rng(seed)
  hist = np.zeros((b, max_history), np.int32)
  lengths = rng.integers(1, max_history + 1, b)
  lengths[0], lengths[1] = max_history, 2  # one full history, one with no long-term pool
  for i, n in enumerate(lengths):
    hist[i, :n] = rng.integers(1, N_ITEMS + 1, n)
  return {"history": hist, "target": rng.integers(1, N_ITEMS + 1, b), "scenario": np.zeros(b, np.int32),
          "instruction_embedding": rng.normal(size=(b, INSTR)).astype(np.float32),
          "instruction_mask": np.arange(b) % 2 == 0}


def _params(model):
  return nn.unbox(model.init(jax.random.key(0), model.dummy_batch(2)))


# --------------------------------------------------------------------------- Q2I


def _q2i_numpy(q, t, w, lam_r, lam_d, variance="mean"):
  keep = w > 0
  q, t = q[keep].astype(np.float64), t[keep].astype(np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  b = len(q)
  align = -np.mean(np.sum(q * t, axis=1))
  if variance == "mean":
    variance = -np.log(np.mean(np.var(q, axis=0)) * np.mean(np.var(t, axis=0)) + 1e-8)
  elif variance == "generalized":
    gv = lambda x: np.linalg.slogdet(np.cov(x.T, bias=True) + 1e-4 * np.eye(x.shape[1]))[1] / x.shape[1]
    variance = -(gv(q) + gv(t))
  else:
    variance = -(np.mean(np.log(np.var(q, axis=0) + 1e-4)) + np.mean(np.log(np.var(t, axis=0) + 1e-4)))
  g = q @ q.T
  decor = (np.sum(g ** 2) - np.sum(np.diag(g) ** 2)) / (b * b - b)
  return align + lam_r * variance + lam_d * decor


@pytest.mark.parametrize("variance", ["mean", "per_dimension", "generalized"])
def test_q2i_matches_numpy_reference_and_ignores_padding_rows(variance):
  rng = np.random.default_rng(0)
  q, t = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(12, 5)).astype(np.float32)
  w = np.ones(12, np.float32)
  w[[3, 7]] = 0.0
  kw = dict(variance_weight=0.3, decorrelation_weight=0.7, variance=variance)
  got, parts = losses.q2i_loss(q, t, w, **kw)
  # float32 sums of 10 rows x 5 dims against float64: a few ulps of terms of size ~1-10
  np.testing.assert_allclose(float(got), _q2i_numpy(q, t, w, 0.3, 0.7, variance), rtol=1e-5)
  assert set(parts) == {"alignment", "variance", "decorrelation"}
  # Whatever the padding rows hold, the loss is the same.
  q2, t2 = q.copy(), t.copy()
  q2[[3, 7]], t2[[3, 7]] = 100.0, -5.0
  got2, _ = losses.q2i_loss(q2, t2, w, **kw)
  np.testing.assert_allclose(float(got2), float(got), rtol=1e-6)


def test_which_variance_readings_see_queries_collapsed_onto_two_opposite_directions():
  """The collapse measured in docs/multi_scenario.md (sessions 20-21): every query and its target on
  +u or -u. The dimension-averaged variance of zero-mean unit vectors is 1/d whatever their
  directions, so 'mean' scores the collapsed batch like a spread-out one; 'per_dimension' sees a
  u that is uneven over the dimensions but not one spread evenly over them (every var_k = 1/d);
  'generalized' (log det of the covariance) sees both."""
  rng = np.random.default_rng(2)
  d, b = 16, 64
  spread = rng.normal(size=(b, d)).astype(np.float32)
  spread -= spread.mean(0)
  w = np.ones(b, np.float32)
  on = lambda u: np.where(np.arange(b)[:, None] % 2 == 0, u, -u).astype(np.float32)  # batch mean exactly 0
  uneven, even = on(rng.normal(size=d)), on(np.where(rng.random(d) < 0.5, 1.0, -1.0))
  term = lambda x, v: float(losses.q2i_loss(x, x, w, variance_weight=1.0, decorrelation_weight=0.0,
                                            variance=v)[1]["variance"])
  # 'mean': every batch has mean 0 (spread: up to normalisation), so all score about -2 log(1/d)
  for collapsed in (uneven, even):
    assert abs(term(collapsed, "mean") - term(spread, "mean")) < 0.1 * term(spread, "mean")
  # 'per_dimension': pays for the uneven direction (Jensen), not for the even one
  assert term(uneven, "per_dimension") > term(spread, "per_dimension") + 1.0
  assert abs(term(even, "per_dimension") - term(spread, "per_dimension")) < 0.1 * term(spread, "per_dimension")
  # 'generalized': d - 1 of the covariance's eigenvalues at 0 in both cases
  for collapsed in (uneven, even):
    assert term(collapsed, "generalized") > term(spread, "generalized") + 5.0
  with pytest.raises(ValueError, match="variance must be one of"):
    losses.q2i_loss(spread, spread, w, variance_weight=1.0, decorrelation_weight=0.0, variance="det")


def test_q2i_alignment_term_prefers_aligned_pairs():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(16, 8)).astype(np.float32)
  w = np.ones(16, np.float32)
  aligned, _ = losses.q2i_loss(q, q * 2.0, w, variance_weight=0.0, decorrelation_weight=0.0)
  shuffled, _ = losses.q2i_loss(q, q[::-1], w, variance_weight=0.0, decorrelation_weight=0.0)
  np.testing.assert_allclose(float(aligned), -1.0, rtol=1e-5)
  assert float(shuffled) > float(aligned) + 0.5


# --------------------------------------------------------------------------- IGR in the encoder


def test_igr_keeps_recent_and_selects_only_from_the_long_term_pool():
  model = _model()
  params = _params(model)
  batch = model.convert_features(_examples())
  _, enc_bias, extras = model.network.apply({"params": params}, batch, method=EncoderDecoder.encode)
  assert enc_bias.shape[-1] == CFG.encoder_length == 1 + 3 + 3
  idx = np.asarray(extras["igr_index"])
  lengths = batch["history_mask"].sum(1)
  for i, n in enumerate(lengths):
    chosen = idx[i][idx[i] >= 0]
    pool = max(n - CFG.igr_recent, 0)
    assert len(chosen) == min(CFG.igr_top_k, pool)
    assert len(set(chosen.tolist())) == len(chosen)
    assert np.all(chosen < pool), (i, chosen, n)  # never a recent behaviour, never padding
  # Row 1 has 2 behaviours: both recent, an empty pool, and a masked summary token.
  visible = np.asarray(enc_bias[1, 0, 0] == 0)
  np.testing.assert_array_equal(visible, [False, False, True, True, False, False, False])


def test_igr_selection_follows_the_instruction():
  """A different reasoning instruction changes which long-term behaviours are kept."""
  model = _model()
  params = _params(model)
  ex = _examples(b=16, seed=3)
  ex["instruction_mask"][:] = True
  a = model.network.apply({"params": params}, model.convert_features(ex), method=EncoderDecoder.encode)[2]
  ex["instruction_embedding"] = np.random.default_rng(9).normal(size=ex["instruction_embedding"].shape) * 5
  b = model.network.apply({"params": params}, model.convert_features(ex), method=EncoderDecoder.encode)[2]
  assert not np.array_equal(np.asarray(a["igr_index"]), np.asarray(b["igr_index"]))


def test_missing_instruction_uses_the_learned_default():
  model = _model()
  params = _params(model)
  ex = _examples()
  base = model.network.apply({"params": params}, model.convert_features(ex))
  ex2 = dict(ex, instruction_embedding=ex["instruction_embedding"] + 3.0)
  moved = model.network.apply({"params": params}, model.convert_features(ex2))
  present = ex["instruction_mask"]
  diff = np.abs(np.asarray(base) - np.asarray(moved)).reshape(len(present), -1).max(1)
  assert np.all(diff[~present] == 0.0)  # rows without an instruction do not read it
  assert np.all(diff[present] > 1e-4)  # rows with one do
  # The default is a trained parameter: it gets a gradient from rows without an instruction.
  grads = jax.grad(lambda p: model.loss_fn(p, model.convert_features(ex), None)[0])(params)
  assert float(jnp.abs(grads["instruction"]["default_instruction"]).sum()) > 0


def test_normalized_instruction_reads_the_direction_of_i_r_at_the_scale_of_i_s():
  """ModelConfig.normalize_instruction: W_r sees i_r at unit mean square, so (a) rescaling an
  instruction embedding leaves the outputs unchanged (up to float32 rounding of the rescale and the
  rsqrt, ~1e-6 relative, far below the 1e-4 an actual change of input moves them by), while the
  unnormalised model's outputs move; and (b) at initialisation W_r i_r has about the spread of
  i_s (unit-variance scenario embedding), not the 1/sqrt(Dr) of an L2-normalised embedding."""
  ex = _examples()
  unit = ex["instruction_embedding"] / np.linalg.norm(ex["instruction_embedding"], axis=1, keepdims=True)
  ex = dict(ex, instruction_embedding=unit)  # as a sentence encoder gives them
  scaled = dict(ex, instruction_embedding=unit * 7.0)
  for normalize in (False, True):
    model = _model(dataclasses.replace(CFG, normalize_instruction=normalize))
    params = _params(model)
    out = [np.asarray(model.network.apply({"params": params}, model.convert_features(e))) for e in (ex, scaled)]
    diff = np.abs(out[0] - out[1]).reshape(len(unit), -1).max(1)
    present = ex["instruction_mask"]
    if normalize:
      assert np.all(diff < 1e-4 * np.abs(out[0]).max())
    else:
      assert np.all(diff[present] > 1e-3)
    instr, i_s, _ = model.network.apply({"params": params}, model.convert_features(ex),
                                        method=lambda m, b: m.instruction_inputs(b, None))
    spread = float(np.std(np.asarray(instr - i_s)[present]))  # the W_r i_r term
    # fan-in init: W_r x has per-coordinate variance mean(x^2): 1 normalised, 1/Dr = 1/12 not
    assert (spread > 0.5) if normalize else (spread < 0.5), (normalize, spread)


def test_only_q2i_trains_the_retrieval_keys():
  """Top-K is discrete: NTP gives psi_i nothing; Q2I does (PAPER.md section 5)."""
  batch = _model().convert_features(_examples())
  for weight, expect_grad in ((0.0, False), (0.5, True)):
    model = _model(q2i_weight=weight)
    params = _params(model)
    g = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
    norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["item_tower"]))
    assert (norm > 0) == expect_grad, (weight, norm)
    # psi_q always learns: the IGR summary token attends with the instruction query.
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["query_tower"])) > 0


def test_incremental_decoding_matches_teacher_forcing_with_igr_and_instructions():
  model = _model()
  params = _params(model)
  batch = model.convert_features(_examples())
  net = model.network
  logits = net.apply({"params": params}, batch)
  ctx = net.apply({"params": params}, batch, method=EncoderDecoder.init_decode)
  cache, prev = None, jnp.zeros((batch["scenario"].shape[0], 1), jnp.int32)
  for level in range(3):
    step_logits, cache = net.apply({"params": params}, level, prev, cache, ctx, method=EncoderDecoder.decode_step)
    np.testing.assert_allclose(step_logits[:, 0], logits[:, level], atol=1e-4)
    prev = jnp.asarray(batch["target_codes"][:, level:level + 1])


def test_q2i_model_trains_sharded_like_one_device():
  """The loss includes the batch-level Q2I term: the same loss and gradients on 8 devices as on
  one, at every step (tests/test_train_step.py's _assert_trains_like derives the tolerances)."""
  model = _model(cfg=dataclasses.replace(CFG, dropout_rate=0.1), q2i_weight=0.5)
  batches = [model.convert_features(_examples(b=16, seed=s)) for s in range(3)]
  one = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  _assert_trains_like(model, batches, (one, 1), (partitioning.Partitioner({"data": 4, "fsdp": 2}), 1))


# --------------------------------------------------------------------------- data side


def test_example_extras_travel_with_rows():
  rng = np.random.default_rng(0)
  arr = pipeline.ExampleArrays.zeros(5, 4)
  arr.history[:, 0] = np.arange(1, 6)
  arr.history_len[:] = 1
  arr.target[:] = np.arange(1, 6)
  arr = arr.with_extras(instruction_embedding=rng.normal(size=(5, 3)), instruction_mask=np.arange(5) < 2)
  taken = arr.take([4, 1])
  np.testing.assert_array_equal(taken.extras["instruction_embedding"], arr.extras["instruction_embedding"][[4, 1]])
  assert taken.as_dict()["instruction_mask"].tolist() == [False, True]
  batches = list(pipeline.eval_batches(arr, 4))
  last, mask = batches[-1]
  assert mask.tolist() == [True, False, False, False]
  assert np.all(last.extras["instruction_embedding"][1:] == 0)
  with pytest.raises(ValueError, match="instruction_mask"):
    pipeline.ExampleArrays.zeros(5, 4).with_extras(instruction_mask=np.zeros(3, bool))


def test_without_a_store_every_example_uses_the_default():
  arr = pipeline.ExampleArrays.zeros(6, 4)
  out = train_lib.load_instructions(arr, "industrial", "test", train_lib.InstructionsConfig(store=None), 7,
                                    log=lambda *a: None)
  assert out.extras["instruction_embedding"].shape == (6, 7)
  assert not out.extras["instruction_mask"].any()


def test_action_weights_scale_the_next_token_loss():
  rng = np.random.default_rng(0)
  cfg = ModelConfig(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                    dropout_rate=0.0, max_history=4)
  model = RecModel(cfg, _codes(rng), action_weights={0: 1.2, 1: 1.5, 2: 2.0})  # click, cart, purchase
  ex = {"history": rng.integers(1, N_ITEMS, (3, 4)), "target": np.array([1, 2, 3]), "scenario": np.zeros(3),
        "action": np.array([2, 0, 1])}
  batch = model.convert_features(ex)
  np.testing.assert_allclose(batch["weights"], [2.0, 1.2, 1.5])
  params = _params(model)
  loss, aux = model.loss_fn(params, batch, None)
  per_row = [model.loss_fn(params, {**batch, "weights": np.eye(3, dtype=np.float32)[i]}, None)[0] for i in range(3)]
  np.testing.assert_allclose(float(loss), float(2.0 * per_row[0] + 1.2 * per_row[1] + 1.5 * per_row[2]), rtol=1e-5)
  np.testing.assert_allclose(float(aux["denominator"]), 3 * 4.7, rtol=1e-6)
