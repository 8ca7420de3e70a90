# flip_scale: the part shared by the slurm/*.sh templates, sourced by them inside the batch job
# (not submitted itself). A template sets its defaults, sources this file, then calls
# `flip_launch COMMAND...` (one COMMAND per GPU, started by srun on every node).
#
# What a user changes (environment of `sbatch`, which passes it on to the job; all have defaults):
#   FLIP_CONFIG        recipe, e.g. configs/flip_g14.yaml (each template sets its own default)
#   FLIP_ARGS          extra key=value overrides, separated by spaces, e.g.
#                      FLIP_ARGS="data.train_shards=/data/laion/{00000..41407}.tar train.max_steps=1000"
#   RUN_DIR            run directory (default: runs/$SLURM_JOB_NAME under the submit directory, so a
#                      resubmission with the same --job-name continues the same run)
#   NPROC_PER_NODE     trainer processes per node (default: the GPUs of the node; with
#                      FLIP_DEVICE=cpu the tasks per node of the allocation)
#   FLIP_DEVICE        cuda (default) | cpu (tests; give sbatch --gpus-per-node=0 on a cluster without GPUs)
#   FLIP_PYTHON        interpreter with flip_scale installed (default: python3, else python, on PATH)
#   FLIP_MAX_REQUEUES  requeues of one job at one checkpoint step before giving up (default 3); Slurm's
#                      own restarts (after a node failure) count under the same limit
#   FLIP_REQUEUE_ON_FAILURE  1 (default): requeue after a failure too (any exit other than 0, 2 and 42:
#                      a crash, a node or NCCL failure), under the same FLIP_MAX_REQUEUES limit; 0: only
#                      after a preemption stop. Exit code 2 (a config or usage error) is never requeued
#   FLIP_SRUN_WAIT     seconds srun lets the other ranks run on after the first one exits, then kills
#                      them (default 120: a rank that crashed does not leave the others hanging)
#   FLIP_SIGNAL_LEAD   seconds of the preemption signal's lead (default: the template's
#                      `#SBATCH --signal=B:USR1@SECS`). A time limit at or under it would signal at once:
#                      the job says so at start, ignores Slurm's signal and signals itself at half the limit
#   MASTER_ADDR, MASTER_PORT   rendezvous; default: the first node of the job, 15000 + job id % 10000
#                      (derived by flip_scale.distributed from the Slurm variables of each task)
#   FLIP_HOME          repository root (read by the templates; default: the submit directory)
#
# Launcher: srun starts one task per GPU (no torchrun). Each task reads its rank, world size and
# local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (flip_scale/distributed.py). Why not
# srun + torchrun: the preemption signal must reach the trainer processes. Slurm signals every
# process of a step, torchrun included, and torchrun does not handle SIGUSR1 (its default action
# kills it, and its workers with it, before they can save); with SIGTERM it stops the workers
# itself and kills them 30 s later. With srun alone the signal goes straight to the trainers, and
# Slurm accounts each rank as a task (exit code per rank, `--label`ed output).
#
# Signal path: `#SBATCH --signal=B:USR1@SECS` (SECS before the time limit; also
# `scancel --batch --signal=USR1 JOBID` by hand) signals this batch shell only. The shell waits
# on srun in the background (a shell runs traps only between commands), forwards SIGUSR1 to srun,
# and srun forwards it to every task. The trainers agree on the stop step with one all-reduce,
# write a checkpoint and exit 42 (flip_scale/preemption.py). On 42 this shell runs
# `scontrol requeue $SLURM_JOB_ID` (needs --requeue); the requeued job starts again with the same
# job id and runs `--resume auto` from `latest`. Requeues of one job at one checkpoint step are
# counted in RUN_DIR/requeue_state.json; beyond FLIP_MAX_REQUEUES the job stops with a message.
# A failure (exit code other than 0, 2, 42) is requeued the same way (FLIP_REQUEUE_ON_FAILURE=1, the
# default) and counted under the same limit: a job that keeps failing at one checkpoint step stops
# after FLIP_MAX_REQUEUES tries. Exit code 2 (a config or usage error of flip-train or
# tools/unmask_tune.py) fails the same way every time and is never requeued.
# A `scancel` or a node failure leaves the last complete checkpoint: the next submission with the
# same RUN_DIR (or Slurm's own requeue after a node failure) resumes from it. Slurm's own requeues
# are counted too: a job that starts with SLURM_RESTART_COUNT > 0 that this script did not requeue
# itself (`requeue-check` records the restart count it requeued from) is a restart without the
# batch script's knowledge; `restart-check` counts it at the newest checkpoint step under the same
# FLIP_MAX_REQUEUES, and the job exits 3 with a message once that is exceeded (a job that brings
# its node down at the same step every time does not loop forever).

