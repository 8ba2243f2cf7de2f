r"""One model for every scenario vs one model per scenario, at the same total number of steps.

  python benchmarks/multi_scenario.py --out=runs/multi_scenario --steps=1200

Trains (1) the unified model on the seqio mixture of the scenarios of
gin_configs/scenarios/amazon2018.gin (Office and Industrial: homepage, item-to-item, search, and
a data-poor item-to-item), `--steps` steps; and (2) one model per scenario, each on that
scenario alone for `--steps / #scenarios` steps, so both approaches spend the same number of
optimizer steps of the same batch. Every model keeps its best checkpoint by validation
recall@10 (the unified one: the mean over scenarios) and is tested once with it. Writes
`<out>/multi_scenario.json` (per-scenario test Recall@10 / NDCG@10 / HR@1, checkpoints kept,
wall time of each approach, the CPU model) and `<out>/unified_validation.png` (per-scenario
validation recall@10 over training for the unified model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402


def scenario_configs(path="gin_configs/scenarios/amazon2018.gin"):
  import gin

  from oxyjax import train as train_lib  # noqa: F401  (gin names)
  from oxyjax.cli import GIN_ROOT

  gin.clear_config()
  gin.add_config_file_search_path(GIN_ROOT)  # includes, as the CLI resolves them
  gin.parse_config_files_and_bindings(["gin_configs/modes/pretrain.gin", "gin_configs/models/small.gin",
                                       path], ["MODEL_DIR = '/unused'"])
  configs = [r.scoped_configurable_fn() for r in gin.query_parameter("oxyjax.train.train.scenarios")]
  gin.clear_config()
  return configs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/multi_scenario")
  ap.add_argument("--steps", type=int, default=1200)
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--eval_every", type=int, default=400)
  ap.add_argument("--eval_max_examples", type=int, default=300,
                  help="rows per scenario of the fixed random validation subset each periodic evaluation decodes "
                       "(the best checkpoint is chosen on it); 2000 is the trainer's own default and the setting from "
                       "session 23 on; this flag's default of 300 keeps the older commands as they ran")
  ap.add_argument("--only", choices=["unified", "separate", "both"], default="both")
  ap.add_argument("--seed", type=int, default=0, help="initialisation, dropout and data-order seed of every model")
  ap.add_argument("--scenarios", default="gin_configs/scenarios/amazon2018.gin",
                  help="the gin file of the scenarios (e.g. gin_configs/scenarios/amazon2018_events.gin: each "
                       "scenario on its own third of its domain's training events)")
  ap.add_argument("--normalize_instruction", action="store_true",
                  help="ModelConfig.normalize_instruction: RMS-normalise I_r (the search query) before W_r")
  ap.add_argument("--rate", action="append", default=[], metavar="SCENARIO=RATE",
                  help="override one scenario's mixture rate (repeatable), e.g. --rate=office_search=1.0")
  ap.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                  help="override one ModelConfig field of both approaches (repeatable), e.g. --model=emb_dim=256 "
                       "--model=num_experts=4 --model=num_experts_per_token=2")
  ap.add_argument("--q2i_weight", type=float, default=0.0,
                  help="the Q2I loss weight lambda (needs IGR: --model=igr_recent=R --model=igr_top_k=K); on a search "
                       "row it aligns psi_q(I_s, query) with the target (PAPER.md section 5)")
  ap.add_argument("--instructions_store", default=None,
                  help="a near-line instruction store (oxyjax.instructions.generate over the catalogues): the "
                       "homepage scenarios read their generated reasoning instructions from it; the covered "
                       "test rows are also scored with the learned default (benchmarks/slow_thinking_scenarios.py)")
  ap.add_argument("--q2i_variance", choices=["mean", "per_dimension", "generalized"], default="mean",
                  help="how the Q2I variance term reads Var(X) (losses.q2i_loss)")
  ap.add_argument("--joint_codes", choices=["shared", "disjoint"], default="shared",
                  help="the unified model's SID code tokens below the domain level: shared between the domains or "
                       "disjoint (SIDConfig.joint_codes, whose default is disjoint; this flag defaults to shared so "
                       "that the commands of docs/multi_scenario.md before session 21 rerun as they ran; a "
                       "one-domain separate model has no joint codes)")
  ap.add_argument("--sid_embedding", choices=["collaborative", "text"], default="collaborative",
                  help="what both regimes' SIDs quantise (SIDConfig.embedding): the items' interaction embedding "
                       "(the default, as every command of docs/multi_scenario.md before session 22 ran) or their "
                       "MiniLM text embedding (title, brand, categories)")
  ap.add_argument("--separate", default="",
                  help="comma-separated scenario names: train only these separate models (default: all; each still "
                       "gets --steps / #scenarios steps), e.g. to rerun the ones whose scenario changed")
  ap.add_argument("--final_splits", default="test",
                  help="comma-separated splits evaluated in full at the end with the best weights "
                       "(add 'validation' to choose between settings on it)")
  args = ap.parse_args()

  from oxyjax import losses
  from oxyjax import train as train_lib
  from oxyjax.models.encoder_decoder import ModelConfig

  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  configs = apply_rates(scenario_configs(args.scenarios), args.rate)
  splits = tuple(x for x in args.final_splits.split(",") if x)
  model = ModelConfig(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=512, num_encoder_layers=2,
                      num_decoder_layers=2, dropout_rate=0.1, max_history=20, instruction_dim=384,
                      normalize_instruction=args.normalize_instruction)
  model = apply_model_overrides(model, args.model)
  common = dict(model_config=model, batch_size=args.batch_size, num_epochs=None, eval_max_examples=args.eval_max_examples,
                eval_beam_size=20, eval_batch_size=256, final_eval_splits=splits, log_every_steps=100, seed=args.seed,
                checkpoint_every_steps=10_000, mesh_shape={"data": 1},
                optimizer=train_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=100),
                # the same SID source for both approaches (the comparison is of the training regime)
                sid=train_lib.SIDConfig(embedding=args.sid_embedding, joint_codes=args.joint_codes),
                instructions=train_lib.InstructionsConfig(store=args.instructions_store),
                q2i=losses.Q2IConfig(weight=args.q2i_weight, variance=args.q2i_variance))
  out_path = os.path.join(args.out, "multi_scenario.json")
  report = json.load(open(out_path)) if os.path.exists(out_path) else {}
  report.update({"cpu": cpu_model(), "model": dataclasses.asdict(model), "q2i_weight": args.q2i_weight,
                 "q2i_variance": args.q2i_variance, "joint_codes": args.joint_codes,
                 "sid_embedding": args.sid_embedding, "steps_total": args.steps,
                 "batch_size": args.batch_size, "seed": args.seed, "eval_max_examples": args.eval_max_examples,
                 "scenarios": [dataclasses.asdict(c) for c in configs], "instructions_store": args.instructions_store,
                 "command": "python benchmarks/multi_scenario.py " + " ".join(sys.argv[1:])})

  def metrics(res, name, split="test"):
    r = res[f"{split}/{name}"] if f"{split}/{name}" in res else res[split]
    return {k: r[k] for k in ("recall@10", "ndcg@10", "hr@1", "num_examples")}

  def per_split(summary):
    return {split: {c.name: metrics(summary, c.name, split) for c in configs} for split in splits}

  if args.only in ("unified", "both"):
    t0 = time.time()
    res = train_lib.train(scenarios=configs, model_dir=os.path.join(args.out, "unified"), num_train_steps=args.steps,
                          eval_every_steps=args.eval_every, **common)
    summary = json.load(open(os.path.join(args.out, "unified", "run_summary.json")))["results"]
    report["unified"] = {"wall_s": time.time() - t0, "checkpoints": 1, "best_step": res.best_step,
                         **per_split(summary), "validation_history": res.history}
    json.dump(report, open(out_path, "w"), indent=1)
    plot(report, os.path.join(args.out, "unified_validation.png"), configs)
  if args.only in ("separate", "both"):
    per = args.steps // len(configs)
    sep = {"wall_s": 0.0, "checkpoints": len(configs), "steps_each": per, "best_step": {}, **{x: {} for x in splits}}
    names = [x for x in args.separate.split(",") if x]
    unknown = sorted(set(names) - {c.name for c in configs})
    if unknown:
      raise SystemExit(f"--separate: unknown scenario(s) {unknown}; the scenarios are {[c.name for c in configs]}")
    for c in configs:
      if names and c.name not in names:
        continue
      t0 = time.time()
      res = train_lib.train(scenarios=[c], model_dir=os.path.join(args.out, f"separate_{c.name}"), num_train_steps=per,
                            eval_every_steps=max(1, min(args.eval_every, per // 4)), **common)
      summary = json.load(open(os.path.join(args.out, f"separate_{c.name}", "run_summary.json")))["results"]
      sep["wall_s"] += time.time() - t0
      for split in splits:
        sep[split][c.name] = metrics(summary, c.name, split)
      sep["best_step"][c.name] = res.best_step
      report["separate"] = sep
      json.dump(report, open(out_path, "w"), indent=1)
  print(json.dumps({k: v for k, v in report.items() if k != "scenarios"}, indent=1, default=str)[:4000])


def apply_rates(configs, overrides):
  """The scenario configs with `NAME=RATE` mixture-rate overrides applied (unknown names are an error)."""
  rates = {}
  for item in overrides:
    name, _, value = item.partition("=")
    if not value:
      raise SystemExit(f"--rate {item!r}: expected SCENARIO=RATE")
    rates[name] = float(value)
  unknown = set(rates) - {c.name for c in configs}
  if unknown:
    raise SystemExit(f"--rate: unknown scenario(s) {sorted(unknown)}; known: {[c.name for c in configs]}")
  return [dataclasses.replace(c, rate=rates.get(c.name, c.rate)) for c in configs]


def apply_model_overrides(model, overrides):
  """`model` with `FIELD=VALUE` overrides, each VALUE parsed as the field's current type (unknown fields are an error)."""
  fields = {f.name for f in dataclasses.fields(model)}
  changes = {}
  for item in overrides:
    name, _, value = item.partition("=")
    if name not in fields or not value:
      raise SystemExit(f"--model {item!r}: expected FIELD=VALUE with FIELD a ModelConfig field")
    current = getattr(model, name)
    if isinstance(current, bool):
      if value.lower() not in ("true", "false"):
        raise SystemExit(f"--model {item!r}: {name} takes true or false")
      changes[name] = value.lower() == "true"
    elif isinstance(current, (int, float)):
      changes[name] = type(current)(value)
    else:
      raise SystemExit(f"--model {item!r}: only int, float and bool fields can be overridden here")
  return dataclasses.replace(model, **changes)


def plot(report, path, configs):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  hist = report["unified"]["validation_history"]
  fig, ax = plt.subplots(figsize=(7, 4))
  for c in configs:
    ax.plot([h["step"] for h in hist], [h.get(f"{c.name}/recall@10", float("nan")) for h in hist], marker="o",
            label=c.name)
  ax.set_xlabel("step")
  ax.set_ylabel("validation recall@10")
  rows = report.get("eval_max_examples", 300)  # reports written before the field was recorded used 300
  ax.set_title(f"unified model: per-scenario validation (fixed random {rows} rows each)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
