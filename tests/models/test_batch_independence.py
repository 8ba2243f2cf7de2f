"""Inference is batch-independent: a row's top-K items and scores from `RecModel.predict`
(constrained beam search) are the same alone and inside any batch, for a dense and an MoE model.

The MoE case is the one that can fail: routing groups that span several rows let one row's
tokens lose their expert slots to other rows (issue 13: a row scored alone, then placed last
in a batch of 32 similar rows, lost all 8 of its tokens' expert output). The neighbours here
are copies of the row itself, which choose exactly the same experts for every token, so they
compete for the same slots as hard as any neighbours can; padding rows (all-zero examples,
as `pipeline.eval_batches` pads the last batch) are routed too and take slots in grouped
routing. `test_training_routing_would_drop_the_rows_tokens` shows that this setup does make
the grouped, capacity-limited (training-mode) routing drop the row's tokens, so the
comparison below would catch any grouping or capacity at inference.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from oxyjax.models.encoder_decoder import EncoderDecoder
from oxyjax.models.rec_model import RecModel
from oxyjax.sid.trie import PrefixTrie
from tests import test_train_step as tts

DENSE = dataclasses.replace(tts.CFG, dropout_rate=0.0)  # D 32, 2 x 16 heads, M 64, 1 + 1 layers, history 8
# Top-2 of 8 experts in every layer; the default routing group (512 tokens) spans up to 64 rows of 8.
MOE = dataclasses.replace(DENSE, num_experts=8, num_experts_per_token=2)
CONFIGS = {"dense": DENSE, "moe": MOE}

NUM_ITEMS = 40
# Exhaustive beams (every item's path survives every level): the beam search itself prunes
# nothing, so a near-tie at an intermediate level cannot change which prefixes survive (a
# legitimate, rounding-driven discontinuity), and every item's score is compared.
BEAM = NUM_ITEMS
HISTORY_LENGTHS = (8, 8, 5, 3, 1, 8)  # full, short (padding behaviours) and one-item histories
CROWD = 32

# Tolerance on scores. Batched and unbatched runs compute the same float32 expressions, but
# XLA:CPU picks its dot kernels and blockings by shape (a [1, D] row is a matrix-vector
# product, a [32 * 40, D] block a tiled GEMM; AVX2 and AVX-512 have different vector widths),
# so a dot product of length n may be summed in another order: a relative difference of about
# sqrt(n) * eps (rounding errors add like a random walk; n * eps is the worst case). Here
# n <= 64 (D = 32, M = 64, heads * head_dim = 32). An error passes roughly unchanged through
# each of the ~17 matmuls on the way to a score (encoder: q, k, v, out, wi, wo; decoder: the
# same for self- and cross-attention and the FFN; the output projection) and through
# log_softmax (1-Lipschitz in the max norm); a score is a sum of L = 3 log-probabilities of
# magnitude ~|score|. With a safety factor of 8 for the worst-case-vs-random-walk gap:
#   tol = 8 * 17 * sqrt(64) * eps32 * (1 + |score|)  ~= 1.3e-4 * (1 + |score|).
# Measured (XLA:CPU, this setup): at most 2.3e-7 * (1 + |score|), a few ulps, far inside;
# the batch coupling this test is about moved scores by ~0.2 (before the fix: 40 of 40 scores
# of a row in the 9-row batch off by up to 0.22). The routing choice itself is discontinuous:
# a token whose k-th and (k+1)-th router logits were within ~1e-6 could switch experts under
# rounding. The fixed seeds here are far from that: over every token the exhaustive search
# feeds the MoE layers (8 encoder tokens per row, BOS/INSTR and every item's prefix in the
# decoder), the smallest such margin is 2.7e-3 (the padding row's all-zero tokens tie
# exactly, and are computed exactly, so their tie-break cannot change).
EPS32 = float(np.finfo(np.float32).eps)
REL_TOL = 8 * 17 * np.sqrt(64) * EPS32


def _codes():
  rng = np.random.default_rng(0)
  flat = rng.choice(8 ** 3, NUM_ITEMS, replace=False)  # distinct 3-level paths, 8 codes per level
  paths = np.stack(np.unravel_index(flat, (8, 8, 8)), axis=1).astype(np.int32)
  return np.concatenate([np.zeros((1, 3), np.int32), paths])


def _rows(model):
  """The test rows (left-aligned histories of HISTORY_LENGTHS) and one padding row, as features."""
  rng = np.random.default_rng(1)
  s = model.config.max_history
  hist = np.zeros((len(HISTORY_LENGTHS) + 1, s), np.int32)  # the last row is padding (all zeros)
  for i, n in enumerate(HISTORY_LENGTHS):
    hist[i, :n] = rng.integers(1, NUM_ITEMS + 1, n)
  target = np.concatenate([rng.integers(1, NUM_ITEMS + 1, len(HISTORY_LENGTHS)), [0]])
  weights = np.concatenate([np.ones(len(HISTORY_LENGTHS)), [0.0]]).astype(np.float32)
  return model.convert_features({"history": hist, "target": target, "scenario": np.zeros(len(hist))}, weights)


def _take(rows, index):
  return {k: v[np.asarray(index)] for k, v in rows.items()}


def _build(name):
  """(model, params, trie, rows) for CONFIGS[name], random init."""
  cfg = CONFIGS[name]
  codes = _codes()
  model = RecModel(cfg, codes)
  params = nn.unbox(jax.jit(lambda r: model.init(r, model.dummy_batch(2)))(jax.random.key(0)))
  trie = PrefixTrie.from_codes(codes[1:], np.arange(1, NUM_ITEMS + 1), model.config.sid_vocab_sizes)
  return model, params, trie, _rows(model)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def setup(request):
  return _build(request.param)


def _assert_same_ranking(got_items, got_scores, want_items, want_scores, where):
  """Scores within the tolerance; items equal rank by rank, except inside clusters of
  near-tied scores (consecutive gaps <= 2 * tol), where only the set of items must match."""
  want_scores = np.asarray(want_scores, np.float64)
  tol = REL_TOL * (1.0 + np.abs(want_scores))
  assert np.all(np.isfinite(want_scores)), where  # exhaustive beams: every beam holds an item
  np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=tol.max(), err_msg=where)
  gap = -np.diff(want_scores)
  cluster = np.concatenate([[0], np.cumsum(gap > 2 * np.maximum(tol[1:], tol[:-1]))])
  for c in np.unique(cluster):
    at = cluster == c
    if at.sum() == 1:
      assert got_items[at][0] == want_items[at][0], (where, np.flatnonzero(at))
    else:
      assert sorted(got_items[at]) == sorted(want_items[at]), (where, np.flatnonzero(at))


def test_predict_is_batch_independent(setup):
  """Each row alone == the same row in a mixed batch with padding rows, and last in a crowd of
  31 copies of itself, the other rows and padding (batch sizes 1, 9 and 32)."""
  model, params, trie, rows = setup
  predict = jax.jit(lambda p, b, t: model.predict(p, b, t, beam_size=BEAM))
  n, pad = len(HISTORY_LENGTHS), len(HISTORY_LENGTHS)  # index `pad` is the padding row
  alone = [jax.device_get(predict(params, _take(rows, [i]), trie)) for i in range(n)]

  # A mixed batch: every row once, shuffled, with padding rows first, between and last.
  order = [pad, 3, 0, 5, pad, 1, 4, 2, pad]
  mixed = jax.device_get(predict(params, _take(rows, order), trie))
  for pos, i in enumerate(order):
    if i != pad:
      _assert_same_ranking(mixed.items[pos], mixed.scores[pos], alone[i].items[0], alone[i].scores[0],
                           f"row {i} at position {pos} of the mixed batch")

  # Crowds: row i last, behind copies of itself (the same experts for every token), the
  # other rows and two padding rows.
  for i in range(n):
    others = [j for j in range(n) if j != i]
    crowd = [i] * (CROWD - len(others) - 3) + others + [pad, pad, i]
    assert len(crowd) == CROWD
    out = jax.device_get(predict(params, _take(rows, crowd), trie))
    for pos in (0, CROWD - 1):
      _assert_same_ranking(out.items[pos], out.scores[pos], alone[i].items[0], alone[i].scores[0],
                           f"row {i} at position {pos} of a crowd of {CROWD}")


def _moe_outputs(model, params, batch, deterministic):
  """Teacher-forced forward; the MoE layers' outputs {layer: [B, T, D]} (every layer is MoE)."""
  _, state = model.network.apply({"params": params}, batch, deterministic=deterministic,
                                 capture_intermediates=True, mutable=["intermediates"])
  names = [f"encoder_layers_{j}" for j in range(model.config.num_encoder_layers)]
  names += [f"decoder_layers_{j}" for j in range(model.config.num_decoder_layers)]
  return {name: state["intermediates"][name]["mlp"]["__call__"][0] for name in names}


