r"""GFLOP/s of the decoder's matrix products on this CPU, by shape and operand dtype.

  python benchmarks/matmul_rates.py --out=docs/bench/matmul_rates.json

Why self-attention runs Q/K/V as one product (`layers.Attention.project_qkv`: one [rows, D] x
[D, 3 H Dh] product against three [D, H Dh] ones) and what `ModelConfig.matmul_dtype = 'bfloat16'`
buys (`layers.weight_product`: bf16 operands accumulated in float32), at the shapes of a beam-256
decoder step of the small model (width 128, MLP 512) and of the peer's (width 384, MLP 1024).
Each product is one jitted call on arguments already in their dtype, p50 of --reps calls. The CPU
model and its ISA flags are printed: a bf16 x bf16 -> f32 product is fast on CPUs with AVX-512 BF16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from machine import cpu_model  # noqa: E402

SHAPES = [(256, 128, 128), (256, 128, 384), (256, 128, 1024), (256, 512, 128),
          (256, 384, 384), (256, 384, 1152), (256, 384, 2048), (256, 1024, 384)]
# (operand dtype, result dtype): float32; bf16 with a bf16 result; bf16 accumulated in float32;
# int8 accumulated in int32 (what int8 weights and activations would run; GOP/s)
VARIANTS = {"float32": (jnp.float32, None), "bf16 -> bf16": (jnp.bfloat16, None),
            "bf16 -> f32": (jnp.bfloat16, jnp.float32), "int8 -> i32": (jnp.int8, jnp.int32)}


def rate(m: int, k: int, n: int, dtype, result, reps: int) -> float:
  scale, bound = (32.0, 127) if jnp.issubdtype(dtype, jnp.integer) else (1.0, np.inf)  # int8: [-127, 127]
  x = jnp.asarray(np.clip(np.random.default_rng(0).standard_normal((m, k)) * scale, -bound, bound), dtype)
  w = jnp.asarray(np.clip(np.random.default_rng(1).standard_normal((k, n)) * scale, -bound, bound), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=result))
  jax.block_until_ready(f(x, w))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(x, w))
    ts.append(time.perf_counter() - t)
  return 2 * m * k * n / float(np.median(ts)) / 1e9


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reps", type=int, default=300)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  cpu = cpu_model()
  print(f"# matmul_rates on {cpu} ({len(os.sched_getaffinity(0))} CPUs usable), jax {jax.__version__}; GFLOP/s, p50")
  print("| [m, k] x [k, n] | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
  rows = []
  for m, k, n in SHAPES:
    got = {name: rate(m, k, n, dt, res, args.reps) for name, (dt, res) in VARIANTS.items()}
    rows.append({"m": m, "k": k, "n": n, **got})
    print(f"| [{m}, {k}] x [{k}, {n}] | " + " | ".join(f"{got[v]:.0f}" for v in VARIANTS) + " |", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"cpu": cpu, "command": "python benchmarks/matmul_rates.py " + " ".join(sys.argv[1:]),
                 "gflops": rows}, f, indent=1)


if __name__ == "__main__":
  main()
