"""launch/*.sh: --dry_run prints the commands; gin arguments reach the trainer exactly; the
real code paths run against fake gcloud / scontrol / srun / sbatch / python (no cloud, no
SLURM, no training)."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
# A binding with spaces and both quote characters: must arrive as one argv element, unchanged.
BINDING = """oxyjax.train.SIDConfig.cache_dir = "/tmp/a b/it's" """.strip()
GIN = "experiments/beauty.gin"
BASH = shutil.which("bash")


def _jax_pin():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    return next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))


def _run(script, *args, env=None, cwd=None):
  return subprocess.run([BASH, os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                        timeout=60, cwd=cwd or REPO, env={**os.environ, **(env or {})})


def _lines(out):
  return [l for l in out.stdout.splitlines() if l.strip()]


def _trainer_args(tokens):
  """The arguments after `-m oxyjax.train` in a tokenised command."""
  i = tokens.index("-m")
  assert tokens[i + 1] == "oxyjax.train"
  assert tokens[i - 1].endswith("python")
  return tokens[i + 2:]


def _fake(bin_dir, name, body):
  """An executable Python script `name` in bin_dir."""
  path = os.path.join(bin_dir, name)
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\nimport json, os, sys, time\n" + textwrap.dedent(body))
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return path


# A fake trainer: records argv and the launch environment, fails when asked to.
FAKE_PYTHON = """
pid = os.environ.get("JAX_PROCESS_ID", "0")
keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS",
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "MY_VAR"]
rec = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}
with open(os.path.join(os.environ["FAKE_OUT"], f"proc-{pid}.json"), "w") as f:
  json.dump(rec, f)
print("trainer", pid, "ran")
if pid == os.environ.get("FAKE_FAIL_ID"):
  sys.exit(3)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


# ============================================================== common behaviour
SCRIPTS_REQUIRED = {
    "tpu_pod.sh": ["--name", "oxy", "--zone", "z", "--accelerator_type", "v5litepod-64", "--version", "v",
                   "--gin_file", GIN],
    "gpu_single_host.sh": ["--gin_file", GIN],
    "gpu_slurm.sh": ["--nodes", "2", "--gpus_per_node", "8", "--gin_file", GIN],
    "local_multiprocess.sh": ["--gin_file", GIN],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS_REQUIRED))
def test_help(script):
  out = _run(script, "--help")
  assert out.returncode == 0, out.stderr
  assert "Usage:" in out.stdout and "--dry_run" in out.stdout and "--gin_file" in out.stdout


@pytest.mark.parametrize("script,missing", [(s, opt) for s, args in sorted(SCRIPTS_REQUIRED.items())
                                            for opt in args[0::2]])
def test_missing_required_option_names_it(script, missing):
  args = SCRIPTS_REQUIRED[script]
  i = args.index(missing)
  out = _run(script, "--dry_run", *(args[:i] + args[i + 2:]))
  assert out.returncode != 0
  assert f"missing required option {missing}" in out.stderr
  assert out.stdout == ""


@pytest.mark.parametrize("script", sorted(SCRIPTS_REQUIRED))
def test_unknown_option_and_missing_value_fail(script):
  out = _run(script, "--dry_run", *SCRIPTS_REQUIRED[script], "--no_such_option")
  assert out.returncode != 0 and "unknown option: --no_such_option" in out.stderr
  out = _run(script, "--dry_run", *SCRIPTS_REQUIRED[script], "--gin_binding")
  assert out.returncode != 0 and "--gin_binding needs a value" in out.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS_REQUIRED))
def test_both_option_spellings_and_passthrough(script):
  args = [a for a in SCRIPTS_REQUIRED[script]]
  a = _run(script, "--dry_run", *args, "--gin_binding", BINDING, "--model_dir", "/tmp/x y",
           "--gin.BATCH_SIZE=64", "--", "--gin.NUM_EPOCHS=1.0")
  b = _run(script, "--dry_run", *args, f"--gin_binding={BINDING}", "--model_dir=/tmp/x y",
           "--gin.BATCH_SIZE=64", "--", "--gin.NUM_EPOCHS=1.0")
  assert a.returncode == 0, a.stderr
  assert a.stdout == b.stdout
  assert "--gin.NUM_EPOCHS=1.0" in a.stdout and "--gin.BATCH_SIZE=64" in a.stdout


