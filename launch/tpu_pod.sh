#!/usr/bin/env bash
# Trains oxyjax on a Cloud TPU VM (a single host or a multi-host pod slice), in four steps:
#   1. create the TPU VM (`gcloud compute tpus tpu-vm create`), or with --reuse keep the one
#      that `gcloud compute tpus tpu-vm describe` finds;
#   2. copy this working tree to every worker (a tarball of the tree, less .git, .venv, runs/
#      and caches) or, with --repo_url, clone it there, then `bash launch/setup_env.sh` and
#      `pip install jax[tpu]==<the jax pin>` on all workers (`tpu-vm ssh --worker=all`);
#   3. run the same `python -m oxyjax.train --gin_file=...` on all workers, each worker's
#      output tee'd to runs/launch/NAME/logs/worker-<N>.log in its copy of the repo;
#   4. collect those logs into runs/launch/NAME/logs/ here (`tpu-vm scp --worker=all`), also
#      when training failed; the script then exits with the training's status.
# --dry_run prints these commands (after a `cd` to the repo root) without running them;
# gcloud need not be installed for it.
#
# Multi-host: oxyjax/train.py's main() calls oxyjax.distributed.initialize(), which on Cloud
# TPU calls jax.distributed.initialize() with no arguments (the TPU runtime finds the
# coordinator, process count and id itself), so this script sets none of
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. See docs/design.md, "Multi-host".
#
# Worker needs: Python >= 3.11 with venv (setup_env.sh makes .venv with $PYTHON, see
# --remote_python) and, with --repo_url, git.
# shellcheck disable=SC2016  # single-quoted $ text is for the workers' shell
set -euo pipefail
. "$(dirname "$0")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator_type TYPE --version VERSION
                         --gin_file FILE [options] [-- TRAINER_ARGS...]

Creates (or reuses) a Cloud TPU VM, installs oxyjax on all workers, runs the trainer on all
workers and copies their logs back to runs/launch/NAME/logs/.

Required:
  --name NAME               TPU VM name
  --zone ZONE               e.g. us-west4-a
  --accelerator_type TYPE   e.g. v5litepod-8, v5litepod-64, v4-32
  --version VERSION         TPU software version, e.g. v2-alpha-tpuv5-lite (v5e),
                            tpu-ubuntu2204-base (v4); only used to create the VM
  --gin_file FILE           repeatable; later files win (e.g. experiments/beauty.gin)
Options:
  --project PROJECT         GCP project (default: gcloud's configured project)
  --gin_binding BINDING     repeatable; passed as --gin_bindings=BINDING
  --gin.NAME=VALUE          passed to the trainer as is (shorthand binding)
  --model_dir DIR           --gin.MODEL_DIR='DIR'; gs://bucket/path is allowed
  --env KEY=VALUE           repeatable; environment of the trainer (e.g. LIBTPU_INIT_ARGS=...)
  --reuse                   reuse the TPU VM if `describe` finds it, create it otherwise
  --repo_url URL            clone URL on the workers instead of copying this working tree
  --repo_ref REF            with --repo_url: the commit/branch to check out (default origin/HEAD)
  --remote_dir DIR          repo directory on the workers, relative to home (default oxyjax)
  --remote_python PY        Python that setup_env.sh builds .venv with (default python3)
  --jax_extra EXTRA         pip extra installed after setup (default tpu; '' to skip)
  --skip_setup              skip step 2 (the workers are already set up)
  --dry_run                 print the commands instead of running them
  -h, --help                this help
  -- ARGS...                everything after -- goes to `python -m oxyjax.train` as is

Example:
  bash launch/tpu_pod.sh --dry_run --name oxy-pod --zone us-west4-a \
      --accelerator_type v5litepod-64 --version v2-alpha-tpuv5-lite \
      --gin_file experiments/beauty.gin --model_dir gs://my-bucket/oxyjax/beauty \
      --gin_binding 'BATCH_SIZE = 4096'
EOF
}

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" REUSE=0 REPO_URL="" REPO_REF="origin/HEAD"
REMOTE_DIR="oxyjax" REMOTE_PYTHON="python3" JAX_EXTRA="tpu" SKIP_SETUP=0

