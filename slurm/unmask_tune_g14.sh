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
#   FLIP_CONFIG      the pre-training recipe (default configs/flip_g14.yaml; the tool, when present,
#                    starts from the checkpoint's own config instead, unless it takes --config)
#   FLIP_UNMASK_RECIPE  the overlay (default configs/unmask_tune.yaml; given to the tool as --overlay
#                    only when set)
#   FLIP_ARGS        extra key=value overrides, applied last (default: none)
#   FLIP_LAYOUT      layout overrides (default "parallel.tp=2 parallel.dp_shard=-1
#                    parallel.activation_checkpointing=full"; FLIP_LAYOUT= keeps the recipe's)
#   RUN_DIR          run directory of the tuning (default runs/$SLURM_JOB_NAME = runs/unmask_tune_g14)
#   NPROC_PER_NODE, FLIP_DEVICE, FLIP_MAX_REQUEUES, FLIP_HOME: as in slurm/flip_g14.sh
#
# With tools/unmask_tune.py present it runs that tool (--from CKPT --run-dir DIR, plus --resume auto
# and --config RECIPE where the tool takes them, then key=value...); otherwise flip-train with a
# recipe `_base_: [FLIP_CONFIG, FLIP_UNMASK_RECIPE]` written to RUN_DIR and `--init-from CKPT`
# (weights only: fresh optimizer, step 0). Either way a requeued tuning job continues from its own
# `latest` (`--resume auto` wins over `--init-from`).
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
FLIP_CONFIG=${FLIP_CONFIG:-configs/flip_g14.yaml}
FLIP_LAYOUT=${FLIP_LAYOUT-parallel.tp=2 parallel.dp_shard=-1 parallel.activation_checkpointing=full}
FLIP_FROM=${FLIP_FROM:-runs/flip_g14}
FLIP_UNMASK_RECIPE_GIVEN=${FLIP_UNMASK_RECIPE:-}
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
echo "    unmasked tuning from ${FLIP_FROM_CKPT}"

read -r -a FLIP_LAYOUT_LIST <<< "$FLIP_LAYOUT"
tool=$FLIP_HOME/tools/unmask_tune.py
if [ -f "$tool" ]; then
  # The tool's options are read from its --help, so that this script follows its interface.
  tool_help=$("$FLIP_PYTHON" "$tool" --help 2>&1 || true)
  tool_args=(--from "$FLIP_FROM_CKPT" --run-dir "$RUN_DIR")
  case "$tool_help" in *--resume*) tool_args+=(--resume auto) ;; esac
  case "$tool_help" in *--config*) tool_args+=(--config "$FLIP_CONFIG") ;; esac
  if [ -n "$FLIP_UNMASK_RECIPE_GIVEN" ]; then
    case "$tool_help" in
      *--overlay*) tool_args+=(--overlay "$FLIP_UNMASK_RECIPE") ;;
      *) flip_die "tools/unmask_tune.py takes no --overlay: unset FLIP_UNMASK_RECIPE" ;;
    esac
  fi
  echo "    unmasked tuning with tools/unmask_tune.py ${tool_args[*]}"
  flip_launch "$FLIP_PYTHON" -u "$tool" "${tool_args[@]}" "train.device=$FLIP_DEVICE" "${FLIP_LAYOUT_LIST[@]}" \
    "${FLIP_ARG_LIST[@]}"
else
  recipe=$RUN_DIR/unmask_tune_recipe.yaml
  printf '# written by slurm/unmask_tune_g14.sh: the pre-training recipe with the unmasked-tuning overlay\n_base_: [%s, %s]\n' \
    "$(realpath "$FLIP_CONFIG")" "$(realpath "$FLIP_UNMASK_RECIPE")" > "$recipe"
  echo "    unmasked tuning with flip-train --init-from (tools/unmask_tune.py is absent), recipe $recipe"
  flip_launch "$FLIP_PYTHON" -u -m flip_scale.train --config "$recipe" --run-dir "$RUN_DIR" --resume auto \
    --init-from "$FLIP_FROM_CKPT" "train.device=$FLIP_DEVICE" "${FLIP_LAYOUT_LIST[@]}" "${FLIP_ARG_LIST[@]}"
fi
