"""benchmarks/paired_strata.py: the row strata a paired difference is split by."""

import importlib.util
import os

import numpy as np

from oxyjax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("paired_strata", os.path.join(REPO, "benchmarks", "paired_strata.py"))
st = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(st)


def test_collisions_are_items_sharing_every_level_but_the_last():
  codes = np.asarray([[0, 0, 0], [1, 2, 0], [1, 2, 1], [1, 3, 0], [4, 2, 0]])  # row 0 = padding
  np.testing.assert_array_equal(st.collides(codes), [False, True, True, False, False])


def test_strata_of_hand_built_rows():
  # items 1..4; level-1 codes: items 1, 2 -> 7; items 3, 4 -> 8; items 3 and 4 collide
  codes = np.asarray([[0, 0, 0], [7, 1, 0], [7, 2, 0], [8, 3, 0], [8, 3, 1]])
  other = np.asarray([[0, 0, 0], [5, 0, 0], [6, 0, 0], [5, 1, 0], [6, 1, 0]])
  arrays = pipeline.ExampleArrays(
      history=np.asarray([[1, 2, 0], [3, 0, 0], [2, 4, 1], [0, 0, 0]]), history_len=np.asarray([2, 1, 3, 0]),
      target=np.asarray([1, 4, 3, 2]), user=np.arange(4), scenario=np.zeros(4))
  train_targets = np.asarray([1, 1, 1, 1, 2, 2, 3])  # item 1 most popular, item 4 never a target
  s = st.strata(arrays, train_targets, {"a": codes, "b": other})
  np.testing.assert_array_equal(s["repeat"], [True, False, False, False])  # row 2's padding 0 is not item 3
  np.testing.assert_array_equal(s["collides@a"], [False, True, True, False])
  np.testing.assert_array_equal(s["collides@b"], [False] * 4)
  # last history items: 2, 3, 1, none
  np.testing.assert_array_equal(s["same_l1@a"], [True, True, False, False])
  np.testing.assert_array_equal(s["same_l1@b"], [False, False, True, False])
  groups = np.stack([s["popularity=low"], s["popularity=mid"], s["popularity=high"]])
  np.testing.assert_array_equal(groups.sum(0), 1)  # each row in exactly one tercile
  assert s["popularity=high"][0] and s["popularity=low"][1]
