"""Serving (issue 16): the exported programs answer like the in-process model, alone and inside a
batch; the HTTP endpoint refuses each bad request with a 4xx naming the field; instructions come
from the near-line store only (an LLM that is down, blocked or writing garbage never holds up or
fails a request); batching, the bounded queue and the deadline."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time

import jax
import numpy as np
import pytest

from oxyjax import export as export_lib
from oxyjax import predict as predict_lib
from oxyjax import serve
from oxyjax import train as train_lib
from oxyjax.data import readers
from oxyjax.data.readers import Example
from oxyjax.instructions import prompt as prompt_lib
from oxyjax.instructions.generate import run_job
from oxyjax.instructions.store import InstructionRecord, InstructionStore
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.sid.embeddings import QueryEmbedder
from tests.instructions.conftest import HashEncoder
from tests.models.test_batch_independence import _assert_same_ranking

TINY = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                   dropout_rate=0.1, max_history=10, instruction_dim=384)
SCENARIOS = [
    train_lib.ScenarioConfig("office_homepage", "homepage", "office"),
    train_lib.ScenarioConfig("office_i2i", "item_to_item", "office"),
    train_lib.ScenarioConfig("office_search", "search", "office", rate=0.5),
]
BEAM = 10


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  model_dir = root / "run"
  train_lib.train(
      scenarios=SCENARIOS, model_config=TINY, model_dir=str(model_dir), batch_size=32, num_train_steps=4,
      num_epochs=None, checkpoint_every_steps=4, eval_every_steps=4, eval_max_examples=32,
      final_eval_splits=(), eval_batch_size=32, eval_beam_size=BEAM, log_every_steps=100, verbose=False,
      mesh_shape={"data": 2, "fsdp": 2, "tensor": 2},
      sid=train_lib.SIDConfig(codebook_size=16, embedding="collaborative", cache_dir=None))
  out = export_lib.export_run(str(model_dir), str(root / "serving"), batch_sizes=(1, 8), beam_sizes=(BEAM,),
                              user_histories=True, log=lambda *a: None)
  predictor = predict_lib.Predictor(str(model_dir), beam_size=BEAM)
  predictor.embed = QueryEmbedder(HashEncoder())
  return out, predictor


@pytest.fixture(scope="module")
def server(exported):
  out, _ = exported
  srv = serve.Server(out, encoder=HashEncoder(), log=lambda *a: None).start()
  yield srv
  srv.close()


def _office_ids(predictor, n=40):
  ids = predictor.artifact.raw_item_ids
  return [ids[i] for i in predictor.artifact.pools["office_homepage"][:n]]


def _post(srv, body, raw: bytes | None = None, path="/v1/recommend", headers=None):
  c = http.client.HTTPConnection(*srv.address, timeout=30)
  data = raw if raw is not None else json.dumps(body).encode()
  c.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
  r = c.getresponse()
  out = r.status, json.loads(r.read() or b"null")
  c.close()
  return out


def _requests(predictor):
  ids = _office_ids(predictor)
  return [
      {"scenario": "office_homepage", "history": ids[:6], "k": BEAM},
      {"scenario": "office_homepage", "history": ids[10:11], "k": BEAM},
      {"scenario": "office_i2i", "trigger": ids[20], "history": ids[3:5], "k": BEAM},
      {"scenario": "office_search", "history": ids[5:9], "query": "ink pen refill", "k": BEAM},
  ]


def _in_process(predictor, body):
  recs = predictor.recommend(body.get("history", []), top_k=BEAM, scenario=body["scenario"],
                             trigger=body.get("trigger"), query=body.get("query"))
  return [r[0] for r in recs], np.asarray([r[1] for r in recs])


def test_exported_programs_answer_like_the_in_process_model(exported, server):
  """Every scenario, alone (bucket 1) and packed into one bucket-8 call with the other requests
  and padding rows: the same items and scores as `Predictor` (RecModel.predict, traced here).
  Scores may differ by summation order (bucket 8 is another matrix shape); the tolerance and the
  near-tie rule are those of tests/models/test_batch_independence.py (same layer sizes)."""
  _, predictor = exported
  rec = server.recommender
  bodies = _requests(predictor)
  packed = rec.recommend(bodies[::-1] + bodies)  # 8 rows: one bucket-8 call
  alone = [rec.recommend([b])[0] for b in bodies]
  for i, body in enumerate(bodies):
    want_items, want_scores = _in_process(predictor, body)
    assert len(want_items) == BEAM
    for got, where in ((alone[i], "alone"), (packed[len(bodies) - 1 - i], "packed first"),
                       (packed[len(bodies) + i], "packed second")):
      items = np.asarray([predictor.artifact.item_indices([x["item_id"]])[0] for x in got.items])
      scores = np.asarray([x["score"] for x in got.items])
      _assert_same_ranking(items, scores, predictor.artifact.item_indices(want_items), want_scores,
                           f"{body['scenario']} {where}")
    # Every item comes from the scenario's own pool.
    pool = set(predictor.artifact.pools[body["scenario"]].tolist())
    assert set(predictor.artifact.item_indices([x["item_id"] for x in alone[i].items]).tolist()) <= pool


def test_http_answers_and_health(exported, server):
  _, predictor = exported
  body = _requests(predictor)[0]
  status, ans = _post(server, {**body, "k": 3})
  assert status == 200, ans
  assert [x["rank"] for x in ans["items"]] == [1, 2, 3] and ans["beam"] == BEAM and ans["scenario"] == "office_homepage"
  want_items, _ = _in_process(predictor, body)
  assert [x["item_id"] for x in ans["items"]] == want_items[:3]
  assert all(x["title"] for x in ans["items"])  # Office has titles
  assert ans["instruction"] == {"source": "default", "reason": "no_user"}
  c = http.client.HTTPConnection(*server.address, timeout=30)
  c.request("GET", "/healthz")
  r = c.getresponse()
  health = json.loads(r.read())
  assert r.status == 200 and health["status"] == "ok" and health["scenarios"] == [s.name for s in SCENARIOS]


def _health(srv):
  c = http.client.HTTPConnection(*srv.address, timeout=30)
  c.request("GET", "/healthz")
  health = json.loads(c.getresponse().read())
  c.close()
  return health


def test_a_repeated_search_query_is_embedded_once(exported, server):
  """The server keeps recent queries' embeddings (`QueryEmbedder`): the same query again is a
  cache hit (the health endpoint counts it) and gets the same answer as the first time; another
  query is embedded (a miss). That a hit returns the text's own embedding is
  tests/sid/test_embeddings.py's."""
  _, predictor = exported
  body = {**_requests(predictor)[3], "query": "a query asked twice"}
  before = _health(server)["query_cache"]
  first, second = _post(server, body), _post(server, body)
  after = _health(server)["query_cache"]
  assert first[0] == second[0] == 200 and first[1]["items"] == second[1]["items"]
  assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 1)
  assert _post(server, {**body, "query": "another query"})[0] == 200
  assert _health(server)["query_cache"]["misses"] - after["misses"] == 1


