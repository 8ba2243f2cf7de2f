r"""What the server's query-embedding cache (`oxyjax.sid.embeddings.QueryEmbedder`) saves on search.

  python benchmarks/query_cache.py runs/ms_stage_1200_seed0/unified --out=docs/bench/query_cache

A search request carries a query that the server embeds with MiniLM before the model's call
(docs/serving.md: ~7 ms of a search request at beam 20 on this machine); the server keeps the
embeddings of the last `--query_cache_size` distinct queries. This script:

1. builds the query stream the shipped data gives: for every user of the run's search scenario's
   domain, the test example as a search request (the history before the test target, and the
   target's query by the training rule, `scenarios.search_query`), in a seeded random order;
2. reports, from the stream alone, how many queries are distinct and the hit rate an LRU of each
   size in --capacities would have on it (the queries here are five words of a category path or a
   title, one per test row: how often real users' typed queries repeat is not measured here);
3. exports the run once (its second stage included, batch bucket 1, --beam) and serves it twice,
   with `--query_cache_size=0` and with --cache_size; one client sends every request of the
   stream to both servers in turn (who goes first alternates), so a slow spell of the machine
   falls on both alike. p50 / p99 per server, and for the cached server split into the requests
   its cache answered and the ones it embedded (which the client tells by running the same LRU;
   checked against the server's own count in /healthz).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from machine import cpu_model  # noqa: E402


def lru_hits(stream, capacity: int) -> list[bool]:
  """For each query of `stream`, whether an LRU of `capacity` entries holds it when it comes."""
  cache: collections.OrderedDict[str, None] = collections.OrderedDict()
  out = []
  for q in stream:
    out.append(q in cache)
    cache[q] = None
    cache.move_to_end(q)
    if len(cache) > capacity:
      cache.popitem(last=False)
  return out


def search_stream(artifact, users_path: str, beam: int, k: int, seed: int,
                  scenario: str | None = None) -> tuple[list[dict], list[str]]:
  """A search scenario's test examples as request bodies (see the module docstring, 1), and each
  one's cache key; `scenario`: its name (default: the artifact's first search scenario)."""
  from oxyjax.data.catalogue import Catalogue
  from oxyjax.data.scenarios import normalise_query, search_query

  searches = [s for s in artifact.scenarios if s["kind"] == "search"]
  if not searches or (scenario and scenario not in [s["name"] for s in searches]):
    raise SystemExit(f"no search scenario {scenario or ''} in {[s['name'] for s in artifact.scenarios]}")
  sc = next(s for s in searches if scenario in (None, s["name"]))
  catalogue = Catalogue.load(artifact.domains)
  bodies = []
  with open(users_path) as f:
    for line in f:
      rec = json.loads(line)
      if rec["domain"] != sc["domain"] or len(rec["history"]) < 2:
        continue
      query = search_query(catalogue.meta(catalogue.index(rec["history"][-1])))
      if query:
        bodies.append({"scenario": sc["name"], "history": rec["history"][:-1], "query": query, "k": k, "beam": beam})
  order = np.random.default_rng(seed).permutation(len(bodies))
  bodies = [bodies[i] for i in order]
  return bodies, [normalise_query(b["query"]) for b in bodies]  # what the server embeds and keys its cache by


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("run", help="a multi-scenario run directory with a search scenario")
  ap.add_argument("--scenario", default=None, help="a search scenario's name (default: the first)")
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--cache_size", type=int, default=4096, help="the cached server's --query_cache_size")
  ap.add_argument("--capacities", default="256,1024,4096,16384", help="LRU sizes whose hit rate on the stream is printed")
  ap.add_argument("--requests", type=int, default=0, help="the stream's first N requests (0: all)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None, help="writes <out>.json")
  args = ap.parse_args()

  from oxyjax import export as export_lib
  from oxyjax.artifact import ModelArtifact

  import serve_latency as sl

  cpu = cpu_model()
  print(f"# query_cache on {cpu} ({os.cpu_count()} CPUs): {args.run}", flush=True)
  sdir = export_lib.export_run(args.run, os.path.join(tempfile.mkdtemp(prefix="query_cache-"), "serving"),
                               batch_sizes=[1], beam_sizes=[args.beam], user_histories=True, log=lambda *a: None)
  artifact = ModelArtifact.load(os.path.join(sdir, "artifact"))
  bodies, keys = search_stream(artifact, os.path.join(sdir, export_lib.USERS_FILE), args.beam, args.k, args.seed,
                         args.scenario)
  if args.requests:
    bodies, keys = bodies[:args.requests], keys[:args.requests]
  print(f"{bodies[0]['scenario']}: {len(keys)} test requests, {len(set(keys))} distinct queries "
        f"({len(set(keys)) / len(keys):.1%}); e.g. {keys[:3]}", flush=True)
  capacities = [int(x) for x in args.capacities.split(",")]
  hit_rates = {c: float(np.mean(lru_hits(keys, c))) for c in capacities}
  print("LRU hit rate on the stream: " + ", ".join(f"{c}: {r:.1%}" for c, r in hit_rates.items()), flush=True)

  hits = np.asarray(lru_hits(keys, args.cache_size)) if args.cache_size else np.zeros(len(keys), bool)
  names = ["no cache", f"cache {args.cache_size}"]
  servers = {}
  try:
    for n, size in zip(names, (0, args.cache_size)):
      servers[n] = sl.ServerProc(sdir, 2.0, 1, extra_flags=(f"--query_cache_size={size}",))
    conns = {n: http.client.HTTPConnection(s.host, s.port, timeout=60) for n, s in servers.items()}
    warm = {"scenario": bodies[0]["scenario"], "history": bodies[0]["history"], "k": args.k, "beam": args.beam}
    for i in range(3):  # unrecorded, queries outside the stream
      for n in names:
        sl.post(conns[n], json.dumps({**warm, "query": f"warm up {i}"}))
    before = servers[names[1]].health()["query_cache"]
    lat = {n: [] for n in names}
    errors = 0
    t0 = time.perf_counter()
    for i, body in enumerate(bodies):
      data = json.dumps(body)
      for n in names if i % 2 == 0 else names[::-1]:
        dt, status, reply = sl.post(conns[n], data)
        errors += status != 200
        if status != 200 and errors == 1:
          print(f"  via {n}: HTTP {status}: {reply[:200]!r}", flush=True)
        lat[n].append(dt)
    wall = time.perf_counter() - t0
    after = servers[names[1]].health()["query_cache"]
  finally:
    for srv in servers.values():
      srv.close()
  server_hits = after["hits"] - before["hits"]
  if server_hits != int(hits.sum()):
    raise SystemExit(f"the server counted {server_hits} cache hits, the client's LRU {int(hits.sum())}")
  lat = {n: 1e3 * np.asarray(v) for n, v in lat.items()}
  rows = []
  print(f"\n{len(bodies)} requests to each server in {wall:.0f}s, {errors} errors; server cache hits {server_hits} "
        f"({server_hits / len(bodies):.1%})\n\n| server | requests | p50 ms | p99 ms | mean ms |\n|---|---|---|---|---|")
  for label, n, sel in ((names[0], names[0], slice(None)), (names[1], names[1], slice(None)),
                        (f"{names[1]}: hits", names[1], hits), (f"{names[1]}: misses", names[1], ~hits),
                        (f"{names[0]}: the same requests as the hits", names[0], hits)):
    x = lat[n][sel]
    if not len(x):
      continue
    row = {"server": label, "requests": int(len(x)), "p50_ms": float(np.percentile(x, 50)),
           "p99_ms": float(np.percentile(x, 99)), "mean_ms": float(x.mean())}
    rows.append(row)
    print(f"| {label} | {row['requests']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_ms']:.2f} |")
  diff = lat[names[0]][hits] - lat[names[1]][hits]
  if len(diff):
    print(f"\nmedian per-request saving on the hits (no cache minus cache): {np.median(diff):+.2f} ms")
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"cpu": cpu, "cpus": os.cpu_count(), "run": args.run, "scenario": bodies[0]["scenario"],
                 "beam": args.beam, "requests": len(bodies),
                 "distinct_queries": len(set(keys)), "lru_hit_rate": hit_rates, "server_hits": server_hits,
                 "errors": errors, "rows": rows,
                 "median_saving_on_hits_ms": float(np.median(diff)) if len(diff) else None,
                 "command": " ".join(sys.argv)}, f, indent=1)
    print(f"\nwrote {args.out}.json")


if __name__ == "__main__":
  main()
