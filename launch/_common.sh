# Helpers shared by the launch scripts (tpu_pod.sh, gpu_single_host.sh, gpu_slurm.sh,
# local_multiprocess.sh). Sourced, not run. Commands are kept in bash arrays and printed with
# `printf '%q '`, so a gin binding with spaces or quotes reaches `python -m oxyjax.train` as
# one argument, exactly as given.
# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts

LAUNCH_NAME=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0

# Options every script shares (filled by parse_common_option).
GIN_FILES=()
GIN_BINDINGS=()
EXTRA_ARGS=()   # after a bare `--`, and any --gin.NAME=VALUE: passed to the trainer as they are
ENV_VARS=()     # --env KEY=VALUE
MODEL_DIR=""

die() {
  printf '%s: error: %s\n' "$LAUNCH_NAME" "$*" >&2
  exit 2
}

# require OPTION VALUE: fails with a message naming OPTION when VALUE is empty.
require() {
  if [[ -z $2 ]]; then
    die "missing required option $1 (see --help)"
  fi
}

# Splits `--opt=value` into `--opt value` (so both spellings work) up to a bare `--`;
# `--gin.NAME=VALUE` stays whole. The result is in NORM_ARGS.
normalize_args() {
  NORM_ARGS=()
  while (($#)); do
    case $1 in
      --) NORM_ARGS+=("$@"); return 0 ;;
      --gin.*=*) NORM_ARGS+=("$1") ;;
      --*=*) NORM_ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) NORM_ARGS+=("$1") ;;
    esac
    shift
  done
}

# need_value OPTION "$@": fails unless OPTION is followed by a value.
need_value() {
  if (($# < 3)); then
    die "option $1 needs a value"
  fi
}

# parse_common_option "$@": handles an option every script takes. Sets SHIFT_BY to the
# number of arguments consumed, or 0 when the option is not a common one.
parse_common_option() {
  SHIFT_BY=0
  case $1 in
    --gin_file) need_value "$1" "$@"; GIN_FILES+=("$2"); SHIFT_BY=2 ;;
    --gin_binding|--gin_bindings) need_value "$1" "$@"; GIN_BINDINGS+=("$2"); SHIFT_BY=2 ;;
    --model_dir) need_value "$1" "$@"; MODEL_DIR=$2; SHIFT_BY=2 ;;
    --env)
      need_value "$1" "$@"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got: $2"
      ENV_VARS+=("$2"); SHIFT_BY=2 ;;
    --gin.*=*) EXTRA_ARGS+=("$1"); SHIFT_BY=1 ;;
    --dry_run) DRY_RUN=1; SHIFT_BY=1 ;;
    --) shift; EXTRA_ARGS+=("$@"); SHIFT_BY=$(($# + 1)) ;;
  esac
}

# quote_cmd ARGS...: the command as one shell-quoted line (no trailing newline).
quote_cmd() {
  local s
  s=$(printf '%q ' "$@")
  printf '%s' "${s% }"
}

print_cmd() {
  printf '%s\n' "$(quote_cmd "$@")"
}

# run ARGS...: prints the command under --dry_run; otherwise echoes it to stderr and runs it.
run() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# require_tool NAME: outside --dry_run, fails clearly when NAME is not installed.
require_tool() {
  if ((!DRY_RUN)) && ! command -v "$1" >/dev/null 2>&1; then
    die "'$1' is not installed or not on PATH (use --dry_run to only print the commands)"
  fi
}

# gin_string VALUE: VALUE as a gin (Python) string literal, into GIN_STRING.
gin_string() {
  local v=$1
  if [[ $v == *\\* ]]; then
    die "cannot pass a path containing a backslash as a gin string: $v"
  elif [[ $v != *"'"* ]]; then
    GIN_STRING="'$v'"
  elif [[ $v != *'"'* ]]; then
    GIN_STRING="\"$v\""
  else
    die "cannot pass a path containing both quote characters as a gin string: $v"
  fi
}

# user_sets_macro NAME: true when a --gin_binding or --gin.NAME=... already binds macro NAME.
user_sets_macro() {
  local b
  for b in "${GIN_BINDINGS[@]}"; do
    [[ $b =~ ^[[:space:]]*$1[[:space:]]*= ]] && return 0
  done
  for b in "${EXTRA_ARGS[@]}"; do
    [[ $b == "--gin.$1="* ]] && return 0
  done
  return 1
}

# jax_version: the jax pin in requirements.txt, into JAX_VERSION.
jax_version() {
  JAX_VERSION=$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "$REPO_ROOT/requirements.txt" | head -n 1)
  [[ -n $JAX_VERSION ]] || die "no 'jax==VERSION' pin found in requirements.txt"
}

# build_train_cmd PYTHON [KEY=VALUE...]: TRAIN_CMD becomes
#   env KEY=VALUE... <--env vars> PYTHON -m oxyjax.train --gin_file=... --gin_bindings=...
#       [--gin.MODEL_DIR='...'] <extra args>
# Script-set variables come first so a user's --env wins.
build_train_cmd() {
  local python=$1 f b
  shift
  TRAIN_CMD=(env "$@" "${ENV_VARS[@]}" "$python" -m oxyjax.train)
  for f in "${GIN_FILES[@]}"; do
    TRAIN_CMD+=("--gin_file=$f")
  done
  for b in "${GIN_BINDINGS[@]}"; do
    TRAIN_CMD+=("--gin_bindings=$b")
  done
  if [[ -n $MODEL_DIR ]]; then
    gin_string "$MODEL_DIR"
    TRAIN_CMD+=("--gin.MODEL_DIR=$GIN_STRING")
  fi
  TRAIN_CMD+=("${EXTRA_ARGS[@]}")
}
