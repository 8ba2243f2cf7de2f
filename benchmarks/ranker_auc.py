r"""Held-out AUC of trained ranking models on one footing: each ranker of the same policy, on the
same fixed random validation (or test) rows, against uniform, popularity and the starting policy's
own top candidates (`ranking_model.evaluate_auc`), so that rankers trained with different
negatives compare. The last column is the one that says whether RL can trust the ranker.

  python benchmarks/ranker_auc.py --init_model_dir=runs/beauty_qs runs/beauty_ranker runs/beauty_ranker_policy
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402
from oxyjax import experiment as experiment_lib
from oxyjax import partitioning
from oxyjax import trainer as trainer_lib
from oxyjax import checkpoints
from oxyjax.artifact import ModelArtifact, artifact_dir
from oxyjax.evaluation import fixed_subset
from oxyjax.rl import ranking_model as rm


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--init_model_dir", required=True)
  ap.add_argument("rankers", nargs="+")
  ap.add_argument("--split", default="validation")
  ap.add_argument("--max_examples", type=int, default=4000)
  ap.add_argument("--negatives", type=int, default=20)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  print(f"[ranker_auc] {cpu_model()}")
  part = partitioning.Partitioner({"data": 1})
  art = ModelArtifact.load(artifact_dir(args.init_model_dir))
  exp = experiment_lib.from_artifact(art, partitioner=part, log=lambda *a, **k: None)
  examples = exp.load_split(args.split)
  examples = fixed_subset(examples, args.max_examples)  # the rows train_ranker validates on
  policy_params, _ = checkpoints.load_params(art.params_dir, trainer_lib.TrainStateFactory(exp.model, part).params_abstract)
  beams = rm.PolicyCandidates(exp, policy_params, args.negatives + 1, 256)(examples)
  rows = {}
  print(f"| ranker | {args.split} rows | AUC uniform | AUC popular | AUC policy's candidates |\n|---|---|---|---|---|")
  for d in args.rankers:
    ranker, params, meta = rm.load(d, art, part)
    r = rm.evaluate_auc(ranker, params, examples, num_negatives=args.negatives, policy_items=beams)
    rows[d] = {**r, "config": meta["config"], "step": meta["step"]}
    print(f"| {d} | {len(examples)} | {r['auc_uniform']:.4f} | {r['auc_popular']:.4f} | {r['auc_policy']:.4f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": cpu_model(), "split": args.split, "rankers": rows}, f, indent=1)


if __name__ == "__main__":
  main()
