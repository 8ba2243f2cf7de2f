"""Tests for oxyjax.sid.trie.PrefixTrie (layout of docs/design.md, queries, errors)."""

import jax
import numpy as np
import pytest

from oxyjax.sid.trie import PrefixTrie


def random_codes(rng, n, vocab_sizes):
  """n distinct random paths (rows) over the given per-level vocabularies."""
  space = int(np.prod(vocab_sizes))
  flat = rng.choice(space, size=n, replace=False)
  return np.stack(np.unravel_index(flat, vocab_sizes), axis=1).astype(np.int64)


def test_hand_built_layout():
  codes = np.array([[0, 1], [0, 0], [1, 2]])
  items = np.array([5, 7, 3])
  t = PrefixTrie.from_codes(codes, items)
  # nodes: 0 root; 1=[0], 2=[1]; 3=[0,0], 4=[0,1], 5=[1,2]
  np.testing.assert_array_equal(t.child_start, [0, 2, 4, 5, 5, 5, 5])
  np.testing.assert_array_equal(t.child_code, [0, 1, 0, 1, 2])
  np.testing.assert_array_equal(t.child_node, [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(t.leaf_item, [-1, -1, -1, 7, 5, 3])
  assert t.num_levels == 2 and t.max_children == (2, 2) and t.vocab_sizes == (2, 3)
  for a in (t.child_start, t.child_code, t.child_node, t.leaf_item):
    assert a.dtype == np.int32
  assert t.num_items == 3 and t.num_nodes == 6 and t.num_edges == 5


def test_is_a_pytree_with_static_fields():
  t = PrefixTrie.from_codes(np.array([[0, 1], [1, 0]]), np.array([1, 2]), vocab_sizes=(4, 4))
  leaves, treedef = jax.tree_util.tree_flatten(t)
  assert len(leaves) == 4
  t2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert t2.max_children == t.max_children and t2.vocab_sizes == (4, 4)


@pytest.mark.parametrize("seed", range(6))
def test_random_structure_and_queries(seed):
  rng = np.random.default_rng(seed)
  num_levels = int(rng.integers(1, 5))
  vocab = tuple(int(v) for v in rng.integers(2, 9, size=num_levels))
  n = int(rng.integers(1, min(200, int(np.prod(vocab))) + 1))
  codes = random_codes(rng, n, vocab)
  items = rng.permutation(10 * n)[:n] + 1
  t = PrefixTrie.from_codes(codes, items, vocab)

  cs, cc, cn, li = (np.asarray(a) for a in (t.child_start, t.child_code, t.child_node, t.leaf_item))
  assert cs[0] == 0 and cs[-1] == cc.size and (np.diff(cs) >= 0).all()
  # child codes ascend strictly within a node; children are numbered after their parent
  for node in range(t.num_nodes):
    seg = cc[cs[node]:cs[node + 1]]
    assert (np.diff(seg) > 0).all()
    assert (cn[cs[node]:cs[node + 1]] > node).all()
  # leaves are exactly the items, at depth L, and have no children
  assert sorted(li[li >= 0].tolist()) == sorted(items.tolist())
  assert (np.diff(cs)[li >= 0] == 0).all()
  # max_children per depth is attained and never exceeded
  depth = np.zeros(t.num_nodes, int)
  for node in range(t.num_nodes):
    depth[cn[cs[node]:cs[node + 1]]] = depth[node] + 1
  assert (depth[li >= 0] == num_levels).all() and (depth[li < 0] < num_levels).all()
  for d in range(num_levels):
    assert t.max_children[d] == np.diff(cs)[depth == d].max()

  got_codes, got_items = t.paths()
  order = np.argsort(items)
  np.testing.assert_array_equal(got_items, items[order])
  np.testing.assert_array_equal(got_codes, codes[order])
  np.testing.assert_array_equal(t.lookup(codes), items)
  assert t.contains(codes).all()
  # prefixes of real paths are valid, random other paths are not (unless they exist)
  for d in range(num_levels + 1):
    assert t.contains(codes[:, :d]).all()
  other = np.stack([rng.integers(0, v + 1, size=50) for v in vocab], axis=1)
  present = {tuple(r) for r in codes.tolist()}
  expect = np.array([tuple(r) in present for r in other.tolist()])
  np.testing.assert_array_equal(t.contains(other), expect)
  np.testing.assert_array_equal(t.lookup(other) >= 0, expect)
  assert not t.contains(-np.ones((1, num_levels), int)).any()


def test_subset_keeps_vocab_and_only_pool_items():
  rng = np.random.default_rng(1)
  codes = random_codes(rng, 300, (8, 8, 8))
  items = np.arange(1, 301)
  t = PrefixTrie.from_codes(codes, items, (8, 8, 8))
  pool = rng.choice(items, size=40, replace=False)
  s = t.subset(pool)
  assert s.vocab_sizes == t.vocab_sizes
  c, i = s.paths()
  np.testing.assert_array_equal(i, np.sort(pool))
  np.testing.assert_array_equal(c, codes[np.sort(pool) - 1])
  with pytest.raises(ValueError, match="not in the trie"):
    t.subset([1, 99999])


def test_pad_keeps_paths():
  rng = np.random.default_rng(2)
  t = PrefixTrie.from_codes(random_codes(rng, 50, (5, 5, 5)), np.arange(1, 51), (5, 5, 5))
  p = t.pad(t.num_nodes + 7, t.num_edges + 3, (5, 5, 5))
  assert p.num_nodes == t.num_nodes + 7 and p.num_edges == t.num_edges + 3
  assert p.max_children == (5, 5, 5)
  for a, b in zip(t.paths(), p.paths()):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError):
    t.pad(t.num_nodes - 1, t.num_edges)
  with pytest.raises(ValueError):
    t.pad(t.num_nodes, t.num_edges, (1, 1, 1))


def test_construction_errors():
  ok = np.array([[0, 1], [1, 0]])
  with pytest.raises(ValueError, match="share the full path"):
    PrefixTrie.from_codes(np.array([[0, 1], [1, 0], [0, 1]]), np.array([1, 2, 3]))
  with pytest.raises(ValueError, match="out of range"):
    PrefixTrie.from_codes(ok, np.array([1, 2]), vocab_sizes=(2, 1))
  with pytest.raises(ValueError, match="out of range"):
    PrefixTrie.from_codes(np.array([[0, -1], [1, 0]]), np.array([1, 2]))
  with pytest.raises(ValueError, match="more than once"):
    PrefixTrie.from_codes(ok, np.array([4, 4]))
  with pytest.raises(ValueError, match="levels"):
    PrefixTrie.from_codes(ok, np.array([1, 2]), vocab_sizes=(2, 2, 2))
  with pytest.raises(ValueError):
    PrefixTrie.from_codes(ok[0], np.array([1]))
  with pytest.raises(ValueError):
    PrefixTrie.from_codes(ok, np.array([1, 2, 3]))
  with pytest.raises(ValueError):
    PrefixTrie.from_codes(np.zeros((0, 3), int), np.zeros(0, int))
  with pytest.raises(ValueError):
    PrefixTrie.from_codes(ok.astype(float), np.array([1, 2]))


def test_large_catalogue_builds():
  # vectorised build: 300k items x 4 levels (1M takes about a second, see the report)
  rng = np.random.default_rng(3)
  n = 300_000
  c = rng.integers(0, 256, size=(n, 3))
  c = np.unique(c, axis=0)
  codes = np.concatenate([c, np.zeros((c.shape[0], 1), c.dtype)], axis=1)
  items = rng.permutation(c.shape[0]) + 1
  t = PrefixTrie.from_codes(codes, items, (256, 256, 256, 1))
  assert t.num_items == c.shape[0] and t.max_children[3] == 1
  sample = rng.choice(c.shape[0], 1000, replace=False)
  np.testing.assert_array_equal(t.lookup(codes[sample]), items[sample])


def test_find_under_jit_is_lookup_from_each_rows_root():
  """`find` (traced) gives `lookup`'s item for real paths and -1 for others; in a forest, a row
  starting at a pool's root finds only that pool's items (the second stage's pool check)."""
  rng = np.random.default_rng(5)
  codes = random_codes(rng, 200, (8, 6, 5))  # 200 of 240 paths: random others hit and miss
  items = np.arange(1, 201)
  t = PrefixTrie.from_codes(codes, items, (8, 6, 5))
  other = np.stack([rng.integers(0, v, size=60) for v in (8, 6, 5)], axis=1)
  queries = np.concatenate([codes[:60], other]).reshape(4, 30, 3)
  got = jax.jit(lambda tr, c: tr.find(c))(t, queries)
  np.testing.assert_array_equal(np.asarray(got), t.lookup(queries.reshape(-1, 3)).reshape(4, 30))
  pools = [rng.choice(items, size=50, replace=False) for _ in range(2)]
  forest, roots = PrefixTrie.forest([t.subset(p) for p in pools])
  q = np.broadcast_to(codes[None], (2, 200, 3))
  got = np.asarray(jax.jit(lambda tr, c, r: tr.find(c, r))(forest, q, np.asarray(roots)))
  for row, pool in enumerate(pools):
    want = np.where(np.isin(items, pool), items, -1)
    np.testing.assert_array_equal(got[row], want)