set -o pipefail

# A SIGUSR1 that comes before the handler below is installed (Slurm signals at once when the time
# limit is at or under the signal's lead, while the start-up still runs Python) would kill this
# shell (bash's default for USR1). Record it now; it is handled as soon as the handler exists.
FLIP_EARLY_SIGNAL=0
trap 'FLIP_EARLY_SIGNAL=1' USR1

flip_die() {
  echo "flip_scale: $*" >&2
  exit 2
}

if [ -z "${SLURM_JOB_ID:-}" ]; then
  flip_die "this script runs inside a Slurm batch job: submit it with sbatch (e.g. sbatch slurm/flip_g14.sh)"
fi

# ---- NCCL / PyTorch settings (uncomment or set in the environment for your cluster) ----------
# export NCCL_DEBUG=INFO                    # once, to see the transports NCCL picks (IB, NVLink, sockets)
# export NCCL_SOCKET_IFNAME=ib0             # interface for NCCL's bootstrap sockets if the default is wrong
# export GLOO_SOCKET_IFNAME=eth0            # gloo's groups (FLIP_DEVICE=cpu, the CPU side beside NCCL) bind to the host name's address unless told
# export NCCL_IB_HCA=mlx5                   # the InfiniBand adapters to use
# export NCCL_CROSS_NIC=0                   # keep each ring on one rail on rail-optimised fabrics
# export TORCH_NCCL_DUMP_ON_TIMEOUT=1       # flight-recorder dump of the collectives when one times out
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=3  # abort the communicator on an error or timeout (torch's default)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# FSDP gathers and frees one block's parameters at a time: expandable segments keep that from
# fragmenting the caching allocator.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# One intra-op thread pool per rank, sized to the CPUs Slurm gave the task.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# ---- defaults -------------------------------------------------------------------------------
FLIP_DEVICE=${FLIP_DEVICE:-cuda}
FLIP_ARGS=${FLIP_ARGS:-}
FLIP_MAX_REQUEUES=${FLIP_MAX_REQUEUES:-3}
FLIP_REQUEUE_ON_FAILURE=${FLIP_REQUEUE_ON_FAILURE:-1}
FLIP_SRUN_WAIT=${FLIP_SRUN_WAIT:-120}
FLIP_PYTHON=${FLIP_PYTHON:-$(command -v python3 || command -v python)}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}}
FLIP_PREEMPT_EXIT=42  # flip_scale.preemption.EXIT_CODE

case "$FLIP_DEVICE" in
  cuda | cpu) ;;
  *) flip_die "FLIP_DEVICE=$FLIP_DEVICE is not valid; use cuda or cpu" ;;
esac
case "$FLIP_MAX_REQUEUES" in
  '' | *[!0-9]*) flip_die "FLIP_MAX_REQUEUES=$FLIP_MAX_REQUEUES is not valid; use a whole number (0: never requeue)" ;;
esac
case "$FLIP_REQUEUE_ON_FAILURE" in
  0 | 1) ;;
  *) flip_die "FLIP_REQUEUE_ON_FAILURE=$FLIP_REQUEUE_ON_FAILURE is not valid; use 1 (requeue after a failure, the default) or 0 (only after a preemption)" ;;
esac
[ -n "$FLIP_PYTHON" ] && [ -x "$FLIP_PYTHON" ] || flip_die "no python found (FLIP_PYTHON='$FLIP_PYTHON'); set FLIP_PYTHON to the interpreter that has flip_scale installed"
[ -n "${FLIP_CONFIG:-}" ] || flip_die "FLIP_CONFIG is empty; set it to a recipe such as configs/flip_g14.yaml"
[ -f "$FLIP_CONFIG" ] || [ -f "$FLIP_HOME/$FLIP_CONFIG" ] || flip_die "FLIP_CONFIG=$FLIP_CONFIG: no such file (relative paths are read from $PWD or $FLIP_HOME)"
[ -f "$FLIP_CONFIG" ] || FLIP_CONFIG=$FLIP_HOME/$FLIP_CONFIG

