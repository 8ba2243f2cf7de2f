"""The SASRec second stage (oxyjax/rescoring.py): trained on training sequences only, scores the
beams by the user's history, and refuses a scorer trained on other data."""

import numpy as np
import pytest

from oxyjax import rescoring
from oxyjax.sid import build
from tests.sid.test_build import _fake
from tests.sid.test_sasrec import TINY


@pytest.fixture(scope="module")
def trained():
  ds = _fake()
  seqs = build.training_sequences(ds.train)
  return ds, seqs, rescoring.train(seqs, ds.num_items, TINY, seed=0)


def _features(histories, width=6):
  """The model's left-aligned history features for a list of histories."""
  items = np.zeros((len(histories), width), np.int32)
  for i, h in enumerate(histories):
    items[i, :len(h)] = h
  return items, items > 0


def test_right_aligned_keeps_the_most_recent_items():
  items, mask = _features([(3, 4, 5), (), (1, 2, 3, 4, 5, 6)])
  out = rescoring.right_aligned(items, mask, 4)
  np.testing.assert_array_equal(out, [[0, 3, 4, 5], [0, 0, 0, 0], [3, 4, 5, 6]])


def test_scores_are_a_log_softmax_over_the_catalogue(trained):
  ds, _, scorer = trained
  items, mask = _features([(1, 2, 3), (40, 41)])
  every_item = np.tile(np.arange(1, ds.num_items + 1), (2, 1))
  lp = scorer.log_probs(items, mask, every_item)
  # float32 log-softmax over 60 items: logsumexp is 0 up to a few float32 ulps of the largest logit.
  np.testing.assert_allclose(np.logaddexp.reduce(lp.astype(np.float64), axis=1), 0.0, atol=1e-4)
  # SASRec alone among a pool's items (a scenario's, benchmarks/rerank_eval.py): the pool's k best
  # by these same log-probs, best first (the same network, so the same values up to jit's rounding).
  pool = np.arange(1, ds.num_items + 1, 3)
  top, top_lp = scorer.top_k(items, mask, 5, pool)
  for row in range(2):
    want = pool[np.argsort(-lp[row, pool - 1], kind="stable")[:5]]
    assert set(top[row].tolist()) <= set(pool.tolist())
    np.testing.assert_allclose(top_lp[row], lp[row, want - 1], atol=1e-5)


def test_rescoring_moves_up_the_items_of_the_users_group(trained):
  """Users buy within one of three groups of 19 items. For a history from group g, the scorer
  prefers group-g items; a 'policy' that ranks three other-group items first is corrected by
  re-scoring at a large weight, and left alone at weight 0. A scorer that ignored the history
  (e.g. a misaligned input) would not know the group."""
  _, _, scorer = trained
  histories, groups = [], []
  for g in range(3):
    lo = 1 + g * 19
    histories += [(lo + 1, lo + 5, lo + 9), (lo + 2, lo + 17)]
    groups += [g, g]
  items, mask = _features(histories)
  beams = np.array([[1 + ((g + 1) % 3) * 19 + 3, 1 + ((g + 2) % 3) * 19 + 4, 1 + ((g + 1) % 3) * 19 + 7,
                     1 + g * 19 + 6] for g in groups], np.int32)
  policy = np.tile(np.array([-1.0, -1.5, -2.0, -2.5], np.float32), (len(groups), 1))
  lp = scorer.log_probs(items, mask, beams)
  assert (lp[:, 3] > lp[:, :3].max(axis=1)).all(), lp
  reordered, _ = rescoring.rerank(beams, policy, lp, 10.0)
  np.testing.assert_array_equal(reordered[:, 0], beams[:, 3])
  unchanged, _ = rescoring.rerank(beams, policy, lp, 0.0)
  np.testing.assert_array_equal(unchanged, beams)


