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


def _evaluator(**kw):
  import types
  return Evaluator(types.SimpleNamespace(predict=lambda **k: None), types.SimpleNamespace(data_parallel_size=1),
                   None, beam_size=20, batch_size=8, **kw)


def test_select_metric_chooses_the_best_checkpoint_by_that_metric(tmp_path):
  from oxyjax import checkpoints
  # Scripted validation where recall@10 and ndcg@5 disagree: recall@10 peaks at step 1, ndcg@5
  # at step 2, so the kept step tells which metric the run was selected on.
  history = {1: {"recall@10": 0.30, "ndcg@5": 0.10}, 2: {"recall@10": 0.20, "ndcg@5": 0.15},
             3: {"recall@10": 0.25, "ndcg@5": 0.12}}
  for select, expected in ((None, 1), ("ndcg@5", 2)):
    ev = _evaluator(select_metric=select)
    assert ev.headline_metric == (select or "recall@10")
    best = checkpoints.BestCheckpointer(str(tmp_path / f"best_{select}"), metric=ev.headline_metric,
                                        log=lambda *a: None)
    metrics = iter(history.values())
    hook = trainer.EvalHook(lambda p: dict(next(metrics)), every=1, best=best, metric=ev.headline_metric,
                            log=lambda *a: None)
    for step in history:
      hook.after_step(trainer.StepInfo(step, 3, {"params": {"w": np.full((2,), float(step), np.float32)}}, {}, {},
                                       stopping=False))
    assert best.best_step() == expected
    best.close()


@pytest.mark.parametrize("bad", ["ndcg@50", "map@10", "recall", "Recall@10"])
def test_an_unknown_select_metric_is_refused_before_training(bad):
  with pytest.raises(ValueError, match=f"select_metric '{bad}': expected recall@k, ndcg@k or hr@k with k in"):
    _evaluator(select_metric=bad)
