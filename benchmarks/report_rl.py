r"""Tables and curves of post-training runs: test metrics of each run (and of its starting checkpoint),
validation over RL steps, and the logged training diagnostics.

  python benchmarks/report_rl.py --init=runs/beauty_repro runs/rl/beauty_sa_gcpo=docs/bench/rl_beauty_sa_gcpo.log ...

Each run is `<model_dir>[=<console log>[,<log of its resumed part>...]]`; with logs, the per-step
diagnostics (reward, target in group, ratio, entropy, ...) are plotted. `--metric` is the validation
metric plotted and listed by step (default recall@10; the runs' `select_metric` where they set one).
Writes a markdown table to stdout and `--png`. A run stopped before its end (no run_summary.json)
is listed without test figures, its validation history read from its console log. `--panels`
picks the logged diagnostics plotted beside the validation metric.
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


def parse_validation(path: str) -> list[dict[str, float]]:
  """The validation evaluations a run's console log printed (`[oxyjax] step N validation (...): k v, ...`)."""
  rows = []
  for line in open(path):
    m = re.match(r"\[oxyjax\] step (\d+) validation \([^)]*\): (.*)", line)
    if m:
      row = {"step": int(m.group(1))}
      row.update({k: float(v) for k, v in (kv.rsplit(" ", 1) for kv in m.group(2).split(", "))})
      rows.append(row)
  return rows


DEFAULT_PANELS = "reward/total,reward/hit,groups/target_in_group,entropy,ratio_abs_dev"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--init", required=True, help="the pre-training run the RL runs started from")
  ap.add_argument("--png", default="docs/rl_curves.png")
  ap.add_argument("--metric", default="recall@10", help="validation metric plotted and listed by step")
  ap.add_argument("--panels", default=DEFAULT_PANELS, help="five logged diagnostics to plot, comma-separated")
  ap.add_argument("runs", nargs="+")
  args = ap.parse_args()
  init = json.load(open(os.path.join(args.init, "run_summary.json")))["results"]
  print("| run | best step | " + " | ".join(METRICS) + " |")
  print("|---|---|" + "---|" * len(METRICS))
  print(f"| start ({args.init}) | - | " + " | ".join(f"{init['test'][k]:.4f}" for k in METRICS) + " |")
  curves = {}
  for spec in args.runs:
    model_dir, _, log = spec.partition("=")
    logs = [part for part in log.split(",") if part]
    summary = os.path.join(model_dir, "run_summary.json")
    if os.path.isfile(summary):
      s = json.load(open(summary))
      t, hist = s["results"]["test"], s["validation_history"]
      print(f"| {os.path.basename(model_dir)} | {s['best_step']} | " + " | ".join(f"{t[k]:.4f}" for k in METRICS) + " |")
    else:  # stopped before its end: no test read
      hist = [r for part in logs for r in parse_validation(part)]
      print(f"| {os.path.basename(model_dir)} | stopped at {hist[-1]['step'] if hist else 0} | "
            + " | ".join("-" for _ in METRICS) + " |")
    curves[os.path.basename(model_dir)] = (hist, [r for part in logs for r in parse_log(part)])
  print()
  print(f"validation {args.metric} by step: " + "; ".join(
      f"{n}: " + ", ".join(f"{h['step']}={h[args.metric]:.4f}" for h in v) for n, (v, _) in curves.items()))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(f"validation {args.metric}", None)] + [(k, k) for k in args.panels.split(",")][:5]
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (title, key) in zip(axes.flat, panels):
    for i, (name, (hist, log)) in enumerate(curves.items()):
      c = colours[i % len(colours)]  # one colour per run in every panel
      if key is None:
        ax.plot([h["step"] for h in hist], [h[args.metric] for h in hist], marker="o", label=name, color=c)
      elif log and key in log[0]:
        ax.plot([r["step"] for r in log], [r[key] for r in log], label=name, color=c)
    ax.set_title(title)
    ax.set_xlabel("RL step")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.png, dpi=110)
  print(f"\nwrote {args.png}")


if __name__ == "__main__":
  main()
