"""Set-up shared by every loop and evaluation: the partitioner, the model artifact, the model,
the decoder's constraint and the split loader, built once and passed down (MaxText's
`setup_train_loop`).

Two ways in:
  * `setup(dataset=..., model_config=..., sid=...)`: a training run. Reads the dataset, gets
    its SID table (built or loaded, keyed by the data's content), and builds the artifact.
  * `setup_scenarios(scenarios=..., ...)`: a multi-scenario run. One `Catalogue` over the
    scenarios' domains (a joint item index and SID space), one seqio task per scenario in one
    mixture, one pool per scenario; all of it passed down in the `Experiment`.
  * `from_artifact(artifact)`: evaluation and serving. Everything comes from the artifact;
    only the split being evaluated is read (and checked against the data fingerprint the
    artifact was built from).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from oxyjax import distributed
from oxyjax import losses
from oxyjax import partitioning
from oxyjax.artifact import ALL_ITEMS_POOL, ModelArtifact
from oxyjax.data import pipeline
from oxyjax.data.catalogue import Catalogue
from oxyjax.data.scenarios import Scenario, ScenarioConfig
from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.sid.trie import PrefixTrie

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_ENCODER = "all-MiniLM-L6-v2"


@dataclasses.dataclass(frozen=True)
class SIDConfig:
  """How the semantic-ID table is obtained: loaded from `path`, or built and cached."""

  path: str | None = None
  num_levels: int = 3
  codebook_size: int = 256
  embedding: str = "auto"  # auto | text | collaborative | sasrec | text+collaborative (oxyjax/sid/build.py)
  balance: str = "residual"  # which k-means levels use balanced assignment: residual | none | all
  # residual k-means (default) | tree: each level fit within its parent node (oxyjax/sid/tree_kmeans.py);
  # codebook_size is then the children per node | rqvae: TIGER's RQ-VAE | letter: the RQ-VAE with
  # LETTER's collaborative and diversity terms (oxyjax/sid/rq_vae.py)
  quantizer: str = "residual"
  rqvae_steps: int | None = None  # rqvae / letter: training steps (None: the quantiser's own, 3,000)
  seed: int = 0
  cache_dir: str | None = None  # default: <repo>/.cache/sid/<dataset>_<data fingerprint>_<settings>
  # Several domains: 'disjoint' code tokens below the domain level (each domain's codes are their
  # own tokens; chosen on validation, docs/multi_scenario.md session 21) or 'shared' (code c of
  # level l is one token in every domain); `Catalogue.joint_sid_codes`.
  joint_codes: str = "disjoint"


@dataclasses.dataclass(frozen=True)
class InstructionsConfig:
  """Reasoning instructions I_r (PAPER.md section 1) read from the near-line store.

  Examples whose instruction is missing, stale (older than `max_age_s`) or a fallback get
  the model's learned default instruction; the counts are logged per split.
  """

  store: str | None = None  # instruction store written by `python -m oxyjax.instructions.generate`
  scenario: str = "homepage"
  max_age_s: float | None = None  # None: never stale
  # Also evaluate each final split on just the examples that carry a generated instruction
  # (reported as '<split>_with_instruction'); works for models that do not read I_r too, so
  # that every ablation row is compared on the same examples.
  evaluate_covered_subset: bool = True


def load_sid_table(dataset: str, cfg: SIDConfig):
  """The SID table of `dataset`: from cfg.path, else built once and cached under a key of the
  data's content and the settings (`sid.build.load_or_build_sid_table`)."""
  from oxyjax.sid import build as sid_build

  return sid_build.load_or_build_sid_table(
      dataset, path=cfg.path, num_levels=cfg.num_levels, codebook_size=cfg.codebook_size, embedding=cfg.embedding,
      balance=cfg.balance, seed=cfg.seed, quantizer=cfg.quantizer, cache_dir=cfg.cache_dir,
      rqvae_steps=cfg.rqvae_steps)


