#!/bin/bash
# FLIP ViT-G/14 unmasked tuning (paper section 4.1): mask ratio 0, lr 4e-8 x batch / 256, from the
# pre-training run's last checkpoint, on the same 32 x 8 GPU layout. Submit it behind the
# pre-training job so that it starts when that job has finished (a requeue of the pre-training job
# keeps it waiting; it runs only after the final, successful end):
#
#   PRE=$(sbatch --parsable slurm/flip_g14.sh)
#   sbatch --dependency=afterok:$PRE slurm/unmask_tune_g14.sh
#
# Variables (all optional; slurm/common.sh documents the rest):
#   FLIP_FROM        pre-training run directory (its `latest`) or a step_XXXXXXXX checkpoint
#                    (default runs/flip_g14, the run directory of slurm/flip_g14.sh)
#   FLIP_UNMASK_RECIPE  the overlay put over the checkpoint's config, the tool's --overlay (default
#                    configs/unmask_tune.yaml)
#   FLIP_CONFIG      not used: the tool tunes the checkpoint's own config (its config.yaml); a value
#                    given is reported as ignored (default configs/flip_g14.yaml, checked by common.sh)
#   FLIP_ARGS        extra key=value overrides, applied last (default: none)
#   FLIP_LAYOUT      layout overrides (default "parallel.tp=2 parallel.dp_shard=-1
#                    parallel.activation_checkpointing=full"; FLIP_LAYOUT= keeps the recipe's)
#   RUN_DIR          run directory of the tuning (default runs/$SLURM_JOB_NAME = runs/unmask_tune_g14)
#   NPROC_PER_NODE, FLIP_DEVICE, FLIP_MAX_REQUEUES, FLIP_REQUEUE_ON_FAILURE, FLIP_HOME: as in
#                    slurm/flip_g14.sh
#
# It runs, one task per GPU,
#   tools/unmask_tune.py --from CKPT --run-dir RUN_DIR --resume auto --overlay FLIP_UNMASK_RECIPE \
#       train.device=FLIP_DEVICE FLIP_LAYOUT... FLIP_ARGS...
# (weights of CKPT, fresh optimizer, step 0, the tuning schedule: flip_scale/unmask/plan.py); a requeued
# tuning job continues from its own `latest` (`--resume auto`).
#
# Sizing: 257 tokens instead of 129 roughly double the activations of pre-training; with full
# checkpointing that is ~11 GB stored + ~4 GB for the recomputed block per rank (README).
#SBATCH --job-name=unmask_tune_g14
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Slurm runs a copy of this file, so its own path does not lead back to the repository.
FLIP_HOME=${FLIP_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$FLIP_HOME/slurm/common.sh" ]; then
  echo "flip_scale: $FLIP_HOME/slurm/common.sh not found: submit from the repository root or set FLIP_HOME" >&2
  exit 2
fi
FLIP_CONFIG_GIVEN=${FLIP_CONFIG:-}
FLIP_CONFIG=${FLIP_CONFIG:-configs/flip_g14.yaml}
FLIP_LAYOUT=${FLIP_LAYOUT-parallel.tp=2 parallel.dp_shard=-1 parallel.activation_checkpointing=full}
FLIP_FROM=${FLIP_FROM:-runs/flip_g14}
FLIP_UNMASK_RECIPE=${FLIP_UNMASK_RECIPE:-$FLIP_HOME/configs/unmask_tune.yaml}
# shellcheck source=common.sh
source "$FLIP_HOME/slurm/common.sh"

# The pre-training checkpoint: a step directory, or the one a run directory's `latest` names
# (resolved once here, so the log says exactly which weights the tuning starts from).
if [ -f "$FLIP_FROM/trainer_state.json" ]; then
  FLIP_FROM_CKPT=$FLIP_FROM
elif [ -f "$FLIP_FROM/latest" ]; then
  FLIP_FROM_CKPT=$FLIP_FROM/$(cat "$FLIP_FROM/latest")
else
  flip_die "FLIP_FROM=$FLIP_FROM is neither a checkpoint (step_XXXXXXXX/ with trainer_state.json) nor a run directory with a 'latest' file"
fi
[ -f "$FLIP_UNMASK_RECIPE" ] || flip_die "FLIP_UNMASK_RECIPE=$FLIP_UNMASK_RECIPE: no such file"
tool=$FLIP_HOME/tools/unmask_tune.py
[ -f "$tool" ] || flip_die "$tool not found: FLIP_HOME=$FLIP_HOME is not a flip_scale repository with tools/unmask_tune.py"
echo "    unmasked tuning from ${FLIP_FROM_CKPT}, overlay ${FLIP_UNMASK_RECIPE}"
if [ -n "$FLIP_CONFIG_GIVEN" ]; then
  echo "    FLIP_CONFIG=${FLIP_CONFIG_GIVEN} is ignored: the tuning starts from the checkpoint's own config"
fi

read -r -a FLIP_LAYOUT_LIST <<< "$FLIP_LAYOUT"
# FLIP_ARGS last: its key=value overrides win over the layout's.
flip_launch "$FLIP_PYTHON" -u "$tool" --from "$FLIP_FROM_CKPT" --run-dir "$RUN_DIR" --resume auto \
  --overlay "$FLIP_UNMASK_RECIPE" "train.device=$FLIP_DEVICE" "${FLIP_LAYOUT_LIST[@]}" "${FLIP_ARG_LIST[@]}"