# ============================================================== TPU pod
TPU = ["--name", "oxy-pod", "--zone", "us-west4-a", "--accelerator_type", "v5litepod-64",
       "--version", "v2-alpha-tpuv5-lite", "--project", "my-proj", "--gin_file", GIN,
       "--gin_file", "models/small.gin", "--gin_binding", BINDING, "--model_dir", "gs://bucket/run"]


def _remote_command(line):
  tokens = shlex.split(line)
  (cmd,) = [t[len("--command="):] for t in tokens if t.startswith("--command=")]
  return cmd


def test_tpu_pod_dry_run():
  out = _run("tpu_pod.sh", "--dry_run", *TPU)
  assert out.returncode == 0, out.stderr
  lines = _lines(out)
  assert lines[0] == f"cd {REPO}"
  create = [l for l in lines if l.startswith("gcloud compute tpus tpu-vm create")]
  ssh = [l for l in lines if l.startswith("gcloud compute tpus tpu-vm ssh")]
  scp = [l for l in lines if l.startswith("gcloud compute tpus tpu-vm scp")]
  assert len(create) == 1 and len(ssh) == 2 and len(scp) == 2
  assert shlex.split(create[0])[5:] == ["oxy-pod", "--zone=us-west4-a", "--project=my-proj",
                                        "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]
  assert "describe" not in out.stdout
  for l in ssh + scp:
    assert "--worker=all" in shlex.split(l) and "--zone=us-west4-a" in l and "--project=my-proj" in l
  # Order: create, copy the tree, install, train, collect.
  order = [lines.index(x) for x in (create[0], scp[0], ssh[0], ssh[1], scp[1])]
  assert order == sorted(order)
  assert shlex.split(scp[0])[5:7] == ["runs/launch/oxy-pod/repo.tar.gz", "oxy-pod:oxyjax-oxy-pod-repo.tar.gz"]
  setup = _remote_command(ssh[0])
  assert "bash launch/setup_env.sh" in setup
  assert f"jax[tpu]=={_jax_pin()}" in shlex.split(setup)
  train = _remote_command(ssh[1])
  assert _trainer_args(shlex.split(train))[:5] == [
      f"--gin_file={GIN}", "--gin_file=models/small.gin", f"--gin_bindings={BINDING}",
      "--gin.MODEL_DIR='gs://bucket/run'", "2>&1"]
  assert "| tee runs/launch/oxy-pod/logs/worker-" in train and "agent-worker-number" in train
  # The remote commands are valid shell.
  for cmd in (setup, train):
    assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0
  collect = shlex.split(scp[1])
  assert collect[5:8] == ["--recurse", "oxy-pod:oxyjax/runs/launch/oxy-pod/logs", "runs/launch/oxy-pod/"]


def test_tpu_pod_dry_run_reuse_clone_skip_setup():
  out = _run("tpu_pod.sh", "--dry_run", *TPU, "--reuse", "--repo_url", "https://example.com/oxyjax.git",
             "--remote_python", "python3.11")
  assert out.returncode == 0, out.stderr
  lines = _lines(out)
  describe = next(i for i, l in enumerate(lines) if l.startswith("gcloud compute tpus tpu-vm describe oxy-pod"))
  create = next(i for i, l in enumerate(lines) if l.startswith("gcloud compute tpus tpu-vm create oxy-pod"))
  assert describe < create
  assert "tar -czf" not in out.stdout  # cloned, not copied
  setup = _remote_command(next(l for l in lines if "setup_env.sh" in l))
  assert "git clone -q https://example.com/oxyjax.git oxyjax" in setup
  assert "PYTHON=python3.11 bash launch/setup_env.sh" in setup

  out = _run("tpu_pod.sh", "--dry_run", *TPU, "--skip_setup")
  assert out.returncode == 0
  assert "setup_env.sh" not in out.stdout and "tar -czf" not in out.stdout
  assert out.stdout.count("tpu-vm ssh") == 1


FAKE_GCLOUD = """
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[4] == "describe":
  sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "0")))
if sys.argv[4] == "ssh" and any("oxyjax.train" in a for a in sys.argv):
  sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))
"""


@pytest.mark.parametrize("describe_rc,train_rc", [(0, 0), (1, 5)])
def test_tpu_pod_runs_gcloud(tmp_path, describe_rc, train_rc):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(str(bin_dir), "gcloud", FAKE_GCLOUD)
  log = tmp_path / "gcloud.jsonl"
  name = f"test-launch-{os.getpid()}-{describe_rc}"
  args = [a if a != "oxy-pod" else name for a in TPU]
  try:
    out = _run("tpu_pod.sh", *args, "--reuse", "--repo_url", "https://example.com/oxyjax.git",
               env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                    "FAKE_DESCRIBE_RC": str(describe_rc), "FAKE_TRAIN_RC": str(train_rc)})
  finally:
    shutil.rmtree(os.path.join(REPO, "runs", "launch", name), ignore_errors=True)
    try:
      os.rmdir(os.path.join(REPO, "runs", "launch"))  # only if this test made it
    except OSError:
      pass
  assert out.returncode == train_rc, out.stderr
  calls = [json.loads(l) for l in log.read_text().splitlines()]
  verbs = [c[3] for c in calls]
  assert verbs == (["describe", "ssh", "ssh", "scp"] if describe_rc == 0 else ["describe", "create", "ssh", "ssh", "scp"])
  train = next(c for c in calls if any("oxyjax.train" in a for a in c))
  assert f"--gin_bindings={BINDING}" in shlex.split(_remote_command(shlex.join(train)))


