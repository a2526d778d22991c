#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node, preemption-safe.
#
#   sbatch --nodes 2 scripts/slurm.sh loss=dpo model=llama distributed=fsdp exp_name=dpo-llama
#
# Every node runs `torchrun --nnodes $SLURM_NNODES --nproc_per_node <GPUs per node>` with the c10d
# rendezvous at the first node. Before the time limit SLURM sends USR1 to this script
# (--signal=B:USR1@120); the trap sends SIGTERM to the job step, which srun and torchrun pass on to
# the training processes (torchrun does not pass USR1): they finish their step, save step-N and
# exit. The job then requeues itself, and the same command continues from step-N (resume=auto).
# cache_dir must be on a filesystem every node sees.
#SBATCH --job-name=aligntrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}

srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/torchrun --nnodes $SLURM_NNODES --nproc_per_node $gpus_per_node \
    --rdzv_backend c10d --rdzv_endpoint $head_node:29500 --rdzv_id $SLURM_JOB_ID \
    launch.py $*" &
pid=$!
trap 'echo "USR1: saving and requeueing"; kill -TERM $pid; wait $pid || true; scontrol requeue $SLURM_JOB_ID' USR1
wait $pid
