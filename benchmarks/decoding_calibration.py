r"""Decoding choices on the VALIDATION split of a trained run: beam width and per-level weights.

Each setting re-decodes the whole validation split with the run's evaluation weights (its
artifact) and reports recall/NDCG@5/10 and HR@1; nothing is written into the run. Test is
never evaluated here (a choice is made on validation, then test is run once with it).

  python benchmarks/decoding_calibration.py --model_dir=runs/beauty_ppmi \
      --settings="20:1,1,1,1;20:1,1,1,0.5;20:1.25,1,1,1" --out=docs/bench/calibration_beauty.json

A setting is ``beam:w1,w2,...`` (one weight per SID level, ``decoding.beam_search``'s
``level_weights``); ``beam`` alone means weights of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oxyjax import partitioning
from oxyjax.train import evaluate_run

KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "hr@1")


def parse_setting(text: str) -> tuple[int, tuple[float, ...] | None]:
  beam, _, weights = text.partition(":")
  return int(beam), (tuple(float(w) for w in weights.split(",")) if weights else None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model_dir", required=True)
  p.add_argument("--settings", required=True, help="';'-separated beam:w1,w2,... settings")
  p.add_argument("--out", default=None, help="JSON file for the results")
  args = p.parse_args(argv)
  part = partitioning.Partitioner()
  rows = []
  for text in args.settings.split(";"):
    beam, weights = parse_setting(text)
    t0 = time.time()
    res = evaluate_run(args.model_dir, partitioner=part, splits=("validation",), eval_beam_size=beam,
                       eval_level_weights=weights, write_results=False, log=lambda *a, **k: None)
    v = res.validation
    rows.append({"beam": beam, "level_weights": weights, **{k: v[k] for k in KEYS},
                 "num_examples": v["num_examples"], "seconds": round(time.time() - t0, 1)})
    print(f"beam {beam:4d} weights {weights or 'all 1'}: " + " ".join(f"{k} {v[k]:.4f}" for k in KEYS)
          + f" ({rows[-1]['seconds']} s)", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"model_dir": args.model_dir, "split": "validation", "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