@pytest.mark.parametrize("case", [
    ("unknown scenario", {"scenario": "nope", "history": ["{0}"]}, 400, "scenario"),
    ("unknown item", {"scenario": "office_homepage", "history": ["{0}", "NOPE"]}, 400, "history[1]"),
    ("history not a list", {"scenario": "office_homepage", "history": "{0}"}, 400, "history"),
    ("history item not a string", {"scenario": "office_homepage", "history": [12]}, 400, "history[0]"),
    ("history too long", {"scenario": "office_homepage", "history": ["{0}"] * 300}, 400, "history"),
    ("empty history", {"scenario": "office_homepage", "history": []}, 400, "history"),
    ("k zero", {"scenario": "office_homepage", "history": ["{0}"], "k": 0}, 400, "k"),
    ("k above beam", {"scenario": "office_homepage", "history": ["{0}"], "k": BEAM + 1}, 400, "k"),
    ("k not an int", {"scenario": "office_homepage", "history": ["{0}"], "k": "5"}, 400, "k"),
    ("beam not exported", {"scenario": "office_homepage", "history": ["{0}"], "beam": 256}, 400, "beam"),
    ("unknown field", {"scenario": "office_homepage", "history": ["{0}"], "bream": 3}, 400, "bream"),
    ("i2i without trigger", {"scenario": "office_i2i", "history": ["{0}"]}, 400, "trigger"),
    ("trigger on homepage", {"scenario": "office_homepage", "history": ["{0}"], "trigger": "{0}"}, 400, "trigger"),
    ("unknown trigger", {"scenario": "office_i2i", "trigger": "NOPE"}, 400, "trigger"),
    ("search without query", {"scenario": "office_search", "history": ["{0}"]}, 400, "query"),
    ("query on homepage", {"scenario": "office_homepage", "history": ["{0}"], "query": "pen"}, 400, "query"),
    ("query too long", {"scenario": "office_search", "history": ["{0}"], "query": "x" * 600}, 400, "query"),
    ("user not a string", {"scenario": "office_homepage", "history": ["{0}"], "user": 7}, 400, "user"),
    ("unknown user and no history", {"scenario": "office_homepage", "user": "NO-SUCH-USER"}, 400, "user"),
    ("not an object", ["{0}"], 400, None),
], ids=lambda c: c[0])
def test_each_bad_request_gets_a_4xx_naming_the_field(exported, server, case):
  _, predictor = exported
  _, body, status, field = case
  item = _office_ids(predictor)[0]
  body = json.loads(json.dumps(body).replace("{0}", item))
  got_status, ans = _post(server, body)
  assert (got_status, ans["field"]) == (status, field), ans
  assert ans["error"]


