r"""The HTTP recommendation endpoint: one exported model for every scenario, with request batching.

  python -m oxyjax.export --model_dir=runs/quickstart            # writes runs/quickstart/serving
  python -m oxyjax.serve --serving_dir=runs/quickstart/serving --port=8470
  curl -s localhost:8470/v1/recommend -d '{"history": ["B0001", "B0002"], "k": 10}'
  curl -s localhost:8470/healthz

Request (JSON object, POST /v1/recommend; unknown fields are an error):
  scenario   name (or id) of the scenario; default: the first one
  history    the user's behaviours as raw item ids, oldest first (at most `max_history_items`)
  user       raw user id (of the scenario's domain): selects the user's reasoning instruction in
             the near-line store; without a history, the user's latest behaviours are read from
             the export's users.jsonl (`oxyjax.export --user_histories`)
  trigger    item_to_item scenarios: the raw id of the item being looked at
  query      search scenarios: the query text (embedded by the sentence encoder as I_r; the
             embeddings of the last --query_cache_size distinct queries are kept, LRU)
  k          how many items to return (1..beam; default 10)
  beam       beam width, one of the exported beam sizes (default: the smallest >= k)

Response: {"scenario", "items": [{"rank", "item_id", "score", "title"}], "instruction":
{"source": "near_line" | "default" | "query" | "none", "reason"}, "history": "request" | "profile",
"ranking": "beams" | "second_stage", "beam", "k", "weights_step"}. With an exported second stage
(`rescoring.SecondStage`, inside the same compiled program) the items are the beams and SASRec's
top items of the pool re-ranked, and "score" is the fused score log p + weight * log p_SASRec;
without one, the beams in beam-search order with their joint log-probabilities.
A bad request gets 400 (413 for a body over `max_body_bytes`, 404 for another path) with
{"error": message, "field": the field it is about}; a full queue 503; a request not answered
within `request_timeout_s` 504.

Reasoning instructions are only read, never generated here: the near-line job
(`oxyjax.instructions.generate`, or its Beam pipeline `oxyjax.instructions.beam_job`) writes the
store, the server reloads its snapshot in a background thread every `store_reload_s`. A
request with a user whose newest record was written for this very history (same
`history_key`), is `generated` and younger than `instruction_max_age_s` gets that record's
embedding (`near_line`, `fresh`); otherwise the model's learned default instruction
(`default`, with `missing`, `stale` or `fallback`). No request waits on an LLM.

Batching: requests queue (bounded, `queue_size`); one worker takes the oldest and, while
another batch is already running, waits up to `max_batch_wait_ms` for more (an idle server runs
a request at once, with whatever is already queued: the window is only worth its wait while the
model is busy anyway), and runs those with the same beam in one compiled call of the buckets of
`ServingModel.plan` (padded with empty rows). A row's answer never depends on the rest of its
batch (the programs are row-wise; tests/test_serve.py checks it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import numpy as np

from oxyjax import export as export_lib

PROG = "python -m oxyjax.serve"
log = logging.getLogger("oxyjax.serve")

REQUEST_FIELDS = ("scenario", "history", "user", "trigger", "query", "k", "beam")


class BadRequest(ValueError):
  """A request the server refuses; `field` names the part of the request it is about."""

  def __init__(self, message: str, field: str | None = None, status: int = 400):
    super().__init__(message)
    self.field, self.status = field, status


@dataclasses.dataclass(frozen=True)
class Limits:
  """Bounds on what one request may ask for."""

  max_body_bytes: int = 64 * 1024
  max_history_items: int = 256
  max_id_chars: int = 256
  max_query_chars: int = 512


@dataclasses.dataclass
class Answer:
  items: list[dict[str, Any]]
  instruction: dict[str, str]
  scenario: str | None
  beam: int
  k: int
  history: str = "request"  # or 'profile': read from the export's users.jsonl for a user-id request
  ranking: str = "beams"  # or 'second_stage': the exported re-scoring stage ordered the items


# ------------------------------------------------------------------------------ the model


class ServingModel:
  """An export directory loaded for answering: `infer(features rows, beam) -> (items, scores)`.

  Reads only the directory `oxyjax.export` wrote; the exported programs are compiled (not
  traced) on first use, or by `warmup`."""

  def __init__(self, serving_dir: str, *, log=print):
    import jax
    from jax import export as jax_export

    from oxyjax import checkpoints
    from oxyjax.artifact import ModelArtifact

    self.directory = os.path.abspath(serving_dir)
    path = os.path.join(self.directory, export_lib.MANIFEST)
    if not os.path.isfile(path):
      raise export_lib.ExportError(f"no serving export at {self.directory} ({path} is missing; write it with "
                                   "`python -m oxyjax.export --model_dir=<run>`)")
    try:
      with open(path) as f:
        self.manifest = m = json.load(f)
      if m.get("format") != export_lib.SERVING_FORMAT:
        raise ValueError(f"format {m.get('format')!r}, expected {export_lib.SERVING_FORMAT!r}")
      if not isinstance(m.get("version"), int) or m["version"] > export_lib.SERVING_VERSION:
        raise ValueError(f"version {m.get('version')!r}; this oxyjax reads versions <= {export_lib.SERVING_VERSION}")
      self.batch_sizes = [int(b) for b in m["batch_sizes"]]
      self.beam_sizes = [int(w) for w in m["beam_sizes"]]
      self.roots = {k: int(v) for k, v in m["roots"].items()}
      self.second_stage = m.get("second_stage")  # None: the beams alone
      self.matmul_dtype = str(m.get("matmul_dtype", "float32"))  # the programs' weight products
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise export_lib.ExportError(f"{path}: {e}") from None
    self.artifact = ModelArtifact.load(os.path.join(self.directory, "artifact"))
    if self.artifact.content_digest() != m.get("artifact_digest"):
      raise export_lib.ExportError(f"{self.directory}/artifact does not match {path} (artifact digest)")
    # Host-side feature building only (SID table lookups); the network is never initialised.
    self.model = self.artifact.make_model()
    self.feature_spec = {k: (tuple(s), np.dtype(d)) for k, (s, d) in m["features"].items()}
    params, meta = checkpoints.load_params(self.artifact.params_dir, None, log=log)
    got = export_lib.param_spec(params)
    if [g[:2] for g in got] != [w[:2] for w in m["params"]]:
      raise export_lib.ExportError(f"{self.artifact.params_dir}: the parameters do not match the exported "
                                   f"programs' ({len(got)} vs {len(m['params'])} arrays, or other shapes)")
    self.weights_step = int(m.get("weights_step", meta.get("step", 0)))
    dtypes = [np.dtype(w[2]) for w in m["params"]]
    leaves, tree = jax.tree_util.tree_flatten(params)
    self.params = jax.device_put(jax.tree_util.tree_unflatten(
        tree, [np.asarray(x, dt) for x, dt in zip(leaves, dtypes)]))
    self._stage_args = ()
    if self.second_stage:
      self._stage_args = self._load_second_stage(path)
    forest_path = os.path.join(self.directory, "forest.npz")
    try:
      with np.load(forest_path) as z:
        self.trie = tuple(jax.device_put(np.asarray(z[f])) for f in export_lib.TRIE_FIELDS)
    except (OSError, KeyError, ValueError) as e:
      raise export_lib.ExportError(f"{forest_path}: {e}") from None
    self._programs = {}
    for key, name in m["programs"].items():
      b, w = (int(x) for x in key.split("x"))
      fpath = os.path.join(self.directory, name)
      try:
        with open(fpath, "rb") as f:
          exp = jax_export.deserialize(bytearray(f.read()))
      except (OSError, ValueError) as e:
        raise export_lib.ExportError(f"{fpath}: {e}") from None
      self._programs[(b, w)] = jax.jit(exp.call)
    self._users: dict[tuple[str, str], list[str]] = {}
    users_path = os.path.join(self.directory, export_lib.USERS_FILE)
    if os.path.isfile(users_path):
      with open(users_path) as f:
        for n, line in enumerate(f, 1):
          try:
            u = json.loads(line)
            self._users[(str(u["domain"]), str(u["user"]))] = [str(x) for x in u["history"]]
          except (ValueError, KeyError, TypeError) as e:
            raise export_lib.ExportError(f"{users_path}:{n}: {e}") from None

  def _load_second_stage(self, manifest_path: str) -> tuple:
    """(scorer params, SID codes) on device, the exported programs' last two arguments; checked
    against the shapes the programs were traced with."""
    import jax

    from oxyjax import rescoring

    st = self.second_stage
    stage_dir = os.path.join(self.directory, st["directory"])
    try:
      stage = rescoring.SecondStage.load(stage_dir, num_items=self.artifact.num_items)
    except (OSError, ValueError, KeyError) as e:
      raise export_lib.ExportError(f"{stage_dir}: {e}") from None
    got = export_lib.param_spec(stage.params)
    codes = np.asarray(self.artifact.sid_table.codes, np.int32)
    want = {k: st[k] for k in ("weight", "union", "digest")}
    want["scenario_weights"] = st.get("scenario_weights", [])
    got_settings = {"scenario_weights": [], **stage.settings()}
    if got != st["params"] or list(codes.shape) != st["sid_codes"] or got_settings != want:
      raise export_lib.ExportError(f"{stage_dir} does not match the second stage of {manifest_path} "
                                   "(parameters, SID table, digest, weight or union)")
    return jax.device_put(stage.params), jax.device_put(codes)

  def user_history(self, domain: str, user: str) -> list[str] | None:
    """The user's latest behaviours from the export's users.jsonl (None when unknown)."""
    return self._users.get((domain, user))

  @property
  def scenarios(self) -> list[dict]:
    return self.artifact.scenarios

  def bucket(self, n: int) -> int:
    """The smallest batch bucket holding n rows (the largest when none does)."""
    return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

  def plan(self, n: int) -> list[int]:
    """The buckets n rows run in, in order: the smallest bucket that holds the rest when it is
    at most a quarter padding, else the largest bucket the rest fills (a call's cost grows with
    its bucket, so 17 rows run as 16 + 1, not padded to 32)."""
    out = []
    while n > 0:
      up = self.bucket(n)
      if up >= n and up - n <= up // 4:
        out.append(up)
        break
      down = max([b for b in self.batch_sizes if b <= n], default=up)
      out.append(down)
      n -= down
    return out

  def _empty_row(self) -> dict[str, np.ndarray]:
    return {k: np.zeros((1,) + s, d) for k, (s, d) in self.feature_spec.items()}

  def infer(self, rows: Sequence[dict[str, np.ndarray]], beam: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs rows (each a dict of [1, ...] serving features, `pool_root` set) at beam `beam`;
    returns (items [n, C] int32, scores [n, C] float32), in the chunks of `plan`: C is the beam,
    or with a second stage beam + its union (the fused list, -1 / -inf for empty slots)."""
    if beam not in self.beam_sizes:
      raise ValueError(f"beam {beam} was not exported (have {self.beam_sizes})")
    out_items, out_scores = [], []
    s = 0
    for b in self.plan(len(rows)):
      chunk = list(rows[s:s + b])
      n = len(chunk)
      s += n
      chunk += [self._empty_row()] * (b - n)
      feats = {k: np.concatenate([r[k] for r in chunk]).astype(d) for k, (_, d) in self.feature_spec.items()}
      items, scores = self._programs[(b, beam)](self.params, feats, self.trie, *self._stage_args)
      items, scores = np.asarray(items), np.asarray(scores)
      out_items.append(items[:n])
      out_scores.append(scores[:n])
    return np.concatenate(out_items), np.concatenate(out_scores)

  def warmup(self, beams: Sequence[int] | None = None, log=print) -> None:
    """Compiles every (bucket, beam) program by running it once on empty rows."""
    for w in beams or self.beam_sizes:
      for b in self.batch_sizes:
        t = time.perf_counter()
        self.infer([self._empty_row()] * b, w)
        log(f"[serve] compiled batch {b} x beam {w} in {time.perf_counter() - t:.1f}s")


