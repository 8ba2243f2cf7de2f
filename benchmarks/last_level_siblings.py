r"""How often `normalize="last_valid"` runs the last decoder step on a gathered quarter or half of
the beams (`decoding._last_level_logits`) for a trained model on real rows: per batch, the most beams
of one row whose prefix has siblings at the last level, against the caps ceil(beam / 4) and
ceil(beam / 2).

  python benchmarks/last_level_siblings.py runs/beauty_default_s0 --split=validation --rows=512 \
      --cases=1x20,1x256,32x256

Each batch is also decoded with `normalize="vocab"`, the two calls interleaved (the other first
every second batch), and both p50s are printed: the trained model's own speed-up from the option
on its real beams (its shape, its SID table), beside the random-weight figures of
benchmarks/decode_latency.py at the peer's shape.

The caps are fixed by the beam; whether a batch fits under one depends on the model's beams (popular
items collide more often than the catalogue's share of colliding items suggests), so it is measured
here on the model's own decoding and not on the random weights of benchmarks/decode_latency.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402
from paired_eval import eval_sets, load_model  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from oxyjax import decoding, partitioning  # noqa: E402
from oxyjax.data import pipeline  # noqa: E402
from oxyjax.evaluation import fixed_subset  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("model", help="a run directory")
  ap.add_argument("--split", default="validation")
  ap.add_argument("--rows", type=int, default=500, help="a fixed random subset of the split's rows")
  ap.add_argument("--cases", default="1x20,1x256,32x256", help="comma-separated BATCHxBEAM")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  part = partitioning.Partitioner({"data": 1})
  exp, params, step, _ = load_model(args.model, part, beam=20, batch_size=1)
  (arrays, trie), = eval_sets(exp, args.split).values()
  arrays = fixed_subset(arrays, args.rows)
  seen: list[int] = []
  inner = decoding._last_level_logits

  def counting(step_fn, level, prev_codes, cache, need):
    jax.debug.callback(lambda n: seen.append(int(n)), need.sum(axis=1).max())
    return inner(step_fn, level, prev_codes, cache, need)

  out = {"cpu": cpu_model(), "model": args.model, "step": step, "split": args.split, "rows": len(arrays), "cases": []}
  print(f"{args.model} (step {step}), {args.split}, {len(arrays)} rows; CPU {out['cpu']}\n")
  print("| batch x beam | caps | batches on a quarter / a half / every beam | beams with siblings per row: "
        "mean / p90 / max | p50 ms, vocab / last_valid | speed-up |")
  print("|---|---|---|---|---|---|")
  for case in args.cases.split(","):
    b, w = (int(x) for x in case.split("x"))
    batches = [exp.model.convert_features(ex) for ex, mask in pipeline.eval_batches(arrays, b) if mask.all()]
    # 1. which branch each batch takes: the search with a host callback that records it
    decoding._last_level_logits = counting
    count_fn = jax.jit(functools.partial(exp.model.predict, beam_size=w, normalize="last_valid"))
    seen.clear()
    per_row = []
    for feats in batches:
      jax.block_until_ready(count_fn(params, feats, trie).items)
      jax.effects_barrier()
      if b == 1:
        per_row.append(seen[-1])
    # 2. the time of each normalisation, without the callback (it costs about a millisecond)
    decoding._last_level_logits = inner
    fns = {n: jax.jit(functools.partial(exp.model.predict, beam_size=w, normalize=n))
           for n in ("last_valid", "vocab")}
    for fn in fns.values():  # compile
      jax.block_until_ready(fn(params, batches[0], trie).items)
    times = {n: [] for n in fns}
    for i, feats in enumerate(batches):
      for n in (("last_valid", "vocab") if i % 2 == 0 else ("vocab", "last_valid")):
        t = time.perf_counter()
        jax.block_until_ready(fns[n](params, feats, trie).items)
        times[n].append(time.perf_counter() - t)
    caps = (-(-w // 4), -(-w // 2))
    most = np.asarray(seen)
    shares = [float(np.mean(most <= caps[0])), float(np.mean((most > caps[0]) & (most <= caps[1]))),
              float(np.mean(most > caps[1]))]
    rows = np.asarray(per_row if b == 1 else most)
    print(f"| {b} x {w} | {caps[0]}, {caps[1]} | {shares[0]:.3f} / {shares[1]:.3f} / {shares[2]:.3f} of {len(seen)} | "
          f"{rows.mean():.1f} / {np.percentile(rows, 90):.0f} / {rows.max()}"
          f"{' (per batch: the most of its rows)' if b > 1 else ''} | {1e3 * np.median(times['vocab']):.1f} / "
          f"{1e3 * np.median(times['last_valid']):.1f} | {np.median(times['vocab']) / np.median(times['last_valid']):.2f}x |")
    out["cases"].append({"batch": b, "beam": w, "caps": caps, "batches": len(most), "shares": shares,
                         "most_per_batch": [int(x) for x in most],
                         "p50_s": {n: float(np.median(t)) for n, t in times.items()}})
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
