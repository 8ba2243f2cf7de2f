"""Readers for the raw recommendation data in ``<repo>/data`` (pure Python / NumPy, no TF).

Two raw formats:

* **amazon2014** (``Beauty.txt``, ``Sports_and_Outdoors.txt``): one line per user,
  ``user_id item_id item_id ...`` in time order.  Leave-one-out per user
  (see :func:`read_amazon2014`).
* **amazon2018** (``items.json``, ``valid.csv``, ``test.csv`` per category, MiniOneRec
  release): one row per *example* (a user can have several rows: successive windows of
  their timeline).  Training examples are rebuilt from the validation histories
  (see :func:`read_amazon2018`).
* **interactions** (your own data): an interaction log, one row per ``user, item,
  timestamp[, action]``, CSV or TSV with a header, plus an optional item file; the same
  leave-one-out protocol as amazon2014 (see :func:`read_interactions`).  Registered under a
  name with :func:`register_dataset` (gin: ``oxyjax.data.user_data.user_dataset``).

Every dataset maps raw item ids to dense indices ``1..num_items`` (``0`` is padding) and
raw user ids to dense indices ``1..num_users`` (``0`` is unused, so a zero-padded row
is never a real user).  Each split is a list of ``Example(user, history, target)`` with
``history`` a tuple of item indices, oldest first.

All problems with the input raise :class:`DataError` whose message names the file, the
line (1-based) where there is one, and the problem.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import html
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

__all__ = [
    "DataError",
    "Example",
    "ItemMeta",
    "SequenceDataset",
    "DatasetSpec",
    "DATASETS",
    "SPLITS",
    "READER_VERSION",
    "default_data_dir",
    "resolve_dataset_name",
    "dataset_files",
    "dataset_fingerprint",
    "read_amazon2014",
    "read_amazon2018",
    "read_interactions",
    "register_dataset",
    "load_dataset",
    "clear_cache",
]

# Bump when the reader's output for the same files changes (it keys the TFDS cache).
READER_VERSION = "1.0.0"

SPLITS = ("train", "validation", "test")

_REPO_ROOT = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """Bad or missing input data.  ``str(err)`` is ``'<file>[:<line>]: <problem>'``."""

    def __init__(self, path: os.PathLike | str, problem: str, line: Optional[int] = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


class Example(NamedTuple):
    """One next-item example: ``history`` (item indices, oldest first) -> ``target``."""

    user: int
    history: tuple[int, ...]
    target: int


@dataclasses.dataclass(frozen=True)
class ItemMeta:
    """Text metadata of one item (amazon2018)."""

    title: str = ""
    brand: str = ""
    description: str = ""
    categories: str = ""


@dataclasses.dataclass
class SequenceDataset:
    """A parsed dataset: dense id maps, optional item text and the three splits."""

    name: str
    num_items: int
    num_users: int
    raw_item_ids: list[str]  # index -> raw id; index 0 is padding ("")
    item_index: dict[str, int]  # raw id -> index in 1..num_items
    raw_user_ids: list[str]  # index -> raw id; index 0 unused ("")
    user_index: dict[str, int]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    item_meta: Optional[list[Optional[ItemMeta]]] = None  # index -> meta (None at 0); None for 2014
    source_files: tuple[str, ...] = ()
    dropped_users: int = 0  # interactions: users with too few interactions to split
    actions: dict[str, int] = dataclasses.field(default_factory=dict)  # interactions: rows per action value

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def item_text(self, i: int, max_description_chars: int = 512) -> str:
        """Text of item ``i`` for a text encoder: title, brand, categories, description."""
        if self.item_meta is None:
            raise ValueError(f"dataset {self.name!r} has no item text")
        if not 1 <= i <= self.num_items:
            raise IndexError(f"item index {i} out of range 1..{self.num_items}")
        meta = self.item_meta[i]
        return format_item_text(meta, max_description_chars) if meta else ""

    def stats(self) -> dict[str, int]:
        return {
            "users": self.num_users,
            "items": self.num_items,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


def format_item_text(meta: ItemMeta, max_description_chars: int = 512) -> str:
    def sentence(label: str, text: str) -> str:
        return f"{label}: {text}" + ("" if text[-1] in ".!?" else ".")

    parts = []
    if meta.title:
        parts.append(sentence("Title", meta.title))
    if meta.brand:
        parts.append(sentence("Brand", meta.brand))
    if meta.categories:
        parts.append(sentence("Categories", meta.categories))
    if meta.description and max_description_chars > 0:
        d = meta.description
        if len(d) > max_description_chars:
            d = d[:max_description_chars].rsplit(" ", 1)[0] + " ..."
        parts.append(f"Description: {d}")
    return " ".join(parts)


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str  # "amazon2014" | "amazon2018" | "interactions"
    # relative to the data dir (or absolute): a file (2014, interactions) or a directory (2018)
    path: str
    description: str
    items_path: str = ""  # interactions: optional item file (CSV/TSV with a header, or JSON)
    min_interactions: int = 3  # interactions: users with fewer are dropped (>= 3)


DATASETS: dict[str, DatasetSpec] = {
    "beauty": DatasetSpec("beauty", "amazon2014", "amazon2014/Beauty.txt",
                          "Amazon 2014 Beauty, 5-core, leave-one-out (no item text)"),
    "sports": DatasetSpec("sports", "amazon2014", "amazon2014/Sports_and_Outdoors.txt",
                          "Amazon 2014 Sports and Outdoors, 5-core, leave-one-out (no item text)"),
    "industrial": DatasetSpec("industrial", "amazon2018", "amazon2018/Industrial_and_Scientific",
                              "Amazon 2018 Industrial and Scientific (MiniOneRec split), with item text"),
    "office": DatasetSpec("office", "amazon2018", "amazon2018/Office_Products",
                          "Amazon 2018 Office Products (MiniOneRec split), with item text"),
}

_AMAZON2018_FILES = ("items.json", "valid.csv", "test.csv")


def default_data_dir() -> Path:
    """``$OXYJAX_DATA_DIR`` if set, else ``<repo>/data`` (relative to this package)."""
    env = os.environ.get("OXYJAX_DATA_DIR")
    return Path(env) if env else _REPO_ROOT / "data"


def resolve_dataset_name(name: str) -> str:
    """``'beauty'``, ``'oxyjax_beauty'`` -> ``'beauty'``."""
    key = name.lower()
    if key.startswith("oxyjax_"):
        key = key[len("oxyjax_"):]
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return key


def dataset_files(name: str, data_dir: os.PathLike | str | None = None) -> list[Path]:
    """The raw files a dataset is read from."""
    spec = DATASETS[resolve_dataset_name(name)]
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    p = base / spec.path
    if spec.format == "amazon2014":
        return [p]
    if spec.format == "interactions":
        return [p] + ([base / spec.items_path] if spec.items_path else [])
    return [p / f for f in _AMAZON2018_FILES]


_BUILT_IN = frozenset(DATASETS)
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


def register_dataset(spec: DatasetSpec, *, overwrite: bool = False) -> str:
    """Adds a dataset (e.g. a user's interaction log) to the registry; returns its name.

    The same spec again is a no-op; another spec under a registered name is an error unless
    ``overwrite``; the four built-in names cannot be replaced.  Names are ``[a-z0-9_]+`` (they
    name cache directories).
    """
    if not _NAME_RE.match(spec.name):
        raise ValueError(f"dataset name {spec.name!r}: use lower-case letters, digits and '_'")
    if spec.format not in ("amazon2014", "amazon2018", "interactions"):
        raise ValueError(f"dataset {spec.name!r}: unknown format {spec.format!r}")
    if spec.format == "interactions" and spec.min_interactions < 3:
        raise ValueError(f"dataset {spec.name!r}: min_interactions must be >= 3 (leave-one-out needs "
                         f"a train, a validation and a test item), got {spec.min_interactions}")
    old = DATASETS.get(spec.name)
    if old is not None and old != spec:
        if spec.name in _BUILT_IN:
            raise ValueError(f"{spec.name!r} is a built-in dataset; register yours under another name")
        if not overwrite:
            raise ValueError(f"dataset {spec.name!r} is already registered as {old}; use another name")
    DATASETS[spec.name] = spec
    return spec.name


_FP_CACHE: dict[tuple, str] = {}
_FP_LOCK = threading.Lock()


def dataset_fingerprint(name: str, data_dir: os.PathLike | str | None = None) -> str:
    """Content fingerprint of a dataset: 16 hex chars of a SHA-256 over the dataset name,
    ``READER_VERSION`` and the bytes of every raw file it is read from (:func:`dataset_files`).

    It keys every cache built from the data (prepared TFDS data, SID tables, item
    embeddings; docs/design.md, "Caches and their keys"): editing a raw file, pointing
    ``OXYJAX_DATA_DIR`` at other files or bumping ``READER_VERSION`` changes it; the same
    bytes in another directory give the same fingerprint.  The files are streamed (1 MiB
    chunks); the result is memoised in-process on the files' (path, size, mtime, inode), so
    repeated calls cost a few ``stat`` calls (an edit that keeps all four is not seen).
    """
    key_name = resolve_dataset_name(name)
    files = dataset_files(key_name, data_dir)

    def stamp() -> tuple:
        out = []
        for p in files:
            try:
                st = p.stat()
            except FileNotFoundError:
                raise DataError(p, "file not found") from None
            out.append((str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(out)

    memo_key = (key_name, READER_VERSION, stamp())
    with _FP_LOCK:
        hit = _FP_CACHE.get(memo_key)
    if hit is not None:
        return hit
    h = hashlib.sha256(f"{key_name}|{READER_VERSION}".encode())
    for p in files:
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            raise DataError(p, "file not found") from None
        h.update(b"\0")
    fp = h.hexdigest()[:16]
    if stamp() == memo_key[2]:  # not memoised if a file changed while it was being read
        with _FP_LOCK:
            _FP_CACHE[memo_key] = fp
    return fp


# --------------------------------------------------------------------------- helpers

_INT_RE = re.compile(r"^[0-9]+$")


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a file") from None


def _dense_index(raw_ids: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Dense 1-based index; numeric ids sorted numerically, else first-seen order."""
    uniq = list(dict.fromkeys(raw_ids))
    if all(_INT_RE.match(x) for x in uniq):
        uniq.sort(key=int)
    raw = [""] + uniq
    return raw, {r: i for i, r in enumerate(raw) if i}


def _first_seen_index(raw_ids: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    raw = [""] + list(dict.fromkeys(raw_ids))
    return raw, {r: i for i, r in enumerate(raw) if i}


# --------------------------------------------------------------------------- amazon2014


def read_amazon2014(path: os.PathLike | str, name: Optional[str] = None) -> SequenceDataset:
    """Read a ``user_id item item ...`` file with leave-one-out splits.

    For a user with items ``s[0..n-1]`` (``n >= 3``):

    * test:        ``s[:-1] -> s[-1]``
    * validation:  ``s[:-2] -> s[-2]``
    * train:       ``s[:i] -> s[i]`` for ``i = 1 .. n-3`` (every prefix of the training
      part ``s[:-2]``; a user with exactly 3 items has no training example).

    Blank lines are skipped.  Raises :class:`DataError` for a missing file, a non-integer
    token, a line with a user id but no items, a user with fewer than 3 items, and a
    duplicate user id.
    """
    path = Path(path)
    rows: list[tuple[str, list[str]]] = []
    seen_users: dict[str, int] = {}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            toks = line.split()
            if not toks:
                continue
            user, items = toks[0], toks[1:]
            if not _INT_RE.match(user):
                raise DataError(path, f"user id {user!r} is not an integer", lineno)
            if not items:
                raise DataError(path, f"malformed line: user {user} has no items", lineno)
            for tok in items:
                if not _INT_RE.match(tok):
                    raise DataError(path, f"item id {tok!r} is not an integer", lineno)
            if len(items) < 3:
                raise DataError(
                    path,
                    f"user {user} has {len(items)} item(s); leave-one-out needs at least 3",
                    lineno,
                )
            if user in seen_users:
                raise DataError(
                    path, f"duplicate user id {user} (first on line {seen_users[user]})", lineno
                )
            seen_users[user] = lineno
            # canonical form of the ids ("007" == "7")
            rows.append((str(int(user)), [str(int(t)) for t in items]))
    if not rows:
        raise DataError(path, "no users in file")

    raw_items, item_index = _dense_index(t for _, items in rows for t in items)
    raw_users, user_index = _first_seen_index(u for u, _ in rows)
    train: list[Example] = []
    valid: list[Example] = []
    test: list[Example] = []
    for u, items in rows:
        uid = user_index[u]
        s = tuple(item_index[t] for t in items)
        n = len(s)
        for i in range(1, n - 2):
            train.append(Example(uid, s[:i], s[i]))
        valid.append(Example(uid, s[: n - 2], s[n - 2]))
        test.append(Example(uid, s[: n - 1], s[n - 1]))
    return SequenceDataset(
        name=name or path.stem,
        num_items=len(raw_items) - 1,
        num_users=len(raw_users) - 1,
        raw_item_ids=raw_items,
        item_index=item_index,
        raw_user_ids=raw_users,
        user_index=user_index,
        train=train,
        validation=valid,
        test=test,
        item_meta=None,
        source_files=(str(path),),
    )


# --------------------------------------------------------------------------- amazon2018

_REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id")
_TAG_RE = re.compile(r"<[^>]{0,200}>")
_WS_RE = re.compile(r"\s+")


def _clean_text(s: str) -> str:
    s = html.unescape(_TAG_RE.sub(" ", s))
    return _WS_RE.sub(" ", s).strip()


def _parse_description(raw: Any) -> str:
    """Descriptions are stored as the string of a Python list of paragraphs."""
    if isinstance(raw, list):
        parts = raw
    elif isinstance(raw, str):
        s = raw.strip()
        parts = [s]
        if s.startswith("[") and s.endswith("]"):
            try:
                v = ast.literal_eval(s)
                if isinstance(v, (list, tuple)):
                    parts = [str(x) for x in v]
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    else:
        parts = [] if raw is None else [str(raw)]
    return _clean_text(" ".join(str(p) for p in parts))


def _parse_categories(raw: Any) -> str:
    if isinstance(raw, list):
        flat = []
        for c in raw:
            flat.extend(c if isinstance(c, list) else [c])
        return " > ".join(_clean_text(str(c)) for c in flat if str(c).strip())
    return _clean_text(str(raw)) if raw else ""


def _read_items_json(path: Path) -> dict[str, ItemMeta]:
    with _open_text(path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object of items, got {type(obj).__name__}")
    out: dict[str, ItemMeta] = {}
    for raw_id, v in obj.items():
        if not isinstance(v, dict):
            raise DataError(path, f"item {raw_id!r}: expected an object, got {type(v).__name__}")
        key = str(int(raw_id)) if _INT_RE.match(raw_id) else raw_id
        out[key] = ItemMeta(
            title=_clean_text(str(v.get("title") or "")),
            brand=_clean_text(str(v.get("brand") or "")),
            description=_parse_description(v.get("description")),
            categories=_parse_categories(v.get("categories")),
        )
    if not out:
        raise DataError(path, "no items")
    return out


def _item_key(x: Any) -> str:
    if isinstance(x, bool):
        raise TypeError
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        x = x.strip()
        return str(int(x)) if _INT_RE.match(x) else x
    raise TypeError


def _read_rows_csv(path: Path, known: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str, int]]:
    """Rows ``(user, history raw ids, target raw id, line)`` of a MiniOneRec csv."""
    rows = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(path, "empty file (no header)", 1) from None
        except csv.Error as e:
            raise DataError(path, f"malformed csv header: {e}", 1) from None
        missing = [c for c in _REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(path, f"missing column(s) {missing} in header {header}", 1)
        col = {c: header.index(c) for c in _REQUIRED_COLUMNS}
        width = len(header)
        while True:
            line = reader.line_num + 1  # first physical line of the next record
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(path, f"malformed csv row: {e}", line) from None
            if not rec or (len(rec) == 1 and not rec[0].strip()):
                continue
            if len(rec) != width:
                raise DataError(
                    path, f"malformed csv row: {len(rec)} fields, header has {width}", line
                )
            user = rec[col["user_id"]].strip()
            if not user:
                raise DataError(path, "empty user_id", line)
            hist_s = rec[col["history_item_id"]]
            try:
                hist = ast.literal_eval(hist_s.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(
                    path, f"history_item_id {hist_s[:60]!r} is not a Python list literal", line
                ) from None
            if not isinstance(hist, (list, tuple)):
                raise DataError(
                    path, f"history_item_id {hist_s[:60]!r} is not a list", line
                )
            if not hist:
                raise DataError(path, "empty history (history_item_id is [])", line)
            try:
                hist_keys = tuple(_item_key(x) for x in hist)
            except TypeError:
                raise DataError(
                    path, f"history_item_id {hist_s[:60]!r} contains a non-integer item id", line
                ) from None
            tgt_s = rec[col["item_id"]].strip()
            if not tgt_s:
                raise DataError(path, "empty item_id (no target)", line)
            tgt = _item_key(tgt_s)
            for k in hist_keys + (tgt,):
                if k not in known:
                    raise DataError(path, f"unknown item id {k!r} (not in items.json)", line)
            rows.append((user, hist_keys, tgt, line))
    return rows


def _build_amazon2018_train(
    valid: Sequence[tuple[int, tuple[int, ...], int]],
    test: Sequence[tuple[int, tuple[int, ...], int]],
) -> list[Example]:
    """Training examples from validation histories, keeping held-out targets out.

    See :func:`read_amazon2018` for the rule.
    """
    # Per user, stitch the validation rows (file order) into timeline segments.  A row
    # (h, t) continues a segment when h agrees with the segment's end (h is the
    # <=10-item window right before t); t is then appended as a held-out position.
    # Otherwise it opens a new segment h + [t].  Positions coming from a history are
    # trainable; positions coming from a target are held out.
    segments: dict[int, list[tuple[list[int], list[bool]]]] = {}
    for u, h, t in valid:
        segs = segments.setdefault(u, [])
        placed = False
        for items, trainable in reversed(segs):
            k = min(len(h), len(items))
            if tuple(items[len(items) - k:]) == h[len(h) - k:]:
                if len(h) > len(items):  # the row reveals older history
                    extra = list(h[: len(h) - len(items)])
                    items[:0] = extra
                    trainable[:0] = [True] * len(extra)
                items.append(t)
                trainable.append(False)
                placed = True
                break
        if not placed:
            segs.append((list(h) + [t], [True] * len(h) + [False]))

    held_out = {(u, h, t) for u, h, t in valid}
    held_out.update((u, h, t) for u, h, t in test)
    out: list[Example] = []
    seen: set[tuple[int, tuple[int, ...], int]] = set()
    for u, segs in segments.items():
        for items, trainable in segs:
            for j in range(1, len(items)):
                if not trainable[j]:
                    continue
                ex = (u, tuple(items[:j]), items[j])
                if ex in held_out or ex in seen:
                    continue
                seen.add(ex)
                out.append(Example(*ex))
    return out


def read_amazon2018(directory: os.PathLike | str, name: Optional[str] = None) -> SequenceDataset:
    """Read a MiniOneRec amazon2018 category directory (``items.json``, ``valid.csv``, ``test.csv``).

    * The item catalogue is ``items.json`` (numeric ids are indexed in numeric order:
      raw id ``"k"`` -> index ``k + 1`` when ids are ``0..N-1``).
    * validation = the rows of ``valid.csv``; test = the rows of ``test.csv``.  A user can
      have several rows: successive windows of their timeline, where each row's
      ``history_item_id`` is the <=10 items before its ``item_id``.  The ``*_sid`` and
      title columns are ignored.
    * train (the release does not include its training split) is rebuilt from the
      validation histories.  Per user, the ``valid.csv`` rows are stitched into their
      timeline: a row ``h -> t`` whose history agrees with the end of the timeline built
      so far continues it (``t`` is appended), otherwise it starts a new segment.
      Every position that came from a *history* is a training target with everything
      before it in its segment as history; a position that is a validation *target* is
      never a training target (a later row's history contains the earlier row's target
      -- that target stays held out, also when the later window has slid past the
      earlier window's first items).  In addition, an example equal to a validation or
      test row ``(user, history, target)`` is dropped, and identical
      ``(user, history, target)`` examples are kept once.

      Consequence: the training set is the <=10-item tail of each user's history before
      their first validation target (each user's first ``valid.csv`` window), i.e.
      ``len(h1) - 1`` examples per validation user; users seen only in ``test.csv`` give
      no training example.

    Raises :class:`DataError` for a missing file, a malformed csv row or missing column,
    an unparsable history list, an item id not in ``items.json``, and an empty history.
    """
    directory = Path(directory)
    items_path = directory / "items.json"
    valid_path = directory / "valid.csv"
    test_path = directory / "test.csv"
    meta_by_raw = _read_items_json(items_path)
    valid_rows = _read_rows_csv(valid_path, meta_by_raw)
    test_rows = _read_rows_csv(test_path, meta_by_raw)

    raw_items, item_index = _dense_index(meta_by_raw.keys())
    raw_users, user_index = _first_seen_index(
        [r[0] for r in valid_rows] + [r[0] for r in test_rows]
    )

    def conv(rows):
        return [
            Example(user_index[u], tuple(item_index[x] for x in h), item_index[t])
            for u, h, t, _ in rows
        ]

    valid = conv(valid_rows)
    test = conv(test_rows)
    train = _build_amazon2018_train(valid, test)
    item_meta: list[Optional[ItemMeta]] = [None] + [meta_by_raw[r] for r in raw_items[1:]]
    return SequenceDataset(
        name=name or directory.name,
        num_items=len(raw_items) - 1,
        num_users=len(raw_users) - 1,
        raw_item_ids=raw_items,
        item_index=item_index,
        raw_user_ids=raw_users,
        user_index=user_index,
        train=train,
        validation=valid,
        test=test,
        item_meta=item_meta,
        source_files=(str(items_path), str(valid_path), str(test_path)),
    )


# --------------------------------------------------------------------------- interactions

_COLUMN_ALIASES = {
    "user": ("user", "user_id", "userid"),
    "item": ("item", "item_id", "itemid"),
    "timestamp": ("timestamp", "time", "ts"),
    "action": ("action", "event", "behavior", "behaviour"),
}
_ITEM_COLUMNS = {"item": ("item", "item_id", "itemid"), "title": ("title",), "brand": ("brand",),
                 "categories": ("categories", "category"), "description": ("description",)}


def _delimiter(path: Path, first_line: str) -> str:
    """``.tsv`` / ``.tab``: tab; ``.csv``: comma; otherwise tab if the header has one, else comma."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    return "\t" if "\t" in first_line else ","


def _header_columns(path: Path, header: list[str], wanted: dict, required: Sequence[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    dup = sorted({n for n in names if names.count(n) > 1 and n})
    if dup:
        raise DataError(path, f"duplicate header column(s) {dup}", 1)
    col = {}
    for field, aliases in wanted.items():
        hits = [names.index(a) for a in aliases if a in names]
        if len(hits) > 1:
            raise DataError(path, f"header names field {field!r} twice ({[header[i] for i in hits]})", 1)
        if hits:
            col[field] = hits[0]
    missing = [f for f in required if f not in col]
    if missing:
        raise DataError(path, f"missing column(s) {missing} in header {header} "
                              f"(accepted names: {', '.join('/'.join(wanted[f]) for f in missing)})", 1)
    return col


def _parse_timestamp(text: str) -> float:
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        pass
    import datetime

    try:
        d = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(t) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=datetime.timezone.utc)
    return d.timestamp()


def _csv_rows(path: Path):
    """(delimiter, header, iterator of (line, record)) of a CSV/TSV file with a header."""
    f = _open_text(path)
    first = f.readline()
    f.seek(0)
    if not first.strip():
        f.close()
        raise DataError(path, "empty file (no header)", 1)
    delim = _delimiter(path, first)
    reader = csv.reader(f, delimiter=delim)
    header = next(reader)

    def rows():
        try:
            while True:
                line = reader.line_num + 1
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(path, f"malformed row: {e}", line) from None
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue
                yield line, rec
        finally:
            f.close()

    return delim, header, rows()


def _read_item_file(path: Path) -> dict[str, ItemMeta]:
    """Item metadata by raw id: a CSV/TSV with a header (``item`` plus any of ``title``,
    ``brand``, ``categories``, ``description``), or a JSON object like amazon2018's ``items.json``."""
    if path.suffix.lower() == ".json":
        return _read_items_json(path)
    _, header, rows = _csv_rows(path)
    col = _header_columns(path, header, _ITEM_COLUMNS, ["item"])
    out: dict[str, ItemMeta] = {}
    for line, rec in rows:
        if len(rec) != len(header):
            raise DataError(path, f"{len(rec)} fields, the header has {len(header)}", line)
        raw = rec[col["item"]].strip()
        if not raw:
            raise DataError(path, "field 'item' is empty", line)
        get = lambda f: _clean_text(rec[col[f]]) if f in col else ""
        out[raw] = ItemMeta(title=get("title"), brand=get("brand"), description=get("description"),
                            categories=get("categories"))
    return out


def read_interactions(path: os.PathLike | str, items_path: os.PathLike | str | None = None, *,
                      name: Optional[str] = None, min_interactions: int = 3) -> SequenceDataset:
    """Read an interaction log (your own data) with leave-one-out splits.

    The log is CSV (``.csv``) or TSV (``.tsv``/``.tab``; other extensions: tab if the header
    holds one, else comma) with a header naming the columns ``user``, ``item``,
    ``timestamp`` (also accepted: ``user_id``, ``item_id``, ``time``/``ts``) and optionally
    ``action``; other columns are ignored.  Timestamps are numbers (e.g. Unix seconds) or
    ISO-8601 dates/times (UTC when no zone is given).  Ids are strings (``"007"`` and ``"7"``
    are different items).

    Per user the interactions are ordered by timestamp (ties keep the file's order); with
    items ``s[0..n-1]``: test ``s[:-1] -> s[-1]``, validation ``s[:-2] -> s[-2]``, train every
    prefix of ``s[:-2]`` -- the amazon2014 protocol.  Users with fewer than
    ``min_interactions`` (>= 3) interactions are dropped (counted in ``dropped_users``).  Only
    items of kept users are indexed.  ``action`` values are checked to be non-empty when the
    column exists and counted per value (``actions``), not used for training yet.

    The optional item file gives text per item (see ``_read_item_file``); its rows for items
    nobody interacted with are ignored, and interacted items it lacks get empty text.

    Raises :class:`DataError` naming file, line and field for: a missing file, an empty file,
    a missing or duplicated header column, a row with the wrong number of fields, an empty
    user / item / action field, a timestamp that is neither a number nor an ISO date, an item
    file row without an item id, and a log where no user has ``min_interactions`` interactions.
    """
    path = Path(path)
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3, got {min_interactions}")
    _, header, rows = _csv_rows(path)
    col = _header_columns(path, header, _COLUMN_ALIASES, ["user", "item", "timestamp"])
    width = len(header)
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    actions: dict[str, int] = {}
    order = 0
    for line, rec in rows:
        if len(rec) != width:
            raise DataError(path, f"{len(rec)} fields, the header has {width}", line)
        user, item = rec[col["user"]].strip(), rec[col["item"]].strip()
        if not user:
            raise DataError(path, f"field 'user' ({header[col['user']]!r}) is empty", line)
        if not item:
            raise DataError(path, f"field 'item' ({header[col['item']]!r}) is empty", line)
        ts_text = rec[col["timestamp"]]
        try:
            ts = _parse_timestamp(ts_text)
        except ValueError:
            raise DataError(path, f"field 'timestamp' ({header[col['timestamp']]!r}): {ts_text.strip()!r} is "
                                  "neither a number nor an ISO-8601 date", line) from None
        if "action" in col:
            a = rec[col["action"]].strip()
            if not a:
                raise DataError(path, f"field 'action' ({header[col['action']]!r}) is empty", line)
            actions[a] = actions.get(a, 0) + 1
        by_user.setdefault(user, []).append((ts, order, item))
        order += 1
    kept = {u: [it for _, _, it in sorted(v)] for u, v in by_user.items() if len(v) >= min_interactions}
    if not kept:
        raise DataError(path, f"no user has {min_interactions} or more interactions "
                              f"({len(by_user)} users, {order} rows)")
    raw_items, item_index = _dense_index(it for seq in kept.values() for it in seq)
    raw_users, user_index = _first_seen_index(kept)
    train, valid, test = [], [], []
    for u, seq in kept.items():
        uid = user_index[u]
        s_ = tuple(item_index[t] for t in seq)
        n = len(s_)
        for i in range(1, n - 2):
            train.append(Example(uid, s_[:i], s_[i]))
        valid.append(Example(uid, s_[: n - 2], s_[n - 2]))
        test.append(Example(uid, s_[: n - 1], s_[n - 1]))
    item_meta = None
    files = (str(path),)
    if items_path:
        items_path = Path(items_path)
        meta = _read_item_file(items_path)
        item_meta = [None] + [meta.get(r, ItemMeta()) for r in raw_items[1:]]
        files += (str(items_path),)
    return SequenceDataset(
        name=name or path.stem, num_items=len(raw_items) - 1, num_users=len(raw_users) - 1,
        raw_item_ids=raw_items, item_index=item_index, raw_user_ids=raw_users, user_index=user_index,
        train=train, validation=valid, test=test, item_meta=item_meta, source_files=files,
        dropped_users=len(by_user) - len(kept), actions=actions)


# --------------------------------------------------------------------------- load_dataset

_CACHE: dict[tuple[str, str], tuple[tuple, SequenceDataset]] = {}
_CACHE_LOCK = threading.Lock()


def _file_stamp(paths: Sequence[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((str(p), None, None))
    return tuple(out)


def load_dataset(name: str, data_dir: os.PathLike | str | None = None) -> SequenceDataset:
    """Load ``beauty`` | ``sports`` | ``industrial`` | ``office`` (``oxyjax_`` prefix ok), or a
    dataset added with :func:`register_dataset`.

    ``data_dir`` defaults to ``$OXYJAX_DATA_DIR`` or ``<repo>/data``.  Results are cached
    in-process (keyed by name, directory and the files' size/mtime); treat the returned
    object as read-only.
    """
    key_name = resolve_dataset_name(name)
    spec = DATASETS[key_name]
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    base = base.resolve()
    files = dataset_files(key_name, base)
    stamp = _file_stamp(files)
    key = (key_name, str(base))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    if spec.format == "amazon2014":
        ds = read_amazon2014(files[0], name=key_name)
    elif spec.format == "amazon2018":
        ds = read_amazon2018(base / spec.path, name=key_name)
    elif spec.format == "interactions":
        ds = read_interactions(files[0], files[1] if len(files) > 1 else None, name=key_name,
                               min_interactions=spec.min_interactions)
    else:  # pragma: no cover
        raise ValueError(f"unknown format {spec.format!r}")
    with _CACHE_LOCK:
        _CACHE[key] = (stamp, ds)
    return ds


def clear_cache() -> None:
    """Forget the in-process dataset and fingerprint caches."""
    with _CACHE_LOCK:
        _CACHE.clear()
    with _FP_LOCK:
        _FP_CACHE.clear()


# (users, items, interactions) from the table of the data README (amazon2014).
README_COUNTS = {"beauty": (22_363, 12_101, 198_502), "sports": (35_598, 18_357, 296_337)}


if __name__ == "__main__":  # python -m oxyjax.data.readers : print and check statistics
    import sys
    import time

    ok = True
    for n in DATASETS:
        t0 = time.perf_counter()
        d = load_dataset(n)
        line = f"{n}: {d.stats()}"
        if n in README_COUNTS:
            got = (d.num_users, d.num_items, sum(len(e.history) + 1 for e in d.test))
            good = got == README_COUNTS[n]
            ok &= good
            line += f" users/items/interactions={got} {'OK' if good else 'MISMATCH'} vs README"
        print(line, f"({time.perf_counter() - t0:.2f}s)")
    sys.exit(0 if ok else 1)
