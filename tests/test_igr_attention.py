"""Gathered IGR attention: every implementation against the reference and a NumPy model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.kernels.igr_attention import full_attention_reference
from oxyjax.kernels.igr_attention import igr_attention
from oxyjax.kernels.igr_attention import igr_attention_reference

IMPLS = {
    "xla_absorb": dict(implementation="xla", absorb=True),
    "xla_project": dict(implementation="xla", absorb=False),
    "xla_auto": dict(implementation="auto"),
    "pallas_gpu": dict(implementation="pallas", pallas_variant="gpu", interpret=True),
    "pallas_tpu": dict(implementation="pallas", pallas_variant="tpu", interpret=True),
}
ARGS = ("history", "history_mask", "retrieval_query", "history_keys", "q", "wk", "wv")


def make_inputs(seed, b, l, d, d_r, tq, h, dh, valid=None, ties=False):
  """Random inputs. valid: per-row number of valid behaviours (scattered positions), or None."""
  rng = np.random.default_rng(seed)
  x = dict(
      history=rng.normal(size=(b, l, d)).astype(np.float32),
      retrieval_query=rng.normal(size=(b, d_r)).astype(np.float32),
      history_keys=rng.normal(size=(b, l, d_r)).astype(np.float32),
      q=rng.normal(size=(b, tq, h, dh)).astype(np.float32),
      wk=(rng.normal(size=(d, h, dh)) / np.sqrt(d)).astype(np.float32),
      wv=(rng.normal(size=(d, h, dh)) / np.sqrt(d)).astype(np.float32),
  )
  mask = np.ones((b, l), bool)
  if valid is not None:
    mask[:] = False
    for i, n in enumerate(valid):
      mask[i, rng.choice(l, size=n, replace=False)] = True
  x["history_mask"] = mask
  if ties:  # one highly relevant key copied to 6 positions: exactly equal top scores
    for i in range(b):
      pos = rng.choice(l, size=min(6, l), replace=False)
      x["history_keys"][i, pos] = x["retrieval_query"][i] + 0.5 * rng.normal(size=d_r).astype(np.float32)
  return x


def args_of(x):
  return tuple(jnp.asarray(x[n]) for n in ARGS)


def numpy_igr(x, k, scale=None):
  """Float64 NumPy model: cosine scores, stable descending sort, masked softmax over K rows."""
  h, m, rq, keys, q, wk, wv = (np.asarray(x[n], np.float64) if n != "history_mask" else x[n] for n in ARGS)
  qn = rq / np.maximum(np.linalg.norm(rq, axis=-1, keepdims=True), 1e-12)
  kn = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
  s = np.where(m, np.einsum("bd,bld->bl", qn, kn), -np.inf)
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  sel_mask = np.take_along_axis(m, idx, 1)
  out = numpy_attend(h, idx, sel_mask, q, wk, wv, scale)
  return out, idx, np.take_along_axis(s, idx, 1), sel_mask


def numpy_attend(h, idx, sel_mask, q, wk, wv, scale=None):
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  xs = np.take_along_axis(h, idx[:, :, None], 1) * sel_mask[:, :, None]
  kk = np.einsum("bkd,dhe->bkhe", xs, wk)
  vv = np.einsum("bkd,dhe->bkhe", xs, wv)
  logits = np.einsum("bqhe,bkhe->bhqk", q, kk) * scale
  logits = np.where(sel_mask[:, None, None, :], logits, -np.inf)
  mx = np.max(logits, -1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0)
  p = np.exp(logits - mx) * sel_mask[:, None, None, :]
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1)
  return np.einsum("bhqk,bkhe->bqhe", p, vv)


def assert_same(got, want, rtol=1e-5, atol=1e-5):
  out, idx, scores, mask = got
  r_out, r_idx, r_scores, r_mask = want
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(r_idx))
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(r_mask))
  np.testing.assert_allclose(np.asarray(scores), np.asarray(r_scores), rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.asarray(out), np.asarray(r_out), rtol=rtol, atol=atol)


# (b, l, d, d_r, tq, h, dh, k, valid, ties)
CASES = {
    "dense": (2, 64, 16, 8, 5, 2, 16, 8, None, False),
    # row 0: all but one behaviour padded; rows 0-1: K > number of valid behaviours
    "padded": (3, 40, 32, 16, 3, 4, 8, 16, [1, 5, 40], False),
    "ties": (2, 48, 16, 8, 2, 1, 32, 5, [30, 48], True),
    "k_eq_l": (1, 16, 16, 4, 4, 2, 16, 16, [9], False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  b, l, d, d_r, tq, h, dh, k, valid, ties = CASES[request.param]
  x = make_inputs(list(CASES).index(request.param), b, l, d, d_r, tq, h, dh, valid, ties)
  return request.param, x, k, igr_attention_reference(*args_of(x), k=k)


def test_reference_matches_numpy(case):
  name, x, k, ref = case
  out, idx, scores, mask = numpy_igr(x, k)
  np.testing.assert_array_equal(np.asarray(ref[1]), idx)  # true top-K, ties -> lower index
  np.testing.assert_array_equal(np.asarray(ref[3]), mask)
  np.testing.assert_allclose(np.asarray(ref[2]), scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ref[0]), out, rtol=1e-4, atol=1e-5)
  n_valid = x["history_mask"].sum(1)
  np.testing.assert_array_equal(np.asarray(ref[3]).sum(1), np.minimum(n_valid, k))
  assert np.all(np.isneginf(np.asarray(ref[2])[~np.asarray(ref[3])]))
  if name == "ties":  # the K boundary falls inside a group of equal scores
    s = numpy_igr(x, k + 1)[2]
    assert np.any(s[:, k - 1] == s[:, k])


@pytest.mark.parametrize("impl", ["xla_absorb", "xla_project", "pallas_gpu", "pallas_tpu"])
def test_impl_matches_reference(case, impl):
  name, x, k, ref = case
  assert_same(igr_attention(*args_of(x), k=k, **IMPLS[impl]), ref)


def test_ties_break_to_lower_index():
  s = np.array([0.5, 0.9, 0.9, 0.1, 0.9, 0.9])
  keys = np.stack([[v, np.sqrt(1 - v * v)] for v in s])[None].astype(np.float32)
  x = make_inputs(0, 1, 6, 8, 2, 1, 1, 16)
  x["history_keys"], x["retrieval_query"] = keys, np.array([[1.0, 0.0]], np.float32)
  for impl in ("xla_auto", "pallas_gpu"):
    _, idx, _, _ = igr_attention(*args_of(x), k=3, **IMPLS[impl])
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2, 4]])


@pytest.mark.parametrize("impl", ["xla_absorb", "xla_project", "pallas_gpu", "pallas_tpu"])
def test_padded_rows_never_contribute(impl):
  x = make_inputs(1, 2, 24, 16, 8, 3, 2, 16, valid=[3, 10])
  k = 8  # > 3 valid in row 0: padded slots are selected but masked
  base = igr_attention(*args_of(x), k=k, **IMPLS[impl])
  y = dict(x)
  y["history"] = np.where(x["history_mask"][:, :, None], x["history"], np.nan).astype(np.float32)
  y["history_keys"] = np.where(x["history_mask"][:, :, None], x["history_keys"], 1e3).astype(np.float32)
  got = igr_attention(*args_of(y), k=k, **IMPLS[impl])
  for a, b_ in zip(got, base):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
  assert np.all(np.isfinite(np.asarray(got[0])))


@pytest.mark.parametrize("impl", ["xla_auto", "pallas_gpu", "pallas_tpu"])
def test_user_without_history_gets_zeros(impl):
  x = make_inputs(2, 2, 16, 16, 8, 2, 2, 16, valid=[0, 4])
  out, _, _, mask = igr_attention(*args_of(x), k=4, **IMPLS[impl])
  assert not np.asarray(mask)[0].any()
  np.testing.assert_array_equal(np.asarray(out)[0], 0.0)
  assert np.abs(np.asarray(out)[1]).sum() > 0


def test_k_equal_l_all_valid_is_full_attention():
  x = make_inputs(3, 2, 32, 16, 8, 5, 2, 16)
  out = igr_attention(*args_of(x), k=32, implementation="xla")[0]
  full = full_attention_reference(*(jnp.asarray(x[n]) for n in ("history", "history_mask", "q", "wk", "wv")))
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-5, atol=1e-5)


def _loss_fn(impl, k, ct):
  def loss(history, retrieval_query, history_keys, q, wk, wv, mask):
    kw = {} if impl == "reference" else IMPLS[impl]
    fn = igr_attention_reference if impl == "reference" else igr_attention
    out = fn(history, mask, retrieval_query, history_keys, q, wk, wv, k=k, **kw)[0]
    return jnp.sum(out * ct)
  return loss


def test_gradients():
  x = make_inputs(4, 2, 20, 16, 8, 3, 2, 16, valid=[12, 4])
  k = 6
  ct = np.random.default_rng(5).normal(size=x["q"].shape).astype(np.float32)
  diff_args = tuple(jnp.asarray(x[n]) for n in ("history", "retrieval_query", "history_keys", "q", "wk", "wv"))
  mask = jnp.asarray(x["history_mask"])
  grads = {}
  # (both Pallas variants share one backward pass; pallas_gpu stands for it)
  for impl in ("reference", "xla_absorb", "xla_project", "pallas_gpu"):
    grads[impl] = jax.jit(jax.grad(_loss_fn(impl, k, ct), argnums=(0, 1, 2, 3, 4, 5)))(*diff_args, mask)
  g_h, g_rq, g_keys = (np.asarray(g) for g in grads["reference"][:3])

  # No gradient to the retrieval space through the hard top-K.
  np.testing.assert_array_equal(g_rq, 0.0)
  np.testing.assert_array_equal(g_keys, 0.0)
  # Zero on every row that is not a selected valid behaviour.
  _, idx, _, sel_mask = numpy_igr(x, k)
  selected = np.zeros(x["history_mask"].shape, bool)
  for i in range(idx.shape[0]):
    selected[i, idx[i][sel_mask[i]]] = True
  assert selected.sum() == 6 + 4
  np.testing.assert_array_equal(g_h[~selected], 0.0)
  assert np.all(np.abs(g_h[selected]).sum(-1) > 0)

  # Selected rows: central finite differences of the float64 NumPy model (fixed selection).
  h64 = x["history"].astype(np.float64)
  rest = [x[n].astype(np.float64) for n in ("q", "wk", "wv")]
  f = lambda h: float(np.sum(numpy_attend(h, idx, sel_mask, *rest) * ct))
  eps = 1e-5
  rng = np.random.default_rng(6)
  for i, j in zip(*np.nonzero(selected)):
    for c in rng.choice(h64.shape[-1], size=3, replace=False):
      hp, hm = h64.copy(), h64.copy()
      hp[i, j, c] += eps
      hm[i, j, c] -= eps
      np.testing.assert_allclose(g_h[i, j, c], (f(hp) - f(hm)) / (2 * eps), rtol=1e-3, atol=1e-4)

  # Every implementation gives the same gradients for history, q, wk, wv.
  for impl, g in grads.items():
    np.testing.assert_array_equal(np.asarray(g[0])[~selected], 0.0, err_msg=impl)
    for a, b_ in zip(g, grads["reference"]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("impl", ["xla_auto", "pallas_gpu"])
def test_inside_outer_jit(impl):
  x = make_inputs(7, 4, 40, 16, 8, 5, 2, 16, valid=[40, 3, 20, 1])
  ref = igr_attention_reference(*args_of(x), k=8)

  @jax.jit
  def f(*a):
    out, idx, scores, mask = igr_attention(*a, k=8, **IMPLS[impl])
    return out * 2.0, idx, scores, mask

  out, idx, scores, mask = f(*args_of(x))
  assert_same((out / 2.0, idx, scores, mask), ref)


def test_bad_arguments():
  x = make_inputs(8, 1, 8, 16, 4, 1, 1, 16)
  with pytest.raises(ValueError, match="k must be"):
    igr_attention(*args_of(x), k=9)
  with pytest.raises(ValueError, match="implementation"):
    igr_attention(*args_of(x), k=2, implementation="cuda")
