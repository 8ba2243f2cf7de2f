"""Item embeddings: the pure-JAX MiniLM encoder vs an independent NumPy forward; collaborative."""

import math

import numpy as np
import pytest

from oxyjax.sid import embeddings


# ------------------------------------------------------------------ SentenceEncoder


@pytest.fixture(scope="module")
def encoder():
  return embeddings.SentenceEncoder()


def _numpy_minilm(model_dir, ids):
  """Reference BERT forward for one sentence, straight from the safetensors (torch layout)."""
  import json
  from safetensors.numpy import load_file
  cfg = json.loads((model_dir / "config.json").read_text())
  w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()
       if v.dtype.kind == "f"}
  eps, nh = cfg["layer_norm_eps"], cfg["num_attention_heads"]

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w[p + ".weight"] + w[p + ".bias"]

  def lin(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))

  t = len(ids)
  x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t] \
      + w["embeddings.token_type_embeddings.weight"][0]
  x = ln(x, "embeddings.LayerNorm")
  hd = x.shape[1] // nh
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(t, nh, hd).transpose(1, 0, 2)
               for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    x = ln(x + lin(a.transpose(1, 0, 2).reshape(t, -1), p + "attention.output.dense"),
           p + "attention.output.LayerNorm")
    x = ln(x + lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
  v = x.mean(0)
  return v / np.linalg.norm(v)


SENTENCES = ["A matte red lipstick that lasts all day.",
             "Stainless steel ball bearings, 10 mm, pack of 100 for industrial machines."]


def test_matches_numpy_reference(encoder):
  got = encoder.encode(SENTENCES)
  assert got.shape == (2, 384) and got.dtype == np.float32
  for s, g in zip(SENTENCES, got):
    ids = encoder.tokenize([s])[0]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    ref = _numpy_minilm(encoder.model_dir, ids)
    np.testing.assert_allclose(g, ref, atol=2e-5)


def test_padding_and_order_do_not_change_embeddings(encoder):
  alone = encoder.encode(SENTENCES[:1])
  batch = encoder.encode([SENTENCES[1], "x", SENTENCES[0]], batch_size=2)
  np.testing.assert_allclose(batch[2], alone[0], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
  assert encoder.encode([]).shape == (0, 384)
  with pytest.raises(TypeError):
    encoder.encode("not a list")


def test_warmup_compiles_every_length_a_text_may_have(encoder):
  """A server calls `warmup` at start: afterwards no text, of any length up to the limit, compiles
  the encoder again (the jitted function's cache does not grow), so no request pays a compile."""
  buckets = encoder.warmup()
  assert buckets[-1] == encoder.max_length and len(buckets) == len(set(buckets))
  # each warm-up text is exactly its bucket's length, so each bucket was compiled
  assert [len(encoder.tokenize([" ".join(["a"] * (b - 2))])[0]) for b in buckets] == buckets
  compiled = embeddings.sentence_embed._cache_size()
  for words in (1, 3, 14, 15, 40, 100, 250, 600):
    encoder.encode([" ".join(["pen"] * words)])
  assert embeddings.sentence_embed._cache_size() == compiled


class _CountingEncoder:
  """Embeds a text as a hash-seeded unit vector and records every text it was asked for."""

  def __init__(self):
    self.calls = []

  def encode(self, texts):
    self.calls += list(texts)
    out = []
    for t in texts:
      v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(8).astype(np.float32)
      out.append(v / np.linalg.norm(v))
    return np.stack(out)


def test_query_embedder_keeps_the_last_texts_and_returns_each_its_own():
  """LRU of capacity 2: a repeated text is encoded once and gets its own embedding back (not a
  neighbour's); a text pushed out by two newer ones is encoded again; an embedding handed out
  cannot be changed in place; capacity 0 encodes every call."""
  enc = _CountingEncoder()
  embed = embeddings.QueryEmbedder(enc, cache_size=2)
  want = {t: enc.encode([t])[0] for t in "abc"}
  enc.calls.clear()
  for t in ["a", "b", "a", "c", "a", "b"]:  # 'c' pushes out 'b' (least recently used), not 'a'
    np.testing.assert_array_equal(embed(t), want[t])
  assert enc.calls == ["a", "b", "c", "b"]
  assert embed.stats() == {"size": 2, "capacity": 2, "hits": 2, "misses": 4}
  with pytest.raises(ValueError):
    embed("a")[0] = 0.0
  off = embeddings.QueryEmbedder(enc, cache_size=0)
  enc.calls.clear()
  off("a"), off("a")
  assert enc.calls == ["a", "a"] and off.stats()["size"] == 0


def test_query_embedder_is_safe_across_threads():
  """Eight threads asking for 50 texts each, in different orders, through a cache smaller than
  the texts (so that entries come and go while others read): every answer is its text's own."""
  import concurrent.futures

  enc = _CountingEncoder()
  texts = [f"query {i}" for i in range(50)]
  want = {t: enc.encode([t])[0] for t in texts}
  embed = embeddings.QueryEmbedder(enc, cache_size=16)
  rng = np.random.default_rng(0)
  orders = [rng.permutation(texts).tolist() * 4 for _ in range(8)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda order: [(t, embed(t)) for t in order], orders))
  for answers in got:
    for t, v in answers:
      np.testing.assert_array_equal(v, want[t])
  stats = embed.stats()
  assert stats["hits"] + stats["misses"] == 8 * 200 and stats["size"] == 16


def test_semantic_similarity(encoder):
  e = encoder.encode([
      "The user likes science fiction movies about space.",
      "Recommend another space opera film to a sci-fi fan.",
      "Heavy duty nitrile gloves for laboratory use.",
      "Disposable protective lab gloves, powder free.",
  ])
  sim = e @ e.T
  assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2
  assert sim[2, 3] > sim[2, 0] + 0.2 and sim[2, 3] > sim[2, 1] + 0.2


# ------------------------------------------------------------------ collaborative


def _two_group_sequences(seed=0):
  """Items 1..20 and 21..40 never co-occur; item 41 has no interaction."""
  rng = np.random.default_rng(seed)
  seqs = []
  for u in range(300):
    group = np.arange(1, 21) if u % 2 == 0 else np.arange(21, 41)
    seqs.append(rng.choice(group, size=rng.integers(4, 10)).tolist())
  return seqs


def test_collaborative_separates_cooccurring_items():
  emb = embeddings.collaborative_embeddings(_two_group_sequences(), 41, dim=8, window=3, seed=0)
  assert emb.shape == (42, 8) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb[0], 0.0)
  np.testing.assert_allclose(np.linalg.norm(emb[1:], axis=1), 1.0, atol=1e-5)
  sim = emb @ emb.T
  a, b = slice(1, 21), slice(21, 41)
  within = (sim[a, a].sum() - 20 + sim[b, b].sum() - 20) / (2 * 20 * 19)
  between = sim[a, b].mean()
  assert within > between + 0.5
  # Each item's nearest neighbour is in its own group.
  s = sim[1:41, 1:41] - 2 * np.eye(40)
  nn = s.argmax(1)
  assert np.all((nn < 20) == (np.arange(40) < 20))


