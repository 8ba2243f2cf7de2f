"""I_s = (scenario, trigger item) per example (ModelConfig.scenario_triggers; issue 14): a row's
trigger item enters its instruction token, and a row without one (trigger 0) takes the learned
default trigger, and nothing else does."""

import dataclasses

import jax
import numpy as np
import pytest

from oxyjax.data import pipeline
from oxyjax.models.rec_model import RecModel
from tests import test_train_step as tts

CFG = dataclasses.replace(tts.CFG, dropout_rate=0.0, num_scenarios=3, scenario_triggers=True)
NUM_ITEMS = 30


@pytest.fixture(scope="module")
def model_and_params():
  rng = np.random.default_rng(0)
  codes = np.zeros((NUM_ITEMS + 1, 3), np.int32)
  codes[1:, :2] = rng.integers(0, 4, (NUM_ITEMS, 2))
  codes[1:, 2] = np.arange(NUM_ITEMS)
  model = RecModel(CFG, codes)
  params = model.init(jax.random.key(0), model.dummy_batch(2))
  return model, jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                             is_leaf=lambda x: hasattr(x, "unbox"))


def _batch(model, trigger):
  n = len(trigger)
  ex = pipeline.ExampleArrays.zeros(n, CFG.max_history)
  ex.history[:, :3] = [[3, 4, 5]] * n
  ex.history_len[:] = 3
  ex.target[:] = 7
  ex.scenario[:] = 1
  return model.convert_features(ex.with_extras(trigger=np.asarray(trigger, np.int32)))


def _logits(model, params, batch):
  return np.asarray(model.network.apply({"params": params}, batch, deterministic=True))


def test_features_carry_the_trigger_items_codes(model_and_params):
  model, _ = model_and_params
  b = _batch(model, [0, 5, 9])
  assert b["trigger_items"].tolist() == [0, 5, 9]
  np.testing.assert_array_equal(b["trigger_codes"], model.sid_codes[[0, 5, 9]])
  with pytest.raises(ValueError, match="trigger item index out of range"):
    _batch(model, [NUM_ITEMS + 1])


def test_the_trigger_item_changes_the_rows_output(model_and_params):
  model, params = model_and_params
  out = _logits(model, params, _batch(model, [0, 5, 9, 5]))
  assert not np.allclose(out[1], out[2], atol=1e-4)  # another trigger item: another instruction token
  assert not np.allclose(out[0], out[1], atol=1e-4)  # no trigger vs a trigger
  np.testing.assert_allclose(out[1], out[3], rtol=1e-5, atol=1e-6)  # same inputs, same output


def test_rows_without_a_trigger_use_the_learned_default_and_only_they(model_and_params):
  model, params = model_and_params
  batch = _batch(model, [0, 5])
  moved = dict(params, default_trigger=params["default_trigger"] + 1.0)
  a, b = _logits(model, params, batch), _logits(model, moved, batch)
  assert not np.allclose(a[0], b[0], atol=1e-4)  # trigger 0 reads default_trigger
  np.testing.assert_array_equal(a[1], b[1])  # a row with a trigger never does
