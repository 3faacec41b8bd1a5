#!/bin/bash
# Multi-node RedNet training on SLURM: one torchrun per node, each starting one process per GPU.
#
#   sbatch scripts/slurm_train.sh                                   # RedNet-50, the paper's recipe, 8 nodes x 8 GPUs
#   sbatch --nodes=2 scripts/slurm_train.sh model=rednet26          # extra arguments go to train.py
#
# The paper's global batch is 2048 = 32 per GPU x 64 GPUs; with fewer GPUs the learning rate follows the
# global batch (0.1 per 256 images) automatically, or keep 2048 with train.grad_accum.
# Faster, not the paper's numerics: append train.amp=bf16 train.channels_last=true.
# Preemption: SLURM sends SIGTERM (here 120 s before the time limit, --signal); train.py saves
# checkpoints/last.pt and exits; requeue and train.resume=auto continue from there.
#SBATCH --job-name=rednet50
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
DATA_ROOT=${DATA_ROOT:-/datasets/imagenet}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}   # one directory for all ranks (and for requeues)

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# srun starts one torchrun per node; torchrun forwards SIGTERM to its workers
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    train.py \
    model=rednet50 data=imagenet data.root="$DATA_ROOT" \
    train.batch_size=32 data.workers=8 \
    train.resume=auto hydra.run.dir="$RUN_DIR" \
    "$@"
