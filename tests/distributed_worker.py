"""One process of the multi-process tests (tests/test_distributed.py); not a test itself.

Reads the multi-host environment contract (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; XLA_FLAGS for the fake CPU device count) through `oxyjax.distributed.initialize`,
trains the tiny model for a few steps with `oxyjax.train.train`, and (process 0) writes the
final parameters, gathered from all hosts, and the validation metrics to --out (npz + json).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--sid_cache", required=True)
  ap.add_argument("--model_dir", default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--seed_plus_process_id", action="store_true", help="each process a different seed (error test)")
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()

  from oxyjax import distributed

  distributed.initialize()  # env contract; no-op for the one-process reference

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from oxyjax import train as train_lib
  from oxyjax.models.encoder_decoder import ModelConfig

  # Record what the evaluator counts (the gathered global batches), to compare layouts.
  from oxyjax import metrics as metrics_lib
  seen = []
  add = metrics_lib.MetricsAccumulator.add

  def recording_add(self, pred_items, targets, mask=None):
    seen.append((np.asarray(pred_items), np.asarray(targets), np.asarray(mask)))
    return add(self, pred_items, targets, mask)

  metrics_lib.MetricsAccumulator.add = metrics_lib.MetricsAccumulator.update = recording_add

  seed = args.seed + (jax.process_index() if args.seed_plus_process_id else 0)
  tiny = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                     dropout_rate=0.1, max_history=10)
  try:
    res = train_lib.train(
        dataset="industrial", model_config=tiny, seed=seed, model_dir=args.model_dir,
        sid=train_lib.SIDConfig(codebook_size=16, embedding="collaborative", cache_dir=args.sid_cache),
        mesh_shape={"data": 4, "fsdp": 2}, batch_size=32, num_train_steps=args.steps, num_epochs=None,
        data_source="readers", length_bucketing=False, eval_every_steps=args.steps, eval_max_examples=64,
        eval_batch_size=32, eval_beam_size=10, final_eval_splits=(), checkpoint_every_steps=args.steps,
        async_checkpointing=False, log_every_steps=1, verbose=True)
  except distributed.HostMismatchError as e:
    print(f"HostMismatchError: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  params = multihost_utils.process_allgather(res.state["params"], tiled=True)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(args.out + ".npz", **flat)
    np.savez(args.out + "_eval.npz", items=np.concatenate([s[0] for s in seen]),
             targets=np.concatenate([s[1] for s in seen]), mask=np.concatenate([s[2] for s in seen]))
    with open(args.out + ".json", "w") as f:
      json.dump({"history": res.history, "final_step": res.final_step, "process_count": jax.process_count(),
                 "device_count": jax.device_count()}, f)
  print(f"worker {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  main()