# First number of a Slurm per-node count such as "8" or "8(x4),4".
flip_first_count() { local value=${1%%[(,]*}; echo "${value:-}"; }

if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "$FLIP_DEVICE" = cuda ]; then
    NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-}
    if [ -z "$NPROC_PER_NODE" ] || [ "$NPROC_PER_NODE" = 0 ]; then
      NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ -z "$NPROC_PER_NODE" ] || [ "$NPROC_PER_NODE" = 0 ]; then
      flip_die "FLIP_DEVICE=cuda but the job has no GPUs (request them with --gpus-per-node=N, or set FLIP_DEVICE=cpu)"
    fi
  else
    NPROC_PER_NODE=$(flip_first_count "${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}")
  fi
fi
case "$NPROC_PER_NODE" in
  '' | 0 | *[!0-9]*) flip_die "NPROC_PER_NODE=$NPROC_PER_NODE is not valid; use a whole number of processes per node (1 or more)" ;;
esac
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NTASKS=$((NNODES * NPROC_PER_NODE))

# Overrides: split on whitespace without globbing (shard patterns contain {..} and may contain *).
read -r -a FLIP_ARG_LIST <<< "$FLIP_ARGS"

mkdir -p "$RUN_DIR" || flip_die "cannot create RUN_DIR=$RUN_DIR"

echo "=== flip_scale job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) start $(date -u +%FT%TZ), restart ${SLURM_RESTART_COUNT:-0}"
echo "    nodes ${SLURM_JOB_NODELIST} (${NNODES}) x ${NPROC_PER_NODE} processes = ${NTASKS} ranks, device ${FLIP_DEVICE}"
echo "    recipe ${FLIP_CONFIG}, run dir ${RUN_DIR}, overrides: ${FLIP_ARGS:-none}"
if [ -f "$RUN_DIR/latest" ]; then
  echo "    resuming from $RUN_DIR/$(cat "$RUN_DIR/latest")"
fi

# ---- a time limit at or under the signal's lead: Slurm would signal at once, and the job would
# checkpoint and requeue itself forever. Signal at half the limit instead (where the limit is known).
FLIP_SIGNAL_LEAD=${FLIP_SIGNAL_LEAD:-$(grep -o -m1 '^#SBATCH --signal=B:USR1@[0-9]*' "$0" 2>/dev/null | sed 's/.*@//')}
FLIP_SIGNAL_AT=
FLIP_TIMER_PID=
if [ -n "$FLIP_SIGNAL_LEAD" ]; then
  flip_time_limit=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'TimeLimit=[^ ]*' | head -n 1 | cut -d= -f2)
  FLIP_SIGNAL_AT=$("$FLIP_PYTHON" -m flip_scale.preemption signal-plan --time-limit "${flip_time_limit:-}" \
    --lead "$FLIP_SIGNAL_LEAD") || FLIP_SIGNAL_AT=
  if [ -n "$FLIP_SIGNAL_AT" ]; then
    (sleep "$FLIP_SIGNAL_AT" && kill -USR1 $$) &
    FLIP_TIMER_PID=$!
    trap 'kill "$FLIP_TIMER_PID" 2>/dev/null' EXIT
  fi
fi

FLIP_SRUN_PID=
FLIP_SIGNAL_SEEN=0
FLIP_PREEMPT_REQUESTED=0
FLIP_FORWARDED=0
flip_forward_signal() {
  FLIP_SIGNAL_SEEN=1
  if [ -n "$FLIP_SIGNAL_AT" ] && [ "$SECONDS" -lt "$FLIP_SIGNAL_AT" ]; then
    echo "flip_scale: $(date -u +%FT%TZ) SIGUSR1 at ${SECONDS} s ignored: the time limit is at or under the signal lead; this job signals itself at ${FLIP_SIGNAL_AT} s"
    return
  fi
  FLIP_PREEMPT_REQUESTED=1
  echo "flip_scale: $(date -u +%FT%TZ) SIGUSR1 received by the batch shell: forwarding it to the trainers (checkpoint, then exit ${FLIP_PREEMPT_EXIT})"
  if [ -n "$FLIP_SRUN_PID" ]; then
    FLIP_FORWARDED=1
    kill -USR1 "$FLIP_SRUN_PID" 2>/dev/null || true
  fi
}
trap flip_forward_signal USR1
if [ "$FLIP_EARLY_SIGNAL" = 1 ]; then
  flip_forward_signal
fi

# flip_requeue REASON EXIT_CODE: requeue this job unless the limit is reached; never returns.
flip_requeue() {
  local reason=$1 code=$2
  if "$FLIP_PYTHON" -m flip_scale.preemption requeue-check --run-dir "$RUN_DIR" --job-id "$SLURM_JOB_ID" \
      --max-requeues "$FLIP_MAX_REQUEUES" --reason "$reason" --restart-count "$FLIP_RESTART_COUNT"; then
    # Slurm ends this run of the job as part of the requeue: nothing after this line may matter.
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "flip_scale: scontrol requeue ${SLURM_JOB_ID} failed (was the job submitted with --requeue?); resubmit to resume" >&2
  fi
  exit "$code"
}

