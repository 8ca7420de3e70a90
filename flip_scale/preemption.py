"""Preemption: a signal asks the trainer to stop at the next step boundary, save and exit `EXIT_CODE`.

The signal path under Slurm (slurm/common.sh): `#SBATCH --signal=B:USR1@<secs>` (or
`scancel --batch --signal=USR1 JOB`) reaches the batch shell, which forwards SIGUSR1 to `srun`,
which forwards it to every task (one trainer process per GPU). A trainer process that receives it
only sets a flag; after each optimizer step `requested()` agrees on the flags of all ranks with one
all-reduce (MAX over one integer), so every rank stops after the same step even when the signal
reached them between different steps, or reached only some of them. The trainer then writes a
checkpoint of that step (unless it has just written one) and `flip-train` exits with `EXIT_CODE`.
The batch script requeues the job on that exit code (`scontrol requeue`) and the requeued job
resumes from `latest` (`--resume auto`).

The requeue bookkeeping (`requeue-check`, below) stops a job that keeps getting stopped at the same
checkpoint step: after `--max-requeues` requeues without progress it refuses, with a message. The
batch script asks it after a preemption stop and, by default (FLIP_REQUEUE_ON_FAILURE=1), after a
failure too (any exit code but 0, 2 and 42; `--reason "failed with exit code N"`): a job that keeps
failing at one step stops after `--max-requeues` tries.
Slurm also requeues a job by itself (a node failure: the batch script never sees the end of that
run). `restart-check`, run by the batch script at the start of every restart (SLURM_RESTART_COUNT
> 0), counts such a restart under the same limit, unless the previous run was requeued by
`requeue-check` itself (it records the SLURM_RESTART_COUNT it requeued from): a job that brings
down its node at the same step every time stops after `--max-requeues` restarts without progress.

This module imports only the standard library at import time (the batch script runs its
command-line part on the batch host; torch is imported by `requested()` only, through
`runtime.any_rank`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from .runtime import any_rank, write_json_atomic

# Exit status of `flip-train` after a preemption request: the checkpoint of the step it stopped at
# is complete and `--resume auto` continues from it. Distinct from 0 (finished), 1 (an error),
# 2 (a config error) and 128 + N (killed by signal N).
EXIT_CODE = 42

# Signals that request a save-and-exit. SIGUSR1 is what the slurm/ templates send; SIGTERM is left
# alone (Slurm sends it when it cancels a job and follows with SIGKILL after KillWait seconds,
# usually too soon for a checkpoint of a large model).
DEFAULT_SIGNALS = (signal.SIGUSR1,)

STATE_FILE = "requeue_state.json"
STOP_EXIT_CODE = 3  # requeue-check: do not requeue

_request: dict = {"signal": None, "time": None, "pid": None}


def _handler(signum, frame) -> None:
    # Only a flag and one write(2): the step in progress finishes normally. Data-loader workers
    # (forked after `install`) inherit the handler and get the signal too (Slurm signals every
    # process of a step); they only set their own, unused, flag.
    first = _request["signal"] is None
    _request["signal"] = signum
    _request["time"] = time.time()
    if first and os.getpid() == _request["pid"]:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        os.write(2, f"flip_scale: {name} received: stopping after this step with a checkpoint "
                    f"(exit code {EXIT_CODE})\n".encode())


def install(signals=DEFAULT_SIGNALS) -> None:
    """Make `signals` request a save-and-exit at the next step boundary (main thread only)."""
    reset()
    _request["pid"] = os.getpid()
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # Python delivers signals to the main thread only; a run in a thread is not stoppable
    for sig in signals:
        signal.signal(sig, _handler)


def reset() -> None:
    _request["signal"] = None
    _request["time"] = None


def request(signum: int = signal.SIGUSR1) -> None:
    """Request a stop from code (as the signal handler does)."""
    if _request["pid"] is None:
        _request["pid"] = os.getpid()
    _handler(signum, None)


def requested_locally() -> bool:
    return _request["signal"] is not None


def requested(device=None) -> bool:
    """Whether any rank has been asked to stop. Collective: every rank of the default process group
    must call it at the same point (the trainer calls it once after every step). `device` is kept
    for callers that pass one; the flag travels on a CPU tensor over the host group
    (`runtime.set_host_group`), so the check syncs the hosts and never waits for the GPU."""
    return any_rank(requested_locally())


# ---------------------------------------------------------------------------- requeue bookkeeping
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def latest_step(run_dir: Path) -> Optional[int]:
    """The step of the checkpoint that `latest` names (None: no complete checkpoint yet)."""
    latest = Path(run_dir) / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    match = _STEP_DIR.match(name)
    if not match or not (Path(run_dir) / name / "trainer_state.json").is_file():
        return None
    return int(match.group(1))


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def requeue_decision(state: dict, job_id: str, step: Optional[int], max_requeues: int,
                     reason: str = "preempted", now: Optional[float] = None,
                     restart_count: Optional[int] = None) -> tuple[bool, dict, str]:
    """Decide whether job `job_id`, stopped with its newest checkpoint at `step`, is requeued again.

    `state` is the previous decision of this run directory. Requeues of one job at one checkpoint
    step are counted; a new step (progress) or a new job id (a fresh submission) starts the count
    again. `restart_count` (SLURM_RESTART_COUNT of the run that stops) is recorded with a requeue, so
    that `restart_decision` knows the next restart for this script's own. Returns (requeue?, the new
    state, a message for the log)."""
    step_value = -1 if step is None else int(step)
    same = str(state.get("job_id")) == str(job_id) and int(state.get("step", -2)) == step_value
    count = int(state.get("count", 0)) + 1 if same else 1
    where = "no checkpoint yet" if step is None else f"checkpoint step {step}"
    history = list(state.get("history", []))[-49:] if str(state.get("job_id")) == str(job_id) else []
    entry = {"time": time.time() if now is None else now, "step": step_value, "reason": reason}
    if count > max_requeues:
        new_state = dict(state, job_id=str(job_id), step=step_value, count=count - 1, stopped=True,
                         history=history + [dict(entry, requeued=False)])
        message = (f"not requeueing job {job_id} ({reason}): it was requeued {count - 1} times at {where} without "
                   f"progress (FLIP_MAX_REQUEUES={max_requeues}). Look at the log of the last attempts; "
                   f"after fixing the cause, submit again (the run resumes from the last complete checkpoint)")
        return False, new_state, message
    new_state = {"job_id": str(job_id), "step": step_value, "count": count, "stopped": False,
                 "history": history + [dict(entry, requeued=True)]}
    if restart_count is not None:
        new_state["requeued_at_restart"] = int(restart_count)
    message = f"requeueing job {job_id} ({reason}; {where}; requeue {count} of at most {max_requeues} at this step)"
    return True, new_state, message


def _write_state(run_dir: Path, state: dict) -> None:
    write_json_atomic(Path(run_dir) / STATE_FILE, state)


def requeue_check(run_dir: Path, job_id: str, max_requeues: int, reason: str = "preempted",
                  restart_count: Optional[int] = None) -> tuple[bool, str]:
    """Read, decide and record (in RUN_DIR/requeue_state.json)."""
    run_dir = Path(run_dir)
    if max_requeues < 0:
        raise ValueError(f"max requeues must be 0 or more, got {max_requeues}")
    step = latest_step(run_dir)
    requeue, state, message = requeue_decision(read_state(run_dir), job_id, step, max_requeues, reason,
                                               restart_count=restart_count)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_state(run_dir, state)
    return requeue, message


def restart_decision(state: dict, job_id: str, restart_count: int, step: Optional[int], max_requeues: int,
                     now: Optional[float] = None) -> tuple[bool, Optional[dict], str]:
    """Decide whether restart `restart_count` (SLURM_RESTART_COUNT > 0) of job `job_id`, whose newest
    checkpoint is at `step`, may run.

    A restart that follows this script's own requeue (`requeue_decision` recorded the restart count
    it requeued from, `restart_count - 1`, for this job) was counted then: it runs, nothing changes
    (None for the state). Any other restart is Slurm's own (a node failure, or `scontrol requeue`
    by hand) and is counted like a requeue: at one checkpoint step at most `max_requeues` times."""
    if restart_count <= 0:
        return True, None, "first run of the job (SLURM_RESTART_COUNT=0)"
    own = (str(state.get("job_id")) == str(job_id) and not state.get("stopped")
           and state.get("requeued_at_restart") == restart_count - 1)
    if own:
        return True, None, f"restart {restart_count} of job {job_id} follows its own requeue (counted then)"
    if str(state.get("job_id")) == str(job_id) and state.get("restart_checked") == restart_count and not state.get("stopped"):
        return True, None, f"restart {restart_count} of job {job_id} was counted already"
    reason = f"restarted by Slurm (restart {restart_count}: node failure or requeue by hand)"
    allowed, new_state, _ = requeue_decision(state, job_id, step, max_requeues, reason, now)
    where = "no checkpoint yet" if step is None else f"checkpoint step {step}"
    if not allowed:
        message = (f"not running restart {restart_count} of job {job_id}: it was restarted or requeued "
                   f"{new_state['count']} times at {where} without progress (FLIP_MAX_REQUEUES={max_requeues}); "
                   f"this restart was not requested by the batch script (a node failure, or a requeue by hand), "
                   f"so the job probably brings its node down at the same point every time. Look at the log of "
                   f"the last attempts and the node's state; after fixing the cause, submit again (the run "
                   f"resumes from the last complete checkpoint)")
        return False, new_state, message
    new_state["restart_checked"] = restart_count  # counted: a second check of this restart counts nothing
    message = (f"restart {restart_count} of job {job_id} was not requested by the batch script ({reason}); "
               f"{where}: restart {new_state['count']} of at most {max_requeues} at this step without progress")
    return True, new_state, message


def restart_check(run_dir: Path, job_id: str, restart_count: int, max_requeues: int) -> tuple[bool, str]:
    """Read, decide and record (in RUN_DIR/requeue_state.json) at the start of a restarted job."""
    run_dir = Path(run_dir)
    if max_requeues < 0:
        raise ValueError(f"max requeues must be 0 or more, got {max_requeues}")
    allowed, state, message = restart_decision(read_state(run_dir), job_id, restart_count, latest_step(run_dir),
                                               max_requeues)
    if state is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_state(run_dir, state)
    return allowed, message


def run_finished(run_dir: Path) -> Optional[bool]:
    """Whether the newest checkpoint is at train.max_steps of RUN_DIR/config.yaml (None: unknown)."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        max_steps = int(yaml.safe_load(config.read_text())["train"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    step = latest_step(run_dir)
    return step is not None and step >= max_steps


