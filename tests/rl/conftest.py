"""A tiny recommender with two candidate pools, for the post-training tests."""

import jax
import numpy as np
import pytest

from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.models.rec_model import RecModel
from oxyjax.sid.trie import PrefixTrie

VOCAB = (4, 3, 5)
N_ITEMS = 40
CFG = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                  dropout_rate=0.1, max_history=8)


class Tiny:
  def __init__(self):
    rng = np.random.default_rng(0)
    flat = rng.choice(int(np.prod(VOCAB)), size=N_ITEMS, replace=False)
    codes = np.stack(np.unravel_index(flat, VOCAB), axis=1).astype(np.int32)
    self.sid_codes = np.concatenate([np.zeros((1, 3), np.int32), codes])
    self.model = RecModel(CFG, self.sid_codes)
    items = np.arange(1, N_ITEMS + 1)
    self.full = PrefixTrie.from_codes(codes, items, VOCAB)
    self.members = [items[:25], items[22:]]  # two overlapping pools
    self.forest, self.roots = PrefixTrie.forest([self.full.subset(m) for m in self.members])
    params = self.model.init(jax.random.key(0), self.model.dummy_batch(2))
    # Larger output weights than the init's, so that the policy is far from uniform.
    import flax.linen as nn
    params = nn.unbox(params)
    params["output_kernel"] = params["output_kernel"] * 20.0
    self.params = params

  def batch(self, b, seed=0, pools=None):
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, N_ITEMS + 1, (b, CFG.max_history)).astype(np.int32)
    pools = np.arange(b) % 2 if pools is None else np.asarray(pools)
    target = np.asarray([rng.choice(self.members[p]) for p in pools])
    ex = {"history": hist, "target": target, "scenario": np.zeros(b), "pool_root": self.roots[pools]}
    return self.model.convert_features(ex), pools


@pytest.fixture(scope="session")
def tiny():
  return Tiny()
