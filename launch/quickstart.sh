#!/usr/bin/env bash
# README command (1): set up the environment and run the main job with no flags:
# train the small model on Amazon Beauty (shipped in data/) and print its test metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
python -m oxyjax.train "$@"