def test_rerank_orders_by_the_fused_score_and_keeps_empty_beams_last():
  """The second stage: beams reordered by log p + weight * logit, each row on its own; weight 0
  is the policy's order; an empty beam (item -1, score -inf) never moves above a real one."""
  rng = np.random.default_rng(0)
  items = rng.permutation(np.arange(1, 25)).reshape(3, 8).astype(np.int32)
  logp = -np.sort(rng.exponential(2.0, (3, 8)), axis=1)  # the policy's order: descending
  logits = rng.normal(size=(3, 8))
  items[2, 6:], logp[2, 6:] = -1, -np.inf  # row 2 has two empty beams
  logits[2, 6:] = 50.0  # whatever the second stage says about them
  same, fused0 = rescoring.rerank(items, logp, logits, 0.0)
  np.testing.assert_array_equal(same, items)
  np.testing.assert_array_equal(fused0, logp)
  w = 0.7
  out, fused = rescoring.rerank(items, logp, logits, w)
  for b in range(3):
    live = items[b] > 0
    want = items[b][live][np.argsort(-(logp[b] + w * logits[b])[live], kind="stable")]
    np.testing.assert_array_equal(out[b, :live.sum()], want)
    assert np.all(np.diff(fused[b][np.isfinite(fused[b])]) <= 0)
  np.testing.assert_array_equal(out[2, 6:], [-1, -1])
  # a large weight is the second stage's order
  big, _ = rescoring.rerank(items[:2], logp[:2], logits[:2], 1e6)
  np.testing.assert_array_equal(big, np.take_along_axis(items[:2], np.argsort(-logits[:2], axis=1), 1))
  with pytest.raises(ValueError, match="same"):
    rescoring.rerank(items, logp[:, :4], logits, 1.0)


def test_save_load_round_trip_and_refusals(trained, tmp_path):
  ds, seqs, scorer = trained
  scorer.save(str(tmp_path / "s"))
  loaded = rescoring.SASRecScorer.load(str(tmp_path / "s"), sequences=seqs, num_items=ds.num_items)
  assert loaded.config == scorer.config and loaded.digest == scorer.digest
  items, mask = _features([(1, 2, 3), (40, 41)])
  beams = np.array([[4, 5, 6], [42, 43, 1]])
  np.testing.assert_array_equal(loaded.log_probs(items, mask, beams), scorer.log_probs(items, mask, beams))
  other = [list(s) for s in seqs]
  other[0] = other[0] + [7]
  with pytest.raises(ValueError, match="other training sequences"):
    rescoring.SASRecScorer.load(str(tmp_path / "s"), sequences=other)
  with pytest.raises(ValueError, match="items"):
    rescoring.SASRecScorer.load(str(tmp_path / "s"), num_items=ds.num_items + 1)
  with pytest.raises(ValueError, match="out of range"):
    loaded.log_probs(items, mask, np.array([[ds.num_items + 1]] * 2))


def test_the_digest_keys_the_training_sequences_only():
  """The scorer's key is its training data: the fake dataset's held-out targets are sentinel items
  59 / 60, never in a training sequence, and changing any one training item changes the digest."""
  sa = build.training_sequences(_fake().train)
  assert not {59, 60} & {i for s in sa for i in s}
  changed = [list(s) for s in sa]
  changed[3][-1] = 59
  assert rescoring.sequences_digest(changed) != rescoring.sequences_digest(sa)
  assert rescoring.sequences_digest([list(s) for s in sa]) == rescoring.sequences_digest(sa)


@pytest.mark.parametrize("normalize", ["vocab", "last_valid"])
def test_path_log_probs_are_the_beam_search_scores(normalize):
  """The union scores SASRec's extra items by teacher forcing (`RecModel.path_log_probs`); for
  the beams themselves that must be the score beam search gave them, under the search's
  normalisation: the same log-probability computed two ways (incremental decoding with a cache,
  one teacher-forced pass; under 'last_valid' the last level over the prefix's children, found in
  the row's pool of the forest). Float32 rounding of the two attention orders is ~1e-5 of |logit|
  (the tiny model's logits are scaled up to ~10), summed over 3 levels: we allow 1e-4 relative
  and absolute."""
  import jax
  from tests.rl.conftest import Tiny

  tiny = Tiny()
  batch, _ = tiny.batch(4, seed=1)
  pred = jax.jit(lambda p, b, t: tiny.model.predict(p, b, t, beam_size=8, normalize=normalize))(
      tiny.params, batch, tiny.forest)
  items, scores = np.asarray(pred.items), np.asarray(pred.scores)
  live = items > 0
  assert live.sum() >= 16
  codes = tiny.sid_codes[np.maximum(items, 0)]
  joint = np.asarray(jax.jit(lambda p, b, c, t: tiny.model.path_log_probs(p, b, c, normalize=normalize, trie=t))(
      tiny.params, batch, codes, tiny.forest))
  np.testing.assert_allclose(joint[live], scores[live], rtol=1e-4, atol=1e-4)
  if normalize == "last_valid":  # the option changes the scores: not the joint log-probability
    vocab = np.asarray(jax.jit(tiny.model.path_log_probs)(tiny.params, batch, codes))
    assert (vocab[live] < joint[live] - 1e-3).any()


