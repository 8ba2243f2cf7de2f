"""A trained run is usable on its own: `evaluate_run` and `python -m oxyjax.predict` load the
model artifact without the training split, the optimizer state or the data cache; every entry
point answers --help and reports a bad flag in one line."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from oxyjax import partitioning
from oxyjax import predict as predict_lib
from oxyjax import train as train_lib
from oxyjax.artifact import ArtifactError, ModelArtifact
from oxyjax.data import pipeline
from oxyjax.data import readers
from oxyjax.models.encoder_decoder import ModelConfig
from tests.models.test_batch_independence import _assert_same_ranking
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                   dropout_rate=0.1, max_history=10)
EVAL = dict(eval_batch_size=64, eval_beam_size=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny run on Office (item titles), EMA on, with validation along the way."""
  root = tmp_path_factory.mktemp("predict")
  model_dir = root / "run"
  result = train_lib.train(
      dataset="office", model_config=TINY, model_dir=str(model_dir), batch_size=32, num_train_steps=4,
      num_epochs=None, data_source="readers", checkpoint_every_steps=2, eval_every_steps=2, eval_max_examples=64,
      final_eval_splits=("test",), log_every_steps=100, verbose=False, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2},
      optimizer=train_lib.OptimizerConfig(ema_decay=0.9),
      sid=train_lib.SIDConfig(codebook_size=16, embedding="collaborative", cache_dir=str(root / "sid")), **EVAL)
  return model_dir, result


def _part():
  return partitioning.Partitioner({"data": 2, "fsdp": 2, "tensor": 2})


def test_run_directory_holds_a_self_contained_artifact(run):
  model_dir, result = run
  art = ModelArtifact.load(str(model_dir / "artifact"))
  ds = readers.load_dataset("office")
  assert art.raw_item_ids == ds.raw_item_ids and art.dataset == "office"
  assert art.title(1) == (ds.item_meta[1].title or None)
  assert art.model_config.sid_vocab_sizes is not None and art.model_config.emb_dim == 32
  assert art.data_fingerprint == readers.dataset_fingerprint("office")
  assert art.instructions["scenario"] == "homepage"
  assert os.path.isdir(model_dir / "artifact" / "params")
  assert result.best_step in (2, 4)


def test_evaluate_run_needs_no_training_split_and_no_optimizer(run, tmp_path, monkeypatch):
  model_dir, result = run
  copy = tmp_path / "run"
  shutil.copytree(model_dir, copy)
  splits = []
  load = pipeline.load_split
  monkeypatch.setattr(pipeline, "load_split", lambda name, split, *a, **k: splits.append(split) or load(name, split, *a, **k))
  shutil.rmtree(copy / "checkpoints")  # no optimizer state anywhere
  again = train_lib.evaluate_run(str(copy), partitioner=_part(), splits=("test",), data_source="readers", **EVAL)
  assert splits == ["test"]
  # The artifact's weights are the ones the run's final evaluation used: the same metrics.
  assert again.test == result.test and again.final_step == result.best_step
  summary = json.load(open(copy / "run_summary.json"))
  assert summary["results"]["test"] == result.test and "validation_history" in summary  # merged, record kept


def test_evaluate_run_falls_back_to_the_newest_checkpoints_weights(run, tmp_path):
  model_dir, result = run
  copy = tmp_path / "run"
  shutil.copytree(model_dir, copy)
  shutil.rmtree(copy / "artifact" / "params")
  shutil.rmtree(copy / "best")
  part = _part()
  again = train_lib.evaluate_run(str(copy), partitioner=part, splits=(), data_source="readers", **EVAL)
  assert again.final_step == 4
  # The EMA weights of step 4 (what evaluation uses), read without the optimizer state.
  full = train_lib.checkpoints.Checkpointer(str(copy / "checkpoints")).restore_latest(
      train_lib.trainer_lib.TrainStateFactory(
          ModelArtifact.load(str(copy / "artifact")).make_model(), part,
          train_lib.make_optimizer(train_lib.OptimizerConfig(ema_decay=0.9), 4)[0], ema=True).abstract)
  assert full[0] == 4
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(again.state["params"]),
               jax.device_get(full[1]["ema_params"]))


