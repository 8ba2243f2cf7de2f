r"""Serving latency: the exported programs in-process and the HTTP endpoint, beside brute force.

  python benchmarks/serve_latency.py                       # small + 0.1B over Beauty, ~15 min on 2 cores
  python benchmarks/serve_latency.py --models=small --out=docs/bench/serve_latency
  python benchmarks/serve_latency.py --models=small,small+rescoring --out=docs/bench/serve_latency_rescoring

A model name `<model>+rescoring` is that model exported with the SASRec second stage inside its
programs (`rescoring.SecondStage` with the weight and union of gin_configs/defaults/small.gin, the
default SASRec shape; randomly initialised unless --sasrec names a saved scorer or stage: its cost
does not depend on the weights' values, every row always has its `union` extra paths scored), and
`<model>+rescoring<k>` the same with union k; each is measured in the same run as the model
without it. A suffix `@bfloat16` exports the programs with bfloat16 weight products
(`python -m oxyjax.export --matmul_dtype=bfloat16`), e.g. `small+rescoring10@bfloat16`.

For each model (gin_configs/models/<name>.gin over Amazon Beauty's SID trie, 12,101 items;
randomly initialised unless --small_weights names a trained params checkpoint: the latency of a
constrained beam search does not depend on the weights' values, every beam is full at every
level) the benchmark

1. exports the serving programs (`oxyjax.export`: batch buckets 1, 2, 4, ..., 64 x beams 20, 256,
   512; the 0.1B model only the measured batch sizes);
2. in-process: `ServingModel.infer` of B test histories at beam W, p50 / p99 over reps (the
   compiled call from host features to host items, what the server's batcher runs);
3. brute force, in the same run: every item of the pool scored by its full SID path's
   log-likelihood (teacher-forced, encoder once per row, items in chunks), top-K; batch 1 and 8;
4. through HTTP (small model): `python -m oxyjax.serve` in a subprocess on loopback;
   one client at a time (batch 1) per beam, then C concurrent keep-alive clients (the batcher
   packs them: batch ~C) for a fixed number of requests: p50 / p99 and requests/s;
5. a bounded load test at beam 20 (`--load_requests` from `--load_clients` clients, then it
   stops): errors, the latency distribution (PNG) and a table;
6. an open-loop load test at beam 20: requests arrive at a fixed rate (`--open_loop_rates`
   requests/s, Poisson arrivals, for `--open_loop_s` seconds each) whether or not earlier ones
   have been answered, and each latency runs from the request's scheduled arrival, so a server
   that falls behind shows it in its p99 rather than in a lower request rate (a closed loop of
   C clients never offers more than the server answers). This measures the ">= 300 requests/s
   with p99 < 100 ms" target directly. PNG at --open_loop_png.

7. paired through HTTP (`--sections=paired_http`, small models): one server per model, all
   started at once, and one client that sends each request to every server in turn (who goes
   first alternates), `--http_requests` per beam; each model's p50 / p99 and the per-request
   difference from the first model. The sections above measure one model after the other, so
   a drift of the machine between them (a few ms at beam 256 on a shared 2-core host) lands in
   their difference; here it falls on every model alike.

     python benchmarks/serve_latency.py --models=small,small+rescoring10 --beam_sizes=256 --batch_sizes=1 \
         --buckets=1 --sections=paired_http --http_requests=1000 --out=docs/bench/serve_b256_paired

`--sections` runs a subset, e.g. `--sections=open_loop` (the server still compiles every bucket
at start).

Figures: JSON + markdown under --out, PNG at --png; the CPU model is printed and recorded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax_compilation_serve"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
SECTIONS = ("in_process", "brute_force", "http", "load", "open_loop", "paired_http")


def pct(xs, q):
  return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def build(model_name: str, dataset: str, weights: str | None):
  import gin
  import jax
  import flax.linen as nn

  from oxyjax import checkpoints
  from oxyjax import experiment
  from oxyjax.artifact import ModelArtifact
  from oxyjax.data import readers
  from oxyjax.models import encoder_decoder
  from oxyjax.models.rec_model import RecModel

  gin.clear_config()
  gin.parse_config_files_and_bindings([os.path.join(REPO, "gin_configs", "models", f"{model_name}.gin")], [])
  cfg = gin.get_configurable(encoder_decoder.ModelConfig)()
  table = experiment.load_sid_table(dataset, experiment.SIDConfig())
  model = RecModel(cfg, table.codes)
  ds = readers.load_dataset(dataset)
  art = ModelArtifact.from_dataset(ds, table, model.config, data_fingerprint=readers.dataset_fingerprint(dataset))
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(1)))
  if weights:
    params, _ = checkpoints.load_params(weights, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return model, params, art, ds, n_params


def default_stage_settings() -> tuple[float, int]:
  """The default configuration's second stage: ``(weight, union)`` of gin_configs/defaults/small.gin."""
  import gin

  from oxyjax import train  # noqa: F401  (the gin names)

  gin.clear_config()
  gin.add_config_file_search_path(os.path.join(REPO, "gin_configs"))
  gin.parse_config_files_and_bindings([os.path.join(REPO, "gin_configs", "defaults", "small.gin")], [],
                                      finalize_config=False)
  cfg = gin.get_configurable("oxyjax.train.RescoringConfig")()
  gin.clear_config()
  return cfg.weight, cfg.union