def slurm_seconds(text: str) -> Optional[int]:
    """Seconds of a Slurm time such as scontrol's TimeLimit: `[D-]HH:MM:SS`, `MM:SS`, `MM`, `D-HH`,
    `D-HH:MM`; None for UNLIMITED, NONE, INVALID or empty."""
    text = (text or "").strip()
    if not text or not text[0].isdigit():
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts = (parts + [0, 0])[:3]
        hours, minutes, seconds = parts
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def signal_plan(time_limit: str, lead: int) -> tuple[Optional[int], str]:
    """(seconds after the start at which the batch shell signals itself, message) when the job's
    time limit is at or under the signal lead (`--signal=B:USR1@lead`): Slurm would signal at once
    and the job would preempt itself requeue after requeue. The lead becomes half the limit.
    (None, "") when the limit is longer or unknown."""
    limit = slurm_seconds(time_limit)
    if limit is None or limit > lead:
        return None, ""
    new_lead = limit // 2
    at = limit - new_lead
    return at, (f"flip_scale: the time limit {time_limit} ({limit} s) is at or under the preemption signal's lead "
                f"of {lead} s (--signal=B:USR1@{lead}): Slurm signals at once, and the job would stop to checkpoint "
                f"requeue after requeue. This job ignores that signal and signals itself {at} s after its start "
                f"instead (a lead of {new_lead} s, half the limit); submit with a longer --time or a shorter "
                f"--signal lead (FLIP_SIGNAL_LEAD) to choose")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flip_scale.preemption",
        description="Requeue bookkeeping for the slurm/ templates. Exit 0: requeue; "
                    f"{STOP_EXIT_CODE}: do not (the limit of requeues without progress is reached).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("requeue-check", help="decide whether to requeue and record it in RUN_DIR/" + STATE_FILE)
    check.add_argument("--run-dir", required=True)
    check.add_argument("--job-id", required=True)
    check.add_argument("--max-requeues", type=int, default=3)
    check.add_argument("--reason", default="preempted")
    check.add_argument("--restart-count", type=int, default=None,
                       help="SLURM_RESTART_COUNT of the run that stops (default: from the environment), recorded so "
                            "that restart-check knows the next restart for this requeue")
    restart = sub.add_parser("restart-check", help="at the start of a restarted job (SLURM_RESTART_COUNT > 0): exit 0 "
                                                   "if it may run, " + str(STOP_EXIT_CODE) + " if Slurm's own restarts "
                                                   "without progress reached the limit; recorded in RUN_DIR/" + STATE_FILE)
    restart.add_argument("--run-dir", required=True)
    restart.add_argument("--job-id", required=True)
    restart.add_argument("--restart-count", type=int, default=None, help="default: SLURM_RESTART_COUNT")
    restart.add_argument("--max-requeues", type=int, default=3)
    finished = sub.add_parser("finished", help="exit 0 if RUN_DIR's newest checkpoint is at train.max_steps, 1 if "
                                                "not, 2 if unknown (no config.yaml)")
    finished.add_argument("--run-dir", required=True)
    sub.add_parser("exit-code", help=f"print the preemption exit code ({EXIT_CODE})")
    plan = sub.add_parser("signal-plan", help="print the seconds after the start at which the batch shell signals "
                                              "itself when the time limit is at or under the signal lead (the "
                                              "reason on stderr); print nothing otherwise")
    plan.add_argument("--time-limit", default="", help="scontrol's TimeLimit, e.g. 00:10:00 or 1-00:00:00")
    plan.add_argument("--lead", type=int, required=True, help="the seconds of #SBATCH --signal=B:USR1@SECS")
    args = parser.parse_args(argv)
    if args.command == "signal-plan":
        at, message = signal_plan(args.time_limit, args.lead)
        if at is not None:
            print(message, file=sys.stderr)
            print(at)
        return 0
    if args.command == "exit-code":
        print(EXIT_CODE)
        return 0
    if args.command == "finished":
        done = run_finished(Path(args.run_dir))
        return 2 if done is None else (0 if done else 1)
    if args.max_requeues < 0:
        parser.error(f"--max-requeues must be 0 or more, got {args.max_requeues}")
    restart_count = args.restart_count
    if restart_count is None:
        try:
            restart_count = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            parser.error(f"SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']!r} is not a whole number")
    if args.command == "restart-check":
        allowed, message = restart_check(Path(args.run_dir), args.job_id, restart_count, args.max_requeues)
        print(f"flip_scale: {message}", file=sys.stdout if allowed else sys.stderr)
        return 0 if allowed else STOP_EXIT_CODE
    requeue, message = requeue_check(Path(args.run_dir), args.job_id, args.max_requeues, args.reason, restart_count)
    print(f"flip_scale: {message}", file=sys.stdout if requeue else sys.stderr)
    return 0 if requeue else STOP_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
