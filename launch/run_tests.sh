#!/usr/bin/env bash
# Runs the test suite (or the tests named as arguments) on 8 fake CPU devices. pytest's exit code 5 ("no tests collected") is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
# Arguments go to pytest as they are: test paths or node ids run just those; without any,
# pytest runs testpaths (tests/, pytest.ini).
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
