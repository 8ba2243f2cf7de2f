r"""The ranking model: the reward service of post-training (PAPER.md section 7, "ranking").

A small Transformer that scores (user history, candidate item) pairs, trained on the same
training logs as the policy and used by `oxyjax.rl.train` as the ``ranking`` component of the
unified reward mapping (`rewards.compute`), as ``sigmoid(logit)``: the model's probability that
the user takes the candidate next.

  python -m oxyjax.rl.ranking_model --gin.INIT_MODEL_DIR="'runs/beauty'" --gin.MODEL_DIR="'runs/beauty_ranker'"

Network (`RankerNetwork`): each history behaviour is embedded as in the policy (item-ID
embedding + the sum of its SID-code embeddings + a recency position), encoded by
`num_layers` Transformer encoder layers (the policy's `EncoderLayer`); each candidate (item-ID
+ SID-code embedding + a scenario embedding) attends over the encoded history (target
attention, as in DIN / BST), and an MLP over ``[candidate, attended, candidate * attended,
mean-pooled history]`` gives one logit. The history is encoded once per row and shared by all
of its candidates, so scoring a group of G candidates costs one encoder pass.

Training (pointwise log loss, as CTR rankers are trained): each training example's real next
item is a positive, and ``num_negatives`` items of the example's pool are negatives:
``policy_negatives`` of them are the starting policy's own best candidates for the example (its
top constrained beams, the target excluded: `PolicyCandidates`), the hardest negatives a reward
service meets in post-training, since the policy's samples are what it scores; of the rest, a
fraction ``popularity_negatives`` is drawn by training-set popularity (hard, popular items) and
the others uniformly. Negatives are drawn on the host from ``np.random.default_rng([seed, step])``,
so a resumed run draws the same ones. A negative equal to the target is moved to the next item
of the pool. The loop is the pre-training loop's parts (`trainer.TrainStateFactory`,
`restore_or_init`, `train_loop`, `ProgressHook`, `EvalHook`, `CheckpointHook`, Orbax
`BestCheckpointer` by validation AUC), so a killed run resumes exactly.

Held-out AUC (`evaluate_auc`): for each validation (or test) example, its target against
``eval_negatives`` negatives of its pool drawn with a fixed seed, uniformly (``auc_uniform``)
and by popularity (``auc_popular``, the harder one); AUC = the fraction of (target, negative)
pairs ranked correctly, ties counting one half; and, where the policy is given, against the
policy's top ``eval_negatives`` beams (``auc_policy``: does the ranker prefer the real next item
to what the policy would recommend? A ranker that does not will be gamed by RL). The best
checkpoint is chosen by ``auc``, the mean of the AUCs measured. Test is read once, at the end.

The run directory holds ``ranker.json`` (the network config, the policy artifact's content
digest it was trained for, the held-out AUCs) and ``params/`` (Orbax). `load` refuses a ranker
trained for another artifact (another SID table, item index or pools).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from oxyjax import checkpoints
from oxyjax import cli
from oxyjax import experiment as experiment_lib
from oxyjax import fileio
from oxyjax import partitioning
from oxyjax import trainer as trainer_lib
from oxyjax.artifact import ALL_ITEMS_POOL, ModelArtifact, artifact_dir
from oxyjax.data import pipeline
from oxyjax.evaluation import fixed_subset
from oxyjax.models import instruction
from oxyjax.models import layers
from oxyjax.models.encoder_decoder import EncoderLayer, ModelConfig
from oxyjax.trainer import OptimizerConfig

DEFAULT_GIN_FILE = os.path.join(experiment_lib.REPO_ROOT, "gin_configs", "modes", "ranker.gin")
RANKER_JSON = "ranker.json"


@dataclasses.dataclass(frozen=True)
class RankerConfig:
  """The ranking network's shape and its negatives. Data-dependent sizes come from the policy's artifact."""

  emb_dim: int = 64
  num_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 256
  num_layers: int = 2
  dropout_rate: float = 0.1
  num_negatives: int = 4  # training negatives per positive
  popularity_negatives: float = 0.5  # fraction of the pool-drawn negatives drawn by training popularity
  policy_negatives: int = 0  # of num_negatives, how many are the starting policy's top beams


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
  """Keeping the reward service current during post-training. A frozen ranker is gamed: the
  policy finds items it over-rates (docs/rl.md, session 14). With `updates_per_step` > 0, after
  each rollout the ranking model takes that many optimizer steps of its own log loss on the
  step's prompts (`RankingModel.refresh_batch`): the real target against `policy_negatives` of
  the candidates the policy just produced (best first, the target excluded), the rest of its
  `num_negatives` drawn from the pool as in its training. So the items the policy moves towards
  become the ranker's negatives as the policy moves. The rewards of a step come from the ranker
  before that step's refresh. Its parameters and optimizer state (AdamW, constant
  `learning_rate`) are part of the post-training checkpoint, so a killed run resumes exactly.
  0 (the default): the ranker stays as trained."""

  updates_per_step: int = 0
  learning_rate: float = 1e-4
  weight_decay: float = 0.01
  policy_negatives: int = 2


def _encoder_config(cfg: RankerConfig, policy: ModelConfig) -> ModelConfig:
  """The policy's `ModelConfig` type with the ranker's sizes: the encoder layers are the policy's."""
  return ModelConfig(emb_dim=cfg.emb_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
                     num_encoder_layers=cfg.num_layers, num_decoder_layers=0, dropout_rate=cfg.dropout_rate,
                     max_history=policy.max_history, num_scenarios=policy.num_scenarios,
                     sid_vocab_sizes=policy.sid_vocab_sizes, num_item_embeddings=policy.num_item_embeddings)


