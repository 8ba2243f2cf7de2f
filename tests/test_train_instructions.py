"""The trainer with reasoning instructions: a down LLM backend leaves the store without
instructions and training goes on with the learned default; examples that do carry a
generated instruction read it and are also evaluated as their own subset (eval_only)."""

import json
import os

import numpy as np

from oxyjax import train as train_lib
from oxyjax.data import readers
from oxyjax.instructions import generate, prompt
from oxyjax.instructions.llm import BackendError
from oxyjax.instructions.store import InstructionRecord, InstructionStore, record_key
from oxyjax.models.encoder_decoder import ModelConfig

TINY = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                   dropout_rate=0.0, max_history=10, instruction_dim=384, igr_recent=3, igr_top_k=3, igr_dim=16,
                   use_trigger_item=True)


class _Down:
  version = "down-v0"

  def generate(self, messages_batch):
    raise BackendError("connection refused (test)")


class _NoEncoder:
  def encode(self, texts, **kw):
    raise AssertionError("nothing to embed when the backend is down")


EVAL_N = 256  # a fixed random subset of test (the instruction-covered subset is evaluated whole)


def _train(model_dir, store, **kw):
  args = dict(dataset="industrial", model_config=TINY, model_dir=str(model_dir), batch_size=64, num_train_steps=4,
              num_epochs=None, eval_every_steps=0, eval_batch_size=64, eval_beam_size=5,
              final_eval_splits=("test",), final_eval_max_examples=EVAL_N, checkpoint_every_steps=4, async_checkpointing=False, log_every_steps=2,
              sid=train_lib.SIDConfig(codebook_size=16, embedding="collaborative"),
              q2i=train_lib.losses.Q2IConfig(weight=0.1), data_source="readers",
              instructions=train_lib.InstructionsConfig(store=str(store)), verbose=False)
  args.update(kw)
  return train_lib.train(**args)


def test_backend_down_then_training_continues_and_covered_subset_is_evaluated(tmp_path):
  ds = readers.load_dataset("industrial")
  store = InstructionStore(tmp_path / "store")
  stats = generate.run_job(ds, ds.test[:20], store, _Down(), _NoEncoder(), batch_size=8)
  assert stats.failed == 20 and stats.generated == 0
  present = train_lib.instruction_coverage("industrial", "test", train_lib.InstructionsConfig(store=str(tmp_path / "store")))
  assert not present.any()

  result = _train(tmp_path / "run", tmp_path / "store")
  assert result.final_step == 4
  assert result.test["num_examples"] == EVAL_N  # all with the default instruction
  summary = json.load(open(tmp_path / "run" / "run_summary.json"))
  assert set(summary["results"]) == {"test"}  # nothing covered: no subset

  # The backend comes back for a few users: their test examples now carry an instruction.
  rng = np.random.default_rng(0)
  covered = [3, 10, 17, 25]
  # (the context key of the example's prompt: a lookup serves only records whose context still matches)
  store.put([InstructionRecord(*record_key(ds, ds.test[i]), text=f"needs item {i}",
                               embedding=rng.normal(size=384).astype(np.float32), model_version="test",
                               created_at=1e9, context_key=prompt.context_key(prompt.context_for_example(ds, ds.test[i])))
             for i in covered])
  present = train_lib.instruction_coverage("industrial", "test", train_lib.InstructionsConfig(store=str(tmp_path / "store")))
  assert np.flatnonzero(present).tolist() == covered
  loaded = train_lib.load_instructions(
      train_lib.pipeline.load_split("industrial", "test", 10, source="readers"), "industrial", "test",
      train_lib.InstructionsConfig(store=str(tmp_path / "store")), 384, log=lambda *a: None)
  assert loaded.extras["instruction_mask"].sum() == 4
  assert np.abs(loaded.extras["instruction_embedding"][covered]).sum() > 0

  # eval_only: no training; the results are merged into the run's summary.
  again = _train(tmp_path / "run", tmp_path / "store", eval_only=True)
  assert again.final_step == 4
  summary = json.load(open(tmp_path / "run" / "run_summary.json"))
  assert summary["results"]["test_with_instruction"]["num_examples"] == 4
  assert summary["results"]["test"]["num_examples"] == EVAL_N
  assert summary["train_seconds"] > 0  # the training record is kept
  assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "run"))
