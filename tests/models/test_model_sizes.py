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


# ---------------------------------------------------------------------- the paper's sizes
# PAPER.md section 1: label -> (encoder layers, decoder layers, hidden, FFN, experts, active).
PAPER_SIZES = {
    "oxygen_0p1b.gin": (0.1e9, 4, 4, 1024, 512, 2, 1),
    "oxygen_0p4b.gin": (0.4e9, 4, 6, 2048, 1024, 4, 2),
    "oxygen_0p7b.gin": (0.7e9, 4, 8, 2048, 1024, 8, 2),
    "oxygen_1p5b.gin": (1.5e9, 4, 8, 2048, 1024, 24, 2),
    "oxygen_3b.gin": (3.0e9, 4, 16, 2048, 1024, 24, 2),
}
# Catalogue assumed for the counts: the production SID vocabulary, 3 levels x 8192 codes
# (PAPER.md section 2), and the item-ID table EXCLUDED (it grows with the catalogue:
# N_items x hidden, e.g. 2.05B parameters per million items at hidden 2048).
SID_LEVELS, SID_CODES = 3, 8192
# Counts (total / active, item-ID table excluded) computed here with jax.eval_shape:
#   0.1B: 0.126B / 0.113B   0.4B: 0.621B / 0.495B   0.7B: 1.041B / 0.588B
#   1.5B: 2.249B / 0.588B   3B:   3.726B / 0.958B
# Tolerance: total / label in [0.9, 1.6]. The experts are gated (3 hidden x FFN matrices, like
# MlpBlock); the paper's labels fit a plain 2-matrix FFN (then 0.12 / 0.54 / 0.84 / 1.64 / 2.72B),
# so the gated totals sit 1.2-1.5x above the label for the same hidden/FFN/expert numbers.
TOTAL_OVER_LABEL = (0.9, 1.6)


def _analytic_counts(cfg):
  """(layer-stack parameters, total expert weights) from the architecture alone."""
  d, e = cfg.emb_dim, cfg.num_experts
  attn = 4 * d * cfg.num_heads * cfg.head_dim
  ffn = e * 3 * d * cfg.mlp_dim + d * e if e else 3 * d * cfg.mlp_dim
  enc = attn + ffn + 2 * d
  dec = 2 * attn + ffn + 3 * d
  layers = cfg.num_encoder_layers * enc + cfg.num_decoder_layers * dec
  experts = (cfg.num_encoder_layers + cfg.num_decoder_layers) * e * 3 * d * cfg.mlp_dim
  return layers, experts


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_size_parameter_counts(name):
  label, n_enc, n_dec, hidden, ffn, experts, active_experts = PAPER_SIZES[name]
  cfg = _config(os.path.join(REPO, "gin_configs", "models", name))
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.emb_dim, cfg.mlp_dim, cfg.num_experts,
          cfg.num_experts_per_token) == (n_enc, n_dec, hidden, ffn, experts, active_experts)
  assert cfg.num_heads * cfg.head_dim == hidden
  codes = np.zeros((1001, SID_LEVELS), np.int32)
  codes[1:] = SID_CODES - 1
  model = RecModel(cfg, codes)
  shapes = jax.eval_shape(lambda r: model.init(r, model.dummy_batch(2)), jax.random.key(0))
  counts = {jax.tree_util.keystr(path): int(np.prod(x.value.shape)) for path, x in
            jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: hasattr(x, "value"))[0]}
  item_table = sum(v for k, v in counts.items() if "item_embed" in k)
  total = sum(counts.values()) - item_table
  layer_params = sum(v for k, v in counts.items() if "_layers_" in k)
  expert_params = sum(v for k, v in counts.items() if "'mlp'" in k and ("'wi'" in k or "'wo'" in k))
  want_layers, want_experts = _analytic_counts(cfg)
  assert layer_params == want_layers and expert_params == want_experts
  active = total - expert_params * (experts - active_experts) // experts
  lo, hi = TOTAL_OVER_LABEL
  assert lo * label <= total <= hi * label, (name, total / 1e9)
  assert active <= total and (active < total) == (active_experts < experts)
