#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task (JAX process) per node, all GPUs of the node.
#
#   sbatch --nodes=4 experiments/launch/slurm.sh [extra train.py flags]
#
# jax.distributed.initialize() detects SLURM (SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID)
# when parallel.distributed='auto'; the first node is the coordinator. The workdir must be a
# shared filesystem: Orbax writes checkpoints from every process.
#SBATCH --job-name=resunet_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=TERM@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
MODEL=${MODEL:-resunet}
WORKDIR=${WORKDIR:-runs/$MODEL-slurm-$SLURM_JOB_ID}
# --signal=TERM@120: SLURM sends SIGTERM two minutes before the time limit; the loop saves a
# checkpoint after the current step and exits 0. Resubmit with the same WORKDIR to resume.
srun python experiments/train.py --model="$MODEL" --config=experiments/configs/tpu_pod.py \
  --config.data.num_workers=4 --workdir="$WORKDIR" "$@"
