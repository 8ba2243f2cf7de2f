#!/usr/bin/env bash
# Runs the test suite (or the tests named as arguments) on 8 fake CPU devices. pytest's exit code 5 ("no tests collected") is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
# --xla_backend_optimization_level=0: LLVM spends less effort on each compiled kernel. The tests'
# tiny models compile hundreds of kernels and run them a few times, so compiling dominates: it
# halves the suite's compile time. The HLO program, its fusion and reduction order, and IEEE
# float semantics (no fast-math at any level) are the same; the kernels are only less optimised.
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0}"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
# JAX's persistent compilation cache, keyed by the compiled program (HLO, flags, devices): the
# many tiny train and decode steps that several tests (and their subprocesses) compile alike
# compile once. It changes no result; delete the folder to start cold.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax_compilation_tests}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}"
# Arguments go to pytest as they are: test paths or node ids run just those; without any,
# pytest runs testpaths (tests/, pytest.ini) in parallel: one pytest-xdist worker per CPU
# (at most 4; OXYJAX_TEST_WORKERS overrides, 0 = no workers), each test module on one worker
# (--dist loadfile: a module's fixtures are built once).
if [ "$#" -eq 0 ]; then
  workers="${OXYJAX_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
  if [ "$workers" -gt 1 ]; then
    set -- -n "$workers" --dist loadfile
  fi
fi
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
