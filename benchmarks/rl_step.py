r"""Time of one post-training step split into rollout, reward and update, at several group sizes.

  python benchmarks/rl_step.py --model_dir=runs/beauty_repro --batch_size=64 --groups=8,16,32

Loads a pre-training run's artifact (model, SID table, pool, weights) and a batch of its training
prompts, then for each G times (median of --repeats after one compiling call, each call blocked
until done): the constrained rollout (`rl.rollout.rollout`), the rewards and group advantages of its
candidates (`rl.rewards.compute`, `rl.losses.group_advantages`), and one SA-GCPO update
(`rl.step.make_update_step`, forward and backward over the B x G candidates). With
--ranking_model_dir the reward includes the ranking model's pass over the G candidates and the real
target (`rl.ranking_model`). Prints and writes JSON with the CPU/accelerator it ran on.

  python benchmarks/rl_step.py --model_dir=runs/beauty_qs --ranking_model_dir=runs/beauty_ranker \
      --out=docs/bench/rl_step_ranked.json
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


def device_name() -> str:
  import jax

  d = jax.devices()[0]
  if d.platform != "cpu":
    return d.device_kind
  return f"{cpu_model()} ({os.cpu_count()} cores)"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model_dir", default="runs/beauty_repro")
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--groups", default="8,16,32")
  ap.add_argument("--method", default="sample", choices=["sample", "beam"])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--ranking_model_dir", default=None, help="include the ranking reward of this ranking model")
  ap.add_argument("--out", default="docs/bench/rl_step.json")
  args = ap.parse_args()

  import jax
  import numpy as np
  import optax

  from oxyjax import checkpoints, partitioning, trainer
  from oxyjax import experiment as experiment_lib
  from oxyjax.artifact import ModelArtifact, artifact_dir
  from oxyjax.data import pipeline
  from oxyjax.rl import losses, ranking_model, rewards, rollout, step
  from oxyjax.rl import train as rl_train

  part = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  art = ModelArtifact.load(artifact_dir(args.model_dir))
  exp = experiment_lib.from_artifact(art, partitioner=part, log=lambda *a: None)
  model = exp.model
  factory = trainer.TrainStateFactory(model, part)
  params, _ = checkpoints.load_params(os.path.join(artifact_dir(args.model_dir), "params"), factory.params_abstract)
  arrays = exp.load_split("train") if not exp.scenarios else exp.scenarios[0].splits["train"]
  it = pipeline.BatchIterator(arrays, args.batch_size, seed=0)
  batch = jax.tree.map(jax.numpy.asarray, model.convert_features(next(it)))
  trie = exp.trie()
  emb, _ = rl_train.item_embeddings(exp, params)
  table = rewards.weight_table({}, [exp.dataset])
  ranker = ranker_params = None
  if args.ranking_model_dir:
    ranker, ranker_params, _ = ranking_model.load(args.ranking_model_dir, art, part)
  tx = optax.adam(1e-5)
  opt_state = tx.init(params)

  def timed(fn, *a):
    jax.block_until_ready(fn(*a))  # compile
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

  rows = []
  for g in [int(x) for x in args.groups.split(",")]:
    cfg = step.RolloutConfig(method=args.method, group_size=g)
    ro_fn = jax.jit(lambda p, b, t, r: rollout.rollout(args.method, model, p, b, t, group_size=g, rng=r))
    rs_fn = jax.jit(step.make_rollout_step(model, cfg, table, emb, ranker=ranker))
    up_fn = jax.jit(step.make_update_step(model, tx, losses.PolicyLossConfig(name="sa_gcpo")))
    key = jax.random.key(0)
    t_roll = timed(ro_fn, params, batch, trie, key)
    ro = ro_fn(params, batch, trie, key)

    def reward(items, valid, target, scenario, rparams):
      ranking = target_ranking = None
      if ranker is not None:
        ranking, target_ranking = ranker.reward(rparams, batch, items, target)
      rw = rewards.compute(items, valid, target, scenario, item_embeddings=emb, weights=table, ranking=ranking,
                           target_ranking=target_ranking)
      return rw.total, rw.r_star, losses.group_advantages(rw.total, valid)[0]

    t_reward = timed(jax.jit(reward), ro.items, ro.valid, batch["target_items"], batch["scenario"], ranker_params)
    rl, _ = rs_fn(params, batch, trie, key, None, ranker_params)
    state = {"params": params, "opt_state": opt_state, "step": jax.numpy.zeros((), jax.numpy.int32)}
    t_up = timed(lambda s, b, t: up_fn(s, b, t)[1], state, {**batch, **rl}, trie)
    row = {"group_size": g, "prompts": args.batch_size, "candidates": g * args.batch_size,
           "rollout_s": t_roll, "reward_s": t_reward, "update_s": t_up,
           "step_s": t_roll + t_reward + t_up}
    rows.append(row)
    print(json.dumps(row), flush=True)
  out = {"device": device_name(), "model_dir": args.model_dir, "method": args.method,
         "ranking_model_dir": args.ranking_model_dir,
         "num_params": factory.num_params, "rows": rows,
         "command": "python benchmarks/rl_step.py " + " ".join(sys.argv[1:])}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps({k: v for k, v in out.items() if k != "rows"}))


if __name__ == "__main__":
  main()
