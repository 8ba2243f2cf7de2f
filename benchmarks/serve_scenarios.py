r"""Latency of a multi-scenario model through HTTP, per scenario, with and without its second stage.

  python benchmarks/serve_scenarios.py runs/ms_stage_1200_seed0/unified --out=docs/bench/serve_scenarios

(The run: `benchmarks/multi_scenario.py ... --only=unified --out=runs/ms_stage_1200_seed0`, see
docs/multi_scenario.md "Session 34"; it has a second stage with a weight per scenario.) The run is
exported twice (`oxyjax.export.export_run`): with its stage and with the beams alone, batch bucket
1, each beam of --beam_sizes. One server per export (`python -m oxyjax.serve`, as in
serve_latency.py), and one client that sends every request to both servers in turn (who goes first
alternates) and cycles through the scenarios, so that a slow spell of the machine falls on every
scenario and both exports alike. Requests are built as a user of the endpoint would send them:
each user's latest behaviours from the data (`export.write_user_histories`), the last one as the
trigger of an item-to-item scenario, and for a search scenario a query of up to five words of an
item's title from that scenario's pool (what the server embeds with its text encoder before the
call). p50 / p99 per scenario and export, and the median per-request difference (stage minus
beams alone).
"""

from __future__ import annotations

import argparse
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


def scenario_bodies(artifact, users_path: str, n: int, k: int, beam: int, seed: int = 0) -> dict[str, list[dict]]:
  """n request bodies per scenario of `artifact` (see the module docstring)."""
  rng = np.random.default_rng(seed)
  by_domain: dict[str, list[list[str]]] = {}
  with open(users_path) as f:
    for line in f:
      rec = json.loads(line)
      by_domain.setdefault(rec["domain"], []).append(rec["history"])
  out = {}
  for sc in artifact.scenarios:
    users = by_domain[sc["domain"]]
    pool = artifact.pools[sc["name"]]
    bodies = []
    for _ in range(n):
      history = users[int(rng.integers(len(users)))][-artifact.model_config.max_history:]
      body = {"scenario": sc["name"], "history": history[:-1] if sc["kind"] == "item_to_item" else history,
              "k": k, "beam": beam}
      if sc["kind"] == "item_to_item":
        body["trigger"] = history[-1]
        if not body["history"]:
          del body["history"]
      elif sc["kind"] == "search":
        words = artifact.title(int(pool[rng.integers(len(pool))])).split()
        body["query"] = " ".join(words[:5]) or "item"
      bodies.append(body)
    out[sc["name"]] = bodies
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("run", help="a multi-scenario run directory with a second stage")
  ap.add_argument("--beam_sizes", default="20,256")
  ap.add_argument("--requests", type=int, default=200, help="requests per scenario and beam (each sent to both)")
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--out", default=None, help="writes <out>.json")
  args = ap.parse_args()

  from oxyjax import export as export_lib
  from oxyjax.artifact import ModelArtifact

  import serve_latency as sl

  beams = [int(x) for x in args.beam_sizes.split(",")]
  cpu = cpu_model()
  print(f"# serve_scenarios on {cpu} ({os.cpu_count()} CPUs): {args.run}", flush=True)
  tmp = tempfile.mkdtemp(prefix="serve_scenarios-")
  dirs = {}
  for name, stage in (("with the stage", "auto"), ("beams alone", "none")):
    t = time.perf_counter()
    dirs[name] = export_lib.export_run(args.run, os.path.join(tmp, stage), batch_sizes=[1], beam_sizes=beams,
                                       second_stage=stage, user_histories=stage == "auto", log=lambda *a: None)
    print(f"exported {name} in {time.perf_counter() - t:.1f}s", flush=True)
  artifact = ModelArtifact.load(os.path.join(dirs["with the stage"], "artifact"))
  manifest = json.load(open(os.path.join(dirs["with the stage"], export_lib.MANIFEST)))
  stage = {k: v for k, v in (manifest.get("second_stage") or {}).items() if k not in ("params", "sid_codes")}
  print(f"second stage: {stage}", flush=True)
  servers = {}
  rows = []
  try:
    for name, d in dirs.items():
      servers[name] = sl.ServerProc(d, 2.0, 1)
    conns = {n: http.client.HTTPConnection(s.host, s.port, timeout=60) for n, s in servers.items()}
    names = list(servers)
    print("\n| scenario | beam | " + " | ".join(f"{n} p50 / p99 ms" for n in names)
          + " | median difference ms | errors |\n|---|---|---|---|---|---|", flush=True)
    for beam in beams:
      bodies = scenario_bodies(artifact, os.path.join(dirs["with the stage"], export_lib.USERS_FILE), args.requests,
                               args.k, beam, seed=beam)
      scen = list(bodies)
      lat = {(s, n): [] for s in scen for n in names}
      errors = {s: 0 for s in scen}
      for i in range(-2, args.requests):  # two unrecorded rounds first
        for s in scen:
          data = json.dumps(bodies[s][i % args.requests])
          for n in names if (i + scen.index(s)) % 2 == 0 else names[::-1]:
            dt, status, body = sl.post(conns[n], data)
            if status != 200:
              errors[s] += 1
              if errors[s] == 1:
                print(f"  {s} via {n}: HTTP {status}: {body[:200]!r}", flush=True)
            if i >= 0:
              lat[(s, n)].append(dt)
      for s in scen:
        diff = np.asarray(lat[(s, names[0])]) - np.asarray(lat[(s, names[1])])
        row = {"scenario": s, "beam": beam, "requests": len(diff), "errors": errors[s],
               "median_diff_ms": 1e3 * float(np.median(diff)),
               **{f"{n} p50_ms": 1e3 * sl.pct(lat[(s, n)], 50) for n in names},
               **{f"{n} p99_ms": 1e3 * sl.pct(lat[(s, n)], 99) for n in names}}
        rows.append(row)
        print(f"| {s} | {beam} | " + " | ".join(f"{row[f'{n} p50_ms']:.2f} / {row[f'{n} p99_ms']:.2f}" for n in names)
              + f" | {row['median_diff_ms']:+.2f} | {errors[s]} |", flush=True)
  finally:
    for srv in servers.values():
      srv.close()
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump({"cpu": cpu, "cpus": os.cpu_count(), "run": args.run, "second_stage": stage,
                 "rows": rows, "command": " ".join(sys.argv)}, f, indent=1)
    print(f"\nwrote {args.out}.json")


if __name__ == "__main__":
  main()