# A restart (SLURM_RESTART_COUNT > 0) that this script did not ask for is Slurm's own requeue (a node
# failure, or `scontrol requeue` by hand): counted with the requeues, at most FLIP_MAX_REQUEUES times
# at one checkpoint step (flip_scale/preemption.py restart-check).
FLIP_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
case "$FLIP_RESTART_COUNT" in
  '' | *[!0-9]*) FLIP_RESTART_COUNT=0 ;;
esac
if [ "$FLIP_RESTART_COUNT" -gt 0 ]; then
  "$FLIP_PYTHON" -m flip_scale.preemption restart-check --run-dir "$RUN_DIR" --job-id "$SLURM_JOB_ID" \
    --restart-count "$FLIP_RESTART_COUNT" --max-requeues "$FLIP_MAX_REQUEUES"
  flip_restart_rc=$?
  if [ "$flip_restart_rc" = 3 ]; then
    echo "flip_scale: job ${SLURM_JOB_ID} stops here (exit code 3) instead of running restart ${FLIP_RESTART_COUNT}" >&2
    exit 3
  elif [ "$flip_restart_rc" != 0 ]; then
    echo "flip_scale: warning: the restart check failed (exit code ${flip_restart_rc}); running restart ${FLIP_RESTART_COUNT} uncounted" >&2
  fi
fi

# flip_step_refused SRUN_STDERR_FILE: whether srun refused the step for a reason that is the same
# on every try (the allocation cannot hold what the step asks for, an invalid option). A transient
# refusal ("Job/step already completing", "Socket timed out", "Unable to contact slurm controller",
# "Required node not available") is not one: it is requeued as a failure. tee may still be
# writing: look for a moment.
FLIP_STEP_REFUSED_RE='^srun: (error|fatal): .*(More processors requested than permitted|Requested node configuration is not available|Memory required by task is not available|Invalid generic resource|[Ii]nvalid .*(--cpus-per-task|cpus-per-task|--gres|gres))'
flip_step_refused() {
  local i
  for i in 1 2 3 4 5; do
    grep -qE "$FLIP_STEP_REFUSED_RE" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# flip_launch COMMAND...: run COMMAND as NPROC_PER_NODE tasks on every node and act on its exit.
flip_launch() {
  local rc
  if [ "$FLIP_PREEMPT_REQUESTED" = 1 ]; then
    flip_requeue "preempted before the launch" "$FLIP_PREEMPT_EXIT"
  fi
  # --kill-on-bad-exit=0: the first rank to exit 42 must not get the others killed (they would
  # report 143 instead of 42); --wait kills the survivors of a crashed rank after FLIP_SRUN_WAIT s.
  # srun's stderr is also kept, to tell "srun could not create the step" from a trainer's failure.
  local srun_log
  srun_log=$(mktemp "${TMPDIR:-/tmp}/flip_srun.XXXXXX")
  srun --nodes="$NNODES" --ntasks="$NTASKS" --ntasks-per-node="$NPROC_PER_NODE" \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 --wait="$FLIP_SRUN_WAIT" --label \
    "$@" 2> >(tee "$srun_log" >&2) &
  FLIP_SRUN_PID=$!
  # A signal that came between the check above and this line found no srun to forward to.
  if [ "$FLIP_PREEMPT_REQUESTED" = 1 ] && [ "$FLIP_FORWARDED" = 0 ]; then
    FLIP_FORWARDED=1
    kill -USR1 "$FLIP_SRUN_PID" 2>/dev/null || true
  fi
  # `wait` returns early (status > 128) when a trapped signal arrives; wait again until srun exits.
  while :; do
    FLIP_SIGNAL_SEEN=0
    wait "$FLIP_SRUN_PID"
    rc=$?
    [ "$FLIP_SIGNAL_SEEN" = 1 ] && continue
    break
  done
  FLIP_SRUN_PID=
  echo "=== flip_scale job ${SLURM_JOB_ID}: trainer exit code ${rc} at $(date -u +%FT%TZ)"
  if [ "$rc" != 0 ] && [ "$rc" != "$FLIP_PREEMPT_EXIT" ] && flip_step_refused "$srun_log"; then
    # The allocation cannot run the step (more tasks or CPUs than it has, a bad option): the same
    # on every try, so a usage error, never requeued.
    echo "flip_scale: srun could not create the job step; this is a usage error of the allocation (exit code 2, not requeued: a retry fails the same way). srun said:" >&2
    grep '^srun: ' "$srun_log" | sed 's/^/    /' >&2
    echo "    the step asks for ${NTASKS} tasks (${NNODES} nodes x NPROC_PER_NODE=${NPROC_PER_NODE}) of ${SLURM_CPUS_PER_TASK:-1} CPUs; give sbatch matching --nodes / --ntasks-per-node / --cpus-per-task (or set NPROC_PER_NODE) and resubmit" >&2
    rm -f "$srun_log"
    exit 2
  fi
  rm -f "$srun_log"
  case "$rc" in
    0)
      # A command that stops early on SIGUSR1 but exits 0 (not 42) is still a preemption: requeue
      # when the run directory's newest checkpoint is short of train.max_steps.
      if [ "$FLIP_PREEMPT_REQUESTED" = 1 ]; then
        "$FLIP_PYTHON" -m flip_scale.preemption finished --run-dir "$RUN_DIR"
        if [ $? = 1 ]; then
          flip_requeue "preempted (exit code 0 before train.max_steps)" "$FLIP_PREEMPT_EXIT"
        fi
      fi
      exit 0
      ;;
    "$FLIP_PREEMPT_EXIT") flip_requeue preempted "$rc" ;;
    138)
      # 128 + SIGUSR1: a trainer got the signal before installing its handler (during start-up),
      # so nothing was trained since the last checkpoint: a preemption like any other.
      if [ "$FLIP_PREEMPT_REQUESTED" = 1 ]; then
        flip_requeue "preempted during start-up" "$rc"
      fi
      echo "flip_scale: the trainer was killed by SIGUSR1 (exit code $rc)" >&2
      exit "$rc"
      ;;
    2)
      # flip-train / tools/unmask_tune.py: a config or usage error. It fails the same way every
      # time, so a requeue would only repeat it.
      echo "flip_scale: the trainer exited with code 2 (a config or usage error: see the message above); not requeueing, since a retry would fail the same way. Fix the recipe, FLIP_ARGS or the options, then resubmit with the same RUN_DIR" >&2
      exit "$rc"
      ;;
    *)
      if [ "$FLIP_REQUEUE_ON_FAILURE" = 1 ]; then
        echo "flip_scale: the trainer failed (exit code $rc); requeueing to resume from the last complete checkpoint (FLIP_REQUEUE_ON_FAILURE=1; at most FLIP_MAX_REQUEUES=${FLIP_MAX_REQUEUES} times at one checkpoint step)" >&2
        flip_requeue "failed with exit code $rc" "$rc"
      fi
      echo "flip_scale: the trainer failed (exit code $rc); resubmit with the same RUN_DIR to resume from the last complete checkpoint" >&2
      exit "$rc"
      ;;
  esac
}

