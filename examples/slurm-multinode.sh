#!/bin/bash
# One `bidirlm train` (or the MNTP phase of a recipe) on several nodes under SLURM: one torchrun
# launcher per node, meeting at a c10d rendezvous on the first node. The paper's MNTP step
# (train.tokens_per_step = 2359296) on 12 nodes x 8 GPUs runs 3 accumulation steps per rank.
#
#   sbatch examples/slurm-multinode.sh CONFIG.toml [--set section.key=value ...]
#
# Checkpoints must be on a filesystem every node sees (train.output). SLURM's SIGTERM before the
# time limit (--signal) makes the run checkpoint and stop; submitting again resumes it.
#SBATCH --job-name=bidirlm
#SBATCH --nodes=12
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
config=${1:?usage: sbatch examples/slurm-multinode.sh CONFIG.toml [--set key=value ...]}
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$head_node:29500" \
    --rdzv-id="$SLURM_JOB_ID" \
    -m bidirlm.cli train "$config" "$@"
