r"""Plots training loss and validation recall@10 of finished runs (from their logs/summaries).

  python benchmarks/plot_training.py --runs runs/beauty runs/sports --logs runs/beauty.log runs/sports.log \
      --out docs/training_curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", nargs="+", required=True, help="model dirs with run_summary.json")
  ap.add_argument("--logs", nargs="+", required=True, help="console logs of the same runs (for the loss)")
  ap.add_argument("--out", default="docs/training_curves.png")
  args = ap.parse_args()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  summaries = []
  for run in args.runs:
    with open(os.path.join(run, "run_summary.json")) as f:
      summaries.append(json.load(f))
  datasets = [s["dataset"] for s in summaries]
  for run, log, s in zip(args.runs, args.logs, summaries):
    # The dataset, plus the run directory when several runs of one dataset share the plot.
    name = s["dataset"]
    if datasets.count(name) > 1:
      name = f"{name} ({os.path.basename(os.path.normpath(run))})"
    steps, losses = [], []
    for line in open(log):
      m = re.match(r"step (\d+)/\d+ \|.*\| loss ([0-9.]+) \|", line)
      if m:
        steps.append(int(m.group(1)))
        losses.append(float(m.group(2)))
    ax1.plot(steps, losses, label=name)
    h = s["validation_history"]
    ax2.plot([x["step"] for x in h], [x["recall@10"] for x in h], marker="o", label=f"{name} (validation subset)")
    if h and "raw_recall@10" in h[0]:  # a weight-averaged (EMA) run also scored its raw weights
      ax2.plot([x["step"] for x in h], [x["raw_recall@10"] for x in h], ls=":", marker=".",
               color=ax2.lines[-1].get_color(), label=f"{name} raw weights (validation subset)")
    if "test" in s["results"]:
      ax2.axhline(s["results"]["test"]["recall@10"], ls="--", lw=1, color=ax2.lines[-1].get_color(),
                  label=f"{name} test (best ckpt)")
  ax1.set(xlabel="step", ylabel="training loss (token NLL)", title="training loss")
  ax2.set(xlabel="step", ylabel="recall@10", title="recall@10 (beam 20, full catalogue)")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
