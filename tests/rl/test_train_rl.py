"""The post-training entry point: from a pre-trained run's artifact to a post-trained run with
per-step diagnostics, validation (the starting weights included), a test evaluation with the best
weights, its own artifact, and an exact resume after a stop."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from oxyjax import train as train_lib
from oxyjax.artifact import ModelArtifact
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.rl import train as rl_train
from oxyjax.rl.losses import PolicyLossConfig
from oxyjax.rl.rewards import RewardWeights
from oxyjax.rl.step import RolloutConfig
from oxyjax.trainer import OptimizerConfig

TINY = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                   dropout_rate=0.1, max_history=10)
MESH = {"data": 8}  # data-parallel over the 8 fake devices (groups never split: tests/rl/test_step.py)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("rl")
  model_dir = root / "pre"
  train_lib.train(dataset="office", model_config=TINY, model_dir=str(model_dir), batch_size=32, num_train_steps=6,
                  num_epochs=None, data_source="readers", checkpoint_every_steps=100, eval_every_steps=0,
                  final_eval_splits=(), log_every_steps=100, verbose=False, mesh_shape=MESH,
                  sid=train_lib.SIDConfig(codebook_size=16, embedding="collaborative", cache_dir=str(root / "sid")))
  return root, model_dir


def _rl(init, model_dir, **kw):
  args = dict(
      init_model_dir=str(init), model_dir=str(model_dir), num_steps=4, batch_size=16, mesh_shape=MESH,
      rollout=RolloutConfig(method="sample", group_size=4), loss=PolicyLossConfig(name="sa_gcpo"),
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0, decay="constant", weight_decay=0.0),
      eval_every_steps=2, eval_max_examples=32, eval_batch_size=32, eval_beam_size=5, final_eval_max_examples=64,
      checkpoint_every_steps=2, log_every_steps=2, data_source="readers", verbose=False,
      # The starting model's item embeddings: Office's MiniLM text embeddings would take ~6 min of
      # one core on a fresh clone (the choice itself: test_the_similarity_space_is_chosen_as_asked).
      similarity_space="model")
  return rl_train.train_rl(**{**args, **kw})


def test_the_similarity_space_is_chosen_as_asked(tiny, monkeypatch):
  """`item_embeddings`: 'text' reads the catalogue's text embeddings and is refused without item
  text; 'model' is the model's item + SID-code embeddings; 'auto' is text where there is text."""
  import types

  from oxyjax.sid import build as sid_build

  text = np.random.default_rng(0).normal(size=(tiny.sid_codes.shape[0], 384)).astype(np.float32)

  def fake_text(dataset):
    if dataset != "office":
      raise ValueError(f"dataset {dataset!r} has no item text")
    return text

  monkeypatch.setattr(sid_build, "item_text_embeddings", fake_text)
  model_e, kind = rl_train.item_embeddings(types.SimpleNamespace(catalogue=None, dataset="beauty", model=tiny.model),
                                           tiny.params, "model")
  assert kind == "the starting model's item embeddings" and model_e.shape == (tiny.sid_codes.shape[0], 32)
  assert np.abs(model_e).max() > 0
  for dataset, space, want in [("office", "auto", text), ("office", "text", text), ("office", "model", model_e),
                               ("beauty", "auto", model_e)]:
    exp = types.SimpleNamespace(catalogue=None, dataset=dataset, model=tiny.model)
    np.testing.assert_array_equal(rl_train.item_embeddings(exp, tiny.params, space)[0], want)
  with pytest.raises(ValueError, match="similarity_space 'text': dataset 'beauty' has no item text"):
    rl_train.item_embeddings(types.SimpleNamespace(catalogue=None, dataset="beauty", model=tiny.model),
                             tiny.params, "text")
  with pytest.raises(ValueError, match="similarity_space must be one of"):
    rl_train.item_embeddings(types.SimpleNamespace(catalogue=None, dataset="beauty", model=tiny.model),
                             tiny.params, "txt")