# ------------------------------------------------------------------------------ instructions


class InstructionSnapshot:
  """The near-line store as the server reads it: per (dataset, user, scenario), the newest
  record, reloaded in the background; lookups never block on the store or on an LLM."""

  def __init__(self, path: str | None, *, max_age_s: float | None = None, reload_s: float = 60.0,
               now_fn=time.time):
    self.path, self.max_age_s, self.now_fn = path, max_age_s, now_fn
    self._latest: dict[tuple[str, str, str], Any] = {}
    self._stop = threading.Event()
    if path:
      self.reload()
      if reload_s > 0:
        threading.Thread(target=self._loop, args=(reload_s,), daemon=True, name="store-reload").start()

  def reload(self) -> None:
    from oxyjax.instructions.store import InstructionStore

    try:
      store = InstructionStore(self.path, create=False)
    except Exception as e:  # a broken or missing store must not take the server down
      log.warning("instruction store %s not readable (%s); serving the default instruction", self.path, e)
      return
    latest: dict[tuple[str, str, str], Any] = {}
    for r in store.records():
      k = (r.dataset, r.user, r.scenario)
      if k not in latest or (r.cutoff, r.created_at) > (latest[k].cutoff, latest[k].created_at):
        latest[k] = r
    self._latest = latest  # one reference swap: readers see the old or the new snapshot

  def _loop(self, every: float) -> None:
    while not self._stop.wait(every):
      self.reload()

  def close(self) -> None:
    self._stop.set()

  def lookup(self, dataset: str, user: str | None, scenario: str, raw_history: Sequence[str]):
    """(embedding or None, reason): `fresh` records only; `missing`, `stale`, `fallback` else."""
    from oxyjax.instructions.prompt import raw_history_key

    if not user:
      return None, "no_user"
    r = self._latest.get((dataset, user, scenario))
    if r is None:
      return None, "missing"
    if r.history_key != raw_history_key(raw_history) or int(r.cutoff) != len(raw_history):
      return None, "stale"  # written for an older history: the user has behaved since
    if r.status != "generated":
      return None, "fallback"
    if self.max_age_s is not None and self.now_fn() - r.created_at > self.max_age_s:
      return None, "stale"
    return np.asarray(r.embedding, np.float32), "fresh"


