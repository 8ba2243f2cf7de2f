"""Catalogue, scenarios, their seqio mixture and the mixture iterator (issue 14)."""

import dataclasses
import hashlib
import re

import numpy as np
import pytest

from oxyjax.data import pipeline, readers
from oxyjax.data.catalogue import Catalogue, CatalogueError
from oxyjax.data.scenarios import ScenarioConfig, build_scenarios, search_query
from tests.data.conftest import REPO


class HashEncoder:
  """A deterministic stand-in sentence encoder (a hash of the text); the real MiniLM is tested in
  tests/sid/test_embeddings.py. Only what `query_embeddings` uses."""

  dim = 8
  fingerprint = {"model": "hash-encoder-for-tests"}

  def __init__(self):
    self.calls = 0

  def encode(self, texts):
    self.calls += 1
    out = np.array([np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], np.uint8) for t in texts], np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalogue():
  return Catalogue.load(["office", "industrial"])


def _words(text):
  return set(re.findall(r"[a-z][a-z']*[a-z]|[a-z]", text.lower()))


# ---------------------------------------------------------------- search queries

def test_search_query_holds_only_words_of_the_targets_entry(catalogue):
  """Every query word comes from the target's own title (both catalogues have no categories),
  never its brand, description or another item; checked over every item of both catalogues."""
  n_nonempty = 0
  for i in range(1, catalogue.num_items + 1):
    meta = catalogue.meta(i)
    q = search_query(meta)
    words = q.split()
    assert len(words) <= 5 and len(set(words)) == len(words)
    source = _words(meta.categories.replace(">", " ") if meta.categories else meta.title)
    assert set(words) <= source, (i, q, meta.title)
    assert not set(words) & _words(meta.brand), (i, q, meta.brand)
    n_nonempty += bool(q)
  assert n_nonempty > 0.95 * catalogue.num_items


def test_search_query_uses_the_category_path_when_there_is_one():
  meta = readers.ItemMeta(title="Acme Turbo Stapler 3000", brand="Acme", description="staples paper quickly",
                          categories="Office Products > Office Supplies > Staplers")
  q = search_query(meta).split()
  assert q == ["office", "products", "supplies", "staplers"]  # the path's distinct words, in order
  assert search_query(readers.ItemMeta(title="Acme 3000", brand="Acme")) == ""  # nothing left: no query
  assert search_query(None) == ""


# ---------------------------------------------------------------- catalogue

def test_catalogue_joins_item_spaces_without_collisions(catalogue):
  office, industrial = catalogue.datasets
  assert catalogue.num_items == office.num_items + industrial.num_items
  assert catalogue.index("office/0") == 1 and catalogue.index("industrial/0") == office.num_items + 1
  j = catalogue.to_joint("industrial", [0, 1, industrial.num_items])
  assert j.tolist() == [0, office.num_items + 1, catalogue.num_items]
  assert catalogue.domain_of[catalogue.items_of("industrial")].tolist() == [1] * industrial.num_items
  assert catalogue.title(catalogue.index("industrial/5")) == industrial.item_meta[industrial.item_index["5"]].title
  with pytest.raises(CatalogueError, match="unknown item id '5'.*<domain>/<raw id>"):
    catalogue.index("5")
  with pytest.raises(CatalogueError, match="'beauty' is not in the catalogue"):
    catalogue.domain_index("beauty")
  # raw users too: user u of each domain is a different joint user
  assert catalogue.user_to_joint("industrial", [1]).item() == office.num_users + 1


