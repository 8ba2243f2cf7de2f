"""One item space over one or more catalogues (datasets), built once per run and passed down.

A `Catalogue` joins the datasets (domains) of a multi-scenario run into one index:

* items: domain ``d``'s item ``i`` (its own index ``1..n_d``) is joint item
  ``offsets[d] + i``; index 0 is padding. Raw ids are ``"<domain>/<raw id>"`` when the
  catalogue has several domains (item ``5`` of Office is not item ``5`` of Industrial), the
  dataset's own raw ids when it has one;
* users: domain ``d``'s user ``u`` is joint user ``user_offsets[d] + u`` (users of different
  datasets are different people as far as the data says);
* text: `item_meta` (title, brand, categories, description) where the domain has it, else
  ``None`` per item; `domain_of` [N + 1] gives each item's domain (-1 at padding).

The SID space over several domains (`joint_sid_codes`): every domain's table is built from
that domain's own item embeddings (text for the 2018 data, interaction PPMI-SVD for the
2014 data; `sid.build.load_or_build_sid_table`, content-keyed), and the joint path is
``(domain, domain's path ...)``. Embeddings from different sources live in different spaces
whose distances are not comparable (a cosine between a MiniLM text vector and a PPMI-SVD
vector means nothing), so they are never quantised together; the leading domain code makes
every joint path unique and lets the decoder's first step pick the catalogue. Below the domain
level the code *tokens* are either shared between domains (code ``c`` of level ``l`` is one
token in every domain, so one embedding and one output row serve unrelated clusters of different
catalogues; levels whose codebooks differ in size take the largest size) or disjoint (each
domain's codes of a level are offset past the previous domains', so no token means two things;
the level's vocabulary is the sum of the domains' codebooks): `SIDConfig.joint_codes`. A
one-domain catalogue has no domain level: its table is the dataset's own (single-dataset runs
are unchanged).

`fingerprint` (of the domains' names and raw-data fingerprints, `readers.dataset_fingerprint`)
keys everything built from a catalogue.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Sequence

import numpy as np

from oxyjax.data import readers

__all__ = ["Catalogue", "CatalogueError"]


class CatalogueError(ValueError):
  """A raw item id, domain or joint index that is not in the catalogue."""


@dataclasses.dataclass
class Catalogue:
  """Items (raw id, domain, text) of one or more datasets in one joint index."""

  datasets: tuple[readers.SequenceDataset, ...]
  fingerprints: tuple[str, ...]  # readers.dataset_fingerprint of each domain

  def __post_init__(self):
    if not self.datasets:
      raise CatalogueError("a catalogue needs at least one dataset")
    names = [d.name for d in self.datasets]
    if len(set(names)) != len(names):
      raise CatalogueError(f"dataset listed twice in a catalogue: {names}")
    if len(self.fingerprints) != len(self.datasets):
      raise CatalogueError("one fingerprint per dataset")
    sizes = [d.num_items for d in self.datasets]
    self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.user_offsets = np.concatenate([[0], np.cumsum([d.num_users for d in self.datasets])]).astype(np.int64)
    self.num_items = int(self.offsets[-1])
    self.num_users = int(self.user_offsets[-1])
    self.domain_of = np.full((self.num_items + 1,), -1, np.int32)
    for d in range(len(self.datasets)):
      self.domain_of[self.offsets[d] + 1: self.offsets[d + 1] + 1] = d
    multi = len(self.datasets) > 1
    self.raw_item_ids = [""]
    for ds in self.datasets:
      self.raw_item_ids += [f"{ds.name}/{r}" if multi else r for r in ds.raw_item_ids[1:]]
    self._index = {r: i for i, r in enumerate(self.raw_item_ids) if i}
    self.item_meta: list[Optional[readers.ItemMeta]] = [None]
    for ds in self.datasets:
      self.item_meta += list(ds.item_meta[1:]) if ds.item_meta is not None else [None] * ds.num_items

  # ---------------------------------------------------------------- building
  @classmethod
  def load(cls, names: Sequence[str], data_dir=None) -> "Catalogue":
    """The catalogue of the named datasets (`readers.load_dataset`), in the given order."""
    keys = [readers.resolve_dataset_name(n) for n in names]
    return cls(tuple(readers.load_dataset(k, data_dir) for k in keys),
               tuple(readers.dataset_fingerprint(k, data_dir) for k in keys))

  # ---------------------------------------------------------------- queries
  @property
  def domains(self) -> tuple[str, ...]:
    return tuple(d.name for d in self.datasets)

  @property
  def name(self) -> str:
    return "+".join(self.domains)

  @property
  def fingerprint(self) -> str:
    h = hashlib.sha256("|".join(f"{n}:{f}" for n, f in zip(self.domains, self.fingerprints)).encode())
    return h.hexdigest()[:16]

  def domain_index(self, domain: str) -> int:
    key = readers.resolve_dataset_name(domain)
    if key not in self.domains:
      raise CatalogueError(f"domain {domain!r} is not in the catalogue {list(self.domains)}")
    return self.domains.index(key)

  def dataset(self, domain: str) -> readers.SequenceDataset:
    return self.datasets[self.domain_index(domain)]

  def has_text(self, domain: str) -> bool:
    return self.dataset(domain).item_meta is not None

  def items_of(self, domain: str) -> np.ndarray:
    """Joint indices of the domain's items, ascending."""
    d = self.domain_index(domain)
    return np.arange(self.offsets[d] + 1, self.offsets[d + 1] + 1, dtype=np.int32)

  def to_joint(self, domain: str, items) -> np.ndarray:
    """Domain-local item indices (0 = padding stays 0) -> joint indices."""
    d = self.domain_index(domain)
    a = np.asarray(items, np.int64)
    return np.where(a > 0, a + self.offsets[d], 0).astype(np.int32)

  def user_to_joint(self, domain: str, users) -> np.ndarray:
    d = self.domain_index(domain)
    a = np.asarray(users, np.int64)
    return np.where(a > 0, a + self.user_offsets[d], 0).astype(np.int32)

  def index(self, raw_id: str) -> int:
    """Joint index of a raw item id (``"<domain>/<id>"`` in a several-domain catalogue)."""
    i = self._index.get(str(raw_id).strip())
    if i is None:
      hint = " (ids are '<domain>/<raw id>' in this catalogue)" if len(self.datasets) > 1 else ""
      raise CatalogueError(f"unknown item id {raw_id!r}{hint}")
    return i

  def qualified_ids(self) -> np.ndarray:
    """``[num_items + 1]`` str: each joint index's ``"<domain>/<raw id>"`` (``""`` for padding), the
    same in every catalogue that holds the domain (a one-domain catalogue's `raw_item_ids` have no
    prefix), so rows of two runs over different catalogues can be matched by item."""
    out = [""]
    for ds in self.datasets:
      out += [f"{ds.name}/{r}" for r in ds.raw_item_ids[1:]]
    return np.asarray(out, dtype=object)

  def meta(self, item: int) -> Optional[readers.ItemMeta]:
    if not 1 <= item <= self.num_items:
      raise CatalogueError(f"item index {item} outside 1..{self.num_items}")
    return self.item_meta[item]

  def title(self, item: int) -> str:
    m = self.meta(item)
    return m.title if m is not None else ""

  def as_dataset(self) -> readers.SequenceDataset:
    """The catalogue as one `SequenceDataset`: the domains' splits in joint indices (for the
    artifact's item index and for code that takes a dataset). One domain: that dataset."""
    if len(self.datasets) == 1:
      return self.datasets[0]

    def split(name):
      out = []
      for ds in self.datasets:
        conv = lambda ex, ds=ds: readers.Example(
            int(self.user_to_joint(ds.name, ex.user)), tuple(self.to_joint(ds.name, ex.history).tolist()),
            int(self.to_joint(ds.name, ex.target)))
        out += [conv(ex) for ex in ds.split(name)]
      return out

    raw_users = [""]
    for ds in self.datasets:
      raw_users += [f"{ds.name}/{u}" for u in ds.raw_user_ids[1:]]
    has_text = any(ds.item_meta is not None for ds in self.datasets)
    return readers.SequenceDataset(
        name=self.name, num_items=self.num_items, num_users=self.num_users, raw_item_ids=list(self.raw_item_ids),
        item_index=dict(self._index), raw_user_ids=raw_users, user_index={u: i for i, u in enumerate(raw_users) if i},
        train=split("train"), validation=split("validation"), test=split("test"),
        item_meta=list(self.item_meta) if has_text else None,
        source_files=tuple(f for ds in self.datasets for f in ds.source_files))

  # ---------------------------------------------------------------- the joint SID space
  def joint_sid_codes(self, tables: Sequence[np.ndarray],
                      codebook_sizes: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """Per-domain SID codes ([n_d + 1, L] each, row 0 padding) -> the joint table [N + 1, L (+1)].

    One domain: its codes unchanged. Several: a leading domain level (see the module
    docstring); every domain needs the same number of levels. `codebook_sizes` (each domain's
    per-level vocabulary, length L each) makes the codes disjoint: domain d's code at level l is
    offset by the sizes of level l of domains 0..d-1; without it the codes are shared.
    """
    if len(tables) != len(self.datasets):
      raise CatalogueError(f"{len(tables)} SID tables for {len(self.datasets)} domains")
    for ds, t in zip(self.datasets, tables):
      if t.shape[0] != ds.num_items + 1:
        raise CatalogueError(f"SID table of {ds.name!r} has {t.shape[0] - 1} items, the dataset {ds.num_items}")
    if len(tables) == 1:
      return np.asarray(tables[0], np.int32)
    levels = {t.shape[1] for t in tables}
    if len(levels) != 1:
      raise CatalogueError(f"the domains' SID tables have different numbers of levels: {sorted(levels)}")
    num_levels = levels.pop()
    offsets = np.zeros((len(tables), num_levels), np.int64)
    if codebook_sizes is not None:
      sizes = np.asarray(codebook_sizes, np.int64)
      if sizes.shape != offsets.shape:
        raise CatalogueError(f"codebook sizes of shape {sizes.shape} for {len(tables)} domains x {num_levels} levels")
      for d, t in enumerate(tables):
        if t.shape[0] > 1 and np.any(t[1:].max(axis=0) >= sizes[d]):
          raise CatalogueError(f"SID codes of {self.datasets[d].name!r} exceed its codebook sizes {sizes[d].tolist()}")
      offsets[1:] = np.cumsum(sizes, axis=0)[:-1]
    out = np.zeros((self.num_items + 1, num_levels + 1), np.int32)
    for d, t in enumerate(tables):
      rows = slice(self.offsets[d] + 1, self.offsets[d + 1] + 1)
      out[rows, 0] = d
      out[rows, 1:] = t[1:] + offsets[d]
    return out