def test_post_training_run_and_exact_resume(pretrained):
  root, init = pretrained
  full = _rl(init, root / "full")
  summary = json.load(open(root / "full" / "run_summary.json"))
  assert summary["loss"]["name"] == "sa_gcpo" and summary["steps"] == 4
  assert set(summary["results"]) == {"test"} and summary["results"]["test"]["num_examples"] == 64
  steps = [h["step"] for h in summary["validation_history"]]
  assert steps == [0, 2, 4]  # the starting weights are scored (and eligible) as step 0
  assert full.best_step in steps
  # The run's own artifact: the same model, loadable alone, with the post-trained weights.
  art = ModelArtifact.load(str(root / "full" / "artifact"))
  assert art.differences(ModelArtifact.load(str(init / "artifact"))) == []
  assert os.path.isdir(root / "full" / "artifact" / "params")
  # The policy moved: the final parameters differ from the pre-trained ones.
  pre = train_lib.load_eval_weights(str(init), jax.tree.map(lambda x: x, full.state["params"]), log=lambda *a: None)[0]
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
           zip(jax.tree.leaves(full.state["params"]), jax.tree.leaves(pre))]
  assert max(moved) > 0
  # A stop after 2 steps (checkpoint, iterator position, validation history), then a rerun, ends
  # exactly where the uninterrupted run ended: same prompts, same rollout keys, same updates.
  stopped = _rl(init, root / "resumed", stop_after_steps=2)
  assert stopped.final_step == 2
  resumed = _rl(init, root / "resumed")
  assert resumed.final_step == 4
  for a, b in zip(jax.tree.leaves(full.state["params"]), jax.tree.leaves(resumed.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  again = json.load(open(root / "resumed" / "run_summary.json"))
  assert [h["step"] for h in again["validation_history"]] == steps
  assert again["results"]["test"] == summary["results"]["test"]


def test_a_starting_run_with_a_second_stage_is_evaluated_and_served_with_it(pretrained):
  """`second_stage="auto"`: a starting run that has a second stage (as a default pre-training run
  does) gives the post-trained run's test results through it, the beams alone beside them, and
  its stage for the export; `"none"` evaluates the beams alone."""
  import shutil

  from oxyjax import rescoring
  from oxyjax.sid import sasrec

  root, init = pretrained
  staged = root / "pre_staged"
  shutil.copytree(init, staged)
  sequences, num_items = rescoring.dataset_sequences("office")
  scorer = rescoring.train(sequences, num_items, sasrec.SASRecConfig(dim=16, num_blocks=1, max_len=10, num_epochs=1,
                                                                     length_buckets=(4, 10)))
  rescoring.SecondStage(scorer, 1.0, 3).save(str(staged / rescoring.RUN_STAGE_DIR))
  _rl(staged, root / "rl_staged", num_steps=2)
  _rl(staged, root / "rl_plain", num_steps=2, second_stage="none")
  with open(root / "rl_staged" / "run_summary.json") as f:
    summary = json.load(f)
  with open(root / "rl_plain" / "run_summary.json") as f:
    plain = json.load(f)
  assert set(summary["results"]) == {"test", "test_beams"} and set(plain["results"]) == {"test"}
  assert summary["second_stage"] == {"weight": 1.0, "union": 3, "digest": scorer.digest}
  assert summary["best_step"] == plain["best_step"]  # selection reads the beams alone in both
  # The beams alone are the post-trained policy's own ranking, as the run without the stage
  # measures it. The two evaluation programs differ (one has the stage fused in), so a beam's
  # score may differ in its last bits and a near-tie swap two beams of one row: at most one of
  # the 64 examples changes its rank, 1/64 in any metric.
  for k, v in plain["results"]["test"].items():
    assert summary["results"]["test_beams"][k] == pytest.approx(v, abs=1 / 64 + 1e-9), k
  loaded = rescoring.SecondStage.load(str(root / "rl_staged" / rescoring.RUN_STAGE_DIR))
  assert (loaded.weight, loaded.union, loaded.scorer.digest) == (1.0, 3, scorer.digest)
  assert not os.path.exists(root / "rl_plain" / rescoring.RUN_STAGE_DIR)
  # rank_order 'stage': the rank_penalty reward ranks each group as that stage serves it, and the
  # stage's scorer gives the scorer reward (tests/rl/test_step.py checks both); without a stage
  # there is neither.
  _rl(staged, root / "rl_stage_order", num_steps=2, rank_order="stage",
      default_reward=RewardWeights(rank_penalty=1.0, scorer=1.0))
  with open(root / "rl_stage_order" / "run_summary.json") as f:
    summary = json.load(f)
  assert summary["rank_order"] == "stage"
  assert summary["reward_weights"]["office"]["scorer"] == 1.0
  with pytest.raises(ValueError, match="needs one"):
    _rl(staged, root / "rl_no_stage_order", num_steps=2, second_stage="none", rank_order="stage")
  with pytest.raises(ValueError, match="no second stage"):
    _rl(staged, root / "rl_no_stage_scorer", num_steps=2, second_stage="none", default_reward=RewardWeights(scorer=1.0))


def _ranker(init, model_dir, **kw):
  from oxyjax.rl import ranking_model as rm

  cfg = rm.RankerConfig(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_layers=1, policy_negatives=2)
  return rm.train_ranker(init_model_dir=str(init), model_dir=str(model_dir), config=cfg, num_steps=4, batch_size=32,
                         eval_every_steps=2, eval_max_examples=64, eval_negatives=5, checkpoint_every_steps=2,
                         log_every_steps=2, final_eval_max_examples=64, mesh_shape=MESH, verbose=False, **kw)


def test_ranking_model_run_resume_and_ranking_reward(pretrained):
  """The reward service: trained from the artifact's logs with held-out AUC on validation and test,
  resumed exactly after a stop, refused for another artifact, and read by post-training as the
  ranking reward."""
  from oxyjax import partitioning
  from oxyjax.rl import ranking_model as rm

  root, init = pretrained
  full = _ranker(init, root / "ranker_full")
  assert set(full["results"]) == {"validation", "test"}
  for r in full["results"].values():
    assert 0.0 <= r["auc_uniform"] <= 1.0 and 0.0 <= r["auc_popular"] <= 1.0 and 0.0 <= r["auc_policy"] <= 1.0
    assert r["auc"] == pytest.approx((r["auc_uniform"] + r["auc_popular"] + r["auc_policy"]) / 3)
  assert [h["step"] for h in full["validation_history"]] == [2, 4]
  assert _ranker(init, root / "ranker_resumed", stop_after_steps=2) == {"stopped_at": 2}
  resumed = _ranker(init, root / "ranker_resumed")
  # same negatives (the policy's beams are deterministic), same batches, same updates
  assert resumed["results"] == full["results"]
  art = ModelArtifact.load(str(init / "artifact"))
  part = partitioning.Partitioner(MESH)
  ranker, params, meta = rm.load(str(root / "ranker_full"), art, part)
  assert meta["step"] in (2, 4) and ranker.config.emb_dim == 16
  other = dataclasses.replace(art, pools={"all": art.pools["all"][:-1]})
  with pytest.raises(ValueError, match="trained for the artifact"):
    rm.load(str(root / "ranker_full"), other, part)
  # Post-training with the ranking reward (its value in the rollout: tests/rl/test_ranking_model.py).
  with pytest.raises(ValueError, match="no ranking model"):
    _rl(init, root / "rl_no_ranker", default_reward=RewardWeights(ranking=0.5))
  _rl(init, root / "rl_ranked", ranking_model_dir=str(root / "ranker_full"), default_reward=RewardWeights(ranking=0.5),
      num_steps=2, eval_every_steps=0, final_eval_splits=())
  summary = json.load(open(root / "rl_ranked" / "run_summary.json"))
  assert summary["ranking_model_dir"] == str(root / "ranker_full")


def test_ranker_refresh_trains_the_ranker_beside_the_policy_and_resumes_exactly(pretrained):
  """With RefreshConfig.updates_per_step > 0 the ranker keeps training on the policy's candidates:
  its weights move, they are checkpointed with the policy's (a stopped run resumes to the same
  policy and ranker weights), and the run leaves the refreshed ranker as a loadable ranking model."""
  from oxyjax import partitioning
  from oxyjax.rl import ranking_model as rm

  root, init = pretrained
  _ranker(init, root / "ranker_refresh_start")
  start = str(root / "ranker_refresh_start")
  kw = dict(ranking_model_dir=start, default_reward=RewardWeights(ranking=0.5), num_steps=4, eval_every_steps=2,
            final_eval_splits=(), ranker_refresh=rm.RefreshConfig(updates_per_step=2, learning_rate=1e-2,
                                                                  policy_negatives=2))
  with pytest.raises(ValueError, match="needs a ranking model"):
    _rl(init, root / "refresh_no_ranker", ranker_refresh=rm.RefreshConfig(updates_per_step=1))
  full = _rl(init, root / "refresh_full", **kw)
  art = ModelArtifact.load(str(init / "artifact"))
  part = partitioning.Partitioner(MESH)
  _, before, _ = rm.load(start, art, part)
  ranker, after, meta = rm.load(str(root / "refresh_full" / "ranker"), art, part)
  assert meta["refreshed_for_steps"] == 4 and 0.0 <= meta["results"]["validation"]["auc_policy"] <= 1.0
  assert int(full.state["ranker"]["step"]) == 8  # 4 steps x 2 ranker updates
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
              zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  assert moved > 0
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(full.state["ranker"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.load(open(root / "refresh_full" / "run_summary.json"))["ranker_refresh"]["updates_per_step"] == 2
  assert _rl(init, root / "refresh_resumed", stop_after_steps=2, **kw).final_step == 2
  resumed = _rl(init, root / "refresh_resumed", **kw)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_recent_prompts_are_each_users_last_training_example():
  from oxyjax.data import pipeline

  users = np.asarray([3, 3, 1, 1, 1, 7, 2, 2])
  arrays = pipeline.ExampleArrays(history=np.arange(8)[:, None].repeat(2, 1), history_len=np.full(8, 2),
                                  target=np.arange(10, 18), user=users, scenario=np.zeros(8))
  recent = rl_train.select_prompts(arrays, "recent")
  np.testing.assert_array_equal(recent.user, [3, 1, 7, 2])  # reader order kept
  np.testing.assert_array_equal(recent.target, [11, 14, 15, 17])  # each user's last row
  assert rl_train.select_prompts(arrays, "all") is arrays
  with pytest.raises(ValueError, match="unknown prompts"):
    rl_train.select_prompts(arrays, "latest")


def test_recent_prompts_can_take_each_users_last_few_examples():
  from oxyjax.data import pipeline

  users = np.asarray([3, 3, 1, 1, 1, 7, 2, 2, 3])  # user 3's rows are not contiguous
  arrays = pipeline.ExampleArrays(history=np.arange(9)[:, None].repeat(2, 1), history_len=np.full(9, 2),
                                  target=np.arange(10, 19), user=users, scenario=np.zeros(9))
  two = rl_train.select_prompts(arrays, "recent", per_user=2)
  np.testing.assert_array_equal(two.target, [11, 13, 14, 15, 16, 17, 18])  # reader order kept
  one = rl_train.select_prompts(arrays, "recent", per_user=1)
  np.testing.assert_array_equal(one.target, [14, 15, 17, 18])
  assert rl_train.select_prompts(arrays, "recent", per_user=5).target.size == 9
  with pytest.raises(ValueError, match="prompts_per_user"):
    rl_train.select_prompts(arrays, "recent", per_user=0)