def test_malformed_bodies_and_paths(server):
  status, ans = _post(server, None, raw=b"{not json")
  assert status == 400 and ans["field"] == "body" and "not JSON" in ans["error"]
  status, ans = _post(server, None, raw=b"x" * (serve.Limits.max_body_bytes + 1))
  assert status == 413 and ans["field"] == "body"
  status, ans = _post(server, {"history": []}, path="/v1/other")
  assert status == 404 and ans["field"] == "path"


def _office_examples(n):
  """Test examples of n different Office users (a user may have several test examples)."""
  ds = readers.load_dataset("office")
  out, seen = [], set()
  for ex in ds.test:
    if ex.user not in seen and len(ex.history) >= 2:
      seen.add(ex.user)
      out.append(ex)
    if len(out) == n:
      return ds, out


def _office_user(predictor):
  """A real Office user and its test history, as raw ids."""
  ds, (ex,) = _office_examples(1)
  return ds, ex, ds.raw_user_ids[ex.user], [ds.raw_item_ids[i] for i in ex.history]


def _record(ds, ex, **kw):
  fields = dict(dataset="office", user=ds.raw_user_ids[ex.user], cutoff=len(ex.history), scenario="homepage",
                history_key=prompt_lib.history_key(ds, ex), text="wants a refill for a fountain pen",
                embedding=HashEncoder().encode(["wants a refill for a fountain pen"])[0], model_version="test",
                created_at=time.time(), context_key="ctx", status="generated")
  fields.update(kw)
  return InstructionRecord(**fields)


