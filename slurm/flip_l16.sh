#!/bin/bash
# FLIP ViT-L/16 pre-training (configs/flip_l16.yaml): 16 nodes x 8 GPUs, ZeRO-3 (FSDP2) over all 128 ranks.
#
#   sbatch slurm/flip_l16.sh                      # from the repository root (log: ./flip_l16-JOBID.out)
#   FLIP_ARGS="data.train_shards=/data/laion/{00000..41407}.tar data.tokenizer=/data/spm.model" \
#       sbatch slurm/flip_l16.sh
#   sbatch -N 32 --time=24:00:00 --partition=gpu slurm/flip_l16.sh    # the #SBATCH lines are defaults
#
# Variables (all optional; slurm/common.sh documents the rest):
#   FLIP_CONFIG     recipe (default configs/flip_l16.yaml)
#   FLIP_ARGS       extra key=value overrides, applied last (default: none)
#   FLIP_LAYOUT     layout overrides for this size, applied before FLIP_ARGS (default:
#                   "parallel.tp=1 parallel.dp_shard=-1 parallel.activation_checkpointing=none"; FLIP_LAYOUT= (empty) keeps the recipe's)
#   RUN_DIR         run directory (default runs/$SLURM_JOB_NAME: resubmitting with the same job name resumes)
#   NPROC_PER_NODE  processes per node (default: the GPUs of the node; with FLIP_DEVICE=cpu, the tasks per node)
#   FLIP_DEVICE     cuda (default) | cpu
#   FLIP_MAX_REQUEUES  requeues at one checkpoint step before giving up (default 3)
#   FLIP_REQUEUE_ON_FAILURE  1 (default): a failed run (exit code other than 0, 2 and 42) is requeued
#                   too, under FLIP_MAX_REQUEUES; 0: only a preemption is (exit code 2, a config error: never)
#   FLIP_HOME       repository root (default: the submit directory)
# Preemption: 300 s before the time limit Slurm sends SIGUSR1 to this shell; the trainers finish
# their step, write a checkpoint and exit 42; the job requeues itself and resumes from `latest`.
#
# Sizing (README "Running on a Slurm cluster"): 0.41 B parameters = 6.6 GB of fp32 weights + grads +
# Adam states, 52 MB per rank under ZeRO-3 over 128 ranks; 512 samples per rank (64k / 128) at 99
# visible tokens keep ~45 GB of activations without checkpointing.
#SBATCH --job-name=flip_l16
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
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
FLIP_CONFIG=${FLIP_CONFIG:-configs/flip_l16.yaml}
FLIP_LAYOUT=${FLIP_LAYOUT-parallel.tp=1 parallel.dp_shard=-1 parallel.activation_checkpointing=none}
# shellcheck source=common.sh
source "$FLIP_HOME/slurm/common.sh"

read -r -a FLIP_LAYOUT_LIST <<< "$FLIP_LAYOUT"
flip_train "${FLIP_LAYOUT_LIST[@]}"
