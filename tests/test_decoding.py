"""Tests for oxyjax.decoding.beam_search against the brute-force reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.decoding import BeamSearchOutput, beam_search, exhaustive_topk, reorder_cache
from oxyjax.sid.trie import PrefixTrie

HASH_MOD = 997


def random_trie(rng, n, vocab_sizes, skew=False):
  """A trie of n distinct paths; with skew, level-0 codes follow a steep power law."""
  vocab_sizes = tuple(int(v) for v in vocab_sizes)
  space = int(np.prod(vocab_sizes))
  n = min(n, space)
  if skew:
    p = 1.0 / np.arange(1, space + 1) ** 1.5
    flat = rng.choice(space, size=n, replace=False, p=p / p.sum())
  else:
    flat = rng.choice(space, size=n, replace=False)
  codes = np.stack(np.unravel_index(flat, vocab_sizes), axis=1)
  items = rng.permutation(5 * n)[:n] + 1
  return PrefixTrie.from_codes(codes, items, vocab_sizes), codes, items


class IndependentLogits:
  """Logits depend on batch row and level only (not on the prefix, no cache)."""

  def __init__(self, rng, batch, vocab_sizes):
    self.tables = [rng.normal(size=(batch, v)).astype(np.float32) * 2 for v in vocab_sizes]

  def step(self, level, prev_codes, cache):
    b, w = prev_codes.shape
    t = jnp.asarray(self.tables[level])
    return jnp.broadcast_to(t[:, None, :], (b, w, t.shape[-1])), cache

  def init_cache(self, batch, num_levels):
    return ()

  def reference(self, row):
    return lambda level, prefixes: np.broadcast_to(
        self.tables[level][row], (prefixes.shape[0], self.tables[level].shape[1]))


class PrefixHashLogits:
  """Logits are a table row chosen by a hash of (batch row, prefix); the prefix is kept
  in the cache, so a wrong cache reorder gives wrong logits (and wrong scores)."""

  def __init__(self, rng, batch, vocab_sizes):
    self.tables = [rng.normal(size=(HASH_MOD, v)).astype(np.float32) * 2 for v in vocab_sizes]

  @staticmethod
  def _hash(row, prefix_cols):
    h = row * 131 + 7
    for j, c in enumerate(prefix_cols):
      h = (h * 31 + (c + 1) * (j + 3)) % HASH_MOD
    return h

  def init_cache(self, batch, num_levels):
    return {"path": jnp.zeros((batch, 1, num_levels), jnp.int32),
            "row": jnp.arange(batch, dtype=jnp.int32)[:, None],
            "steps": jnp.zeros((batch, 1), jnp.int32)}

  def step(self, level, prev_codes, cache):
    path = cache["path"]
    if level > 0:
      path = path.at[:, :, level - 1].set(prev_codes)
    row = jnp.broadcast_to(cache["row"], prev_codes.shape)
    h = self._hash(row, [path[:, :, j] for j in range(level)])
    logits = jnp.asarray(self.tables[level])[h]
    return logits, {"path": path, "row": cache["row"], "steps": cache["steps"] + 1}

  def reference(self, row):
    def fn(level, prefixes):
      h = self._hash(np.full(prefixes.shape[0], row, np.int64),
                     [prefixes[:, j].astype(np.int64) for j in range(level)])
      return self.tables[level][h]
    return fn


def run_search(step_cls, trie, rng, batch, beam, return_cache=False, normalize="vocab", level_weights=None):
  fn = step_cls(rng, batch, trie.vocab_sizes)
  search = jax.jit(lambda t, c: beam_search(fn.step, c, t, batch_size=batch, beam_size=beam,
                                            return_cache=return_cache, normalize=normalize,
                                            level_weights=level_weights))
  out = jax.tree_util.tree_map(np.asarray, search(trie, fn.init_cache(batch, trie.num_levels)))
  return fn, out


def check_valid(out, trie, batch, beam):
  """Every live beam is a distinct valid path with its own leaf item; empty beams are
  marked; scores are sorted."""
  L = trie.num_levels
  assert out.items.shape == (batch, beam) and out.items.dtype == np.int32
  assert out.codes.shape == (batch, beam, L) and out.codes.dtype == np.int32
  assert out.scores.shape == (batch, beam) and out.scores.dtype == np.float32
  n_items = trie.num_items
  for b in range(batch):
    live = out.scores[b] > -np.inf
    assert (np.diff(out.scores[b][live]) <= 0).all(), "scores not sorted"
    assert live[: live.sum()].all(), "an empty beam precedes a live one"
    assert live.sum() == min(beam, n_items)
    np.testing.assert_array_equal(trie.lookup(out.codes[b][live]), out.items[b][live])
    assert len(set(out.items[b][live].tolist())) == live.sum(), "duplicate item"
    assert (out.items[b][~live] == -1).all() and (out.codes[b][~live] == -1).all()


def check_exact(fn, out, trie, batch, beam, normalize=True, level_weights=None):
  """Beam covering every item: the result is the exhaustive top set with equal scores."""
  for b in range(batch):
    ref_items, ref_codes, ref_scores = exhaustive_topk(fn.reference(b), trie, beam, normalize=normalize,
                                                       level_weights=level_weights)
    live = out.items[b] >= 0
    assert sorted(out.items[b][live].tolist()) == sorted(ref_items[ref_items >= 0].tolist())
    got = dict(zip(out.items[b][live].tolist(), out.scores[b][live].tolist()))
    want = dict(zip(ref_items[ref_items >= 0].tolist(), ref_scores[ref_items >= 0].tolist()))
    for item, s in want.items():
      assert got[item] == pytest.approx(s, rel=1e-5, abs=1e-4)


def check_scores_match_paths(fn, out, trie, batch):
  """Each returned score is its own path's log-probability (also when W < #items)."""
  L = trie.num_levels
  for b in range(batch):
    live = out.items[b] >= 0
    codes = out.codes[b][live]
    total = np.zeros(codes.shape[0])
    ref = fn.reference(b)
    for level in range(L):
      lp = ref(level, codes[:, :level]).astype(np.float64)
      lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
      total += lp[np.arange(codes.shape[0]), codes[:, level]]
    np.testing.assert_allclose(out.scores[b][live], total, rtol=1e-5, atol=1e-4)