def test_tpu_pod_without_gcloud_is_a_clear_error(tmp_path):
  for tool in ("basename", "dirname"):  # all the script needs before it looks for gcloud
    os.symlink(shutil.which(tool), tmp_path / tool)
  out = _run("tpu_pod.sh", *TPU, env={"PATH": str(tmp_path)})
  assert out.returncode != 0 and "'gcloud' is not installed" in out.stderr


# ============================================================== one GPU host
def test_gpu_single_host_dry_run():
  out = _run("gpu_single_host.sh", "--dry_run", "--gin_file", GIN, "--gin_binding", BINDING,
             "--model_dir", "runs/gpu run")
  assert out.returncode == 0, out.stderr
  lines = _lines(out)
  assert lines[:3] == [f"cd {REPO}", "bash launch/setup_env.sh",
                       f".venv/bin/python -m pip install -q jax\\[cuda12\\]=={_jax_pin()}"]
  assert len(lines) == 4
  tokens = shlex.split(lines[3])
  assert tokens[:3] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "TF_CPP_MIN_LOG_LEVEL=2"]
  assert _trainer_args(tokens) == [f"--gin_file={GIN}", f"--gin_bindings={BINDING}",
                                   "--gin.MODEL_DIR='runs/gpu run'", "--gin.MESH_SHAPE={'data': -1}"]


def test_gpu_single_host_options():
  out = _run("gpu_single_host.sh", "--dry_run", "--skip_setup", "--gin_file", GIN, "--mem_fraction", "0.5",
             "--mesh_shape", "{'fsdp': -1}", "--env", "MY_VAR=a b", "--python", "/opt/py/bin/python")
  assert out.returncode == 0, out.stderr
  lines = _lines(out)
  assert len(lines) == 2 and "setup_env.sh" not in out.stdout
  tokens = shlex.split(lines[1])
  assert tokens[:5] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5", "TF_CPP_MIN_LOG_LEVEL=2", "MY_VAR=a b",
                        "/opt/py/bin/python"]
  assert "--gin.MESH_SHAPE={'fsdp': -1}" in tokens
  # A MESH_SHAPE of the user's replaces the default one.
  out = _run("gpu_single_host.sh", "--dry_run", "--skip_setup", "--gin_file", GIN,
             "--gin_binding", "MESH_SHAPE = {'tensor': -1}")
  assert "--gin.MESH_SHAPE" not in out.stdout and "MESH_SHAPE\\ =\\ \\{\\'tensor\\'" in out.stdout
  out = _run("gpu_single_host.sh", "--dry_run", "--gin_file", GIN, "--mem_fraction", "2")
  assert out.returncode != 0 and "--mem_fraction" in out.stderr


