"""The best checkpoint is chosen by a metric that validation really returns: a one-scenario run
has its 'mean' row too (before the fix every separate per-scenario model of
benchmarks/multi_scenario.py kept its first checkpoint: the metric was missing and read as 0),
and a missing metric is an error, not a zero."""

import numpy as np
import pytest

from oxyjax import trainer
from oxyjax.evaluation import Evaluator


class _Best:
  def __init__(self):
    self.saved = []

  def maybe_save(self, step, params, metrics):
    self.saved.append((step, metrics))


def _info(step):
  return trainer.StepInfo(step, 10, {"params": {}}, {}, {}, stopping=False)


def test_a_missing_selection_metric_is_an_error():
  hook = trainer.EvalHook(lambda p: {"office/recall@10": 0.1}, every=1, best=_Best(), log=lambda *a: None)
  with pytest.raises(KeyError, match="chosen by 'recall@10'.*office/recall@10"):
    hook.after_step(_info(1))


def test_one_scenario_gets_a_mean_row_and_the_best_follows_it():
  scores = iter([0.03, 0.08, 0.12])
  call = lambda self, params, arrays, max_examples=None, trie=None: {"recall@10": next(scores),
                                                                             "num_examples": 5.0}
  Stub = type("Stub", (Evaluator,), {"__call__": call})  # only `scenarios` runs; decoding stubbed
  ev = object.__new__(Stub)
  best = _Best()

  def validate(params):
    rows = ev.scenarios(params, {"validation/s": (None, "s")}, None, trie_of=lambda pool: None)
    assert set(rows) == {"validation/s", "mean"}
    return dict(rows["mean"])

  hook = trainer.EvalHook(validate, every=1, best=best, log=lambda *a: None)
  for step in (1, 2, 3):
    hook.after_step(_info(step))
  assert [m["recall@10"] for _, m in best.saved] == pytest.approx([0.03, 0.08, 0.12])
  assert np.all(np.diff([m["recall@10"] for _, m in best.saved]) > 0)
