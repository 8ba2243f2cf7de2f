"""One model for every scenario, end to end in the tiny size (issue 14): trained on the seqio
mixture of four scenarios over two catalogues, evaluated with one row per scenario over its own
pool, saved as one artifact that `oxyjax.predict` serves for any scenario."""

import json
import os

import numpy as np
import pytest

from oxyjax import predict as predict_lib
from oxyjax import train as train_lib
from oxyjax.artifact import ModelArtifact
from oxyjax.data.catalogue import Catalogue
from oxyjax.models.encoder_decoder import ModelConfig

TINY = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                   dropout_rate=0.1, max_history=10, instruction_dim=384)
SCENARIOS = [
    train_lib.ScenarioConfig("office_homepage", "homepage", "office"),
    train_lib.ScenarioConfig("office_i2i", "item_to_item", "office"),
    train_lib.ScenarioConfig("industrial_i2i_poor", "item_to_item", "industrial", rate=0.2, train_fraction=0.1),
    train_lib.ScenarioConfig("office_search", "search", "office", rate=0.5),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("scenarios")
  model_dir = root / "run"
  result = train_lib.train(
      scenarios=SCENARIOS, model_config=TINY, model_dir=str(model_dir), batch_size=32, num_train_steps=4,
      num_epochs=None, checkpoint_every_steps=2, eval_every_steps=2, eval_max_examples=32,
      final_eval_splits=("test",), final_eval_max_examples=64, eval_batch_size=64, eval_beam_size=10,
      log_every_steps=100, verbose=False, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2},
      sid=train_lib.SIDConfig(codebook_size=16, embedding="collaborative", cache_dir=None, joint_codes="disjoint"))
  return model_dir, result


def test_every_evaluation_reports_one_row_per_scenario(run):
  model_dir, result = run
  names = [s.name for s in SCENARIOS]
  for entry in result.history:  # periodic validation
    assert all(f"{n}/recall@10" in entry for n in names), sorted(entry)
    assert entry["recall@10"] == pytest.approx(np.mean([entry[f"{n}/recall@10"] for n in names]))
  with open(model_dir / "run_summary.json") as f:
    results = json.load(f)["results"]
  assert set(results) == {f"test/{n}" for n in names} | {"test/mean"}
  assert all(results[f"test/{n}"]["num_examples"] == 64 for n in names)
  with open(model_dir / "metrics" / "metrics.md") as f:
    table = f.read()
  assert all(f"test/{n} |" in table for n in names)
  with open(model_dir / "metrics" / "metrics.json") as f:
    assert len(json.load(f)) == len(names) + 1


def test_the_artifact_holds_the_catalogue_scenarios_and_their_pools(run):
  model_dir, _ = run
  art = ModelArtifact.load(str(model_dir / "artifact"))
  cat = Catalogue.load(["office", "industrial"])
  assert art.domains == ["office", "industrial"] and art.data_fingerprint == cat.fingerprint
  assert [s["name"] for s in art.scenarios] == [s.name for s in SCENARIOS]
  assert art.raw_item_ids == cat.raw_item_ids
  np.testing.assert_array_equal(art.pools["office_search"], cat.items_of("office"))
  np.testing.assert_array_equal(art.pools["industrial_i2i_poor"], cat.items_of("industrial"))
  assert art.model_config.num_scenarios == 4 and art.model_config.scenario_triggers
  assert art.sid_table.codes.shape[1] == 5  # the domain level + each domain's 3 k-means levels + collision
  # disjoint code tokens: each k-means level's vocabulary is both domains' codebooks, and no token is in both
  assert art.sid_table.codebook_sizes[1:4] == (32, 32, 32)
  office, industrial = art.sid_table.codes[cat.items_of("office")], art.sid_table.codes[cat.items_of("industrial")]
  assert all(not set(office[:, l]) & set(industrial[:, l]) for l in (1, 2, 3, 4))


@pytest.fixture(scope="module")
def predictor(run):
  return predict_lib.Predictor(str(run[0]), beam_size=20)