def _open_store(cfg: InstructionsConfig, dataset: str, dim: int | None = None):
  """The store of `cfg` for reading; a clear error (with the command that writes it) when missing."""
  from oxyjax.instructions.store import InstructionStore

  if not os.path.isdir(cfg.store):
    raise FileNotFoundError(f"instruction store {cfg.store!r} does not exist; write it with "
                            f"`python -m oxyjax.instructions.generate --dataset={dataset} --store={cfg.store}`")
  return InstructionStore(cfg.store, dim=dim, create=False) if dim else InstructionStore(cfg.store, create=False)


def _store_lookup(dataset: str, split: str, cfg: InstructionsConfig, dim: int | None = None):
  from oxyjax.data import readers

  store = _open_store(cfg, dataset, dim)
  ds = readers.load_dataset(dataset)
  examples = ds.split(split)
  emb, present, stats = store.lookup_embeddings(ds, examples, scenario=cfg.scenario, now=time.time(),
                                                max_age_s=cfg.max_age_s)
  return len(examples), emb, present, stats


def scenario_instruction_lookup(cfg: InstructionsConfig, instruction_dim: int, log=print):
  """The `scenarios.InstructionLookup` of a multi-scenario run: scenarios of kind `cfg.scenario`
  (homepage) read their domain's generated instructions from the store `cfg.store`, under the
  store's keys for that domain's dataset; other kinds read none. None without a store."""
  if not cfg.store:
    return None
  store = _open_store(cfg, "<domain>", instruction_dim)

  def lookup(scenario_cfg, ds, split, examples):
    if scenario_cfg.kind != cfg.scenario:
      return None
    emb, present, stats = store.lookup_embeddings(ds, examples, scenario=cfg.scenario, now=time.time(),
                                                  max_age_s=cfg.max_age_s)
    log(f"[oxyjax] scenario {scenario_cfg.name} {split}: {int(present.sum())}/{len(examples)} examples carry a "
        f"generated instruction ({stats}); the rest use the learned default")
    return emb, present

  return lookup


def instruction_coverage(dataset: str, split: str, cfg: InstructionsConfig) -> np.ndarray:
  """[N] bool: which examples of `split` have a fresh generated instruction in the store."""
  return _store_lookup(dataset, split, cfg)[2]


def load_instructions(arrays: pipeline.ExampleArrays, dataset: str, split: str, cfg: InstructionsConfig,
                      instruction_dim: int, log=print) -> pipeline.ExampleArrays:
  """Attaches `instruction_embedding` [N, Dr] and `instruction_mask` [N] to a split's arrays.

  Rows follow the reader's order (as `pipeline.load_split` does), so row i is the split's
  i-th example. Without a store every row uses the learned default.
  """
  n = len(arrays)
  if not cfg.store:
    emb, present = np.zeros((n, instruction_dim), np.float32), np.zeros((n,), bool)
    log(f"[oxyjax] {dataset} {split}: no instruction store; all {n} examples use the learned default instruction")
  else:
    n_reader, emb, present, stats = _store_lookup(dataset, split, cfg, instruction_dim)
    if n_reader != n:
      raise ValueError(f"{dataset} {split}: {n_reader} reader examples but {n} rows")
    if emb.shape != (n, instruction_dim):
      raise ValueError(f"instruction store {cfg.store}: embeddings {emb.shape}, model expects [{n}, {instruction_dim}]")
    log(f"[oxyjax] {dataset} {split}: {int(present.sum())}/{n} examples carry a generated instruction "
        f"({stats}); the rest use the learned default")
  return arrays.with_extras(instruction_embedding=np.asarray(emb, np.float32), instruction_mask=np.asarray(present, bool))


def instruction_settings(cfg: InstructionsConfig, instruction_dim: int) -> dict[str, Any]:
  """What the artifact records of the instructions: where they come from and how they are read."""
  return {**dataclasses.asdict(cfg), "instruction_dim": instruction_dim,
          "encoder": TEXT_ENCODER if instruction_dim else None}


