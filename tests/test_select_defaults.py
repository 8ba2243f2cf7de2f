"""benchmarks/select_defaults.py: the rule that picks one default configuration on validation."""

import importlib.util
import json
import os

import pytest

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


def test_several_runs_of_a_candidate_count_as_their_mean(tmp_path):
  """Seeds: a candidate's figure on a dataset is the mean of its runs there, so one lucky seed
  of a candidate does not beat another's consistently better mean."""
  ds = ("a",)
  cands = {"lucky": {"a": [_summary(tmp_path, "l0", 0.110, 0.055, 100), _summary(tmp_path, "l1", 0.080, 0.040, 100)]},
           "steady": {"a": [_summary(tmp_path, "s0", 0.100, 0.050, 100), _summary(tmp_path, "s1", 0.098, 0.049, 100)]}}
  out = sd.select(cands, datasets=ds)
  assert out["winner"] == "steady"
  lucky = out["candidates"]["lucky"]["datasets"]["a"]
  assert lucky["seeds"] == 2 and abs(lucky["recall@10"] - 0.095) < 1e-12 and abs(lucky["ndcg@10"] - 0.0475) < 1e-12
  # with only the first seed of each, the lucky one wins: the mean is what changed the choice
  assert sd.select({c: {"a": v["a"][0]} for c, v in cands.items()}, datasets=ds)["winner"] == "lucky"


def test_equally_cheap_tied_candidates_go_to_the_higher_score(tmp_path):
  ds = ("a",)
  cands = {"first": {"a": _summary(tmp_path, "f", 0.0990, 0.0495, 1000)},
           "second": {"a": _summary(tmp_path, "s", 0.1000, 0.0500, 1000)}}
  assert sd.select(cands, datasets=ds)["winner"] == "second"  # not the first listed


def test_cli_datasets_subset_ranks_on_those_only_and_says_it_is_interim(tmp_path, capsys):
  """`--datasets=` (an interim reading while a candidate lacks its long runs): the candidate that
  is complete on the named datasets is ranked, and the output never calls it the default."""
  spec = tmp_path / "cands.json"
  spec.write_text(json.dumps({
      "full": {d: _summary(tmp_path, f"full_{d}", 0.10, 0.05, 100) for d in sd.DATASETS},
      "two": {"office": _summary(tmp_path, "two_o", 0.12, 0.06, 100),
              "industrial": _summary(tmp_path, "two_i", 0.11, 0.055, 100)}}))
  sd.main([str(spec)])
  out = capsys.readouterr().out
  assert "winner: full" in out and "| two |" in out and "not eligible" in out
  sd.main(["--datasets=office,industrial", str(spec)])
  out = capsys.readouterr().out
  assert "winner:" not in out and "interim, on office, industrial only" in out and out.rstrip().endswith("picks two")
  assert "beauty" not in out.split("\n")[0]
  with pytest.raises(SystemExit, match="bogus"):  # an unknown dataset is refused
    sd.main(["--datasets=office,bogus", str(spec)])