def test_joint_sid_codes_prefix_the_domain_and_keep_each_domains_paths(catalogue):
  rng = np.random.default_rng(0)
  tables = []
  for ds in catalogue.datasets:
    t = np.zeros((ds.num_items + 1, 3), np.int32)
    t[1:, :2] = rng.integers(0, 4, (ds.num_items, 2))
    t[1:, 2] = np.arange(ds.num_items)  # unique within the domain
    tables.append(t)
  codes = catalogue.joint_sid_codes(tables)
  assert codes.shape == (catalogue.num_items + 1, 4) and not codes[0].any()
  assert np.unique(codes[1:], axis=0).shape[0] == catalogue.num_items  # unique across domains too
  for d, t in enumerate(tables):
    rows = catalogue.items_of(catalogue.domains[d])
    assert (codes[rows, 0] == d).all() and np.array_equal(codes[rows, 1:], t[1:])
  with pytest.raises(CatalogueError, match="different numbers of levels"):
    catalogue.joint_sid_codes([tables[0], tables[1][:, :2]])
  one = Catalogue.load(["office"])
  assert np.array_equal(one.joint_sid_codes(tables[:1]), tables[0])  # one domain: unchanged


def test_disjoint_joint_sid_codes_give_every_domain_its_own_tokens(catalogue):
  """`SIDConfig.joint_codes = 'disjoint'`: below the domain level no code token is used by two
  domains, and each domain's codes are its own table's shifted by the earlier domains' sizes."""
  rng = np.random.default_rng(1)
  sizes = [(4, 4, 0), (3, 5, 0)]
  tables = []
  for ds, size in zip(catalogue.datasets, sizes):
    t = np.zeros((ds.num_items + 1, 3), np.int32)
    t[1:, 0] = rng.integers(0, size[0], ds.num_items)
    t[1:, 1] = rng.integers(0, size[1], ds.num_items)
    t[1:, 2] = np.arange(ds.num_items)
    tables.append(t)
  sizes = [(a, b, t[1:, 2].max() + 1) for (a, b, _), t in zip(sizes, tables)]
  codes = catalogue.joint_sid_codes(tables, sizes)
  rows = [catalogue.items_of(d) for d in catalogue.domains]
  for level in (1, 2, 3):
    assert not set(codes[rows[0], level]) & set(codes[rows[1], level]), level
  assert np.array_equal(codes[rows[0], 1:], tables[0][1:])  # the first domain keeps its codes
  assert np.array_equal(codes[rows[1], 1:] - np.asarray(sizes[0]), tables[1][1:])
  assert np.array_equal(codes[:, 0], catalogue.joint_sid_codes(tables)[:, 0])  # the domain level is unchanged
  too_small = [sizes[0], (2, 5, sizes[1][2])]  # the second domain's level-1 codes reach 2
  with pytest.raises(CatalogueError, match="'industrial' exceed its codebook sizes"):
    catalogue.joint_sid_codes(tables, too_small)
  from oxyjax import experiment
  with pytest.raises(ValueError, match="joint_codes must be 'shared' or 'disjoint', got 'merged'"):
    experiment.joint_sid_table(catalogue, experiment.SIDConfig(joint_codes="merged"))


# ---------------------------------------------------------------- scenarios

@pytest.fixture(scope="module")
def built(catalogue, tmp_path_factory):
  configs = [ScenarioConfig("office_homepage", "homepage", "office"),
             ScenarioConfig("industrial_i2i", "item_to_item", "industrial", context=2),
             ScenarioConfig("industrial_i2i_poor", "item_to_item", "industrial", train_fraction=0.1, rate=0.2),
             ScenarioConfig("office_search", "search", "office", rate=0.5)]
  enc = HashEncoder()
  out = build_scenarios(catalogue, configs, max_history=10, instruction_dim=HashEncoder.dim,
                        query_cache_dir=tmp_path_factory.mktemp("queries"), query_encoder=enc)
  return configs, out