def test_instructions_come_from_the_near_line_store_when_fresh(exported, tmp_path):
  out, predictor = exported
  ds, (ex, other, poor, unseen) = _office_examples(4)
  user, history = ds.raw_user_ids[ex.user], [ds.raw_item_ids[i] for i in ex.history]
  store = InstructionStore(tmp_path / "store")
  store.put([_record(ds, ex),
             _record(ds, other, history_key="0" * 16),  # written for an older history: stale
             _record(ds, poor, status="fallback", text="", embedding=np.zeros(384, np.float32))])
  srv = serve.Server(out, store=str(tmp_path / "store"), encoder=HashEncoder(), warmup=False, log=lambda *a: None)
  rec = srv.recommender

  def ask(e):
    return rec.recommend([{"scenario": "office_homepage", "user": ds.raw_user_ids[e.user],
                           "history": [ds.raw_item_ids[i] for i in e.history], "k": BEAM}])[0]

  fresh = ask(ex)
  assert fresh.instruction == {"source": "near_line", "reason": "fresh"}
  assert ask(other).instruction == {"source": "default", "reason": "stale"}
  assert ask(poor).instruction == {"source": "default", "reason": "fallback"}
  assert ask(unseen).instruction == {"source": "default", "reason": "missing"}
  # The stored embedding is what the model read: the same answer as the in-process model given it.
  want = predictor.recommend(history, top_k=BEAM, scenario="office_homepage",
                             instruction="wants a refill for a fountain pen")
  assert [x["item_id"] for x in fresh.items] == [w[0] for w in want]
  np.testing.assert_allclose([x["score"] for x in fresh.items], [w[1] for w in want], rtol=0, atol=1e-4)
  default = rec.recommend([{"scenario": "office_homepage", "history": history, "k": BEAM}])[0]
  assert [x["score"] for x in default.items] != [x["score"] for x in fresh.items]  # it did change the input
  # Too old for the server's age limit: stale.
  srv2 = serve.Server(out, store=str(tmp_path / "store"), instruction_max_age_s=0.0, encoder=HashEncoder(),
                      warmup=False, log=lambda *a: None)
  time.sleep(0.01)
  assert srv2.recommender.recommend([{"scenario": "office_homepage", "user": user, "history": history}])[0] \
      .instruction == {"source": "default", "reason": "stale"}
  for s in (srv, srv2):
    s.close()


class BlockedBackend:
  """An LLM that hangs until released (a slow or stuck backend)."""

  version = "blocked-v0"

  def __init__(self):
    self.release, self.entered = threading.Event(), threading.Event()

  def generate(self, batch):
    self.entered.set()
    self.release.wait(60)
    return ["\n  *** --- ###\n"] * len(batch)  # garbage: no usable sentence -> fallback records


def test_a_stuck_or_garbage_llm_never_holds_up_or_fails_a_request(exported, tmp_path):
  """The near-line job runs against a backend that blocks; while it is stuck the server answers
  (so no request path waits on it). When it returns garbage the job writes fallback records, and
  after the snapshot reload the user gets the default instruction with reason 'fallback'."""
  out, predictor = exported
  ds, ex, user, history = _office_user(predictor)
  store_dir = tmp_path / "store"
  store = InstructionStore(store_dir)
  backend = BlockedBackend()
  job = threading.Thread(target=run_job, args=(ds, [ex], store, backend, HashEncoder()), daemon=True)
  # No warmup: the first request compiles its program, so its deadline is generous (60 s); the
  # LLM stays blocked until released below, so an answer at all proves no request waits on it.
  srv = serve.Server(out, store=str(store_dir), store_reload_s=0, encoder=HashEncoder(), warmup=False,
                     request_timeout_s=60.0, log=lambda *a: None).start()
  try:
    job.start()
    assert backend.entered.wait(30)
    status, ans = _post(srv, {"scenario": "office_homepage", "user": user, "history": history})
    assert status == 200 and ans["instruction"] == {"source": "default", "reason": "missing"}
    assert job.is_alive() and not backend.release.is_set()  # answered while the LLM was stuck
    backend.release.set()
    job.join(60)
    assert [r.status for r in InstructionStore(store_dir).records()] == ["fallback"]
    srv.instructions.reload()
    status, ans = _post(srv, {"scenario": "office_homepage", "user": user, "history": history})
    assert status == 200 and ans["instruction"] == {"source": "default", "reason": "fallback"}
  finally:
    backend.release.set()
    srv.close()