def test_evaluate_run_refuses_data_the_artifact_was_not_built_from(run, tmp_path, monkeypatch):
  model_dir, _ = run
  data = tmp_path / "data"
  shutil.copytree(os.path.join(REPO, "data", "amazon2018"), data / "amazon2018")
  with open(data / "amazon2018" / "Office_Products" / "test.csv", "a") as f:
    f.write("\n")
  monkeypatch.setenv("OXYJAX_DATA_DIR", str(data))
  with pytest.raises(ValueError, match="fingerprint .* was built from data with fingerprint"):
    train_lib.evaluate_run(str(model_dir), partitioner=_part(), splits=("test",), data_source="readers", **EVAL)


def test_predictor_answers_from_the_artifact_alone(run, tmp_path, monkeypatch):
  model_dir, _ = run
  art_dir = tmp_path / "artifact"
  shutil.copytree(model_dir / "artifact", art_dir)  # the artifact directory, moved elsewhere
  def no_data(*a, **k):
    raise AssertionError("predict must not read the data")
  monkeypatch.setattr(readers, "load_dataset", no_data)
  monkeypatch.setattr(pipeline, "load_split", no_data)
  p = predict_lib.Predictor(str(art_dir), beam_size=10)
  raw = p.artifact.raw_item_ids
  history = [raw[5], raw[17], raw[3]]
  recs = p.recommend(history, top_k=5)
  assert len(recs) == 5 and len({r[0] for r in recs}) == 5
  assert all(r[0] in raw[1:] for r in recs)
  scores = [r[1] for r in recs]
  assert scores == sorted(scores, reverse=True)
  # The same answer as the model's own decoder on this example.
  ex = pipeline.examples_to_arrays([readers.Example(0, (5, 17, 3), 0)], TINY.max_history)
  out = jax.jit(lambda prm, b: p.model.predict(prm, b, p.trie, beam_size=10))(p.params, p.model.convert_features(ex))
  assert [raw[i] for i in np.asarray(out.items)[0, :5]] == [r[0] for r in recs]
  with pytest.raises(KeyError, match="unknown item id 'not-an-item'"):
    p.recommend([raw[5], "not-an-item"])
  with pytest.raises(ValueError, match="history is empty"):
    p.recommend([])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ArtifactError, match="artifact.json is missing"):
    predict_lib.Predictor(str(tmp_path / "empty"))


def _cli(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_predict_command_prints_top_k_and_one_line_errors(run, tmp_path):
  model_dir, _ = run
  raw = ModelArtifact.load(str(model_dir / "artifact")).raw_item_ids
  out = _cli("oxyjax.predict", f"--model_dir={model_dir}", f"--history={raw[5]},{raw[17]}", "--top_k=3", "--json")
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout)
  assert [r["rank"] for r in got["items"]] == [1, 2, 3] and all(r["item_id"] in raw for r in got["items"])
  assert any(r["title"] for r in got["items"])  # Office has titles
  bad = _cli("oxyjax.predict", f"--model_dir={model_dir}", f"--history={raw[5]},B00NOPE")
  assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
      "python -m oxyjax.predict: unknown item id 'B00NOPE': not in the artifact's item index "
      f"({len(raw) - 1:,} items of 'office')"]


@pytest.mark.parametrize("module", ["oxyjax.train", "oxyjax.predict", "oxyjax.instructions.generate",
                                    "oxyjax.rl.train", "oxyjax.export", "oxyjax.serve",
                                    "oxyjax.instructions.beam_job"])
