"""Mesh construction: -1 resolution, multi-slice (DCN x ICI) device layout, sharded step on it."""

import jax
import numpy as np
import pytest

from oxyjax import partitioning
from tests.test_train_step import _assert_trains_like, _model_and_batches


def _slice_of(device):  # pretend the 8 fake CPU devices are 2 slices of 4
  return device.id // 4


def test_dcn_axis_is_the_outer_factor_and_never_splits_a_slice():
  part = partitioning.Partitioner({"data": 2, "fsdp": 2}, dcn_mesh_shape={"data": -1}, granule_of=_slice_of)
  assert part.mesh_sizes == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
  grid = part.mesh.devices.reshape(4, 2)
  slices = np.vectorize(_slice_of)(grid)
  np.testing.assert_array_equal(slices, [[0, 0], [0, 0], [1, 1], [1, 1]])
  # Within a slice, every device appears once.
  assert sorted(d.id for d in grid[:2].ravel()) == [0, 1, 2, 3]


def test_dcn_over_fsdp():
  part = partitioning.Partitioner({"fsdp": 4}, dcn_mesh_shape={"fsdp": 2}, granule_of=_slice_of)
  grid = part.mesh.devices.reshape(8)
  np.testing.assert_array_equal(np.vectorize(_slice_of)(grid), [0, 0, 0, 0, 1, 1, 1, 1])
  assert "dcn" in repr(part)


def test_dcn_shape_must_match_the_slices():
  with pytest.raises(ValueError, match="slices"):
    partitioning.hybrid_device_grid({"data": 2, "fsdp": 1, "tensor": 1, "expert": 1},
                                    {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices(), _slice_of)
  with pytest.raises(ValueError, match="devices"):
    partitioning.Partitioner({"data": 3}, dcn_mesh_shape={"data": 2}, granule_of=_slice_of)


def test_one_process_defaults_to_one_slice():
  part = partitioning.Partitioner({"data": -1}, dcn_mesh_shape={"data": 1})
  assert part.mesh_sizes["data"] == jax.device_count()


def test_train_step_on_a_two_slice_mesh_matches_one_device():
  """Same losses and gradients at every step as on one device (tests/test_train_step.py's
  _assert_trains_like: rounding-level tolerances, derived there)."""
  model, batches = _model_and_batches()
  one = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
  part = partitioning.Partitioner({"fsdp": 2, "tensor": 2}, dcn_mesh_shape={"data": 2}, granule_of=_slice_of)
  _assert_trains_like(model, batches, (one, 1), (part, 1))