def test_concurrent_requests_share_calls_and_get_their_own_answers(exported, server):
  _, predictor = exported
  rec = server.recommender
  ids = _office_ids(predictor)
  bodies = [{"scenario": "office_homepage", "history": ids[i:i + 3], "k": 5} for i in range(16)]
  alone = [[x["item_id"] for x in rec.recommend([b])[0].items] for b in bodies]
  batcher = serve.Batcher(rec, max_wait_s=0.5, timeout_s=30)
  got = [None] * len(bodies)
  start = threading.Barrier(len(bodies))

  def client(i):
    start.wait()
    got[i] = [x["item_id"] for x in batcher.submit(bodies[i]).items]

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  batcher.close()
  assert got == alone
  assert batcher.rows == len(bodies) and batcher.batches < len(bodies)  # requests were batched together


def test_an_idle_server_runs_a_request_without_waiting_the_batch_window(exported, server):
  """The window is waited only while another batch is in the model: with a window far longer than
  the deadline, a lone request is still answered (before this, it waited the window out and got
  DeadlineExceeded), and so is a second one after it; under load the window still batches (the
  test above)."""
  _, predictor = exported
  rec = server.recommender
  ids = _office_ids(predictor)
  bodies = [{"scenario": "office_homepage", "history": ids[i:i + 3], "k": 5} for i in range(2)]
  batcher = serve.Batcher(rec, max_wait_s=600.0, timeout_s=60)
  try:
    got = [[x["item_id"] for x in batcher.submit(b).items] for b in bodies]
  finally:
    batcher.close()
  assert got == [[x["item_id"] for x in rec.recommend([b])[0].items] for b in bodies]
  assert batcher.batches == 2 and batcher.rows == 2
  # `wait_when_idle` waits the window for every batch: the lone request now outlives its deadline
  batcher = serve.Batcher(rec, max_wait_s=600.0, timeout_s=1.0, wait_when_idle=True)
  try:
    with pytest.raises(serve.DeadlineExceeded):
      batcher.submit(bodies[0])
  finally:
    batcher.close()


def _blocked_infer(monkeypatch, model, gate, timeout_s: float = 30):
  """`model.infer` waits on `gate` (an Event or a Barrier) before it runs."""
  real = model.infer

  def infer(rows, beam):
    gate.wait(timeout_s)
    return real(rows, beam)

  monkeypatch.setattr(model, "infer", infer)


