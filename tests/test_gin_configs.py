"""Every experiment and slow-thinking gin file parses, and its bindings build the configs."""

import glob
import os

import gin
import pytest

from oxyjax import train as train_lib
from oxyjax.models.encoder_decoder import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "gin_configs")
FILES = sorted(os.path.relpath(p, CONFIGS) for d in ("experiments", "slow_thinking")
               for p in glob.glob(os.path.join(CONFIGS, d, "*.gin")))


def _parse(rel_path, bindings=()):
  gin.clear_config()
  gin.add_config_file_search_path(CONFIGS)
  # DATASET is set by every experiment file; the slow-thinking rows leave it to the command line.
  required = ["MODEL_DIR = '/tmp/oxyjax_gin_test'"]
  if rel_path.startswith("slow_thinking/"):
    required.append("DATASET = 'office'")
  gin.parse_config_files_and_bindings([os.path.join(CONFIGS, rel_path)], required + list(bindings))


def _value(name):
  """A bound parameter's value, following a macro (`%NAME`) to what it is set to."""
  value = gin.query_parameter(name)
  return gin.query_parameter(str(value)) if str(value).startswith("%") else value


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


def test_the_config_files_are_found():
  assert "experiments/beauty.gin" in FILES and "experiments/sports.gin" in FILES
  assert any(f.startswith("slow_thinking/") for f in FILES)


@pytest.mark.parametrize("rel_path", FILES)
def test_config_file_parses_and_builds(rel_path):
  _parse(rel_path)
  model_cfg = gin.get_configurable(ModelConfig)()
  opt_cfg = gin.get_configurable(train_lib.OptimizerConfig)()
  assert isinstance(model_cfg, ModelConfig) and isinstance(opt_cfg, train_lib.OptimizerConfig)
  assert _value("oxyjax.train.train.dataset") in ("beauty", "sports", "industrial", "office")
  assert _value("oxyjax.train.train.num_epochs") > 0


def test_a_misspelt_binding_is_rejected():
  with pytest.raises(Exception, match="weight_decy"):
    _parse("experiments/beauty.gin", ["oxyjax.train.OptimizerConfig.weight_decy = 0.1"])


def test_command_line_bindings_override_the_experiment_file():
  _parse("experiments/beauty.gin", ["oxyjax.train.OptimizerConfig.weight_decay = 0.5", "NUM_EPOCHS = 2.0"])
  assert gin.get_configurable(train_lib.OptimizerConfig)().weight_decay == 0.5
  assert _value("oxyjax.train.train.num_epochs") == 2.0


def test_rl_mode_parses_and_builds_its_configs():
  """modes/rl.gin: the macros reach the rollout, loss, reward and optimizer configs."""
  from oxyjax.rl import losses, rewards, step
  from oxyjax.rl import train as rl_train  # noqa: F401  (gin names)

  gin.clear_config()
  gin.add_config_file_search_path(CONFIGS)
  gin.parse_config_files_and_bindings([os.path.join(CONFIGS, "modes", "rl.gin")], [
      "INIT_MODEL_DIR = '/tmp/pre'", "MODEL_DIR = '/tmp/rl'", "LOSS = 'gspo'", "GROUP_SIZE = 8",
      "LEARNING_RATE = 3e-5"])
  loss = gin.get_configurable(losses.PolicyLossConfig)()
  roll = gin.get_configurable(step.RolloutConfig)()
  reward = gin.get_configurable(rewards.RewardWeights)()
  opt = gin.get_configurable(train_lib.OptimizerConfig)()
  assert loss.name == "gspo" and loss.name in losses.names() and roll.group_size == 8
  assert reward.ranking == 0.0 and opt.learning_rate == 3e-5 and opt.decay == "constant"


def test_default_configuration_parses_with_each_shipped_dataset():
  for dataset in ("beauty", "sports", "industrial", "office"):
    _parse("defaults/small.gin", [f"DATASET = '{dataset}'"])
    assert _value("oxyjax.train.train.dataset") == dataset
    assert gin.get_configurable(train_lib.OptimizerConfig)().ema_decay > 0
    assert gin.get_configurable(ModelConfig)().emb_dim == 128  # the small model
    sid = gin.get_configurable(train_lib.SIDConfig)()  # the rule's choice since session 29: the RQ-VAE
    assert (sid.quantizer, sid.codebook_size, sid.rqvae_steps) == ("rqvae", 256, None)
    # the rule's choice since session 30: the SASRec second stage, weight 1.5; its union of 10 since session 32
    resc = gin.get_configurable(train_lib.RescoringConfig)()
    assert (resc.enabled, resc.weight, resc.union, resc.sasrec.num_epochs) == (True, 1.5, 10, 40)


def test_ranker_mode_parses_and_rl_mode_takes_the_ranking_model():
  """modes/ranker.gin builds the ranker's configs; rl.gin's RANKING_MODEL_DIR / RANKING_WEIGHT reach
  train_rl and the reward weights."""
  from oxyjax.rl import ranking_model, rewards
  from oxyjax.rl import train as rl_train  # noqa: F401  (gin names)

  gin.clear_config()
  gin.add_config_file_search_path(CONFIGS)
  gin.parse_config_files_and_bindings([os.path.join(CONFIGS, "modes", "ranker.gin")], [
      "INIT_MODEL_DIR = '/tmp/pre'", "MODEL_DIR = '/tmp/ranker'", "NUM_STEPS = 7"])
  cfg = gin.get_configurable(ranking_model.RankerConfig)()
  assert isinstance(cfg, ranking_model.RankerConfig) and cfg.num_negatives >= 1
  assert _value("oxyjax.rl.ranking_model.train_ranker.num_steps") == 7
  gin.clear_config()
  gin.parse_config_files_and_bindings([os.path.join(CONFIGS, "modes", "rl.gin")], [
      "INIT_MODEL_DIR = '/tmp/pre'", "MODEL_DIR = '/tmp/rl'", "RANKING_MODEL_DIR = '/tmp/ranker'",
      "RANKING_WEIGHT = 0.7"])
  assert gin.get_configurable(rewards.RewardWeights)().ranking == 0.7
  assert _value("oxyjax.rl.train.train_rl.ranking_model_dir") == "/tmp/ranker"
