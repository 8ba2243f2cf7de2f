"""Per-scenario candidate pools in one batch (issue 14): a forest of pools (`PrefixTrie.forest`)
and per-row start nodes (`beam_search(..., root=)`): no row ever returns an item outside its
pool, also when one batch mixes pools, and each row's result is the one its pool alone gives."""

import jax
import numpy as np
import pytest

from oxyjax.decoding import beam_search, exhaustive_topk
from oxyjax.sid.trie import PrefixTrie
from tests.test_decoding import PrefixHashLogits

VOCAB = (4, 3, 5)


@pytest.fixture(scope="module")
def pools():
  rng = np.random.default_rng(0)
  space = int(np.prod(VOCAB))
  flat = rng.choice(space, size=50, replace=False)
  codes = np.stack(np.unravel_index(flat, VOCAB), axis=1)
  items = np.arange(1, 51)
  full = PrefixTrie.from_codes(codes, items, VOCAB)
  members = [items[:30], items[20:50], items[10:12], items[7:8]]  # overlapping, disjoint, 2 items, 1 item
  return full, members, [full.subset(m) for m in members]


def _search(fn, trie, batch, beam, root=None):
  run = jax.jit(lambda t, c, r: beam_search(fn.step, c, t, batch_size=batch, beam_size=beam, root=r))
  return jax.tree.map(np.asarray, run(trie, fn.init_cache(batch, trie.num_levels), root))


def test_mixed_batch_returns_only_each_rows_pool_and_its_pools_own_answer(pools):
  full, members, tries = pools
  forest, roots = PrefixTrie.forest(tries)
  row_pool = np.array([0, 1, 2, 3, 1, 0, 3, 2])
  batch, beam = row_pool.size, 12
  fn = PrefixHashLogits(np.random.default_rng(1), batch, VOCAB)
  out = _search(fn, forest, batch, beam, roots[row_pool])
  for b, p in enumerate(row_pool):
    live = out.items[b] >= 0
    assert set(out.items[b][live].tolist()) <= set(members[p].tolist()), (b, p)
    assert live.sum() == min(beam, len(members[p]))  # small pools: empty beams after their items
    assert (out.scores[b][~live] == -np.inf).all()
    alone = _search(fn, tries[p], batch, beam)  # the same rows over this pool's own trie
    np.testing.assert_array_equal(out.items[b], alone.items[b])
    np.testing.assert_allclose(out.scores[b], alone.scores[b], rtol=1e-6)
    if len(members[p]) <= beam:  # beam covers the pool: the exhaustive answer over the pool
      ref_items, _, ref_scores = exhaustive_topk(fn.reference(b), tries[p], beam)
      np.testing.assert_array_equal(out.items[b][live], ref_items[ref_items >= 0])
      np.testing.assert_allclose(out.scores[b][live], ref_scores[ref_items >= 0], rtol=1e-5, atol=1e-5)
  # Starting every row at node 0 (pool 0's root) would break the pool of rows 1, 2, 3, ...
  wrong = _search(fn, forest, batch, beam, np.zeros(batch, np.int32))
  assert any(not set(wrong.items[b][wrong.items[b] >= 0].tolist()) <= set(members[p].tolist())
             for b, p in enumerate(row_pool))


def test_no_root_is_the_single_trie_search(pools):
  full, _, _ = pools
  fn = PrefixHashLogits(np.random.default_rng(2), 3, VOCAB)
  a = _search(fn, full, 3, 8)
  b = _search(fn, full, 3, 8, np.zeros(3, np.int32))
  np.testing.assert_array_equal(a.items, b.items)
  np.testing.assert_array_equal(a.scores, b.scores)


def test_forest_of_padded_tries_and_errors(pools):
  full, members, tries = pools
  padded = [t.pad(t.num_nodes + 5, t.num_edges + 7) for t in tries]
  f1, r1 = PrefixTrie.forest(tries)
  f2, r2 = PrefixTrie.forest(padded)
  fn = PrefixHashLogits(np.random.default_rng(3), 4, VOCAB)
  a = _search(fn, f1, 4, 10, r1[[0, 1, 2, 3]])
  b = _search(fn, f2, 4, 10, r2[[0, 1, 2, 3]])
  np.testing.assert_array_equal(a.items, b.items)
  with pytest.raises(ValueError, match="every pool must share"):
    PrefixTrie.forest([tries[0], PrefixTrie.from_codes(np.zeros((1, 2), np.int32), np.array([1]), (4, 3))])
  with pytest.raises(ValueError, match="at least one"):
    PrefixTrie.forest([])


def test_artifact_pool_forest_and_model_predict_keep_rows_in_their_pools():
  from oxyjax.artifact import ModelArtifact
  from oxyjax.data import pipeline
  from oxyjax.models.rec_model import RecModel
  from oxyjax.sid.table import SIDTable
  from tests import test_train_step as tts

  rng = np.random.default_rng(4)
  n = 24
  codes = np.zeros((n + 1, 3), np.int32)
  codes[1:, :2] = rng.integers(0, 4, (n, 2))
  codes[1:, 2] = np.arange(n)
  table = SIDTable(codes=codes, codebook_sizes=(4, 4, n))
  art = ModelArtifact(model_config=tts.CFG, sid_table=table, raw_item_ids=[""] + [str(i) for i in range(n)],
                      pools={"a": np.arange(1, 9), "b": np.arange(9, n + 1)})
  forest, roots = art.pool_forest(["a", "b"])
  model = RecModel(tts.CFG, codes)
  params = model.init(jax.random.key(0), model.dummy_batch(2))
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params, is_leaf=lambda x: hasattr(x, "unbox"))
  ex = pipeline.ExampleArrays.zeros(4, tts.CFG.max_history)
  ex.history[:, :2] = [[1, 2], [3, 12], [20, 4], [9, 9]]
  ex.history_len[:] = 2
  which = ["a", "b", "b", "a"]
  batch = model.convert_features(ex.with_extras(pool_root=np.array([roots[w] for w in which], np.int32)))
  out = jax.jit(lambda p, b, t: model.predict(p, b, t, beam_size=8))(params, batch, forest)
  for r, w in enumerate(which):
    got = np.asarray(out.items[r])
    assert set(got[got > 0].tolist()) <= set(art.pools[w].tolist()) and (got > 0).sum() == 8
