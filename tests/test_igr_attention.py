"""Gathered IGR attention: every implementation against the reference and a NumPy model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.kernels.igr_attention import _batch_mesh_axes
from oxyjax.kernels.igr_attention import full_attention_reference
from oxyjax.kernels.igr_attention import igr_attention
from oxyjax.kernels.igr_attention import igr_attention_reference
from oxyjax.partitioning import Partitioner

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


# ----------------------------------------------------------------------------- default, mesh


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_default_is_xla_on_every_platform(monkeypatch, backend):
  """'auto' (the default, ModelConfig's too) never traces a Pallas kernel, whatever the backend."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  # A history length used by no other test or parameter: igr_attention is a jit, and a trace
  # cached under another (patched) backend would be reused.
  x = make_inputs(9, 2, 19 + ["cpu", "gpu", "tpu"].index(backend), 16, 8, 1, 1, 16)
  jaxpr = str(jax.make_jaxpr(functools.partial(igr_attention, k=3))(*args_of(x)))
  assert "pallas_call" not in jaxpr
  # (sanity: the check sees the kernel when it is asked for)
  jaxpr = str(jax.make_jaxpr(functools.partial(igr_attention, k=3, implementation="pallas", interpret=True))(
      *args_of(x)))
  assert "pallas_call" in jaxpr


def test_batch_mesh_axes():
  assert _batch_mesh_axes(16) == ()  # no mesh: the kernel is called directly
  part = Partitioner({"data": 4, "fsdp": 2})
  with jax.set_mesh(part.mesh):  # no rules context: DEFAULT_RULES, batch -> (data, fsdp, expert)
    assert _batch_mesh_axes(16) == ("data", "fsdp")  # expert has size 1
    assert _batch_mesh_axes(4) == ("data",)  # fsdp no longer divides the batch
    assert _batch_mesh_axes(6) == ()
    with nn.logical_axis_rules((("batch", "fsdp"),)):
      assert _batch_mesh_axes(16) == ("fsdp",)


MESH_B, MESH_K = 16, 8


def _mesh_inputs():
  # B=16 rows: 2 per device on an 8-way batch split. Per row: all valid, fewer valid than K,
  # no valid behaviour at all, more than K valid.
  x = make_inputs(12, MESH_B, 48, 16, 8, 3, 2, 16, valid=[48, 3, 0, 20] * 4)
  # topk_idx is compared exactly: the inputs must not put two distinct float32 scores within
  # rounding of each other among the first K+1 of a row. Scores are cosines (|s| <= 1) from
  # 8-term float32 sums, so the two float32 formulations differ by ~1e-7; require 1e-5.
  s = numpy_igr(x, MESH_K + 1)[2]
  with np.errstate(invalid="ignore"):  # -inf - -inf among padded slots
    gaps = -np.diff(s, axis=1)
  assert np.all(np.isnan(gaps) | (gaps > 1e-5)), np.nanmin(gaps)
  return x


def _sharded(part, x):
  """history, mask, query, keys, q sharded over the batch mesh axes; wk, wv replicated."""
  return tuple(jax.device_put(jnp.asarray(x[n]), part.data_sharding(np.ndim(x[n])) if n not in ("wk", "wv")
                              else part.replicated()) for n in ARGS)


def _collectives(hlo):
  return {c: hlo.count(c + "(") + hlo.count(c + "-start(")
          for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")}


# Tolerances (float32): every output element is a few short float32 contractions (d=16 for
# the projection, Dh=16 for the logits, K=8 for the weighted sum) over O(1) terms, evaluated
# in a different order by the kernel (per head, padded K) than by the reference einsums;
# each sum carries about n * 2^-24 ~ 1e-6 relative rounding. 1e-5 leaves a 10x margin for
# different SIMD widths / FMA use (AVX2 vs AVX-512) without hiding a wrong row or head,
# which is O(1) off. The wk/wv gradients also sum over the 16 rows (across the 8 shards, in
# another order than on one device), hence 1e-4 relative there, as in test_gradients.
# Measured on the CI CPU: outputs within 5e-7, scores 1.2e-7, gradients 4e-6 absolute (the
# wk/wv gradients reach 12 in magnitude, so that is 3e-7 relative).
@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_pallas_under_an_8_device_mesh_matches_reference(variant):
  """Pallas (interpret) through the shard_map wrapper, inside jit, batch sharded data=4 x fsdp=2."""
  part = Partitioner({"data": 4, "fsdp": 2})
  x = _mesh_inputs()
  ref = igr_attention_reference(*args_of(x), k=MESH_K)
  f = jax.jit(functools.partial(igr_attention, k=MESH_K, implementation="pallas", pallas_variant=variant,
                                interpret=True))
  with jax.set_mesh(part.mesh), part.rules_context():
    args = _sharded(part, x)
    compiled = f.lower(*args).compile()
    got = compiled(*args)
  assert_same(got, ref)
  # Each device ran on its own rows: nothing was gathered, the outputs stay batch-sharded.
  # (Without the wrapper the compiled program all-gathers the batch and returns replicated
  # outputs; the 'tpu' variant's interpreter callbacks are pinned to device 0.)
  assert _collectives(compiled.as_text()) == dict.fromkeys(_collectives(""), 0)
  for a in got:
    assert a.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")), a.sharding


def _mesh_loss(fn, kw, ct, ct_s):
  def loss(history, retrieval_query, history_keys, q, wk, wv, mask):
    out, _, scores, sel = fn(history, mask, retrieval_query, history_keys, q, wk, wv, k=MESH_K, **kw)
    # topk_scores is -inf on masked slots: they are left out of the loss.
    return jnp.sum(out * ct) + jnp.sum(jnp.where(sel, scores, 0.0) * ct_s)
  return loss


@pytest.mark.parametrize("mesh", [{"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data4_fsdp2", "data2_fsdp2_tensor2"])
def test_pallas_gradients_under_an_8_device_mesh_match_reference(mesh):
  """Gradients through the shard_map wrapper (forward kernel + XLA custom_vjp backward).

  With tensor=2 the rows are computed twice (the tensor axis does not shard the batch):
  shard_map's transpose must not double the replicated weights' gradients. Both Pallas
  variants share the backward pass; 'gpu' stands for it.
  """
  part = Partitioner(mesh)
  x = _mesh_inputs()
  rng = np.random.default_rng(13)
  ct = jnp.asarray(rng.normal(size=x["q"].shape).astype(np.float32))
  ct_s = jnp.asarray(rng.normal(size=(MESH_B, MESH_K)).astype(np.float32))
  names = ("history", "retrieval_query", "history_keys", "q", "wk", "wv")
  grad = lambda fn, kw: jax.jit(jax.grad(_mesh_loss(fn, kw, ct, ct_s), argnums=tuple(range(6))))
  want = grad(igr_attention_reference, {})(*(jnp.asarray(x[n]) for n in names), jnp.asarray(x["history_mask"]))
  kw = dict(implementation="pallas", pallas_variant="gpu", interpret=True)
  with jax.set_mesh(part.mesh), part.rules_context():
    sharded = dict(zip(ARGS, _sharded(part, x)))
    args = tuple(sharded[n] for n in names) + (sharded["history_mask"],)
    compiled = grad(igr_attention, kw).lower(*args).compile()
    got = compiled(*args)
  # Per-device rows forward and backward: no gather; the only collectives are the all-reduces
  # that sum the replicated wk/wv gradients over the batch shards.
  counts = _collectives(compiled.as_text())
  assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
  for n, a, b_ in zip(names, got, want):
    assert np.abs(np.asarray(b_)).max() > 0, n  # every input gets a gradient (scores reach query/keys)
    rtol = 1e-4 if n in ("wk", "wv") else 1e-5
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=rtol, atol=1e-5, err_msg=n)
