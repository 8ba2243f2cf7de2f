r"""The slow-thinking ablation (issue 4): baseline / + reasoning instructions / + IGR / + IGR + Q2I / all.

Each row is a gin file in gin_configs/slow_thinking/; every run is a plain `python -m oxyjax.train`
whose test metrics (best-on-validation checkpoint) land in <run_root>/<dataset>/<row>/run_summary.json.
Finished rows are skipped, so the script resumes. Then it prints (and with --out writes) the table.

  python benchmarks/slow_thinking_ablation.py --datasets=industrial,office
  python benchmarks/slow_thinking_ablation.py --eval_only --rows=baseline,igr,igr_q2i,full_history
  python benchmarks/slow_thinking_ablation.py --report_only --out=docs/slow_thinking_ablation.md

The instruction rows read the store written by
  python -m oxyjax.instructions.generate --dataset=<dataset> ...   (see docs/instructions.md)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    "baseline": "baseline (recent 3 behaviours)",
    "instructions": "+ reasoning instructions",
    "igr": "+ IGR (recent 3 + top-3 of the older ones)",
    "igr_q2i": "+ IGR + Q2I",
    "all": "all (instructions + IGR + Q2I)",
    "full_history": "reference: all 10 behaviours, no IGR",
}
METRICS = ("recall@10", "ndcg@10", "hr@1")


def run_row(dataset: str, row: str, run_root: str, bindings: list[str], eval_only: bool = False) -> str:
  model_dir = os.path.join(run_root, dataset, row)
  if eval_only:  # re-evaluate a finished run (e.g. after the store grew): adds test_with_instruction
    bindings = bindings + ["oxyjax.train.train.eval_only = True", "oxyjax.train.train.final_eval_splits = ['test']"]
  elif os.path.exists(os.path.join(model_dir, "run_summary.json")):
    print(f"[ablation] {dataset}/{row}: done already ({model_dir})", flush=True)
    return model_dir
  cmd = [sys.executable, "-m", "oxyjax.train", f"--gin_file=gin_configs/slow_thinking/{row}.gin",
         f"--gin.DATASET='{dataset}'", f"--gin.MODEL_DIR='{model_dir}'"] + [f"--gin_bindings={b}" for b in bindings]
  print("[ablation] " + " ".join(cmd), flush=True)
  os.makedirs(model_dir, exist_ok=True)
  t0 = time.time()
  with open(os.path.join(model_dir, "eval.log" if eval_only else "train.log"), "a") as log:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"[ablation] {dataset}/{row} failed (exit {rc}); see {model_dir}/train.log")
  print(f"[ablation] {dataset}/{row}: {time.time() - t0:.0f}s", flush=True)
  return model_dir


def table(datasets, rows, run_root) -> str:
  out = ["| dataset | row | " + " | ".join(f"test {m}" for m in METRICS) + " | vs baseline (R@10) | "
         + " | ".join(f"covered {m}" for m in METRICS) + " | best step | train time |",
         "|---|---|" + "---|" * (2 * len(METRICS) + 3)]
  for ds in datasets:
    base = None
    for row in rows:
      path = os.path.join(run_root, ds, row, "run_summary.json")
      if not os.path.exists(path):
        out.append(f"| {ds} | {ROWS[row]} | " + " | ".join("not run" for _ in METRICS) + " | - | "
                   + " | ".join("-" for _ in METRICS) + " | - | - |")
        continue
      with open(path) as f:
        s = json.load(f)
      test = s["results"]["test"]
      if row == "baseline":
        base = test
      rel = f"{test['recall@10'] / base['recall@10']:.3f}x" if base and base["recall@10"] else "-"
      cov = s["results"].get("test_with_instruction")
      cov_cells = " | ".join(f"{cov[m]:.4f}" if cov else "-" for m in METRICS)
      out.append(f"| {ds} | {ROWS[row]} | " + " | ".join(f"{test[m]:.4f}" for m in METRICS)
                 + f" | {rel} | {cov_cells} | {s['best_step']} | {s['train_seconds'] / 60:.1f} min |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", default="industrial,office")
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--run_root", default=os.path.join(ROOT, "runs", "slow_thinking"))
  p.add_argument("--gin_bindings", action="append", default=[], help="extra bindings for every run")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--eval_only", action="store_true",
                 help="re-evaluate finished rows on test (adds the instruction-covered subset)")
  p.add_argument("--out", default=None, help="also write the table (markdown) here")
  args = p.parse_args(argv)
  datasets, rows = args.datasets.split(","), args.rows.split(",")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")
  if not args.report_only:
    for ds in datasets:
      for row in rows:
        run_row(ds, row, args.run_root, args.gin_bindings, args.eval_only)
  text = table(datasets, rows, args.run_root)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
