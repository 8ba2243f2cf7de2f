"""The partitioner: owns the device mesh and the one logical-axis rules table.

Nothing else in oxyjax names a mesh axis: modules annotate parameters and activations with
logical names (batch, length, embed, mlp, heads, kv, vocab, expert) and this module maps
them to mesh axes (data, fsdp, tensor, expert).

Mesh sizes are given per axis, with -1 meaning "all remaining devices" (MaxText style).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# The one rules table: logical axis -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("beam", None),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
)


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one -1 entry so the product equals num_devices; validates the rest."""
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh axes {sizes}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
  return sizes


def strip_boxes(tree):
  """Removes nn.Partitioned metadata boxes without applying sharding constraints."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Partitioner:
  """Device mesh + logical-axis rules; turns logical annotations into NamedShardings.

  Args:
    mesh_shape: axis sizes, e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}.
    rules: logical-axis rules (defaults to DEFAULT_RULES).
    devices: devices to use (defaults to all of jax.devices()).
  """

  def __init__(self, mesh_shape: Mapping[str, int] | None = None, rules: Sequence[tuple[str, Any]] | None = None,
               devices: Sequence[Any] | None = None):
    devices = list(devices if devices is not None else jax.devices())
    self.mesh_sizes = resolve_mesh_shape(mesh_shape or {"data": -1}, len(devices))
    shape = tuple(self.mesh_sizes[a] for a in MESH_AXES)
    self.mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    self.rules = tuple(rules or DEFAULT_RULES)

  # ---------------------------------------------------------------- shardings
  def logical_to_sharding(self, logical_specs):
    """PartitionSpecs of logical names (pytree) -> NamedShardings on this mesh."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

  def params_shardings(self, boxed_abstract_tree):
    """NamedShardings for a pytree whose leaves may be nn.LogicallyPartitioned boxes.

    A dimension whose size is not divisible by its mesh axes (a 1-row scenario table, an
    odd-sized codebook) is replicated along that dimension instead of failing.
    """
    specs = nn.get_partition_spec(boxed_abstract_tree)
    shardings = self.logical_to_sharding(specs)
    shapes = strip_boxes(boxed_abstract_tree)
    return jax.tree.map(lambda sh, a: self._fit(sh, a.shape), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))

  def _fit(self, sharding: NamedSharding, shape) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
      if axes is None:
        continue
      names = (axes,) if isinstance(axes, str) else tuple(axes)
      if shape[i] % math.prod(self.mesh_sizes[a] for a in names):
        spec[i] = None
    return NamedSharding(self.mesh, P(*spec))

  @property
  def batch_axes(self):
    return nn.logical_to_mesh_axes(("batch",), self.rules)[0]

  def data_sharding(self, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: leading axis over the batch mesh axes, rest replicated."""
    return NamedSharding(self.mesh, P(self.batch_axes, *([None] * (ndim - 1))))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def data_parallel_size(self) -> int:
    axes = self.batch_axes
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(self.mesh_sizes[a] for a in axes)

  def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's slice) -> global jax.Arrays sharded over batch axes."""
    return {
        k: jax.make_array_from_process_local_data(self.data_sharding(np.ndim(v)), np.asarray(v))
        for k, v in host_batch.items()
    }

  def rules_context(self):
    """Context in which nn.with_logical_constraint resolves against this mesh."""
    return nn.logical_axis_rules(self.rules)

  def __repr__(self):
    return f"Partitioner(mesh={self.mesh_sizes}, rules={self.rules})"
