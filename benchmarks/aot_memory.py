r"""Ahead-of-time per-device memory of the sharded train step, from abstract shapes only.

Builds the model, the AdamW optimizer state and the train step (`oxyjax.train.make_optimizer`,
`make_train_step`), lowers `jax.jit(train_step)` with NamedSharding'ed ShapeDtypeStructs on a
mesh of fake host devices, compiles it, and prints XLA's `compiled.memory_analysis()` per
device for each mesh layout. No parameter array is ever allocated.

  python benchmarks/aot_memory.py --model_gin=gin_configs/models/oxygen_0p7b.gin \
      --num_devices=64 --batch_size=1024 --mesh=data=64 --mesh=data=8,fsdp=8 --mesh=data=4,fsdp=4,expert=4

`--num_devices` sets XLA_FLAGS=--xla_force_host_platform_device_count before jax is imported.
The compile target is the host CPU backend: buffer sizes are those of the XLA:CPU program
(sharding and sizes of arguments/outputs are backend independent; temporaries are indicative).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model_gin", default="gin_configs/models/oxygen_0p7b.gin")
  ap.add_argument("--mesh", action="append", default=None,
                  help="axis sizes, e.g. data=8,fsdp=8 (repeat for several layouts; default: data=-1)")
  ap.add_argument("--num_devices", type=int, default=64)
  ap.add_argument("--batch_size", type=int, default=1024, help="global batch (examples)")
  ap.add_argument("--dtype", default="bfloat16", help="computation dtype (parameters stay float32)")
  ap.add_argument("--num_items", type=int, default=12101,
                  help="catalogue size = item-ID table rows - 1 (default: Amazon Beauty, 12,101 items)")
  ap.add_argument("--sid_levels", type=int, default=3)
  ap.add_argument("--sid_codes", type=int, default=8192, help="codes per SID level (production: 8192)")
  ap.add_argument("--grad_accum_steps", type=int, default=1)
  ap.add_argument("--out", default=None, help="append the markdown table to this file")
  ap.add_argument("--dump_hlo", default=None, help="write each compiled HLO module to DIR/<mesh>.hlo.txt")
  return ap.parse_args()


def main():
  args = _args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.num_devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import gin
  import jax
  import jax.numpy as jnp
  import numpy as np

  from oxyjax import partitioning
  from oxyjax import train as train_lib
  from oxyjax.models import encoder_decoder
  from oxyjax.models.rec_model import RecModel

  gin.parse_config_files_and_bindings([args.model_gin], [])
  cfg = dataclasses.replace(gin.get_configurable(encoder_decoder.ModelConfig)(), dtype=args.dtype)
  codes = np.zeros((args.num_items + 1, args.sid_levels), np.int32)
  codes[1:] = args.sid_codes - 1  # only the shape and the vocabulary sizes matter
  model = RecModel(cfg, codes)
  tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(), 10_000)
  assert jax.device_count() == args.num_devices, jax.device_count()

  def init_state(rng):
    params = model.init(rng, model.dummy_batch(2))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  rows = []
  for mesh_arg in args.mesh or ["data=-1"]:
    mesh_shape = {k: int(v) for k, v in (kv.split("=") for kv in mesh_arg.split(","))}
    part = partitioning.Partitioner(mesh_shape)
    t0 = time.time()
    with jax.set_mesh(part.mesh), part.rules_context():
      boxed = jax.eval_shape(init_state, jax.random.key(0))
      shardings = part.params_shardings(boxed)
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              partitioning.strip_boxes(boxed), shardings)
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=part.data_sharding(v.ndim))
               for k, v in model.dummy_batch(args.batch_size).items()}
      rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=part.replicated())
      step = jax.jit(train_lib.make_train_step(model, tx, args.grad_accum_steps),
                     in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}, part.replicated()),
                     out_shardings=(shardings, part.replicated()), donate_argnums=(0,))
      lowered = step.lower(abstract, batch, rng)
      t_lower = time.time() - t0
      compiled = lowered.compile()
    t_compile = time.time() - t0 - t_lower
    mem = compiled.memory_analysis()
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      with open(os.path.join(args.dump_hlo, mesh_arg.replace(",", "_").replace("=", "") + ".hlo.txt"), "w") as f:
        f.write(compiled.as_text())

    def per_device_bytes(tree):
      return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree))

    param_bytes = per_device_bytes(abstract["params"])
    state_bytes = per_device_bytes(abstract)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
    wi = [a for p, a in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
          if "mlp" in jax.tree_util.keystr(p) and "wi" in jax.tree_util.keystr(p)][0]
    effective = [ax if ax is not None and math.prod(part.mesh_sizes[n] for n in ((ax,) if isinstance(ax, str) else ax)) > 1
                 else None for ax in wi.sharding.spec]
    gib = 1 / 2**30
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    rows.append({
        "mesh": ",".join(f"{k}={v}" for k, v in part.mesh_sizes.items() if v > 1) or "1 device",
        "params_gib": param_bytes * gib, "state_gib": state_bytes * gib,
        "argument_gib": mem.argument_size_in_bytes * gib, "output_gib": mem.output_size_in_bytes * gib,
        "alias_gib": mem.alias_size_in_bytes * gib, "temp_gib": mem.temp_size_in_bytes * gib,
        "code_mib": mem.generated_code_size_in_bytes / 2**20, "total_gib": total * gib,
        "wi_spec": f"{'x'.join(map(str, wi.sharding.shard_shape(wi.shape)))} of {'x'.join(map(str, wi.shape))}, "
                   f"P{tuple(effective)}", "lower_s": t_lower, "compile_s": t_compile,
    })
    print(rows[-1], flush=True)

  header = (f"\n### {os.path.basename(args.model_gin)}: {n_params / 1e9:.3f}B parameters, {args.num_devices} devices, "
            f"global batch {args.batch_size}, {args.dtype} compute / float32 parameters + AdamW, "
            f"catalogue {args.num_items:,} items, SID {args.sid_levels} x {args.sid_codes}\n\n"
            "| mesh | params / device (GiB) | params + opt state / device (GiB) | argument (GiB) | output (GiB) "
            "| alias (GiB) | temp (GiB) | generated code (MiB) | total = arg + out - alias + temp + code (GiB) "
            "| one layer's `wi` per device (of global), non-trivial mesh axes | lower + compile (s) |\n|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [header] + [
      f"| {r['mesh']} | {r['params_gib']:.3f} | {r['state_gib']:.3f} | {r['argument_gib']:.3f} | "
      f"{r['output_gib']:.3f} | {r['alias_gib']:.3f} | {r['temp_gib']:.3f} | {r['code_mib']:.1f} | "
      f"{r['total_gib']:.3f} | `{r['wi_spec']}` | {r['lower_s'] + r['compile_s']:.0f} |" for r in rows]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text)


if __name__ == "__main__":
  main()
