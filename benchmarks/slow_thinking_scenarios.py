r"""Does a generated reasoning instruction help homepage recommendation in the unified model?
(issue 14, "the slow-thinking question asked again").

  python benchmarks/slow_thinking_scenarios.py --store=runs/instructions_2018 \
      runs/st_scen/seed0/unified runs/st_scen/seed1/unified \
      [--baseline runs/st_scen_none/seed0/unified --baseline runs/st_scen_none/seed1/unified] [--out=x.json]

Each positional run is a unified multi-scenario model (benchmarks/multi_scenario.py
--instructions_store=...), so its search scenarios trained `W_r I_r` on real query text. For every
homepage scenario, the rows of `--split` whose user has a fresh generated instruction in the
store (the covered rows) are decoded twice by the same weights: with the instruction as I_r, and
with the learned default instead. The difference is paired per row (`metrics.paired_difference`),
so its standard error counts only the rows the two answers disagree on. With `--baseline` runs
(one per positional run, in the same order, for the first runs: the same set-up and seed trained
without the store), the
covered rows are also decoded by the baseline with the learned default, and the instructed model
with its instruction is compared with it row by row: the effect of training with instructions
and using them, not only of using them.

Seed noise: every figure is given per run (seed), and their mean with the spread between seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
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
_quiet = lambda *a, **k: None  # noqa: E731


def _load(run_dir: str, store: str | None, part):
  art = ModelArtifact.load(artifact_dir(run_dir))
  if not art.scenarios:
    raise SystemExit(f"{run_dir}: not a multi-scenario model")
  exp = experiment_lib.from_artifact(art, partitioner=part, log=_quiet,
                                     instructions=experiment_lib.InstructionsConfig(store=store))
  params, step = train_lib.load_eval_weights(run_dir, trainer.TrainStateFactory(exp.model, part).params_abstract,
                                             log=_quiet)
  return exp, params, step


def _summary(ranks_a, ranks_b):
  mean = lambda r, m: float(metrics_lib.per_example(r, m).mean())  # noqa: E731
  return {m: {"a": mean(ranks_a, m), "b": mean(ranks_b, m), "diff": metrics_lib.paired_difference(ranks_a, ranks_b, m)}
          for m in METRICS}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("runs", nargs="+", help="unified runs trained with the store (one per seed)")
  ap.add_argument("--store", required=True)
  ap.add_argument("--baseline", action="append", default=[], help="the same runs trained without the store")
  ap.add_argument("--split", default="test")
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  if len(args.baseline) > len(args.runs):
    raise SystemExit("give at most one --baseline per run, in the same order (the first runs get them)")
  print(f"[slow_thinking_scenarios] CPU: {cpu_model()}")
  part = partitioning.Partitioner({"data": 1})
  out = {"cpu": cpu_model(), "split": args.split, "beam": args.beam, "store": args.store, "runs": {},
         "command": "python benchmarks/slow_thinking_scenarios.py " + " ".join(sys.argv[1:])}
  for i, run in enumerate(args.runs):
    exp, params, step = _load(run, args.store, part)
    ev = Evaluator(exp.model, part, exp.trie(), beam_size=args.beam, batch_size=args.batch_size)
    base = _load(args.baseline[i], None, part) if i < len(args.baseline) else None
    rec = out["runs"][run] = {"step": step, "scenarios": {}}
    for s in exp.scenarios:
      arrays = s.splits[args.split]
      mask = arrays.extras.get("instruction_mask")
      if s.config.kind != "homepage" or mask is None or not mask.any():
        continue
      covered = arrays.take(np.flatnonzero(mask))
      trie = exp.trie(s.name)
      with_instr = ev.target_ranks(params, covered, None, trie)
      default = ev.target_ranks(params, train_lib.with_default_instruction(covered), None, trie)
      row = {"rows": int(len(covered)), "of": int(len(arrays)),
             "instruction_vs_default": _summary(default, with_instr)}
      if base is not None:
        b_exp, b_params, _ = base
        b_ev = Evaluator(b_exp.model, part, b_exp.trie(), beam_size=args.beam, batch_size=args.batch_size)
        b_ranks = b_ev.target_ranks(b_params, train_lib.with_default_instruction(covered), None, b_exp.trie(s.name))
        row["instructed_model_vs_baseline"] = _summary(b_ranks, with_instr)
      rec["scenarios"][s.name] = row
      print(f"[slow_thinking_scenarios] {run} (step {step}) {s.name}: {len(covered)}/{len(arrays)} {args.split} rows "
            "covered; with instruction - learned default: "
            + ", ".join(f"{m} {row['instruction_vs_default'][m]['diff'][0]:+.4f} ± "
                        f"{row['instruction_vs_default'][m]['diff'][1]:.4f}" for m in METRICS), flush=True)
      if base is not None:
        print("    instructed model with instruction - baseline model: "
              + ", ".join(f"{m} {row['instructed_model_vs_baseline'][m]['diff'][0]:+.4f} ± "
                          f"{row['instructed_model_vs_baseline'][m]['diff'][1]:.4f}" for m in METRICS), flush=True)
  # mean over seeds, and the spread between them
  names = sorted({n for r in out["runs"].values() for n in r["scenarios"]})
  kinds = ["instruction_vs_default"] + (["instructed_model_vs_baseline"] if args.baseline else [])
  out["over_seeds"] = {}
  print(f"\n{args.split}, covered rows, beam {args.beam}: difference (paired SE) per seed; "
        "mean over seeds (seed spread)")
  for kind in kinds:
    print(f"\n{kind}\n\n| scenario | seed | rows | " + " | ".join(METRICS) + " |\n|---|---|---|"
          + "---|" * len(METRICS))
    for n in names:
      per = [(run, r["scenarios"][n]) for run, r in out["runs"].items() if kind in r["scenarios"].get(n, {})]
      for run, row in per:
        print(f"| {n} | {run} | {row['rows']} | "
              + " | ".join(f"{row[kind][m]['diff'][0]:+.4f} ± {row[kind][m]['diff'][1]:.4f}" for m in METRICS) + " |")
      diffs = {m: [row[kind][m]["diff"][0] for _, row in per] for m in METRICS}
      means = {m: float(np.mean(diffs[m])) for m in METRICS}
      spread = {m: float(np.std(diffs[m], ddof=1)) if len(per) > 1 else float("nan") for m in METRICS}
      out["over_seeds"].setdefault(kind, {})[n] = {"mean": means, "seed_std": spread, "seeds": len(per)}
      print(f"| {n} | mean of {len(per)} | | " + " | ".join(f"{means[m]:+.4f} ({spread[m]:.4f})" for m in METRICS) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