# (seed, num_items, vocab_sizes, skew, batch, beam): covers W > #items, W > #level-0
# children, W < #items, single-level tries, skewed tries.
CASES = [
    (0, 40, (4, 3, 5), False, 2, 64),
    (1, 60, (3, 8, 4), True, 3, 60),
    (2, 7, (9,), False, 2, 12),
    (3, 120, (2, 2, 2, 2, 8), True, 1, 128),
    (4, 90, (6, 6, 6), False, 2, 16),
    (5, 200, (5, 10, 6), True, 2, 33),
    (6, 30, (64, 2), False, 1, 50),
    (7, 1, (3, 3), False, 2, 4),
    (8, 200, (3, 40, 2), False, 2, 16),  # more children per beam than beams
    (9, 100, (2, 60), False, 2, 16),  # same, and exact: only 2 prefixes before the last level
]


@pytest.mark.parametrize("step_cls", [IndependentLogits, PrefixHashLogits])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}")
def test_beam_search_valid_and_exact(case, step_cls):
  seed, n, vocab, skew, batch, beam = case
  rng = np.random.default_rng(seed)
  trie, _, _ = random_trie(rng, n, vocab, skew)
  fn, out = run_search(step_cls, trie, rng, batch, beam, return_cache=step_cls is PrefixHashLogits)
  check_valid(out, trie, batch, beam)
  check_scores_match_paths(fn, out, trie, batch)
  # Exact when the beam holds every prefix shorter than L (then no path is ever pruned).
  trie_codes, _ = trie.paths()
  widest = max(len({tuple(r) for r in trie_codes[:, :d].tolist()}) for d in range(trie.num_levels))
  if beam >= widest:
    check_exact(fn, out, trie, batch, beam)
  if step_cls is PrefixHashLogits:
    # the cache recorded the path it was fed: the first L-1 codes of each returned beam
    L = trie.num_levels
    live = out.items >= 0
    np.testing.assert_array_equal(out.cache["path"][..., : L - 1][live], out.codes[..., : L - 1][live])
    assert out.cache["path"].shape == (batch, beam, L)
    assert (out.cache["steps"] == L).all()