# ------------------------------------------------------------------------------ requests


def kind_of(sc) -> str | None:
  return sc["kind"] if sc else None


def _string(obj, field, limit) -> str:
  if not isinstance(obj, str):
    raise BadRequest(f"{field} must be a string, got {type(obj).__name__}", field)
  if not obj or len(obj) > limit:
    raise BadRequest(f"{field} must be 1..{limit} characters, got {len(obj)}", field)
  return obj


def _int(obj, field, lo, hi) -> int:
  if isinstance(obj, bool) or not isinstance(obj, int):
    raise BadRequest(f"{field} must be an integer, got {json.dumps(obj)[:40]}", field)
  if not lo <= obj <= hi:
    raise BadRequest(f"{field} must be in {lo}..{hi}, got {obj}", field)
  return obj


class Recommender:
  """Requests -> answers: validation, the instruction lookup, features, and the batched model."""

  def __init__(self, model: ServingModel, *, limits: Limits = Limits(), instructions: InstructionSnapshot | None = None,
               encoder=None, query_cache_size: int = 4096):
    from oxyjax.sid.embeddings import QueryEmbedder

    self.model, self.limits = model, limits
    self.instructions = instructions or InstructionSnapshot(None)
    # a search request's query -> I_r: the sentence encoder (``encoder``, default MiniLM, loaded
    # on first use) behind an LRU cache of the last `query_cache_size` distinct queries
    self.embed = QueryEmbedder(encoder, cache_size=query_cache_size)
    self._item_index = {r: i for i, r in enumerate(model.artifact.raw_item_ids) if i}

  def warmup(self, log=print) -> None:
    """Where a scenario embeds its query at request time (search), loads the text encoder and
    compiles it for every token-length bucket a query may fall in, so that no request pays the
    load or a compile (otherwise the first search request loads the model, and the first query of
    each new length bucket compiles it)."""
    if not any(kind_of(sc) == "search" for sc in self.model.scenarios):
      return
    t = time.perf_counter()
    self.embed.warmup()
    log(f"[serve] text encoder ready for queries in {time.perf_counter() - t:.1f}s")

  def parse(self, body: Any):
    """A decoded JSON body -> (scenario dict or None, build_request kwargs, k, beam, user); BadRequest else."""
    from oxyjax import predict

    lim, art = self.limits, self.model.artifact
    if not isinstance(body, dict):
      raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}", None)
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
      raise BadRequest(f"unknown field(s) {unknown}; a request has {list(REQUEST_FIELDS)}", unknown[0])
    sc = None
    if art.scenarios:
      name = body.get("scenario", art.scenarios[0]["name"])
      if not isinstance(name, (str, int)) or isinstance(name, bool):
        raise BadRequest("scenario must be a scenario name or id", "scenario")
      try:
        sc = predict.find_scenario(art, name)
      except ValueError as e:
        raise BadRequest(str(e), "scenario") from None
    elif body.get("scenario") not in (None, 0, "0"):
      raise BadRequest("this model has no named scenarios; leave scenario out", "scenario")
    history = body.get("history")
    user = body.get("user")
    if user is not None:
      _string(user, "user", lim.max_id_chars)
    history_source = "request"
    if history is None and user is not None and kind_of(sc) != "item_to_item":
      domain = sc["domain"] if sc and sc.get("domain") else art.dataset
      history = self.model.user_history(domain, user)
      if history is None:
        raise BadRequest(f"user {user!r} has no known history in {domain!r}: give the history", "user")
      history_source = "profile"
    history = [] if history is None else history
    if not isinstance(history, list):
      raise BadRequest("history must be a list of raw item ids", "history")
    if len(history) > lim.max_history_items:
      raise BadRequest(f"history has {len(history)} items; at most {lim.max_history_items}", "history")
    for i, h in enumerate(history):
      _string(h, f"history[{i}]", lim.max_id_chars)
      if h not in self._item_index:
        raise BadRequest(f"history[{i}]: unknown item id {h!r}", f"history[{i}]")
    kind = kind_of(sc)
    trigger = body.get("trigger")
    if trigger is not None:
      _string(trigger, "trigger", lim.max_id_chars)
      if kind != "item_to_item":
        raise BadRequest(f"trigger is for item_to_item scenarios, not {kind or 'this model'}", "trigger")
      if trigger not in self._item_index:
        raise BadRequest(f"trigger: unknown item id {trigger!r}", "trigger")
    elif kind == "item_to_item":
      raise BadRequest(f"scenario {sc['name']!r} is item-to-item: give the item being looked at", "trigger")
    query = body.get("query")
    if query is not None:
      _string(query, "query", lim.max_query_chars)
      if kind != "search":
        raise BadRequest(f"query is for search scenarios, not {kind or 'this model'}", "query")
    elif kind == "search":
      raise BadRequest(f"scenario {sc['name']!r} is search: give a query", "query")
    if kind != "item_to_item" and not history:
      raise BadRequest("history is empty: give at least one item id", "history")
    beams = self.model.beam_sizes
    k = _int(body.get("k", min(10, beams[-1])), "k", 1, beams[-1])
    beam = body.get("beam")
    if beam is None:
      beam = next(w for w in beams if w >= k)
    elif isinstance(beam, bool) or not isinstance(beam, int) or beam not in beams:
      raise BadRequest(f"beam must be one of the exported beam sizes {beams}, got {json.dumps(beam)[:40]}", "beam")
    if k > beam:
      raise BadRequest(f"k {k} is larger than the beam {beam}", "k")
    return sc, dict(raw_history=history, trigger=trigger, query=query), k, beam, user, history_source

  def prepare(self, body: Any):
    """Validates a request and builds its model row: (row, meta) for `finish`."""
    from oxyjax import predict

    sc, kwargs, k, beam, user, history_source = self.parse(body)
    art, cfg = self.model.artifact, self.model.model.config
    source = {"source": "none", "reason": "the model reads no instruction"}
    emb = None
    if sc is not None and sc["kind"] == "search":
      source = {"source": "query", "reason": "a search scenario's instruction is its query"}
    elif cfg.instruction_dim:
      dataset = sc["domain"] if sc and sc.get("domain") else art.dataset
      store_scenario = sc["kind"] if sc else art.instructions.get("scenario", "homepage")
      history = kwargs["raw_history"]
      if len(art.domains) > 1:  # catalogue ids are '<domain>/<raw id>'; the store keys the domain's raw ids
        history = [h.split("/", 1)[1] if h.startswith(f"{dataset}/") else h for h in history]
      emb, reason = self.instructions.lookup(dataset, user, store_scenario, history)
      source = {"source": "near_line" if emb is not None else "default", "reason": reason}
    try:
      req = predict.build_request(art, self.model.model, scenario=sc["name"] if sc else 0,
                                  instruction_embedding=emb, embed=self.embed, **kwargs)
    except (KeyError, ValueError) as e:
      raise BadRequest(str(e.args[0] if isinstance(e, KeyError) else e), None) from None
    row = dict(req.features)
    row["pool_root"] = np.asarray([self.model.roots[req.pool]], np.int32)
    return row, (sc, k, beam, source, history_source)

  def finish(self, items: np.ndarray, scores: np.ndarray, meta) -> Answer:
    sc, k, beam, source, history_source = meta
    art = self.model.artifact
    out = [{"rank": r + 1, "item_id": art.raw_item_ids[i], "score": float(s), "title": art.title(int(i))}
           for r, (i, s) in enumerate(zip(items[:k], scores[:k])) if i > 0]
    return Answer(items=out, instruction=source, scenario=sc["name"] if sc else None, beam=beam, k=k,
                  history=history_source, ranking="second_stage" if self.model.second_stage else "beams")

  def recommend(self, bodies: Sequence[Any]) -> list[Answer | BadRequest]:
    """Answers several requests together (the batcher's path, without the queue)."""
    prepared, out = [], [None] * len(bodies)
    for i, b in enumerate(bodies):
      try:
        prepared.append((i,) + self.prepare(b))
      except BadRequest as e:
        out[i] = e
    for beam in sorted({p[2][2] for p in prepared}):
      group = [p for p in prepared if p[2][2] == beam]
      items, scores = self.model.infer([p[1] for p in group], beam)
      for (i, _, meta), it, sc in zip(group, items, scores):
        out[i] = self.finish(it, sc, meta)
    return out


