"""The RQ-VAE quantiser (TIGER) and LETTER's collaborative and diversity terms (oxyjax/sid/rq_vae.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oxyjax.sid import build, rq_vae
from tests.sid.test_build import FakeDataset, _FakeEncoder, _fake

# A few hundred steps of a small model: enough to learn planted groups, quick on a CPU.
SMALL = dataclasses.replace(rq_vae.TIGER, latent_dim=8, hidden_dims=(32,), num_steps=200, batch_size=64,
                            refresh_every=20, sinkhorn_iters=30)


def _log_softmax(a):
  a = a - a.max(-1, keepdims=True)
  return a - np.log(np.exp(a).sum(-1, keepdims=True))


def test_quantize_with_argmin_is_residual_nearest_codeword():
  """NumPy reference: at each level the nearest codeword to the residual, then subtract it."""
  rng = np.random.default_rng(0)
  z, books = rng.normal(size=(50, 6)), rng.normal(size=(3, 7, 6))
  codes, words, residuals = rq_vae.quantize(jnp.asarray(z, jnp.float32), jnp.asarray(books, jnp.float32))
  r = z.copy()
  for level in range(3):
    k = np.argmin(((r[:, None, :] - books[level][None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(codes[:, level]), k)
    # float32 against float64 on O(1) values: differences of a few ulps of the operands.
    np.testing.assert_allclose(np.asarray(residuals[level]), r, atol=1e-5)
    np.testing.assert_allclose(np.asarray(words[level]), books[level][k], atol=1e-6)
    r = r - books[level][k]


def test_sinkhorn_assignment_spreads_a_hub():
  """Every point is nearest to code 0; argmin puts them all there. The balanced plan gives each of
  the 8 codes an equal mass; rounding it by argmax is not exactly balanced, but no code keeps more
  than 3/8 of the points and at least 6 codes are used."""
  rng = np.random.default_rng(0)
  books = np.concatenate([np.zeros((1, 4)), 5.0 + rng.normal(size=(7, 4))])
  z = 0.1 * rng.normal(size=(64, 4))
  d = ((z[:, None] - books[None]) ** 2).sum(-1)
  assert set(np.asarray(rq_vae.sinkhorn_assign(jnp.asarray(d), 0.0, 50)).tolist()) == {0}
  counts = np.bincount(np.asarray(rq_vae.sinkhorn_assign(jnp.asarray(d, jnp.float32), 0.05, 200)), minlength=8)
  assert counts.max() <= 24 and (counts > 0).sum() >= 6, counts


def test_cf_loss_matches_numpy_and_ignores_rows_without_a_collaborative_embedding():
  rng = np.random.default_rng(1)
  zq, cf = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  w = np.array([1, 1, 0, 1, 0, 1], np.float32)
  ref = -np.sum(np.diag(_log_softmax(zq @ cf.T)) * w) / w.sum()
  got = rq_vae.cf_loss(jnp.asarray(zq, jnp.float32), jnp.asarray(cf, jnp.float32), jnp.asarray(w))
  assert float(got) == pytest.approx(ref, rel=1e-5)


def test_diversity_loss_pulls_towards_the_other_codeword_of_the_group():
  """Groups of two codewords make the positive deterministic (the partner); a codeword alone in
  its group has no positive and its rows do not count."""
  rng = np.random.default_rng(2)
  book = rng.normal(size=(5, 3))
  groups = np.array([0, 0, 1, 1, 2])  # codeword 4 is alone
  codes = np.array([0, 1, 2, 3, 4, 0])
  partner = {0: 1, 1: 0, 2: 3, 3: 2}
  sim = book[codes] @ book.T
  sim[np.arange(len(codes)), codes] = -1e9
  logp = _log_softmax(sim)
  rows = [i for i, c in enumerate(codes) if c in partner]
  ref = -np.mean([logp[i, partner[codes[i]]] for i in rows])
  got = rq_vae.diversity_loss(jnp.asarray(book, jnp.float32), jnp.asarray(codes), jnp.asarray(groups),
                              jax.random.PRNGKey(0))
  assert float(got) == pytest.approx(ref, rel=1e-5)


def _planted(n_per=40, groups=4, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.normal(size=(groups, dim))
  label = np.repeat(np.arange(groups), n_per)
  return (centres[label] + 0.3 * rng.normal(size=(label.size, dim))).astype(np.float32), label


def _purity(codes, label):
  """Item-weighted majority-label fraction of the level-1 clusters."""
  return sum(np.bincount(label[codes == c]).max() for c in np.unique(codes)) / len(codes)


def test_fit_codes_learns_planted_groups_and_is_deterministic():
  x, label = _planted()
  codes, info = rq_vae.fit_codes(x, num_levels=2, codebook_size=4, config=SMALL, seed=0)
  assert codes.shape == (160, 2) and codes.dtype == np.int32
  assert _purity(codes[:, 0], label) >= 0.9  # chance: 0.25
  assert info["codes_used"][0] == 4 and info["loss_log"][-1]["recon"] < info["loss_log"][0]["recon"]
  again, _ = rq_vae.fit_codes(x, num_levels=2, codebook_size=4, config=SMALL, seed=0)
  np.testing.assert_array_equal(codes, again)


def test_the_collaborative_term_pulls_codes_towards_the_collaborative_groups():
  """The content ``x`` is structureless noise; the collaborative rows carry 4 planted groups. Without
  the collaborative term the level-1 codes are unrelated to the groups (purity near chance, 0.25);
  with a strong one they follow them."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(160, 16)).astype(np.float32)
  b = np.tile(np.arange(4), 40)
  dirs = rng.normal(size=(4, SMALL.latent_dim))
  cf = dirs[b] + 0.1 * rng.normal(size=(160, SMALL.latent_dim))
  cf = (cf / np.linalg.norm(cf, axis=1, keepdims=True)).astype(np.float32)
  longer = dataclasses.replace(SMALL, num_steps=600, learning_rate=1e-2)
  plain, _ = rq_vae.fit_codes(x, num_levels=2, codebook_size=4, config=longer, seed=0)
  with_cf, info = rq_vae.fit_codes(x, num_levels=2, codebook_size=4, config=dataclasses.replace(longer, cf_weight=1.0),
                                   cf=cf, seed=0)
  assert info["cf_rows"] == 160 and "cf" in info["loss_log"][-1]
  # Measured here: 1.0 with the term, 0.31 without; the margins leave room for another CPU.
  assert _purity(with_cf[:, 0], b) >= 0.8 and _purity(plain[:, 0], b) <= 0.45, (
      _purity(with_cf[:, 0], b), _purity(plain[:, 0], b))