@dataclasses.dataclass
class Experiment:
  """One dataset's model, artifact, partitioner and data, shared by training and evaluation."""

  dataset: str
  artifact: ModelArtifact
  model: Any  # RecModel
  partitioner: partitioning.Partitioner
  instructions: InstructionsConfig = InstructionsConfig()
  data_source: str = "seqio"
  log: Callable[..., None] = print
  catalogue: Catalogue | None = None  # multi-scenario runs
  scenarios: list[Scenario] = dataclasses.field(default_factory=list)
  mixture: Any = None  # the seqio.Mixture of the scenarios' tasks (training runs)

  def __post_init__(self):
    self._tries: dict[str, PrefixTrie] = {}

  @property
  def config(self) -> ModelConfig:
    return self.model.config

  def trie(self, pool: str = "all") -> PrefixTrie:
    if pool not in self._tries:
      self._tries[pool] = self.artifact.trie(pool)
    return self._tries[pool]

  def scenario_forest(self) -> tuple[PrefixTrie, np.ndarray]:
    """The decoder's constraint for a batch that may mix scenarios: every scenario's pool in one
    trie, and ``root_of_scenario [num scenario ids]``, each scenario id's root node in it (a
    batch's ``pool_root`` is ``root_of_scenario[batch["scenario"]]``). One dataset: its "all"
    pool, root 0 for every id."""
    if not self.scenarios:
      return self.trie(), np.zeros(self.config.num_scenarios, np.int32)
    forest, roots = self.artifact.pool_forest([s.name for s in self.scenarios])
    root_of_scenario = np.zeros(max(s.id for s in self.scenarios) + 1, np.int32)
    for s in self.scenarios:
      root_of_scenario[s.id] = roots[s.name]
    return forest, root_of_scenario

  def check_data(self) -> None:
    """The data on disk is the data the artifact was built from (item indices would shift otherwise)."""
    from oxyjax.data import readers

    want = self.artifact.data_fingerprint
    if want is None:
      return
    got = (Catalogue.load(self.artifact.domains).fingerprint if self.artifact.domains
           else readers.dataset_fingerprint(self.dataset))
    if got != want:
      raise ValueError(f"dataset {self.dataset!r} in {readers.default_data_dir()} has fingerprint {got}, but the "
                       f"model artifact {self.artifact.directory or ''} was built from data with fingerprint {want}: "
                       "its item index does not fit this data")

  def eval_sets(self, split: str) -> dict[str, tuple[pipeline.ExampleArrays, str]]:
    """What an evaluation of `split` scores: name -> (examples, decoder pool). One dataset:
    {split: (all its examples, 'all')}; scenarios: {'<split>/<scenario>': (its examples, its pool)}."""
    if not self.scenarios:
      return {split: (self.load_split(split), ALL_ITEMS_POOL)}
    return {f"{split}/{s.name}": (s.splits[split], s.name) for s in self.scenarios}

  def load_split(self, split: str) -> pipeline.ExampleArrays:
    """A split's examples (with their instructions when the model reads I_r); with scenarios,
    every scenario's examples of the split."""
    if self.scenarios:
      return pipeline.ExampleArrays.concatenate([s.splits[split] for s in self.scenarios])
    arrays = pipeline.load_split(self.dataset, split, self.config.max_history, source=self.data_source)
    if self.config.instruction_dim:
      arrays = load_instructions(arrays, self.dataset, split, self.instructions, self.config.instruction_dim, self.log)
    return arrays


def setup(*, dataset: str, model_config: ModelConfig, sid: SIDConfig, instructions: InstructionsConfig,
          partitioner: partitioning.Partitioner, label_smoothing: float = 0.0,
          q2i: losses.Q2IConfig = losses.Q2IConfig(), data_source: str = "seqio", log=print) -> Experiment:
  """A training run's experiment: SID table, item text, model and artifact from the dataset."""
  from oxyjax.data import readers
  from oxyjax.sid import build as sid_build
  from oxyjax.models.rec_model import RecModel

  ds = readers.load_dataset(dataset)
  table = load_sid_table(dataset, sid)
  distributed.assert_same_across_hosts(distributed.checksum(table.codes), "SID table codes checksum")
  text = sid_build.item_text_embeddings(dataset) if model_config.text_dim else None
  model = RecModel(model_config, table.codes, label_smoothing=label_smoothing, item_text_embeddings=text, q2i=q2i)
  artifact = ModelArtifact.from_dataset(
      ds, table, model.config, data_fingerprint=readers.dataset_fingerprint(dataset),
      sid_settings={k: v for k, v in dataclasses.asdict(sid).items() if k != "cache_dir"},
      instructions=instruction_settings(instructions, model.config.instruction_dim), item_text_embeddings=text)
  return Experiment(ds.name, artifact, model, partitioner, instructions, data_source, log)


