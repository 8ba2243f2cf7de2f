r"""How much the second stage's figures move with the SASRec scorer's training seed.

Reads the outputs of `benchmarks/rerank_eval.py`, one per scorer seed, for one policy run, and
prints the mean, the standard deviation over seeds and the standard error of the mean, on
validation (`--no_test` outputs, weight 1.5 of the union of 20) and on test (`--test_only`
outputs), for the fused list and for SASRec alone:

  python benchmarks/rerank_eval.py --sasrec=runs/rescore/<d>_sasrec_s<s> runs/<d>_default_s0 --union=20 \
      --no_test --weights=0,1.5 --out=docs/bench/scorer_seeds/<d>_s<s>.json
  python benchmarks/rerank_eval.py --sasrec=runs/rescore/<d>_sasrec_s<s> runs/<d>_default_s0 --union=20 \
      --test_only --test_weight=1.5 --test_variant=union20 --out=docs/bench/scorer_seeds/<d>_s<s>_test.json
  python benchmarks/scorer_seeds.py docs/bench/scorer_seeds/office_s{0,1,2}.json \
      docs/bench/scorer_seeds/office_s{0,1,2}_test.json

``--variant`` takes several candidate sets of one rerank_eval run (``--union=5,10,20``), and
``--against=union20`` adds each one's difference from that set, paired by scorer seed:

  python benchmarks/scorer_seeds.py docs/bench/union_sizes/office_s{0,1,2}.json --variant=union5,union10,union20 \
      --against=union20
"""

from __future__ import annotations

import argparse
import json

import numpy as np

METRICS = ("hr@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def rows_of(paths, weight: str, variants):
  """{(split, ranking): [per-seed metric dicts]} from rerank_eval outputs of one policy run each."""
  out: dict[tuple[str, str], list[dict]] = {}
  for p in paths:
    with open(p) as f:
      report = json.load(f)
    (spec, m), = report["models"].items()
    if "test" in m:
      out.setdefault(("test", f"{m['test_variant']} at weight {m['chosen_weight']:g}"), []).append(m["test"]["reranked"])
      out.setdefault(("test", "SASRec alone"), []).append(m["test"]["sasrec_alone"])
      out.setdefault(("test", "beams alone"), []).append(m["test"]["policy"])
    else:
      for variant in variants:
        out.setdefault(("validation", f"{variant} at weight {weight}"), []).append(m[variant]["validation"][weight])
      out.setdefault(("validation", "SASRec alone"), []).append(m["validation_sasrec_alone"])
      out.setdefault(("validation", "beams alone"), []).append(m["validation_policy"])
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("reports", nargs="+")
  ap.add_argument("--weight", default="1.5")
  ap.add_argument("--variant", default="union20", help="one candidate set, or several separated by commas")
  ap.add_argument("--against", default=None, help="also print each variant's validation difference from this one, "
                  "paired by scorer seed")
  args = ap.parse_args()
  variants = args.variant.split(",")
  rows = rows_of(args.reports, args.weight, variants)
  print("| split | ranking | seeds | " + " | ".join(METRICS) + " |\n|---|---|---|" + "---|" * len(METRICS))
  for (split, ranking), per_seed in rows.items():
    print(f"| {split} | {ranking} | {len(per_seed)} | " + " | ".join(summary(per_seed, m) for m in METRICS) + " |")
  if args.against:
    base = rows[("validation", f"{args.against} at weight {args.weight}")]
    print(f"\nValidation, paired by scorer seed: variant - {args.against} (mean, sd and se over seeds; "
          "min: the lowest seed's difference)")
    print("| variant | seeds | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
    for variant in variants:
      if variant != args.against:
        mine = rows[("validation", f"{variant} at weight {args.weight}")]
        diffs = [{m: a[m] - b[m] for m in METRICS} for a, b in zip(mine, base)]
        print(f"| {variant} | {len(diffs)} | " + " | ".join(summary(diffs, m, signed=True) for m in METRICS) + " |")


def summary(per_seed, metric: str, signed: bool = False) -> str:
  """``mean (sd, se)`` over seeds; with ``signed``, a difference with its lowest seed."""
  x = np.asarray([r[metric] for r in per_seed])
  sd = x.std(ddof=1) if len(x) > 1 else float("nan")
  if signed:
    return f"{x.mean():+.4f} (sd {sd:.4f}, se {sd / np.sqrt(len(x)):.4f}, min {x.min():+.4f})"
  return f"{x.mean():.4f} (sd {sd:.4f}, se {sd / np.sqrt(len(x)):.4f})"


if __name__ == "__main__":
  main()
