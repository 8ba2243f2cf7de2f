r"""A second stage: the ranking model reorders the policy's beams. Is the pair better than the
policy alone at the top of the list?

Each model (a run directory, or ``<run dir>@<params dir>``; every one must be a model of the
artifact the ranker was trained for) decodes the validation and test splits with constrained beam
search (beam 20, as evaluation). The ranker (`oxyjax.rl.ranking_model`, trained on the training
logs only) scores each row's beams, and the beams are reordered by

    log p_policy(item) + weight * ranker_logit(item)           (`ranking_model.rerank`)

The weight is chosen on **validation** only, from a fixed grid, by `--select` (each model its own
weight); test is then read once, at that weight and at weight 0 (the policy alone), and the
difference is reported with its paired standard error (`metrics.paired_difference`). Reordering
never adds an item, so Recall@20 is unchanged and Recall@10 can only gain items from ranks 11-20.

  python benchmarks/rerank_eval.py --ranker=runs/beauty_default_ranker_policy runs/beauty_default \
      runs/rl/bd_ndcg_seed0_800 --out=docs/bench/rerank_beauty.json
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
from paired_eval import METRICS, load_model  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from oxyjax import metrics as metrics_lib  # noqa: E402
from oxyjax import partitioning  # noqa: E402
from oxyjax.evaluation import fixed_subset  # noqa: E402
from oxyjax.rl import ranking_model  # noqa: E402

WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def beams_and_logits(exp, params, ev, ranker, ranker_params, split: str, max_examples: int | None = None):
  """``(items [N, K], policy scores [N, K], ranker logits [N, K], targets [N])`` over a split."""
  (arrays, _pool), = exp.eval_sets(split).values()
  arrays = fixed_subset(arrays, max_examples)
  score = jax.jit(ranker.score)
  out = {"items": [], "scores": [], "logits": [], "targets": []}
  for feats, items, scores, mask in ev.beams(params, arrays):
    logits = np.asarray(score(ranker_params, feats, items))
    for key, val in (("items", items), ("scores", scores), ("logits", logits), ("targets", feats["target_items"])):
      out[key].append(np.asarray(val)[mask])
  return tuple(np.concatenate(out[k]) for k in ("items", "scores", "logits", "targets"))


def ranks_at(weight, items, scores, logits, targets):
  reordered, _ = ranking_model.rerank(items, scores, logits, weight)
  return metrics_lib.target_ranks(reordered, targets)


def mean_metrics(ranks) -> dict[str, float]:
  return {m: float(metrics_lib.per_example(ranks, m).mean()) for m in METRICS}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("models", nargs="+")
  ap.add_argument("--ranker", required=True, help="a ranking-model directory (python -m oxyjax.rl.ranking_model)")
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--weights", default=",".join(str(w) for w in WEIGHTS))
  ap.add_argument("--select", default="ndcg@10", help="the validation metric the weight is chosen by")
  ap.add_argument("--max_examples", type=int, default=None, help="a fixed random subset of each split (default: every row)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  weights = [float(w) for w in args.weights.split(",")]
  if 0.0 not in weights:
    raise SystemExit("--weights must include 0 (the policy alone)")
  print(f"[rerank_eval] CPU: {cpu_model()}")
  part = partitioning.Partitioner({"data": 1})
  result = {"cpu": cpu_model(), "beam": args.beam, "ranker": args.ranker, "select": args.select,
            "weights": weights, "command": "python benchmarks/rerank_eval.py " + " ".join(sys.argv[1:]), "models": {}}
  for spec in args.models:
    exp, params, step, ev = load_model(spec, part, beam=args.beam, batch_size=args.batch_size)
    ranker, ranker_params, meta = ranking_model.load(args.ranker, exp.artifact, part)
    t0 = time.time()
    val = beams_and_logits(exp, params, ev, ranker, ranker_params, "validation", args.max_examples)
    curve = {w: mean_metrics(ranks_at(w, *val)) for w in weights}
    best = max(weights, key=lambda w: (curve[w][args.select], -w))  # a tie goes to the smaller weight
    test = beams_and_logits(exp, params, ev, ranker, ranker_params, "test", args.max_examples)
    base, chosen = ranks_at(0.0, *test), ranks_at(best, *test)
    rec = result["models"][spec] = {
        "step": step, "validation_rows": int(val[0].shape[0]), "test_rows": int(test[0].shape[0]),
        "validation": {str(w): curve[w] for w in weights}, "chosen_weight": best,
        "test": {"policy": mean_metrics(base), "reranked": mean_metrics(chosen),
                 "difference": {m: metrics_lib.paired_difference(base, chosen, m) for m in METRICS}}}
    print(f"\n[rerank_eval] {spec} (step {step}), {time.time() - t0:.0f} s; validation {rec['validation_rows']} rows:")
    print("| weight | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for w in weights:
      print(f"| {w:g}{' (chosen)' if w == best else ''} | " + " | ".join(f"{curve[w][m]:.4f}" for m in METRICS) + " |")
    print(f"test ({rec['test_rows']} rows), read once: policy alone, then reranked at weight {best:g} "
          f"(difference ± paired SE)")
    print("| | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    print("| policy | " + " | ".join(f"{rec['test']['policy'][m]:.4f}" for m in METRICS) + " |")
    print("| reranked | " + " | ".join(f"{rec['test']['reranked'][m]:.4f} ({d:+.4f} ± {se:.4f})"
                                       for m in METRICS for d, se in [rec["test"]["difference"][m]]) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