normalize_args "$@"
set -- "${NORM_ARGS[@]}"
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then shift "$SHIFT_BY"; continue; fi
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$1" "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" "$@"; ZONE=$2; shift 2 ;;
    --accelerator_type) need_value "$1" "$@"; ACCEL=$2; shift 2 ;;
    --version) need_value "$1" "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$1" "$@"; PROJECT=$2; shift 2 ;;
    --repo_url) need_value "$1" "$@"; REPO_URL=$2; shift 2 ;;
    --repo_ref) need_value "$1" "$@"; REPO_REF=$2; shift 2 ;;
    --remote_dir) need_value "$1" "$@"; REMOTE_DIR=$2; shift 2 ;;
    --remote_python) need_value "$1" "$@"; REMOTE_PYTHON=$2; shift 2 ;;
    --jax_extra) need_value "$1" "$@"; JAX_EXTRA=$2; shift 2 ;;
    --reuse) REUSE=1; shift ;;
    --skip_setup) SKIP_SETUP=1; shift ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

require --name "$NAME"
require --zone "$ZONE"
require --accelerator_type "$ACCEL"
require --version "$VERSION"
require --gin_file "${GIN_FILES[*]}"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and '-': $NAME"
[[ $REMOTE_DIR != /* && $REMOTE_DIR != "~"* ]] || die "--remote_dir is relative to the workers' home directory: $REMOTE_DIR"
require_tool gcloud

cd "$REPO_ROOT"
jax_version

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  WHERE+=("--project=$PROJECT")
fi
RUN_DIR="runs/launch/$NAME"        # here: tarball and collected logs; on the workers: logs
LOG_DIR="$RUN_DIR/logs"
TARBALL="$RUN_DIR/repo.tar.gz"
REMOTE_TARBALL="oxyjax-$NAME-repo.tar.gz"
RD=$(printf '%q' "$REMOTE_DIR")

if ((DRY_RUN)); then
  print_cmd cd "$REPO_ROOT"
fi

# ---- 1. create or reuse the TPU VM
CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
DESCRIBE=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}")
if ((REUSE)); then
  if ((DRY_RUN)); then
    print_cmd "${DESCRIBE[@]}"
    echo "# only if the describe above fails (no such TPU VM):"
    print_cmd "${CREATE[@]}"
  elif run "${DESCRIBE[@]}" >/dev/null 2>&1; then
    echo "[tpu_pod] reusing TPU VM $NAME" >&2
  else
    run "${CREATE[@]}"
  fi
else
  run "${CREATE[@]}"
fi

# ---- 2. copy or clone the repo to all workers, install
if ((!SKIP_SETUP)); then
  install="bash launch/setup_env.sh"
  if [[ $REMOTE_PYTHON != python3 ]]; then
    install="PYTHON=$(printf '%q' "$REMOTE_PYTHON") $install"
  fi
  if [[ -n $JAX_EXTRA ]]; then
    install+=" && $(quote_cmd .venv/bin/python -m pip install -q "jax[$JAX_EXTRA]==$JAX_VERSION")"
  fi
  if [[ -n $REPO_URL ]]; then
    fetch="if [ -d $RD/.git ]; then git -C $RD fetch -q origin; else git clone -q $(printf '%q' "$REPO_URL") $RD; fi"
    fetch+=" && git -C $RD checkout -q $(printf '%q' "$REPO_REF")"
  else
    run mkdir -p "$RUN_DIR"
    run tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./.cache \
      --exclude=./tmp --exclude=__pycache__ --exclude=.pytest_cache -C . .
    run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:$REMOTE_TARBALL" "${WHERE[@]}" --worker=all
    fetch="mkdir -p $RD && tar -xzf $(printf '%q' "$REMOTE_TARBALL") -C $RD"
  fi
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=set -e; $fetch && cd $RD && $install"
fi

# ---- 3. train on all workers, each tee-ing to its own log
build_train_cmd .venv/bin/python TF_CPP_MIN_LOG_LEVEL=2
LD=$(printf '%q' "$LOG_DIR")
worker_id='W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
train_remote="set -o pipefail; cd $RD && mkdir -p $LD && $worker_id && $(quote_cmd "${TRAIN_CMD[@]}") 2>&1 | tee $LD/worker-\"\$W\".log"
status=0
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$train_remote" || status=$?

# ---- 4. collect the logs (also after a failed run)
run mkdir -p "$RUN_DIR"
run "${GCLOUD[@]}" scp --recurse "$NAME:$REMOTE_DIR/$LOG_DIR" "$RUN_DIR/" "${WHERE[@]}" --worker=all || {
  echo "[tpu_pod] could not collect the logs" >&2
  if ((status == 0)); then status=1; fi
}
if ((!DRY_RUN)); then
  echo "[tpu_pod] logs: $REPO_ROOT/$LOG_DIR; training exit status $status" >&2
fi
exit "$status"
