"""Multi-host: `distributed.initialize` and its env contract, 2 processes x 4 CPU devices train to
the same result as 1 process x 8, cross-host agreement checks, and resharding a checkpoint."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from oxyjax import checkpoints
from oxyjax import distributed
from oxyjax import partitioning
from oxyjax import train as train_lib
from oxyjax.models.encoder_decoder import ModelConfig
from tests.test_train_step import EPS32, _adam_drift_bound, _rounding_tol
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "distributed_worker.py")
TIMEOUT_S = 420
ENV_NAMES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_COUNT",
             "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID")


# ---------------------------------------------------------------------- initialize()
@pytest.fixture
def clean_env(monkeypatch):
  for name in ENV_NAMES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_initialize_is_a_noop_for_one_process(clean_env):
  assert distributed.initialize(platform="cpu") is False
  assert distributed.initialize(platform="gpu") is False
  clean_env.setenv("JAX_NUM_PROCESSES", "1")
  assert distributed.initialize(platform="gpu") is False
  assert not jax.distributed.is_initialized()
  # The agreement checks are free for one process.
  distributed.assert_same_across_hosts(7, "seed")
  np.testing.assert_array_equal(distributed.broadcast_from_host0({"x": np.arange(3)})["x"], np.arange(3))


@pytest.mark.parametrize("env, name", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"},
     "JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "x"}, "SLURM_PROCID"),
    ({"JAX_LOCAL_DEVICE_COUNT": "0"}, "JAX_LOCAL_DEVICE_COUNT"),
])
def test_initialize_names_the_malformed_variable(clean_env, env, name):
  for k, v in env.items():
    clean_env.setenv(k, v)
  with pytest.raises(ValueError, match=name):
    distributed.initialize(platform="cpu")
  assert not jax.distributed.is_initialized()


def test_fingerprint_distinguishes_values():
  assert distributed.fingerprint(0) != distributed.fingerprint(1)
  assert distributed.fingerprint(np.int32(3)) != distributed.fingerprint(np.int64(3))
  assert distributed.checksum(np.arange(4)) == distributed.checksum(np.arange(4))
  assert distributed.checksum(np.arange(4)) != distributed.checksum(np.arange(4).reshape(2, 2))
  assert distributed.fingerprint({"a": 1, "b": [1, 2]}) == distributed.fingerprint({"b": [1, 2], "a": 1})


# ---------------------------------------------------------------------- 2 x 4 vs 1 x 8
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(args, num_processes, devices, tmp_path, tag):
  """Starts `num_processes` workers (each `devices` fake CPU devices); returns [(Popen, log path)]."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=xla_flags(devices))
    if num_processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
                 JAX_PROCESS_ID=str(i))
    log = tmp_path / f"{tag}-{i}.log"
    procs.append((subprocess.Popen([sys.executable, WORKER, *args], cwd=REPO, env=env, stdout=open(log, "w"),
                                   stderr=subprocess.STDOUT, text=True), log))
  return procs


def _wait(procs, timeout=TIMEOUT_S):
  """Waits for all; on a timeout kills them (by pid). Returns [(returncode, log text)]."""
  out = []
  for p, log in procs:
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        if q.poll() is None:
          q.kill()
      p.wait()
    out.append((p.returncode, open(log).read()))
  return out


def _check_ok(results, what):
  for i, (rc, text) in enumerate(results):
    assert rc == 0, f"{what} process {i} failed with {rc}:\n{text[-6000:]}"


def _losses(text, name="loss"):
  """The per-step values of `name` in a training log (printed with 4 decimals)."""
  return [float(x) for x in re.findall(rf"^step \d+/\d+ \|.*? {name} ([0-9.]+) \|", text, re.M)]


@pytest.fixture(scope="module")
def sid_cache(tmp_path_factory):
  """The SID table, built once here so that the workers only load it."""
  cache = str(tmp_path_factory.mktemp("sid"))
  train_lib.load_sid_table("industrial", train_lib.SIDConfig(codebook_size=16, embedding="collaborative",
                                                             cache_dir=cache))
  return cache


