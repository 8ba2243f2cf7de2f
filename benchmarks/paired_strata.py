r"""Where does one model beat another? The paired difference of two single-dataset models on the
same held-out rows (benchmarks/paired_eval.py), split by properties of each row, to explain a
difference rather than only measure it. Written for issue 17's question why tree k-means SIDs
raise the top of the list on Office but Recall@10 on Industrial (docs/results.md).

  python benchmarks/paired_strata.py --split=validation runs/office_d2_text_s0 runs/office_d2_tree256_s0 \
      --out=docs/bench/strata_office_tree256_s0.json

Strata (each row falls in one side of each; rows are those of paired_eval, decoded at the same beam):
- ``repeat``: the target is already in the row's history;
- ``collides@<model>``: the target shares its first L codes with another item in that model's SID
  table, so only the collision token tells them apart;
- ``same_l1@<model>``: the target's first code equals the last history item's in that model's
  table (the next item lies in the same top-level cluster);
- ``popularity``: terciles of how often the target is a training target (``low``/``mid``/``high``).
Each stratum prints its share of the rows, both models' metrics on it and the difference ± paired
SE. Differences across strata are descriptive (the strata overlap and were not pre-registered);
a stratum's paired SE says how well its own difference is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402
from paired_eval import eval_sets, load_model, qualified_item_ids, rows_fingerprint  # noqa: E402

from oxyjax import metrics as metrics_lib  # noqa: E402
from oxyjax import partitioning  # noqa: E402
from oxyjax.evaluation import fixed_subset  # noqa: E402

import numpy as np  # noqa: E402

METRICS = ("hr@1", "ndcg@5", "recall@10")


def collides(codes: np.ndarray) -> np.ndarray:
  """``[N+1]`` bool: the item shares its first L codes (all but the collision level) with another."""
  paths = np.ascontiguousarray(codes[:, :-1])
  _, inverse, counts = np.unique(paths, axis=0, return_inverse=True, return_counts=True)
  out = counts[inverse.reshape(-1)] > 1
  out[0] = False
  return out


def strata(arrays, train_targets: np.ndarray, codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``{stratum name: [rows] bool}`` for the rows of ``arrays`` (module docstring)."""
  hist, n, target = np.asarray(arrays.history), np.asarray(arrays.history_len), np.asarray(arrays.target)
  valid = np.arange(hist.shape[1])[None, :] < n[:, None]
  out = {"repeat": np.any((hist == target[:, None]) & valid, axis=1)}
  last = hist[np.arange(len(n)), np.maximum(n - 1, 0)]
  for name, c in codes.items():
    out[f"collides@{name}"] = collides(c)[target]
    out[f"same_l1@{name}"] = (c[target, 0] == c[last, 0]) & (n > 0)
  freq = np.bincount(train_targets, minlength=int(max(train_targets.max(), target.max())) + 1)[target]
  lo, hi = np.quantile(freq, [1 / 3, 2 / 3])
  out["popularity=low"] = freq <= lo
  out["popularity=mid"] = (freq > lo) & (freq <= hi)
  out["popularity=high"] = freq > hi
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("baseline")
  ap.add_argument("model")
  ap.add_argument("--split", default="validation")
  ap.add_argument("--max_examples", type=int, default=None)
  ap.add_argument("--beam", type=int, default=20)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  print(f"[paired_strata] CPU: {cpu_model()}")
  part = partitioning.Partitioner({"data": 1})
  ranks, codes, fps = {}, {}, {}
  for spec in (args.baseline, args.model):
    exp, params, step, ev = load_model(spec, part, beam=args.beam, batch_size=args.batch_size)
    sets = eval_sets(exp, args.split)
    if list(sets) != ["all"]:
      raise SystemExit(f"{spec}: a multi-scenario model; paired_strata compares single-dataset models")
    arrays, trie = sets["all"]
    arrays = fixed_subset(arrays, args.max_examples)
    fps[spec] = (rows_fingerprint(arrays, qualified_item_ids(exp)), tuple(exp.artifact.raw_item_ids))
    ranks[spec] = ev.target_ranks(params, arrays, None, trie)
    codes[spec] = np.asarray(exp.artifact.sid_table.codes)
    print(f"[paired_strata] {spec} (step {step}): {len(arrays)} {args.split} rows decoded")
  if fps[args.baseline] != fps[args.model]:
    raise SystemExit("the two models' rows or item indices differ; paired strata need the same examples and items")
  train_targets = np.asarray(exp.load_split("train").target)
  short = {args.baseline: "baseline", args.model: "model"}
  rows = strata(arrays, train_targets, {short[s]: c for s, c in codes.items()})
  a, b = ranks[args.baseline], ranks[args.model]
  out = {"cpu": cpu_model(), "split": args.split, "beam": args.beam, "baseline": args.baseline, "model": args.model,
         "rows": int(len(a)), "strata": {}, "command": "python benchmarks/paired_strata.py " + " ".join(sys.argv[1:])}
  print(f"\n{args.split}, {len(a)} rows, beam {args.beam}; baseline = {args.baseline}, model = {args.model}; "
        "difference = model - baseline (paired SE)\n")
  print("| stratum | share | " + " | ".join(f"{m} baseline / model (diff ± SE)" for m in METRICS) + " |")
  print("|---|---|" + "---|" * len(METRICS))
  for name, mask in [("all", np.ones(len(a), bool))] + [(k, v) for k, v in rows.items()] + [
      (f"not {k}", ~v) for k, v in rows.items() if not k.startswith("popularity")]:
    if not mask.any() or (name != "all" and mask.all()):  # an empty or all-rows stratum says nothing
      continue
    rec = out["strata"][name] = {"share": float(mask.mean()), "metrics": {}}
    cells = []
    for m in METRICS:
      va, vb = (float(metrics_lib.per_example(r[mask], m).mean()) for r in (a, b))
      d, se = metrics_lib.paired_difference(a[mask], b[mask], m)
      rec["metrics"][m] = {"baseline": va, "model": vb, "difference": float(d), "paired_se": float(se)}
      cells.append(f"{va:.4f} / {vb:.4f} ({d:+.4f} ± {se:.4f})")
    print(f"| {name} | {mask.mean():.3f} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