def test_training_routing_would_drop_the_rows_tokens(setup):
  """The crowd setup exercises capacity: with grouped, capacity-limited routing (training mode,
  deterministic=False; dropout is 0) the last row of a crowd of copies of itself loses expert
  output (tokens dropped by all their choices get exactly 0) that it keeps alone, while with
  inference routing its MoE outputs are the same alone and in the crowd and none is dropped."""
  model, params, trie, rows = setup
  if not model.config.num_experts:
    pytest.skip("dense: no routing")
  i = 0  # a full history: 8 encoder tokens, 3 decoder tokens
  crowd = _take(rows, [i] * CROWD)
  alone = _take(rows, [i])
  jitted = jax.jit(_moe_outputs, static_argnums=(0, 3))
  fwd = lambda *args: jax.device_get(jitted(*args))
  train_alone, train_crowd = fwd(model, params, alone, False), fwd(model, params, crowd, False)
  dropped_alone = sum(int(np.all(y[0] == 0, axis=-1).sum()) for y in train_alone.values())
  dropped_crowd = sum(int(np.all(y[-1] == 0, axis=-1).sum()) for y in train_crowd.values())
  assert dropped_crowd > dropped_alone, (dropped_alone, dropped_crowd)
  assert max(np.abs(train_crowd[k][-1] - train_alone[k][0]).max() for k in train_alone) > 1e-2

  eval_alone, eval_crowd = fwd(model, params, alone, True), fwd(model, params, crowd, True)
  for name, y in eval_alone.items():
    assert not np.any(np.all(y[0] == 0, axis=-1)), f"{name}: a token was dropped at inference"
    scale = np.abs(y[0]).max()
    np.testing.assert_allclose(eval_crowd[name][-1], y[0], rtol=0, atol=REL_TOL * scale, err_msg=name)
