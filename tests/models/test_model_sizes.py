"""Every model size in gin_configs/models/ parses and initialises (shapes only, no compute)."""

import glob
import os

import gin
import jax
import numpy as np
import pytest

from oxyjax.models import encoder_decoder
from oxyjax.models.rec_model import RecModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_FILES = sorted(glob.glob(os.path.join(REPO, "gin_configs", "models", "*.gin")))


def _config(path):
  gin.clear_config()
  gin.parse_config_files_and_bindings([path], [])
  try:
    return gin.get_configurable(encoder_decoder.ModelConfig)()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("path", MODEL_FILES, ids=[os.path.basename(p) for p in MODEL_FILES])
def test_model_size_initialises(path):
  cfg = _config(path)
  codes = np.zeros((12102, 4), np.int32)
  codes[1:] = np.random.default_rng(0).integers(0, [256, 256, 256, 16], (12101, 4))
  model = RecModel(cfg, codes)
  shapes = jax.eval_shape(lambda r: model.init(r, model.dummy_batch(2)), jax.random.key(0))
  n = sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(
      shapes, is_leaf=lambda x: hasattr(x, "value")))
  non_embedding = n - 12102 * cfg.emb_dim - (256 * 3 + 16) * cfg.emb_dim
  name = os.path.basename(path)
  if name == "base_0p1b.gin":  # the paper's 0.1B shape (dense): 4 + 4 layers, hidden 1024
    assert cfg.emb_dim == 1024 and cfg.num_encoder_layers == 4 and cfg.num_decoder_layers == 4
    assert 0.05e9 < non_embedding < 0.15e9, non_embedding
  if name == "peer_tiger.gin":  # BENCHMARKS.md: 15.2M parameters in the peer (its own embeddings)
    assert 10e6 < non_embedding < 20e6, non_embedding
