r"""Gathered IGR attention vs full attention over the whole history: time and memory.

For each history length L and each K, times (median of --reps calls, after compile) the
gathered kernel (`oxyjax.kernels.igr_attention`: score all L, top-K, gather, attend over K)
and `full_attention_reference` (project all L rows, attend over L), and reads each compiled
program's memory from XLA's `memory_analysis()` (temp buffers + outputs; the inputs are the
same history for both and are not counted). The speed-up is measured in the same run.
Every history row is valid (the worst case for full attention, the usual one for long users).

  python benchmarks/igr_kernel.py                                  # the full table (quiet machine!)
  python benchmarks/igr_kernel.py --lengths 256 --ks 32 --reps 2   # smoke test
  python benchmarks/igr_kernel.py --implementation pallas          # on GPU / TPU (never run there yet)

Target (issue): >= 8x faster than full attention at L=4096, K=128 on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from oxyjax.kernels.igr_attention import full_attention_reference
from oxyjax.kernels.igr_attention import igr_attention
from oxyjax.kernels.igr_attention import igr_attention_reference


def _ints(s):
  return [int(x) for x in s.split(",") if x]


def _inputs(b, l, d, d_r, tq, h, dh, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  return dict(
      history=jax.random.normal(ks[0], (b, l, d), jnp.float32),
      history_mask=jnp.ones((b, l), bool),
      retrieval_query=jax.random.normal(ks[1], (b, d_r), jnp.float32),
      history_keys=jax.random.normal(ks[2], (b, l, d_r), jnp.float32),
      q=jax.random.normal(ks[3], (b, tq, h, dh), jnp.float32),
      wk=jax.random.normal(ks[4], (d, h, dh), jnp.float32) / np.sqrt(d),
      wv=jax.random.normal(ks[5], (d, h, dh), jnp.float32) / np.sqrt(d),
  )


def _measure(fn, args, reps):
  """(median seconds, compile seconds, temp bytes, output bytes) of jit(fn)(*args)."""
  jitted = jax.jit(fn)
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
  outb = getattr(mem, "output_size_in_bytes", 0) if mem is not None else 0
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), compile_s, int(temp), int(outb)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", type=_ints, default=[256, 1024, 4096, 16384])
  ap.add_argument("--ks", type=_ints, default=[32, 128])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--d", type=int, default=128, help="item width")
  ap.add_argument("--d_r", type=int, default=128, help="retrieval width")
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--head_dim", type=int, default=32)
  ap.add_argument("--tq", type=int, default=5, help="attention queries per user")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--implementation", default="auto", choices=["auto", "xla", "pallas"])
  ap.add_argument("--with_reference", action="store_true", help="also time igr_attention_reference")
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  args = ap.parse_args()

  dev = jax.devices()[0]
  print(f"\n## Gathered IGR attention vs full attention ({jax.device_count()} x {dev.device_kind}, "
        f"implementation={args.implementation}; B={args.batch}, d={args.d}, d_r={args.d_r}, "
        f"H={args.heads}, Dh={args.head_dim}, Tq={args.tq}; median of {args.reps})\n")
  cols = ["L", "K", "full (ms)", "gathered (ms)", "speed-up"]
  if args.with_reference:
    cols += ["reference gathered (ms)"]
  cols += ["full mem (MiB)", "gathered mem (MiB)", "mem ratio", "compile full / gathered (s)"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  rows = []
  mib = lambda x: x / 2**20
  for l in args.lengths:
    x = _inputs(args.batch, l, args.d, args.d_r, args.tq, args.heads, args.head_dim)
    full_args = (x["history"], x["history_mask"], x["q"], x["wk"], x["wv"])
    full = _measure(full_attention_reference, full_args, args.reps)
    all_args = (x["history"], x["history_mask"], x["retrieval_query"], x["history_keys"], x["q"], x["wk"], x["wv"])
    for k in args.ks:
      if k > l:
        continue
      gathered = _measure(functools.partial(igr_attention, k=k, implementation=args.implementation),
                          all_args, args.reps)
      row = dict(L=l, K=k, full_ms=full[0] * 1e3, gathered_ms=gathered[0] * 1e3, speedup=full[0] / gathered[0],
                 full_mem_bytes=full[2] + full[3], gathered_mem_bytes=gathered[2] + gathered[3],
                 compile_full_s=full[1], compile_gathered_s=gathered[1])
      cells = [str(l), str(k), f"{row['full_ms']:.2f}", f"{row['gathered_ms']:.2f}", f"{row['speedup']:.1f}x"]
      if args.with_reference:
        ref = _measure(functools.partial(igr_attention_reference, k=k), all_args, args.reps)
        row["reference_ms"] = ref[0] * 1e3
        cells.append(f"{row['reference_ms']:.2f}")
      cells += [f"{mib(row['full_mem_bytes']):.2f}", f"{mib(row['gathered_mem_bytes']):.2f}",
                f"{row['full_mem_bytes'] / max(row['gathered_mem_bytes'], 1):.1f}x",
                f"{full[1]:.1f} / {gathered[1]:.1f}"]
      print("| " + " | ".join(cells) + " |", flush=True)
      rows.append(row)
  print("\nMemory = XLA memory_analysis() temp + output bytes of each compiled program (inputs excluded).")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=dev.device_kind, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