def test_predict_serves_every_scenario_from_its_own_pool(predictor):
  history = ["office/1", "office/2", "office/3"]
  for sc, kwargs in [("office_homepage", {}), ("office_i2i", {"trigger": "office/4"}),
                     ("office_search", {"query": "Ink cartridges, black"})]:
    recs = predictor.recommend(history, top_k=20, scenario=sc, **kwargs)
    assert len(recs) == 20 and all(r.startswith("office/") for r, _, _ in recs), sc
  recs = predictor.recommend([], top_k=20, scenario="industrial_i2i_poor", trigger="industrial/5")
  assert len(recs) == 20 and all(r.startswith("industrial/") for r, _, _ in recs)  # another catalogue's pool


def test_a_scenarios_history_cut_applies_to_its_requests(predictor, monkeypatch):
  """A scenario trained on its last `history` behaviours reads a request's history the same way."""
  history = ["office/1", "office/2", "office/3"]
  args = dict(scenario="office_search", query="Ink cartridges, black", embed=predictor.embed)
  full = predict_lib.build_request(predictor.artifact, predictor.model, history, **args)
  cut = [dict(s, history=2) if s["name"] == "office_search" else s for s in predictor.artifact.scenarios]
  monkeypatch.setattr(predictor.artifact, "scenarios", cut)
  short = predict_lib.build_request(predictor.artifact, predictor.model, history, **args)
  assert list(full.items) == list(predictor.artifact.item_indices(history))
  assert list(short.items) == list(predictor.artifact.item_indices(history[1:]))
  home = predict_lib.build_request(predictor.artifact, predictor.model, history, scenario="office_homepage")
  assert len(home.items) == 3  # another scenario of the same artifact: not cut


@pytest.mark.parametrize("kwargs, message", [
    (dict(scenario="feed"), "unknown scenario 'feed'; this model serves"),
    (dict(scenario="office_i2i"), "give the item being looked at"),
    (dict(scenario="office_search", query="  the  "), "give a non-empty query"),
    (dict(scenario="office_homepage", query="ink"), "--query is for search scenarios"),
    (dict(scenario="office_i2i", trigger="office/999999"), "unknown item id 'office/999999'"),
])
def test_predict_errors_name_the_problem(predictor, kwargs, message):
  with pytest.raises((ValueError, KeyError), match=message):
    predictor.recommend(["office/1"], top_k=5, **kwargs)
  with pytest.raises(ValueError, match="the history is empty"):
    predictor.recommend([], top_k=5, scenario="office_homepage")


def test_a_store_gives_homepage_rows_their_instructions_and_covered_rows_are_scored_both_ways(run, tmp_path):
  """Evaluation of the run with an instruction store (what `train(..., instructions=...)` and
  `evaluate_final` use): the office homepage rows with a record read it; the covered rows are
  scored as they are and again with the learned default, by the same weights."""
  from oxyjax import experiment as experiment_lib
  from oxyjax import partitioning, trainer
  from oxyjax.evaluation import Evaluator
  from oxyjax.instructions import prompt
  from oxyjax.instructions.store import InstructionRecord, InstructionStore, record_key

  model_dir, _ = run
  cat = Catalogue.load(["office", "industrial"])
  office = cat.dataset("office")
  covered = [1, 5, 9, 30, 31]
  rng = np.random.default_rng(1)
  store = InstructionStore(tmp_path / "store")
  store.put([InstructionRecord(*record_key(office, office.test[i]), text=f"needs {i}",
                               embedding=rng.normal(size=384).astype(np.float32), model_version="test", created_at=1e9,
                               context_key=prompt.context_key(prompt.context_for_example(office, office.test[i])))
             for i in covered])
  part = partitioning.Partitioner({"data": -1})
  art = ModelArtifact.load(str(model_dir / "artifact"))
  exp = experiment_lib.from_artifact(art, partitioner=part, log=lambda *a: None,
                                     instructions=train_lib.InstructionsConfig(store=str(tmp_path / "store")))
  home = next(s for s in exp.scenarios if s.name == "office_homepage")
  assert np.flatnonzero(home.splits["test"].extras["instruction_mask"]).tolist() == covered
  params, _ = train_lib.load_eval_weights(str(model_dir), trainer.TrainStateFactory(exp.model, part).params_abstract,
                                          log=lambda *a: None)
  ev = Evaluator(exp.model, part, exp.trie(), beam_size=10, batch_size=64)
  rows = train_lib.covered_scenario_rows(ev, params, exp, "test")
  assert set(rows) == {"test/office_homepage_with_instruction", "test/office_homepage_with_instruction_as_default"}
  assert all(r["num_examples"] == len(covered) for r in rows.values())
  # as-default is exactly the model's answer for those rows without a store
  plain = experiment_lib.from_artifact(art, partitioner=part, log=lambda *a: None)
  home_plain = next(s for s in plain.scenarios if s.name == "office_homepage")
  assert ev(params, home_plain.splits["test"].take(covered), None, exp.trie("office_homepage")) == \
      rows["test/office_homepage_with_instruction_as_default"]