# ------------------------------------------------------------------------------ batching


# Batches in the model at once. On the 2-core CPU a second call adds throughput, as XLA does not
# spread a call of a few rows over the cores (benchmarks/serving_parts.py): at 300 requests/s,
# beam 20, with the default second stage, p99 149 / 491 / 565 ms with one worker and 77 / 119 /
# 197 ms with two, in three runs (docs/serving.md, "Open-loop load, and two batches at once").
DEFAULT_BATCH_WORKERS = 2


class QueueFull(RuntimeError):
  pass


class DeadlineExceeded(RuntimeError):
  pass


class _Pending:
  __slots__ = ("row", "meta", "deadline", "done", "result")

  def __init__(self, row, meta, deadline):
    self.row, self.meta, self.deadline = row, meta, deadline
    self.done, self.result = threading.Event(), None


class Batcher:
  """Dynamic batching: a bounded queue, batches of the same beam, a deadline per request.

  `workers` threads each take a batch and run it, so up to `workers` compiled calls run at once:
  while one runs, the next batch gathers and starts (see `DEFAULT_BATCH_WORKERS`). A batch is
  gathered by one worker at a time (`_take` under a lock).

  The batch window (`max_wait_s`) is waited only while another batch is in the model: a request
  that finds the server idle runs at once with what is already queued, so a lone client pays no
  window (2 ms of a beam-256 call's ~20 on this project's CPU), and under load, when a call is
  always running, batches still fill for up to `max_wait_s`. `wait_when_idle` restores the
  window for every batch (TF Serving's and Triton's behaviour): fuller calls under moderate load,
  at the window's cost to a lone request."""

  def __init__(self, recommender: Recommender, *, max_batch: int | None = None, max_wait_s: float = 0.002,
               queue_size: int = 512, timeout_s: float = 2.0, workers: int = DEFAULT_BATCH_WORKERS,
               wait_when_idle: bool = False):
    if workers < 1:
      raise ValueError(f"batch workers must be >= 1, got {workers}")
    self.rec = recommender
    self.max_batch = max_batch or recommender.model.batch_sizes[-1]
    self.max_wait_s, self.timeout_s, self.wait_when_idle = max_wait_s, timeout_s, wait_when_idle
    self._q: queue.Queue[_Pending] = queue.Queue(maxsize=queue_size)
    self._held: list[_Pending] = []  # taken from the queue, other beam than the batch being run
    self._taking = threading.Lock()  # one worker gathers a batch at a time (`_held` is shared)
    self._counting = threading.Lock()
    self._running = 0  # batches in the model now (changed under `_counting`)
    self.batches = 0
    self.rows = 0
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"batcher-{i}") for i in range(workers)]
    for t in self._threads:
      t.start()

  def submit(self, body: Any) -> Answer:
    row, meta = self.rec.prepare(body)  # BadRequest before it queues
    p = _Pending(row, meta, time.monotonic() + self.timeout_s)
    try:
      self._q.put_nowait(p)
    except queue.Full:
      raise QueueFull(f"the request queue is full ({self._q.maxsize})") from None
    if not p.done.wait(self.timeout_s) or p.result is None:
      raise DeadlineExceeded(f"not answered within {self.timeout_s:.2f}s")
    if isinstance(p.result, Exception):
      raise p.result
    return p.result

  def _take(self) -> list[_Pending]:
    first = self._held.pop(0) if self._held else self._q.get()
    if first is None:
      return []
    batch, beam = [first], first.meta[2]
    rest = []
    for p in self._held:
      (batch if p.meta[2] == beam and len(batch) < self.max_batch else rest).append(p)
    self._held = rest
    until = time.monotonic() + (self.max_wait_s if self._running or self.wait_when_idle else 0.0)
    while len(batch) < self.max_batch:
      left = until - time.monotonic()
      try:
        p = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
      except queue.Empty:
        break
      if p is None:
        self._stop.set()
        break
      (batch if p.meta[2] == beam else self._held).append(p)
    return batch

  def _loop(self) -> None:
    while not self._stop.is_set():
      with self._taking:
        batch = [] if self._stop.is_set() else self._take()
        now = time.monotonic()
        live = [p for p in batch if p.deadline > now]  # expired ones were answered 504 already
        if live:
          with self._counting:  # before the next gatherer looks
            self._running += 1
      if not live:
        continue
      try:
        items, scores = self.rec.model.infer([p.row for p in live], live[0].meta[2])
        for p, it, sc in zip(live, items, scores):
          p.result = self.rec.finish(it, sc, p.meta)
      except Exception as e:  # a failed call fails its requests, not the server
        log.exception("batch of %d failed", len(live))
        for p in live:
          p.result = e
      with self._counting:
        self._running -= 1
        self.batches += 1
        self.rows += len(live)
      for p in live:
        p.done.set()

  def close(self) -> None:
    self._stop.set()
    for _ in self._threads:  # wakes each worker blocked on an empty queue
      try:
        self._q.put_nowait(None)
      except queue.Full:
        pass