def from_artifact(artifact: ModelArtifact, *, partitioner: partitioning.Partitioner,
                  instructions: InstructionsConfig | None = None, data_source: str = "seqio",
                  read_data: bool = True, log=print) -> Experiment:
  """An evaluation's experiment: the model and its constraint from the artifact alone.
  `instructions` defaults to the settings the artifact was trained with. A multi-scenario
  artifact's scenario examples are read from the data (checked against its fingerprint) unless
  `read_data` is False (serving: the artifact alone)."""
  if instructions is None:
    fields = {f.name for f in dataclasses.fields(InstructionsConfig)}
    instructions = InstructionsConfig(**{k: v for k, v in artifact.instructions.items() if k in fields})
  if artifact.scenarios and read_data:
    catalogue, built = scenarios_from_artifact(artifact, instructions, log=log)
    return Experiment(artifact.dataset, artifact, artifact.make_model(), partitioner, instructions, data_source, log,
                      catalogue=catalogue, scenarios=built)
  return Experiment(artifact.dataset, artifact, artifact.make_model(), partitioner, instructions, data_source, log)


def _scenario_dicts(scenarios: list[Scenario]) -> list[dict[str, Any]]:
  return [{"id": s.id, **dataclasses.asdict(s.config)} for s in scenarios]


def joint_sid_table(catalogue: Catalogue, sid: SIDConfig):
  """The catalogue's SID table: each domain's own (content-keyed) table, joined under a leading
  domain level (`Catalogue.joint_sid_codes`)."""
  from oxyjax.sid.table import SIDTable

  if sid.path:
    raise ValueError("SIDConfig.path names one dataset's table; a multi-domain catalogue builds each domain's")
  if sid.joint_codes not in ("shared", "disjoint"):
    raise ValueError(f"SIDConfig.joint_codes must be 'shared' or 'disjoint', got {sid.joint_codes!r}")
  tables = [load_sid_table(d, sid) for d in catalogue.domains]
  if len(tables) == 1:
    return tables[0]
  levels = range(tables[0].num_levels)
  if sid.joint_codes == "disjoint":
    codes = catalogue.joint_sid_codes([t.codes for t in tables], [t.codebook_sizes for t in tables])
    sizes = [len(tables)] + [sum(t.codebook_sizes[l] for t in tables) for l in levels]
  else:
    codes = catalogue.joint_sid_codes([t.codes for t in tables])
    sizes = [len(tables)] + [max(t.codebook_sizes[l] for t in tables) for l in levels]
  return SIDTable(codes=codes, codebook_sizes=tuple(sizes),
                  meta={"joint": f"domain level + per-domain tables, {sid.joint_codes} code tokens",
                        "domains": list(catalogue.domains), "domain_tables": [t.meta for t in tables]})


def _text_embeddings(catalogue: Catalogue) -> np.ndarray:
  """[N + 1, 384] frozen item text embeddings over the catalogue (zeros for items without text)."""
  from oxyjax.sid import build as sid_build

  out = None
  for d, ds in enumerate(catalogue.datasets):
    if ds.item_meta is None:
      continue
    e = sid_build.item_text_embeddings(ds.name)
    if out is None:
      out = np.zeros((catalogue.num_items + 1, e.shape[1]), np.float32)
    out[catalogue.offsets[d] + 1: catalogue.offsets[d + 1] + 1] = e[1:]
  if out is None:
    raise ValueError(f"text_dim > 0 needs item text, and no domain of {list(catalogue.domains)} has any")
  return out


def _mixture_name(catalogue: Catalogue) -> str:
  return "oxyjax_mixture_" + catalogue.fingerprint[:10]


