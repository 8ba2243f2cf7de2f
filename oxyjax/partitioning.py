"""The partitioner: owns the device mesh and the one logical-axis rules table.

Nothing else in oxyjax names a mesh axis: modules annotate parameters and activations with
logical names (batch, length, embed, mlp, heads, kv, vocab, expert) and this module maps
them to mesh axes (data, fsdp, tensor, expert).

Mesh sizes are given per axis, with -1 meaning "all remaining devices" (MaxText style).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

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
    # MoE: the group axis of dispatched tokens [E, G, C, D], after the expert axis took `expert`.
    ("expert_group", ("data", "fsdp")),
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


def default_granule(device) -> int:
  """The slice a device belongs to: its TPU slice index, else its process (host)."""
  idx = getattr(device, "slice_index", None)
  return int(device.process_index if idx is None else idx)


def _device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """Devices of one slice as an array of `shape` (topology-aware on TPU)."""
  if devices and devices[0].platform == "tpu":
    from jax.experimental import mesh_utils
    return mesh_utils.create_device_mesh(shape, list(devices))
  return np.asarray(devices, dtype=object).reshape(shape)


def hybrid_device_grid(ici_sizes: Mapping[str, int], dcn_sizes: Mapping[str, int], devices: Sequence[Any],
                       granule_of: Callable[[Any], int] = default_granule) -> np.ndarray:
  """Devices for a multi-slice mesh: every axis is dcn x ici, the DCN factor outermost.

  Devices are grouped into slices by `granule_of` (TPU slice index, else process). Within a
  slice they form the ICI mesh; the slices tile the DCN mesh, so collectives over an axis
  with a DCN factor cross slices only at that factor (MaxText's hybrid mesh).
  """
  groups: dict[int, list[Any]] = {}
  for d in devices:
    groups.setdefault(granule_of(d), []).append(d)
  n_slices, per_slice = math.prod(dcn_sizes.values()), math.prod(ici_sizes.values())
  if len(groups) != n_slices:
    raise ValueError(f"DCN mesh {dict(dcn_sizes)} needs {n_slices} slices, the devices form {len(groups)}")
  bad = {k: len(v) for k, v in groups.items() if len(v) != per_slice}
  if bad:
    raise ValueError(f"ICI mesh {dict(ici_sizes)} needs {per_slice} devices per slice, got {bad}")
  ici_shape = tuple(ici_sizes[a] for a in MESH_AXES)
  dcn_shape = tuple(dcn_sizes[a] for a in MESH_AXES)
  slices = [_device_grid(ici_shape, sorted(groups[k], key=lambda d: d.id)) for k in sorted(groups)]
  grid = np.stack(slices).reshape(dcn_shape + ici_shape)
  n = len(MESH_AXES)
  grid = grid.transpose([j for i in range(n) for j in (i, n + i)])
  return grid.reshape(tuple(d * i for d, i in zip(dcn_shape, ici_shape)))


def strip_boxes(tree):
  """Removes nn.Partitioned metadata boxes without applying sharding constraints."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Partitioner:
  """Device mesh + logical-axis rules; turns logical annotations into NamedShardings.

  Args:
    mesh_shape: axis sizes, e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}; with `dcn_mesh_shape`,
      the sizes within one slice (ICI).
    rules: logical-axis rules (defaults to DEFAULT_RULES).
    devices: devices to use (defaults to all of jax.devices()).
    dcn_mesh_shape: multi-slice: axis sizes across slices (DCN), e.g. {'data': 2} for two
      TPU slices; -1 fills the number of slices. Each mesh axis is then dcn x ici.
    granule_of: device -> slice id (default: TPU slice index, else process index).
  """

  def __init__(self, mesh_shape: Mapping[str, int] | None = None, rules: Sequence[tuple[str, Any]] | None = None,
               devices: Sequence[Any] | None = None, dcn_mesh_shape: Mapping[str, int] | None = None,
               granule_of: Callable[[Any], int] = default_granule):
    devices = list(devices if devices is not None else jax.devices())
    if dcn_mesh_shape:
      n_slices = len({granule_of(d) for d in devices})
      self.dcn_sizes = resolve_mesh_shape(dcn_mesh_shape, n_slices)
      self.ici_sizes = resolve_mesh_shape(mesh_shape or {"data": -1}, len(devices) // n_slices)
      self.mesh_sizes = {a: self.ici_sizes[a] * self.dcn_sizes[a] for a in MESH_AXES}
      grid = hybrid_device_grid(self.ici_sizes, self.dcn_sizes, devices, granule_of)
    else:
      self.dcn_sizes = None
      self.mesh_sizes = self.ici_sizes = resolve_mesh_shape(mesh_shape or {"data": -1}, len(devices))
      grid = _device_grid(tuple(self.mesh_sizes[a] for a in MESH_AXES), devices)
    self.mesh = Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
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
    dcn = f", dcn={self.dcn_sizes}" if self.dcn_sizes else ""
    return f"Partitioner(mesh={self.mesh_sizes}{dcn}, rules={self.rules})"
