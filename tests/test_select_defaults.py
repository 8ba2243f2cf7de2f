"""benchmarks/select_defaults.py: the rule that picks one default configuration on validation."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("select_defaults", os.path.join(REPO, "benchmarks", "select_defaults.py"))
sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd)


def _summary(tmp_path, name, r10, n10, steps, test_r10=0.0):
  path = tmp_path / f"{name}.json"
  path.write_text(json.dumps({"steps": steps, "results": {
      "validation": {"recall@10": r10, "ndcg@10": n10}, "test": {"recall@10": test_r10, "ndcg@10": test_r10}}}))
  return str(path)


def test_rule_scores_ratios_per_dataset_and_ignores_test(tmp_path):
  ds = ("a", "b")
  cands = {
      # best on the big-number dataset a, poor on b; a test score that would win if it were read
      "big": {"a": _summary(tmp_path, "big_a", 0.10, 0.05, 100, test_r10=0.9),
              "b": _summary(tmp_path, "big_b", 0.010, 0.005, 100, test_r10=0.9)},
      "even": {"a": _summary(tmp_path, "even_a", 0.095, 0.048, 100), "b": _summary(tmp_path, "even_b", 0.02, 0.01, 100)},
      "partial": {"a": _summary(tmp_path, "p_a", 0.2, 0.1, 10)},
  }
  out = sd.select(cands, datasets=ds)
  assert out["winner"] == "even"
  assert not out["candidates"]["partial"]["eligible"] and out["candidates"]["partial"]["missing"] == ["b"]
  # even: a ratios .95 / .96, b ratios 1 / 1
  assert abs(out["candidates"]["even"]["score"] - (0.955 + 1.0) / 2) < 1e-9
  # the partial candidate's higher numbers do not enter the per-dataset best
  assert abs(out["candidates"]["big"]["datasets"]["a"]["score"] - 1.0) < 1e-9


def test_rule_breaks_near_ties_by_cost(tmp_path):
  ds = ("a",)
  cands = {"long": {"a": _summary(tmp_path, "long", 0.100, 0.050, 2000)},
           "short": {"a": _summary(tmp_path, "short", 0.0996, 0.0499, 1000)}}
  assert sd.select(cands, datasets=ds)["winner"] == "short"
  cands["short"] = {"a": _summary(tmp_path, "short2", 0.095, 0.045, 1000)}
  assert sd.select(cands, datasets=ds)["winner"] == "long"
