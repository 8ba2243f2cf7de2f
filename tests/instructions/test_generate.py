"""The job: no target leakage, backend failures, refresh skipping, example selection."""

from __future__ import annotations

import io


from oxyjax.instructions import prompt as P
from oxyjax.instructions.generate import run_job, select_examples
from oxyjax.instructions.llm import BackendError
from oxyjax.instructions.store import InstructionStore
from tests.instructions.conftest import DownBackend, EchoBackend, HashEncoder, sentinel


def _stored_texts(store, dataset, examples):
  texts = []
  for ex in examples:
    r = store.get_for_example(dataset, ex)
    texts.append(None if r is None else r.text)
  return texts


def _run(dataset, examples, path, backend, **kw):
  store = InstructionStore(path)
  stats = run_job(dataset, examples, store, backend, HashEncoder(), batch_size=5, chunk_size=7,
                  progress_stream=io.StringIO(), **kw)
  return InstructionStore(path), stats


def test_no_target_leakage(tmp_path, tiny_dataset):
  examples = select_examples(tiny_dataset, ["test", "validation"], train_fraction=0.5, seed=1)
  examples = [ex for ex in examples if ex.target not in ex.history]
  store, stats = _run(tiny_dataset, examples, tmp_path, EchoBackend())
  assert stats.generated == len(examples) and stats.failed == 0
  texts = _stored_texts(store, tiny_dataset, examples)
  for ex, text in zip(examples, texts):
    assert text is not None
    assert sentinel(ex.history[-1]) in text  # the echo works: history titles do get through
    assert sentinel(ex.target) not in text  # ... and the target's never does
  assert P.find_leaks(tiny_dataset, examples, texts) == []


def test_leak_checker_flags_a_leaky_builder(tmp_path, tiny_dataset):
  examples = [ex for ex in tiny_dataset.test if ex.target not in ex.history]
  store, _ = _run(tiny_dataset, examples, tmp_path, EchoBackend(),
                  context_fn=P.leaky_context_for_example)
  texts = _stored_texts(store, tiny_dataset, examples)
  assert P.find_leaks(tiny_dataset, examples, texts) == list(range(len(examples)))


def test_backend_down_job_finishes_and_nothing_is_present(tmp_path, tiny_dataset):
  examples = tiny_dataset.test + tiny_dataset.validation
  backend = DownBackend()
  store, stats = _run(tiny_dataset, examples, tmp_path, backend)
  assert backend.calls == -(-len(examples) // 5)  # every batch was tried
  assert stats.generated == 0 and stats.failed == len(examples)
  assert not [r for r in store.records() if r.status == "generated"]
  emb, present, counts = store.lookup_embeddings(tiny_dataset, examples, "homepage")
  assert not present.any() and not emb.any() and counts["missing"] == len(examples)


class FlakyBackend(EchoBackend):
  """Fails on its second call, and answers an empty string for one row."""

  def generate(self, messages_batch):
    out = super().generate(messages_batch)
    if self.calls == 2:
      raise BackendError("temporarily down")
    out[0] = "   "
    return out


def test_partial_failure_and_refresh_skipping(tmp_path, tiny_dataset):
  examples = tiny_dataset.test  # 12 examples -> batches of 5, 5, 2
  store, stats = _run(tiny_dataset, examples, tmp_path, FlakyBackend(), now_fn=lambda: 1000.0)
  assert stats.failed == 5 and stats.fallback == 2 and stats.generated == 5
  _, present, counts = store.lookup_embeddings(tiny_dataset, examples, now=1000.0)
  assert present.sum() == 5 and counts == {"generated": 5, "missing": 5, "stale": 0, "fallback": 2}
  # a second run only regenerates the failed rows
  _, stats2 = _run(tiny_dataset, examples, tmp_path, EchoBackend(), now_fn=lambda: 1001.0,
                   max_age_s=300)
  assert stats2.fresh == 7 and stats2.generated == 5
  # past the window everything is regenerated
  store3, stats3 = _run(tiny_dataset, examples, tmp_path, EchoBackend(), now_fn=lambda: 5000.0,
                        max_age_s=300)
  assert stats3.fresh == 0 and stats3.generated == 12
  assert store3.lookup_embeddings(tiny_dataset, examples, now=5000.0, max_age_s=300)[1].all()


def test_select_examples(tiny_dataset):
  a = select_examples(tiny_dataset, ["test"], train_fraction=0.25, seed=3)
  b = select_examples(tiny_dataset, ["test"], train_fraction=0.25, seed=3)
  assert a == b and len(a) == 12 + 12
  assert a[:12] == tiny_dataset.test
  assert len(select_examples(tiny_dataset, ["test", "validation"], max_examples=5)) == 5
