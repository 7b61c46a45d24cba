#!/usr/bin/env bash
# N CPU processes on this machine joined by jax.distributed: try multi-host code on a laptop.
#
#   launch/local_multiprocess.sh 2 --config=configs/skill.py:tiny --workdir=runs/mp
#
# Every process runs `python -m mdkif_jax.main "$@"` with JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID set (main.py passes them to jax.distributed.initialize)
# and DEVICES_PER_PROCESS forced host CPU devices, so a mesh shape of (-1, 1, 1) spans
# N * DEVICES_PER_PROCESS devices. Process 0 writes to this terminal (progress bar, metrics);
# the others log to $LOG_DIR/process_<i>.log. If one process fails, the others are stopped
# (they would otherwise wait for it in a collective forever) and its exit status is returned.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3),
# DEVICES_PER_PROCESS (default 2), PORT (default: a free one), LOG_DIR (default: a new
# temporary directory).
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [mdkif_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t mdkif_mp.XXXXXX)}
mkdir -p "$log_dir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  if ((i == 0)); then out=/dev/stdout; else out="$log_dir/process_$i.log"; fi
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num_processes" \
    JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$PYTHON" -m mdkif_jax.main "$@" >"$out" 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes on 127.0.0.1:$port; logs of processes 1.. in $log_dir" >&2

status=0
for _ in "${pids[@]}"; do
  wait -n || status=$?
  if ((status != 0)); then
    echo "a process exited with status $status; stopping the others" >&2
    stop_all
    wait || true
    break
  fi
done
exit "$status"
