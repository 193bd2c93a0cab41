#!/usr/bin/env bash
# N training processes on this machine, each with its own CPU devices, joined by
# jax.distributed (gloo collectives) into one run over all N x D devices: the same code
# path as a multi-host pod, for trying multi-process changes on a laptop.
#
#   bash launch/local_cpu_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [train flags...]
#   bash launch/local_cpu_multiprocess.sh 2 configs/tiny_cpu.py /tmp/mp_run \
#       --set train.steps=20 --set train.log_every=10 --set train.eval_every=0
#
# Environment:
#   DEVICES_PER_PROCESS  CPU devices per process (default 1; sets
#                        XLA_FLAGS=--xla_force_host_platform_device_count)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   LOG_DIR              one log per process (default WORKDIR/logs/process_<i>.log);
#                        every line is also printed here prefixed with [p<i>]
#   TRAIN_CMD         the command to run (default: starflow-jax, else python -m
#                        starflow_jax.cli.main)
#
# Every process writes the same WORKDIR (checkpoints are written by all processes
# together, as on a pod with a shared filesystem). If one process fails, the others are
# stopped and the script exits with its status.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
NPROC=$1 CONFIG=$2 WORKDIR=$3
shift 3
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '$NPROC'" >&2
  exit 2
fi
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}

if [[ -n ${TRAIN_CMD:-} ]]; then
  read -r -a CMD <<<"$TRAIN_CMD"
elif command -v starflow-jax >/dev/null; then
  CMD=(starflow-jax)
else
  CMD=(python -m starflow_jax.cli.main)
fi
# A free TCP port for process 0's coordinator service (asked from the OS).
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
mkdir -p "$LOG_DIR"

# Every process: CPU only, its own D devices, the same coordinator, its own id.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS${XLA_FLAGS:+ $XLA_FLAGS}"
# Do not let the SLURM/STARFLOW variables of the calling shell leak into the processes.
unset STARFLOW_COORDINATOR STARFLOW_NUM_PROCESSES STARFLOW_PROCESS_ID STARFLOW_LOCAL_DEVICE_IDS

echo "launching $NPROC processes x $DEVICES_PER_PROCESS CPU devices, coordinator 127.0.0.1:$PORT, workdir $WORKDIR"
PIDS=()
declare -A REAPED=()
cleanup() {
  # Stop the processes this script started and that are still running (only those),
  # e.g. on Ctrl-C or a failure.
  for pid in "${PIDS[@]}"; do
    [[ -n ${REAPED[$pid]:-} ]] || kill "$pid" 2>/dev/null || true
  done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < NPROC; i++)); do
  # The process's output goes to its log and to this terminal prefixed with [p<i>]; $! is
  # the training process itself, so that a failure elsewhere can stop it.
  PYTHONUNBUFFERED=1 "${CMD[@]}" train --config "$CONFIG" --workdir "$WORKDIR" \
    --coordinator-address "127.0.0.1:$PORT" --num-processes "$NPROC" --process-id "$i" "$@" \
    > >(tee "$LOG_DIR/process_$i.log" | sed -u "s/^/[p$i] /") 2>&1 &
  PIDS+=($!)
done

# Wait for all; on the first failure stop the rest (they would otherwise wait for the
# failed process in a collective until the coordinator's heartbeat timeout).
status=0
remaining=("${PIDS[@]}")
while ((${#remaining[@]})); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    REAPED[$pid]=1
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "a process (pid $pid) exited with status $rc; stopping the others" >&2
      cleanup
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
  if ((${#remaining[@]})); then sleep 1; fi
done
wait  # the log pipes
if ((status == 0)); then
  echo "all $NPROC processes finished; logs in $LOG_DIR"
fi
exit "$status"
