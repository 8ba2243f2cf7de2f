"""The model artifact: everything a trained model needs to answer, in one directory.

A run writes `<model_dir>/artifact/` when it starts (and checks it when it resumes); the
weights the final evaluation used are added under `params/` when training ends. Evaluation
(`train(eval_only=True)`), `python -m oxyjax.predict` and, later, serving load a model from
this directory alone: no training split, no optimizer state, no `.cache/`, no data files.

Contents (format `oxyjax.model_artifact`, version `ARTIFACT_VERSION`):

  artifact.json        format, version, the resolved `ModelConfig`, the dataset name and the
                       fingerprint of its raw files, the SID settings, the instruction
                       settings, the pool names, a content digest of everything below
  sid_table.{npz,json} the `SIDTable` (codes [N + 1, L]; row 0 = padding)
  items.json           the item index: raw ids by index (index 0 = padding, ""), and titles
                       where the data has them (else null)
  pools.npz            the decoder's candidate pools: name -> sorted item indices
                       (`all` = every item; a multi-scenario model has one per scenario, named as it)
  item_text.npy        [N + 1, Dt] frozen item text embeddings, when the model reads them
  (artifact.json)      version 2: `domains` (the catalogue's datasets; raw ids are then
                       '<domain>/<raw id>') and `scenarios` (name, id, kind, domain, ...)
  params/              Orbax checkpoint of the evaluation weights (EMA when trained with it)

Versioning: `version` is bumped when a field changes meaning or a file is added that a
reader must have; a reader refuses a newer version with a message naming the file. Unknown
`ModelConfig` fields (a newer writer) are an error, missing ones (an older writer) take
their defaults.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from oxyjax.models.encoder_decoder import ModelConfig
from oxyjax.sid.table import SIDTable
from oxyjax.sid.trie import PrefixTrie

ARTIFACT_FORMAT = "oxyjax.model_artifact"
ARTIFACT_VERSION = 2  # 2: multi-scenario fields (domains, scenarios); version-1 artifacts read as one scenario
ALL_ITEMS_POOL = "all"


class ArtifactError(ValueError):
  """A missing, unreadable or inconsistent model artifact (the message names the file)."""


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(d: Mapping[str, Any], where: str = "artifact.json") -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ArtifactError(f"{where}: model_config has fields this oxyjax does not know: {unknown} "
                        "(written by a newer version?)")
  d = dict(d)
  if d.get("sid_vocab_sizes") is not None:
    d["sid_vocab_sizes"] = tuple(int(x) for x in d["sid_vocab_sizes"])
  return ModelConfig(**d)


def _digest(*parts: bytes) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(hashlib.sha256(p).digest())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class ModelArtifact:
  """A trained (or training) model's self-contained description; see the module docstring."""

  model_config: ModelConfig  # resolved: sid_vocab_sizes and num_item_embeddings filled
  sid_table: SIDTable
  raw_item_ids: list[str]  # index -> raw id; [0] = "" (padding)
  item_titles: list[str] | None = None  # index -> title, where the data has text
  pools: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  dataset: str = ""
  data_fingerprint: str | None = None
  sid_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  instructions: dict[str, Any] = dataclasses.field(default_factory=dict)
  item_text_embeddings: np.ndarray | None = None
  directory: str | None = None  # where it was loaded from / saved to
  # Multi-scenario models: the catalogue's domains (data_fingerprint is then the catalogue's) and
  # the scenarios (ScenarioConfig fields + 'id'), each decoding over the pool of its name.
  domains: list[str] = dataclasses.field(default_factory=list)
  scenarios: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  # ModelConfig fields that the loaded artifact.json did not hold (it was written before they
  # existed): they take their defaults, and while they do they stay out of the digest and of a
  # rewritten header, so an artifact keeps its content digest across oxyjax versions.
  absent_config_fields: tuple[str, ...] = dataclasses.field(default=(), repr=False, compare=False)

  def __post_init__(self):
    n = self.sid_table.num_items
    if len(self.raw_item_ids) != n + 1:
      raise ArtifactError(f"{len(self.raw_item_ids) - 1} raw item ids for a SID table of {n} items")
    if self.item_titles is not None and len(self.item_titles) != n + 1:
      raise ArtifactError(f"{len(self.item_titles) - 1} item titles for {n} items")
    if not self.pools:
      self.pools = {ALL_ITEMS_POOL: np.arange(1, n + 1, dtype=np.int32)}
    for name, pool in self.pools.items():
      pool = np.asarray(pool, np.int32)
      if pool.size and (pool.min() < 1 or pool.max() > n):
        raise ArtifactError(f"pool {name!r} holds item indices outside 1..{n}")
      self.pools[name] = np.unique(pool)
    for sc in self.scenarios:
      if sc.get("name") not in self.pools:
        raise ArtifactError(f"scenario {sc.get('name')!r} has no pool")
    self._index = None

  # ---------------------------------------------------------------- building
  @classmethod
  def from_dataset(cls, ds, table: SIDTable, model_config: ModelConfig, *, data_fingerprint: str | None,
                   sid_settings: Mapping[str, Any] | None = None, instructions: Mapping[str, Any] | None = None,
                   item_text_embeddings: np.ndarray | None = None) -> "ModelArtifact":
    """From a `readers.SequenceDataset` and its SID table (the training run's set-up)."""
    if table.num_items != ds.num_items:
      raise ArtifactError(f"SID table has {table.num_items:,} items but dataset {ds.name!r} has {ds.num_items:,}")
    titles = None
    if ds.item_meta is not None:
      titles = [""] + [(m.title if m else "") for m in ds.item_meta[1:]]
    return cls(model_config=model_config, sid_table=table, raw_item_ids=list(ds.raw_item_ids), item_titles=titles,
               dataset=ds.name, data_fingerprint=data_fingerprint, sid_settings=dict(sid_settings or {}),
               instructions=dict(instructions or {}), item_text_embeddings=item_text_embeddings)

  def make_model(self, **kwargs):
    """The `RecModel` this artifact describes (kwargs: training-only options such as
    label_smoothing, q2i)."""
    from oxyjax.models.rec_model import RecModel

    return RecModel(self.model_config, self.sid_table.codes, item_text_embeddings=self.item_text_embeddings,
                    **kwargs)

  def trie(self, pool: str = ALL_ITEMS_POOL) -> PrefixTrie:
    """The decoder's constraint: the SID paths of the pool's items."""
    if pool not in self.pools:
      raise ArtifactError(f"{self._where('pools.npz')}: no pool {pool!r} (has {sorted(self.pools)})")
    items = self.pools[pool]
    # One vocabulary per level for every pool (the model's), so pools can share a forest and
    # a compiled search.
    vocab = self.model_config.sid_vocab_sizes or tuple(int(v) for v in self.sid_table.codes[1:].max(axis=0) + 1)
    return PrefixTrie.from_codes(self.sid_table.codes[items], items, vocab)

  def pool_forest(self, names: Sequence[str]) -> tuple[PrefixTrie, dict[str, int]]:
    """The named pools in one trie (`PrefixTrie.forest`) and each pool's root node: a batch
    whose rows carry `pool_root` = their pool's root decodes every row over its own pool."""
    forest, roots = PrefixTrie.forest([self.trie(n) for n in names])
    return forest, {n: int(r) for n, r in zip(names, roots)}

  @property
  def num_items(self) -> int:
    return self.sid_table.num_items

  def item_indices(self, raw_ids: Sequence[str]) -> np.ndarray:
    """Raw item ids -> indices; an unknown id raises KeyError naming it."""
    if self._index is None:
      self._index = {r: i for i, r in enumerate(self.raw_item_ids) if i}
    out = []
    for r in raw_ids:
      if r not in self._index:
        raise KeyError(f"unknown item id {r!r}: not in the artifact's item index ({self.num_items:,} items of "
                       f"{self.dataset!r})")
      out.append(self._index[r])
    return np.asarray(out, np.int32)

  def title(self, index: int) -> str | None:
    return self.item_titles[index] or None if self.item_titles is not None else None

  # ---------------------------------------------------------------- identity
  def config_record(self) -> dict[str, Any]:
    """The model config as artifact.json holds it: every field, less `absent_config_fields` that
    are still at their defaults."""
    d = config_to_dict(self.model_config)
    if not self.absent_config_fields:
      return d
    default = config_to_dict(ModelConfig())
    return {k: v for k, v in d.items() if not (k in self.absent_config_fields and v == default[k])}

  def content_digest(self) -> str:
    """Digest of what decides the model's inputs and outputs (config, SIDs, items, pools)."""
    parts = [json.dumps(self.config_record(), sort_keys=True).encode(),
             np.ascontiguousarray(self.sid_table.codes).tobytes(),
             "\n".join(self.raw_item_ids).encode()]
    parts += [name.encode() + np.ascontiguousarray(self.pools[name]).tobytes() for name in sorted(self.pools)]
    if self.item_text_embeddings is not None:
      parts.append(np.ascontiguousarray(self.item_text_embeddings, np.float32).tobytes())
    if self.scenarios or self.domains:
      parts.append(json.dumps({"domains": self.domains, "scenarios": self.scenarios}, sort_keys=True).encode())
    return _digest(*parts)

  def differences(self, other: "ModelArtifact") -> list[str]:
    """Names of the parts that differ between two artifacts (empty when they describe the same model)."""
    out = []
    a, b = config_to_dict(self.model_config), config_to_dict(other.model_config)
    out += [f"model_config.{k} ({b.get(k)!r} -> {a.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not np.array_equal(self.sid_table.codes, other.sid_table.codes):
      out.append(f"sid_table ({other.sid_table.num_items:,} -> {self.sid_table.num_items:,} items, or other codes)")
    if self.raw_item_ids != other.raw_item_ids:
      out.append("item index (raw ids)")
    if self.data_fingerprint != other.data_fingerprint:
      out.append(f"data_fingerprint ({other.data_fingerprint} -> {self.data_fingerprint})")
    if set(self.pools) != set(other.pools) or any(not np.array_equal(self.pools[k], other.pools[k]) for k in self.pools):
      out.append("pools")
    if self.scenarios != other.scenarios or self.domains != other.domains:
      out.append("scenarios")
    return out

  # ---------------------------------------------------------------- files
  def _where(self, name: str) -> str:
    return os.path.join(self.directory, name) if self.directory else name

  @property
  def params_dir(self) -> str:
    if not self.directory:
      raise ArtifactError("this artifact has not been saved: it has no params directory")
    return os.path.join(self.directory, "params")

  def save(self, directory: str, *, keep_params: bool = True) -> str | None:
    """Writes the artifact (all but `params/`) into `directory`, atomically: the files go to a
    temporary sibling directory that replaces `directory` only when complete. A `params/`
    already there is kept with `keep_params` (the same model); without it (another model) the
    old artifact, weights included, is moved aside to `<directory>.replaced-<UTC time>`, never
    deleted, and that path is returned."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
      self.sid_table.save(os.path.join(tmp, "sid_table"))
      with open(os.path.join(tmp, "items.json"), "w") as f:
        json.dump({"raw_item_ids": self.raw_item_ids, "titles": self.item_titles}, f)
      np.savez(os.path.join(tmp, "pools.npz"), **self.pools)
      if self.item_text_embeddings is not None:
        np.save(os.path.join(tmp, "item_text.npy"), np.asarray(self.item_text_embeddings, np.float32))
      header = {
          "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "dataset": self.dataset,
          "data_fingerprint": self.data_fingerprint, "model_config": self.config_record(),
          "num_items": self.num_items, "sid": self.sid_settings, "instructions": self.instructions,
          "pools": sorted(self.pools), "has_item_text": self.item_text_embeddings is not None,
          "domains": self.domains, "scenarios": self.scenarios,
          "content_digest": self.content_digest(),
      }
      with open(os.path.join(tmp, "artifact.json"), "w") as f:
        json.dump(header, f, indent=1, sort_keys=True)
      old_params = os.path.join(directory, "params")
      replaced = None
      if keep_params and os.path.isdir(old_params):
        os.rename(old_params, os.path.join(tmp, "params"))
      if os.path.isdir(directory) and not keep_params:  # another model's artifact: kept aside
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        replaced = f"{directory}.replaced-{stamp}"
        os.rename(directory, replaced)
        os.rename(tmp, directory)
      elif os.path.isdir(directory):  # set the old metadata aside, move the new one in, drop the old
        aside = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old-", dir=parent)
        os.rename(directory, os.path.join(aside, "a"))
        os.rename(tmp, directory)
        shutil.rmtree(aside, ignore_errors=True)
      else:
        os.rename(tmp, directory)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    self.directory = directory
    return replaced

  @classmethod
  def load(cls, directory: str) -> "ModelArtifact":
    """Reads an artifact written by `save`; raises ArtifactError naming the missing or bad file."""
    directory = os.path.abspath(directory)
    header_path = os.path.join(directory, "artifact.json")
    if not os.path.isfile(header_path):
      raise ArtifactError(f"no model artifact at {directory} ({header_path} is missing)")
    try:
      with open(header_path) as f:
        header = json.load(f)
      if header.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"format {header.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
      if not isinstance(header.get("version"), int) or header["version"] > ARTIFACT_VERSION:
        raise ValueError(f"version {header.get('version')!r}; this oxyjax reads versions <= {ARTIFACT_VERSION}")
      cfg = config_from_dict(header["model_config"], header_path)
    except ArtifactError:
      raise
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ArtifactError(f"{header_path}: {e}") from None
    table = SIDTable.load(os.path.join(directory, "sid_table"))  # SIDTableError names its file
    items_path = os.path.join(directory, "items.json")
    try:
      with open(items_path) as f:
        items = json.load(f)
      raw_ids, titles = list(items["raw_item_ids"]), items.get("titles")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ArtifactError(f"{items_path}: {e}") from None
    pools_path = os.path.join(directory, "pools.npz")
    try:
      with np.load(pools_path, allow_pickle=False) as z:
        pools = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
      raise ArtifactError(f"{pools_path}: {e}") from None
    text = None
    if header.get("has_item_text"):
      text_path = os.path.join(directory, "item_text.npy")
      try:
        text = np.load(text_path, allow_pickle=False)
      except (OSError, ValueError) as e:
        raise ArtifactError(f"{text_path}: {e}") from None
    try:
      art = cls(model_config=cfg, sid_table=table, raw_item_ids=raw_ids, item_titles=titles, pools=pools,
                dataset=header.get("dataset", ""), data_fingerprint=header.get("data_fingerprint"),
                sid_settings=header.get("sid", {}), instructions=header.get("instructions", {}),
                item_text_embeddings=text, directory=directory, domains=list(header.get("domains") or []),
                scenarios=list(header.get("scenarios") or []),
                absent_config_fields=tuple(sorted({f.name for f in dataclasses.fields(ModelConfig)}
                                                  - set(header["model_config"]))))
    except ArtifactError as e:
      raise ArtifactError(f"{directory}: {e}") from None
    if header.get("content_digest") and header["content_digest"] != art.content_digest():
      raise ArtifactError(f"{directory}: the files do not match artifact.json's content digest "
                          "(a partial copy or files from different runs)")
    return art


def artifact_dir(model_dir: str) -> str:
  return os.path.join(model_dir, "artifact")