def test_scenarios_are_the_domains_splits_in_joint_ids(catalogue, built):
  _, (home, i2i, poor, search) = built
  office, industrial = catalogue.datasets
  for split in readers.SPLITS:
    ref = pipeline.examples_to_arrays(office.split(split), 10)
    a = home.splits[split]
    assert np.array_equal(a.target, catalogue.to_joint("office", ref.target))
    assert np.array_equal(a.history, catalogue.to_joint("office", ref.history))
    assert (a.scenario == 0).all() and (a.extras["trigger"] == 0).all()
    assert not a.extras["instruction_mask"].any()  # homepage: the learned default I_r
  assert np.array_equal(home.pool, catalogue.items_of("office"))
  assert np.array_equal(i2i.pool, catalogue.items_of("industrial"))
  # item-to-item: the trigger is the last behaviour before the target, with <= 2 behaviours before it
  for split in readers.SPLITS:
    a = i2i.splits[split]
    ref = industrial.split(split)
    assert (a.history_len <= 3).all() and (a.scenario == 1).all()
    last = a.history[np.arange(len(a)), a.history_len - 1]
    assert np.array_equal(a.extras["trigger"], last)
    assert np.array_equal(last, catalogue.to_joint("industrial", [ex.history[-1] for ex in ref]))
    assert np.array_equal(a.target, catalogue.to_joint("industrial", [ex.target for ex in ref]))


def test_data_poor_scenario_keeps_a_fixed_tenth_of_training_only(built):
  _, (_, i2i, poor, _) = built
  n = len(i2i.splits["train"])
  assert len(poor.splits["train"]) == round(0.1 * n)
  assert _events(poor.splits["train"]) < _events(i2i.splits["train"])
  for split in ("validation", "test"):
    assert np.array_equal(poor.splits[split].target, i2i.splits[split].target)


def _events(arrays):
  """(user, target, history) of each row: one training event."""
  return {(u, t, tuple(h)) for u, t, h in zip(arrays.user, arrays.target, arrays.history.tolist())}


def test_train_event_slices_partition_a_domains_training_events(catalogue, tmp_path):
  """Scenarios of one domain with non-overlapping `train_events` slices train on disjoint events
  whose union is every event; the slice does not depend on the other scenarios of the run
  (a scenario trained alone gets the same rows); validation and test stay complete."""
  whole = ScenarioConfig("office_homepage", "homepage", "office")
  thirds = [ScenarioConfig(f"office_home{k}", "homepage", "office", train_events=(k / 3, (k + 1) / 3))
            for k in range(3)]
  out = build_scenarios(catalogue, [whole, *thirds], max_history=10)
  every = _events(out[0].splits["train"])
  parts = [_events(s.splits["train"]) for s in out[1:]]
  assert sum(len(p) for p in parts) == len(every) == len(out[0].splits["train"])
  assert set().union(*parts) == every
  assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
  # each slice holds about a third (the draws are uniform): a binomial(n, 1/3) count is within
  # 5 standard deviations of n/3 except with probability < 1e-6
  n = len(every)
  assert all(abs(len(p) - n / 3) < 5 * np.sqrt(n * 2 / 9) for p in parts)
  alone = build_scenarios(catalogue, [thirds[1]], max_history=10)[0]
  assert _events(alone.splits["train"]) == parts[1]
  for split in ("validation", "test"):
    assert np.array_equal(out[2].splits[split].target, out[0].splits[split].target)
  # a search scenario on the same slice as a homepage one: the same events, less those without a query
  search_cfg = ScenarioConfig("office_search2", "search", "office", train_events=thirds[2].train_events)
  search = build_scenarios(catalogue, [search_cfg], max_history=10, instruction_dim=HashEncoder.dim,
                           query_cache_dir=tmp_path, query_encoder=HashEncoder())[0]
  assert _events(search.splits["train"]) <= parts[2]
  assert len(search.splits["train"]) + search.skipped["train"] == len(parts[2])
  # the artifact stores the slice as a JSON list; it reads back as the same config
  assert ScenarioConfig(**{**thirds[1].__dict__, "train_events": list(thirds[1].train_events)}) == thirds[1]