# ------------------------------------------------------------------------------ HTTP


def make_handler(batcher: Batcher, limits: Limits, health: dict):
  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # Headers and body are two writes: with Nagle's algorithm the body would wait for the
    # client's delayed ACK of the headers (~40 ms on Linux loopback).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # no line per request on stderr
      pass

    def _send(self, status: int, obj: dict) -> None:
      data = json.dumps(obj).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, status: int, message: str, field: str | None = None) -> None:
      self._send(status, {"error": message, "field": field})

    def do_GET(self):
      if self.path.rstrip("/") in ("/healthz", "/health"):
        now = {k: v() if callable(v) else v for k, v in health.items()}  # counters read at the request
        self._send(200, {"status": "ok", **now, "queued": batcher._q.qsize(), "batches": batcher.batches,
                         "rows": batcher.rows})
      else:
        self._error(404, f"no such path {self.path!r}; use POST /v1/recommend or GET /healthz", "path")

    def do_POST(self):
      if self.path.rstrip("/") != "/v1/recommend":
        self._discard()
        return self._error(404, f"no such path {self.path!r}; use POST /v1/recommend", "path")
      length = self.headers.get("Content-Length")
      if length is None or not length.isdigit():
        self.close_connection = True
        return self._error(411, "a Content-Length header is required", "Content-Length")
      length = int(length)
      if length > limits.max_body_bytes:
        self.close_connection = True  # the body is not read
        return self._error(413, f"the body is {length} bytes; at most {limits.max_body_bytes}", "body")
      raw = self.rfile.read(length)
      try:
        body = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return self._error(400, f"the body is not JSON: {e}", "body")
      t0 = time.perf_counter()
      try:
        ans = batcher.submit(body)
      except BadRequest as e:
        return self._error(e.status, str(e), e.field)
      except QueueFull as e:
        return self._error(503, str(e))
      except DeadlineExceeded as e:
        return self._error(504, str(e))
      except Exception as e:  # never a stack trace to the client
        log.exception("request failed")
        return self._error(500, f"internal error: {type(e).__name__}")
      self._send(200, {**dataclasses.asdict(ans), "weights_step": health.get("weights_step"),
                       "server_ms": round(1e3 * (time.perf_counter() - t0), 3)})

    def _discard(self):
      length = self.headers.get("Content-Length")
      if length and length.isdigit() and int(length) <= limits.max_body_bytes:
        self.rfile.read(int(length))
      else:
        self.close_connection = True

  return Handler