def test_collaborative_adjacent_pair_is_closest():
  # Items 1 and 2 always appear next to each other; 3..30 are shuffled filler.
  rng = np.random.default_rng(1)
  seqs = []
  for _ in range(400):
    filler = rng.choice(np.arange(3, 31), size=6, replace=False).tolist()
    pos = rng.integers(0, 6)
    seqs.append(filler[:pos] + [1, 2] + filler[pos:])
  emb = embeddings.collaborative_embeddings(seqs, 30, dim=16, window=1, seed=0)
  sim = emb @ emb.T
  assert sim[1, 2] > np.max(sim[1, 3:])


def test_collaborative_deterministic_and_cold_items():
  seqs = _two_group_sequences()
  e1 = embeddings.collaborative_embeddings(seqs, 41, dim=8, seed=3)
  e2 = embeddings.collaborative_embeddings(seqs, 41, dim=8, seed=3)
  np.testing.assert_array_equal(e1, e2)
  assert np.linalg.norm(e1[41]) == pytest.approx(1.0, abs=1e-5)  # cold item: random unit vector
  with pytest.raises(ValueError, match="out of range"):
    embeddings.collaborative_embeddings([[1, 99]], 41)
  cold = embeddings.collaborative_embeddings([], 5, dim=3)
  np.testing.assert_allclose(np.linalg.norm(cold[1:], axis=1), 1.0, atol=1e-5)
