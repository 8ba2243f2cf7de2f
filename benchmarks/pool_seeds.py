r"""Pool paired comparisons of several seeds: per scenario, the mean over seeds of each model's
metric and of the paired difference, with the standard error of that mean.

  python benchmarks/pool_seeds.py docs/bench/a_seed0.json docs/bench/a_seed1.json ... \
      [--metrics=recall@10,ndcg@10,hr@1] [--out=docs/bench/a_pooled.json]

Each input is one `benchmarks/paired_eval.py` output (one seed: a baseline and the models compared
with it, scenario by scenario). The seeds are independent trainings evaluated on the same rows, so
the mean difference over k seeds has the standard error sqrt(sum_i SE_i^2) / k, with SE_i each
seed's paired SE (which holds the row sampling noise of that seed's pair). The spread between the
seeds is reported beside it: the standard deviation of the k differences, and that over sqrt(k) (a
standard error that also holds the training noise, rough with few seeds); then the count of seeds
in which the baseline is ahead. A difference is the other model minus the baseline, so a negative
one is the baseline ahead, as in paired_eval. A table cell reads `baseline / other (difference ±
row SE, seeds ± between-seed SE; seeds with the baseline ahead / seeds)`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics


def pool(reports, metrics):
  """{scenario: {metric: {...}}} pooled over `reports` (paired_eval outputs); one other model per scenario."""
  sets = None
  for r in reports:
    names = [n for n, st in r["sets"].items() if len(st["models"]) > 1]
    sets = names if sets is None else [n for n in sets if n in names]
  out = {}
  for name in sets:
    rows = {}
    for metric in metrics:
      base, other, diff, se = [], [], [], []
      for r in reports:
        st = r["sets"][name]
        b = st["baseline"]
        (o,) = [m for m in st["models"] if m != b]
        base.append(st["models"][b]["metrics"][metric])
        other.append(st["models"][o]["metrics"][metric])
        d, s = st["models"][o]["difference"][metric]
        diff.append(d)
        se.append(s)
      k = len(reports)
      sd = statistics.stdev(diff) if k > 1 else float("nan")
      rows[metric] = {"baseline": sum(base) / k, "other": sum(other) / k, "difference": sum(diff) / k,
                      "se": math.sqrt(sum(s * s for s in se)) / k,
                      "seed_sd": sd if k > 1 else 0.0, "se_between_seeds": sd / math.sqrt(k),
                      "baseline_ahead_in": sum(d < 0 for d in diff), "seeds": k, "per_seed": diff}
    out[name] = rows
  return out


def table(pooled, metrics):
  lines = ["| scenario | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
  for name, rows in pooled.items():
    cells = []
    for m in metrics:
      x = rows[m]
      cells.append(f"{x['baseline']:.4f} / {x['other']:.4f} ({x['difference']:+.4f} ± {x['se']:.4f}, "
                   f"seeds ± {x['se_between_seeds']:.4f}; {x['baseline_ahead_in']}/{x['seeds']})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("reports", nargs="+", help="paired_eval.py outputs, one per seed")
  ap.add_argument("--metrics", default="recall@10,ndcg@10,hr@1")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  metrics = [m for m in args.metrics.split(",") if m]
  reports = [json.load(open(p)) for p in args.reports]
  pooled = pool(reports, metrics)
  print(table(pooled, metrics))
  if args.out:
    json.dump({"inputs": args.reports, "pooled": pooled}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
