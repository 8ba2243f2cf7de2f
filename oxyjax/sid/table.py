"""The semantic-ID table: one code path per item, plus its quality report and storage.

``SIDTable.codes [num_items + 1, L + 1] int32``: row ``i`` is item ``i``'s path, row 0 (the
padding item) is all zeros. The first ``L`` levels come from residual k-means; the last one
is the *collision level* (TIGER-style): items that share the same first-``L`` path get
distinct codes ``0..g-1`` in increasing item-index order, so every full path is unique.
``codebook_sizes[-1]`` is the largest collision group ``g``.

Storage is two files with one stem: ``<stem>.npz`` (the codes) and ``<stem>.json``
(codebook sizes, meta and a SHA-256 of the codes). Each is written to a temporary file and
moved into place with ``os.replace``, so a crash never leaves a half-written file over a good
one; the JSON is written last and carries the codes' digest, so a pair from two different
saves is detected on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from oxyjax import fileio

FORMAT_VERSION = 1


class SIDTableError(ValueError):
  """A SID table file is missing, corrupted, or inconsistent with its companion."""


def add_collision_level(codes: np.ndarray) -> np.ndarray:
  """Appends the collision level: ``[N, L]`` -> ``[N, L + 1]`` int32.

  Items sharing a first-``L`` path get codes ``0..g-1`` ordered by their row index; an item
  with a unique path gets 0.
  """
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes must be [N, L], got shape {codes.shape}")
  n = codes.shape[0]
  extra = np.zeros((n,), np.int32)
  if n:
    # Stable sort by path (last key is primary for lexsort), ties keep row order.
    order = np.lexsort(codes.T[::-1])
    sorted_codes = codes[order]
    new_group = np.ones((n,), bool)
    new_group[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    extra[order] = np.arange(n) - group_start
  return np.concatenate([codes.astype(np.int32), extra[:, None]], axis=1)


def _digest(codes: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(codes, np.int32).tobytes()).hexdigest()


def _stem(path: str | os.PathLike) -> Path:
  p = Path(path)
  return p.with_suffix("") if p.suffix in (".npz", ".json") else p


@dataclasses.dataclass(frozen=True, eq=False)
class SIDTable:
  """Semantic IDs for every item.

  Attributes:
    codes: ``[num_items + 1, L + 1]`` int32; row 0 unused (zeros); last level = collision level.
    codebook_sizes: vocabulary size per level (length ``L + 1``; the last is the largest
      collision group).
    meta: JSON-serialisable provenance (method, embedding source, seed, dataset, ...).
  """

  codes: np.ndarray
  codebook_sizes: tuple[int, ...]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    codes = np.asarray(self.codes)
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
      raise ValueError(f"codes must be [num_items + 1, levels], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"codes must be integers, got {codes.dtype}")
    object.__setattr__(self, "codes", codes.astype(np.int32, copy=False))
    sizes = tuple(int(s) for s in self.codebook_sizes)
    object.__setattr__(self, "codebook_sizes", sizes)
    if len(sizes) != codes.shape[1]:
      raise ValueError(f"{len(sizes)} codebook sizes for {codes.shape[1]} levels")
    if np.any(codes[0] != 0):
      raise ValueError("row 0 (padding item) must be all zeros")
    items = codes[1:]
    if items.size:
      if items.min() < 0 or np.any(items.max(axis=0) >= np.asarray(sizes)):
        raise ValueError(f"codes out of range for codebook sizes {sizes}")
      if np.unique(items, axis=0).shape[0] != items.shape[0]:
        raise ValueError("item code paths are not unique (is the collision level missing?)")

  @classmethod
  def from_kmeans_codes(cls, item_codes: np.ndarray, kmeans_codebook_sizes: Sequence[int],
                        meta: Mapping[str, Any] | None = None) -> "SIDTable":
    """Builds the table from k-means codes ``[num_items, L]`` of items ``1..num_items``.

    Adds the collision level and the padding row 0.
    """
    item_codes = np.asarray(item_codes, np.int32)
    if item_codes.ndim != 2 or item_codes.shape[1] != len(kmeans_codebook_sizes):
      raise ValueError(f"item_codes {item_codes.shape} does not match {len(kmeans_codebook_sizes)} levels")
    full = add_collision_level(item_codes)
    max_group = int(full[:, -1].max()) + 1 if full.shape[0] else 1
    codes = np.concatenate([np.zeros((1, full.shape[1]), np.int32), full], axis=0)
    return cls(codes=codes, codebook_sizes=tuple(int(c) for c in kmeans_codebook_sizes) + (max_group,),
               meta=dict(meta or {}))

  @property
  def num_items(self) -> int:
    return self.codes.shape[0] - 1

  @property
  def num_levels(self) -> int:
    """Levels including the collision level."""
    return self.codes.shape[1]

  def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
    """Writes ``<stem>.npz`` and ``<stem>.json`` atomically; ``path`` may end in .npz/.json or be the stem."""
    stem = _stem(path)
    npz_path, json_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
    fileio.save_npz(npz_path, codes=self.codes)
    header = {
        "format": "oxyjax.sid_table",
        "version": FORMAT_VERSION,
        "num_items": self.num_items,
        "num_levels": self.num_levels,
        "codebook_sizes": list(self.codebook_sizes),
        "codes_sha256": _digest(self.codes),
        "meta": self.meta,
    }
    text = json.dumps(header, indent=2, sort_keys=True) + "\n"
    fileio.write_text(json_path, text)
    return npz_path, json_path

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SIDTable":
    """Reads a table written by ``save``; raises ``SIDTableError`` naming the bad file."""
    stem = _stem(path)
    npz_path, json_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
    try:
      header = json.loads(json_path.read_text())
      if not isinstance(header, dict) or header.get("format") != "oxyjax.sid_table":
        raise ValueError("not an oxyjax SID table header")
      if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported version {header.get('version')!r}")
      sizes = tuple(int(s) for s in header["codebook_sizes"])
      digest, meta = header["codes_sha256"], header.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise SIDTableError(f"SID table header {json_path}: {e}") from e
    try:
      with np.load(npz_path, allow_pickle=False) as z:
        codes = np.asarray(z["codes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise SIDTableError(f"SID table codes {npz_path}: unreadable or corrupted ({e})") from e
    if _digest(codes) != digest or codes.shape != (header.get("num_items", -2) + 1, len(sizes)):
      raise SIDTableError(
          f"SID table codes {npz_path} do not match header {json_path} "
          f"(shape {codes.shape}, expected {(header.get('num_items'), len(sizes))} + padding row, "
          "or checksum differs): the two files come from different saves or one is corrupted")
    try:
      return cls(codes=codes, codebook_sizes=sizes, meta=meta)
    except ValueError as e:
      raise SIDTableError(f"SID table {npz_path}: invalid contents: {e}") from e


# --------------------------------------------------------------------------- quality report


def _entropy_bits(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def _group_sizes(paths: np.ndarray) -> np.ndarray:
  if paths.shape[0] == 0:
    return np.zeros((0,), np.int64)
  _, counts = np.unique(paths, axis=0, return_counts=True)
  return counts


def _purity(clusters: np.ndarray, labels: Sequence[Hashable | None]) -> tuple[float, int]:
  """Item-weighted majority-label fraction over clusters, among items with a label."""
  majority, total = {}, 0
  per_cluster: dict[int, dict[Hashable, int]] = {}
  for c, y in zip(clusters.tolist(), labels):
    if y is None:
      continue
    total += 1
    d = per_cluster.setdefault(c, {})
    d[y] = d.get(y, 0) + 1
  for c, d in per_cluster.items():
    majority[c] = max(d.values())
  return (sum(majority.values()) / total if total else float("nan")), total


def heldout_cooccurrence(table: SIDTable, pairs: np.ndarray, *, shuffle_seed: int = 0) -> dict[str, Any]:
  """How often a held-out next item shares the code prefix of the item before it.

  ``pairs [P, 2]`` holds ``(previous item, next item)`` index pairs that the table was NOT built
  from (the SID builder passes each validation example's last history item and its target).
  For each prefix depth ``d = 1 .. L`` (k-means levels) it reports the fraction of pairs whose
  two items share the first ``d`` codes, and the same fraction with the next items permuted
  over the pairs (seeded): a chance baseline that keeps both items' popularity. A code space
  that places items taken one after another under one prefix makes the decoder's early tokens
  informative; it is a purity measure against behaviour, for data without labels.
  """
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  km_levels = table.num_levels - 1
  perm = np.random.default_rng(shuffle_seed).permutation(len(pairs))
  a, b, bs = table.codes[pairs[:, 0]], table.codes[pairs[:, 1]], table.codes[pairs[perm, 1]]
  same, same_shuffled = [], []
  for d in range(1, km_levels + 1):
    same.append(float(np.all(a[:, :d] == b[:, :d], axis=1).mean()) if len(pairs) else None)
    same_shuffled.append(float(np.all(a[:, :d] == bs[:, :d], axis=1).mean()) if len(pairs) else None)
  return {"num_pairs": int(len(pairs)), "shared_prefix": same, "shared_prefix_shuffled": same_shuffled}


def quality_report(table: SIDTable, labels: Sequence[Hashable | None] | None = None,
                   *, shuffle_seed: int = 0, heldout_pairs: np.ndarray | None = None) -> dict[str, Any]:
  """SID quality numbers.

  Args:
    table: the SID table (last level = collision level).
    labels: optional label per row of ``table.codes`` (length ``num_items + 1``, entry 0
      ignored), e.g. brand; ``None`` entries are unlabelled and left out of purity.
    shuffle_seed: seed for the shuffled-label purity baseline.

  Returns a JSON-serialisable dict:
    ``collision``: over the first ``L`` (k-means) levels: ``rate`` (fraction of items whose
      path is shared with another item), ``num_groups`` (paths shared by >= 2 items),
      ``max_group_size``, ``num_distinct_paths``.
    ``levels``: per level (collision level last): ``codebook_size``, ``used`` (distinct codes),
      ``usage`` (used / codebook_size), ``entropy_bits`` of the code distribution over items,
      ``perplexity`` (2 ** entropy_bits).
    ``level1_purity``: item-weighted mean over level-1 clusters of the majority-label fraction
      (null without labels); ``level1_purity_shuffled``: the same with labels permuted at
      random over the labelled items (a chance baseline for these cluster sizes);
      ``label_coverage``: fraction of items with a label; ``num_labels``: distinct labels.
    ``heldout_cooccurrence`` (with ``heldout_pairs``): see ``heldout_cooccurrence``.
  """
  items = table.codes[1:]
  n = items.shape[0]
  km = items[:, :-1]
  group_sizes = _group_sizes(km) if km.shape[1] else np.array([n])
  shared = group_sizes[group_sizes > 1]
  report: dict[str, Any] = {
      "num_items": n,
      "num_levels": table.num_levels,
      "codebook_sizes": list(table.codebook_sizes),
      "collision": {
          "rate": float(shared.sum() / n) if n else 0.0,
          "num_groups": int(shared.size),
          "max_group_size": int(group_sizes.max()) if group_sizes.size else 0,
          "num_distinct_paths": int(group_sizes.size),
      },
      "levels": [],
  }
  for l, size in enumerate(table.codebook_sizes):
    counts = np.bincount(items[:, l], minlength=size) if n else np.zeros((size,), np.int64)
    h = _entropy_bits(counts)
    used = int(np.count_nonzero(counts))
    report["levels"].append({
        "level": l + 1,
        "collision_level": l == table.num_levels - 1,
        "codebook_size": int(size),
        "used": used,
        "usage": used / size,
        "entropy_bits": h,
        "perplexity": 2.0 ** h,
    })
  purity = shuffled = coverage = None
  num_labels = None
  if labels is not None:
    labels = list(labels)
    if len(labels) != n + 1:
      raise ValueError(f"labels must have num_items + 1 = {n + 1} entries (entry 0 ignored), got {len(labels)}")
    item_labels = labels[1:]
    p, total = _purity(items[:, 0], item_labels)
    labelled = [i for i, y in enumerate(item_labels) if y is not None]
    perm = np.random.default_rng(shuffle_seed).permutation(len(labelled))
    shuffled_labels: list[Hashable | None] = [None] * n
    for dst, src in zip(labelled, perm.tolist()):
      shuffled_labels[dst] = item_labels[labelled[src]]
    ps, _ = _purity(items[:, 0], shuffled_labels)
    purity = None if math.isnan(p) else p
    shuffled = None if math.isnan(ps) else ps
    coverage = total / n if n else 0.0
    num_labels = len({y for y in item_labels if y is not None})
  report["level1_purity"] = purity
  report["level1_purity_shuffled"] = shuffled
  report["label_coverage"] = coverage
  report["num_labels"] = num_labels
  if heldout_pairs is not None:
    report["heldout_cooccurrence"] = heldout_cooccurrence(table, heldout_pairs, shuffle_seed=shuffle_seed)
  return report


def format_report(report: Mapping[str, Any], title: str | None = None) -> str:
  """Renders ``quality_report`` output as markdown."""
  def f(v, nd=4):
    return "null" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

  c = report["collision"]
  lines = []
  if title:
    lines += [f"### {title}", ""]
  lines += [
      f"- items: {report['num_items']}, levels: {report['num_levels']} "
      f"(codebook sizes {tuple(report['codebook_sizes'])}; last = collision level)",
      f"- collisions over the k-means levels: rate {f(c['rate'])} "
      f"({c['num_groups']} shared paths, max group {c['max_group_size']}, "
      f"{c['num_distinct_paths']} distinct paths)",
  ]
  if report.get("level1_purity") is None:
    lines.append("- level-1 purity: null (no item labels)")
  else:
    lines.append(
        f"- level-1 purity: {f(report['level1_purity'])} (shuffled-label baseline "
        f"{f(report['level1_purity_shuffled'])}; {report['num_labels']} labels, "
        f"coverage {f(report['label_coverage'])})")
  h = report.get("heldout_cooccurrence")
  if h:
    lines.append(
        f"- held-out next item shares the previous item's prefix ({h['num_pairs']} validation pairs), "
        "depth 1..L: " + " / ".join(f(v) for v in h["shared_prefix"]) + " (shuffled baseline "
        + " / ".join(f(v) for v in h["shared_prefix_shuffled"]) + ")")
  lines += ["", "| level | codebook | used | usage | entropy (bits) | perplexity |",
            "|---|---|---|---|---|---|"]
  for lv in report["levels"]:
    name = f"{lv['level']}" + (" (collision)" if lv["collision_level"] else "")
    lines.append(f"| {name} | {lv['codebook_size']} | {lv['used']} | {f(lv['usage'])} | "
                 f"{f(lv['entropy_bits'], 3)} | {f(lv['perplexity'], 1)} |")
  return "\n".join(lines) + "\n"
