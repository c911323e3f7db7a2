#!/usr/bin/env bash
# Runs rcnas_jax on one multi-GPU node.
#
#   CONFIG=configs/cifar10.py WORKDIR=workdir/cifar10 launch/gpu_node.sh            # 1 process
#   PROCESSES=8 CONFIG=configs/cifar10.py WORKDIR=workdir/cifar10 launch/gpu_node.sh  # 1 per GPU
#
# The default, one process driving every GPU of the node, needs no distributed runtime: the
# mesh spans all local GPUs. PROCESSES=N starts N processes, each owning
# GPUs/N GPUs, joined by jax.distributed with process 0 as coordinator on this host: the layout
# of a multi-node job, handy to test one on a single machine.
set -euo pipefail
CONFIG=${CONFIG:-configs/quickstart.py}
WORKDIR=${WORKDIR:-workdir/gpu}
PROCESSES=${PROCESSES:-1}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}

if [ "$PROCESSES" -eq 1 ]; then
  exec "$PYTHON" -m rcnas_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
fi
GPUS=$(nvidia-smi --list-gpus | wc -l)
PER_PROCESS=$((GPUS / PROCESSES))
pids=()
for ((i = 0; i < PROCESSES; i++)); do
  ids=$(seq -s, $((i * PER_PROCESS)) $(((i + 1) * PER_PROCESS - 1)))
  JAX_LOCAL_DEVICE_IDS=$ids "$PYTHON" -m rcnas_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.distributed.coordinator_address="127.0.0.1:$PORT" \
    --config.distributed.num_processes="$PROCESSES" --config.distributed.process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
