#!/bin/bash
# FLIP ViT-G/14 pre-training (configs/flip_g14.yaml): 32 nodes x 8 GPUs (80 GB), tensor parallel 2
# inside a node, ZeRO-3 (FSDP2) over the 128 data-parallel ranks, full activation checkpointing.
#
#   sbatch slurm/flip_g14.sh                      # from the repository root (log: ./flip_g14-JOBID.out)
#   FLIP_ARGS="data.train_shards=/data/laion/{00000..41407}.tar data.tokenizer=/data/spm.model" \
#       sbatch slurm/flip_g14.sh
#   sbatch -N 64 --time=24:00:00 --partition=gpu slurm/flip_g14.sh    # the #SBATCH lines are defaults
#
# Variables (all optional; slurm/common.sh documents the rest):
#   FLIP_CONFIG     recipe (default configs/flip_g14.yaml)
#   FLIP_ARGS       extra key=value overrides, applied last (default: none)
#   FLIP_LAYOUT     layout overrides for this size, applied before FLIP_ARGS (default:
#                   "parallel.tp=2 parallel.dp_shard=-1 parallel.activation_checkpointing=full"; FLIP_LAYOUT= (empty) keeps the recipe's)
#   RUN_DIR         run directory (default runs/$SLURM_JOB_NAME: resubmitting with the same job name resumes)
#   NPROC_PER_NODE  processes per node (default: the GPUs of the node; with FLIP_DEVICE=cpu, the tasks per node)
#   FLIP_DEVICE     cuda (default) | cpu
#   FLIP_MAX_REQUEUES  requeues at one checkpoint step before giving up (default 3)
#   FLIP_REQUEUE_ON_FAILURE  1 (default): a failed run (exit code other than 0, 2 and 42) is requeued
#                   too, under FLIP_MAX_REQUEUES; 0: only a preemption is (exit code 2, a config error: never)
#   FLIP_HOME       repository root (default: the submit directory)
# Preemption: 600 s before the time limit Slurm sends SIGUSR1 to this shell; the trainers finish
# their step, write a checkpoint and exit 42; the job requeues itself and resumes from `latest`.
#
# Sizing (README "Running on a Slurm cluster"): 2.52 B parameters = 40 GB of fp32 weights + grads +
# Adam states, 157 MB per rank sharded over all 256 ranks (tp 2 x dp_shard 128). Activations decide:
# 512 samples per data-parallel rank (64k / 128) at 129 visible tokens keep ~105 GB per rank without
# checkpointing, ~55 GB with every second block checkpointed, ~6 GB (+2 GB for the block being
# recomputed) with full checkpointing. tp 2 halves what ZeRO-3 moves between nodes per step
# (8 bytes per parameter per rank: 20 GB -> 10 GB) and keeps tensor-parallel traffic on NVLink.
#SBATCH --job-name=flip_g14
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# (one task per GPU; --mem=0: all of the node's memory; --open-mode=append: a requeued run appends
#  to the same log; no --partition: give -p on the command line where the cluster needs one)

# Slurm runs a copy of this file, so its own path does not lead back to the repository.
FLIP_HOME=${FLIP_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$FLIP_HOME/slurm/common.sh" ]; then
  echo "flip_scale: $FLIP_HOME/slurm/common.sh not found: submit from the repository root or set FLIP_HOME" >&2
  exit 2
fi
FLIP_CONFIG=${FLIP_CONFIG:-configs/flip_g14.yaml}
FLIP_LAYOUT=${FLIP_LAYOUT-parallel.tp=2 parallel.dp_shard=-1 parallel.activation_checkpointing=full}
# shellcheck source=common.sh
source "$FLIP_HOME/slurm/common.sh"

read -r -a FLIP_LAYOUT_LIST <<< "$FLIP_LAYOUT"
flip_train "${FLIP_LAYOUT_LIST[@]}"