def test_a_scenarios_history_cut_keeps_the_most_recent_behaviours_in_every_split(catalogue, built, tmp_path):
  """`history=2`: every row of every split keeps the last two behaviours of the full row (the
  ones nearest the target), the same targets and queries; the other scenarios are untouched."""
  _, (_, _, _, search) = built
  cut_cfg = ScenarioConfig("office_search", "search", "office", rate=0.5, history=2)
  (cut,) = build_scenarios(catalogue, [cut_cfg], max_history=10, instruction_dim=HashEncoder.dim,
                           query_cache_dir=tmp_path, query_encoder=HashEncoder())
  for split in readers.SPLITS:
    full, short = search.splits[split], cut.splits[split]
    assert np.array_equal(short.target, full.target) and np.array_equal(short.user, full.user)
    np.testing.assert_array_equal(short.extras["instruction_embedding"], full.extras["instruction_embedding"])
    assert np.array_equal(short.history_len, np.minimum(full.history_len, 2))
    assert (full.history_len > 2).any()  # the cut removes something
    for i in range(len(full)):  # left-aligned rows: the kept ones are the full row's last two
      n, m = full.history_len[i], short.history_len[i]
      assert list(short.history[i, :m]) == list(full.history[i, n - m:n])
  with pytest.raises(ValueError, match="history must be >= 0"):
    ScenarioConfig("office_search", "search", "office", history=-1)


def test_search_rows_carry_their_targets_query_embedding(catalogue, built, tmp_path):
  _, (_, _, _, search) = built
  a = search.splits["test"]
  assert a.extras["instruction_mask"].all() and (a.scenario == 3).all()
  enc = HashEncoder()
  local = a.target - catalogue.offsets[0]
  expected = enc.encode([search_query(catalogue.meta(int(t))) for t in a.target[:50]])
  np.testing.assert_array_equal(a.extras["instruction_embedding"][:50], expected)
  assert sum(search.skipped.values()) == sum(
      1 for split in readers.SPLITS for ex in catalogue.dataset("office").split(split)
      if not search_query(catalogue.dataset("office").item_meta[ex.target]))
  assert local.min() >= 1


def test_query_embeddings_are_cached_by_content(catalogue, tmp_path):
  from oxyjax.data.scenarios import query_embeddings

  enc = HashEncoder()
  a, _ = query_embeddings(catalogue, "office", cache_dir=tmp_path, encoder=enc)
  b, _ = query_embeddings(catalogue, "office", cache_dir=tmp_path, encoder=enc)
  assert enc.calls == 1 and np.array_equal(a, b)  # the second read is the cache

  class Other(HashEncoder):
    fingerprint = {"model": "another encoder"}

  other = Other()
  query_embeddings(catalogue, "office", cache_dir=tmp_path, encoder=other)
  assert other.calls == 1  # another encoder is another cache entry, never the first's vectors


def test_scenario_config_errors(catalogue):
  with pytest.raises(ValueError, match="unknown kind 'feed'"):
    ScenarioConfig("x", "feed", "office")
  with pytest.raises(ValueError, match="train_fraction"):
    ScenarioConfig("x", "homepage", "office", train_fraction=0.0)
  with pytest.raises(ValueError, match="lower-case"):
    ScenarioConfig("Office Home", "homepage", "office")
  with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
    ScenarioConfig("x", "homepage", "office", train_events=(0.5, 0.5))
  with pytest.raises(ValueError, match="a pair"):
    ScenarioConfig("x", "homepage", "office", train_events=0.5)
  with pytest.raises(ValueError, match="search needs item text"):
    build_scenarios(Catalogue.load(["beauty"]), [ScenarioConfig("s", "search", "beauty")], max_history=5,
                    instruction_dim=8)
  with pytest.raises(ValueError, match="set ModelConfig.instruction_dim"):
    build_scenarios(catalogue, [ScenarioConfig("s", "search", "office")], max_history=5)
  with pytest.raises(CatalogueError, match="not in the catalogue"):
    build_scenarios(catalogue, [ScenarioConfig("s", "homepage", "beauty")], max_history=5)


