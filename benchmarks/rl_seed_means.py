r"""Post-training runs' paired differences from their start, averaged over seeds.

Reads `benchmarks/paired_eval.py` outputs (each with the starting checkpoint as its baseline) and
groups the models by their directory name with the seed taken out (``..._seed<s>_...``), so the
seeds of one set-up form one row: the mean over seeds of each metric's difference from the start,
the standard deviation over seeds, and the mean of the per-seed paired SEs.

  python benchmarks/rl_seed_means.py docs/bench/rl_bd39_scorer_only_stage_validation.json \
      docs/bench/rl_bd39_scorer_only_grpo_seed1_stage_validation.json ...

A model that appears in more than one file is counted once (the first file's figures).
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

METRICS = ("hr@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def collect(paths: list[str], subset: str = "all") -> dict[str, dict[str, list[tuple[float, float]]]]:
  """``{set-up: {metric: [(difference, paired SE) per seed]}}`` over the files' models."""
  seen: set[str] = set()
  out: dict[str, dict[str, list[tuple[float, float]]]] = {}
  for p in paths:
    data = json.load(open(p))
    for model, rec in data["sets"][subset]["models"].items():
      if not rec["difference"] or model in seen:
        continue  # the baseline itself, or a model already read from another file
      seen.add(model)
      setup = re.sub(r"_seed\d+", "_seed*", model.rstrip("/"))
      for m in METRICS:
        out.setdefault(setup, {}).setdefault(m, []).append(tuple(rec["difference"][m]))
  return out


def table(groups: dict[str, dict[str, list[tuple[float, float]]]]) -> str:
  lines = ["| set-up (seeds) | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
  for setup, per_metric in groups.items():
    n = len(per_metric[METRICS[0]])
    cells = []
    for m in METRICS:
      d = np.array([x[0] for x in per_metric[m]])
      se = np.mean([x[1] for x in per_metric[m]])
      sd = f", sd {d.std(ddof=1):.4f}" if n > 1 else ""
      cells.append(f"{d.mean():+.4f} (SE {se:.4f}{sd})")
    lines.append(f"| {setup} ({n}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("paired", nargs="+", help="paired_eval.py JSON outputs")
  ap.add_argument("--set", default="all", help="the paired_eval row set (default all)")
  args = ap.parse_args()
  print(table(collect(args.paired, args.set)))


if __name__ == "__main__":
  main()
