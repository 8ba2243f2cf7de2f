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

``--baseline`` takes the same outputs of another scorer setting (the default's seeds, say), in
the same seed order, and adds each ranking's validation difference from it, paired by position
(a setting's difference with the scorer's seed noise in its sd):

  python benchmarks/scorer_seeds.py docs/bench/sasrec_settings/office_e80_s{0,1}.json --variant=union10 \
      --baseline docs/bench/union_sizes/office_s{0,1}.json
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
  ap.add_argument("--baseline", nargs="+", default=None, help="another setting's outputs, one per scorer seed in "
                  "the same order: also print each validation ranking's difference from them")
  args = ap.parse_args()
  variants = args.variant.split(",")
  rows = rows_of(args.reports, args.weight, variants)
  print("| split | ranking | seeds | " + " | ".join(METRICS) + " |\n|---|---|---|" + "---|" * len(METRICS))
  for (split, ranking), per_seed in rows.items():
    print(f"| {split} | {ranking} | {len(per_seed)} | " + " | ".join(summary(per_seed, m) for m in METRICS) + " |")
  if args.against:
    base = rows[("validation", f"{args.against} at weight {args.weight}")]
    differences(f"variant - {args.against}", {v: rows[("validation", f"{v} at weight {args.weight}")]
                                              for v in variants if v != args.against}, lambda v: base)
  if args.baseline:
    if len(args.baseline) != len(args.reports):
      raise SystemExit(f"--baseline: {len(args.baseline)} outputs for {len(args.reports)} reports")
    base_rows = rows_of(args.baseline, args.weight, variants)
    differences("this setting - the baseline's", {ranking: per_seed for (split, ranking), per_seed in rows.items()
                                                  if split == "validation" and ranking != "beams alone"},
                lambda ranking: base_rows[("validation", ranking)])


def differences(what: str, mine: dict[str, list[dict]], base_of) -> None:
  """Prints, per ranking, the mean / sd / se / min over seeds of ``mine[ranking] - base_of(ranking)``."""
  print(f"\nValidation, paired by scorer seed: {what} (mean, sd and se over seeds; min: the lowest seed's difference)")
  print("| ranking | seeds | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
  for ranking, per_seed in mine.items():
    diffs = [{m: a[m] - b[m] for m in METRICS} for a, b in zip(per_seed, base_of(ranking), strict=True)]
    print(f"| {ranking} | {len(diffs)} | " + " | ".join(summary(diffs, m, signed=True) for m in METRICS) + " |")


def summary(per_seed, metric: str, signed: bool = False) -> str:
  """``mean (sd, se)`` over seeds; with ``signed``, a difference with its lowest seed."""
  x = np.asarray([r[metric] for r in per_seed])
  sd = x.std(ddof=1) if len(x) > 1 else float("nan")
  if signed:
    return f"{x.mean():+.4f} (sd {sd:.4f}, se {sd / np.sqrt(len(x)):.4f}, min {x.min():+.4f})"
  return f"{x.mean():.4f} (sd {sd:.4f}, se {sd / np.sqrt(len(x)):.4f})"


if __name__ == "__main__":
  main()