def test_two_processes_train_like_one(tmp_path, sid_cache):
  two = _start(["--out", str(tmp_path / "two"), "--sid_cache", sid_cache, "--model_dir", str(tmp_path / "run2")],
               2, 4, tmp_path, "two")
  one = _start(["--out", str(tmp_path / "one"), "--sid_cache", sid_cache, "--model_dir", str(tmp_path / "run1")],
               1, 8, tmp_path, "one")
  r2, r1 = _wait(two), _wait(one)
  _check_ok(r2, "2x4")
  _check_ok(r1, "1x8")
  log2, log1 = r2[0][1], r1[0][1]
  assert "(2 processes)" in log2 and "(1 processes)" in log1
  # Training log: loss and gradient norm per step; achieved FLOP/s (no MFU on CPU).
  l2, l1 = _losses(log2), _losses(log1)
  assert len(l1) == 5 and len(l2) == 5, (log1[-3000:], log2[-3000:])
  assert "flops_per_s" in log1 and "flops_per_s" in log2 and "| mfu " not in log1
  assert not _losses(r2[1][1]), "only process 0 prints progress"
  # The learning rate is 0 at step 1 (warm-up from 0), so steps 1 and 2 both start from the
  # same initial parameters on both layouts: there, loss and gradient norm differ only by
  # float32 rounding of reordered sums (tests/test_train_step.py's _rounding_tol) and by the
  # log's 4 decimals (each print is within 5e-5). A host feeding the wrong rows is ~1e-2 off.
  # Later steps start from parameters that Adam has let drift apart (see _adam_drift_bound),
  # so their values are not compared.
  opt, total_steps = train_lib.OptimizerConfig(), 5  # as the worker trains
  _, schedule = train_lib.make_optimizer(opt, total_steps)
  assert float(schedule(0)) == 0.0
  tiny = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                     max_history=10, sid_vocab_sizes=(16,) * 4)  # the worker's; at most 3 levels + collisions
  tol = _rounding_tol(tiny, rows=32)
  for name in ("loss", "grad_norm"):
    v2, v1 = _losses(log2, name)[:2], _losses(log1, name)[:2]
    assert len(v1) == len(v2) == 2, name
    np.testing.assert_allclose(v2, v1, rtol=tol, atol=1e-4, err_msg=name)
  # Parameters after 5 steps (gathered from both hosts): within what Adam lets two runs drift
  # apart from the same start (plus one rounding of p + update per step and run).
  p2, p1 = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert set(p2.files) == set(p1.files) and len(p1.files) > 10
  drift = _adam_drift_bound(total_steps, opt, total_steps)
  for k in p1.files:
    gap = np.abs(p2[k] - p1[k])
    assert (gap <= drift + total_steps * EPS32 * np.abs(p1[k])).all(), f"{k}: {gap.max():.3g} > {drift:.3g}"
  # Evaluation with 2 processes: each host fed its half, metrics over the global batches.
  m2, m1 = json.load(open(tmp_path / "two.json")), json.load(open(tmp_path / "one.json"))
  assert m2["process_count"] == 2 and m2["device_count"] == 8 and m1["process_count"] == 1
  assert m2["history"][0]["num_examples"] == m1["history"][0]["num_examples"] == 64
  # The gathered global batches: same targets and masks in the same order as with one process
  # (so each host's slice landed where it belongs), and the same beams.
  e2, e1 = np.load(tmp_path / "two_eval.npz"), np.load(tmp_path / "one_eval.npz")
  np.testing.assert_array_equal(e2["targets"], e1["targets"])
  np.testing.assert_array_equal(e2["mask"], e1["mask"])
  assert e1["mask"].sum() == 64 and e1["items"].shape == (64, 10)
  same = (e2["items"] == e1["items"]).all(axis=1)
  assert same.mean() >= 0.9
  # Every metric is a mean over the examples of a value in [0, 1] (recall, NDCG, hit rate) or
  # a count: an example whose beams are the same on both layouts scores the same, so the
  # metrics differ by at most the fraction of examples whose beams differ.
  for k, v in m1["history"][0].items():
    assert abs(m2["history"][0][k] - v) <= 1.0 - same.mean() + 1e-6, k
  # Both processes wrote one checkpoint (Orbax, multi-host) at the last step.
  assert os.path.isdir(tmp_path / "run2" / "checkpoints" / "5")


def test_seed_disagreement_across_processes_fails_clearly(tmp_path, sid_cache):
  procs = _start(["--out", str(tmp_path / "x"), "--sid_cache", sid_cache, "--seed_plus_process_id", "--steps", "1"],
                 2, 4, tmp_path, "seed")
  results = _wait(procs, timeout=240)
  for i, (rc, text) in enumerate(results):
    assert rc == 3, f"process {i} exited {rc}, expected the mismatch error:\n{text[-4000:]}"
    assert "seed differs across hosts" in text and "process 0: 0" in text and "process 1: 1" in text, text[-4000:]


# ---------------------------------------------------------------------- checkpoint resharding
def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  from oxyjax.models.encoder_decoder import ModelConfig
  from oxyjax.models.rec_model import RecModel

  cfg = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                    max_history=8)
  codes = np.concatenate([np.zeros((1, 3), np.int32), np.random.default_rng(0).integers(0, 8, (40, 3), np.int32)])
  model = RecModel(cfg, codes)
  tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(), 10)

  def init_state(rng):
    params = model.init(rng, model.dummy_batch(8))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.ones((), jnp.int32)}

  def sharded_init(part):
    with jax.set_mesh(part.mesh), part.rules_context():
      boxed = jax.eval_shape(init_state, jax.random.key(0))
      shardings = part.params_shardings(boxed)
      abstract = checkpoints.abstract_with_shardings(partitioning.strip_boxes(boxed), shardings)
      state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(jax.random.key(0))
    return state, abstract

  src_part = partitioning.Partitioner({"data": 8})
  state, _ = sharded_init(src_part)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, state, {"iterator": {"position": 3}}, force=True)
  ckpt.wait()

  dst_part = partitioning.Partitioner({"data": 2, "fsdp": 2, "tensor": 2})
  _, abstract = sharded_init(dst_part)
  restored, data_state = checkpoints.Checkpointer(str(tmp_path / "ckpt")).restore(1, abstract)
  assert data_state == {"iterator": {"position": 3}}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)
  jax.tree.map(lambda r, a: (r.sharding == a.sharding) or pytest.fail(f"{r.sharding} != {a.sharding}"),
               restored, abstract)
  wi = restored["params"]["encoder_layers_0"]["mlp"]["wi"]
  assert wi.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  assert state["params"]["encoder_layers_0"]["mlp"]["wi"].sharding.is_fully_replicated  # data=8: replicated
