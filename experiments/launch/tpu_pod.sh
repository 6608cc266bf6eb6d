#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker runs the same command.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket REPO=<git URL of this repo> \
#     bash experiments/launch/tpu_pod.sh
#
# On TPU VMs, jax.distributed.initialize() takes the coordinator, process count and id from
# the pod's metadata, so the config only says parallel.distributed='auto' (tpu_pod.py does).
# The workdir must be storage every worker sees (a GCS bucket): Orbax writes checkpoints from
# all processes, process 0 writes logs. Prepare the dataset first (TFDS_DATA_DIR on GCS too).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET}" "${REPO:?set REPO}"
MODEL=${MODEL:-resunet}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d resunet_jax ] || git clone $REPO resunet_jax
  cd resunet_jax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  TFDS_DATA_DIR=$BUCKET/tensorflow_datasets python experiments/train.py --model=$MODEL \
    --config=experiments/configs/tpu_pod.py --workdir=$BUCKET/runs/$MODEL-tpu-pod
"