def _tiny_eval_setup(b=10):
  from oxyjax import partitioning
  from oxyjax.data import pipeline
  from tests.rl.conftest import N_ITEMS, Tiny

  tiny = Tiny()
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 8, b)
  hist = np.zeros((b, 8), np.int32)
  for i, n in enumerate(lengths):
    hist[i, :n] = rng.integers(1, N_ITEMS + 1, n)
  arrays = pipeline.ExampleArrays(history=hist, history_len=lengths, target=rng.integers(1, N_ITEMS + 1, b),
                                  user=np.arange(1, b + 1), scenario=np.zeros(b))
  return tiny, arrays, partitioning.Partitioner({"data": 8})  # the 8 fake CPU devices


def test_the_evaluator_scores_the_second_stage_order():
  """`Evaluator(second_stage=...)` ranks by the second stage's order: reversing the 8 beams moves a
  target at rank r to rank 7 - r. The stage is given the trie the rows were decoded over (the
  evaluator's, or the one a call names: a scenario's pool)."""
  from oxyjax.evaluation import Evaluator

  tiny, arrays, part = _tiny_eval_setup()
  tries = []

  def reverse(params, feats, items, scores, trie):
    tries.append(trie)
    return items[:, ::-1]

  plain = Evaluator(tiny.model, part, tiny.full, beam_size=8, batch_size=4, ks=(1, 5))
  rev = Evaluator(tiny.model, part, tiny.full, beam_size=8, batch_size=4, ks=(1, 5), second_stage=reverse)
  items = np.concatenate([b[1][b[3]] for b in plain.beams(tiny.params, arrays)])  # real rows only
  arrays.target[:] = items[:, 2]  # every target is in the beams, at rank 2
  np.testing.assert_array_equal(plain.target_ranks(tiny.params, arrays), 2)
  np.testing.assert_array_equal(rev.target_ranks(tiny.params, arrays), 5)
  assert tries and all(t is tiny.full for t in tries)
  rev.target_ranks(tiny.params, arrays, trie=tiny.forest)
  assert tries[-1] is tiny.forest


def _scorer_for_tiny():
  from tests.rl.conftest import N_ITEMS

  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(1, N_ITEMS + 1, rng.integers(3, 8))) for _ in range(60)]
  return rescoring.train(seqs, N_ITEMS, TINY, seed=0)


def test_the_rescorer_ranks_beams_and_sasrec_items_by_the_fused_score():
  """The traced second stage (`SecondStage`, also the serving program's) against a NumPy
  reference built from the host-side pieces: the candidates are the beams and SASRec's best 5
  items that are not beams (chosen in Python from `SASRecScorer.top_k`), an extra item's policy
  score is its joint log-prob (`path_log_probs`, checked against beam search's scores below) and a
  beam's its beam score, SASRec's score is `SASRecScorer.log_probs`, and the order is `rerank`'s. Both sides run the
  same float32 networks; the tolerance covers jit-vs-jit reassociation of 3-level sums (1e-4),
  and order is compared only between candidates whose fused scores differ by more than that."""
  from oxyjax.evaluation import Evaluator

  tiny, arrays, part = _tiny_eval_setup()
  scorer = _scorer_for_tiny()
  ev = Evaluator(tiny.model, part, tiny.full, beam_size=8, batch_size=4)
  for feats, items, scores, _ in ev.beams(tiny.params, arrays):
    items, scores = np.asarray(items), np.asarray(scores)
    for weight in (0.0, 1.5, 1e6):
      ref = numpy_second_stage(tiny.model, tiny.params, scorer, tiny.sid_codes, feats, items, scores, 5, weight)
      r = rescoring.Rescorer(tiny.model, rescoring.SecondStage(scorer, weight, 5), tiny.sid_codes, tiny.full, part)
      cand, policy, sas = r.parts(tiny.params, feats, items, scores)
      np.testing.assert_array_equal(cand, ref["cand"])
      np.testing.assert_allclose(policy, ref["policy"], rtol=1e-4, atol=1e-4)
      live = cand > 0
      np.testing.assert_allclose(sas[live], ref["sasrec"][live], rtol=1e-4, atol=1e-4)
      out = r(tiny.params, feats, items, scores)
      assert out.shape == (items.shape[0], 13)
      for row in range(items.shape[0]):
        assert_fused_order(out[row], ref["items"][row], ref["fused"][row], weight)