class _HTTPServer(ThreadingHTTPServer):
  request_queue_size = 1024  # listen backlog: the default 5 drops connections of a burst of clients (1 s SYN retry)
  daemon_threads = True


class Server:
  """The endpoint in-process (tests, benchmarks): `Server(dir).start()` serves on a thread."""

  def __init__(self, serving_dir: str, *, host: str = "127.0.0.1", port: int = 0, store: str | None = None,
               instruction_max_age_s: float | None = None, store_reload_s: float = 60.0, limits: Limits = Limits(),
               max_batch_wait_ms: float = 2.0, queue_size: int = 512, request_timeout_s: float = 2.0,
               batch_workers: int = DEFAULT_BATCH_WORKERS, batch_wait_when_idle: bool = False, warmup: bool = True,
               encoder=None, query_cache_size: int = 4096, log=print):
    self.model = ServingModel(serving_dir, log=log)
    if warmup:
      self.model.warmup(log=log)
    self.instructions = InstructionSnapshot(store, max_age_s=instruction_max_age_s, reload_s=store_reload_s)
    self.recommender = Recommender(self.model, limits=limits, instructions=self.instructions, encoder=encoder,
                                  query_cache_size=query_cache_size)
    if warmup:
      self.recommender.warmup(log=log)
    self.batcher = Batcher(self.recommender, max_wait_s=max_batch_wait_ms / 1e3, queue_size=queue_size,
                           timeout_s=request_timeout_s, workers=batch_workers, wait_when_idle=batch_wait_when_idle)
    health = {"scenarios": [s["name"] for s in self.model.scenarios] or None, "beam_sizes": self.model.beam_sizes,
              "batch_sizes": self.model.batch_sizes, "weights_step": self.model.weights_step,
              "matmul_dtype": self.model.matmul_dtype, "dataset": self.model.artifact.dataset, "instruction_store": store,
              "second_stage": ({k: self.model.second_stage[k] for k in ("weight", "union")}
                               if self.model.second_stage else None),
              "query_cache": self.recommender.embed.stats}
    self.httpd = _HTTPServer((host, port), make_handler(self.batcher, limits, health))
    self.address = self.httpd.server_address

  @property
  def url(self) -> str:
    return f"http://{self.address[0]}:{self.address[1]}"

  def start(self) -> "Server":
    self._started = True
    threading.Thread(target=self.httpd.serve_forever, daemon=True, name="http").start()
    return self

  def close(self) -> None:
    if getattr(self, "_started", False):
      self.httpd.shutdown()  # waits for serve_forever to return: only when it runs
    self.httpd.server_close()
    self.batcher.close()
    self.instructions.close()