def test_a_full_queue_gets_503_and_a_late_answer_504(exported, server, monkeypatch):
  _, predictor = exported
  body = {"scenario": "office_homepage", "history": _office_ids(predictor)[:2]}
  release = threading.Event()
  _blocked_infer(monkeypatch, server.model, release)  # the model is busy: nothing is answered
  batcher = serve.Batcher(server.recommender, max_wait_s=0.0, queue_size=1, timeout_s=0.5, workers=1)
  errors = []

  def client():
    try:
      batcher.submit(body)
    except (serve.QueueFull, serve.DeadlineExceeded) as e:
      errors.append(type(e))

  threads = [threading.Thread(target=client) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  release.set()
  batcher.close()
  assert serve.QueueFull in errors and serve.DeadlineExceeded in errors and len(errors) == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_batch_workers_run_calls_at_once(exported, server, monkeypatch, workers):
  """With two workers two batches are in the model at the same time (each call waits for the
  other at a barrier; with one worker the first call waits alone and the barrier breaks), and
  each request still gets its own answer."""
  _, predictor = exported
  ids = _office_ids(predictor)
  bodies = [{"scenario": "office_homepage", "history": ids[i:i + 2], "k": 5} for i in range(2)]
  alone = [[x["item_id"] for x in server.recommender.recommend([b])[0].items] for b in bodies]
  _blocked_infer(monkeypatch, server.model, threading.Barrier(2), timeout_s=3 if workers == 1 else 30)
  batcher = serve.Batcher(server.recommender, max_batch=1, max_wait_s=0.0, timeout_s=30, workers=workers)
  got, failed = [None, None], []

  def client(i):
    try:
      got[i] = [x["item_id"] for x in batcher.submit(bodies[i]).items]
    except threading.BrokenBarrierError as e:
      failed.append(e)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  batcher.close()
  if workers == 2:
    assert got == alone and not failed and batcher.batches == 2
  else:
    assert failed  # one call at a time: the first never met a second


def test_a_serving_directory_that_does_not_match_is_refused(exported, tmp_path):
  out, _ = exported
  import shutil

  bad = tmp_path / "serving"
  shutil.copytree(out, bad)
  with open(bad / export_lib.MANIFEST) as f:
    m = json.load(f)
  m["artifact_digest"] = "0" * 16
  with open(bad / export_lib.MANIFEST, "w") as f:
    json.dump(m, f)
  with pytest.raises(export_lib.ExportError, match="artifact digest"):
    serve.ServingModel(str(bad), log=lambda *a: None)
  os.remove(bad / export_lib.MANIFEST)
  with pytest.raises(export_lib.ExportError, match="serving.json is missing"):
    serve.ServingModel(str(bad), log=lambda *a: None)


def test_a_user_id_alone_reads_the_users_latest_behaviours(exported, server):
  """users.jsonl (export --user_histories) holds each user's test history plus its target; a
  request with only the user id answers as if that history had been sent."""
  _, predictor = exported
  ds, (ex,) = _office_examples(1)
  user = ds.raw_user_ids[ex.user]
  latest = max((e for e in ds.test if e.user == ex.user), key=lambda e: len(e.history))
  want_history = [ds.raw_item_ids[i] for i in tuple(latest.history) + (latest.target,)][-TINY.max_history:]
  assert server.model.user_history("office", user) == want_history
  by_user = server.recommender.recommend([{"scenario": "office_homepage", "user": user}])[0]
  by_history = server.recommender.recommend([{"scenario": "office_homepage", "history": want_history}])[0]
  assert by_user.history == "profile" and by_history.history == "request"
  assert by_user.items == by_history.items


def test_a_batch_runs_in_the_buckets_that_waste_least(exported, server):
  sm = server.model
  assert sm.batch_sizes == [1, 8]
  assert sm.plan(1) == [1] and sm.plan(8) == [8] and sm.plan(7) == [8]  # 1 padding row of 8: fine
  assert sm.plan(3) == [1, 1, 1] and sm.plan(17) == [8, 8, 1]  # never 5 padding rows of 8
  sm_buckets = sm.batch_sizes
  try:
    sm.batch_sizes = [1, 2, 4, 8, 16, 32, 64]
    assert sm.plan(17) == [16, 1] and sm.plan(23) == [16, 8] and sm.plan(64) == [64] and sm.plan(130) == [64, 64, 2]
  finally:
    sm.batch_sizes = sm_buckets
  # 11 rows (8 + 1 + 1 + 1 calls) answer as each row alone (bucket 8 vs 1: the float tolerance
  # of tests/models/test_batch_independence.py).
  _, predictor = exported
  ids = _office_ids(predictor)
  bodies = [{"scenario": "office_homepage", "history": ids[i:i + 4], "k": BEAM} for i in range(11)]
  together = server.recommender.recommend(bodies)
  for i, b in enumerate(bodies):
    alone = server.recommender.recommend([b])[0]

    def arrays(ans):
      return (predictor.artifact.item_indices([x["item_id"] for x in ans.items]),
              np.asarray([x["score"] for x in ans.items]))

    _assert_same_ranking(*arrays(together[i]), *arrays(alone), f"row {i} of 11")


def test_the_second_stage_runs_inside_the_exported_program(exported, tmp_path):
  """A run's SASRec second stage (`rescoring.SecondStage`) exported with the model: each row's
  answer, alone (bucket 1) and packed with others and padding (bucket 8), is the NumPy reference
  second stage (tests/test_rescoring.py) applied to the in-process model's beams: the beams and
  SASRec's top items of the scenario's own pool, by log p + weight * log p_SASRec, each row at its
  scenario's weight (one stage, weights 1.5 / 3 / 0 by scenario, rows of all three packed in one
  call). The export without a stage (the fixture's run has none) answers with the beams, saying so."""
  from oxyjax import rescoring
  from tests.sid.test_sasrec import TINY as SASREC_TINY
  from tests.test_rescoring import assert_fused_order, numpy_second_stage

  out, predictor = exported
  assert serve.ServingModel(out, log=lambda *a: None).second_stage is None
  art = predictor.artifact
  seqs, n = rescoring.dataset_sequences("office")
  assert n == art.num_items
  weights = {"office_homepage": 1.5, "office_i2i": 3.0, "office_search": 0.0}
  assert [s["name"] for s in art.scenarios] == list(weights)  # scenario ids 0, 1, 2
  stage = rescoring.SecondStage(rescoring.train(seqs, n, SASREC_TINY, seed=0), 1.5, 6,
                                scenario_weights=tuple(weights.values()))
  stage.save(str(tmp_path / "stage"))
  sdir = export_lib.export_run(os.path.join(os.path.dirname(out), "run"), str(tmp_path / "serving"),
                               batch_sizes=(1, 8), beam_sizes=(BEAM,), second_stage=str(tmp_path / "stage"),
                               log=lambda *a: None)
  sm = serve.ServingModel(sdir, log=lambda *a: None)
  assert sm.second_stage["union"] == 6 and sm.second_stage["scenario_weights"] == [1.5, 3.0, 0.0]
  rec = serve.Recommender(sm, encoder=HashEncoder())
  bodies = _requests(predictor)
  rows = [rec.prepare(b)[0] for b in bodies]
  packed_items, packed_scores = sm.infer(rows[::-1] + rows, BEAM)
  assert packed_items.shape == (8, BEAM + 6)
  added = 0
  for i, (body, row) in enumerate(zip(bodies, rows)):
    want_items, want_scores = _in_process(predictor, body)
    beams = art.item_indices(want_items)[None]
    pool = set(art.pools[body["scenario"]].tolist())
    w = weights[body["scenario"]]
    ref = numpy_second_stage(predictor.model, predictor.params, stage.scorer, art.sid_table.codes, row, beams,
                             want_scores[None].astype(np.float32), 6, w, pool=pool)
    alone_items, alone_scores = sm.infer([row], BEAM)
    for items, scores in ((alone_items[0], alone_scores[0]), (packed_items[3 - i], packed_scores[3 - i]),
                          (packed_items[4 + i], packed_scores[4 + i])):
      assert_fused_order(items, ref["items"][0], ref["fused"][0], w)
      live = items > 0
      assert set(items[live].tolist()) <= pool
      np.testing.assert_allclose(scores[live], np.sort(ref["fused"][0][np.isfinite(ref["fused"][0])])[::-1],
                                 rtol=1e-4, atol=1e-4)
    added += int((alone_items[0] > 0).sum()) - BEAM
    ans = rec.recommend([body])[0]
    assert ans.ranking == "second_stage"
    np.testing.assert_array_equal(art.item_indices([x["item_id"] for x in ans.items]), alone_items[0][:BEAM])
  assert added > 0  # SASRec brought items beam search did not return


def test_a_bfloat16_export_takes_its_weight_kernels_in_bfloat16_and_answers_like_the_model(exported, tmp_path):
  """`--matmul_dtype=bfloat16` (`ModelConfig.matmul_dtype`): the manifest gives exactly the
  weight kernels (`layers.WEIGHT_KERNELS`) in bfloat16 and every other parameter in float32, the
  server casts the saved float32 weights to those dtypes at load, and each request (bucket 1)
  answers like the in-process `Predictor` with the same option, whose program rounds the float32
  weights itself: a kernel used unrounded on either path would move the scores by about 2^-9
  relative, far outside the float32 tolerance of tests/models/test_batch_independence.py used
  here. Its scores differ from the float32 export's by more than that tolerance (the option takes
  effect). Packed rows (bucket 8) are not compared here: a float32 summation-order difference can
  move an activation across a bfloat16 rounding boundary, a change this tolerance does not bound."""
  from oxyjax.models import layers
  from tests.models.test_batch_independence import REL_TOL

  out, predictor = exported
  run_dir = os.path.join(os.path.dirname(out), "run")
  bdir = export_lib.export_run(run_dir, str(tmp_path / "serving_bf16"), batch_sizes=(1,), beam_sizes=(BEAM,),
                               matmul_dtype="bfloat16", log=lambda *a: None)
  sm = serve.ServingModel(bdir, log=lambda *a: None)
  assert sm.matmul_dtype == "bfloat16" and serve.ServingModel(out, log=lambda *a: None).matmul_dtype == "float32"
  spec = {path: dtype for path, _, dtype in sm.manifest["params"]}
  kernels = {p for p in spec if p.rpartition("['")[2].rstrip("']") in layers.WEIGHT_KERNELS}
  assert kernels and len(kernels) < len(spec)
  assert all(spec[p] == "bfloat16" for p in kernels) and all(spec[p] == "float32" for p in set(spec) - kernels)
  leaves = dict(zip(spec, [x.dtype for x in jax.tree_util.tree_leaves(sm.params)]))
  assert all(str(leaves[p]) == spec[p] for p in spec)  # the server holds them as the programs take them

  bf16 = predict_lib.Predictor(run_dir, beam_size=BEAM, matmul_dtype="bfloat16")
  bf16.embed = predictor.embed
  assert _answers_like(sm, bf16, predictor) > 2 * REL_TOL


def _answers_like(sm, same_option, predictor) -> float:
  """Each of `_requests` served alone by `sm` ranks like the in-process `same_option` (a
  `Predictor` with the export's inference option); returns how far, at most, its scores moved
  from `predictor`'s (the default options), relative to 1 + |score|."""
  rec = serve.Recommender(sm, encoder=HashEncoder())
  moved = 0.0
  for body in _requests(predictor):
    got = rec.recommend([body])[0]
    items = np.asarray(predictor.artifact.item_indices([x["item_id"] for x in got.items]))
    scores = np.asarray([x["score"] for x in got.items])
    want_items, want_scores = _in_process(same_option, body)
    _assert_same_ranking(items, scores, predictor.artifact.item_indices(want_items), want_scores, body["scenario"])
    _, base_scores = _in_process(predictor, body)
    moved = max(moved, float(np.max(np.abs(np.sort(want_scores) - np.sort(base_scores)) / (1 + np.abs(base_scores)))))
  return moved


def test_a_last_valid_export_answers_like_the_model_with_that_normalisation(exported, tmp_path):
  """`--normalize=last_valid` (`decoding.beam_search`: the last SID level, the collision index, scored
  over the prefix's items only, and that step run only on the beams whose prefix has siblings):
  each request answers like the in-process `Predictor` with the same option, within the float
  tolerance of tests/models/test_batch_independence.py, and the manifest records it. The option
  takes effect: at least one request's scores differ from the default export's by more than that
  tolerance (an item alone under its prefix loses its last level's log-probability, which the
  default counts)."""
  from tests.models.test_batch_independence import REL_TOL

  out, predictor = exported
  run_dir = os.path.join(os.path.dirname(out), "run")
  ldir = export_lib.export_run(run_dir, str(tmp_path / "serving_lv"), batch_sizes=(1, 8), beam_sizes=(BEAM,),
                               normalize="last_valid", log=lambda *a: None)
  sm = serve.ServingModel(ldir, log=lambda *a: None)
  assert sm.manifest["normalize"] == "last_valid"
  lv = predict_lib.Predictor(run_dir, beam_size=BEAM, normalize="last_valid")
  lv.embed = predictor.embed
  assert _answers_like(sm, lv, predictor) > 2 * REL_TOL