# ---------------------------------------------------------------- the mixture iterator

def _parts(sizes):
  return [pipeline.ExampleArrays.zeros(n, 2).with_extras(task=np.full((n,), t, np.int32), row=np.arange(n))
          for t, n in enumerate(sizes)]


def test_mixture_iterator_samples_tasks_by_rate():
  """Task shares of the rows follow the rates, not the tasks' sizes (sizes are chosen against
  the rates). Each row is an independent draw with probability p = rate / sum(rates), so the
  share over n rows has standard deviation sqrt(p (1 - p) / n); 5 sd bounds a false alarm at
  about 6e-7 per task."""
  sizes, rates = [50, 400, 2000], [1.0, 0.5, 0.2]
  it = pipeline.MixtureBatchIterator(_parts(sizes), rates, 64, seed=3)
  rows = np.concatenate([next(it).extras["task"] for _ in range(300)])
  n = rows.size
  p = np.asarray(rates) / sum(rates)
  share = np.bincount(rows, minlength=3) / n
  sd = np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(share - p) < 5 * sd), (share, p)
  # a uniform-over-examples sampler would give the largest task ~81% of the rows
  assert share[2] < 0.3


def test_mixture_iterator_visits_each_tasks_examples_once_per_epoch_and_resumes_exactly():
  sizes, rates = [30, 70], [1.0, 1.0]
  it = pipeline.MixtureBatchIterator(_parts(sizes), rates, 16, seed=0)
  seen = {0: [], 1: []}
  for _ in range(20):
    b = next(it)
    for t, r in zip(b.extras["task"], b.extras["row"]):
      seen[int(t)].append(int(r))
  for t, n in enumerate(sizes):
    # every example once per epoch: after `full` epochs and `rest` rows of the next, each row has
    # been seen `full` times, and exactly `rest` rows once more
    full, rest = divmod(len(seen[t]), n)
    counts = np.bincount(seen[t], minlength=n)
    assert set(counts.tolist()) <= {full, full + 1} and int((counts == full + 1).sum()) == rest
    assert full >= 1
  state = it.state()
  cont = [next(it) for _ in range(5)]
  it2 = pipeline.MixtureBatchIterator(_parts(sizes), rates, 16, seed=0)
  it2.restore(state)
  for a in cont:
    assert a.equals(next(it2))
  with pytest.raises(ValueError, match="num_examples"):
    pipeline.MixtureBatchIterator(_parts([30, 71]), rates, 16).restore(state)


def test_mixture_iterator_process_slices_concatenate_to_the_global_batch():
  sizes, rates = [40, 90, 25], [1.0, 2.0, 0.5]
  one = pipeline.MixtureBatchIterator(_parts(sizes), rates, 32, seed=1)
  two = [pipeline.MixtureBatchIterator(_parts(sizes), rates, 32, seed=1, process_index=i, process_count=2)
         for i in range(2)]
  for _ in range(4):
    g = next(one)
    halves = [next(t) for t in two]
    assert pipeline.ExampleArrays.concatenate(halves).equals(g)


# ---------------------------------------------------------------- seqio

def test_seqio_mixture_holds_the_rates_and_serves_the_scenarios(catalogue, built):
  from oxyjax.data import scenario_tasks

  configs, scenarios = built
  mix = scenario_tasks.register_mixture(catalogue, scenarios, "oxyjax_test_mixture")
  names, parts, rates = scenario_tasks.mixture_parts(mix, "train", 10)
  by_name = {scenario_tasks.task_name("oxyjax_test_mixture", c.name): (c, s) for c, s in zip(configs, scenarios)}
  assert sorted(names) == sorted(by_name)
  for n, arrays, rate in zip(names, parts, rates):
    cfg, s = by_name[n]
    assert rate == cfg.rate
    assert arrays.equals(s.splits["train"]), n  # read through seqio: the same rows, features and extras
  short = scenario_tasks.mixture_parts(mix, "validation", 3)[1]
  assert max(int(a.history_len.max()) for a in short) == 3  # the most recent 3 behaviours kept