def numpy_second_stage(model, params, scorer, sid_codes, feats, items, scores, union, weight, pool=None):
  """The second stage from its host-side pieces (the reference for the traced `SecondStage`):
  the candidates are the beams, then SASRec's best ``union`` items among those of ``pool`` (every
  item without one) that are not beams, in SASRec's order (read from its top union + W + 1: every
  such item when there is no pool); an extra item's policy score is its joint log-prob (a beam's
  its beam score), SASRec's `log_probs`, and `rerank`'s order."""
  import jax

  beams = np.maximum(items, 0)
  top, _ = scorer.top_k(feats["history_items"], feats["history_mask"], union + items.shape[1] + 1)
  extra = np.zeros((items.shape[0], union), np.int64)
  for row in range(items.shape[0]):
    ok = [x for x in top[row] if x > 0 and x not in beams[row] and (pool is None or x in pool)][:union]
    extra[row, :len(ok)] = ok
  cand = np.concatenate([beams, extra], axis=1)
  policy = np.concatenate([scores, np.asarray(jax.jit(model.path_log_probs)(params, feats, sid_codes[extra]))], 1)
  policy = np.where(cand > 0, policy, -np.inf)
  sas = scorer.log_probs(feats["history_items"], feats["history_mask"], cand)
  order, fused = rescoring.rerank(cand, policy, sas, weight)
  return {"cand": cand, "policy": policy, "sasrec": sas, "items": order, "fused": fused}


def assert_fused_order(got, want_items, want_fused, weight):
  """``got`` holds the reference's live items, and every pair whose fused scores differ by more
  than float32 rounding of a 3-level joint log-prob plus ``weight`` times SASRec's (1e-4
  relative) is in the reference's order (closer pairs are float ties either way)."""
  got, want_items = np.asarray(got), np.asarray(want_items)
  assert sorted(got[got > 0].tolist()) == sorted(want_items[want_items > 0].tolist())
  pos = {int(x): j for j, x in enumerate(got) if x > 0}
  f = {int(x): float(v) for x, v in zip(want_items, want_fused) if x > 0}
  for a in f:
    for b in f:
      if f[a] > f[b] + 1e-4 * max(1.0, abs(f[a])) * (1 + weight):
        assert pos[a] < pos[b], (weight, a, b, f[a], f[b])


def test_the_second_stage_adds_only_items_of_the_rows_pool():
  """With a forest of pools, SASRec's extra items (it scores the whole catalogue) join only where
  they are items of the row's own pool (`PrefixTrie.find` from the row's root); the stage round
  trips through its checkpoint with its weight and union."""
  import jax
  from tests.rl.conftest import Tiny

  tiny = Tiny()
  scorer = _scorer_for_tiny()
  batch, pools = tiny.batch(6, seed=2)
  pred = jax.jit(lambda p, b, t: tiny.model.predict(p, b, t, beam_size=4))(tiny.params, batch, tiny.forest)
  stage = rescoring.SecondStage(scorer, 1.5, 30)
  fn = jax.jit(lambda *a: stage.apply(tiny.model, *a))
  out, fused = fn(tiny.params, scorer.params, batch, tiny.forest, tiny.sid_codes, pred.items, pred.scores)
  out, fused = np.asarray(out), np.asarray(fused)
  extra_seen = 0
  for row in range(out.shape[0]):
    pool = set(np.asarray(tiny.members[pools[row]]).tolist())
    live = out[row][out[row] > 0]
    assert set(live.tolist()) <= pool and len(set(live.tolist())) == live.size
    extra_seen += live.size - (np.asarray(pred.items)[row] > 0).sum()
    assert np.all(np.diff(fused[row][np.isfinite(fused[row])]) <= 0)
  assert extra_seen > 0  # SASRec did add items (30 of 40 asked: some in each pool)
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    stage.save(d + "/stage")
    back = rescoring.SecondStage.load(d + "/stage")
    assert (back.weight, back.union, back.scorer.digest) == (1.5, 30, scorer.digest)
    with pytest.raises(ValueError, match="weight and union"):
      scorer.save(d + "/bare")
      rescoring.SecondStage.load(d + "/bare")