# flip_train [ARGS...]: flip-train with the recipe, the run directory, automatic resume, the device
# and FLIP_ARGS (ARGS first, so FLIP_ARGS wins over a template's own overrides).
# The template's layout ($@), for the engine FLIP_ARGS chooses: under parallel.engine=deepspeed
# (data parallel only) the native engine's tensor / pipeline keys of the template are dropped, and
# said so; everything else (activation checkpointing, dp_shard=-1) is kept.
flip_layout_for_engine() {
  local engine=fsdp arg kept=() dropped=()
  for arg in "${FLIP_ARG_LIST[@]}"; do
    case "$arg" in parallel.engine=*) engine=${arg#parallel.engine=} ;; esac
  done
  for arg in "$@"; do
    if [ "$engine" = deepspeed ]; then
      case "$arg" in
        parallel.tp=* | parallel.pp=* | parallel.microbatches=* | parallel.pp_schedule=* | parallel.dp_replicate=* | parallel.cpu_offload=*)
          dropped+=("$arg"); continue ;;
      esac
    fi
    kept+=("$arg")
  done
  if [ "${#dropped[@]}" -gt 0 ]; then
    echo "    engine deepspeed is data parallel only: the template's ${dropped[*]} dropped" >&2
  fi
  FLIP_LAYOUT_FOR_ENGINE=("${kept[@]}")
}

flip_train() {
  flip_layout_for_engine "$@"
  flip_launch "$FLIP_PYTHON" -u -m flip_scale.train --config "$FLIP_CONFIG" --run-dir "$RUN_DIR" \
    --resume auto "train.device=$FLIP_DEVICE" "${FLIP_LAYOUT_FOR_ENGINE[@]}" "${FLIP_ARG_LIST[@]}"
}
