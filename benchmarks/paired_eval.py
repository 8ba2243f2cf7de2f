r"""Paired comparison of models on the same held-out rows: each model's metrics, and each model
minus the first (the baseline, e.g. the checkpoint post-training started from) with the paired
standard error, so that a change smaller than one model's sampling noise can still be told from
noise (or not). Every model decodes the same rows with the same beam.

  python benchmarks/paired_eval.py --split=test runs/beauty_qs runs/rl/qs_beam_rank_1e5 [--out=docs/bench/x.json]

The standard error of one model's recall@10 on n rows is sqrt(p (1 - p) / n), about 0.0016 on
Beauty's 22,363 test rows; the paired SE is std(b_i - a_i) / sqrt(n) over the rows, which only the
rows where the two models disagree make non-zero. Each model is a run directory (its evaluation
weights: the artifact's params, see `train.load_eval_weights`) or `<run dir>@<params dir>`.

A multi-scenario run is scored per scenario, each over its own pool, and models are paired per
scenario by name: a model that holds only some scenarios (one of the separately trained models of
benchmarks/multi_scenario.py) is compared with the baseline on those. Rows are paired by content,
not by position: each set's rows are fingerprinted by their users' behaviours and targets as raw
ids (`"<domain>/<raw id>"`), and models whose rows differ are refused, so that two runs over
different catalogues or SIDs (a unified model and a one-domain model, or two SID sources) can be
compared on the same examples.

  python benchmarks/paired_eval.py --split=test runs/ms/unified runs/ms/separate_office_homepage ...

`--second_stage` ranks each model's beams with a second stage (`rescoring.SecondStage.of_run`:
``auto`` each run's own, or one saved stage's directory for every model), as a default run's
test results do: a post-trained run against its start, both through the same stage.

  python benchmarks/paired_eval.py --split=test --second_stage=<stage dir> runs/beauty_default_s0 runs/rl/<run>

`--matmul_dtypes=float32,bfloat16` decodes each model with its weight products in each dtype
(`ModelConfig.matmul_dtype`; the first is the model's label, the others '<model>[bfloat16]'): what
a bfloat16 serving export (`python -m oxyjax.export --matmul_dtype=bfloat16`) does to the metrics.

  python benchmarks/paired_eval.py --split=validation --second_stage=auto --matmul_dtypes=float32,bfloat16 \
      runs/beauty_default_s0

`--normalizations=vocab,last_valid` decodes each model with each beam-score normalisation
(`decoding.beam_search`'s `normalize`; the first is the model's label, the others '<model>[last_valid]'),
through the second stage too where one is given: what `python -m oxyjax.export --normalize=last_valid`
does to the metrics.

  python benchmarks/paired_eval.py --split=validation --normalizations=vocab,last_valid runs/beauty_default_s0

`--default_instruction` also scores each model on the rows that carry an instruction (search
queries, generated reasoning instructions) with the learned default `I_r` in its place, paired with
the model itself: how much the model reads its instruction.

  python benchmarks/paired_eval.py --sets=office_search,industrial_search --default_instruction \
      runs/ms/unified runs/ms/separate_office_search runs/ms/separate_industrial_search
"""

from __future__ import annotations

import argparse
import hashlib
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
from oxyjax.evaluation import Evaluator, fixed_subset  # noqa: E402

import numpy as np  # noqa: E402

