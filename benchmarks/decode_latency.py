r"""Constrained beam-search latency: p50 / p99 per batch at beam 20 and 256.

Default: the peer's TIGER shape (BENCHMARKS.md; 4 + 4 layers, width 384) over the Amazon
Beauty SID trie (12,101 items), histories from the test split. The whole search (encoder,
cached decoder steps, trie constraint, top-k) is one jitted call; compile time is excluded
and reported separately.

  python benchmarks/decode_latency.py
  python benchmarks/decode_latency.py --cases=1x20,32x20,1x256,32x256 --reps=20
  python benchmarks/decode_latency.py --checkpoint=runs/beauty/best   # trained weights
  python benchmarks/decode_latency.py --cases=1x256 --floor   # + the dense-matmul floor of the same search

--matmul_dtypes=float32,bfloat16 times the search with its weight products in each dtype
(`ModelConfig.matmul_dtype`; the bfloat16 weight kernels cast once, as a serving export takes
them), the calls of the dtypes interleaved so that a slow spell of the machine falls on both, and
prints each one's row and the speed-up over the first. bfloat16 products were measured faster on a CPU
with AVX-512 BF16; no CPU without it has been measured (the CPU flags are printed):

  python benchmarks/decode_latency.py --cases=1x256,32x256 --matmul_dtypes=float32,bfloat16

--normalizations=vocab,last_valid times the search under each beam-score normalisation as well
(`decoding.beam_search`: 'last_valid' scores the last level, the collision index, over the prefix's
items only and runs that step only on the beams whose prefix has siblings), interleaved the same way;
with both options every (dtype, normalisation) pair is a variant, and the speed-ups are over the
first (float32, vocab):

  python benchmarks/decode_latency.py --cases=1x256,32x256 --matmul_dtypes=float32,bfloat16 \
      --normalizations=vocab,last_valid

--floor also times, in the same process, only the dense matrix products that any exact float32
implementation of the same search has to do (per decoder level: the W beams' self-attention Q/K/V/O,
cross-attention Q/O, gated MLP and output projections, plus the encoder once), each as one jitted
[rows, in] x [in, out] product at this machine's matmul speed. Their sum is the floor of an exact
decoder on this CPU: a p50 above it is overhead (attention over the tiny caches, gathers, top-k), and a
speed-up beyond p50 / floor needs fewer FLOPs or lower precision, not a better search.
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
import numpy as np
import flax.linen as nn

from oxyjax import train as train_lib
from oxyjax.data import pipeline
from oxyjax.models import layers
from oxyjax.models.rec_model import RecModel
from oxyjax.sid.trie import PrefixTrie

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402
from train_throughput import model_config_from_gin  # noqa: E402

# The peer's figures as BENCHMARKS.md gives them, measured on an AMD Zen 3 host: (batch, beam) -> seconds
# per batch (p50 where given). Quoted beside ours, never divided into them: a ratio needs the peer
# measured on the same machine (BENCHMARKS.md's Intel Xeon table, or a rerun of the peer).
PEER = {(1, 20): (0.071, 0.108), (32, 20): (3.6, None), (1, 256): (1.6, None), (32, 256): (77.7, None)}
TARGET = {(1, 256): 10.0, (32, 256): 25.0}  # x the peer's speed, both measured on one machine


def matmul_floor(cfg, batch: int, beam: int, reps: int) -> float:
  """Seconds of the dense products an exact float32 constrained search of `cfg` must run for one
  batch (see the module docstring), each timed alone (median of `reps`) and summed."""
  import jax.numpy as jnp

  d, hd, m = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  levels = cfg.num_levels
  enc_rows = batch * cfg.max_history
  # (rows, in, out, how many such products)
  shapes = [(enc_rows, d, 3 * hd, cfg.num_encoder_layers), (enc_rows, hd, d, cfg.num_encoder_layers),
            (enc_rows, d, 2 * m, cfg.num_encoder_layers), (enc_rows, m, d, cfg.num_encoder_layers),
            (enc_rows, d, 2 * hd, cfg.num_decoder_layers)]  # cross-attention K/V, once per request
  for level in range(levels):
    rows = batch * (1 if level == 0 else beam)
    n = cfg.num_decoder_layers
    shapes += [(rows, d, 3 * hd, n), (rows, hd, d, n), (rows, d, hd, n), (rows, hd, d, n), (rows, d, 2 * m, n),
               (rows, m, d, n), (rows, d, cfg.max_vocab, 1)]
  total = 0.0
  for rows, k, n_out, count in shapes:
    a, bm = jnp.ones((rows, k), jnp.float32), jnp.ones((k, n_out), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, bm).block_until_ready()
    ts = []
    for _ in range(max(reps, 5)):
      t = time.perf_counter()
      f(a, bm).block_until_ready()
      ts.append(time.perf_counter() - t)
    total += count * float(np.median(ts))
  return total


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dataset", default="beauty")
  ap.add_argument("--model_gin", default=None)
  ap.add_argument("--cases", default="1x20,32x20,1x256,32x256", help="comma-separated BATCHxBEAM")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--checkpoint", default=None, help="a params checkpoint dir (e.g. <model_dir>/best)")
  ap.add_argument("--floor", action="store_true", help="also time the dense-matmul floor of each case")
  ap.add_argument("--matmul_dtypes", default="float32",
                  help="comma-separated weight-product dtypes (float32, bfloat16), timed interleaved")
  ap.add_argument("--normalizations", default="vocab",
                  help="comma-separated beam-score normalisations (vocab, valid, last_valid), timed interleaved")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  cfg = model_config_from_gin(args.model_gin)
  table = train_lib.load_sid_table(args.dataset, train_lib.SIDConfig())
  model = RecModel(cfg, table.codes)
  n = table.codes.shape[0] - 1
  trie = PrefixTrie.from_codes(table.codes[1:], np.arange(1, n + 1, dtype=np.int32))
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(1)))
  if args.checkpoint:
    from oxyjax import checkpoints
    params, _ = checkpoints.load_params(args.checkpoint, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  test = pipeline.load_split(args.dataset, "test", cfg.max_history, source="readers")
  results = []
  print(f"\n## Constrained beam search latency ({jax.device_count()} x {jax.devices()[0].device_kind}, {cpu_model()}, "
        f"{args.dataset}: {n} items, SID levels {model.config.sid_vocab_sizes})\n")
  print("| batch x beam | p50 (s) | p99 (s) | compile (s) | items/s | peer p50 (s), quoted: AMD Zen 3 host | "
        "target: x the peer on the same machine |")
  print("|---|---|---|---|---|---|---|")
  norms = args.normalizations.split(",")
  variants = {}  # label -> (model, params as that program takes them, normalisation)
  for dt in args.matmul_dtypes.split(","):
    m = model.with_matmul_dtype(dt)
    p = params if dt == "float32" else jax.device_put(layers.cast_weight_kernels(params, dt))
    for norm in norms:
      variants[dt if len(norms) == 1 else f"{dt}, {norm}"] = (m, p, norm)
  dtypes = list(variants)  # the variants' labels, timed interleaved
  for case in args.cases.split(","):
    b, w = (int(x) for x in case.split("x"))
    rng = np.random.default_rng(0)
    idx = rng.choice(len(test), size=(args.reps + 1, b), replace=True)
    batches = [model.convert_features(test.take(i)) for i in idx]
    predicts, compile_s, times, outs = {}, {}, {dt: [] for dt in dtypes}, {}
    for dt, (m, p, norm) in variants.items():
      predicts[dt] = jax.jit(functools.partial(m.predict, beam_size=w, normalize=norm))
      t = time.perf_counter()
      jax.block_until_ready(predicts[dt](p, batches[0], trie).items)
      compile_s[dt] = time.perf_counter() - t
    for i, bt in enumerate(batches[1:]):
      for dt in (dtypes if i % 2 == 0 else dtypes[::-1]):  # interleaved, in turn first
        t = time.perf_counter()
        outs[dt] = predicts[dt](variants[dt][1], bt, trie)
        jax.block_until_ready(outs[dt].items)
        times[dt].append(time.perf_counter() - t)
    for dt in dtypes:
      items = np.asarray(outs[dt].items)
      assert all(len(set(r[r > 0])) == (r > 0).sum() for r in items), "duplicate items in a beam"
      p50, p99 = float(np.median(times[dt])), float(np.percentile(times[dt], 99))
      peer = PEER.get((b, w), (None, None))[0]
      tgt = TARGET.get((b, w))
      label = f"{b} x {w}" + ("" if len(dtypes) == 1 else f", {dt}")
      print(f"| {label} | {p50:.4f} | {p99:.4f} | {compile_s[dt]:.1f} | {b / p50:.1f} | {peer if peer else '-'} | "
            f"{f'>= {tgt:.0f}x' if tgt else '-'} |")
      results.append({"batch": b, "beam": w, "matmul_dtype": str(variants[dt][0].config.matmul_dtype),
                      "normalize": variants[dt][2], "p50_s": p50, "p99_s": p99,
                      "compile_s": compile_s[dt], "peer_p50_s_quoted_amd_zen3": peer, "reps": args.reps,
                      "cpu": cpu_model()})
    for dt in dtypes[1:]:
      ratio = float(np.median(times[dtypes[0]]) / np.median(times[dt]))
      results[-1 - dtypes[::-1].index(dt)]["speedup_over_" + dtypes[0]] = ratio
      print(f"|   {dt} / {dtypes[0]}, same run: p50 speed-up {ratio:.2f}x | | | | | | |")
    if args.floor:
      floor = matmul_floor(model.config, b, w, args.reps)
      p50 = float(np.median(times[dtypes[0]]))
      results[-len(dtypes)]["matmul_floor_s"] = floor
      print(f"|   dense-matmul floor of {b} x {w} | {floor:.4f} | | | | p50 / floor {p50 / floor:.2f} | |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