def setup_scenarios(*, scenarios: Sequence[ScenarioConfig], model_config: ModelConfig, sid: SIDConfig,
                    partitioner: partitioning.Partitioner, label_smoothing: float = 0.0,
                    q2i: losses.Q2IConfig = losses.Q2IConfig(),
                    instructions: InstructionsConfig = InstructionsConfig(), log=print) -> Experiment:
  """A multi-scenario training run's experiment (see the module docstring). With an instruction
  store, the homepage scenarios read their generated reasoning instructions from it
  (`scenario_instruction_lookup`); search reads its query as I_r either way."""
  from oxyjax.data import scenario_tasks
  from oxyjax.data import scenarios as scenarios_lib
  from oxyjax.models.rec_model import RecModel

  if not scenarios:
    raise ValueError("setup_scenarios needs at least one ScenarioConfig")
  domains = list(dict.fromkeys(c.domain for c in scenarios))
  catalogue = Catalogue.load(domains)
  table = joint_sid_table(catalogue, sid)
  distributed.assert_same_across_hosts(distributed.checksum(table.codes), "SID table codes checksum")
  model_config = dataclasses.replace(model_config, num_scenarios=len(scenarios), scenario_triggers=True)
  if instructions.store and not model_config.instruction_dim:
    raise ValueError("an instruction store is set, but the model reads no I_r: set ModelConfig.instruction_dim")
  built = scenarios_lib.build_scenarios(
      catalogue, scenarios, max_history=model_config.max_history, instruction_dim=model_config.instruction_dim,
      instruction_lookup=scenario_instruction_lookup(instructions, model_config.instruction_dim, log))
  for s in built:
    log(f"[oxyjax] scenario {s.id} {s.name} ({s.config.kind}, {s.config.domain}, rate {s.config.rate}): "
        + ", ".join(f"{k} {len(v)}" for k, v in s.splits.items())
        + (f"; skipped (no query) {s.skipped}" if any(s.skipped.values()) else ""))
  mixture = scenario_tasks.register_mixture(catalogue, built, _mixture_name(catalogue))
  text = _text_embeddings(catalogue) if model_config.text_dim else None
  model = RecModel(model_config, table.codes, label_smoothing=label_smoothing, item_text_embeddings=text, q2i=q2i)
  pools = {ALL_ITEMS_POOL: np.arange(1, catalogue.num_items + 1, dtype=np.int32), **{s.name: s.pool for s in built}}
  artifact = ModelArtifact.from_dataset(
      catalogue.as_dataset(), table, model.config, data_fingerprint=catalogue.fingerprint,
      sid_settings={k: v for k, v in dataclasses.asdict(sid).items() if k != "cache_dir"},
      instructions=instruction_settings(instructions, model.config.instruction_dim), item_text_embeddings=text)
  artifact.pools, artifact.domains, artifact.scenarios = pools, domains, _scenario_dicts(built)
  artifact.__post_init__()
  return Experiment(catalogue.name, artifact, model, partitioner, instructions, "seqio", log,
                    catalogue=catalogue, scenarios=built, mixture=mixture)


def scenarios_from_artifact(artifact: ModelArtifact, instructions: InstructionsConfig | None = None,
                            log=print) -> tuple[Catalogue, list[Scenario]]:
  """The catalogue (read now, checked against the artifact's fingerprint) and the scenarios'
  examples of a multi-scenario artifact, with the generated instructions of `instructions`'s store
  (default: none)."""
  from oxyjax.data import scenarios as scenarios_lib

  catalogue = Catalogue.load(artifact.domains)
  if artifact.data_fingerprint and catalogue.fingerprint != artifact.data_fingerprint:
    raise ValueError(f"the data of {artifact.domains} has fingerprint {catalogue.fingerprint}, but the model artifact "
                     f"{artifact.directory or ''} was built from {artifact.data_fingerprint}")
  fields = {f.name for f in dataclasses.fields(ScenarioConfig)}
  configs = [ScenarioConfig(**{k: v for k, v in sc.items() if k in fields}) for sc in artifact.scenarios]
  cfg = artifact.model_config
  lookup = scenario_instruction_lookup(instructions, cfg.instruction_dim, log) if instructions else None
  return catalogue, scenarios_lib.build_scenarios(catalogue, configs, max_history=cfg.max_history,
                                                  instruction_dim=cfg.instruction_dim, instruction_lookup=lookup)
