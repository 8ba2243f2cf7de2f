"""train.py end to end: a tiny gin config runs the whole job; a killed run resumes to the same result."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from oxyjax import train as train_lib
from oxyjax.models.encoder_decoder import ModelConfig
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                   dropout_rate=0.1, max_history=10)


@pytest.fixture(scope="module")
def sid_cfg(tmp_path_factory):
  return train_lib.SIDConfig(codebook_size=16, embedding="collaborative",
                             cache_dir=str(tmp_path_factory.mktemp("sid")))


def _train(model_dir, sid_cfg, **kw):
  args = dict(dataset="industrial", model_config=TINY, sid=sid_cfg, model_dir=str(model_dir), batch_size=32,
              num_train_steps=6, num_epochs=None, data_source="readers", checkpoint_every_steps=2,
              async_checkpointing=True, final_eval_splits=(), log_every_steps=100, verbose=False,
              mesh_shape={"data": 2, "fsdp": 2, "tensor": 2}, length_bucketing=False)  # one compiled shape
  args.update(kw)
  return train_lib.train(**args)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_after_a_crash_reaches_the_same_parameters(tmp_path, sid_cfg, ema_decay):
  opt = train_lib.OptimizerConfig(ema_decay=ema_decay)
  straight = _train(tmp_path / "straight", sid_cfg, optimizer=opt)
  crashed = _train(tmp_path / "resumed", sid_cfg, optimizer=opt, stop_after_steps=3)  # "killed" after step 3
  assert crashed.final_step == 3
  resumed = _train(tmp_path / "resumed", sid_cfg, optimizer=opt)  # same command again: resumes from step 3
  assert resumed.final_step == 6
  a, b = jax.device_get(straight.state), jax.device_get(resumed.state)
  assert ("ema_params" in a) == (ema_decay > 0) == ("ema_params" in b)
  for key in a:  # params, opt_state, step and (with EMA) the averaged weights
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a[key], b[key])
  if ema_decay:  # the average lags the weights: it is a different tree, restored as such
    gaps = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a["params"], a["ema_params"]))
    assert max(gaps) > 0
  if not ema_decay:
    return
  # A run that did not restore the data position would have seen different batches (once is enough):
  other = _train(tmp_path / "other_seed", sid_cfg, optimizer=opt, seed=1)
  diff = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a["params"],
                                      jax.device_get(other.state["params"])))
  assert max(diff) > 0


def test_resuming_with_a_different_train_state_names_the_checkpoint(tmp_path, sid_cfg):
  # Stopping on a periodic-save step must not save that step twice.
  assert _train(tmp_path / "run", sid_cfg, stop_after_steps=2).final_step == 2
  with pytest.raises(ValueError, match=r"run/checkpoints/2: the saved train state does not match .*'ema_params'"):
    _train(tmp_path / "run", sid_cfg, optimizer=train_lib.OptimizerConfig(ema_decay=0.9))


def test_restart_that_reaches_a_saved_best_step_again_keeps_it(tmp_path, sid_cfg):
  # Killed after the best weights of step 2 were saved but before any train-state checkpoint
  # survived: the rerun starts over, reaches step 2 again and must not crash on best/2.
  kw = dict(eval_every_steps=2, eval_max_examples=64, checkpoint_every_steps=4)
  assert _train(tmp_path / "run", sid_cfg, stop_after_steps=3, **kw).best_step == 2
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "3")
  rerun = _train(tmp_path / "run", sid_cfg, **kw)
  assert rerun.final_step == 6 and rerun.best_step in (2, 4, 6)
  assert len(os.listdir(tmp_path / "run" / "best")) == 1


def test_select_metric_keeps_the_step_with_the_best_validation_ndcg(tmp_path, sid_cfg):
  # train(select_metric=...) reaches the evaluator and the best checkpointer: the kept step is the
  # first maximum of that metric over the run's own validation history.
  run = _train(tmp_path / "run", sid_cfg, eval_every_steps=2, eval_max_examples=64, select_metric="ndcg@5")
  scores = [h["ndcg@5"] for h in run.history]
  assert run.best_step == run.history[int(np.argmax(scores))]["step"]
  with pytest.raises(ValueError, match="select_metric 'ndcg@7'"):
    _train(tmp_path / "bad", sid_cfg, eval_every_steps=2, select_metric="ndcg@7")


def test_tiny_gin_config_runs_train_end_to_end(tmp_path):
  model_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags(2))
  cmd = [sys.executable, "-m", "oxyjax.train", "--gin_file=gin_configs/tests/tiny_e2e.gin",
         f"--gin.MODEL_DIR='{model_dir}'", "--gin_bindings=MESH_SHAPE = {'data': 2}",
         f"--gin_bindings=oxyjax.train.SIDConfig.cache_dir = '{tmp_path / 'sid'}'"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "step 8/8" in out.stdout
  metrics = json.load(open(model_dir / "metrics" / "metrics.json"))
  for split in ("industrial/validation", "industrial/test"):
    assert set(metrics[split]) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "hr@1"}
    assert all(0.0 <= v <= 1.0 for k, v in metrics[split].items() if "@" in k)
    assert metrics[split]["num_examples"] > 4000
  assert os.path.isdir(model_dir / "checkpoints" / "8")
  assert os.listdir(model_dir / "tensorboard")


def test_default_configuration_trains_end_to_end_in_the_tiny_size(tmp_path):
  """gin_configs/defaults/small.gin (the one default chosen on validation, docs/results.md),
  unchanged but for the tiny model, a few steps, a small SID codebook, a short RQ-VAE fit and a
  2-epoch re-scoring model, builds its RQ-VAE SIDs, trains, keeps its EMA weights, trains its
  SASRec second stage and evaluates with it."""
  model_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "oxyjax.train", "--gin_file=gin_configs/defaults/small.gin",
         "--gin_file=gin_configs/models/tiny.gin", "--gin.DATASET='industrial'", f"--gin.MODEL_DIR='{model_dir}'",
         "--gin.BATCH_SIZE=64", "--gin.EVAL_EVERY_STEPS=3",
         "--gin_bindings=oxyjax.train.train.num_train_steps = 6", "--gin_bindings=oxyjax.train.train.num_epochs = None",
         "--gin_bindings=oxyjax.train.train.eval_max_examples = 64",
         "--gin_bindings=oxyjax.train.train.final_eval_max_examples = 64",
         "--gin_bindings=oxyjax.train.SIDConfig.codebook_size = 16",
         "--gin_bindings=oxyjax.train.SIDConfig.rqvae_steps = 20",
         "--gin_bindings=oxyjax.train.SIDConfig.embedding = 'collaborative'",
         f"--gin_bindings=oxyjax.train.SIDConfig.cache_dir = '{tmp_path / 'sid'}'",
         "--gin_bindings=oxyjax.sid.sasrec.SASRecConfig.num_epochs = 2",
         f"--gin_bindings=oxyjax.train.RescoringConfig.cache_dir = '{tmp_path / 'rescoring'}'"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "step 6/6" in out.stdout and "EMA weights" in out.stdout
  sid_meta = json.load(open(model_dir / "artifact" / "sid_table.json"))["meta"]
  assert sid_meta["settings"]["quantizer"] == "rqvae" and sid_meta["settings"]["rqvae"]["num_steps"] == 20
  # the default's second stage: a SASRec scorer trained on the training split and cached, the
  # final metrics re-scored, the beams alone beside them
  assert "re-scoring: training the SASRec scorer" in out.stdout
  assert len(os.listdir(tmp_path / "rescoring")) == 1
  assert os.path.isdir(model_dir / "second_stage")  # saved with the run, for `oxyjax.export`
  summary = json.load(open(model_dir / "run_summary.json"))
  assert set(summary["results"]) == {"validation", "test", "validation_beams", "test_beams"}
  assert summary["results"]["validation"]["num_examples"] == 64


def test_missing_required_macro_fails_loudly(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "oxyjax.train", "--gin_file=gin_configs/modes/pretrain.gin",
         "--gin_file=gin_configs/models/tiny.gin", "--gin.DATASET='industrial'"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "MODEL_DIR" in out.stderr
