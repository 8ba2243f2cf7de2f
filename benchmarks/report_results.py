r"""Prints the test-metrics table of finished training runs against TIGER's published numbers.

Reads `<model_dir>/run_summary.json` written by `python -m oxyjax.train` (test metrics are
computed once, with the best-on-validation checkpoint).

  python benchmarks/report_results.py runs/beauty runs/sports
"""

from __future__ import annotations

import json
import os
import sys

# TIGER (NeurIPS 2023), Amazon 2014 5-core, leave-one-out, full ranking (PAPER.md section 8).
TIGER = {
    "beauty": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
    "sports": {"recall@5": 0.0264, "ndcg@5": 0.0181, "recall@10": 0.0400, "ndcg@10": 0.0225},
}
COLUMNS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def main(dirs):
  print("| dataset | split | " + " | ".join(COLUMNS) + " | hr@1 | train time | steps | best step |")
  print("|---|---|" + "---|" * (len(COLUMNS) + 4))
  for d in dirs:
    with open(os.path.join(d, "run_summary.json")) as f:
      s = json.load(f)
    ds = s["dataset"]
    for split, res in s["results"].items():
      cells = [f"{res[c]:.4f}" for c in COLUMNS]
      print(f"| {ds} | {split} | " + " | ".join(cells) + f" | {res['hr@1']:.4f} | {s['train_seconds'] / 60:.0f} min | "
            f"{s['steps']} | {s['best_step']} |")
    if ds in TIGER and "test" in s["results"]:
      t = TIGER[ds]
      print(f"| {ds} | TIGER (published) | " + " | ".join(f"{t[c]:.4f}" for c in COLUMNS) + " | - | - | - | - |")
      print(f"| {ds} | ours / TIGER | " + " | ".join(f"{s['results']['test'][c] / t[c]:.2f}" for c in COLUMNS)
            + " | - | - | - | - |")


if __name__ == "__main__":
  main(sys.argv[1:] or ["runs/beauty", "runs/sports"])