def test_one_second_stage_reranks_every_scenario_over_its_own_pool(run, tmp_path):
  """Re-scoring a multi-scenario run (`rescoring` on in `evaluate_run`, as in training): one SASRec
  scorer, trained on both catalogues' training sequences in joint indices and cached under the
  catalogue's name; every scenario's test rows re-ranked over its own pool (results
  '<split>/<scenario>', the beams alone '<split>/<scenario>_beams'), each at its scenario's weight
  (office_search 0 here). The stage is saved with the run, weights by scenario id; the predictor and
  the exported program serve every scenario with it and agree; a weight-0 scenario keeps its beams'
  order and every item stays in the scenario's pool. A weight for a scenario the run does not have
  is refused before anything is evaluated."""
  import shutil

  from oxyjax import export as export_lib
  from oxyjax import partitioning, rescoring, serve
  from oxyjax.sid import sasrec
  from tests.models.test_batch_independence import _assert_same_ranking

  model_dir, _ = run
  copy = tmp_path / "copy"  # the stage and results are written into the copy, not the fixture's run
  shutil.copytree(model_dir, copy)
  names = [s.name for s in SCENARIOS]
  cfg = rescoring.RescoringConfig(weight=1.0, union=5, scenario_weights={"office_search": 0.0},
                                  cache_dir=str(tmp_path / "rescoring"),
                                  sasrec=sasrec.SASRecConfig(dim=16, num_blocks=1, max_len=10, num_epochs=2,
                                                             length_buckets=(4, 10)))
  part = partitioning.Partitioner({"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match=r"scenario_weights: \['feed'\] not among"):
    train_lib.evaluate_run(str(copy), partitioner=part, splits=("test",), max_examples=64,
                           rescoring=rescoring.RescoringConfig(weight=1.0, scenario_weights={"feed": 0.0}),
                           eval_batch_size=64, eval_beam_size=10, write_results=False, log=lambda *a: None)
  result = train_lib.evaluate_run(str(copy), partitioner=part, splits=("test",), max_examples=64, rescoring=cfg,
                                  eval_batch_size=64, eval_beam_size=10, log=lambda *a: None)
  cat = Catalogue.load(["office", "industrial"])
  cached = os.listdir(tmp_path / "rescoring")
  assert len(cached) == 1 and cached[0].startswith(cat.name + "_")
  scorer = rescoring.SASRecScorer.load(str(tmp_path / "rescoring" / cached[0]),
                                       sequences=rescoring.dataset_sequences(cat.name, cat.domains)[0],
                                       num_items=cat.num_items)
  with open(copy / "run_summary.json") as f:
    results = json.load(f)["results"]
  rows = [f"test/{n}" for n in names] + ["test/mean"]
  assert set(results) == set(rows) | {f"{r}_beams" for r in rows}
  assert all(results[r]["num_examples"] == results[f"{r}_beams"]["num_examples"] == 64 for r in rows[:-1])
  assert result.test is None  # a multi-scenario run's results are per scenario
  stage = rescoring.SecondStage.load(str(copy / rescoring.RUN_STAGE_DIR))
  assert stage.scenario_weights == (1.0, 1.0, 1.0, 0.0) and stage.scorer.digest == scorer.digest

  from oxyjax.sid.embeddings import QueryEmbedder
  from tests.instructions.conftest import HashEncoder

  staged = predict_lib.Predictor(str(copy), beam_size=10)
  beams_only = predict_lib.Predictor(str(copy), beam_size=10, second_stage="none")
  staged.embed = beams_only.embed = QueryEmbedder(HashEncoder())  # the query's embedding (the same on both sides)
  sdir = export_lib.export_run(str(copy), str(tmp_path / "serving"), batch_sizes=(1,), beam_sizes=(10,),
                               log=lambda *a: None)
  model = serve.ServingModel(sdir, log=lambda *a: None)
  assert model.second_stage["scenario_weights"] == [1.0, 1.0, 1.0, 0.0]
  recommender = serve.Recommender(model, encoder=staged.embed.encoder)
  history = ["office/1", "office/2", "office/3"]
  reordered = False
  for sc, kwargs in [("office_homepage", {}), ("office_i2i", {"trigger": "office/4"}),
                     ("industrial_i2i_poor", {"trigger": "industrial/5"}),
                     ("office_search", {"query": "Ink cartridges, black"})]:
    hist = [] if sc == "industrial_i2i_poor" else history
    recs = staged.recommend(hist, top_k=10, scenario=sc, **kwargs)
    beams = [r[0] for r in beams_only.recommend(hist, top_k=10, scenario=sc, **kwargs)]
    domain = "industrial/" if sc.startswith("industrial") else "office/"
    assert all(r[0].startswith(domain) for r in recs), sc  # SASRec scores both catalogues; the pool holds
    kept = [r[0] for r in recs if r[0] in beams]
    if sc == "office_search":  # weight 0: the beams keep beam search's order among the candidates
      assert kept == [b for b in beams if b in kept]
    else:
      reordered |= kept != [b for b in beams if b in kept]
    body = {"scenario": sc, "history": hist, "k": 10, **kwargs}
    ans = recommender.recommend([body])[0]
    assert ans.ranking == "second_stage"
    _assert_same_ranking(np.asarray([x["item_id"] for x in ans.items]), np.asarray([x["score"] for x in ans.items]),
                         np.asarray([r[0] for r in recs]), np.asarray([r[1] for r in recs]), sc)
  assert reordered  # weight 1 did re-rank some scenario's beams
  # benchmarks/rerank_eval.py on the run: each scenario its own weight curve on validation (over its
  # own pool), the weight chosen on it, and test read once at that weight. At weight 0 the beams are
  # in beam-search order, so their curve's weight-0 point is the policy alone, scenario by scenario.
  import importlib.util
  import sys

  bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  spec = importlib.util.spec_from_file_location("rerank_eval", os.path.join(bench, "rerank_eval.py"))
  rerank_eval = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rerank_eval)
  out = tmp_path / "rerank.json"
  argv = ["rerank_eval.py", f"--sasrec={copy / rescoring.RUN_STAGE_DIR}", str(copy), "--union=5", "--weights=0,1,1e6",
          "--max_examples=32", "--beam=10", f"--out={out}"]
  old_argv, sys.argv = sys.argv, argv
  try:
    rerank_eval.main()
  finally:
    sys.argv = old_argv
  with open(out) as f:
    sets = json.load(f)["models"][str(copy)]["scenarios"]
  assert sorted(sets) == sorted(names)
  for name, rec in sets.items():
    assert rec["beams"]["validation"]["0.0"] == rec["validation_policy"], name
    assert rec["union5"]["best_weight_on_validation"] in (0.0, 1.0, 1e6)
    assert rec["test_rows"] == 32 and rec["test_variant"] == "union5"