@pytest.mark.parametrize("case", CASES[:6] + CASES[8:], ids=lambda c: f"seed{c[0]}")
def test_valid_normalization_is_a_distribution_over_items(case):
  """normalize='valid': each level's softmax runs over the prefix's children, so the
  exhaustive scores of all items sum to 1 (the vocabulary-normalised ones do not), and a
  beam wide enough returns exactly the reference's top set and scores."""
  seed, n, vocab, skew, batch, beam = case
  rng = np.random.default_rng(seed)
  trie, _, _ = random_trie(rng, n, vocab, skew)
  fn, out = run_search(PrefixHashLogits, trie, rng, batch, beam, normalize="valid")
  check_valid(out, trie, batch, beam)
  for b in range(batch):
    items, codes, scores = exhaustive_topk(fn.reference(b), trie, trie.num_items, normalize="valid")
    assert np.exp(scores[items >= 0]).sum() == pytest.approx(1.0, abs=1e-6)
    # differs from the vocabulary-normalised ranking's scores (each level loses the invalid mass)
    _, _, vocab_scores = exhaustive_topk(fn.reference(b), trie, trie.num_items)
    assert np.exp(vocab_scores[vocab_scores > -np.inf]).sum() < 1.0 - 1e-3
  trie_codes, _ = trie.paths()
  widest = max(len({tuple(r) for r in trie_codes[:, :d].tolist()}) for d in range(trie.num_levels))
  if beam >= widest:
    check_exact(fn, out, trie, batch, beam, normalize="valid")


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[9]], ids=lambda c: f"seed{c[0]}")
def test_level_weights_rank_by_the_weighted_sum(case):
  """level_weights: a beam wide enough returns exactly the exhaustive top set under
  sum_l w_l log p_l; weights of 1 give the unweighted search bit for bit; and a weighting
  that changes the ranking changes the result."""
  seed, n, vocab, skew, batch, beam = case
  rng = np.random.default_rng(seed)
  trie, _, _ = random_trie(rng, n, vocab, skew)
  L = trie.num_levels
  weights = tuple([1.0] * (L - 1) + [0.25]) if L > 1 else (0.5,)
  fn, out = run_search(PrefixHashLogits, trie, np.random.default_rng(seed), batch, beam, level_weights=weights)
  check_valid(out, trie, batch, beam)
  trie_codes, _ = trie.paths()
  widest = max(len({tuple(r) for r in trie_codes[:, :d].tolist()}) for d in range(L))
  assert beam >= widest  # these cases search exactly
  check_exact(fn, out, trie, batch, beam, level_weights=weights)
  _, ones = run_search(PrefixHashLogits, trie, np.random.default_rng(seed), batch, beam, level_weights=(1.0,) * L)
  _, plain = run_search(PrefixHashLogits, trie, np.random.default_rng(seed), batch, beam)
  np.testing.assert_array_equal(ones.items, plain.items)
  np.testing.assert_array_equal(ones.scores, plain.scores)
  assert not np.array_equal(out.scores, plain.scores)


def test_level_weights_are_checked():
  trie, _, _ = random_trie(np.random.default_rng(0), 10, (3, 4), False)
  for bad in [(1.0,), (1.0, -1.0), (1.0, float("nan"))]:
    with pytest.raises(ValueError, match="level_weights"):
      run_search(PrefixHashLogits, trie, np.random.default_rng(0), 1, 4, level_weights=bad)


