#!/bin/bash
# Multi-node RedNet training on SLURM: one torchrun per node, each starting one process per GPU.
#
#   sbatch scripts/slurm_train.sh                                  # RedNet-50, the paper's recipe, 8 nodes x 8 GPUs
#   sbatch --nodes=2 scripts/slurm_train.sh model=rednet26         # extra arguments go to train.py
#   sbatch --job-name=r50-try2 scripts/slurm_train.sh              # another run: another directory
#   RUN_DIR=runs/mine sbatch scripts/slurm_train.sh                # or name the directory yourself
#
# One run directory for the whole run: runs/<job name> (or $RUN_DIR), never the job id, so a requeued or
# resubmitted job (`sbatch` again with the same --job-name) continues the same run with train.resume=auto.
# Resubmitting on another node count is fine: the schedule is rebuilt for the new global batch (README).
#
# Time limit and preemption: SLURM signals this batch shell (--signal=B:USR1, 180 s before the time limit;
# SIGTERM on preemption). The trap forwards SIGTERM to srun, which forwards it to torchrun and the training
# processes; they finish the current step, save checkpoints/last.pt and exit. Then the job requeues itself
# (scontrol requeue: SLURM's --requeue alone does not requeue on a time limit) and continues where it stopped.
#
# The paper's global batch is 2048 = 32 per GPU x 64 GPUs; with fewer GPUs the learning rate follows the
# global batch (0.1 per 256 images) automatically, or keep 2048 with train.grad_accum.
# Faster, not the paper's numerics: append train.amp=bf16 train.channels_last=true.
# Sweeps and multi-node jobs without this script: python train.py -m hydra/launcher=submitit_slurm ...
# (pip install -e '.[slurm]'; see the README).
#SBATCH --job-name=rednet50
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x.out

set -uo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
DATA_ROOT=${DATA_ROOT:-/datasets/imagenet}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}}   # the same for all ranks, requeues and resubmissions

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

TRAIN_PID=
requeue() {
    echo "$(date '+%F %T') job ${SLURM_JOB_ID}: $1: training saves ${RUN_DIR}/checkpoints/last.pt and stops; requeueing"
    [ -n "$TRAIN_PID" ] && kill -TERM "$TRAIN_PID" 2>/dev/null
    [ -n "$TRAIN_PID" ] && wait "$TRAIN_PID"
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: resubmit with the same --job-name to continue"
    exit 0
}
trap 'requeue "time limit near (USR1)"' USR1
trap 'requeue "preempted or cancelled (TERM)"' TERM

echo "$(date '+%F %T') job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): run directory ${RUN_DIR}"
# srun starts one torchrun per node and forwards signals to it; torchrun forwards SIGTERM to its workers
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
    "$@" &
TRAIN_PID=$!
wait "$TRAIN_PID"
status=$?
# wait returns early (> 128) when a trapped signal arrives; the trap then takes over and exits
exit $status
