#!/usr/bin/env bash
# Runs rcnas_jax on every worker of a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips).
#
#   TPU_NAME=my-pod ZONE=us-central2-b CONFIG=configs/cifar10.py WORKDIR=/mnt/shared/run1 \
#     launch/tpu_pod.sh
#
# One gcloud command starts the same program on all workers. On Cloud TPU, JAX finds the
# coordinator (worker 0), the process count and each process id by itself (its GCE TPU cluster
# detection); config.distributed.enabled=True makes rcnas_jax call jax.distributed.initialize().
# WORKDIR must be the same shared directory on every worker (NFS/Filestore or a gcsfuse mount).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-configs/quickstart.py}
WORKDIR=${WORKDIR:-/mnt/shared/rcnas}
REPO=${REPO:-https://github.com/OWNER/rcnas_jax.git}  # Where the workers get the code.
EXTRA_FLAGS=${EXTRA_FLAGS:-}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  test -d rcnas_jax || git clone '$REPO' rcnas_jax
  cd rcnas_jax && pip install -q -e '.[tpu]'
  python -m rcnas_jax.main --config='$CONFIG' --workdir='$WORKDIR' \
    --config.distributed.enabled=True $EXTRA_FLAGS"