def test_valid_normalization_only_child_scores_zero():
  """A trie where every item is its prefix's only child at the last level: that level
  contributes 0 under 'valid' and log p(code) < 0 under 'vocab'."""
  codes = np.array([[0, 1], [1, 0], [2, 1]], np.int32)
  trie = PrefixTrie.from_codes(codes, np.array([1, 2, 3]), (3, 2))
  logits = [jnp.log(jnp.array([0.5, 0.3, 0.2])), jnp.log(jnp.array([0.5, 0.5]))]

  def step(level, prev, cache):
    return jnp.broadcast_to(logits[level], prev.shape + logits[level].shape), cache

  for normalize, want in [("valid", np.log([0.5, 0.3, 0.2])), ("vocab", np.log([0.25, 0.15, 0.1]))]:
    out = beam_search(step, None, trie, batch_size=1, beam_size=3, normalize=normalize)
    np.testing.assert_array_equal(np.asarray(out.items[0]), [1, 2, 3])
    np.testing.assert_allclose(np.asarray(out.scores[0]), want, rtol=1e-5)
  with pytest.raises(ValueError, match="normalize"):
    beam_search(step, None, trie, batch_size=1, beam_size=3, normalize="softmax")


def test_beam_512_on_a_bigger_trie():
  rng = np.random.default_rng(11)
  trie, _, _ = random_trie(rng, 700, (16, 16, 8), skew=True)
  fn, out = run_search(PrefixHashLogits, trie, rng, 2, 512)
  check_valid(out, trie, 2, 512)
  check_scores_match_paths(fn, out, trie, 2)
  small, _, _ = random_trie(rng, 300, (8, 8, 8))
  fn, out = run_search(PrefixHashLogits, small, rng, 1, 512)
  check_valid(out, small, 1, 512)
  check_exact(fn, out, small, 1, 512)


def test_eager_matches_jit():
  rng = np.random.default_rng(5)
  trie, _, _ = random_trie(rng, 12, (4, 4))
  fn = PrefixHashLogits(rng, 2, trie.vocab_sizes)
  eager = beam_search(fn.step, fn.init_cache(2, 2), trie, batch_size=2, beam_size=8)
  jitted = jax.jit(lambda t, c: beam_search(fn.step, c, t, batch_size=2, beam_size=8))(
      trie, fn.init_cache(2, 2))
  assert isinstance(eager, BeamSearchOutput)
  np.testing.assert_array_equal(eager.items, jitted.items)
  np.testing.assert_allclose(eager.scores, jitted.scores, rtol=1e-6)


def test_subset_trie_returns_only_pool_items_without_recompiling():
  rng = np.random.default_rng(8)
  trie, codes, items = random_trie(rng, 150, (6, 6, 6))
  fn = PrefixHashLogits(rng, 2, trie.vocab_sizes)
  traces = []

  @jax.jit
  def search(t, cache):
    traces.append(1)
    return beam_search(fn.step, cache, t, batch_size=2, beam_size=24)

  pools = [rng.choice(items, size=20, replace=False) for _ in range(3)]
  subs = [trie.subset(p) for p in pools]
  nodes = max(s.num_nodes for s in subs)
  edges = max(s.num_edges for s in subs)
  mc = tuple(np.max([s.max_children for s in subs], axis=0).tolist())
  for pool, sub in zip(pools, subs):
    padded = sub.pad(nodes, edges, mc)
    out = jax.tree_util.tree_map(np.asarray, search(padded, fn.init_cache(2, 3)))
    check_valid(out, sub, 2, 24)
    assert set(out.items[out.items >= 0].tolist()) <= set(pool.tolist())
    check_exact(fn, out, sub, 2, 24)
  assert len(traces) == 1


