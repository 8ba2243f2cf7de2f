"""Scenarios: each one an instruction ``I_s = (scenario, trigger item)`` over a catalogue's data.

PAPER.md section 6: one model, told its scenario by an instruction, serves every scenario.
A `ScenarioConfig` names a scenario, its kind, the catalogue domain it draws from, its
mixture rate (`oxyjax.data.scenario_tasks` registers one seqio task per scenario and one
`seqio.Mixture` with these rates; the trainer samples by them) and, for a data-poor
scenario, the fraction of its training examples kept. The kinds, built from the domain's
leave-one-out splits (`readers`), with every held-out target held out of every scenario:

* ``homepage``: next item from the history (most recent ``max_history``), no trigger: the
  model's learned default trigger slot stands in.
* ``item_to_item``: the user is looking at an item (the trigger: the last behaviour before
  the target) and takes the target next; the context is the trigger and at most
  ``context`` behaviours before it. A different task from homepage: short context, and the
  trigger enters the instruction token, not only the behaviour sequence.
* ``search``: a text query built only from the target's catalogue entry (`search_query`),
  embedded by the sentence encoder (all-MiniLM-L6-v2) as the reasoning instruction ``I_r``;
  the history personalises it. Needs item text (the 2018 data).

`train_events = (lo, hi)` gives the scenario a slice of its domain's training events: each
event (a user's behaviour at one position of their sequence) has a fixed uniform draw
``u in [0, 1)`` (a hash of the domain, the user and the position: `event_draws`), and the
scenario trains on the events with ``lo <= u < hi``. Scenarios of one domain with
non-overlapping slices train on disjoint events, as in a real log, where each behaviour
happened in exactly one scenario; the default ``(0, 1)`` gives every scenario every event (so
that, for example, a search row and a homepage row can be the same user, history and target).
The slice belongs to the scenario, not to the run: a model trained on one scenario alone gets
the same events as that scenario in a mixture.

`history > 0` keeps only that many most recent behaviours in every split (and the inference
command cuts a request's history the same way): for example search rows with a short recent
context, so that the query, not the history, is what names the target.

`train_fraction < 1` then keeps a fixed random subset (seeded by the scenario's name) of those
training examples: a data-poor scenario. Validation and test are always complete.

The pool of a scenario (its decoder constraint) is its domain's items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from oxyjax import fileio
from oxyjax.data import pipeline
from oxyjax.data import readers
from oxyjax.data.catalogue import Catalogue

__all__ = ["KINDS", "InstructionLookup", "ScenarioConfig", "Scenario", "search_query", "normalise_query",
           "query_embeddings", "build_scenarios",
           "QUERY_RULE_VERSION"]

KINDS = ("homepage", "item_to_item", "search")
# (scenario config, its domain's dataset, split, the split's examples in row order) ->
# (I_r embeddings [n, instruction_dim], present [n]) of the generated reasoning instructions
# (`oxyjax.experiment.scenario_instruction_lookup`: the near-line store), or None where the
# scenario reads none (its rows then use the learned default).
InstructionLookup = Callable[..., Optional[tuple[np.ndarray, np.ndarray]]]
# Bump when `search_query` changes what it returns (it keys the query-embedding cache).
QUERY_RULE_VERSION = "1"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class ScenarioConfig:
  """One scenario of a multi-scenario run (gin: `oxyjax.train.ScenarioConfig`)."""

  name: str  # [a-z0-9_]+, e.g. 'office_homepage'
  kind: str  # homepage | item_to_item | search
  domain: str  # a dataset of the catalogue: 'office', 'industrial', ... or a registered user dataset
  rate: float = 1.0  # mixture rate (relative; seqio.Mixture)
  train_fraction: float = 1.0  # < 1: a data-poor scenario (this fraction of its training examples)
  context: int = 2  # item_to_item: behaviours of context before the trigger
  # every kind: keep at most this many most recent behaviours as the history (0: all, up to the
  # model's max_history); e.g. a search scenario whose rows carry a short recent context
  history: int = 0
  # [lo, hi): the slice of its domain's training events it trains on (`event_draws`); (0, 1): all
  train_events: tuple[float, float] = (0.0, 1.0)

  def __post_init__(self):
    if not re.fullmatch(r"[a-z0-9_]+", self.name):
      raise ValueError(f"scenario name {self.name!r}: use lower-case letters, digits and '_'")
    if self.kind not in KINDS:
      raise ValueError(f"scenario {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}")
    if not self.rate > 0:
      raise ValueError(f"scenario {self.name!r}: rate must be positive, got {self.rate}")
    if not 0 < self.train_fraction <= 1:
      raise ValueError(f"scenario {self.name!r}: train_fraction must be in (0, 1], got {self.train_fraction}")
    if self.context < 0:
      raise ValueError(f"scenario {self.name!r}: context must be >= 0, got {self.context}")
    if self.history < 0:
      raise ValueError(f"scenario {self.name!r}: history must be >= 0 (0: all behaviours), got {self.history}")
    try:
      lo, hi = (float(x) for x in self.train_events)
    except (TypeError, ValueError):
      raise ValueError(f"scenario {self.name!r}: train_events must be a pair (lo, hi), got {self.train_events!r}")
    if not 0 <= lo < hi <= 1:
      raise ValueError(f"scenario {self.name!r}: train_events must satisfy 0 <= lo < hi <= 1, got {self.train_events!r}")
    object.__setattr__(self, "train_events", (lo, hi))  # a list from JSON (the artifact) -> a tuple

  def kept_behaviours(self, history: Sequence) -> Sequence:
    """What a row of this scenario keeps of a history (oldest first; for item_to_item the trigger
    is the last one): item_to_item the trigger and `context` behaviours before it, then at most
    `history` behaviours. Training rows and inference requests are cut by this one rule."""
    if self.kind == "item_to_item":
      history = history[-(self.context + 1):]
    return history[-self.history:] if self.history else history


# --------------------------------------------------------------------------- search queries

_STOPWORDS = frozenset("""a an and are as at be by for from has have in into is it its of on or per set sets
that the this to with without x pack pcs piece pieces count inch inches""".split())
_WORD_RE = re.compile(r"[a-z][a-z']*[a-z]|[a-z]")


def _words(text: str) -> list[str]:
  return _WORD_RE.findall(text.lower())


def search_query(meta: Optional[readers.ItemMeta], max_words: int = 5) -> str:
  """The query for a target item, from its catalogue entry only.

  Rule (the Amazon product-search protocol of Ai et al., SIGIR 2017, where queries are the
  words of the target's category path; its fallback where categories are empty, as in both
  2018 catalogues shipped here, is title keywords):
    * source: the category path if the entry has one, else the title;
    * words: lower-cased alphabetic tokens (digits and model numbers dropped), without
      stopwords and without the words of the brand (a query names the need, not the item);
    * the first `max_words` distinct such words, in order.
  Empty when nothing is left (such a target has no search example).
  """
  if meta is None:
    return ""
  source = meta.categories.replace(">", " ") if meta.categories else meta.title
  brand = set(_words(meta.brand))
  out: list[str] = []
  for w in _words(source):
    if len(w) < 2 or w in _STOPWORDS or w in brand or w in out:
      continue
    out.append(w)
    if len(out) == max_words:
      break
  return " ".join(out)


def normalise_query(text: str) -> str:
  """A user's query in the training queries' form: its lower-cased words, stopwords dropped."""
  return " ".join(w for w in _words(text) if w not in _STOPWORDS)


def query_embeddings(catalogue: Catalogue, domain: str, *, cache_dir: str | os.PathLike | None = None,
                     encoder=None) -> tuple[np.ndarray, list[str]]:
  """([n_d + 1, 384] query embedding per item of `domain`, the queries); row 0 and items with
  an empty query are zeros. Cached in `cache_dir` (default `<repo>/.cache/queries`) under a key
  of the queries' text, the rule version and the encoder: other text, another rule or another
  encoder is another file."""
  from oxyjax.sid import embeddings as emb_lib

  items = catalogue.items_of(domain)
  queries = [""] + [search_query(catalogue.meta(int(i))) for i in items]
  encoder = encoder or emb_lib.SentenceEncoder()
  enc_id = encoder.fingerprint
  key = hashlib.sha256(json.dumps({"queries": queries, "rule": QUERY_RULE_VERSION, "encoder": enc_id},
                                  sort_keys=True).encode()).hexdigest()[:16]
  base = Path(cache_dir) if cache_dir is not None else _REPO_ROOT / ".cache" / "queries"
  path = base / f"{readers.resolve_dataset_name(domain)}_{key}.npy"
  if path.exists():
    try:
      arr = np.load(path)
      if arr.shape == (len(queries), encoder.dim):
        return arr.astype(np.float32), queries
    except (OSError, ValueError):
      pass  # unreadable: recomputed and replaced below
  out = np.zeros((len(queries), encoder.dim), np.float32)
  rows = [i for i, q in enumerate(queries) if q]
  if rows:
    out[rows] = encoder.encode([queries[i] for i in rows])
  fileio.save_npy(path, out)
  return out, queries


# --------------------------------------------------------------------------- scenario examples


@dataclasses.dataclass
class Scenario:
  """A scenario's id, settings, pool and examples per split (joint item indices)."""

  id: int
  config: ScenarioConfig
  pool: np.ndarray  # joint item indices the decoder may return
  splits: dict[str, pipeline.ExampleArrays]
  skipped: dict[str, int]  # examples dropped per split (a search target with an empty query)

  @property
  def name(self) -> str:
    return self.config.name


