r"""Post-training runs' paired differences from their start, pooled over seeds.

Reads `benchmarks/paired_eval.py` outputs (each with the starting checkpoint as its baseline, any
number of post-trained models in each) and groups the models by their directory name with the seed
taken out (``..._seed<s>_...``), so the seeds of one set-up form one row. Each row is pooled by
`benchmarks/pool_seeds.py` (the mean difference over seeds with its standard error
sqrt(sum SE_i^2) / k, and the spread between the seeds):

  python benchmarks/rl_seed_means.py docs/bench/rl_bd39_scorer_only_stage_validation.json \
      docs/bench/rl_bd39_scorer_only_grpo_seed1_stage_validation.json ...

A comparison that appears in more than one file (the same model against the same baseline) is
counted once (the first file's figures). The baseline may itself be seeded (in each seed's file,
that seed's run of another set-up, e.g. SA-GCPO on the default reward): its seed is taken out too,
the row is named ``<model> minus <baseline>``, and a model compared with each seed's baseline (the
shared start) forms one row over those seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re

_spec = importlib.util.spec_from_file_location("pool_seeds", os.path.join(os.path.dirname(__file__), "pool_seeds.py"))
pool_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool_seeds)

METRICS = ("hr@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def by_setup(paths: list[str], subset: str = "all") -> dict[str, list[dict]]:
  """``{set-up: [one paired_eval-shaped report per seed, with that seed's model alone]}``."""
  seen: set[tuple[str, str]] = set()
  out: dict[str, list[dict]] = {}
  strip = lambda name: re.sub(r"_seed\d+", "_seed*", name.rstrip("/"))
  for p in paths:
    st = json.load(open(p))["sets"][subset]
    base = st["baseline"]
    for model, rec in st["models"].items():
      if model == base or (base, model) in seen:
        continue
      seen.add((base, model))
      setup = strip(model) if strip(base) == base.rstrip("/") else f"{strip(model)} minus {strip(base)}"
      one = {"baseline": base, "models": {base: st["models"][base], model: rec}}
      out.setdefault(setup, []).append({"sets": {setup: one}})
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("paired", nargs="+", help="paired_eval.py JSON outputs")
  ap.add_argument("--set", default="all", help="the paired_eval row set (default all)")
  ap.add_argument("--metrics", default=",".join(METRICS))
  args = ap.parse_args()
  metrics = [m for m in args.metrics.split(",") if m]
  pooled = {}
  for reports in by_setup(args.paired, args.set).values():
    pooled.update(pool_seeds.pool(reports, metrics))
  print(pool_seeds.table(pooled, metrics))


if __name__ == "__main__":
  main()
