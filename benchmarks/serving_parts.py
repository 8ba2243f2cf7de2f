r"""Where the serving program's time goes: its parts timed in-process, one jit each (beam 20 unless --beam).

  python benchmarks/serving_parts.py                    # all cores
  taskset -c 0 python benchmarks/serving_parts.py       # one core: how much of a call XLA spreads over the cores
  python benchmarks/serving_parts.py --beam=256 --batch_sizes=1

Parts (small model over Beauty's SID trie, randomly initialised; a random-init SASRec of the
default shape, as in serve_latency.py: the cost does not depend on the weights' values):
- `beams`: the serving function without a second stage (encoder + constrained beam search);
- `stage_union0`: with the stage scoring the beams only (SASRec, no extra paths);
- `stage_union<k>`: with the default stage (union k from gin_configs/defaults/small.gin);
- `path_log_probs`: the policy's score of k given paths per row (what the union adds), encoder included;
- `encode`: the encoder alone;
- `sasrec`: the scorer's next-item log-softmax over the catalogue alone.
p50 over --reps calls of test-split histories, built as the server builds a request's row; the
parts are called in turn (one call of each per round), so that the machine's slow spells fall on
all of them alike and their differences stand (timing one part after another, a drift of a few
ms between them is common on this project's shared 2-core hosts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from machine import cpu_model  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch_sizes", default="1,8,64")
  ap.add_argument("--reps", type=int, default=40)
  ap.add_argument("--beam", type=int, default=20)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  import serve_latency as sl
  from oxyjax import export as export_lib
  from oxyjax import predict
  from oxyjax import rescoring

  weight, union = sl.default_stage_settings()
  model, params, art, ds, _ = sl.build("small", "beauty", None)
  stage, stage0 = sl.second_stage(art, None, weight, union), sl.second_stage(art, None, weight, 0)
  codes = jnp.asarray(art.sid_table.codes, jnp.int32)
  # As the exported program takes them: the trie's arrays, the stage's parameters and the SID
  # table are arguments, not constants XLA could fold into the program.
  forest, _ = art.pool_forest(export_lib.serving_pools(art))
  trie = tuple(jnp.asarray(getattr(forest, f)) for f in export_lib.TRIE_FIELDS)
  trie_static = {"num_levels": forest.num_levels, "max_children": tuple(forest.max_children),
                 "vocab_sizes": tuple(forest.vocab_sizes)}
  beam = args.beam
  print(f"# serving_parts on {cpu_model()} ({len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable), "
        f"jax {jax.__version__}; beam {beam}, union {union}; p50 ms, the parts' calls interleaved", flush=True)

  def served(st):
    fn = jax.jit(export_lib.make_serve_fn(model, trie_static, beam, stage=st))
    return lambda p, f: fn(p, f, trie, *((st.params, codes) if st else ()))

  scores_paths = jax.jit(lambda p, f, c: model.path_log_probs(
      p, f, jnp.broadcast_to(c[1:union + 1][None], (f["scenario"].shape[0], union, c.shape[1]))))
  next_item = jax.jit(lambda sp, f: jax.nn.log_softmax(stage.scorer.model.apply(
      {"params": sp}, rescoring.sasrec_window(f["history_items"], f["history_mask"], stage.scorer.config.max_len),
      train=False, last_only=True), axis=-1))
  fns = {
      "beams": served(None),
      "stage_union0": served(stage0),
      f"stage_union{union}": served(stage),
      "path_log_probs": lambda p, f: scores_paths(p, f, codes),
      "encode": jax.jit(model.encode),
      "sasrec": lambda p, f: next_item(stage.params, f),
  }
  rng = np.random.default_rng(0)
  print("| batch | " + " | ".join(fns) + " |\n|---|" + "---|" * len(fns), flush=True)
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    feats = []
    for _ in range(8):  # rows as the server builds them (`predict.build_request`), batched
      bodies = sl.request_bodies(ds, b, 10, 20, model.config.max_history, seed=int(rng.integers(1 << 31)))
      rows = [predict.build_request(art, model, x["history"]).features for x in bodies]
      feats.append({k: jnp.asarray(np.concatenate([r[k] for r in rows])) for k in rows[0]})
    for fn in fns.values():
      jax.block_until_ready(fn(params, feats[0]))
    ts = {name: [] for name in fns}
    for i in range(args.reps):  # round robin, so that a slow spell of the machine hits every part alike
      for name, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(params, feats[i % len(feats)]))
        ts[name].append(time.perf_counter() - t)
    row = [f"{1e3 * np.median(ts[name]):.2f}" for name in fns]
    print(f"| {b} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  main()
