#!/usr/bin/env bash
# Multi-host GPU training under SLURM. Writes a batch script (default
# runs/slurm/<job_name>.sbatch) that asks for --nodes nodes with --gpus_per_node GPUs each and
# one task per node, and in it:
#   JAX_COORDINATOR_ADDRESS = <first node of $SLURM_JOB_NODELIST, via `scontrol show
#                              hostnames`>:<--port>
#   JAX_NUM_PROCESSES       = $SLURM_NNODES
#   JAX_PROCESS_ID          = $SLURM_NODEID (set inside each srun task)
#   srun ... python -m oxyjax.train --gin_file=...   (the same command on every node)
# With --submit it also runs `sbatch` on it; without, it prints the sbatch command to run.
# --dry_run prints the batch script and the sbatch command, writes nothing and needs no SLURM.
#
# The repo (with its .venv: run `bash launch/setup_env.sh` and
# `.venv/bin/pip install jax[cuda12]==<the jax pin>` once, or pass --setup) must be on a
# file system every node sees; --workdir (default: this repo) is where the job runs.
#
# oxyjax/train.py's main() calls oxyjax.distributed.initialize(), which reads the three JAX_*
# variables above (one process per node, every local GPU visible to it); see docs/design.md,
# "Multi-host".
# shellcheck disable=SC2016  # single-quoted $ text is for the batch script
set -euo pipefail
. "$(dirname "$0")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --nodes N --gpus_per_node G --gin_file FILE [options] [-- TRAINER_ARGS...]

Writes a SLURM batch script for multi-host GPU training (and submits it with --submit).

Required:
  --nodes N              number of nodes (one JAX process per node)
  --gpus_per_node G      GPUs per node
  --gin_file FILE        repeatable; later files win (e.g. experiments/beauty.gin)
Options:
  --gin_binding BINDING  repeatable; passed as --gin_bindings=BINDING
  --gin.NAME=VALUE       passed to the trainer as is (shorthand binding)
  --model_dir DIR        --gin.MODEL_DIR='DIR' (on a shared file system)
  --mesh_shape SHAPE     --gin.MESH_SHAPE=SHAPE (default: the gin files' MESH_SHAPE)
  --env KEY=VALUE        repeatable; environment of the trainer
  --job_name NAME        SLURM job name (default oxyjax)
  --partition P          #SBATCH --partition
  --account A            #SBATCH --account
  --time T               #SBATCH --time (e.g. 24:00:00)
  --cpus_per_task C      #SBATCH --cpus-per-task
  --port PORT            coordinator port on the first node (default 12355)
  --mem_fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)
  --python PY            Python on the nodes, relative to --workdir or absolute
                         (default .venv/bin/python)
  --workdir DIR          where the job runs (default: this repo, absolute)
  --setup                run launch/setup_env.sh and the jax[cuda12] install in the job,
                         once, before srun
  --jax_extra EXTRA      pip extra for --setup (default cuda12; '' to skip)
  --script PATH          where to write the batch script (default runs/slurm/<job_name>.sbatch)
  --submit               submit it with sbatch
  --dry_run              print the batch script and the sbatch command; write nothing
  -h, --help             this help
  -- ARGS...             everything after -- goes to `python -m oxyjax.train` as is

Example:
  bash launch/gpu_slurm.sh --dry_run --nodes 4 --gpus_per_node 8 --partition gpu \
      --gin_file experiments/beauty.gin --model_dir /shared/runs/beauty \
      --gin_binding 'BATCH_SIZE = 8192'
EOF
}

NODES="" GPUS="" JOB_NAME="oxyjax" PARTITION="" ACCOUNT="" TIME_LIMIT="" CPUS="" PORT="12355"
MESH_SHAPE="" MEM_FRACTION="0.9" PYTHON_BIN=".venv/bin/python" WORKDIR="" SETUP=0 JAX_EXTRA="cuda12"
SCRIPT="" SUBMIT=0

normalize_args "$@"
set -- "${NORM_ARGS[@]}"
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then shift "$SHIFT_BY"; continue; fi
  case $1 in
    -h|--help) usage; exit 0 ;;
    --nodes) need_value "$1" "$@"; NODES=$2; shift 2 ;;
    --gpus_per_node) need_value "$1" "$@"; GPUS=$2; shift 2 ;;
    --job_name) need_value "$1" "$@"; JOB_NAME=$2; shift 2 ;;
    --partition) need_value "$1" "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$1" "$@"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$1" "$@"; TIME_LIMIT=$2; shift 2 ;;
    --cpus_per_task) need_value "$1" "$@"; CPUS=$2; shift 2 ;;
    --port) need_value "$1" "$@"; PORT=$2; shift 2 ;;
    --mesh_shape) need_value "$1" "$@"; MESH_SHAPE=$2; shift 2 ;;
    --mem_fraction) need_value "$1" "$@"; MEM_FRACTION=$2; shift 2 ;;
    --python) need_value "$1" "$@"; PYTHON_BIN=$2; shift 2 ;;
    --workdir) need_value "$1" "$@"; WORKDIR=$2; shift 2 ;;
    --jax_extra) need_value "$1" "$@"; JAX_EXTRA=$2; shift 2 ;;
    --script) need_value "$1" "$@"; SCRIPT=$2; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --submit) SUBMIT=1; shift ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

