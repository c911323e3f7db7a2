#!/usr/bin/env bash
# Tries a multi-process run on one machine's CPU: N processes of D virtual devices each, joined
# by jax.distributed over 127.0.0.1 (gloo collectives). The same layout as a multi-host job.
#
#   PROCESSES=2 DEVICES=2 launch/local_cpu.sh --config=configs/quickstart.py --workdir=workdir/mp
#   PROCESSES=2 launch/local_cpu.sh launch/check_distributed.py --steps=3     # the smoke test
#
# The first argument is a Python script, or else the flags of rcnas_jax.main.
set -euo pipefail
PROCESSES=${PROCESSES:-2}
DEVICES=${DEVICES:-2}
PORT=${PORT:-12356}
PYTHON=${PYTHON:-python}
if [[ "${1:-}" != -* && "${1:-}" == *.py ]]; then
  program=("$1"); shift
  flags=(--cpu_devices="$DEVICES" --coordinator_address="127.0.0.1:$PORT"
         --num_processes="$PROCESSES")
  id_flag=--process_id
else
  program=(-m rcnas_jax.main)
  flags=(--config.distributed.coordinator_address="127.0.0.1:$PORT"
         --config.distributed.num_processes="$PROCESSES")
  id_flag=--config.distributed.process_id
fi
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
pids=()
for ((i = 0; i < PROCESSES; i++)); do
  "$PYTHON" "${program[@]}" "$@" "${flags[@]}" "$id_flag=$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