def _subset(n: int, fraction: float, name: str) -> np.ndarray:
  keep = max(1, int(round(n * fraction)))
  seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
  return np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))


def event_draws(domain: str, users: Sequence[int], positions: Sequence[int]) -> np.ndarray:
  """The fixed uniform draw in [0, 1) of each training event of `domain` (user index, position of
  the target in the user's sequence = its history length): a hash, independent of the order of the
  events and of the other scenarios, so a scenario's `train_events` slice is the same in every run."""
  name = readers.resolve_dataset_name(domain)
  out = np.empty((len(users),), np.float64)
  for k, (u, p) in enumerate(zip(users, positions)):
    h = hashlib.blake2b(f"{name}/{int(u)}/{int(p)}".encode(), digest_size=8).digest()
    out[k] = int.from_bytes(h, "little") / 2.0**64
  return out


def _scenario_split(catalogue: Catalogue, cfg: ScenarioConfig, sid: int, split: str, max_history: int,
                    instruction_dim: int, queries: Optional[np.ndarray],
                    instruction_lookup: Optional[InstructionLookup] = None) -> tuple[pipeline.ExampleArrays, int]:
  ds = catalogue.dataset(cfg.domain)
  examples = ds.split(split)
  if split == "train" and cfg.train_events != (0.0, 1.0):
    lo, hi = cfg.train_events
    u = event_draws(cfg.domain, [ex.user for ex in examples], [len(ex.history) for ex in examples])
    examples = [ex for ex, x in zip(examples, u) if lo <= x < hi]
  skipped = 0
  if cfg.kind == "search":
    has_query = queries is not None and np.any(queries != 0, axis=1)
    kept = [ex for ex in examples if has_query[ex.target]]
    skipped = len(examples) - len(kept)
    examples = kept
  if cfg.kind == "item_to_item" or cfg.history:
    examples = [readers.Example(ex.user, cfg.kept_behaviours(ex.history), ex.target) for ex in examples]
  if split == "train" and cfg.train_fraction < 1:
    examples = [examples[i] for i in _subset(len(examples), cfg.train_fraction, cfg.name)]
  arrays = pipeline.examples_to_arrays(examples, max_history, scenario=sid)
  local_targets = arrays.target.copy()
  arrays.history[:] = catalogue.to_joint(cfg.domain, arrays.history)
  arrays.target[:] = catalogue.to_joint(cfg.domain, arrays.target)
  arrays.user[:] = catalogue.user_to_joint(cfg.domain, arrays.user)
  n = len(arrays)
  trigger = np.zeros((n,), np.int32)
  if cfg.kind == "item_to_item" and n:
    trigger = arrays.history[np.arange(n), np.maximum(arrays.history_len - 1, 0)]
  extras = {"trigger": trigger}
  if instruction_dim:
    emb = np.zeros((n, instruction_dim), np.float32)
    mask = np.zeros((n,), bool)
    if cfg.kind == "search":
      if queries.shape[1] != instruction_dim:
        raise ValueError(f"scenario {cfg.name!r}: query embeddings are {queries.shape[1]}-d, the model reads "
                         f"instruction_dim={instruction_dim}")
      emb[:] = queries[local_targets]
      mask[:] = True
    elif instruction_lookup is not None and n:
      found = instruction_lookup(cfg, ds, split, examples)
      if found is not None:
        emb[:], mask[:] = found
    extras.update(instruction_embedding=emb, instruction_mask=mask)
  return arrays.with_extras(**extras), skipped