def second_stage(art, sasrec_dir: str | None, weight: float, union: int):
  """A second stage over `art`'s catalogue: a saved scorer, or SASRec's default shape randomly
  initialised (latency does not depend on its weights' values)."""
  import jax

  from oxyjax import rescoring
  from oxyjax.sid import sasrec as sasrec_lib

  if sasrec_dir:
    scorer = rescoring.SASRecScorer.load(sasrec_dir, num_items=art.num_items)
  else:
    cfg = sasrec_lib.SASRecConfig()
    params = sasrec_lib.make_model(art.num_items, cfg).init(
        jax.random.key(0), np.zeros((1, cfg.max_len), np.int32), train=False)["params"]
    scorer = rescoring.SASRecScorer(cfg, art.num_items, params, digest="random-init")
  return rescoring.SecondStage(scorer, weight, union)


def request_bodies(ds, n: int, k: int, beam: int, max_history: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  exs = [ds.test[i] for i in rng.choice(len(ds.test), size=n)]
  return [{"history": [ds.raw_item_ids[i] for i in ex.history[-max_history:]], "k": k, "beam": beam} for ex in exs]


def time_calls(fn, inputs, reps: int, budget_s: float, min_reps: int = 5):
  out = []
  t_end = time.perf_counter() + budget_s
  for i in range(reps):
    t = time.perf_counter()
    fn(inputs[i % len(inputs)])
    out.append(time.perf_counter() - t)
    if i + 1 >= min_reps and time.perf_counter() > t_end:
      break
  return out


def brute_force_fn(model, codes_all, items_all, k: int, chunk: int = 2048):
  """Scores every pool item's SID path for each row (teacher-forced log-likelihood), top-k."""
  import jax
  import jax.numpy as jnp

  from oxyjax.models.encoder_decoder import EncoderDecoder

  n = codes_all.shape[0]
  pad = -n % chunk
  codes = jnp.asarray(np.concatenate([codes_all, np.zeros((pad, codes_all.shape[1]), np.int32)]))
  valid = jnp.asarray(np.arange(n + pad) < n)
  chunks = codes.reshape(-1, chunk, codes.shape[1])

  @jax.jit
  def run(params, batch):
    b = batch["scenario"].shape[0]

    def score(c):
      cb = jnp.broadcast_to(c[None], (b,) + c.shape)
      logits = model.network.apply({"params": params}, batch, cb, method=EncoderDecoder.group_logits)
      lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return jnp.take_along_axis(lp, cb[..., None], axis=-1)[..., 0].sum(-1)  # [b, chunk]

    s = jax.lax.map(score, chunks)  # [n_chunks, b, chunk]
    s = jnp.moveaxis(s, 0, 1).reshape(b, -1)
    s = jnp.where(valid[None], s, -jnp.inf)
    top, idx = jax.lax.top_k(s, k)
    return jnp.asarray(items_all)[jnp.minimum(idx, n - 1)], top

  return run


class ServerProc:
  def __init__(self, serving_dir: str, max_wait_ms: float, batch_workers: int, wait_when_idle: bool = False,
               extra_flags: tuple[str, ...] = ()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "oxyjax.serve", f"--serving_dir={serving_dir}", "--port=0",
         f"--max_batch_wait_ms={max_wait_ms}", "--request_timeout_s=30", "--queue_size=1024",
         f"--batch_workers={batch_workers}", f"--{'' if wait_when_idle else 'no'}batch_wait_when_idle",
         *extra_flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.url = None
    for line in self.proc.stdout:
      if line.startswith("[serve] http://"):
        self.url = line.split()[1]
        break
    if self.url is None:
      raise RuntimeError("the server did not start")
    hostport = self.url.split("//")[1].split("/")[0]
    self.host, self.port = hostport.split(":")[0], int(hostport.split(":")[1])
    threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

  def health(self):
    c = http.client.HTTPConnection(self.host, self.port, timeout=30)
    c.request("GET", "/healthz")
    return json.loads(c.getresponse().read())

  def close(self):
    self.proc.terminate()
    self.proc.wait(30)


def http_clients(srv: ServerProc, bodies, clients: int, total: int):
  """`clients` keep-alive clients send `total` requests in all; returns (latencies, errors, wall_s)."""
  lat, errors, lock = [], [], threading.Lock()
  counter = iter(range(total))
  start = threading.Barrier(clients + 1)

  def client(c):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    start.wait()
    mine = []
    for i in counter:
      data = json.dumps(bodies[i % len(bodies)])
      t = time.perf_counter()
      try:
        conn.request("POST", "/v1/recommend", data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
          errors.append((r.status, body[:200]))
      except (OSError, http.client.HTTPException) as e:
        errors.append(("conn", repr(e)))
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
      mine.append(time.perf_counter() - t)
    with lock:
      lat.extend(mine)

  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  start.wait()
  t0 = time.perf_counter()
  for t in threads:
    t.join()
  return lat, errors, time.perf_counter() - t0


def open_loop(srv: ServerProc, bodies, rate: float, duration_s: float, connections: int, seed: int = 0):
  """Requests arrive at `rate` per second (Poisson, seeded) for `duration_s` seconds, however far
  behind the server is; `connections` keep-alive connections (a thread each) send them. A latency
  runs from the request's scheduled arrival to its answer, so waiting for a free connection counts
  (no coordinated omission). Returns (latencies, send delays, errors, wall seconds)."""
  n = max(1, int(round(rate * duration_s)))
  arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
  jobs: queue.Queue = queue.Queue()
  lat, delay, done = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
  errors, lock = [], threading.Lock()

  def worker():
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    while (job := jobs.get()) is not None:
      i, t_sched = job
      t_send = time.perf_counter()
      try:
        conn.request("POST", "/v1/recommend", json.dumps(bodies[i % len(bodies)]),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
          with lock:
            errors.append((r.status, body[:200]))
      except (OSError, http.client.HTTPException) as e:
        with lock:
          errors.append(("conn", repr(e)))
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
      done[i] = time.perf_counter()
      lat[i], delay[i] = done[i] - t_sched, t_send - t_sched

  threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
  for t in threads:
    t.start()
  t0 = time.perf_counter() + 0.05
  for i, a in enumerate(arrivals):
    t_sched = t0 + a
    if (dt := t_sched - time.perf_counter()) > 0:
      time.sleep(dt)
    jobs.put((i, t_sched))
  for _ in threads:
    jobs.put(None)
  for t in threads:
    t.join()
  return lat, delay, errors, float(np.nanmax(done) - t0)


def rows_per_call(h0: dict, h1: dict) -> float:
  """Rows per compiled call between two /healthz reads."""
  return (h1["rows"] - h0["rows"]) / max(h1["batches"] - h0["batches"], 1)


def http_cases(srv: ServerProc, ds, args, max_history: int, beam_sizes, client_counts, workers: int) -> list[dict]:
  """Per beam, one client at a time and then C concurrent clients."""
  print("\n| HTTP case | clients | p50 ms | p99 ms | req/s | rows per call | errors |\n|---|---|---|---|---|---|---|",
        flush=True)
  out = []
  for w in beam_sizes:
    for c in client_counts:
      bodies = request_bodies(ds, 256, args.k, w, max_history, seed=w + c)
      h0 = srv.health()
      total = max(args.http_requests, 4 * c) if c * w <= 8 * 512 else 2 * c
      lat, errors, wall = http_clients(srv, bodies, c, total)
      per_call = rows_per_call(h0, srv.health())
      out.append({"batch_workers": workers, "beam": w, "clients": c, "requests": len(lat),
                  "p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99), "req_per_s": len(lat) / wall,
                  "rows_per_call": per_call, "errors": len(errors)})
      print(f"| beam {w} | {c} | {1e3 * pct(lat, 50):.2f} | {1e3 * pct(lat, 99):.2f} | {len(lat) / wall:.0f} | "
            f"{per_call:.1f} | {len(errors)} |", flush=True)
  return out


def post(conn: http.client.HTTPConnection, data: str) -> tuple[float, int, bytes]:
  """One recommendation request on a keep-alive connection: (seconds, status, body)."""
  t = time.perf_counter()
  conn.request("POST", "/v1/recommend", data, {"Content-Type": "application/json"})
  r = conn.getresponse()
  body = r.read()
  return time.perf_counter() - t, r.status, body


def paired_http(servers: dict, ds, args, max_history: int, beam_sizes) -> list[dict]:
  """One client; each request goes to every server in turn (see the module docstring, 7)."""
  names = list(servers)
  print(f"\n| paired HTTP, 1 client, {' / '.join(names)} | p50 ms | p99 ms | median difference from "
        f"{names[0]} ms | errors |\n|---|---|---|---|---|", flush=True)
  out = []
  conns = {n: http.client.HTTPConnection(srv.host, srv.port, timeout=60) for n, srv in servers.items()}
  for w in beam_sizes:
    bodies = request_bodies(ds, 256, args.k, w, max_history, seed=w + 7)
    lat, errors = {n: [] for n in names}, []
    for i in range(-10, args.http_requests):  # 10 unrecorded rounds first
      data = json.dumps(bodies[i % len(bodies)])
      for n in names if i % 2 == 0 else names[::-1]:
        dt, status, body = post(conns[n], data)
        if status != 200:
          errors.append((n, status, body[:200]))
        if i >= 0:
          lat[n].append(dt)
    for n in names:
      diff = np.asarray(lat[n]) - np.asarray(lat[names[0]])
      out.append({"model": n, "beam": w, "requests": len(lat[n]), "p50_ms": 1e3 * pct(lat[n], 50),
                  "p99_ms": 1e3 * pct(lat[n], 99), "median_diff_ms": 1e3 * float(np.median(diff)),
                  "errors": sum(e[0] == n for e in errors)})
      print(f"| {n}, beam {w} | {1e3 * pct(lat[n], 50):.2f} | {1e3 * pct(lat[n], 99):.2f} | "
            f"{1e3 * float(np.median(diff)):+.2f} | {out[-1]['errors']} |", flush=True)
  return out


def closed_load(srv: ServerProc, bodies, clients: int, requests: int, name: str, workers: int, label: str) -> dict:
  """The bounded load test: `requests` from `clients` keep-alive clients at beam 20, then it stops."""
  h0 = srv.health()
  lat, errors, wall = http_clients(srv, bodies, clients, requests)
  load = {"model": name, "batch_workers": workers, "requests": len(lat), "clients": clients, "beam": 20,
          "errors": len(errors), "error_samples": [str(e) for e in errors[:5]], "wall_s": wall,
          "req_per_s": len(lat) / wall, "p50_ms": 1e3 * pct(lat, 50), "p90_ms": 1e3 * pct(lat, 90),
          "p99_ms": 1e3 * pct(lat, 99), "max_ms": 1e3 * max(lat), "rows_per_call": rows_per_call(h0, srv.health()),
          "latencies_ms": [round(1e3 * x, 3) for x in lat]}
  print(f"\nload test ({label}): {len(lat)} requests from {clients} clients at beam 20: {len(errors)} errors, "
        f"{load['req_per_s']:.0f} req/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
        f"max {load['max_ms']:.1f} ms, {load['rows_per_call']:.1f} rows per call", flush=True)
  return load


def open_loop_case(srv: ServerProc, bodies, rate: float, seconds: float, connections: int, name: str, workers: int,
                   label: str) -> dict:
  """`open_loop` at one arrival rate, at beam 20."""
  h0 = srv.health()
  lat, delay, errors, wall = open_loop(srv, bodies, rate, seconds, connections, seed=int(rate))
  ol = {"model": name, "batch_workers": workers, "offered_per_s": rate, "seconds": seconds, "requests": len(lat),
        "beam": 20, "connections": connections, "errors": len(errors), "error_samples": [str(e) for e in errors[:5]],
        "answered_per_s": len(lat) / wall, "p50_ms": 1e3 * pct(lat, 50), "p90_ms": 1e3 * pct(lat, 90),
        "p99_ms": 1e3 * pct(lat, 99), "max_ms": 1e3 * float(np.max(lat)), "send_delay_p99_ms": 1e3 * pct(delay, 99),
        "rows_per_call": rows_per_call(h0, srv.health())}
  print(f"open loop ({label}): {rate:.0f} req/s offered for {seconds:.0f} s, {ol['answered_per_s']:.0f} answered/s, "
        f"{len(errors)} errors, p50 {ol['p50_ms']:.1f} ms, p99 {ol['p99_ms']:.1f} ms, max {ol['max_ms']:.1f} ms (of "
        f"which before sending, p99 {ol['send_delay_p99_ms']:.1f} ms), {ol['rows_per_call']:.1f} rows per call",
        flush=True)
  return ol


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dataset", default="beauty")
  ap.add_argument("--models", default="small,base_0p1b")
  ap.add_argument("--small_weights", default=None, help="trained params checkpoint of the small model")
  ap.add_argument("--sasrec", default=None, help="a saved SASRec scorer (python -m oxyjax.rescoring) or second stage "
                  "for the <model>+rescoring variants (default: randomly initialised)")
  ap.add_argument("--batch_sizes", default="1,8,64", help="batch sizes measured (in-process) and client counts (HTTP)")
  ap.add_argument("--buckets", default="1,2,4,8,16,32,64", help="batch buckets exported for the small model's server")
  ap.add_argument("--beam_sizes", default="20,256,512")
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--reps", type=int, default=50)
  ap.add_argument("--case_budget_s", type=float, default=15.0, help="stop a case's reps after this (>= 5 reps)")
  ap.add_argument("--max_rows_0p1b", type=int, default=8 * 256,
                  help="0.1B cases with batch x beam above this are skipped on CPU (minutes per call)")
  ap.add_argument("--http_requests", type=int, default=200, help="requests per HTTP case")
  ap.add_argument("--load_requests", type=int, default=3000)
  ap.add_argument("--load_clients", type=int, default=32)
  ap.add_argument("--open_loop_rates", default="200,300,400", help="arrival rates (requests/s) of the open-loop test")
  ap.add_argument("--open_loop_s", type=float, default=15.0, help="seconds of arrivals per rate")
  ap.add_argument("--open_loop_connections", type=int, default=128, help="client connections of the open-loop test")
  ap.add_argument("--max_batch_wait_ms", type=float, default=2.0)
  ap.add_argument("--batch_workers", default="", help="the server's --batch_workers (default: its default); "
                  "several (1,2) start one server each, measured in turn")
  ap.add_argument("--wait_when_idle", default="0", help="the server's --batch_wait_when_idle: 0, 1, or 0,1 (one "
                  "server each, measured in turn; with --rounds, alternated)")
  ap.add_argument("--rounds", type=int, default=1, help="repeat the server settings' measurements this many times, "
                  "alternating the settings, so that a drift of the machine falls on each alike")
  ap.add_argument("--sections", default=",".join(SECTIONS), help="which parts to run (comma-separated)")
  ap.add_argument("--out", default=os.path.join(REPO, "docs", "bench", "serve_latency"))
  ap.add_argument("--png", default=os.path.join(REPO, "docs", "serving_latency.png"))
  ap.add_argument("--open_loop_png", default=os.path.join(REPO, "docs", "serving_open_loop.png"))
  args = ap.parse_args()
  sections = set(args.sections.split(","))
  if sections - set(SECTIONS):
    raise SystemExit(f"unknown --sections {sorted(sections - set(SECTIONS))}; known: {','.join(SECTIONS)}")

  import jax

  from oxyjax import export as export_lib
  from oxyjax import serve

  batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
  worker_counts = [int(x) for x in args.batch_workers.split(",")] if args.batch_workers else [serve.DEFAULT_BATCH_WORKERS]
  beam_sizes = [int(x) for x in args.beam_sizes.split(",")]
  cpu = cpu_model()
  print(f"# serve_latency on {cpu} ({os.cpu_count()} CPUs), jax {jax.__version__} {jax.default_backend()}", flush=True)
  report = {"cpu": cpu, "cpus": os.cpu_count(), "backend": jax.default_backend(), "dataset": args.dataset,
            "models": {}, "command": " ".join(sys.argv)}
  tmp = tempfile.mkdtemp(prefix="serve_latency-")
  loads, open_loops, paired_dirs = {}, {}, {}
  stage_settings = default_stage_settings() if "+" in args.models else None  # before `build` parses (and locks) gin
  for name in args.models.split(","):
    core, _, matmul_dtype = name.partition("@")
    base, _, variant = core.partition("+")
    rescored = re.fullmatch(r"rescoring(\d*)", variant)
    if (variant and not rescored) or matmul_dtype not in ("", "float32", "bfloat16"):
      raise SystemExit(f"unknown model variant {name!r} (<model>, <model>+rescoring or <model>+rescoring<k>, "
                       "each optionally with @float32 or @bfloat16)")
    model, params, art, ds, n_params = build(base, args.dataset, args.small_weights if base == "small" else None)
    stage = None
    if rescored:
      weight, union = stage_settings
      stage = second_stage(art, args.sasrec, weight, int(rescored.group(1) or union))
    is_big = n_params > 50e6
    cases = [(b, w) for w in beam_sizes for b in batch_sizes if not (is_big and b * w > args.max_rows_0p1b)]
    skipped = [(b, w) for w in beam_sizes for b in batch_sizes if (b, w) not in cases]
    sdir = os.path.join(tmp, name)
    t = time.perf_counter()
    served = set(int(x) for x in args.buckets.split(",")) if base == "small" else set()
    buckets = sorted({b for b, _ in cases} | served)
    export_lib.export_model(model, params, art, sdir, batch_sizes=buckets,
                            beam_sizes=sorted({w for _, w in cases}), second_stage=stage,
                            matmul_dtype=matmul_dtype or None, log=lambda *a: None)
    export_s = time.perf_counter() - t
    sm = serve.ServingModel(sdir, log=lambda *a: None)
    rec = serve.Recommender(sm)
    mrep = {"params": n_params, "items": art.num_items, "export_s": export_s, "in_process": [], "brute_force": [],
            "http": [], "skipped_cpu": [f"{b}x{w}" for b, w in skipped],
            "second_stage": {"weight": stage.weight, "union": stage.union, "sasrec": stage.scorer.config.to_dict(),
                             "sasrec_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(stage.params)),
                             "weights": args.sasrec or "random init"} if stage else None}
    print(f"\n## {name}: {n_params / 1e6:.1f}M parameters, {art.num_items} items; export {export_s:.1f}s; "
          f"skipped on this CPU: {mrep['skipped_cpu'] or 'none'}", flush=True)
    if sections & {"in_process", "brute_force"}:
      print("| case | compile s | p50 ms | p99 ms | rows/s | reps |\n|---|---|---|---|---|---|", flush=True)
    for b, w in cases if "in_process" in sections else []:
      bodies = request_bodies(ds, 64, args.k, w, model.config.max_history, seed=b * 1000 + w)
      rows = [rec.prepare(x)[0] for x in bodies]
      inputs = [rows[i:i + b] if i + b <= len(rows) else rows[:b] for i in range(0, len(rows), b)] or [rows[:b]]
      t = time.perf_counter()
      sm.infer(inputs[0], w)
      compile_s = time.perf_counter() - t
      times = time_calls(lambda r: sm.infer(r, w), inputs, args.reps, args.case_budget_s)
      p50, p99 = pct(times, 50), pct(times, 99)
      mrep["in_process"].append({"batch": b, "beam": w, "compile_s": compile_s, "p50_ms": 1e3 * p50,
                                 "p99_ms": 1e3 * p99, "rows_per_s": b / p50, "reps": len(times)})
      print(f"| in-process {b} x {w} | {compile_s:.1f} | {1e3 * p50:.2f} | {1e3 * p99:.2f} | {b / p50:.0f} | "
            f"{len(times)} |", flush=True)
    # Brute force costs (items x levels) decoder tokens per row: the 0.1B model only at batch 1, 3 reps.
    for b in [x for x in batch_sizes if x <= (1 if is_big else 8) and not variant and "brute_force" in sections]:
      bodies = request_bodies(ds, 64, args.k, beam_sizes[0], model.config.max_history, seed=7 + b)
      rows = [rec.prepare(x)[0] for x in bodies]
      feats = [{k: np.concatenate([r[k] for r in rows[i:i + b]]) for k in rows[0]} for i in range(0, 64, b)]
      codes = art.sid_table.codes[art.pools["all"]]
      bf = brute_force_fn(model, codes, art.pools["all"], args.k)
      t = time.perf_counter()
      jax.block_until_ready(bf(sm.params, feats[0]))
      compile_s = time.perf_counter() - t
      times = time_calls(lambda f: jax.block_until_ready(bf(sm.params, f)), feats, args.reps, args.case_budget_s,
                         min_reps=3 if is_big else 5)
      p50, p99 = pct(times, 50), pct(times, 99)
      mrep["brute_force"].append({"batch": b, "k": args.k, "compile_s": compile_s, "p50_ms": 1e3 * p50,
                                  "p99_ms": 1e3 * p99, "reps": len(times)})
      print(f"| brute force {b} (all {art.num_items} items, top {args.k}) | {compile_s:.1f} | {1e3 * p50:.2f} | "
            f"{1e3 * p99:.2f} | {b / p50:.0f} | {len(times)} |", flush=True)
    if base == "small":
      paired_dirs[name] = sdir
    if base == "small" and sections & {"http", "load", "open_loop"}:
      settings = [(r, w, bool(int(i))) for r in range(args.rounds) for w in worker_counts
                  for i in args.wait_when_idle.split(",")]
      for rnd, workers, idle_wait in settings:
        label = name if len(worker_counts) == 1 else f"{name}, {workers} batch worker{'s' * (workers > 1)}"
        label += (", window when idle" if idle_wait else "") + (f", round {rnd + 1}" if args.rounds > 1 else "")
        srv = ServerProc(sdir, args.max_batch_wait_ms, workers, idle_wait)
        try:
          if "http" in sections:
            mrep["http"] += http_cases(srv, ds, args, model.config.max_history, beam_sizes, batch_sizes, workers)
          bodies = request_bodies(ds, 1024, args.k, 20, model.config.max_history, seed=99)
          if "load" in sections:
            loads[label] = closed_load(srv, bodies, args.load_clients, args.load_requests, name, workers, label)
          for rate in [float(x) for x in args.open_loop_rates.split(",") if x] if "open_loop" in sections else []:
            open_loops.setdefault(label, []).append(
                open_loop_case(srv, bodies, rate, args.open_loop_s, args.open_loop_connections, name, workers, label))
        finally:
          srv.close()
    report["models"][name] = mrep
  if "paired_http" in sections and paired_dirs:
    servers = {}
    try:
      for name, sdir in paired_dirs.items():
        servers[name] = ServerProc(sdir, args.max_batch_wait_ms, worker_counts[0])
      report["paired_http"] = paired_http(servers, ds, args, model.config.max_history, beam_sizes)
    finally:
      for srv in servers.values():
        srv.close()
  load = next(iter(loads.values()), None)
  if loads:
    report["load_test"] = {k: v for k, v in load.items() if k != "latencies_ms"}
    report["load_tests"] = {n: {k: v for k, v in x.items() if k != "latencies_ms"} for n, x in loads.items()}
  if open_loops:
    report["open_loop"] = open_loops
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(report, f, indent=1)
  if load and args.png:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for (name, ld), color in zip(loads.items(), COLORS):
      lat = np.asarray(ld["latencies_ms"])
      ax[0].hist(lat, bins=60, color=color, alpha=.6, label=f"{name}: p50 {np.percentile(lat, 50):.1f}, "
                 f"p99 {np.percentile(lat, 99):.1f} ms")
      s = np.sort(lat)
      ax[1].plot(s, np.arange(1, len(s) + 1) / len(s), color=color,
                 label=f"{name}: {ld['req_per_s']:.0f} req/s, {ld['errors']} errors")
    ax[0].set_xlabel("latency (ms)")
    ax[0].set_ylabel("requests")
    ax[0].legend(fontsize=8)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("latency (ms, log)")
    ax[1].set_ylabel("fraction of requests")
    ax[1].grid(alpha=.3)
    ax[1].legend(fontsize=8)
    fig.suptitle(f"oxyjax.serve load test: {load['requests']} requests from {load['clients']} clients at beam 20, "
                 f"per model\n{cpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
  if open_loops and args.open_loop_png:
    plot_open_loop(open_loops, cpu, args.open_loop_png)
  print(f"\nwrote {args.out}.json" + (f" and {args.png}" if load else "")
        + (f" and {args.open_loop_png}" if open_loops and args.open_loop_png else ""))


def plot_open_loop(open_loops: dict, cpu: str, path: str) -> None:
  """p99 and p50 latency (from the scheduled arrival) and the answered rate against the offered
  arrival rate, per model and server setting. (Redraw from a JSON: `plot_open_loop(report["open_loop"],
  report["cpu"], path)`.)"""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 3, figsize=(13, 4))
  for (name, rows), color in zip(open_loops.items(), COLORS):
    x = [r["offered_per_s"] for r in rows]
    ax[0].plot(x, [r["p99_ms"] for r in rows], "o-", color=color, label=name)
    ax[1].plot(x, [r["p50_ms"] for r in rows], "o-", color=color)
    ax[2].plot(x, [r["answered_per_s"] for r in rows], "o-", color=color)
  lim = max(r["offered_per_s"] for rows in open_loops.values() for r in rows)
  ax[2].plot([0, lim], [0, lim], color="grey", lw=.8, ls=":")
  for a, title in zip(ax[:2], ("p99", "p50")):
    a.axhline(100, color="grey", lw=.8, ls=":")
    a.set_yscale("log")
    a.set_ylabel(f"{title} latency from arrival (ms, log)")
  ax[2].set_ylabel("answered requests/s (dotted: all offered)")
  for a in ax:
    a.set_xlabel("offered requests/s (Poisson arrivals)")
    a.grid(alpha=.3)
  fig.legend(*ax[0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(open_loops)), fontsize=8)
  fig.suptitle(f"oxyjax.serve open-loop load test at beam 20 (dotted: 100 ms)\n{cpu}", fontsize=9)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)

if __name__ == "__main__":
  main()
