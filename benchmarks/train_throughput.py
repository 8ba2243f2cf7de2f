r"""Training throughput: examples/s, encoder tokens/s (real and counting padding), peak memory, MFU.

Default: the peer's TIGER configuration (BENCHMARKS.md): 4 + 4 layers, width 384, 6 heads,
FFN 1024, 3 x 256 codes (+ collision level), history 20, batch 256, Amazon Beauty, fp32.

  python benchmarks/train_throughput.py                         # peer config, prints the table
  python benchmarks/train_throughput.py --model_gin=gin_configs/models/small.gin --steps=50

MFU = model FLOPs per step (from XLA's cost analysis of the compiled step) / step time /
peak FLOP/s. On CPU the peak is measured in this run (a jitted 2048^2 fp32 matmul, as in
BENCHMARKS.md); on GPU it is the device's dense bf16/fp32 peak (table below or --peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from oxyjax import partitioning
from oxyjax import train as train_lib
from oxyjax.data import feature_converter
from oxyjax.data import pipeline
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.models.rec_model import RecModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402

# The peer's figures as BENCHMARKS.md gives them, measured on an AMD Zen 3 host: quoted beside ours, never
# divided into them (a ratio needs the peer measured on the same machine, as in BENCHMARKS.md's Intel Xeon table).
PEER = {"examples_per_s": 42.5, "step_s": 6.01, "enc_tokens_real": 897, "enc_tokens_padded": 2594, "peak_gb": 5.6}
GPU_PEAK_TFLOPS = {"H100": {"float32": 67.0, "bfloat16": 989.0}, "H200": {"float32": 67.0, "bfloat16": 989.0},
                   "A100": {"float32": 19.5, "bfloat16": 312.0}}

PEER_MODEL = dict(emb_dim=384, num_heads=6, head_dim=64, mlp_dim=1024, num_encoder_layers=4, num_decoder_layers=4,
                  dropout_rate=0.1, max_history=20)


def cpu_peak_flops(n: int = 2048, reps: int = 20) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.min(times))  # best of reps: the ceiling, not a noisy typical


def model_config_from_gin(path: str | None) -> ModelConfig:
  if not path:
    return ModelConfig(**PEER_MODEL)
  import gin
  from oxyjax.models import encoder_decoder
  gin.parse_config_files_and_bindings([path], [])
  return gin.get_configurable(encoder_decoder.ModelConfig)()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dataset", default="beauty")
  ap.add_argument("--model_gin", default=None, help="a gin_configs/models/*.gin file (default: the peer's shape)")
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up steps)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--peak_tflops", type=float, default=None, help="override the device peak for MFU")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  ap.add_argument("--bucket_multiple", type=int, default=4,
                  help="length bucketing trims batches to a multiple of this many history columns: "
                       "larger = fewer compiled shapes held in memory, more padding")
  ap.add_argument("--grad_accum", type=int, default=1,
                  help="gradient accumulation: the batch runs as this many microbatches (same update, less memory)")
  ap.add_argument("--remat_policy", default=None, choices=["none", "full", "minimal"],
                  help="ModelConfig.remat_policy (default: the model config's, 'none' for the peer shape)")
  ap.add_argument("--no_bucketing", action="store_true",
                  help="pad every batch to the full history (as the peer does) instead of length bucketing")
  args = ap.parse_args()

  cfg = model_config_from_gin(args.model_gin)
  import dataclasses
  cfg = dataclasses.replace(cfg, dtype=args.dtype)
  if args.remat_policy:
    cfg = dataclasses.replace(cfg, remat_policy=args.remat_policy)
  table = train_lib.load_sid_table(args.dataset, train_lib.SIDConfig())
  model = RecModel(cfg, table.codes)
  arrays = pipeline.load_split(args.dataset, "train", cfg.max_history, source="readers")
  bucketing = not args.no_bucketing
  it = pipeline.BatchIterator(arrays, args.batch_size, seed=0, bucket_by_length=bucketing)
  part = partitioning.Partitioner({"data": -1})
  tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(), 10_000)

  def init_state(rng):
    params = model.init(rng, model.dummy_batch(part.data_parallel_size))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  dummy = model.dummy_batch(args.batch_size)
  with jax.set_mesh(part.mesh), part.rules_context():
    boxed = jax.eval_shape(init_state, jax.random.key(0))
    shardings = part.params_shardings(boxed)
    state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(jax.random.key(0))
    step_fn = jax.jit(train_lib.make_train_step(model, tx, args.grad_accum),
                      in_shardings=(shardings, {k: part.data_sharding(v.ndim) for k, v in dummy.items()},
                                    part.replicated()),
                      out_shardings=(shardings, part.replicated()), donate_argnums=(0,))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))

  times, real_tokens, padded_tokens, flops = [], [], [], []
  # Compile every bucket width once, ahead of timing (trim_history keeps multiples of
  # --bucket_multiple columns); the same executables are timed and give the FLOP counts.
  m_ = args.bucket_multiple
  # Widest first: its first run allocates the largest XLA temporaries (the process's memory peak),
  # reached before the narrower executables exist.
  widths = sorted({min(w, cfg.max_history) for w in range(m_, cfg.max_history + m_, m_)}, reverse=True) if bucketing \
      else [cfg.max_history]
  compiled, flops_by_width, temp_gb = {}, {}, {}
  for w in widths:
    warm = {k: (v[:, :w] if k.startswith("history") else v) for k, v in dummy.items()}
    with jax.set_mesh(part.mesh), part.rules_context():
      compiled[w] = step_fn.lower(state, part.shard_batch(warm), jax.random.key(1)).compile()
      state, m = compiled[w](state, part.shard_batch(warm), jax.random.key(1))
    c = compiled[w].cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    flops_by_width[w] = float(c.get("flops", float("nan"))) if c else float("nan")
    temp_gb[w] = compiled[w].memory_analysis().temp_size_in_bytes / 1e9
  jax.block_until_ready(m["loss"])
  warmup = 2
  for i in range(args.steps + warmup):
    ex = next(it)
    batch = model.convert_features(ex)
    if bucketing:
      batch = feature_converter.trim_history(batch, multiple=args.bucket_multiple)
    width = batch["history_mask"].shape[1]
    t = time.perf_counter()
    with jax.set_mesh(part.mesh), part.rules_context():
      state, m = compiled[width](state, part.shard_batch(batch), jax.random.key(1))
      jax.block_until_ready(m["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t)
      real_tokens.append(int(batch["history_mask"].sum()))
      padded_tokens.append(int(batch["history_mask"].size))
      flops.append(flops_by_width[width])
  step_s = float(np.median(times))
  flops_per_step = float(np.sum(flops) / np.sum(times) * step_s)  # time-weighted over the bucket shapes
  dev = jax.devices()[0]
  if args.peak_tflops:
    peak = args.peak_tflops * 1e12
  elif dev.platform == "cpu":
    peak = cpu_peak_flops()
  else:
    kind = next((k for k in GPU_PEAK_TFLOPS if k in dev.device_kind), None)
    peak = GPU_PEAK_TFLOPS[kind][args.dtype] * 1e12 * jax.device_count() if kind else float("nan")
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux
  with open("/proc/self/statm") as f:  # resident set now, after the timed steps (Linux)
    steady_gb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
  res = {
      "device": f"{jax.device_count()} x {dev.device_kind}", "cpu": cpu_model(), "dataset": args.dataset,
      "batch_size": args.batch_size,
      "parameters_M": n_params / 1e6, "dtype": args.dtype, "step_s_median": step_s,
      "examples_per_s": args.batch_size * len(times) / float(np.sum(times)),
      "enc_tokens_per_s_real": float(np.sum(real_tokens) / np.sum(times)),
      "enc_tokens_per_s_padded": float(np.sum(padded_tokens) / np.sum(times)),
      "padding_fraction": 1 - float(np.sum(real_tokens)) / float(np.sum(padded_tokens)),
      "remat_policy": cfg.remat_policy, "xla_temp_gb_widest": temp_gb[widths[0]],
      "length_bucketing": bucketing, "bucket_multiple": args.bucket_multiple if bucketing else None,
      "model_flops_per_step": flops_per_step, "peak_flops": peak, "mfu": float(np.sum(flops) / np.sum(times)) / peak,
      "peak_rss_gb": peak_gb, "rss_after_training_steps_gb": steady_gb, "steps_timed": args.steps,
  }
  print(f"\n## Training throughput ({res['device']}, {args.dataset}, batch {args.batch_size}, "
        f"{res['parameters_M']:.1f}M params, {args.dtype}, length bucketing {'on' if bucketing else 'off'}, "
        f"{args.steps} timed steps, remat {cfg.remat_policy})\n")
  print(f"| metric | oxyjax ({res['cpu']}) | peer, quoted: AMD Zen 3 host (BENCHMARKS.md) |")
  print("|---|---|---|")
  rows = [("training step, median (s)", step_s, PEER["step_s"]),
          ("examples/s", res["examples_per_s"], PEER["examples_per_s"]),
          ("encoder tokens/s, real", res["enc_tokens_per_s_real"], PEER["enc_tokens_real"]),
          ("peak memory (GB, process RSS, compilation included)", peak_gb, PEER["peak_gb"]),
          ("resident memory after the timed steps (GB)", steady_gb, PEER["peak_gb"])]
  for name, ours, peer in rows:
    print(f"| {name} | {ours:.3f} | {peer} |")
  print(f"| MFU (XLA flops / step time / peak {peak / 1e9:.0f} GFLOP/s) | {res['mfu'] * 100:.1f}% | - |")
  print(f"| XLA temporaries of the widest step (GB, memory_analysis) | {temp_gb[widths[0]]:.3f} | - |")
  print(f"| encoder padding fraction | {res['padding_fraction'] * 100:.0f}% | 65% |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
