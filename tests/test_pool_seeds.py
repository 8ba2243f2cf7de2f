"""benchmarks/pool_seeds.py: paired differences of several seeds pooled into one mean with its SE."""

import importlib.util
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("pool_seeds", os.path.join(REPO, "benchmarks", "pool_seeds.py"))
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)
_spec = importlib.util.spec_from_file_location("rl_seed_means", os.path.join(REPO, "benchmarks", "rl_seed_means.py"))
rsm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rsm)


def _report(seed, sets):
  """A paired_eval-shaped report: {scenario: (baseline value, other value, (difference, paired SE))}."""
  out = {"sets": {}}
  for name, (b, o, diff) in sets.items():
    out["sets"][name] = {"rows": 100, "baseline": f"u{seed}", "models": {
        f"u{seed}": {"metrics": {"recall@10": b}, "difference": {}},
        f"s{seed}_{name}": {"metrics": {"recall@10": o}, "difference": {"recall@10": list(diff)}}}}
  return out


def model(v, d):
  """One model's record in a paired_eval report (NDCG@10 only); `d` = (difference, paired SE) or None."""
  return {"metrics": {"ndcg@10": v}, "difference": {"ndcg@10": list(d)} if d else {}}


def test_pool_means_and_standard_errors():
  reports = [_report(0, {"a": (0.10, 0.08, (-0.02, 0.003)), "b": (0.5, 0.5, (0.0, 0.001))}),
             _report(1, {"a": (0.06, 0.07, (0.01, 0.004)), "b": (0.4, 0.3, (-0.1, 0.002))})]
  pooled = ps.pool(reports, ["recall@10"])
  a = pooled["a"]["recall@10"]
  assert a["baseline"] == pytest.approx(0.08) and a["other"] == pytest.approx(0.075)
  assert a["difference"] == pytest.approx(-0.005)
  # independent seeds: the SE of a mean of two is sqrt(0.003^2 + 0.004^2) / 2 = 0.0025
  assert a["se"] == pytest.approx(0.0025)
  assert a["seed_sd"] == pytest.approx(math.sqrt(2) * 0.015)  # stdev of (-0.02, 0.01)
  assert a["se_between_seeds"] == pytest.approx(0.015)
  assert a["baseline_ahead_in"] == 1 and pooled["b"]["recall@10"]["baseline_ahead_in"] == 1
  assert "| a | 0.0800 / 0.0750 (-0.0050 ± 0.0025" in ps.table(pooled, ["recall@10"])


def test_pool_keeps_only_scenarios_every_seed_compares():
  reports = [_report(0, {"a": (0.1, 0.1, (0.0, 0.001)), "b": (0.1, 0.1, (0.0, 0.001))}),
             _report(1, {"a": (0.1, 0.1, (0.0, 0.001))})]
  assert list(ps.pool(reports, ["recall@10"])) == ["a"]


def test_rl_seed_means_groups_a_set_up_s_seeds_across_files(tmp_path):
  """benchmarks/rl_seed_means.py: models named ..._seed<s>_... in any file form one set-up, pooled
  as pool_seeds pools one-model reports; a model listed twice counts once."""
  files = []
  for i, models in enumerate([{"a_seed0_x": (0.52, (0.02, 0.004)), "b_seed0_x": (0.49, (-0.01, 0.003))},
                              {"a_seed1_x": (0.54, (0.04, 0.003)), "a_seed0_x": (0.9, (0.4, 0.1))}]):
    rep = {"sets": {"all": {"baseline": "start", "models": {"start": model(0.5, None)}}}}
    rep["sets"]["all"]["models"].update({k: model(v, d) for k, (v, d) in models.items()})
    p = tmp_path / f"r{i}.json"
    p.write_text(__import__("json").dumps(rep))
    files.append(str(p))
  groups = rsm.by_setup(files)
  assert sorted(groups) == ["a_seed*_x", "b_seed*_x"]
  assert len(groups["a_seed*_x"]) == 2 and len(groups["b_seed*_x"]) == 1
  pooled = ps.pool(groups["a_seed*_x"], ["ndcg@10"])["a_seed*_x"]["ndcg@10"]
  assert pooled["difference"] == pytest.approx(0.03)  # (0.02 + 0.04) / 2: the repeated a_seed0_x is not counted
  assert pooled["se"] == pytest.approx(0.0025)  # sqrt(0.004^2 + 0.003^2) / 2


def test_rl_seed_means_pools_over_seeded_baselines(tmp_path):
  """Each seed's file has that seed's run of another set-up as its baseline: the rows are named
  '<model> minus <baseline>' with both seeds taken out, and the start, compared with each seed's
  baseline, pools over both files rather than being counted once."""
  files = []
  for s, (b, start_d) in enumerate([(0.56, (-0.004, 0.002)), (0.57, (-0.006, 0.002))]):
    base = f"runs/d_seed{s}_800"
    rep = {"sets": {"all": {"baseline": base, "models": {
        base: model(b, None), f"runs/g_seed{s}_800": model(b + 0.001, (0.001, 0.001)),
        "runs/start": model(b + start_d[0], start_d)}}}}
    p = tmp_path / f"s{s}.json"
    p.write_text(__import__("json").dumps(rep))
    files.append(str(p))
  groups = rsm.by_setup(files)
  assert sorted(groups) == ["runs/g_seed*_800 minus runs/d_seed*_800", "runs/start minus runs/d_seed*_800"]
  start = ps.pool(groups["runs/start minus runs/d_seed*_800"], ["ndcg@10"])
  (row,) = start.values()
  assert row["ndcg@10"]["difference"] == pytest.approx(-0.005)  # both seeds' start rows, not the first alone
  assert row["ndcg@10"]["se"] == pytest.approx(math.sqrt(2) * 0.002 / 2)
  # the same comparison listed twice (same model, same baseline) still counts once
  assert [len(v) for v in rsm.by_setup([files[0], files[0]]).values()] == [1, 1]
