#!/usr/bin/env bash
# Runs `fiat MODE ...` on every worker of a Cloud TPU VM or pod slice, creating the TPU if it does not exist.
#
#   launch/tpu.sh --name=fiat-v5e --zone=us-west4-a --accelerator=v5litepod-16 [--project=P] [--spot] \
#       [--version=RUNTIME] [--run=NAME] [--env=NAME=VALUE ...] [--skip_install] [--dry-run] \
#       -- train --gin_file=runs/xor_attriqa/xs_fiat.gin --gin_file=beta/http.gin --gin.DATA_DIR=... --gin.RUNS_DIR=...
#
# Steps: create-or-reuse the TPU; copy this checkout (without .git/.venv) to ~/fiat-jax on every worker; install
# (uv, Python 3.11, `pip install -e . jax[tpu]`); start `fiat ...` detached on every worker (jax.distributed finds
# the other workers itself on a TPU VM); stream worker 0's log (~/fiat-logs/RUN.log) until the run ends, and exit
# with its exit code. Gin files must be inside the checkout (they are copied with it; give repo-relative paths).
# --dry-run prints the exact commands instead of running them. Re-attach to a running job's log with
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 --command='cd ~/fiat-jax && bash launch/tpu.sh --worker-stream=RUN'
set -euo pipefail

REMOTE_DIR="fiat-jax"  # under the worker's home
LOG_DIR="fiat-logs"
PYTHON_VERSION="3.11"
JAX_TPU="jax[tpu]>=0.10.2,<0.11"

die() { echo "launch/tpu.sh: $*" >&2; exit 2; }

# ---- worker side (this same file, run on the TPU VM) ------------------------------------------------------------

worker_install() {
  if ! command -v uv > /dev/null && [ ! -x "$HOME/.local/bin/uv" ]; then
    curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  local uv; uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
  [ -x .venv/bin/python ] || "$uv" venv --python "$PYTHON_VERSION" .venv
  "$uv" pip install --python .venv/bin/python -e . "$JAX_TPU"
}

worker_run() {  # detaches, so the ssh session that started it can end
  local run="$1"; shift
  mkdir -p "$HOME/$LOG_DIR"
  rm -f "$HOME/$LOG_DIR/$run".{log,rc,pid}
  setsid nohup bash "$0" --worker-exec="$run" -- "$@" > /dev/null 2>&1 < /dev/null &
}

worker_exec() {
  local run="$1"; shift
  local base="$HOME/$LOG_DIR/$run"
  echo $$ > "$base.pid.tmp" && mv "$base.pid.tmp" "$base.pid"
  local rc=0
  .venv/bin/fiat "$@" > "$base.log" 2>&1 || rc=$?
  echo "$rc" > "$base.rc"
}

worker_stream() {  # worker 0's log from the start, until the run ends; exits with the run's exit code
  local base="$HOME/$LOG_DIR/$1"
  for _ in $(seq 120); do [ -s "$base.pid" ] && [ -e "$base.log" ] && break; sleep 1; done
  [ -s "$base.pid" ] || { echo "no run $1 started on this worker ($base.pid missing)" >&2; exit 3; }
  tail -n +1 -F --pid="$(cat "$base.pid")" "$base.log" 2> /dev/null || true
  for _ in $(seq 10); do [ -s "$base.rc" ] && break; sleep 1; done
  [ -s "$base.rc" ] || { echo "run $1 ended without an exit code (killed?)" >&2; exit 3; }
  exit "$(cat "$base.rc")"
}

case "${1:-}" in
  --worker-install) worker_install; exit ;;
  --worker-run=*) run="${1#*=}"; shift; [ "${1:-}" = "--" ] && shift; worker_run "$run" "$@"; exit ;;
  --worker-exec=*) run="${1#*=}"; shift; [ "${1:-}" = "--" ] && shift; worker_exec "$run" "$@"; exit ;;
  --worker-stream=*) worker_stream "${1#*=}" ;;
esac

# ---- launcher side -----------------------------------------------------------------------------------------------