METRICS = ("hr@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
_quiet = lambda *a, **k: None  # noqa: E731


def qualified_item_ids(exp) -> np.ndarray:
  """Each item index's ``"<domain>/<raw id>"`` in the run's item space."""
  if exp.catalogue is not None:
    return exp.catalogue.qualified_ids()
  return np.asarray([""] + [f"{exp.dataset}/{r}" for r in exp.artifact.raw_item_ids[1:]], dtype=object)


def rows_fingerprint(arrays, ids: np.ndarray) -> str:
  """Digest of the rows' contents as raw ids (history, in order, then target; row order counts)."""
  h = hashlib.sha256()
  for hist, n, target in zip(arrays.history, arrays.history_len, arrays.target):
    h.update(("|".join(ids[hist[:n]].tolist()) + ">" + ids[target] + "\n").encode())
  return h.hexdigest()[:16]


def eval_sets(exp, split: str):
  """``{name: (examples, trie)}``: `Experiment.eval_sets` keyed by scenario name ('all' without
  scenarios), each with its pool's trie."""
  return {key.partition("/")[2] or "all": (arrays, exp.trie(pool))
          for key, (arrays, pool) in exp.eval_sets(split).items()}


def load_model(spec: str, part, *, beam: int, batch_size: int, second_stage: str | None = None,
               matmul_dtype: str | None = None, normalize: str = "vocab"):
  """``(experiment, evaluation weights, their step, Evaluator)`` of one model spec: a run directory,
  or ``<run dir>@<params dir>``; with `second_stage` (``auto`` or a stage's directory) the
  evaluator ranks by that stage (`rescoring.SecondStage.of_run`); `matmul_dtype`: the weight
  products' dtype (`RecModel.with_matmul_dtype`; None: the model's own); `normalize`: the beam
  search's score normalisation."""
  from oxyjax import rescoring

  run_dir, _, weights = spec.partition("@")
  exp = experiment_lib.from_artifact(ModelArtifact.load(artifact_dir(run_dir)), partitioner=part, log=_quiet)
  params, step = train_lib.load_eval_weights(run_dir, trainer.TrainStateFactory(exp.model, part).params_abstract,
                                             weights or None, log=_quiet)
  if matmul_dtype is not None:
    exp.model = exp.model.with_matmul_dtype(matmul_dtype)
  rescorer = None
  if second_stage:
    stage = rescoring.SecondStage.of_run(run_dir, second_stage, num_items=exp.artifact.num_items,
                                         num_scenarios=len(exp.scenarios))
    if stage is None:
      raise SystemExit(f"{run_dir}: --second_stage=auto, and the run has no second stage")
    train_lib.check_second_stage(normalize, None, field="--second_stage")
    rescorer = rescoring.Rescorer(exp.model, stage, exp.artifact.sid_table.codes, exp.trie(), part, normalize)
  return exp, params, step, Evaluator(exp.model, part, exp.trie(), beam_size=beam, batch_size=batch_size,
                                      second_stage=rescorer, score_normalization=normalize)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("models", nargs="+", help="run directories; the first is the baseline")
  ap.add_argument("--split", default="test")
  ap.add_argument("--max_examples", type=int, default=None, help="a fixed random subset of each set (default: every row)")
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--sets", default=None, help="comma-separated scenario names to score (default: all)")
  ap.add_argument("--default_instruction", action="store_true",
                  help="also score each model with the learned default I_r in place of every row's instruction "
                       "(a query, a generated instruction), as '<model>#default_instruction': does the model use it?")
  ap.add_argument("--second_stage", default=None, help="rank by a second stage: 'auto' (each run's own) or a "
                  "saved stage's directory (every model)")
  ap.add_argument("--matmul_dtypes", default=None, help="comma-separated weight-product dtypes (float32, "
                  "bfloat16; ModelConfig.matmul_dtype): each model decoded in each, the others labelled "
                  "'<model>[<dtype>]' (default: the model's own)")
  ap.add_argument("--normalizations", default="vocab", help="comma-separated beam-score normalisations "
                  "(vocab, valid, last_valid; decoding.beam_search): each model decoded with each, the others "
                  "labelled '<model>[<normalize>]'")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  wanted = None if args.sets is None else set(args.sets.split(","))
  print(f"[paired_eval] CPU: {cpu_model()}")
  part = partitioning.Partitioner({"data": 1})
  ranks: dict[str, dict[str, np.ndarray]] = {}  # set -> model -> [rows]
  fingerprints: dict[str, tuple[str, str]] = {}  # set -> (fingerprint, the model that set it)
  dtypes = args.matmul_dtypes.split(",") if args.matmul_dtypes else [None]
  norms = args.normalizations.split(",")
  for spec, dtype, norm in [(m, d, n) for m in args.models for d in dtypes for n in norms]:
    exp, params, step, ev = load_model(spec, part, beam=args.beam, batch_size=args.batch_size,
                                       second_stage=args.second_stage, matmul_dtype=dtype, normalize=norm)
    spec += "".join(f"[{v}]" for v, first in ((dtype, dtypes[0]), (norm, norms[0])) if v not in (None, first))
    ids = qualified_item_ids(exp)
    for name, (arrays, trie) in eval_sets(exp, args.split).items():
      if wanted is not None and name not in wanted:
        continue
      arrays = fixed_subset(arrays, args.max_examples)
      fp = rows_fingerprint(arrays, ids)
      seen = fingerprints.setdefault(name, (fp, spec))
      if seen[0] != fp:
        raise SystemExit(f"{spec}: its {args.split} rows of '{name}' differ from {seen[1]}'s "
                         f"(fingerprint {fp} against {seen[0]}); paired rows need the same examples")
      t0 = time.time()
      ranks.setdefault(name, {})[spec] = ev.target_ranks(params, arrays, None, trie)
      print(f"[paired_eval] {spec} (step {step}) {name}: {args.split}, {len(arrays)} rows decoded in "
            f"{time.time() - t0:.0f} s")
      mask = arrays.extras.get("instruction_mask")
      if args.default_instruction and mask is not None and mask.any():
        ranks[name][f"{spec}#default_instruction"] = ev.target_ranks(
            params, train_lib.with_default_instruction(arrays), None, trie)
  base = args.models[0]
  out = {"cpu": cpu_model(), "split": args.split, "beam": args.beam, "second_stage": args.second_stage,
         "normalizations": norms,
         "baseline": base, "sets": {},
         "command": "python benchmarks/paired_eval.py " + " ".join(sys.argv[1:])}
  for name, by_model in ranks.items():
    rows = len(next(iter(by_model.values())))
    ref = base if base in by_model else next(iter(by_model))
    print(f"\n{args.split} / {name}, {rows} rows, beam {args.beam}; difference = model - {ref} (paired SE; "
          f"'#default_instruction' rows: minus the same model with its instructions)\n")
    print("| model | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    rec = out["sets"][name] = {"rows": rows, "baseline": ref, "models": {}}
    for spec, r in by_model.items():
      # '<model>#default_instruction' is compared with its own model, every other one with the baseline
      own = spec.partition("#")[0]
      against = own if own != spec and own in by_model else ref
      vals = {m: float(metrics_lib.per_example(r, m).mean()) for m in METRICS}
      diffs = {m: metrics_lib.paired_difference(by_model[against], r, m) for m in METRICS} if spec != ref else {}
      rec["models"][spec] = {"metrics": vals, "difference": diffs, "against": against}
      cells = [f"{vals[m]:.4f}" + (f" ({diffs[m][0]:+.4f} ± {diffs[m][1]:.4f})" if diffs else "") for m in METRICS]
      print(f"| {spec} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