def test_scenario_gin_file_parses_to_the_documented_mixture():
  import gin

  from oxyjax import train  # noqa: F401  (registers oxyjax.train.* for gin)

  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        ["gin_configs/modes/pretrain.gin", "gin_configs/models/tiny.gin", "gin_configs/scenarios/amazon2018.gin"],
        ["MODEL_DIR = '/tmp/unused'"], skip_unknown=False)
    scen = gin.query_parameter("oxyjax.train.train.scenarios")
    configs = [r.scoped_configurable_fn() for r in scen]  # what train() receives when gin calls it
    rescoring = gin.query_parameter("oxyjax.train.train.rescoring").scoped_configurable_fn()
  finally:
    gin.clear_config()
  # the second stage: a weight per scenario id, 0 for the search scenarios (chosen on validation)
  weights = dict(zip([c.name for c in configs], rescoring.stage_weights([c.name for c in configs])))
  assert rescoring.enabled and rescoring.union == 10
  assert weights == {"office_homepage": 1.0, "industrial_homepage": 2.0, "office_i2i": 1.0,
                     "industrial_i2i_poor": 3.0, "office_search": 0.0, "industrial_search": 0.0}
  kinds = {c.name: (c.kind, c.domain, c.rate, c.train_fraction) for c in configs}
  assert kinds["industrial_i2i_poor"] == ("item_to_item", "industrial", 0.2, 0.1)
  assert {k for k, *_ in kinds.values()} == {"homepage", "item_to_item", "search"}
  assert all(c.train_events == (0.0, 1.0) for c in configs)


def _scenarios_of(gin_file):
  """(the ScenarioConfigs, ModelConfig.normalize_instruction) that gin_configs/scenarios/<gin_file> binds."""
  import gin

  from oxyjax import train  # noqa: F401

  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(REPO / "gin_configs"))
    gin.parse_config_files_and_bindings(
        ["gin_configs/modes/pretrain.gin", "gin_configs/models/tiny.gin", f"gin_configs/scenarios/{gin_file}"],
        ["MODEL_DIR = '/tmp/unused'"], skip_unknown=False)
    configs = [r.scoped_configurable_fn() for r in gin.query_parameter("oxyjax.train.train.scenarios")]
    return configs, gin.query_parameter("oxyjax.models.encoder_decoder.ModelConfig.normalize_instruction")
  finally:
    gin.clear_config()