def test_gpu_single_host_runs_the_printed_command(tmp_path):
  fake_py = _fake(str(tmp_path), "python", FAKE_PYTHON)
  out = _run("gpu_single_host.sh", "--skip_setup", "--python", fake_py, "--gin_file", GIN,
             "--gin_binding", BINDING, env={"FAKE_OUT": str(tmp_path)})
  assert out.returncode == 0, out.stderr
  rec = json.loads((tmp_path / "proc-0.json").read_text())
  assert rec["argv"] == ["-m", "oxyjax.train", f"--gin_file={GIN}", f"--gin_bindings={BINDING}",
                         "--gin.MESH_SHAPE={'data': -1}"]
  assert rec["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"


# ============================================================== SLURM
SLURM = ["--nodes", "2", "--gpus_per_node", "8", "--job_name", "oxy-test", "--partition", "gpu",
         "--time", "02:00:00", "--gin_file", GIN, "--gin_binding", BINDING, "--env", "MY_VAR=x"]


def _batch_script(stdout):
  start = stdout.index("# ---- batch script")
  end = stdout.index("# ---- end of batch script ----")
  return stdout[stdout.index("\n", start) + 1:end]


def test_gpu_slurm_dry_run():
  out = _run("gpu_slurm.sh", "--dry_run", *SLURM)
  assert out.returncode == 0, out.stderr
  script = _batch_script(out.stdout)
  assert script.startswith("#!/usr/bin/env bash\n")
  for directive in ("--job-name=oxy-test", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                    "--partition=gpu", "--time=02:00:00"):
    assert f"#SBATCH {directive}\n" in script
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
  assert "export JAX_COORDINATOR_ADDRESS=" in script and ":12355" in script
  assert "export JAX_NUM_PROCESSES=$SLURM_NNODES" in script
  assert "JAX_PROCESS_ID=$SLURM_NODEID" in script
  srun = script[script.index("srun "):].replace("\\\n", " ")
  assert srun.startswith("srun --nodes=2 --ntasks-per-node=1")
  assert _trainer_args(shlex.split(srun))[:2] == [f"--gin_file={GIN}", f"--gin_bindings={BINDING}"]
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  lines = _lines(out)
  assert lines[-1] == "sbatch runs/slurm/oxy-test.sbatch"
  assert not os.path.exists(os.path.join(REPO, "runs", "slurm", "oxy-test.sbatch"))


FAKE_SCONTROL = """
assert sys.argv[1:] == ["show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], sys.argv
print("gpu-node-07\\ngpu-node-08")
"""

# Runs the task once per node with that node's SLURM_NODEID (sequentially).
FAKE_SRUN = """
import subprocess
args = sys.argv[1:]
while args[0].startswith("--"):
  args = args[1:]
rc = 0
for node in range(int(os.environ["SLURM_NNODES"])):
  rc |= subprocess.run(args, env={**os.environ, "SLURM_NODEID": str(node)}).returncode
sys.exit(rc)
"""


def test_gpu_slurm_batch_script_runs_under_fake_slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(str(bin_dir), "scontrol", FAKE_SCONTROL)
  _fake(str(bin_dir), "srun", FAKE_SRUN)
  _fake(str(bin_dir), "sbatch", 'open(os.environ["FAKE_OUT"] + "/sbatch.json", "w").write(json.dumps(sys.argv[1:]))')
  fake_py = _fake(str(tmp_path), "python", FAKE_PYTHON)
  script_path = tmp_path / "job.sbatch"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path)}
  out = _run("gpu_slurm.sh", *SLURM, "--python", fake_py, "--workdir", str(tmp_path), "--script",
             str(script_path), "--submit", env=env)
  assert out.returncode == 0, out.stderr
  assert json.loads((tmp_path / "sbatch.json").read_text()) == [str(script_path)]
  assert (tmp_path / "runs" / "slurm").is_dir()  # where #SBATCH --output goes
  run = subprocess.run(["bash", str(script_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env, "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2",
                            "SLURM_NODEID": "0"})
  assert run.returncode == 0, run.stderr
  for node in range(2):
    rec = json.loads((tmp_path / f"proc-{node}.json").read_text())
    assert rec["argv"] == ["-m", "oxyjax.train", f"--gin_file={GIN}", f"--gin_bindings={BINDING}"]
    assert rec["env"] == {**rec["env"], "JAX_COORDINATOR_ADDRESS": "gpu-node-07:12355", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": str(node), "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", "MY_VAR": "x"}


def test_gpu_slurm_validates_numbers():
  out = _run("gpu_slurm.sh", "--dry_run", *SLURM[:1], "two", *SLURM[2:])
  assert out.returncode != 0 and "--nodes must be a positive integer" in out.stderr


# ============================================================== local processes
def test_local_multiprocess_dry_run():
  out = _run("local_multiprocess.sh", "--dry_run", "--num_processes", "3", "--devices_per_process", "2",
             "--port", "23456", "--gin_file", "tests/tiny_e2e.gin", "--gin_binding", BINDING,
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_other=1"})
  assert out.returncode == 0, out.stderr
  lines = _lines(out)
  assert lines[:2] == [f"cd {REPO}", "mkdir -p runs/local_multiprocess"] and lines[-1] == "wait"
  cmds = lines[2:-1]
  assert len(cmds) == 3
  ids = []
  for i, line in enumerate(cmds):
    tokens = shlex.split(line)
    assert tokens[-4:] == [">", f"runs/local_multiprocess/process-{i}.log", "2>&1", "&"]
    env = dict(t.split("=", 1) for t in tokens[1:tokens.index("-m") - 1])
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--xla_other=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:23456" and env["JAX_NUM_PROCESSES"] == "3"
    ids.append(env["JAX_PROCESS_ID"])
    assert _trainer_args(tokens[:-4]) == ["--gin_file=tests/tiny_e2e.gin", f"--gin_bindings={BINDING}"]
  assert ids == ["0", "1", "2"]


def test_local_multiprocess_runs_and_waits(tmp_path):
  fake_py = _fake(str(tmp_path), "python", FAKE_PYTHON)
  logs = tmp_path / "logs"
  out = _run("local_multiprocess.sh", "--python", fake_py, "--log_dir", str(logs), "--gin_file", GIN,
             "--gin_binding", BINDING, env={"FAKE_OUT": str(tmp_path), "FAKE_SLEEP": "0.2"})
  assert out.returncode == 0, out.stderr
  for i in range(2):
    rec = json.loads((tmp_path / f"proc-{i}.json").read_text())
    assert rec["argv"] == ["-m", "oxyjax.train", f"--gin_file={GIN}", f"--gin_bindings={BINDING}"]
    assert rec["env"]["JAX_PROCESS_ID"] == str(i) and rec["env"]["JAX_NUM_PROCESSES"] == "2"
    assert (logs / f"process-{i}.log").read_text().strip() == f"trainer {i} ran"


def test_local_multiprocess_fails_if_one_fails(tmp_path):
  fake_py = _fake(str(tmp_path), "python", FAKE_PYTHON)
  out = _run("local_multiprocess.sh", "--python", fake_py, "--log_dir", str(tmp_path / "logs"),
             "--num_processes", "3", "--gin_file", GIN,
             env={"FAKE_OUT": str(tmp_path), "FAKE_FAIL_ID": "1", "FAKE_SLEEP": "30"})
  assert out.returncode == 1
  assert "process 1 of 3 failed" in out.stderr and "trainer 1 ran" in out.stderr
  assert "stopped" in out.stderr  # the others were not left waiting for 30 s