def test_collaborative_weight_needs_collaborative_rows():
  x, _ = _planted()
  with pytest.raises(ValueError, match="cf_weight > 0 needs cf"):
    rq_vae.fit_codes(x, num_levels=2, codebook_size=4, config=dataclasses.replace(SMALL, cf_weight=0.1))


def test_letter_is_built_from_the_training_split_only(monkeypatch):
  """Two datasets with the same training split and different held-out splits (items 59 and 60
  are held-out-only sentinels in one of them) give the same LETTER table: the SASRec rows the
  collaborative term uses come from the training sequences only."""
  monkeypatch.setattr(build.emb_lib, "SentenceEncoder", _FakeEncoder)
  a = _fake(with_text=True)
  rng = np.random.default_rng(1)
  b = FakeDataset("fake", a.num_items, list(a.train),
                  [(u, h + (int(rng.integers(1, 58)),), int(rng.integers(1, 58))) for u, h, _ in a.validation],
                  [(u, h, int(rng.integers(1, 58))) for u, h, _ in a.test], a.item_meta)
  cfgs = dict(rqvae=dataclasses.replace(rq_vae.LETTER, latent_dim=8, hidden_dims=(32,), num_steps=30, batch_size=32,
                                        refresh_every=10, sinkhorn_iters=20),
              sasrec=dataclasses.replace(build.sasrec_lib.SASRecConfig(), num_epochs=2, tokens_per_batch=256))
  ta, ra = build.build_with_report("fake", dataset=a, num_levels=2, codebook_size=4, quantizer="letter", **cfgs)
  tb, _ = build.build_with_report("fake", dataset=b, num_levels=2, codebook_size=4, quantizer="letter", **cfgs)
  np.testing.assert_array_equal(ta.codes, tb.codes)
  v = ra["quantiser"]["rqvae"]
  assert ta.meta["method"] == "letter-rq-vae+collision-level"
  assert v["cf_rows"] == 57 and v["collaborative"]["config"]["dim"] == 8  # items 58-60 never trained


def test_rqvae_settings_name_their_own_cache_directory():
  kw = dict(num_levels=3, codebook_size=256, embedding="text", balance="residual", seed=0)
  dirs = {q: build.sid_cache_dir("office", "f", quantizer=q, root="/c", **kw).name
          for q in ("residual", "rqvae", "letter")}
  assert len(set(dirs.values())) == 3 and "_letter-" in dirs["letter"] and "_rqvae-" in dirs["rqvae"]
  assert build.sid_settings(**kw, quantizer="letter")["rqvae"]["cf_weight"] == rq_vae.LETTER.cf_weight
