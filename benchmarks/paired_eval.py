r"""Paired comparison of models on the same held-out rows: each model's metrics, and each model
minus the first (the baseline, e.g. the checkpoint post-training started from) with the paired
standard error, so that a change smaller than one model's sampling noise can still be told from
noise (or not). Every model decodes the same rows with the same beam.

  python benchmarks/paired_eval.py --split=test runs/beauty_qs runs/rl/qs_beam_rank_1e5 [--out=docs/bench/x.json]

The standard error of one model's recall@10 on n rows is sqrt(p (1 - p) / n), about 0.0016 on
Beauty's 22,363 test rows; the paired SE is std(b_i - a_i) / sqrt(n) over the rows, which only the
rows where the two models disagree make non-zero. Each model is a run directory (its evaluation
weights: the artifact's params, see `train.load_eval_weights`) or `<run dir>@<params dir>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402

from oxyjax import experiment as experiment_lib  # noqa: E402
from oxyjax import metrics as metrics_lib  # noqa: E402
from oxyjax import partitioning  # noqa: E402
from oxyjax import train as train_lib  # noqa: E402
from oxyjax import trainer  # noqa: E402
from oxyjax.artifact import ModelArtifact, artifact_dir  # noqa: E402
from oxyjax.evaluation import Evaluator  # noqa: E402

METRICS = ("hr@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("models", nargs="+", help="run directories; the first is the baseline")
  ap.add_argument("--split", default="test")
  ap.add_argument("--max_examples", type=int, default=None, help="a fixed random subset (default: every row)")
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  print(f"[paired_eval] CPU: {cpu_model()}")
  part = partitioning.Partitioner({"data": 1})
  ranks, digest, rows = {}, None, None
  for spec in args.models:
    run_dir, _, weights = spec.partition("@")
    art = ModelArtifact.load(artifact_dir(run_dir))
    if digest is None:
      digest = art.content_digest()
    elif art.content_digest() != digest:  # the same items, SIDs and pools, or the rows would differ
      raise SystemExit(f"{run_dir}: a different artifact from {args.models[0]}; paired rows need the same one")
    exp = experiment_lib.from_artifact(art, partitioner=part, log=lambda *a, **k: None)
    params, step = train_lib.load_eval_weights(run_dir, trainer.TrainStateFactory(exp.model, part).params_abstract,
                                               weights or None, log=lambda *a, **k: None)
    ev = Evaluator(exp.model, part, exp.trie(), beam_size=args.beam, batch_size=args.batch_size)
    t0 = time.time()
    ranks[spec] = ev.target_ranks(params, exp.load_split(args.split), args.max_examples)
    rows = rows or len(ranks[spec])
    print(f"[paired_eval] {spec} (step {step}): {args.split}, {rows} rows decoded in {time.time() - t0:.0f} s")
  base = args.models[0]
  out = {"cpu": cpu_model(), "split": args.split, "rows": rows, "beam": args.beam, "baseline": base, "models": {}}
  print(f"\n{args.split}, {rows} rows, beam {args.beam}; difference = model - {base} (paired SE)\n")
  print("| model | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
  for spec, r in ranks.items():
    vals = {m: float(metrics_lib.per_example(r, m).mean()) for m in METRICS}
    diffs = {m: metrics_lib.paired_difference(ranks[base], r, m) for m in METRICS} if spec != base else {}
    out["models"][spec] = {"metrics": vals, "difference": diffs}
    cells = [f"{vals[m]:.4f}" + (f" ({diffs[m][0]:+.4f} ± {diffs[m][1]:.4f})" if diffs else "") for m in METRICS]
    print(f"| {spec} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
