#!/usr/bin/env bash
# Runs N processes of one command on this machine as one multi-host JAX run (CPU, gloo collectives): process i
# gets FIAT_COORDINATOR_ADDRESS / FIAT_NUM_PROCESSES / FIAT_PROCESS_ID (read by fiat_jax.training.distributed) and D fake
# CPU devices. Process 0's output streams here; the others go to LOG_DIR/process-<i>.log.
#
#   launch/local.sh [--processes=2] [--devices=2] [--port=PORT] [--log_dir=DIR] [--dry-run] \
#       -- fiat train --gin_file=runs/xtreme_up_indic/xs_wo_cot.gin --gin_file=tiny.gin \
#          --gin.DATA_DIR="'tests/testdata/xtreme_up'" --gin.RUNS_DIR="'/tmp/runs'" --gin.STORE_DIR="'/tmp/store'"
#
# Every process reads its own share of each batch, the run directory is shared (Orbax writes each process's
# shards; only process 0 writes logs, metrics and the selected τ).
#
# Exits with the first non-zero exit code (which also stops the other processes), 0 when all succeed; Ctrl-C
# stops all of them.
set -euo pipefail

PROCS=2 DEVICES=2 PORT="" LOG_DIR="" DRY=0
die() { echo "launch/local.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --processes=*) PROCS="${1#*=}" ;;
    --devices=*) DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --dry-run|--dry_run) DRY=1 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (the command goes after --)" ;;
  esac
  shift
done
[ $# -gt 0 ] || die "no command: add -- fiat MODE [--gin_file=...]"
[[ "$PROCS" =~ ^[1-9][0-9]*$ ]] || die "--processes=$PROCS: a positive integer"
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--devices=$DEVICES: a positive integer"
if [ -z "$PORT" ]; then  # a free localhost port, chosen by the OS
  PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[ -n "$LOG_DIR" ] || LOG_DIR="logs/local-$(date +%Y%m%d-%H%M%S)"

env_of() {  # the environment of process $1
  echo "FIAT_COORDINATOR_ADDRESS=127.0.0.1:$PORT FIAT_NUM_PROCESSES=$PROCS FIAT_PROCESS_ID=$1" \
       "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES"
}

if [ "$DRY" = 1 ]; then
  for ((i = 0; i < PROCS; i++)); do
    out="$LOG_DIR/process-$i.log"; [ "$i" = 0 ] && out="(this terminal)"
    echo "env $(env_of "$i") $(printf '%q ' "$@")> $out"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # a checkout runs without being installed
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done; }
trap 'stop; exit 130' INT TERM
for ((i = 1; i < PROCS; i++)); do
  # shellcheck disable=SC2046
  env $(env_of "$i") "$@" > "$LOG_DIR/process-$i.log" 2>&1 &
  PIDS+=($!)
done
# shellcheck disable=SC2046
env $(env_of 0) "$@" &
PIDS=($! "${PIDS[@]}")
rc=0
declare -A LEFT=()
for ((i = 0; i < PROCS; i++)); do LEFT[${PIDS[$i]}]=$i; done
while [ ${#LEFT[@]} -gt 0 ]; do  # as each process ends; the first failure stops the others (they would hang)
  for pid in "${!LEFT[@]}"; do
    kill -0 "$pid" 2> /dev/null && continue
    code=0; wait "$pid" || code=$?
    i="${LEFT[$pid]}"; unset "LEFT[$pid]"
    if [ "$code" != 0 ] && [ "$rc" = 0 ]; then
      rc="$code"
      echo "launch/local.sh: process $i exited $code$([ "$i" != 0 ] && echo " (log: $LOG_DIR/process-$i.log)");" \
           "stopping the others" >&2
      stop
    fi
  done
  sleep 0.2
done
exit "$rc"