def _define_flags():
  from absl import flags

  flags.DEFINE_string("serving_dir", None, "Directory written by `python -m oxyjax.export`.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8470, "Port to listen on.")
  flags.DEFINE_string("store", None, "Near-line instruction store (oxyjax.instructions.generate --store).")
  flags.DEFINE_float("instruction_max_age_s", None, "Older instructions count as stale (default: no age limit).")
  flags.DEFINE_float("store_reload_s", 60.0, "How often the store snapshot is reloaded.")
  flags.DEFINE_float("max_batch_wait_ms", 2.0, "How long the batcher waits for more requests while another batch is running "
                     "(an idle server runs a request at once).")
  flags.DEFINE_integer("queue_size", 512, "Requests that may wait; more get 503.")
  flags.DEFINE_float("request_timeout_s", 2.0, "A request not answered by then gets 504.")
  flags.DEFINE_integer("batch_workers", DEFAULT_BATCH_WORKERS, "Batches that may run at once (each a compiled call).")
  flags.DEFINE_bool("batch_wait_when_idle", False, "Wait the batch window also when no batch is running (every "
                    "request then pays it).")
  flags.DEFINE_integer("query_cache_size", 4096, "Search queries whose embedding is kept (LRU, keyed by the normalised query); 0: "
                       "every search request embeds its query.")
  flags.DEFINE_integer("max_body_bytes", Limits.max_body_bytes, "Larger bodies get 413.")
  flags.DEFINE_integer("max_history_items", Limits.max_history_items, "Longer histories get 400.")


def main(argv: Sequence[str]) -> None:
  from absl import flags

  from oxyjax import cli
  from oxyjax.artifact import ArtifactError

  fl = flags.FLAGS
  cli.require_dir(PROG, "serving_dir", fl.serving_dir, "write one with `python -m oxyjax.export`")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    server = Server(fl.serving_dir, host=fl.host, port=fl.port, store=fl.store,
                    instruction_max_age_s=fl.instruction_max_age_s, store_reload_s=fl.store_reload_s,
                    limits=Limits(max_body_bytes=fl.max_body_bytes, max_history_items=fl.max_history_items),
                    max_batch_wait_ms=fl.max_batch_wait_ms, queue_size=fl.queue_size,
                    request_timeout_s=fl.request_timeout_s, batch_workers=fl.batch_workers,
                    batch_wait_when_idle=fl.batch_wait_when_idle, query_cache_size=fl.query_cache_size)
  except (ArtifactError, export_lib.ExportError, FileNotFoundError) as e:
    raise SystemExit(f"{PROG}: {e}") from None
  print(f"[serve] {server.url}/v1/recommend  (health: {server.url}/healthz)", flush=True)
  try:
    server.httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.close()


def run():
  from oxyjax import cli

  _define_flags()
  cli.run(main, PROG)


if __name__ == "__main__":
  run()