def test_minus_inf_logits_forbid_paths():
  rng = np.random.default_rng(9)
  trie, codes, items = random_trie(rng, 40, (4, 5, 3))
  banned = 2  # level-0 code a business rule forbids

  def step(level, prev, cache):
    b, w = prev.shape
    logits = jnp.zeros((b, w, trie.vocab_sizes[level]))
    if level == 0:
      logits = logits.at[..., banned].set(-jnp.inf)
    return logits, cache

  out = jax.jit(lambda t: beam_search(step, (), t, batch_size=1, beam_size=64))(trie)
  allowed = set(items[codes[:, 0] != banned].tolist())
  live = np.asarray(out.items[0]) >= 0
  assert set(np.asarray(out.items[0])[live].tolist()) == allowed
  assert np.isneginf(np.asarray(out.scores[0])[~live]).all()


def test_wider_model_vocabulary_is_accepted():
  rng = np.random.default_rng(4)
  trie, _, _ = random_trie(rng, 30, (4, 5, 3))
  fn = IndependentLogits(rng, 1, (9, 9, 9))  # one vocabulary size for every level
  out = jax.tree_util.tree_map(np.asarray, jax.jit(
      lambda t: beam_search(fn.step, (), t, batch_size=1, beam_size=32))(trie))
  check_valid(out, trie, 1, 32)
  check_exact(fn, out, trie, 1, 32)


def test_bad_logits_shape_raises():
  trie, _, _ = random_trie(np.random.default_rng(0), 10, (4, 4))
  step = lambda level, prev, cache: (jnp.zeros(prev.shape + (3,)), cache)
  with pytest.raises(ValueError, match="logits"):
    beam_search(step, (), trie, batch_size=1, beam_size=4)


def test_reorder_cache_broadcasts_and_gathers():
  cache = {"a": jnp.arange(6).reshape(2, 3), "b": jnp.arange(12.0).reshape(2, 3, 2)}
  parent = jnp.array([[2, 0], [1, 1]])
  out = reorder_cache(cache, parent)
  np.testing.assert_array_equal(out["a"], [[2, 0], [4, 4]])
  np.testing.assert_array_equal(out["b"][1], [[8.0, 9.0], [8.0, 9.0]])
  one = reorder_cache({"x": jnp.array([[5], [7]])}, jnp.zeros((2, 3), jnp.int32))
  np.testing.assert_array_equal(one["x"], [[5, 5, 5], [7, 7, 7]])


def collision_trie(rng, num_prefixes, num_shared, prefix_vocab=(8, 8), max_group=4):
  """A SID-table-like trie: distinct (L-1)-code prefixes, each with collision index 0, and
  `num_shared` of them with 2..max_group items (collision indices 0..n-1), as when the last
  level tells apart the items whose first codes collide."""
  space = int(np.prod(prefix_vocab))
  flat = rng.choice(space, size=num_prefixes, replace=False)
  prefixes = np.stack(np.unravel_index(flat, prefix_vocab), axis=1)
  sizes = np.ones(num_prefixes, int)
  sizes[rng.choice(num_prefixes, size=num_shared, replace=False)] = rng.integers(2, max_group + 1, num_shared)
  codes = np.concatenate([np.concatenate([np.repeat(p[None], n, 0), np.arange(n)[:, None]], 1)
                          for p, n in zip(prefixes, sizes)])
  items = rng.permutation(3 * len(codes))[:len(codes)] + 1
  return PrefixTrie.from_codes(codes, items, tuple(prefix_vocab) + (max_group,)), sizes


def widest_prefix_level(trie):
  trie_codes, _ = trie.paths()
  return max(len({tuple(r) for r in trie_codes[:, :d].tolist()}) for d in range(trie.num_levels))