class RankerNetwork(nn.Module):
  """``(history features, candidates [B, G], scenario [B]) -> logits [B, G]``; see the module docstring."""

  cfg: ModelConfig  # `_encoder_config`

  def setup(self):
    cfg = self.cfg
    small = nn.initializers.normal(stddev=0.02 * np.sqrt(cfg.emb_dim))
    self.level_offsets = tuple(int(x) for x in np.cumsum((0,) + tuple(cfg.sid_vocab_sizes[:-1])))
    self.item_embed = layers.Embed(cfg.num_item_embeddings, cfg.emb_dim, jnp.float32, small)
    self.sid_embed = layers.Embed(int(sum(cfg.sid_vocab_sizes)), cfg.emb_dim, jnp.float32, small)
    self.position = layers.Embed(cfg.max_history, cfg.emb_dim, jnp.float32, small)
    self.scenario_embed = layers.Embed(cfg.num_scenarios, cfg.emb_dim, jnp.float32, small)
    self.encoder_layers = [EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)]
    self.encoder_norm = layers.RMSNorm()
    self.target_attention = layers.Attention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.dropout_rate)
    self.candidate_norm = layers.RMSNorm()
    self.hidden = instruction.Dense(cfg.mlp_dim, (None, "mlp"))
    self.out = instruction.Dense(1, ("mlp", None))
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def _items(self, items, codes):
    offsets = jnp.asarray(self.level_offsets, jnp.int32)
    return self.item_embed(items % self.cfg.num_item_embeddings) + self.sid_embed(codes + offsets).sum(axis=-2)

  def __call__(self, batch: Mapping[str, jax.Array], candidates: jax.Array, candidate_codes: jax.Array,
               deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    mask = batch["history_mask"]
    x = self._items(batch["history_items"], batch["history_codes"])
    lengths = mask.sum(axis=-1, keepdims=True)
    recency = jnp.clip(lengths - 1 - jnp.arange(mask.shape[-1])[None, :], 0, cfg.max_history - 1)
    x = (x + self.position(recency)) * mask[..., None]
    bias = jnp.where(mask, 0.0, layers.NEG_INF)[:, None, None, :]
    for layer in self.encoder_layers:
      x = layer(x, bias, deterministic)
    h = self.encoder_norm(x)  # [B, S, D]
    pooled = jnp.sum(h * mask[..., None], axis=1) / jnp.maximum(lengths, 1)  # [B, D]
    c = self._items(candidates, candidate_codes) + self.scenario_embed(batch["scenario"])[:, None]  # [B, G, D]
    q = self.candidate_norm(c)[:, :, None]  # [B, G, 1, D]: G queries share the row's history
    att = self.target_attention(q, h, bias, deterministic)[:, :, 0]  # [B, G, D]
    feats = jnp.concatenate([c, att, c * att, jnp.broadcast_to(pooled[:, None], c.shape)], axis=-1)
    z = nn.gelu(self.hidden(feats), approximate=True)
    z = self.dropout(z, deterministic=deterministic)
    return self.out(z)[..., 0]


class RankingModel:
  """The ranker with the interface the trainer's parts take (`init`, `dummy_batch`, `loss_fn`),
  the host-side negative sampling, and `score` for the reward."""

  def __init__(self, config: RankerConfig, policy_config: ModelConfig, sid_codes: np.ndarray,
               pools: Mapping[int, np.ndarray], popularity: np.ndarray | None = None):
    """pools: scenario id -> item indices a candidate of that scenario comes from; popularity
    [N + 1]: training-set counts of each item as a target (row 0 unused), used only to draw
    negatives (None: all equal; scoring never needs it)."""
    if popularity is None:
      popularity = np.zeros(np.asarray(sid_codes).shape[0])
    if not 0.0 <= config.popularity_negatives <= 1.0:
      raise ValueError(f"RankerConfig.popularity_negatives must be in [0, 1], got {config.popularity_negatives}")
    if config.num_negatives < 1:
      raise ValueError(f"RankerConfig.num_negatives must be >= 1, got {config.num_negatives}")
    if not 0 <= config.policy_negatives <= config.num_negatives:
      raise ValueError(f"RankerConfig.policy_negatives must be in [0, num_negatives={config.num_negatives}], "
                       f"got {config.policy_negatives}")
    self.config = config
    self.policy_config = policy_config
    self.network = RankerNetwork(_encoder_config(config, policy_config))
    self.sid_codes = np.asarray(sid_codes, np.int32)
    self.popularity = np.asarray(popularity, np.float64)
    self.pools = {int(k): np.asarray(v, np.int32) for k, v in pools.items()}
    # Per pool: its items and their popularity distribution (add-one, so every item can be drawn).
    self._pool_probs = {k: (self.popularity[v] + 1.0) / (self.popularity[v] + 1.0).sum() for k, v in self.pools.items()}

  # ---------------------------------------------------------------- the trainer's interface
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l, g = self.policy_config.max_history, self.policy_config.num_levels, 1 + self.config.num_negatives
    return {"history_items": np.ones((batch_size, s), np.int32), "history_codes": np.zeros((batch_size, s, l), np.int32),
            "history_mask": np.ones((batch_size, s), bool), "scenario": np.zeros((batch_size,), np.int32),
            "candidates": np.ones((batch_size, g), np.int32), "candidate_codes": np.zeros((batch_size, g, l), np.int32),
            "labels": np.zeros((batch_size, g), np.float32), "weights": np.ones((batch_size,), np.float32)}

  def init(self, rng: jax.Array, batch: Mapping[str, Any]):
    return self.network.init({"params": rng}, batch, batch["candidates"], batch["candidate_codes"])["params"]

  def loss_fn(self, params, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None):
    """Sum of the log loss over (row, candidate) pairs of rows with weight > 0, and its denominator."""
    deterministic = dropout_rng is None
    logits = self.network.apply({"params": params}, batch, batch["candidates"], batch["candidate_codes"],
                                deterministic=deterministic, rngs=None if deterministic else {"dropout": dropout_rng})
    labels = batch["labels"]
    w = jnp.broadcast_to(batch["weights"][:, None], labels.shape)
    # log loss = softplus(z) - y z, stable for any z.
    loss = jax.nn.softplus(logits) - labels * logits
    correct = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
    return jnp.sum(loss * w), {"denominator": jnp.sum(w), "correct": jnp.sum(correct * w)}

  # ---------------------------------------------------------------- data
  def sample_negatives(self, scenario: np.ndarray, target: np.ndarray, num: int, rng: np.random.Generator,
                       popularity_fraction: float) -> np.ndarray:
    """[B, num] items of each row's pool, the first round(num * popularity_fraction) by
    popularity and the rest uniformly; a draw equal to the row's target is moved to the next
    item of the pool (so it is never the positive, as long as the pool has two items)."""
    b = target.shape[0]
    n_pop = int(round(num * popularity_fraction))
    out = np.zeros((b, num), np.int32)
    for sid in np.unique(scenario):
      rows = np.flatnonzero(scenario == sid)
      if int(sid) not in self.pools:
        raise ValueError(f"scenario id {int(sid)} has no candidate pool (known: {sorted(self.pools)})")
      pool, probs = self.pools[int(sid)], self._pool_probs[int(sid)]
      pos = np.concatenate([rng.choice(pool.size, size=(rows.size, n_pop), p=probs),
                            rng.integers(0, pool.size, size=(rows.size, num - n_pop))], axis=1)
      same = pool[pos] == target[rows, None]
      pos = np.where(same, (pos + 1) % pool.size, pos)
      out[rows] = pool[pos]
    return out

  def negatives(self, scenario: np.ndarray, target: np.ndarray, num: int, rng: np.random.Generator,
                popularity_fraction: float, policy_items: np.ndarray | None = None,
                num_policy: int | None = None) -> np.ndarray:
    """[B, num] negatives: the first `num_policy` (default: as many as fit) columns from
    `policy_items` [B, K] (the policy's candidates in its order; the target, empty beams and, for
    a row with fewer than needed, the shortfall are replaced by pool draws), the rest drawn from
    the pool (`sample_negatives`)."""
    drawn = self.sample_negatives(scenario, target, num, rng, popularity_fraction)
    if policy_items is None:
      return drawn
    p = min(num, np.asarray(policy_items).shape[1], num if num_policy is None else num_policy)
    if p <= 0:
      return drawn
    picked, ok = policy_negatives(policy_items, target, p)
    drawn[:, :p] = np.where(ok, picked, drawn[:, :p])
    return drawn

  def make_batch(self, examples: pipeline.ExampleArrays, negatives: np.ndarray,
                 weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Features of `examples` with candidates [target, negatives...] and labels [1, 0, ...]."""
    ex = examples.as_dict() if hasattr(examples, "as_dict") else examples
    hist = np.asarray(ex["history"], np.int32)
    b = hist.shape[0]
    feats = {"history_items": hist, "history_codes": self.sid_codes[hist], "history_mask": hist > 0,
             "scenario": np.asarray(ex.get("scenario", np.zeros(b)), np.int32)}
    return self._labelled(feats, np.asarray(ex["target"], np.int32), negatives,
                          np.ones(b, np.float32) if weights is None else weights)

  def _labelled(self, feats: Mapping[str, np.ndarray], target: np.ndarray, negatives: np.ndarray,
                weights: np.ndarray) -> dict[str, np.ndarray]:
    cands = np.concatenate([np.asarray(target, np.int32)[:, None], negatives], axis=1).astype(np.int32)
    labels = np.zeros(cands.shape, np.float32)
    labels[:, 0] = 1.0
    return {**{k: np.asarray(feats[k]) for k in ("history_items", "history_codes", "history_mask", "scenario")},
            "candidates": cands, "candidate_codes": self.sid_codes[cands], "labels": labels,
            "weights": np.asarray(weights, np.float32)}

  def refresh_batch(self, feats: Mapping[str, np.ndarray], policy_items: np.ndarray, rng: np.random.Generator,
                    policy_negatives: int) -> dict[str, np.ndarray]:
    """The ranker's training batch from a post-training step (`RefreshConfig`): the prompts'
    policy features (host NumPy: history_*, scenario, target_items, weights), each row's real
    target against `policy_negatives` of the candidates the policy just produced for it
    (`policy_items` [B, G] in the policy's order, the target excluded) and the rest of
    `config.num_negatives` drawn from the pool as in the ranker's own training."""
    target = np.asarray(feats["target_items"], np.int32)
    negs = self.negatives(np.asarray(feats["scenario"], np.int32), target, self.config.num_negatives, rng,
                          self.config.popularity_negatives, policy_items, num_policy=policy_negatives)
    return self._labelled(feats, target, negs, feats["weights"])

  # ---------------------------------------------------------------- the reward
  def score(self, params, batch: Mapping[str, jax.Array], items: jax.Array) -> jax.Array:
    """Logits [B, G] of candidate items [B, G] (any index < 1, an empty beam, scores item 0's
    row: the caller masks it) for the policy's feature batch (history_*, scenario). Jittable."""
    items = jnp.maximum(jnp.asarray(items, jnp.int32), 0)
    codes = jnp.asarray(self.sid_codes)[items]
    feats = {k: batch[k] for k in ("history_items", "history_codes", "history_mask", "scenario")}
    return self.network.apply({"params": params}, feats, items, codes, deterministic=True)

  def reward(self, params, batch: Mapping[str, jax.Array], items: jax.Array, target: jax.Array):
    """The ranking reward: ``(sigmoid(logit) of the candidates [B, G], of the real target [B])``,
    in one pass (the history encoded once per row). Jittable."""
    scored = jax.nn.sigmoid(self.score(params, batch, jnp.concatenate([items, target[:, None]], axis=1)))
    return scored[:, :-1], scored[:, -1]


# ====================================================================== building from a policy artifact
def scenario_pools(art: ModelArtifact) -> dict[int, np.ndarray]:
  """scenario id -> the items of its decoder pool (one dataset: scenario 0 -> every item)."""
  if art.scenarios:
    return {int(s["id"]): art.pools[s["name"]] for s in art.scenarios}
  return {0: art.pools[ALL_ITEMS_POOL]}


def build(config: RankerConfig, art: ModelArtifact, train: pipeline.ExampleArrays) -> RankingModel:
  """The ranker for the policy described by `art`, with popularity from its training split."""
  popularity = np.bincount(np.asarray(train.target, np.int64), minlength=art.sid_table.num_items + 1)
  return RankingModel(config, art.model_config, art.sid_table.codes, scenario_pools(art), popularity)


def policy_negatives(items: np.ndarray, target: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` candidates of each row of `items` [B, K] (the policy's order) that are real
  items (> 0) and not the row's target: ``(items [B, num], found [B, num] bool)``."""
  items = np.asarray(items)
  keep = (items > 0) & (items != np.asarray(target)[:, None])
  order = np.argsort(~keep, axis=1, kind="stable")[:, :num]
  return np.take_along_axis(items, order, 1).astype(np.int32), np.take_along_axis(keep, order, 1)


class PolicyCandidates:
  """The starting policy's top `beam_size` items per example (constrained beam search under the
  policy that post-training samples from, `rollout.beam`, over each row's scenario pool):
  ``__call__(examples) -> [B, beam_size]`` in descending policy score (-1 = empty beam). Batches
  are padded to `batch_size` so that one shape is compiled."""

  def __init__(self, exp: experiment_lib.Experiment, params, beam_size: int, batch_size: int):
    from oxyjax.rl import rollout as rollout_lib

    self.exp, self.params, self.beam_size, self.batch_size = exp, params, beam_size, batch_size
    self.forest, self.root_of_scenario = exp.scenario_forest()
    model = exp.model
    with jax.set_mesh(exp.partitioner.mesh), exp.partitioner.rules_context():
      self._fn = jax.jit(lambda p, b, t: rollout_lib.beam(model, p, b, t, group_size=beam_size).items)

  def __call__(self, examples: pipeline.ExampleArrays) -> np.ndarray:
    n = len(examples)
    out = []
    for start in range(0, n, self.batch_size):
      idx = np.arange(start, min(start + self.batch_size, n))
      pad = np.concatenate([idx, np.full(self.batch_size - idx.size, idx[0])])
      batch = self.exp.model.convert_features(examples.take(pad))
      batch["pool_root"] = self.root_of_scenario[np.asarray(batch["scenario"], np.int64)]
      part = self.exp.partitioner
      with jax.set_mesh(part.mesh), part.rules_context():
        items = self._fn(self.params, part.shard_batch(batch), self.forest)
      out.append(np.asarray(jax.device_get(items))[:idx.size])
    return np.concatenate(out)


def auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
  """AUC of positives [B] against their own row's negatives [B, M]: the fraction of pairs ranked
  correctly, ties counting one half."""
  p = np.asarray(scores_pos, np.float64)[:, None]
  n = np.asarray(scores_neg, np.float64)
  return float(np.mean((p > n) + 0.5 * (p == n)))


def evaluate_auc(ranker: RankingModel, params, examples: pipeline.ExampleArrays, *, num_negatives: int = 20,
                 batch_size: int = 256, seed: int = 1234, score_fn=None,
                 policy_items: np.ndarray | None = None) -> dict[str, float]:
  """Held-out AUC of the target against `num_negatives` pool items per row drawn with a fixed
  seed: uniformly (`auc_uniform`) and by popularity (`auc_popular`); with `policy_items`
  ``[N, K]`` (`PolicyCandidates` of `examples`, K > num_negatives), against the policy's top
  `num_negatives` candidates other than the target (`auc_policy`). `auc` is the mean of those
  measured."""
  if score_fn is None:
    score_fn = jax.jit(lambda p, b: ranker.network.apply({"params": p}, b, b["candidates"], b["candidate_codes"]))
  kinds = [("auc_uniform", 0.0, False), ("auc_popular", 1.0, False)]
  if policy_items is not None:
    kinds.append(("auc_policy", 0.0, True))
  out = {}
  for name, frac, use_policy in kinds:
    rng = np.random.default_rng([seed, int(frac)])
    pos, neg = [], []
    for start in range(0, len(examples), batch_size):
      idx = np.arange(start, min(start + batch_size, len(examples)))
      part = examples.take(idx)
      negs = ranker.negatives(part.scenario, part.target, num_negatives, rng, frac,
                              policy_items[idx] if use_policy else None)
      batch = ranker.make_batch(part, negs)
      n = batch["candidates"].shape[0]
      if n < batch_size:  # one compiled shape: pad the last batch
        batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) for k, v in batch.items()}
      logits = np.asarray(score_fn(params, batch))[:n]
      pos.append(logits[:, 0])
      neg.append(logits[:, 1:])
    out[name] = auc(np.concatenate(pos), np.concatenate(neg))
  out["auc"] = float(np.mean([out[k] for k, _, _ in kinds]))
  out["num_examples"] = float(len(examples))
  return out


# ====================================================================== the run
def train_ranker(
    *,
    init_model_dir: str,
    model_dir: str,
    config: RankerConfig = RankerConfig(),
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=100, decay="cosine"),
    num_steps: int = 2000,
    batch_size: int = 256,
    seed: int = 0,
    eval_every_steps: int = 500,
    eval_max_examples: int | None = 4000,
    eval_negatives: int = 20,
    final_eval_max_examples: int | None = None,
    checkpoint_every_steps: int = 500,
    log_every_steps: int = 100,
    stop_after_steps: int | None = None,
    mesh_shape: dict[str, int] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
  """Trains the ranking model for the policy of `init_model_dir` (its artifact: SID table, item
  index, pools, and the data it was built from) into `model_dir`. Validation AUC every
  `eval_every_steps` on a fixed random `eval_max_examples` (the best checkpoint); at the end,
  validation and test in full (or a fixed random `final_eval_max_examples` of each). Returns
  `ranker.json`'s content."""
  t0 = time.time()
  log = print if verbose else (lambda *a, **k: None)
  part = partitioning.Partitioner(mesh_shape)
  art = ModelArtifact.load(artifact_dir(init_model_dir))
  exp = experiment_lib.from_artifact(art, partitioner=part, log=log)
  exp.check_data()
  train = exp.load_split("train")
  ranker = build(config, art, train)
  # The starting policy, whose own candidates are hard negatives (training) and a held-out AUC.
  policy_params, _ = checkpoints.load_params(art.params_dir,
                                             trainer_lib.TrainStateFactory(exp.model, part).params_abstract)
  eval_policy = PolicyCandidates(exp, policy_params, eval_negatives + 1, 256)
  train_policy = (PolicyCandidates(exp, policy_params, config.policy_negatives + 1, batch_size)
                  if config.policy_negatives else None)

  tx, schedule = trainer_lib.make_optimizer(optimizer, num_steps)
  factory = trainer_lib.TrainStateFactory(ranker, part, tx)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), keep=2, save_every_steps=checkpoint_every_steps)
  state, data_state = trainer_lib.restore_or_init(factory, ckpt=ckpt, init_rng=jax.random.key(seed), log=log)
  log(f"[oxyjax] ranking model for {init_model_dir} -> {model_dir}: {factory.num_params / 1e6:.2f}M parameters, "
      f"{config}, {len(train)} training examples, {num_steps} steps of batch {batch_size}")

  it = pipeline.BatchIterator(train, batch_size, seed=seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
  with jax.set_mesh(part.mesh), part.rules_context():
    train_step = jax.jit(trainer_lib.make_train_step(ranker, tx, 1), donate_argnums=(0,))
    score_fn = jax.jit(lambda p, b: ranker.network.apply({"params": p}, b, b["candidates"], b["candidate_codes"]))
  base_rng = jax.random.key(seed + 1)
  step_box = [int(jax.device_get(state["step"]))]

  def host_batch():
    ex = next(it)
    rng = np.random.default_rng([seed, step_box[0]])  # the step's negatives, the same after a resume
    step_box[0] += 1
    beams = train_policy(ex) if train_policy is not None else None
    return ranker.make_batch(ex, ranker.negatives(ex.scenario, ex.target, config.num_negatives, rng,
                                                  config.popularity_negatives, beams))

  def step_fn(state, batch):
    with jax.set_mesh(part.mesh), part.rules_context():
      return train_step(state, part.shard_batch(batch), base_rng)

  valid = fixed_subset(exp.load_split("validation"), eval_max_examples)
  valid_beams = eval_policy(valid)

  def validate(params):
    return evaluate_auc(ranker, params, valid, num_negatives=eval_negatives, score_fn=score_fn,
                        policy_items=valid_beams)

  logger = trainer_lib.ProgressLogger(model_dir if jax.process_index() == 0 else None, num_steps, batch_size,
                                      enabled=verbose and jax.process_index() == 0)
  best = checkpoints.BestCheckpointer(os.path.join(model_dir, "best"), metric="auc", log=log)
  if data_state is not None:
    best.verify(factory.params_abstract)
  eval_hook = trainer_lib.EvalHook(validate, every=eval_every_steps, best=best, logger=logger, metric="auc",
                                   description=f"random {eval_max_examples}, {eval_negatives} negatives", log=log)
  ckpt_hook = trainer_lib.CheckpointHook(ckpt, iterator=it, hooks=[eval_hook])
  hooks = [trainer_lib.ProgressHook(logger, every=log_every_steps, schedule=schedule, log=log), eval_hook, ckpt_hook]
  if data_state is not None:
    ckpt_hook.restore_data_state(data_state)
  state, step, stopped = trainer_lib.train_loop(state, step_fn=step_fn, next_batch=host_batch, start_step=step_box[0],
                                                total_steps=num_steps, hooks=hooks, stop_after_steps=stop_after_steps)
  for h in hooks:
    h.close()
  if stopped:
    ckpt.close(), best.close()
    return {"stopped_at": step}
  params, best_step = state["params"], step
  if best.best_step() is not None:
    params, _ = best.restore(factory.params_abstract)
    best_step = best.best_step()
  ckpt.close(), best.close()
  results = {}
  for split in ("validation", "test"):
    examples = fixed_subset(exp.load_split(split), final_eval_max_examples)
    results[split] = evaluate_auc(ranker, params, examples, num_negatives=eval_negatives, score_fn=score_fn,
                                  policy_items=eval_policy(examples))
  log(f"[oxyjax] ranking model (step {best_step}): " + "; ".join(
      f"{split} AUC uniform {r['auc_uniform']:.4f}, popular {r['auc_popular']:.4f}, policy's candidates "
      f"{r['auc_policy']:.4f}" for split, r in results.items()))
  summary = {"config": dataclasses.asdict(config), "policy_artifact": art.content_digest(),
             "init_model_dir": init_model_dir, "step": int(best_step), "steps": int(step), "results": results,
             "validation_history": eval_hook.history, "train_seconds": time.time() - t0}
  if jax.process_index() == 0:
    checkpoints.save_params(os.path.join(model_dir, "params"), params, {"step": int(best_step)}, log=log)
    write_ranker_json(model_dir, summary)
  return summary


def write_ranker_json(model_dir: str, summary: Mapping[str, Any]) -> None:
  """`ranker.json` of a ranking-model directory, written atomically (`load` reads it)."""
  os.makedirs(model_dir, exist_ok=True)
  fileio.write_json(os.path.join(model_dir, RANKER_JSON), summary, indent=1)


def load(model_dir: str, art: ModelArtifact, partitioner: partitioning.Partitioner):
  """(RankingModel, params, ranker.json) of the ranker in `model_dir`, for the policy of `art`.
  ValueError when it was trained for another artifact (SID table, item index, pools or config)."""
  path = os.path.join(model_dir, RANKER_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no trained ranking model (python -m oxyjax.rl.ranking_model)")
  with open(path) as f:
    meta = json.load(f)
  fields = {f.name for f in dataclasses.fields(RankerConfig)}
  unknown = sorted(set(meta.get("config", {})) - fields)
  if unknown:
    raise ValueError(f"{path}: unknown config field(s) {unknown}")
  if meta.get("policy_artifact") != art.content_digest():
    raise ValueError(f"{path}: this ranking model was trained for the artifact {meta.get('policy_artifact')}, not "
                     f"{art.content_digest()} ({art.directory}): retrain it for this model")
  ranker = RankingModel(RankerConfig(**meta["config"]), art.model_config, art.sid_table.codes, scenario_pools(art))
  factory = trainer_lib.TrainStateFactory(ranker, partitioner)
  params, _ = checkpoints.load_params(os.path.join(model_dir, "params"), factory.params_abstract)
  return ranker, params, meta


def run():
  cli.run_gin_entry(train_ranker, DEFAULT_GIN_FILE, "python -m oxyjax.rl.ranking_model")


if __name__ == "__main__":
  from oxyjax.rl import ranking_model as _module

  _module.run()
