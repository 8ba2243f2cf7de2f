#!/usr/bin/env bash
# Rehearses multi-host training on this machine's CPU: starts --num_processes (default 2)
# processes of `python -m oxyjax.train`, each with JAX_PLATFORMS=cpu,
# XLA_FLAGS=--xla_force_host_platform_device_count=K (--devices_per_process, default 4) and
#   JAX_COORDINATOR_ADDRESS=localhost:<--port>  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=0..N-1,
# each writing to <--log_dir>/process-<i>.log. It waits for them all and exits non-zero if
# any fails; as soon as one fails, the others are stopped (they would wait for it forever
# once they coordinate), and the tail of the failed logs is printed.
# --dry_run prints the N commands (after a `cd` to the repo root) without running them.
#
# oxyjax/train.py's main() calls oxyjax.distributed.initialize(), which reads the three JAX_*
# variables above: the N processes form one JAX job of N*K devices (CPU collectives over
# gloo), each host reading its own slice of every batch; see docs/design.md, "Multi-host".
set -euo pipefail
. "$(dirname "$0")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh --gin_file FILE [options] [-- TRAINER_ARGS...]

Starts N local CPU processes of the trainer wired for multi-process JAX; fails if any fails.

Required:
  --gin_file FILE           repeatable; later files win (e.g. tests/tiny_e2e.gin)
Options:
  --num_processes N         processes to start (default 2)
  --devices_per_process K   fake CPU devices per process (default 4)
  --port PORT               coordinator port on localhost (default 12355)
  --gin_binding BINDING     repeatable; passed as --gin_bindings=BINDING
  --gin.NAME=VALUE          passed to the trainer as is (shorthand binding)
  --model_dir DIR           --gin.MODEL_DIR='DIR'
  --env KEY=VALUE           repeatable; environment of every process
  --python PY               Python to run (default .venv/bin/python)
  --log_dir DIR             per-process logs (default runs/local_multiprocess)
  --dry_run                 print the commands instead of running them
  -h, --help                this help
  -- ARGS...                everything after -- goes to `python -m oxyjax.train` as is

Example:
  bash launch/local_multiprocess.sh --dry_run --num_processes 2 --devices_per_process 4 \
      --gin_file tests/tiny_e2e.gin --model_dir /tmp/oxyjax_mp --gin_binding 'DATASET = "beauty"'
EOF
}

NUM=2 DEVICES=4 PORT=12355 PYTHON_BIN=".venv/bin/python" LOG_DIR="runs/local_multiprocess"

normalize_args "$@"
set -- "${NORM_ARGS[@]}"
while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then shift "$SHIFT_BY"; continue; fi
  case $1 in
    -h|--help) usage; exit 0 ;;
    --num_processes) need_value "$1" "$@"; NUM=$2; shift 2 ;;
    --devices_per_process) need_value "$1" "$@"; DEVICES=$2; shift 2 ;;
    --port) need_value "$1" "$@"; PORT=$2; shift 2 ;;
    --python) need_value "$1" "$@"; PYTHON_BIN=$2; shift 2 ;;
    --log_dir) need_value "$1" "$@"; LOG_DIR=$2; shift 2 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

require --gin_file "${GIN_FILES[*]}"
[[ $NUM =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer: $NUM"
[[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer: $DEVICES"
[[ $PORT =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number: $PORT"

cd "$REPO_ROOT"
if ((!DRY_RUN)) && ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
  die "no Python at $PYTHON_BIN (run bash launch/setup_env.sh, or pass --python)"
fi

# Keep the caller's other XLA flags; the device count is ours.
xla_flags=()
read -ra caller_flags <<< "${XLA_FLAGS:-}"
for f in "${caller_flags[@]}"; do
  [[ $f == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$f")
done
xla_flags+=("--xla_force_host_platform_device_count=$DEVICES")

CMDS=() LOGS=()
for ((i = 0; i < NUM; i++)); do
  build_train_cmd "$PYTHON_BIN" JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags[*]}" \
    "JAX_COORDINATOR_ADDRESS=localhost:$PORT" "JAX_NUM_PROCESSES=$NUM" "JAX_PROCESS_ID=$i" \
    TF_CPP_MIN_LOG_LEVEL=2
  CMDS+=("$(quote_cmd "${TRAIN_CMD[@]}")")
  LOGS+=("$LOG_DIR/process-$i.log")
done

if ((DRY_RUN)); then
  print_cmd cd "$REPO_ROOT"
  print_cmd mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM; i++)); do
    printf '%s > %s 2>&1 &\n' "${CMDS[i]}" "$(printf '%q' "${LOGS[i]}")"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {
  local p
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < NUM; i++)); do
  printf '+ %s > %s 2>&1 &\n' "${CMDS[i]}" "${LOGS[i]}" >&2
  # The quoted line is re-read by bash so that what runs is exactly what was printed.
  bash -c "exec ${CMDS[i]}" > "${LOGS[i]}" 2>&1 &
  PIDS+=("$!")
done

declare -A INDEX=() RUNNING=()
for ((i = 0; i < NUM; i++)); do
  INDEX[${PIDS[i]}]=$i
  RUNNING[${PIDS[i]}]=1
done
failed=() stopped=()
# Polls (rather than `wait -n`, which can lose a job that ends while another is reported):
# a process that is gone is reaped with `wait PID`, which returns its saved exit status.
while ((${#RUNNING[@]})); do
  for pid in "${!RUNNING[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    unset "RUNNING[$pid]"
    i=${INDEX[$pid]}
    if ((rc == 0)); then
      echo "[local_multiprocess] process $i finished (log ${LOGS[i]})" >&2
    elif ((${#failed[@]})); then
      echo "[local_multiprocess] process $i stopped (status $rc) after process ${failed[0]} failed" >&2
      stopped+=("$i")
    else
      echo "[local_multiprocess] process $i failed with status $rc (log ${LOGS[i]}); stopping the others" >&2
      failed+=("$i")
      stop_all
    fi
  done
  if ((${#RUNNING[@]})); then
    sleep 0.2
  fi
done
trap - INT TERM

if ((${#failed[@]})); then
  echo "---- last lines of ${LOGS[failed[0]]} ----" >&2
  tail -n 20 "${LOGS[failed[0]]}" >&2 || true
  echo "$LAUNCH_NAME: error: process ${failed[0]} of $NUM failed (${#stopped[@]} others stopped); logs in $LOG_DIR/" >&2
  exit 1
fi
echo "[local_multiprocess] all $NUM processes succeeded; logs in $LOG_DIR/" >&2
