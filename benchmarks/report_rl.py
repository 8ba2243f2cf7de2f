r"""Tables and curves of post-training runs: test metrics of each run (and of its starting checkpoint),
validation over RL steps, and the logged training diagnostics.

  python benchmarks/report_rl.py --init=runs/beauty_repro runs/rl/beauty_sa_gcpo=docs/bench/rl_beauty_sa_gcpo.log ...

Each run is `<model_dir>[=<console log>[,<log of its resumed part>...]]`; with logs, the per-step
diagnostics (reward, target in group, ratio, entropy, ...) are plotted. `--metric` is the validation
metric plotted and listed by step (default recall@10; the runs' `select_metric` where they set one).
Writes a markdown table to stdout and `--png`.
"""

from __future__ import annotations

import argparse
import json
import os
import re

METRICS = ("hr@1", "hr@10", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def parse_log(path: str) -> list[dict[str, float]]:
  rows = []
  for line in open(path):
    m = re.match(r"step (\d+)/\d+ \| (.*)", line)
    if not m:
      continue
    row = {"step": int(m.group(1))}
    for part in m.group(2).split(" | "):
      kv = part.rsplit(" ", 1)
      if len(kv) == 2:
        try:
          row[kv[0]] = float(kv[1])
        except ValueError:
          pass
    rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--init", required=True, help="the pre-training run the RL runs started from")
  ap.add_argument("--png", default="docs/rl_curves.png")
  ap.add_argument("--metric", default="recall@10", help="validation metric plotted and listed by step")
  ap.add_argument("runs", nargs="+")
  args = ap.parse_args()
  init = json.load(open(os.path.join(args.init, "run_summary.json")))["results"]
  print("| run | best step | " + " | ".join(METRICS) + " |")
  print("|---|---|" + "---|" * len(METRICS))
  print(f"| start ({args.init}) | - | " + " | ".join(f"{init['test'][k]:.4f}" for k in METRICS) + " |")
  curves = {}
  for spec in args.runs:
    model_dir, _, log = spec.partition("=")
    s = json.load(open(os.path.join(model_dir, "run_summary.json")))
    t = s["results"]["test"]
    print(f"| {os.path.basename(model_dir)} | {s['best_step']} | " + " | ".join(f"{t[k]:.4f}" for k in METRICS) + " |")
    curves[os.path.basename(model_dir)] = (s["validation_history"],
                                           [r for part in log.split(",") if part for r in parse_log(part)])
  print()
  print(f"validation {args.metric} by step: " + "; ".join(
      f"{n}: " + ", ".join(f"{h['step']}={h[args.metric]:.4f}" for h in v) for n, (v, _) in curves.items()))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(f"validation {args.metric}", None), ("reward/total", "reward/total"), ("reward/hit", "reward/hit"),
            ("groups/target_in_group", "groups/target_in_group"), ("entropy", "entropy"),
            ("ratio_abs_dev", "ratio_abs_dev")]
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  for ax, (title, key) in zip(axes.flat, panels):
    for name, (hist, log) in curves.items():
      if key is None:
        ax.plot([h["step"] for h in hist], [h[args.metric] for h in hist], marker="o", label=name)
      elif log and key in log[0]:
        ax.plot([r["step"] for r in log], [r[key] for r in log], label=name)
    ax.set_title(title)
    ax.set_xlabel("RL step")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.png, dpi=110)
  print(f"\nwrote {args.png}")


if __name__ == "__main__":
  main()