def test_event_sliced_scenario_gin_file_gives_each_domains_scenarios_disjoint_slices():
  """amazon2018_events.gin: the same scenarios, the slices of each domain disjoint and covering [0, 1).
  amazon2018_events_search_context.gin: the same, with the search rows' history cut to 3."""
  configs, normalize = _scenarios_of("amazon2018_events.gin")
  assert len(configs) == 6 and normalize and all(c.history == 0 for c in configs)
  short, _ = _scenarios_of("amazon2018_events_search_context.gin")
  assert [c.history for c in short] == [3 if c.kind == "search" else 0 for c in configs]
  assert [dataclasses.replace(c, history=0) for c in short] == configs
  for domain in ("office", "industrial"):
    slices = sorted(c.train_events for c in configs if c.domain == domain)
    assert len(slices) == 3 and slices[0][0] == 0.0 and slices[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, no overlap


def test_homepage_rows_read_generated_instructions_from_the_store_and_other_kinds_do_not(catalogue, tmp_path):
  """With an instruction store, a homepage scenario's covered rows carry the stored I_r (keyed by
  their domain's dataset, user and history), every other row the learned default; item-to-item
  reads none, and search keeps its query."""
  from oxyjax.experiment import InstructionsConfig, scenario_instruction_lookup
  from oxyjax.instructions import prompt
  from oxyjax.instructions.store import InstructionRecord, InstructionStore, record_key

  office = catalogue.dataset("office")
  covered = [2, 7, 40]
  rng = np.random.default_rng(0)
  vecs = rng.normal(size=(len(covered), HashEncoder.dim)).astype(np.float32)
  store = InstructionStore(tmp_path / "store", dim=HashEncoder.dim)
  records = [InstructionRecord(*record_key(office, office.test[i]), text=f"needs {i}", embedding=v,
                               model_version="test", created_at=1e9,
                               context_key=prompt.context_key(prompt.context_for_example(office, office.test[i])))
             for i, v in zip(covered, vecs)]
  store.put(records)
  configs = [ScenarioConfig("office_homepage", "homepage", "office"),
             ScenarioConfig("office_i2i", "item_to_item", "office"),
             ScenarioConfig("office_search", "search", "office", rate=0.5)]
  lookup = scenario_instruction_lookup(InstructionsConfig(store=str(tmp_path / "store")), HashEncoder.dim,
                                       log=lambda *a: None)
  home, i2i, search = build_scenarios(catalogue, configs, max_history=10, instruction_dim=HashEncoder.dim,
                                      splits=("test",), query_cache_dir=tmp_path / "q", query_encoder=HashEncoder(),
                                      instruction_lookup=lookup)
  a = home.splits["test"]
  assert np.flatnonzero(a.extras["instruction_mask"]).tolist() == covered
  np.testing.assert_array_equal(a.extras["instruction_embedding"][covered], vecs)
  assert not a.extras["instruction_embedding"][~a.extras["instruction_mask"]].any()
  assert not i2i.splits["test"].extras["instruction_mask"].any()
  assert search.splits["test"].extras["instruction_mask"].all()
  # the store's scenario key decides which kind reads it
  none = scenario_instruction_lookup(InstructionsConfig(store=str(tmp_path / "store"), scenario="item_to_item"),
                                     HashEncoder.dim, log=lambda *a: None)
  (home2,) = build_scenarios(catalogue, configs[:1], max_history=10, instruction_dim=HashEncoder.dim,
                             splits=("test",), instruction_lookup=none)
  assert not home2.splits["test"].extras["instruction_mask"].any()
  with pytest.raises(FileNotFoundError, match="does not exist"):
    scenario_instruction_lookup(InstructionsConfig(store=str(tmp_path / "nowhere")), HashEncoder.dim)


def test_paired_evaluation_matches_rows_by_raw_ids_across_item_spaces(catalogue, built, tmp_path):
  """benchmarks/paired_eval.py pairs a unified model's scenario rows with those of a model trained on
  one domain alone (another item space) by content: the same examples fingerprint the same in both
  spaces, and a different set or order of rows does not."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("paired_eval", REPO / "benchmarks" / "paired_eval.py")
  pe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pe)
  _, (_, i2i, _, _) = built
  one = Catalogue.load(["industrial"])
  (one_i2i,) = build_scenarios(one, [ScenarioConfig("industrial_i2i", "item_to_item", "industrial", context=2)],
                               max_history=10, instruction_dim=HashEncoder.dim, query_cache_dir=tmp_path,
                               query_encoder=HashEncoder())
  joint_ids, one_ids = catalogue.qualified_ids(), one.qualified_ids()
  assert joint_ids[catalogue.index("industrial/5")] == one_ids[one.index("5")] == "industrial/5"
  a, b = i2i.splits["test"], one_i2i.splits["test"]
  assert not np.array_equal(a.target, b.target)  # the same rows in two item spaces
  fp = pe.rows_fingerprint(a, joint_ids)
  assert fp == pe.rows_fingerprint(b, one_ids)
  assert fp != pe.rows_fingerprint(a.take(np.arange(1, len(a))), joint_ids)  # a row fewer
  assert fp != pe.rows_fingerprint(a.take(np.arange(len(a))[::-1]), joint_ids)  # another order
  assert fp != pe.rows_fingerprint(i2i.splits["validation"], joint_ids)