def test_entry_points_answer_help_and_reject_an_unknown_flag_or_a_stray_word_in_one_line(module):
  out = _cli(module, "--help", timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  flags_shown = {"oxyjax.train": "--gin_file", "oxyjax.predict": "--history", "oxyjax.instructions.generate": "--dataset",
                 "oxyjax.rl.train": "--gin_file", "oxyjax.export": "--beam_sizes", "oxyjax.serve": "--serving_dir",
                 "oxyjax.instructions.beam_job": "--pipeline_options"}
  assert flags_shown[module] in out.stdout
  if module in ("oxyjax.train", "oxyjax.rl.train"):
    assert "experiments/beauty.gin" in out.stdout and "modes/rl.gin" in out.stdout  # the gin files it accepts
  bad = _cli(module, "--no_such_flag=1", timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [f"python -m {module}: Unknown command line flag 'no_such_flag' (see --help)"]
  # Every command takes flags only (cli.run): a stray word is refused before anything runs.
  required = ["--dataset=office"] if module.startswith("oxyjax.instructions") else []  # flags parsed first
  stray = _cli(module, *required, "stray_word", timeout=120)
  assert stray.returncode == 1
  assert stray.stderr.strip().splitlines()[-1] == f"python -m {module}: unexpected arguments ['stray_word'] (see --help)"


def test_per_example_ranks_give_the_evaluators_metrics(run):
  """`Evaluator.target_ranks` (for paired comparisons, benchmarks/paired_eval.py) decodes the same
  rows as the evaluator's metrics: the per-example values average to them exactly."""
  from oxyjax import experiment as experiment_lib
  from oxyjax import metrics as metrics_lib
  from oxyjax import trainer
  from oxyjax.evaluation import Evaluator, fixed_subset

  model_dir, _ = run
  part = _part()
  exp = experiment_lib.from_artifact(ModelArtifact.load(str(model_dir / "artifact")), partitioner=part,
                                     data_source="readers", log=lambda *a, **k: None)
  params, _ = train_lib.load_eval_weights(str(model_dir), trainer.TrainStateFactory(exp.model, part).params_abstract,
                                          log=lambda *a: None)
  ev = Evaluator(exp.model, part, exp.trie(), beam_size=10, batch_size=64)
  test = exp.load_split("test")
  ranks = ev.target_ranks(params, test, max_examples=100)
  metrics = ev(params, test, max_examples=100)
  assert ranks.shape == (100,) and metrics["num_examples"] == 100
  for m in ("recall@1", "recall@10", "ndcg@5", "ndcg@10"):
    assert metrics_lib.per_example(ranks, m).mean() == pytest.approx(metrics[m], abs=1e-12)
  # `Evaluator.beams` (for a second stage, benchmarks/rerank_eval.py): the same rows and lists, with
  # each list's scores best first and the features of its rows.
  sub = fixed_subset(test, 100)
  got = [(f["target_items"][m], items[m], scores[m]) for f, items, scores, m in ev.beams(params, sub)]
  targets, items, scores = (np.concatenate(x) for x in zip(*got))
  np.testing.assert_array_equal(metrics_lib.target_ranks(items, targets), ranks)
  assert np.isfinite(scores[:, 0]).all()
  assert np.all(np.diff(np.where(np.isfinite(scores), scores, -1e30), axis=1) <= 0)


def test_evaluate_run_rescores_with_a_cached_sasrec_scorer(run, tmp_path, monkeypatch):
  """`rescoring` on: the results hold the re-scored metrics under the split's name and the beams
  alone under `<split>_beams`; the scorer is trained once (training split only) and cached by
  content, so a second evaluation loads it instead of training again."""
  from oxyjax import rescoring
  from oxyjax.sid import sasrec

  model_dir, _ = run
  cfg = rescoring.RescoringConfig(weight=1.0, union=5, cache_dir=str(tmp_path / "rescoring"),
                                  sasrec=sasrec.SASRecConfig(dim=16, num_blocks=1, max_len=10, num_epochs=2,
                                                             length_buckets=(4, 10)))
  first = train_lib.evaluate_run(str(model_dir), partitioner=_part(), splits=("test",), data_source="readers",
                                 max_examples=64, rescoring=cfg, write_results=False, **EVAL)
  summary = first.test
  assert summary["num_examples"] == 64
  cached = os.listdir(tmp_path / "rescoring")
  assert len(cached) == 1 and cached[0].startswith("office_")

  def no_training(*a, **k):
    raise AssertionError("the cached scorer should have been loaded")

  monkeypatch.setattr(rescoring, "train", no_training)
  copy = tmp_path / "copy"  # results are merged into the copy's run_summary.json, not the fixture's
  shutil.copytree(model_dir, copy)
  again = train_lib.evaluate_run(str(copy), partitioner=_part(), splits=("test",), data_source="readers",
                                 max_examples=64, rescoring=cfg, write_results=True, **EVAL)
  assert again.test == summary
  with open(copy / "run_summary.json") as f:
    results = json.load(f)["results"]
  assert set(results["test_beams"]) == set(results["test"])
  # the run now has its second stage, which the export serves by default
  assert not os.path.exists(model_dir / "second_stage") and os.path.isdir(copy / "second_stage")
  from oxyjax import export as export_lib

  sdir = export_lib.export_run(str(copy), str(tmp_path / "serving"), batch_sizes=(1,), beam_sizes=(10,),
                               log=lambda *a: None)
  with open(os.path.join(sdir, export_lib.MANIFEST)) as f:
    stage = json.load(f)["second_stage"]
  assert (stage["weight"], stage["union"]) == (1.0, 5)
  # `oxyjax.predict` uses the run's stage too (the same `export.serving_fn`): the in-process and
  # the exported answers agree; with `second_stage="none"` the beams alone, as before the stage.
  from oxyjax import serve

  p = predict_lib.Predictor(str(copy), beam_size=10)
  history = list(p.artifact.raw_item_ids[1:6])
  recs = p.recommend(history, top_k=10)
  ans = serve.Recommender(serve.ServingModel(sdir, log=lambda *a: None)).recommend([{"history": history, "k": 10}])[0]
  assert ans.ranking == "second_stage"
  _assert_same_ranking(np.asarray([x["item_id"] for x in ans.items]), np.asarray([x["score"] for x in ans.items]),
                       np.asarray([r[0] for r in recs]), np.asarray([r[1] for r in recs]), "exported vs in-process")
  beams = predict_lib.Predictor(str(copy), beam_size=10, second_stage="none").recommend(history, top_k=10)
  assert beams == predict_lib.Predictor(str(model_dir), beam_size=10).recommend(history, top_k=10)
  assert [r[0] for r in beams] != [r[0] for r in recs]  # the stage re-ranked (weight 1, 5 extra items)
  with pytest.raises(ValueError, match="eval_score_normalization"):
    train_lib.evaluate_run(str(model_dir), partitioner=_part(), splits=("test",), data_source="readers",
                           rescoring=cfg, eval_score_normalization="valid", eval_batch_size=64)


def test_a_required_directory_flag_is_named_when_missing_or_not_a_directory(tmp_path):
  from oxyjax import cli

  with pytest.raises(SystemExit, match=r"^prog: --model_dir is required \(a run directory\)$"):
    cli.require_dir("prog", "model_dir", "", "a run directory")
  missing = tmp_path / "nope"
  with pytest.raises(SystemExit, match="^" + re.escape(f"prog: --model_dir={missing}: no such directory (a run directory)") + "$"):
    cli.require_dir("prog", "model_dir", str(missing), "a run directory")
  (tmp_path / "file").write_text("x")
  with pytest.raises(SystemExit, match="no such directory"):
    cli.require_dir("prog", "model_dir", str(tmp_path / "file"), "a run directory")
  assert cli.require_dir("prog", "model_dir", str(tmp_path), "a run directory") == str(tmp_path)
