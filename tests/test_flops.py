"""FLOP counting for MFU: the peak table, XLA cost analysis of a sharded step, the analytic fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from oxyjax import flops
from oxyjax import partitioning


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("cpu", None), ("", None), (None, None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(kind, peak):
  assert flops.peak_flops_per_device(kind) == peak


def test_cost_analysis_of_a_sharded_matmul_counts_global_flops():
  part = partitioning.Partitioner({"data": 8})
  m, k, n = 256, 128, 64
  f = jax.jit(lambda a, b: a @ b, in_shardings=(NamedSharding(part.mesh, P("data")), part.replicated()))
  compiled = f.lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  per_device = flops.cost_analysis_flops(compiled)
  assert per_device == pytest.approx(2 * m * k * n / 8, rel=0.05)
  total, src = flops.train_step_flops(compiled, 8, num_params=1, tokens_per_step=1)
  assert src == "xla" and total == pytest.approx(2 * m * k * n, rel=0.05)


def test_analytic_fallback_and_utilization():
  class NoCost:
    def cost_analysis(self):
      return {}

  total, src = flops.train_step_flops(NoCost(), 8, num_params=1000, tokens_per_step=50)
  assert (total, src) == (6 * 1000 * 50, "analytic")
  u = flops.utilization(989e12, 1.0, 2, "NVIDIA H100 80GB HBM3")
  assert u["flops_per_s"] == 989e12 and u["mfu"] == pytest.approx(0.5)
  assert flops.utilization(1e9, 0.5, 8, "cpu") == {"flops_per_s": 2e9}