@pytest.mark.parametrize("shared", [3, 40], ids=["few_siblings", "many_siblings"])
@pytest.mark.parametrize("beam", [16, 64])
def test_last_valid_normalization_matches_the_reference(shared, beam):
  """normalize='last_valid': the vocabulary's log-softmax at every level but the last, the
  prefix's children's at the last. The step depends on the cached prefix (PrefixHashLogits),
  so a wrong gather of the beams the last step runs on gives wrong scores. With few beams that
  have siblings the last step runs on a gathered quarter of the beams, with many on all of them
  (`_last_level_logits`); both must give every beam its reference score, and a beam wide enough
  the exhaustive top set."""
  rng = np.random.default_rng(11)
  trie, _ = collision_trie(rng, 50, shared)
  fn, out = run_search(PrefixHashLogits, trie, rng, 2, beam, normalize="last_valid")
  check_valid(out, trie, 2, beam)
  for b in range(2):
    ref = fn.reference(b)
    live = out.items[b] >= 0
    codes = out.codes[b][live]
    want = np.zeros(codes.shape[0])
    for level in range(trie.num_levels):
      logits = ref(level, codes[:, :level]).astype(np.float64)
      if level == trie.num_levels - 1:  # over the prefix's children only
        siblings = [trie.paths()[0][np.all(trie.paths()[0][:, :level] == c[:level], axis=1), level] for c in codes]
        allowed = np.zeros(logits.shape, bool)
        for i, sib in enumerate(siblings):
          allowed[i, sib] = True
        logits = np.where(allowed, logits, -np.inf)
      want += _np_log_softmax(logits)[np.arange(len(codes)), codes[:, level]]
    np.testing.assert_allclose(out.scores[b][live], want, rtol=1e-5, atol=1e-4)
  if beam >= widest_prefix_level(trie):
    check_exact(fn, out, trie, 2, beam, normalize="last_valid")
  # the same search returning its cache runs the last step on every beam: the same answer
  full = jax.tree_util.tree_map(np.asarray, jax.jit(lambda t, c: beam_search(
      fn.step, c, t, batch_size=2, beam_size=beam, return_cache=True, normalize="last_valid"))(
          trie, fn.init_cache(2, trie.num_levels)))
  np.testing.assert_array_equal(full.items, out.items)
  np.testing.assert_allclose(full.scores, out.scores, rtol=1e-6, atol=1e-6)


def _np_log_softmax(x):
  m = np.max(np.where(np.isfinite(x), x, -1e30), axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


@pytest.mark.parametrize("normalize", ["valid", "last_valid"])
def test_the_last_step_runs_on_the_beams_with_siblings_only_when_few_have_them(normalize):
  """The last level's step gets ceil(w / 4) rows when no batch row has more beams with
  siblings than that, ceil(w / 2) when none has more than that, and all w rows otherwise; the
  step records the rows it ran on (a host callback, so only the branch that ran records). With as
  many prefixes as beams every prefix is a beam at the last level, so a row has exactly `shared`
  beams with siblings. A 'vocab' search runs every beam."""
  beam = 32
  for shared, want_rows in [(2, 8), (8, 8), (9, 16), (16, 16), (17, 32)]:
    trie, _ = collision_trie(np.random.default_rng(shared), beam, shared)
    seen = []

    def step(level, prev, cache, seen=seen, trie=trie):
      if level == trie.num_levels - 1:
        jax.debug.callback(lambda n: seen.append(int(n)), prev.shape[1])
      return jnp.zeros(prev.shape + (trie.vocab_sizes[level],)) + prev[..., None] * 0.1, cache

    out = jax.jit(lambda t: beam_search(step, (), t, batch_size=2, beam_size=beam, normalize=normalize))(trie)
    jax.block_until_ready(out.items)
    jax.effects_barrier()
    assert seen == [want_rows], (shared, seen)
    out = jax.tree_util.tree_map(np.asarray, out)
    check_valid(out, trie, 2, beam)
  seen.clear()
  out = jax.jit(lambda t: beam_search(step, (), t, batch_size=2, beam_size=beam))(trie)
  jax.block_until_ready(out.items)
  jax.effects_barrier()
  assert seen == [beam]


def test_normalize_is_checked():
  trie, _, _ = random_trie(np.random.default_rng(0), 10, (4, 4))
  step = lambda level, prev, cache: (jnp.zeros(prev.shape + (4,)), cache)
  with pytest.raises(ValueError, match="normalize"):
    beam_search(step, (), trie, batch_size=1, beam_size=4, normalize="last")