def test_per_scenario_weights_fuse_each_row_with_its_scenarios_weight(tmp_path):
  """A multi-scenario stage (`scenario_weights`, one weight per scenario id): each row's order and
  fused scores are those of a one-weight stage at its scenario's weight, bit for bit (the same
  float32 product and sum per element), including a weight-0 row, which gets the policy's order;
  the weights round-trip through the stage's checkpoint, and a model of another scenario count or
  a row without a scenario id is refused. `RescoringConfig.scenario_weights` names scenarios,
  in gin as a dict; a name the run does not have is refused."""
  import jax
  from tests.rl.conftest import Tiny

  tiny = Tiny()
  scorer = _scorer_for_tiny()
  batch, _ = tiny.batch(9, seed=4)
  pred = jax.jit(lambda p, b, t: tiny.model.predict(p, b, t, beam_size=4))(tiny.params, batch, tiny.forest)
  parts = jax.jit(lambda *a: rescoring.SecondStage(scorer, 0.0, 5).candidates(tiny.model, *a))(
      tiny.params, scorer.params, batch, tiny.forest, tiny.sid_codes, pred.items, pred.scores)
  weights = (0.0, 1.5, 1e6)
  ids = np.arange(9) % 3
  mixed = rescoring.SecondStage(scorer, 7.0, 5, scenario_weights=weights)
  items, fused = (np.asarray(x) for x in jax.jit(lambda *a: mixed.fuse(*a))(*parts, ids))
  for sid, w in enumerate(weights):
    ref_items, ref_fused = (np.asarray(x) for x in jax.jit(rescoring.SecondStage(scorer, w, 5).fuse)(*parts))
    rows = ids == sid
    np.testing.assert_array_equal(items[rows], ref_items[rows])
    np.testing.assert_array_equal(fused[rows], ref_fused[rows])
  # the weights matter: the rows of weight 0 and 1e6 are ordered differently somewhere
  w0, big = (np.asarray(jax.jit(rescoring.SecondStage(scorer, w, 5).fuse)(*parts)[0]) for w in (0.0, 1e6))
  assert (w0 != big).any()
  with pytest.raises(ValueError, match="scenario id"):
    mixed.fuse(*parts)
  mixed.save(str(tmp_path / "stage"))
  back = rescoring.SecondStage.load(str(tmp_path / "stage"))
  assert back.scenario_weights == weights and back.settings()["scenario_weights"] == list(weights)
  back.check_scenarios(3, "here")
  with pytest.raises(ValueError, match="weights for 3 scenarios, the model 4"):
    back.check_scenarios(4, "here")
  cfg = rescoring.RescoringConfig(weight=1.5, scenario_weights={"search": 0.0})
  assert cfg.enabled and cfg.stage_weights(["home", "search", "i2i"]) == (1.5, 0.0, 1.5)
  assert rescoring.RescoringConfig(weight=1.5).stage_weights(["home", "search"]) == ()
  assert rescoring.RescoringConfig(weight=0.0, scenario_weights={"search": 2.0}).enabled
  with pytest.raises(ValueError, match=r"RescoringConfig.scenario_weights: \['serach'\] not among"):
    rescoring.RescoringConfig(weight=1.5, scenario_weights={"serach": 0.0}).stage_weights(["home", "search"])


def test_the_cli_has_a_flag_for_every_sasrec_setting():
  """`python -m oxyjax.rescoring --dim=... --dropout_rate=...` trains the scorer those settings
  describe: each int / float field of SASRecConfig has a flag of its name, and flags left out
  keep the field's default."""
  import dataclasses

  from absl import flags

  from oxyjax.sid import sasrec

  fv = flags.FlagValues()
  rescoring._define_flags(fv)
  fv(["rescoring", "--dataset=beauty", "--dim=16", "--dropout_rate=0.5", "--num_epochs=3", "--learning_rate=1e-3"])
  assert rescoring._sasrec_config(fv) == dataclasses.replace(
      sasrec.SASRecConfig(), dim=16, dropout_rate=0.5, num_epochs=3, learning_rate=1e-3)
  numeric = {f.name for f in dataclasses.fields(sasrec.SASRecConfig) if isinstance(f.default, (int, float))}
  assert numeric <= set(fv) and "length_buckets" not in fv