def build_scenarios(catalogue: Catalogue, configs: Sequence[ScenarioConfig], *, max_history: int,
                    instruction_dim: int = 0, splits: Sequence[str] = readers.SPLITS,
                    query_cache_dir: str | os.PathLike | None = None, query_encoder=None,
                    instruction_lookup: Optional[InstructionLookup] = None) -> list[Scenario]:
  """The scenarios' examples, ids (their order in `configs`) and pools. `query_encoder`
  (default all-MiniLM-L6-v2) embeds search queries; see `query_embeddings`. `instruction_lookup`
  gives the non-search scenarios their generated reasoning instructions (`InstructionLookup`)."""
  names = [c.name for c in configs]
  if len(set(names)) != len(names):
    raise ValueError(f"scenario names must be distinct, got {names}")
  queries: dict[str, np.ndarray] = {}
  out = []
  for sid, cfg in enumerate(configs):
    catalogue.domain_index(cfg.domain)  # a clear error for a domain outside the catalogue
    q = None
    if cfg.kind == "search":
      if not catalogue.has_text(cfg.domain):
        raise ValueError(f"scenario {cfg.name!r}: search needs item text, and {cfg.domain!r} has none")
      if not instruction_dim:
        raise ValueError(f"scenario {cfg.name!r}: search feeds its query as I_r; set ModelConfig.instruction_dim "
                         "(384 for all-MiniLM-L6-v2)")
      if cfg.domain not in queries:
        queries[cfg.domain] = query_embeddings(catalogue, cfg.domain, cache_dir=query_cache_dir,
                                               encoder=query_encoder)[0]
      q = queries[cfg.domain]
    parts, skipped = {}, {}
    for split in splits:
      parts[split], skipped[split] = _scenario_split(catalogue, cfg, sid, split, max_history, instruction_dim, q,
                                                     instruction_lookup)
    out.append(Scenario(sid, cfg, catalogue.items_of(cfg.domain), parts, skipped))
  return out