require --nodes "$NODES"
require --gpus_per_node "$GPUS"
require --gin_file "${GIN_FILES[*]}"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer: $NODES"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer: $GPUS"
[[ $PORT =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number: $PORT"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus_per_task must be a positive integer: $CPUS"
[[ $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--job_name may use letters, digits, '.', '_' and '-': $JOB_NAME"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem_fraction must be in (0, 1]: $MEM_FRACTION"
if ((SUBMIT)); then
  require_tool sbatch
fi

cd "$REPO_ROOT"
WORKDIR=${WORKDIR:-$REPO_ROOT}
SCRIPT=${SCRIPT:-runs/slurm/$JOB_NAME.sbatch}
LOG_DIR="$WORKDIR/runs/slurm"

if [[ -n $MESH_SHAPE ]]; then
  EXTRA_ARGS=("--gin.MESH_SHAPE=$MESH_SHAPE" "${EXTRA_ARGS[@]}")
fi
build_train_cmd "$PYTHON_BIN" "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION" TF_CPP_MIN_LOG_LEVEL=2

# ---- the batch script
batch_script() {
  echo '#!/usr/bin/env bash'
  echo "# Written by launch/gpu_slurm.sh: one JAX process per node, all of the node's GPUs each."
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  [[ -z $CPUS ]] || echo "#SBATCH --cpus-per-task=$CPUS"
  [[ -z $PARTITION ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z $ACCOUNT ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z $TIME_LIMIT ]] || echo "#SBATCH --time=$TIME_LIMIT"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"
  echo 'set -euo pipefail'
  echo "cd $(printf '%q' "$WORKDIR")"
  echo '# The coordinator is the first node of the allocation; one process per node.'
  echo 'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")'
  echo '[ "${#nodes[@]}" -gt 0 ] || { echo "no nodes in SLURM_JOB_NODELIST" >&2; exit 1; }'
  echo "export JAX_COORDINATOR_ADDRESS=\"\${nodes[0]}:$PORT\""
  echo 'export JAX_NUM_PROCESSES=$SLURM_NNODES'
  echo 'echo "[gpu_slurm] coordinator $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES processes"'
  if ((SETUP)); then
    echo 'bash launch/setup_env.sh'
    if [[ -n $JAX_EXTRA ]]; then
      jax_version
      print_cmd "$PYTHON_BIN" -m pip install -q "jax[$JAX_EXTRA]==$JAX_VERSION"
    fi
  fi
  echo '# JAX_PROCESS_ID is set inside each task, from that task'"'"'s node.'
  echo "srun --nodes=$NODES --ntasks-per-node=1 --label bash -c 'export JAX_PROCESS_ID=\$SLURM_NODEID; exec \"\$@\"' oxyjax-task \\"
  echo "  $(quote_cmd "${TRAIN_CMD[@]}")"
}

SBATCH_CMD=(sbatch "$SCRIPT")
if ((DRY_RUN)); then
  echo "# ---- batch script (would be written to $SCRIPT) ----"
  batch_script
  echo "# ---- end of batch script ----"
  print_cmd cd "$REPO_ROOT"
  print_cmd mkdir -p "$LOG_DIR"
  print_cmd "${SBATCH_CMD[@]}"
  exit 0
fi

mkdir -p "$(dirname "$SCRIPT")" "$LOG_DIR"
batch_script > "$SCRIPT"
chmod +x "$SCRIPT"
[[ $SCRIPT == /* ]] && script_abs=$SCRIPT || script_abs=$REPO_ROOT/$SCRIPT
echo "[gpu_slurm] wrote $script_abs (logs: $LOG_DIR/$JOB_NAME-<jobid>.out)" >&2
if ((SUBMIT)); then
  run "${SBATCH_CMD[@]}"
else
  echo "[gpu_slurm] submit with: $(quote_cmd "${SBATCH_CMD[@]}") (from $REPO_ROOT), or rerun with --submit" >&2
fi
