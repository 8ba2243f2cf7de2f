r"""A second stage reorders the policy's beams. Is the pair better than the policy alone at the
top of the list?

Each model (a run directory, or ``<run dir>@<params dir>``) decodes the validation and test splits
with constrained beam search (beam 20, as evaluation). A second-stage scorer, trained on the
training logs only, scores each row's beams, and the beams are reordered by

    log p_policy(item) + weight * score(item)                       (`rescoring.rerank`)

where the scorer is one of:
* ``--ranker=DIR``: the RL reward service (`oxyjax.rl.ranking_model`), ``score`` = its logit;
  every model must be of the artifact the ranker was trained for;
* ``--sasrec=DIR``: a SASRec next-item model (`oxyjax.rescoring`), ``score`` = its log-softmax
  over the catalogue; it must have been trained on the model's dataset's training sequences.

The weight is chosen on **validation** only, from a fixed grid, by `--select` (each model its own
weight), or fixed by ``--test_weight`` (the default configuration's weight, chosen by the defaults
rule over all datasets: `benchmarks/select_defaults.py` reads the ``--summaries`` this script
writes, one run summary per weight). Test is then read once, at that weight and at weight 0 (the
policy alone), and the difference is reported with its paired standard error
(`metrics.paired_difference`); ``--no_test`` skips it. Reordering never adds an item, so
Recall@20 is unchanged and Recall@10 can only gain items from ranks 11-20 (with ``--union``
SASRec's items join them). A multi-scenario run is scored per scenario, each over its own pool
with its own curve and chosen weight (what `RescoringConfig.scenario_weights` then sets); its
SASRec scorer is the catalogue's (``python -m oxyjax.rescoring --domains=...``, or the run's own
``<run>/second_stage``).

  python benchmarks/rerank_eval.py --ranker=runs/beauty_default_ranker_policy runs/beauty_default \
      runs/rl/bd_ndcg_seed0_800 --out=docs/bench/rerank_beauty.json
  python benchmarks/rerank_eval.py --sasrec=runs/beauty_sasrec runs/beauty_rqvae --no_test \
      --summaries=docs/bench/rescore --out=docs/bench/rescore_beauty_validation.json
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
from paired_eval import METRICS, eval_sets, load_model  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from oxyjax import metrics as metrics_lib  # noqa: E402
from oxyjax import partitioning  # noqa: E402
from oxyjax import rescoring  # noqa: E402
from oxyjax.evaluation import fixed_subset  # noqa: E402
from oxyjax.rl import ranking_model  # noqa: E402

WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class Scorer:
  """The scorer named by ``--ranker`` or ``--sasrec`` for one model, checked against the model's
  artifact (ranker) or dataset's training sequences (SASRec).

  ``parts(features, items, scores) -> (candidates, policy log-probs, second-stage scores)``: the
  items the fused order ranks, each with the policy's joint log-probability and the scorer's
  score: the beams alone, or with ``--union=k`` the beams and SASRec's k best items not among them
  (`rescoring.Rescorer.parts`); ``alone(features, pool)``: SASRec's own top 20 among the pool's items (None
  for the ranker, which scores only given candidates)."""

  def __init__(self, args, exp, params, ev):
    self.params, self.scorer = params, None
    if args.ranker:
      ranker, ranker_params, _ = ranking_model.load(args.ranker, exp.artifact, ev.partitioner)
      score = jax.jit(ranker.score)
      self.parts = lambda feats, items, scores, trie: (items, scores, score(ranker_params, feats, items))
      return
    sequences, num_items = rescoring.artifact_sequences(exp.artifact)
    self.scorer = rescoring.SASRecScorer.load(args.sasrec, sequences=sequences, num_items=num_items)
    # The weight is swept on the parts; a smaller union's candidates are the first columns of the
    # largest one's (SASRec's best k items not among the beams, in its order: `candidates_of`).
    stage = rescoring.SecondStage(self.scorer, 0.0, max(args.unions, default=0))
    rescorer = rescoring.Rescorer(exp.model, stage, exp.artifact.sid_table.codes, ev.trie, ev.partitioner)
    path_log_probs = jax.jit(exp.model.path_log_probs)
    codes = np.asarray(exp.artifact.sid_table.codes)
    self.max_beam_score_error = 0.0  # |recomputed joint log-prob - beam score| over live beams

    def parts(feats, items, scores, trie):
      items, scores = np.asarray(items), np.asarray(scores)
      with jax.set_mesh(ev.partitioner.mesh), ev.partitioner.rules_context():
        joint = np.asarray(path_log_probs(params, feats, codes[np.maximum(items, 0)]))
      err = np.abs(joint - scores)[items > 0]
      self.max_beam_score_error = max(self.max_beam_score_error, float(err.max(initial=0.0)))
      return rescorer.parts(params, feats, items, scores, trie)

    self.parts = parts

  def alone(self, feats, pool):
    if self.scorer is None:
      return None
    return self.scorer.top_k(feats["history_items"], feats["history_mask"], 20, pool)[0]


def set_names(exp) -> list[str]:
  """What is scored: each scenario of a multi-scenario run by name (each over its own pool, with
  its own weight curve and choice), else the dataset ('all')."""
  return [s.name for s in exp.scenarios] or ["all"]


def beams_and_logits(exp, params, ev, stage: Scorer, split: str, max_examples: int | None = None,
                     name: str = "all"):
  """``{items [N, C], scores [N, C] (policy), logits [N, C] (second stage), targets [N], alone
  [N, 20] (SASRec alone, where there is one)}`` over a split (a scenario's rows: ``name``)."""
  arrays, trie = eval_sets(exp, split)[name]
  pool = exp.artifact.pools[name] if exp.scenarios else None
  arrays = fixed_subset(arrays, max_examples)
  out = {"items": [], "scores": [], "logits": [], "targets": [], "alone": []}
  for feats, items, scores, mask in ev.beams(params, arrays, trie):
    items, scores, logits = (np.asarray(x) for x in stage.parts(feats, items, scores, trie))
    alone = stage.alone(feats, pool)
    for key, val in (("items", items), ("scores", scores), ("logits", logits), ("targets", feats["target_items"]),
                     ("alone", alone)):
      if val is not None:
        out[key].append(np.asarray(val)[mask])
  return {k: np.concatenate(v) for k, v in out.items() if v}


def ranks_at(weight, rows):
  reordered, _ = rescoring.rerank(rows["items"], rows["scores"], rows["logits"], weight)
  return metrics_lib.target_ranks(reordered, rows["targets"])


def variants(unions: list[int]) -> list[str]:
  """The candidate sets scored: the beams, and for each k of ``--union`` also the beams and
  SASRec's k best items not among them."""
  return ["beams"] + [f"union{k}" for k in unions]


def candidates_of(rows, variant: str, beam: int):
  """``rows`` restricted to a variant's candidates: the first ``beam`` columns are the beams, the
  next k SASRec's best k items not among them (``union<k>``)."""
  width = beam + (int(variant[len("union"):]) if variant.startswith("union") else 0)
  return {**rows, **{k: rows[k][:, :width] for k in ("items", "scores", "logits")}}


def policy_ranks(rows, beam: int):
  """The policy alone: its beams in beam-search order (the first ``beam`` candidates)."""
  return metrics_lib.target_ranks(rows["items"][:, :beam], rows["targets"])


def mean_metrics(ranks) -> dict[str, float]:
  return {m: float(metrics_lib.per_example(ranks, m).mean()) for m in METRICS}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("models", nargs="+")
  stage = ap.add_mutually_exclusive_group(required=True)
  stage.add_argument("--ranker", help="a ranking-model directory (python -m oxyjax.rl.ranking_model)")
  stage.add_argument("--sasrec", help="a SASRec scorer directory (python -m oxyjax.rescoring)")
  ap.add_argument("--union", default="0",
                  help="with --sasrec: also rank SASRec's k best items not among the beams beside them, for each "
                  "k of a comma-separated list (0: the beams only)")
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--weights", default=",".join(str(w) for w in WEIGHTS))
  ap.add_argument("--select", default="ndcg@10", help="the validation metric the weight is chosen by")
  ap.add_argument("--test_weight", type=float, default=None,
                  help="read test at this weight (the defaults rule's choice) instead of each model's best on validation")
  ap.add_argument("--test_variant", default=None, help="beams | union<k> (default: the union where given)")
  ap.add_argument("--no_test", action="store_true", help="validation only")
  ap.add_argument("--test_only", action="store_true", help="test only, at --test_weight (validation was read before)")
  ap.add_argument("--summaries", default=None,
                  help="a directory for one run summary per model and weight (validation), for select_defaults.py")
  ap.add_argument("--max_examples", type=int, default=None, help="a fixed random subset of each split (default: every row)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  weights = [float(w) for w in args.weights.split(",")]
  args.unions = sorted({int(k) for k in args.union.split(",")} - {0})
  if 0.0 not in weights:
    raise SystemExit("--weights must include 0 (the policy alone)")
  if args.test_only and args.test_weight is None:
    raise SystemExit("--test_only needs --test_weight")
  if args.unions and not args.sasrec:
    raise SystemExit("--union needs --sasrec")
  if args.test_variant not in (None, *variants(args.unions)):
    raise SystemExit(f"--test_variant must be one of {variants(args.unions)} with --union={args.union}")
  print(f"[rerank_eval] CPU: {cpu_model()}")
  part = partitioning.Partitioner({"data": -1})  # every local device (one on a CPU host)
  result = {"cpu": cpu_model(), "beam": args.beam, "ranker": args.ranker, "sasrec": args.sasrec,
            "union": args.unions, "select": args.select, "weights": weights,
            "command": "python benchmarks/rerank_eval.py " + " ".join(sys.argv[1:]), "models": {}}
  for spec in args.models:
    exp, params, step, ev = load_model(spec, part, beam=args.beam, batch_size=args.batch_size)
    stage = Scorer(args, exp, params, ev)
    result["models"][spec] = {"step": step}
    for name in set_names(exp):
      # A multi-scenario run: one record per scenario (its own curve and weight) under "scenarios".
      rec = result["models"][spec]
      if exp.scenarios:
        rec = rec.setdefault("scenarios", {}).setdefault(name, {"step": step})
      evaluate_set(args, spec, exp, params, ev, stage, rec, name, weights)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


def evaluate_set(args, spec, exp, params, ev, stage, rec, name: str, weights) -> None:
  """Validation (each weight and candidate set), the weight chosen on it, then test read once."""
  step, t0 = rec["step"], time.time()
  if args.test_only:
    run_test(args, exp, params, ev, stage, rec, name)
    return
  val = beams_and_logits(exp, params, ev, stage, "validation", args.max_examples, name)
  rec.update({
      "step": step, "validation_rows": int(val["targets"].shape[0]),
      "validation_policy": mean_metrics(policy_ranks(val, args.beam))})
  label = spec if name == "all" else f"{spec} {name}"
  print(f"\n[rerank_eval] {label} (step {step}), {time.time() - t0:.0f} s; validation {rec['validation_rows']} rows:")
  print("| candidates | weight | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
  print("| beams | policy alone | " + " | ".join(f"{rec['validation_policy'][m]:.4f}" for m in METRICS) + " |")
  if "alone" in val:
    rec["validation_sasrec_alone"] = mean_metrics(metrics_lib.target_ranks(val["alone"], val["targets"]))
    print("| SASRec top 20 | SASRec alone | "
          + " | ".join(f"{rec['validation_sasrec_alone'][m]:.4f}" for m in METRICS) + " |")
  for variant in variants(args.unions):
    rows = candidates_of(val, variant, args.beam)
    curve = {w: mean_metrics(ranks_at(w, rows)) for w in weights}
    best = max(weights, key=lambda w: (curve[w][args.select], -w))  # a tie goes to the smaller weight
    rec[variant] = {"validation": {str(w): curve[w] for w in weights}, "best_weight_on_validation": best}
    for w in weights:
      print(f"| {variant} | {w:g}{' (best)' if w == best else ''} | "
            + " | ".join(f"{curve[w][m]:.4f}" for m in METRICS) + " |")
    if args.summaries:
      write_summaries(args.summaries, spec, exp.artifact.dataset, training_steps(spec, stage), curve, variant,
                      None if name == "all" else name)
  if args.unions:
    rec["extra_items_per_row"] = float((val["items"][:, args.beam:] > 0).sum(axis=1).mean())
    print(f"items added to the beams: {rec['extra_items_per_row']:.2f} per row (at most {args.unions[-1]})")
    rec["max_beam_score_error"] = stage.max_beam_score_error
    print(f"largest |recomputed joint log-prob - beam score| over live beams: {rec['max_beam_score_error']:.2e}")
  if not args.no_test:
    run_test(args, exp, params, ev, stage, rec, name)


def training_steps(spec: str, stage: Scorer) -> int:
  """The policy run's training steps (its run_summary.json) plus the scorer's."""
  with open(os.path.join(spec.partition("@")[0], "run_summary.json")) as f:
    steps = int(json.load(f).get("steps") or 0)
  return steps + (int(stage.scorer.info.get("steps", 0)) if stage.scorer is not None else 0)


def run_test(args, exp, params, ev, stage, rec, name: str = "all") -> None:
  """Reads test once: the policy alone, and the chosen candidates re-scored at the chosen weight."""
  variant = args.test_variant or variants(args.unions)[-1]
  chosen = rec[variant]["best_weight_on_validation"] if args.test_weight is None else args.test_weight
  test = beams_and_logits(exp, params, ev, stage, "test", args.max_examples, name)
  base, mine = policy_ranks(test, args.beam), ranks_at(chosen, candidates_of(test, variant, args.beam))
  rec.update({"test_rows": int(test["targets"].shape[0]), "test_variant": variant, "chosen_weight": chosen,
              "test": {"policy": mean_metrics(base), "reranked": mean_metrics(mine),
                       "difference": {m: metrics_lib.paired_difference(base, mine, m) for m in METRICS}}})
  if "alone" in test:
    rec["test"]["sasrec_alone"] = mean_metrics(metrics_lib.target_ranks(test["alone"], test["targets"]))
  print(f"test ({rec['test_rows']} rows), read once: policy alone, then {variant} re-scored at weight {chosen:g} "
        f"(difference ± paired SE)")
  print("| | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
  print("| policy | " + " | ".join(f"{rec['test']['policy'][m]:.4f}" for m in METRICS) + " |")
  print("| re-scored | " + " | ".join(f"{rec['test']['reranked'][m]:.4f} ({d:+.4f} ± {se:.4f})"
                                      for m in METRICS for d, se in [rec["test"]["difference"][m]]) + " |")
  if "sasrec_alone" in rec["test"]:
    print("| SASRec alone | " + " | ".join(f"{rec['test']['sasrec_alone'][m]:.4f}" for m in METRICS) + " |")


def write_summaries(directory: str, spec: str, dataset: str, step: int, curve, variant: str,
                    scenario: str | None = None) -> None:
  """``<directory>/<run name>[_<scenario>]_<variant>_w<weight>_run_summary.json`` per weight: the
  validation metrics after re-scoring, in the run-summary form `select_defaults.py` reads
  (``steps``: the policy's training steps plus the scorer's, the cost the rule's tie-break counts)."""
  os.makedirs(directory, exist_ok=True)
  name = "_".join([os.path.basename(os.path.normpath(spec.partition("@")[0]))] + ([scenario] if scenario else [])
                  + [variant])
  for w, metrics in curve.items():
    with open(os.path.join(directory, f"{name}_w{w:g}_run_summary.json"), "w") as f:
      json.dump({"dataset": dataset, "steps": step, "rescoring_weight": w, "candidates": variant,
                 "results": {"validation": metrics}}, f, indent=1)


if __name__ == "__main__":
  main()
