#!/usr/bin/env bash
# Trains oxyjax on one host with all its local GPUs (one process; JAX sees every GPU):
#   1. `bash launch/setup_env.sh` (the pinned .venv) and `pip install jax[cuda12]==<the jax
#      pin>` into it, unless --skip_setup;
#   2. `python -m oxyjax.train --gin_file=...` with XLA_PYTHON_CLIENT_MEM_FRACTION set
#      (default 0.9) and --gin.MESH_SHAPE (default {'data': -1}: data parallel over all GPUs)
#      unless a --gin_binding / --gin.MESH_SHAPE=... of yours sets MESH_SHAPE.
# --dry_run prints these commands (after a `cd` to the repo root) without running them.
#
# One process needs no multi-host runtime: this script sets none of JAX_COORDINATOR_ADDRESS /
# JAX_NUM_PROCESSES / JAX_PROCESS_ID, so oxyjax.distributed.initialize() is a no-op. For
# several hosts use launch/gpu_slurm.sh.
set -euo pipefail
. "$(dirname "$0")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_host.sh --gin_file FILE [options] [-- TRAINER_ARGS...]

Runs the trainer on this host's GPUs (one process, all local devices).

Required:
  --gin_file FILE        repeatable; later files win (e.g. experiments/beauty.gin)
Options:
  --gin_binding BINDING  repeatable; passed as --gin_bindings=BINDING
  --gin.NAME=VALUE       passed to the trainer as is (shorthand binding)
  --model_dir DIR        --gin.MODEL_DIR='DIR'
  --mesh_shape SHAPE     --gin.MESH_SHAPE=SHAPE (default "{'data': -1}"; axes data, fsdp,
                         tensor, expert; -1 = the remaining devices)
  --mem_fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)
  --env KEY=VALUE        repeatable; environment of the trainer (e.g. CUDA_VISIBLE_DEVICES=0,1)
  --python PY            Python to run (default .venv/bin/python)
  --jax_extra EXTRA      pip extra installed after setup (default cuda12; '' to skip)
  --skip_setup           do not run launch/setup_env.sh nor the pip install
  --dry_run              print the commands instead of running them
  -h, --help             this help
  -- ARGS...             everything after -- goes to `python -m oxyjax.train` as is

Example:
  bash launch/gpu_single_host.sh --dry_run --gin_file experiments/beauty.gin \
      --model_dir runs/beauty_gpu --gin_binding 'BATCH_SIZE = 1024'
EOF
}

DEFAULT_MESH_SHAPE="{'data': -1}"
MESH_SHAPE="" MEM_FRACTION="0.9" PYTHON_BIN=".venv/bin/python" JAX_EXTRA="cuda12" SKIP_SETUP=0

normalize_args "$@"
set -- "${NORM_ARGS[@]}"
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then shift "$SHIFT_BY"; continue; fi
  case $1 in
    -h|--help) usage; exit 0 ;;
    --mesh_shape) need_value "$1" "$@"; MESH_SHAPE=$2; shift 2 ;;
    --mem_fraction) need_value "$1" "$@"; MEM_FRACTION=$2; shift 2 ;;
    --python) need_value "$1" "$@"; PYTHON_BIN=$2; shift 2 ;;
    --jax_extra) need_value "$1" "$@"; JAX_EXTRA=$2; shift 2 ;;
    --skip_setup) SKIP_SETUP=1; shift ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

require --gin_file "${GIN_FILES[*]}"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem_fraction must be in (0, 1]: $MEM_FRACTION"

cd "$REPO_ROOT"
if ((DRY_RUN)); then
  print_cmd cd "$REPO_ROOT"
fi

if ((!SKIP_SETUP)); then
  run bash launch/setup_env.sh
  if [[ -n $JAX_EXTRA ]]; then
    jax_version
    run "$PYTHON_BIN" -m pip install -q "jax[$JAX_EXTRA]==$JAX_VERSION"
  fi
fi

if [[ -n $MESH_SHAPE ]] || ! user_sets_macro MESH_SHAPE; then
  EXTRA_ARGS=("--gin.MESH_SHAPE=${MESH_SHAPE:-$DEFAULT_MESH_SHAPE}" "${EXTRA_ARGS[@]}")
fi
build_train_cmd "$PYTHON_BIN" "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION" TF_CPP_MIN_LOG_LEVEL=2
if ((!DRY_RUN)) && ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
  die "no Python at $PYTHON_BIN (run without --skip_setup, or pass --python)"
fi
run "${TRAIN_CMD[@]}"