NAME="" ZONE="" ACCELERATOR="" PROJECT="" VERSION="" SPOT=0 DRY=0 INSTALL=1 RUN="" ENVS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --run=*) RUN="${1#*=}" ;;
    --env=*) ENVS+=("${1#*=}") ;;
    --spot) SPOT=1 ;;
    --skip_install) INSTALL=0 ;;
    --dry-run|--dry_run) DRY=1 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (the fiat command goes after --)" ;;
  esac
  shift
done
[ -n "$NAME" ] || die "--name=TPU_NAME is required"
[ -n "$ZONE" ] || die "--zone=ZONE is required"
[ -n "$ACCELERATOR" ] || die "--accelerator=TYPE is required (e.g. v4-32, v5litepod-16, v5p-8, v6e-8)"
[ $# -gt 0 ] || die "no fiat command: add -- MODE [--gin_file=... --gin.NAME=VALUE ...]"
case "$1" in fiat) shift ;; esac  # accept both `-- fiat train ...` and `-- train ...`

if [ -z "$VERSION" ]; then  # the TPU software version Google recommends per generation
  case "$ACCELERATOR" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "--accelerator=$ACCELERATOR: unknown generation; give --version=RUNTIME" ;;
  esac
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do  # gin files travel with the checkout: they must be inside it
  case "$arg" in
    --gin_file=*)
      f="${arg#--gin_file=}"
      case "$f" in gs://*) continue ;; /*) die "--gin_file=$f: give a path relative to the checkout ($REPO)" ;; esac
      [ -f "$REPO/$f" ] || [ -f "$REPO/gin_configs/$f" ] ||
        die "--gin_file=$f: not found in $REPO or $REPO/gin_configs (gin files are copied with the checkout)" ;;
  esac
done
[ -n "$RUN" ] || RUN="run-$(date +%Y%m%d-%H%M%S)"
case "$RUN" in *[!A-Za-z0-9._-]*) die "--run=$RUN: use letters, digits, '.', '_' and '-'" ;; esac

TARBALL="${TMPDIR:-/tmp}/fiat-jax-$NAME.tgz"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[ -n "$PROJECT" ] && WHERE+=("--project=$PROJECT")

q() {  # one shell-quoted command line: plain words as they are, others in single quotes
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+^-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

run() {
  if [ "$DRY" = 1 ]; then q "$@"; echo; else "$@"; fi
}

REMOTE_RUN="cd ~/$REMOTE_DIR && bash launch/tpu.sh --worker-run=$RUN -- $(q "$@")"
[ ${#ENVS[@]} -gt 0 ] && REMOTE_RUN="cd ~/$REMOTE_DIR && $(q env "${ENVS[@]}") bash launch/tpu.sh --worker-run=$RUN -- $(q "$@")"

# 1. create or reuse
DESCRIBE=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}")
CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
[ "$SPOT" = 1 ] && CREATE+=(--spot)
if [ "$DRY" = 1 ]; then
  echo "$(q "${DESCRIBE[@]}") > /dev/null 2>&1 || $(q "${CREATE[@]}")"
elif "${DESCRIBE[@]}" > /dev/null 2>&1; then
  echo "launch/tpu.sh: reusing TPU $NAME" >&2
else
  echo "launch/tpu.sh: creating TPU $NAME ($ACCELERATOR, $VERSION)" >&2
  "${CREATE[@]}"
fi

# 2. copy the checkout, 3. install, 4. start on every worker, 5. stream worker 0
run tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=__pycache__ --exclude='*.egg-info' -C "$REPO" .
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:$REMOTE_DIR.tgz" "${WHERE[@]}" --worker=all
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
    "--command=mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$REMOTE_DIR.tgz -C ~/$REMOTE_DIR"
if [ "$INSTALL" = 1 ]; then
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=cd ~/$REMOTE_DIR && bash launch/tpu.sh --worker-install"
fi
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$REMOTE_RUN"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 "--command=cd ~/$REMOTE_DIR && bash launch/tpu.sh --worker-stream=$RUN"
