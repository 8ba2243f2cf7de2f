r"""Selects one default training configuration from candidates measured on every dataset's VALIDATION split.

The rule (docs/results.md, "Defaults that transfer"):

1. Each candidate must have a finished run on every dataset listed (Beauty, Sports, Industrial,
   Office); a candidate with a missing dataset is not eligible (printed as such).
2. Per dataset, a candidate's score is its full-validation metric divided by the best candidate's
   on that dataset, for recall@10 and for NDCG@10 (NDCG weighs the top of the list); its
   dataset score is the mean of the two ratios. Ratios put the datasets on one scale, so the
   large datasets do not outvote the small ones.
   Where a candidate lists several runs on a dataset (seeds of the same configuration), its
   metric there is their mean (session 29; until then each dataset had one run per candidate,
   and the seed-to-seed spread on Office / Industrial, 0.002-0.004 NDCG@10, was as large as the
   differences being ranked).
3. A candidate's overall score is the mean of its dataset scores; the highest wins. Candidates
   within 0.005 of the best count as tied, and the tie goes to the cheapest (fewest training
   steps summed over the datasets; between equally cheap ones, the higher score).

Test metrics are never read. Input: a JSON file mapping candidate name -> {dataset: path of a
run directory or of its run_summary.json, or a list of such paths (seeds)}:

  python benchmarks/select_defaults.py docs/bench/default_candidates.json

`--datasets=office,industrial` ranks on those datasets only: an interim reading while a
candidate's long runs are missing (session 43's TIGER-shape candidates), never a choice of default;
the output says so.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

DATASETS = ("beauty", "sports", "industrial", "office")
METRICS = ("recall@10", "ndcg@10")
TIE = 0.005


def load_summary(path: str) -> dict[str, Any]:
  if os.path.isdir(path):
    path = os.path.join(path, "run_summary.json")
  with open(path) as f:
    s = json.load(f)
  if "validation" not in s.get("results", {}):
    raise ValueError(f"{path}: no full-validation results")
  return s


def load_seeds(paths: str | list[str]) -> dict[str, Any]:
  """One run summary, or the mean of several (seeds): each validation metric of `METRICS` and the
  steps averaged, with ``seeds`` = how many."""
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    raise ValueError("an empty list of runs")
  runs = [load_summary(p) for p in paths]
  mean = lambda xs: sum(xs) / len(xs)
  return {"results": {"validation": {m: mean([r["results"]["validation"][m] for r in runs]) for m in METRICS}},
          "steps": mean([r.get("steps") or 0 for r in runs]), "seeds": len(runs)}


def select(candidates: dict[str, dict[str, Any]], datasets=DATASETS) -> dict[str, Any]:
  """Applies the rule of the module docstring; returns per-candidate scores and the winner."""
  runs = {c: {d: load_seeds(p) for d, p in by_ds.items() if d in datasets} for c, by_ds in candidates.items()}
  eligible = [c for c in runs if all(d in runs[c] for d in datasets)]
  best = {(d, m): max(runs[c][d]["results"]["validation"][m] for c in eligible) for d in datasets for m in METRICS}
  rows = {}
  for c in runs:
    row = {"eligible": c in eligible, "missing": [d for d in datasets if d not in runs[c]], "datasets": {}}
    for d, s in runs[c].items():
      v = s["results"]["validation"]
      rel = [v[m] / best[(d, m)] for m in METRICS] if c in eligible else None
      row["datasets"][d] = {**{m: v[m] for m in METRICS}, "steps": s.get("steps"), "seeds": s["seeds"],
                            "score": None if rel is None else sum(rel) / len(rel)}
    if c in eligible:
      row["score"] = sum(row["datasets"][d]["score"] for d in datasets) / len(datasets)
      row["steps"] = sum(row["datasets"][d]["steps"] or 0 for d in datasets)
    rows[c] = row
  winner = None
  if eligible:
    top = max(rows[c]["score"] for c in eligible)
    tied = [c for c in eligible if rows[c]["score"] >= top - TIE]
    winner = min(tied, key=lambda c: (rows[c]["steps"], -rows[c]["score"]))  # equal cost: the higher score
  return {"rule": __doc__.split("The rule")[1].split("Test metrics")[0].strip(), "candidates": rows,
          "winner": winner}


def main(argv):
  datasets = DATASETS
  for a in [a for a in argv if a.startswith("--datasets=")]:
    datasets = tuple(a.split("=", 1)[1].split(","))
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
      raise SystemExit(f"--datasets: unknown dataset(s) {unknown}; choose from {DATASETS}")
    argv = [x for x in argv if x != a]
  spec = argv[0] if argv else "docs/bench/default_candidates.json"
  with open(spec) as f:
    candidates = json.load(f)
  out = select(candidates, datasets=datasets)
  print("| candidate | " + " | ".join(f"{d} R@10 / N@10" for d in datasets) + " | score | steps |")
  print("|---|" + "---|" * (len(datasets) + 2))
  for c, row in out["candidates"].items():
    cells = []
    for d in datasets:
      r = row["datasets"].get(d)
      seeds = "" if r is None or r["seeds"] == 1 else f" ({r['seeds']} seeds)"
      cells.append("missing" if r is None else f"{r['recall@10']:.4f} / {r['ndcg@10']:.4f}{seeds}")
    score = f"{row['score']:.4f}" if row["eligible"] else "not eligible"
    steps = row.get("steps")
    print(f"| {c} | " + " | ".join(cells) + f" | {score} | {'-' if steps is None else round(steps)} |")
  if datasets == DATASETS:
    print(f"\nwinner: {out['winner']}")
  else:
    print(f"\ninterim, on {', '.join(datasets)} only (not the rule, which needs all of {', '.join(DATASETS)}): "
          f"picks {out['winner']}")


if __name__ == "__main__":
  main(sys.argv[1:])
