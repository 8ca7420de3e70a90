"""The slurm/ templates and preemption, for real.

- Fast: the requeue bookkeeping (flip_scale.preemption) and the shell logic of slurm/common.sh with
  stand-in `srun` / `scontrol` commands (what srun is asked to run, what each exit code leads to).
- Slow, no Slurm: two trainer processes started the way srun starts them (Slurm variables only, no
  torchrun); SIGUSR1 reaches one of them; both stop after the same step, checkpoint, exit 42, and a
  rerun resumes from that checkpoint to the same final step.
- Slow, real Slurm: Debian's slurm-wlm and munge (installed with apt-get when absent, as root),
  a one-node cluster in a temporary directory (munged, slurmctld, slurmd started here and stopped by
  their pids), then `sbatch slurm/flip_g14.sh` turned into the tiny CPU run on 2 tasks (the
  template's own layout: tp 2, dp_shard -1, full activation checkpointing), a
  preemption (`scancel --batch --signal=USR1`) that requeues the job and resumes it, and
  `slurm/unmask_tune_g14.sh` chained with `--dependency=afterok`. Both jobs are compared step by
  step with a reference run of the same command without Slurm (2 srun-style ranks, never stopped):
  the same final step and exactly the same losses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flip_scale import preemption
from flip_scale.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ["flip_g14", "flip_h14", "flip_l16", "flip_b16", "unmask_tune_g14"]


def _tiny_overrides(data_dir: Path, steps: int, batch: int = 32) -> list[str]:
    return [
        f"data.synthetic_dir={data_dir}",
        f"data.train_shards={data_dir}/train-{{000000..000007}}.tar",
        f"data.tokenizer={data_dir}/tokenizer.model",
        f"train.max_steps={steps}",
        f"train.global_batch_size={batch}",
        "train.log_every_steps=1",
        "checkpoint.every_steps=1000",
        "checkpoint.keep_last=0",
        "eval.at_end=false",
        "logging.tensorboard=false",
    ]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.exists() else []


# ============================================================================ requeue bookkeeping
def _fake_checkpoint(run_dir: Path, step: int) -> None:
    name = f"step_{step:08d}"
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    (run_dir / name / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run_dir / "latest").write_text(name + "\n")


def test_requeue_count_grows_at_one_step_and_resets_on_progress_or_a_new_job(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 40)
    outcomes = [preemption.requeue_check(run, "77", max_requeues=2)[0] for _ in range(3)]
    assert outcomes == [True, True, False]
    state = json.loads((run / preemption.STATE_FILE).read_text())
    assert state["job_id"] == "77" and state["step"] == 40 and state["count"] == 2 and state["stopped"]
    # Progress (a newer checkpoint) starts the count again.
    _fake_checkpoint(run, 41)
    assert preemption.requeue_check(run, "77", max_requeues=2)[0]
    assert json.loads((run / preemption.STATE_FILE).read_text())["count"] == 1
    # So does a new submission (another job id) at the same step.
    preemption.requeue_check(run, "77", max_requeues=2)
    requeue, message = preemption.requeue_check(run, "78", max_requeues=2)
    assert requeue and "requeue 1 of at most 2" in message


def test_requeue_check_command_exit_codes_and_message(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 5)
    cmd = [sys.executable, "-m", "flip_scale.preemption", "requeue-check", "--run-dir", str(run), "--job-id", "9",
           "--max-requeues", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0 and "requeueing job 9" in first.stdout
    assert second.returncode == preemption.STOP_EXIT_CODE
    assert "requeued 1 times at checkpoint step 5 without progress (FLIP_MAX_REQUEUES=1)" in second.stderr
    # No checkpoint at all is a step like any other ("no checkpoint yet").
    empty = subprocess.run([*cmd[:5], str(tmp_path / "empty"), *cmd[6:]], capture_output=True, text=True)
    assert empty.returncode == 0 and "no checkpoint yet" in empty.stdout
    bad = subprocess.run([*cmd[:-1], "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-requeues must be 0 or more" in bad.stderr


def test_signal_handler_only_sets_a_flag():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        preemption.install()
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert preemption.requested_locally() and preemption.requested()  # no process group: local
        preemption.reset()
        assert not preemption.requested()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        preemption.reset()


# ============================================================================ common.sh, stand-ins
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun_args"
[ -n "$FAKE_SRUN_STDERR" ] && echo "$FAKE_SRUN_STDERR" >&2
trap 'echo USR1 >> "$FAKE_LOG/srun_signals"' USR1
if [ -n "$FAKE_SIGNAL_BATCH_SHELL" ]; then
  kill -USR1 "$PPID"  # as --signal=B:USR1 does; the batch shell should forward it here
  for i in $(seq 50); do [ -f "$FAKE_LOG/srun_signals" ] && break; sleep 0.1; done
fi
exit "${FAKE_RC:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ -n "$FAKE_SIGNAL_EARLY" ] && [ "$1" = show ]; then
  # SIGUSR1 to the batch shell (the outermost bash running the template) while its start-up runs.
  pid=$$ shell=
  while [ "$pid" -gt 1 ]; do
    pid=$(awk '/^PPid:/ {print $2}' /proc/$pid/status)
    tr '\\0' ' ' < /proc/$pid/cmdline | grep -q 'slurm/.*[.]sh' && shell=$pid
  done
  kill -USR1 "$shell"
  sleep 0.2
fi
if [ "$1" = show ]; then  # the job's record: only its time limit matters to the templates
  [ -n "$FAKE_TIME_LIMIT" ] && echo "JobId=4242 JobName=fake TimeLimit=$FAKE_TIME_LIMIT TimeMin=N/A"
  exit 0
fi
echo "$*" >> "$FAKE_LOG/scontrol_calls"
"""


def _run_template(tmp_path: Path, template: str, rc: int, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a template with bash as if Slurm had started it, `srun` exiting with `rc`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # nvidia-smi lists no GPU here, whatever the machine has.
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("nvidia-smi", "#!/bin/bash\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FLIP_", "RUN_DIR", "NPROC"))}
    env.update({
        "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_LOG": str(tmp_path), "FAKE_RC": str(rc),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "fake", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "node01", "SLURM_SUBMIT_DIR": str(REPO),
        "FLIP_DEVICE": "cpu", "FLIP_CONFIG": "configs/tiny.yaml", "FLIP_PYTHON": sys.executable,
        "FLIP_ARGS": "train.max_steps=7 data.train_shards=/d/{000..007}.tar", "RUN_DIR": str(tmp_path / "run"),
    })
    env.update(extra_env or {})
    return subprocess.run(["bash", str(REPO / "slurm" / f"{template}.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_templates_are_valid_bash_with_the_documented_interface():
    for name in TEMPLATES:
        path = REPO / "slurm" / f"{name}.sh"
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=B:USR1@\d+", text)
        assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --output=%x-%j.out" in text
        assert 'source "$FLIP_HOME/slurm/common.sh"' in text
    common = (REPO / "slurm" / "common.sh").read_text()
    for variable in ("FLIP_CONFIG", "FLIP_ARGS", "RUN_DIR", "NPROC_PER_NODE", "FLIP_DEVICE", "FLIP_MAX_REQUEUES"):
        assert f"#   {variable}" in common


def test_template_builds_the_srun_command(tmp_path):
    proc = _run_template(tmp_path, "flip_g14", rc=0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--ntasks-per-node=2" in args and "--ntasks=2" in args and "--kill-on-bad-exit=0" in args
    cmd = args[args.index(sys.executable):]
    assert cmd[:4] == [sys.executable, "-u", "-m", "flip_scale.train"]
    assert cmd[cmd.index("--config") + 1] == str(REPO / "configs" / "tiny.yaml")
    assert cmd[cmd.index("--run-dir") + 1] == str(tmp_path / "run") and cmd[cmd.index("--resume") + 1] == "auto"
    # Device, then the template's layout, then FLIP_ARGS (last wins), braces kept as they are.
    tail = cmd[cmd.index("auto") + 1:]
    assert tail == ["train.device=cpu", "parallel.tp=2", "parallel.dp_shard=-1", "parallel.activation_checkpointing=full",
                    "train.max_steps=7", "data.train_shards=/d/{000..007}.tar"]
    assert not (tmp_path / "scontrol_calls").exists()


def test_template_under_the_deepspeed_engine_drops_its_tensor_parallel_layout(tmp_path):
    """FLIP_ARGS="parallel.engine=deepspeed parallel.zero_stage=3": the template's tp=2 is the native
    engine's and is dropped (said so); its checkpointing and dp_shard=-1 stay."""
    proc = _run_template(tmp_path, "flip_g14", 0, {
        "FLIP_ARGS": "parallel.engine=deepspeed parallel.zero_stage=3 train.max_steps=7"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    tail = args[args.index("auto") + 1:]
    assert tail == ["train.device=cpu", "parallel.dp_shard=-1", "parallel.activation_checkpointing=full",
                    "parallel.engine=deepspeed", "parallel.zero_stage=3", "train.max_steps=7"]
    assert "engine deepspeed is data parallel only: the template's parallel.tp=2 dropped" in proc.stderr


def test_template_requeues_on_exit_42_and_stops_after_the_limit(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 12)
    for attempt in (1, 2):
        proc = _run_template(tmp_path, "flip_h14", rc=preemption.EXIT_CODE, extra_env={"FLIP_MAX_REQUEUES": "2"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"] * attempt
        assert f"requeue {attempt} of at most 2" in proc.stdout
    proc = _run_template(tmp_path, "flip_h14", rc=preemption.EXIT_CODE, extra_env={"FLIP_MAX_REQUEUES": "2"})
    assert proc.returncode == preemption.EXIT_CODE
    assert "requeued 2 times at checkpoint step 12 without progress (FLIP_MAX_REQUEUES=2)" in proc.stderr
    assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"] * 2


def test_slurm_own_restarts_without_progress_are_counted_and_stop_at_the_limit(tmp_path):
    """A node failure: Slurm requeues the job itself (SLURM_RESTART_COUNT grows) and the batch script
    of the failed run never gets to count it; the restarted job counts it at its start."""
    run = tmp_path / "run"
    _fake_checkpoint(run, 12)
    limit = {"FLIP_MAX_REQUEUES": "2"}

    def restart(count: int) -> subprocess.CompletedProcess:
        (tmp_path / "srun_args").unlink(missing_ok=True)
        return _run_template(tmp_path, "flip_g14", rc=0, extra_env={**limit, "SLURM_RESTART_COUNT": str(count)})

    for count in (1, 2):
        proc = restart(count)
        assert proc.returncode == 0 and (tmp_path / "srun_args").exists(), proc.stdout + proc.stderr
        assert f"restart {count} of job 4242 was not requested by the batch script" in proc.stdout
        assert f"restart {count} of at most 2 at this step" in proc.stdout
    proc = restart(3)
    assert proc.returncode == preemption.STOP_EXIT_CODE and not (tmp_path / "srun_args").exists()
    assert ("not running restart 3 of job 4242: it was restarted or requeued 2 times at checkpoint step 12 "
            "without progress (FLIP_MAX_REQUEUES=2)") in proc.stderr
    assert "node failure" in proc.stderr and not (tmp_path / "scontrol_calls").exists()
    # Progress (a newer checkpoint) starts the count again, as for the script's own requeues.
    _fake_checkpoint(run, 13)
    proc = restart(4)
    assert proc.returncode == 0 and "restart 1 of at most 2 at this step" in proc.stdout


def test_restart_after_the_scripts_own_requeue_is_not_counted_twice(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 12)
    limit = {"FLIP_MAX_REQUEUES": "2"}
    # Preempted at restart 0 -> requeued by the script (count 1), restart 1 runs without a new count.
    proc = _run_template(tmp_path, "flip_g14", rc=preemption.EXIT_CODE, extra_env=limit)
    assert proc.returncode == 0 and "requeue 1 of at most 2" in proc.stdout
    assert json.loads((run / preemption.STATE_FILE).read_text())["requeued_at_restart"] == 0
    proc = _run_template(tmp_path, "flip_g14", rc=preemption.EXIT_CODE, extra_env={**limit, "SLURM_RESTART_COUNT": "1"})
    assert "follows its own requeue" in proc.stdout and "not requested by the batch script" not in proc.stdout
    assert proc.returncode == 0 and "requeue 2 of at most 2" in proc.stdout  # preempted again: requeue 2
    # Restart 2 follows that requeue too; it then fails, which would be its third requeue at step 12
    # (refused), and Slurm's restart 3 (its node failed) is one too many as well.
    proc = _run_template(tmp_path, "flip_g14", rc=1, extra_env={**limit, "SLURM_RESTART_COUNT": "2"})
    assert "follows its own requeue" in proc.stdout and proc.returncode == 1
    assert "not requeueing job 4242 (failed with exit code 1): it was requeued 2 times" in proc.stderr
    proc = _run_template(tmp_path, "flip_g14", rc=0, extra_env={**limit, "SLURM_RESTART_COUNT": "3"})
    assert proc.returncode == preemption.STOP_EXIT_CODE and "not running restart 3" in proc.stderr
    assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"] * 2
    # The first run of a new submission (another job id, restart 0) is not checked at all.
    proc = _run_template(tmp_path, "flip_g14", rc=0, extra_env={**limit, "SLURM_JOB_ID": "4243"})
    assert proc.returncode == 0 and not re.search(r"restart \d+ of job", proc.stdout + proc.stderr)


def test_restart_decision_rules():
    own = {"job_id": "5", "step": 7, "count": 1, "stopped": False, "requeued_at_restart": 2}
    assert preemption.restart_decision(own, "5", 3, 7, 1)[:2] == (True, None)  # follows the own requeue
    allowed, state, message = preemption.restart_decision(own, "5", 4, 7, 1)  # a restart nobody asked for
    assert not allowed and state["stopped"] and "not running restart 4" in message
    allowed, state, _ = preemption.restart_decision(own, "5", 4, 8, 1)  # ... after progress: allowed
    assert allowed and state["count"] == 1 and state["step"] == 8
    assert preemption.restart_decision(state, "5", 4, 8, 1)[:2] == (True, None)  # checked twice, counted once
    assert preemption.restart_decision({}, "6", 1, None, 0)[0] is False  # FLIP_MAX_REQUEUES=0: never restart
    assert preemption.restart_decision({}, "6", 0, None, 0)[0] is True  # not a restart


def test_signal_is_forwarded_and_an_early_stop_is_requeued_whatever_the_exit_code(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 12)
    (run / "config.yaml").write_text("train:\n  max_steps: 20\n")
    signalled = {"FAKE_SIGNAL_BATCH_SHELL": "1"}
    # A command that stops early and exits 0 instead of 42: still a preemption.
    proc = _run_template(tmp_path, "flip_g14", rc=0, extra_env=signalled)
    assert (tmp_path / "srun_signals").read_text() == "USR1\n"  # the batch shell forwarded it to srun
    assert "SIGUSR1 received by the batch shell" in proc.stdout
    assert proc.returncode == 0 and "exit code 0 before train.max_steps" in proc.stdout
    assert (tmp_path / "scontrol_calls").read_text() == "requeue 4242\n"
    # 128 + SIGUSR1: killed by the signal before the handler was installed (start-up).
    proc = _run_template(tmp_path, "flip_g14", rc=138, extra_env=signalled)
    assert proc.returncode == 0 and "preempted during start-up" in proc.stdout
    # A run that reached max_steps is done, signal or not; 138 without a signal is a failure.
    _fake_checkpoint(run, 20)
    proc = _run_template(tmp_path, "flip_g14", rc=0, extra_env=signalled)
    assert proc.returncode == 0 and "requeueing" not in proc.stdout
    proc = _run_template(tmp_path, "flip_g14", rc=138)
    assert proc.returncode == 138 and "killed by SIGUSR1" in proc.stderr
    assert (tmp_path / "scontrol_calls").read_text() == "requeue 4242\n" * 2


def test_template_failure_is_requeued_by_default_until_the_limit_but_never_exit_2(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 12)
    limit = {"FLIP_MAX_REQUEUES": "2"}
    # A failure (a crashed rank, an NCCL timeout, a bad node) is requeued by default ...
    for attempt in (1, 2):
        proc = _run_template(tmp_path, "flip_b16", rc=1, extra_env=limit)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "the trainer failed (exit code 1); requeueing" in proc.stderr
        assert f"requeueing job 4242 (failed with exit code 1; checkpoint step 12; requeue {attempt} of at most 2" in proc.stdout
        assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"] * attempt
    # ... until it has failed FLIP_MAX_REQUEUES times at one checkpoint step: then it stops, saying why.
    proc = _run_template(tmp_path, "flip_b16", rc=1, extra_env=limit)
    assert proc.returncode == 1
    assert ("not requeueing job 4242 (failed with exit code 1): it was requeued 2 times at checkpoint step 12 "
            "without progress (FLIP_MAX_REQUEUES=2)") in proc.stderr
    assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"] * 2
    # Progress (a newer checkpoint) starts the count again.
    _fake_checkpoint(run, 13)
    proc = _run_template(tmp_path, "flip_b16", rc=134, extra_env=limit)
    assert proc.returncode == 0 and "(failed with exit code 134; checkpoint step 13; requeue 1 of at most 2" in proc.stdout
    (tmp_path / "scontrol_calls").unlink()
    # Exit code 2 (a config or usage error) fails the same way every time: never requeued, and said so.
    state_before = (run / preemption.STATE_FILE).read_text()
    proc = _run_template(tmp_path, "flip_b16", rc=2)
    assert proc.returncode == 2 and "a config or usage error" in proc.stderr and "not requeueing" in proc.stderr
    assert not (tmp_path / "scontrol_calls").exists() and (run / preemption.STATE_FILE).read_text() == state_before
    # FLIP_REQUEUE_ON_FAILURE=0: the old behaviour, only a preemption is requeued.
    proc = _run_template(tmp_path, "flip_b16", rc=1, extra_env={"FLIP_REQUEUE_ON_FAILURE": "0"})
    assert proc.returncode == 1 and "resubmit with the same RUN_DIR" in proc.stderr and "requeueing" not in proc.stdout
    assert not (tmp_path / "scontrol_calls").exists()
    proc = _run_template(tmp_path, "flip_b16", rc=preemption.EXIT_CODE, extra_env={"FLIP_REQUEUE_ON_FAILURE": "0"})
    assert proc.returncode == 0 and (tmp_path / "scontrol_calls").read_text() == "requeue 4242\n"


def test_a_step_srun_cannot_create_is_a_usage_error_never_requeued(tmp_path):
    _fake_checkpoint(tmp_path / "run", 12)
    said = "srun: error: Unable to create step for job 4242: More processors requested than permitted"
    proc = _run_template(tmp_path, "flip_b16", rc=1, extra_env={"FAKE_SRUN_STDERR": said})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "srun could not create the job step; this is a usage error" in proc.stderr
    assert f"    {said}" in proc.stderr and "NPROC_PER_NODE=2" in proc.stderr
    assert not (tmp_path / "scontrol_calls").exists()  # not requeued
    for said in ("srun: error: Invalid generic resource (gres) specification",
                 "srun: error: Invalid numeric value \"x\" for --cpus-per-task."):
        proc = _run_template(tmp_path, "flip_b16", rc=1, extra_env={"FAKE_SRUN_STDERR": said})
        assert proc.returncode == 2 and "srun could not create the job step" in proc.stderr, proc.stderr
    # A transient refusal (the controller busy, a step still completing) is a failure: requeued.
    said = "srun: error: Unable to create step for job 4242: Job/step already completing or completed"
    proc = _run_template(tmp_path, "flip_b16", rc=1, extra_env={"FAKE_SRUN_STDERR": said})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage error" not in proc.stderr and "the trainer failed (exit code 1); requeueing" in proc.stderr
    assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"]


def test_a_time_limit_under_the_signal_lead_is_reported_and_the_signal_moved(tmp_path):
    assert preemption.slurm_seconds("00:10:00") == 600 and preemption.slurm_seconds("1-00:00:00") == 86400
    assert preemption.slurm_seconds("10") == 600 and preemption.slurm_seconds("5:30") == 330
    assert preemption.slurm_seconds("2-12") == 216000 and preemption.slurm_seconds("UNLIMITED") is None
    assert preemption.signal_plan("00:10:00", 600)[0] == 300  # at the lead: half the limit
    assert preemption.signal_plan("00:10:01", 600) == (None, "") and preemption.signal_plan("", 600) == (None, "")
    # A 20 s limit with flip_b16.sh's --signal=B:USR1@300 (as --time=2 is with its 120 s, kept short
    # here): Slurm's signal at once is ignored, said at start.
    proc = _run_template(tmp_path, "flip_b16", rc=0, extra_env={"FAKE_TIME_LIMIT": "00:00:20",
                                                                 "FAKE_SIGNAL_BATCH_SHELL": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the time limit 00:00:20 (20 s) is at or under the preemption signal's lead of 300 s" in proc.stderr
    assert "signals itself 10 s after its start instead (a lead of 10 s, half the limit)" in proc.stderr
    assert "SIGUSR1 at 0 s ignored" in proc.stdout or "SIGUSR1 at 1 s ignored" in proc.stdout, proc.stdout
    assert not (tmp_path / "srun_signals").exists() and not (tmp_path / "scontrol_calls").exists()


def test_a_signal_during_the_start_up_is_kept_not_fatal(tmp_path):
    """Slurm may signal at once (a limit under the lead) while the batch shell still starts up,
    before its handler exists: bash's default for USR1 would end the job (it did, as signal 10).
    Under the lead it is ignored as any early signal; above it, it preempts before the launch."""
    proc = _run_template(tmp_path, "flip_b16", rc=0, extra_env={"FAKE_TIME_LIMIT": "00:00:20",
                                                                 "FAKE_SIGNAL_EARLY": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"SIGUSR1 at \d+ s ignored", proc.stdout), proc.stdout
    assert (tmp_path / "srun_args").exists()  # the trainers ran
    later = tmp_path / "later"
    later.mkdir()
    proc = _run_template(later, "flip_b16", rc=0, extra_env={"FAKE_TIME_LIMIT": "01:00:00", "FAKE_SIGNAL_EARLY": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requeue 4242" in (later / "scontrol_calls").read_text() and not (later / "srun_args").exists()


def test_template_refuses_bad_settings_with_what_is_valid(tmp_path):
    proc = _run_template(tmp_path, "flip_l16", rc=0, extra_env={"FLIP_DEVICE": "tpu"})
    assert proc.returncode == 2 and "FLIP_DEVICE=tpu is not valid; use cuda or cpu" in proc.stderr
    proc = _run_template(tmp_path, "flip_l16", rc=0, extra_env={"FLIP_DEVICE": "cuda", "PATH": f"{tmp_path}/bin:/usr/bin:/bin"})
    assert proc.returncode == 2 and "--gpus-per-node" in proc.stderr
    proc = _run_template(tmp_path, "flip_l16", rc=0, extra_env={"FLIP_CONFIG": "configs/nope.yaml"})
    assert proc.returncode == 2 and "FLIP_CONFIG=configs/nope.yaml: no such file" in proc.stderr
    proc = _run_template(tmp_path, "flip_l16", rc=0, extra_env={"FLIP_REQUEUE_ON_FAILURE": "yes"})
    assert proc.returncode == 2 and "FLIP_REQUEUE_ON_FAILURE=yes is not valid; use 1" in proc.stderr
    assert not (tmp_path / "srun_args").exists()
    proc = _run_template(tmp_path, "flip_l16", rc=0, extra_env={"SLURM_JOB_ID": ""})
    assert proc.returncode == 2 and "submit it with sbatch" in proc.stderr


SRUN_OPTIONS = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=0",
                "--wait=120", "--label"]
G14_LAYOUT = ["parallel.tp=2", "parallel.dp_shard=-1", "parallel.activation_checkpointing=full"]


def test_unmask_template_runs_the_tool_with_the_overlay_and_the_layout(tmp_path):
    pre = tmp_path / "pre"
    _fake_checkpoint(pre, 30)
    tool = str(REPO / "tools" / "unmask_tune.py")
    proc = _run_template(tmp_path, "unmask_tune_g14", rc=0, extra_env={"FLIP_FROM": str(pre)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "srun_args").read_text().splitlines() == [
        *SRUN_OPTIONS, sys.executable, "-u", tool, "--from", str(pre / "step_00000030"), "--run-dir", str(tmp_path / "run"),
        "--resume", "auto", "--overlay", str(REPO / "configs" / "unmask_tune.yaml"), "train.device=cpu", *G14_LAYOUT,
        "train.max_steps=7", "data.train_shards=/d/{000..007}.tar"]
    assert f"unmasked tuning from {pre / 'step_00000030'}, overlay {REPO / 'configs' / 'unmask_tune.yaml'}" in proc.stdout
    assert "FLIP_CONFIG=configs/tiny.yaml is ignored" in proc.stdout  # the tool tunes the checkpoint's config
    # A step directory as FLIP_FROM, another overlay, no layout, no FLIP_ARGS.
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  mask_ratio: 0.0\n")
    proc = _run_template(tmp_path, "unmask_tune_g14", rc=0, extra_env={
        "FLIP_FROM": str(pre / "step_00000030"), "FLIP_UNMASK_RECIPE": str(overlay), "FLIP_LAYOUT": "", "FLIP_ARGS": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "srun_args").read_text().splitlines() == [
        *SRUN_OPTIONS, sys.executable, "-u", tool, "--from", str(pre / "step_00000030"), "--run-dir", str(tmp_path / "run"),
        "--resume", "auto", "--overlay", str(overlay), "train.device=cpu"]
    # The tool takes these options (its --help), so the command line above is one it accepts.
    help_text = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--from", "--run-dir", "--resume {auto}", "--overlay"):
        assert option in help_text
    proc = _run_template(tmp_path, "unmask_tune_g14", rc=0, extra_env={"FLIP_FROM": str(tmp_path / "missing")})
    assert proc.returncode == 2 and "neither a checkpoint" in proc.stderr
    proc = _run_template(tmp_path, "unmask_tune_g14", rc=0,
                         extra_env={"FLIP_FROM": str(pre), "FLIP_UNMASK_RECIPE": str(tmp_path / "nope.yaml")})
    assert proc.returncode == 2 and "nope.yaml: no such file" in proc.stderr


# ============================================================================ srun-style ranks, no Slurm
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_style_ranks(tmp_path: Path, args: list[str], port: int) -> list[subprocess.Popen]:
    """Two trainer processes with only the variables srun gives its tasks (no RANK, no torchrun)."""
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") and not k.startswith("SLURM_")}
        env.update({"SLURM_JOB_ID": "31337", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                    "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        log = open(tmp_path / f"rank{rank}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "flip_scale.train", *args], cwd=tmp_path, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


@pytest.mark.slow
def test_preemption_signal_to_one_rank_stops_all_at_one_step_and_resumes(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    steps = 16
    args = ["--run-dir", str(run_dir), "--resume", "auto", "train.device=cpu", "data.num_workers=0",
            *_tiny_overrides(synthetic_dir, steps)]
    procs = _srun_style_ranks(tmp_path, args, _free_port())
    deadline = time.time() + 180
    while len(_steps(run_dir)) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 is told
    codes = _wait_all(procs, 180)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [preemption.EXIT_CODE] * 2, logs[0][-3000:] + logs[1][-3000:]
    stopped = _steps(run_dir)[-1]
    assert 3 <= stopped < steps
    assert (run_dir / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert "SIGUSR1 received" in logs[1] and "SIGUSR1 received" not in logs[0]
    assert f"preemption requested: stopped after step {stopped}" in logs[0]
    assert "layout: 2 ranks" in logs[0]  # world size from SLURM_NTASKS

    codes = _wait_all(_srun_style_ranks(tmp_path, args, _free_port()), 240)
    log0 = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], log0[-3000:]
    assert f"resumed from {run_dir / f'step_{stopped:08d}'} at step {stopped}" in log0
    assert _steps(run_dir) == list(range(1, steps + 1))  # each step once: resumed, not restarted
    assert (run_dir / "latest").read_text().strip() == f"step_{steps:08d}"


# ============================================================================ a real one-node Slurm
SLURM_COMMANDS = ("sbatch", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")


# apt-get's time, bounded so that an install in the fixture's setup stays well below pytest's
# --timeout=900 for the test that sets it up (which then runs a job of up to 4 minutes).
APT_UPDATE_TIMEOUT, APT_INSTALL_TIMEOUT, APT_BUDGET = 150, 300, 420


def _apt_lists_present(lists: Path = Path("/var/lib/apt/lists")) -> bool:
    """Whether apt has package lists (after `apt-get update`; container images often ship none)."""
    try:
        return any("_Packages" in p.name for p in lists.iterdir() if p.is_file())
    except OSError:
        return False


def _apt(cmd: list[str], timeout: float, env: dict) -> tuple[bool, str]:
    """Run one apt-get step; (succeeded, what went wrong). A timeout or a missing command is a
    failure like any other, reported, never raised."""
    what = " ".join(cmd)
    if timeout < 30:
        return False, f"{what}: not started, the {APT_BUDGET} s given to apt-get are spent"
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"{what} did not finish in {timeout:.0f} s (slow or unreachable package mirror?)"
    except OSError as error:
        return False, f"{what} could not run: {error}"
    if proc.returncode != 0:
        return False, f"{what} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-800:]}"
    return True, ""


def _slurm_installed() -> bool:
    return all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists() for c in SLURM_COMMANDS)


def _install_slurm() -> str | None:
    """Install slurm-wlm and munge with apt-get where missing; the reason when that is impossible
    (the fixture skips with it)."""
    if _slurm_installed():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get: apt-get install slurm-wlm munge)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + APT_BUDGET

    def left(limit: float) -> float:
        return min(limit, deadline - time.monotonic())

    update = ["apt-get", "update"]
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    updated = False
    if not _apt_lists_present():  # no package lists at all: install cannot find the packages
        ok, why = _apt(update, left(APT_UPDATE_TIMEOUT), env)
        if not ok:
            return f"Slurm is not installed and apt-get cannot fetch package lists: {why}"
        updated = True
    ok, why = _apt(install, left(APT_INSTALL_TIMEOUT), env)
    if not ok and not updated:  # stale package lists: refresh once
        ok_update, why_update = _apt(update, left(APT_UPDATE_TIMEOUT), env)
        if ok_update:
            ok, why = _apt(install, left(APT_INSTALL_TIMEOUT), env)
        else:
            why += f"; then {why_update}"
    try:
        subprocess.run(["apt-get", "clean"], capture_output=True, timeout=60)  # keep no downloaded packages
    except (subprocess.TimeoutExpired, OSError):
        pass
    if not ok:
        return f"Slurm is not installed and could not be: {why}"
    if not _slurm_installed():
        missing = [c for c in SLURM_COMMANDS if not (shutil.which(c) or Path(f"/usr/sbin/{c}").exists())]
        return f"apt-get installed slurm-wlm and munge, but these commands are still missing: {', '.join(missing)}"
    return None


def test_slurm_install_that_cannot_happen_is_a_reason_to_skip(monkeypatch):
    """No package lists: `apt-get update` first; a timeout or a failure of any apt step is returned as
    the reason (the fixture skips with it), never raised."""
    calls = []

    def fake_run(cmd, timeout=None, **kwargs):
        calls.append((cmd[:2], timeout))
        if cmd[:2] == ["apt-get", "update"]:
            raise subprocess.TimeoutExpired(cmd, timeout)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package slurm-wlm")

    monkeypatch.setattr(sys.modules[__name__], "_slurm_installed", lambda: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys.modules[__name__], "_apt_lists_present", lambda: False)
    reason = _install_slurm()
    assert calls[0] == (["apt-get", "update"], APT_UPDATE_TIMEOUT) and len(calls) == 1
    assert "cannot fetch package lists" in reason and f"did not finish in {APT_UPDATE_TIMEOUT} s" in reason
    # Lists present but stale: install, update once, install again; every step within its bound.
    calls.clear()
    monkeypatch.setattr(sys.modules[__name__], "_apt_lists_present", lambda: True)
    reason = _install_slurm()
    assert [c for c, _ in calls] == [["apt-get", "install"], ["apt-get", "update"], ["apt-get", "clean"]]
    assert all(t is not None and t <= max(APT_INSTALL_TIMEOUT, APT_UPDATE_TIMEOUT) for _, t in calls)
    assert reason.startswith("Slurm is not installed and could not be: apt-get install") and "did not finish" in reason
    assert APT_BUDGET + 60 < 900 - 240  # apt, then a job of up to 4 minutes, within pytest's --timeout


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """munged + slurmctld + slurmd for one node, every path under `root`, stopped by their pids."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside a Slurm job must not leak its job's variables

    def _daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        deadline = time.time() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.time() > deadline or proc.returncode != 0:
                raise RuntimeError(f"{name} did not start (exit {proc.returncode}): {proc.stderr[-1500:]}\n{self.logs()}")
            time.sleep(0.1)
        self.pids[name] = int(pid_file.read_text().split()[0])

    def _start_munge(self) -> Path:
        """The run directory's layout and a munged of its own; -> its socket."""
        root = self.root
        for sub in ("munge", "munge_key", "state", "spool", "log"):
            (root / sub).mkdir()
        (root / "munge").chmod(0o755)  # munged wants its socket directory searchable by all
        (root / "munge_key").chmod(0o700)
        key = root / "munge_key" / "munge.key"
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        socket_path = root / "munge" / "munge.socket"
        self._daemon("munged", [_sbin("munged"), f"--key-file={key}", f"--socket={socket_path}",
                                f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                                f"--seed-file={root / 'munge' / 'munged.seed'}"], root / "munge" / "munged.pid")
        return socket_path

    def _write_conf(self, cluster: str, controller_addr: str, socket_path: Path, nodes: str,
                    per_node: bool = False, extra: str = "") -> None:
        """slurm.conf for this cluster: its own ports, paths under `root` (one spool / pid / log per
        node through %n when `per_node`), `nodes` (the NodeName and PartitionName lines), `extra` lines."""
        root = self.root
        ports = [_free_port()]
        while len(ports) < 2:
            port = _free_port()
            if port not in ports:
                ports.append(port)
        node = "-%n" if per_node else ""
        self.conf.write_text(f"""# test cluster written by tests/test_slurm.py
ClusterName={cluster}
SlurmctldHost={self.host}({controller_addr})
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool' / '%n' if per_node else root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / f'slurmd{node}.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / f'slurmd{node}.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# The node's configured CPUs are used as they are (2 tasks even on a 1-CPU machine).
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=10
SlurmctldDebug=info
SlurmdDebug=info
{extra}{nodes}
""")

    def start(self) -> None:
        root = self.root
        socket_path = self._start_munge()
        detected = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True).stdout
        cpus = int(re.search(r"CPUs=(\d+)", detected).group(1)) if "CPUs=" in detected else os.cpu_count() or 2
        memory = int(re.search(r"RealMemory=(\d+)", detected).group(1)) if "RealMemory=" in detected else 1000
        self._write_conf("fliptest", "127.0.0.1", socket_path,
                         f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={max(2, cpus)} RealMemory={memory} State=UNKNOWN\n"
                         "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self._daemon("slurmctld", [_sbin("slurmctld")], root / "slurmctld.pid")
        self._daemon("slurmd", [_sbin("slurmd")], root / "slurmd.pid")
        deadline = time.time() + 60
        while True:
            state = self.run(["sinfo", "-h", "-n", self.host, "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return
            if time.time() > deadline:
                raise RuntimeError(f"the test node is '{state}', not idle, after 60 s\n{self.logs()}")
            time.sleep(0.5)

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict, cwd: Path) -> str:
        proc = self.run(["sbatch", "--parsable", *args], env=dict(self.env, **env), cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: str, predicate, timeout: float, what: str, log: Path | None = None) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if predicate(info):
                return info
            if time.time() > deadline:
                tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no job log)"
                raise AssertionError(f"job {job_id}: {what} not reached in {timeout:.0f} s; now {info.get('JobState')} "
                                     f"{info.get('Reason')}\n--- job log ---\n{tail}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if "slurmctld" in self.pids:
            subprocess.run(["scancel", "--full", "--partition=test"], env=self.env, capture_output=True, timeout=60)
            deadline = time.time() + 30
            while time.time() < deadline and self.run(["squeue", "-h", "-t", "R,CG"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while time.time() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


def running_cluster(cluster_class, prefix: str, refused=None):
    """A fixture's body: install Slurm (skip with the reason where it cannot be, or where
    `refused()` gives one), start `cluster_class` in a directory of its own, stop it at the end."""
    for reason in (_install_slurm(), refused() if refused is not None else None):
        if reason is not None:
            pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # munged refuses a socket below a directory others cannot search
    cluster = cluster_class(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    yield from running_cluster(LocalSlurm, "flip-slurm-")


def _job_env(synthetic_dir: Path, steps: int, **extra) -> dict:
    host = socket.gethostname().split(".")[0]
    env = {
        # FLIP_LAYOUT is left to the template (G14_LAYOUT: tp 2, dp_shard -1, full activation
        # checkpointing): the very script of the cluster runs, on 2 CPU tasks (tp 2, dp size 1).
        "FLIP_HOME": str(REPO), "FLIP_CONFIG": "configs/tiny.yaml", "FLIP_DEVICE": "cpu",
        "FLIP_PYTHON": sys.executable, "FLIP_ARGS": " ".join(_tiny_overrides(synthetic_dir, steps)),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
    }
    try:
        socket.gethostbyname(host)
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"  # the node name does not resolve on this machine
    env.update(extra)
    return env


# Resources that turn the 32 x 8 GPU template into one CPU node with 2 tasks.
CPU_JOB = ["-N", "1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
STEPS = 12
# What each logged step must repeat exactly, run after run, on CPU (one thread per rank, gloo's
# fixed 2-rank reduction order, the data position and RNG states restored on resume).
EXACT_KEYS = ("step", "loss", "lr", "grad_norm", "logit_scale", "samples_seen", "mask_ratio", "skipped_samples")


def _exact(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in EXACT_KEYS} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, synthetic_dir, tmp_path_factory) -> list[dict]:
    """The reference the Slurm runs are compared with: the command the template runs (flip-train on
    the tiny recipe, flip_g14.sh's layout, the job's overrides, 2 ranks started as srun starts them),
    without Slurm and never stopped. The same `parallel.*` keys matter: the data order depends on the
    data-parallel size (1 with tp 2 on 2 ranks). Its metrics.jsonl records (after `slurm_cluster`, so
    that it is not run when the Slurm tests are skipped)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp / "run"
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(run_dir), "--resume", "auto",
            "train.device=cpu", *G14_LAYOUT, *_tiny_overrides(synthetic_dir, STEPS)]
    codes = _wait_all(_srun_style_ranks(tmp, args, _free_port()), 300)
    assert codes == [0, 0], (tmp / "rank0.log").read_text()[-3000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records


@pytest.mark.slow
def test_sbatch_g14_template_runs_the_tiny_cpu_config(slurm_cluster, uninterrupted, synthetic_dir, tmp_path):
    job = slurm_cluster.sbatch([*CPU_JOB, "--job-name=flip-tiny-a", str(REPO / "slurm" / "flip_g14.sh")],
                               _job_env(synthetic_dir, STEPS), cwd=tmp_path)
    log = tmp_path / f"flip-tiny-a-{job}.out"
    info = slurm_cluster.wait_for(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                                  240, "the end", log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    run_dir = tmp_path / "runs" / "flip-tiny-a"  # RUN_DIR derived from the job name
    assert (run_dir / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (run_dir / f"step_{STEPS:08d}" / ".metadata").is_file()
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and records[-1]["samples_seen"] == STEPS * 32
    assert f"=== flip_scale job {job} (flip-tiny-a)" in text and "(1) x 2 processes = 2 ranks, device cpu" in text
    assert "layout: 2 ranks" in text  # two srun tasks joined one process group from Slurm's variables
    assert "dp_shard 1 x tp 2 (data-parallel size 1: tensor parallel)" in text  # the template's own layout
    assert re.search(rf"^0: .*step {STEPS}/{STEPS}", text, re.M) and re.search(r"^1: .*rank 1 holds", text, re.M)
    assert f"=== flip_scale job {job}: trainer exit code 0" in text
    # The job is the reference run under Slurm: step for step the same numbers.
    assert _exact(records) == _exact(uninterrupted)


@pytest.mark.slow
def test_sbatch_whose_step_cannot_start_exits_2_at_once_and_is_not_requeued(slurm_cluster, synthetic_dir, tmp_path):
    """More tasks than the allocation has (NPROC_PER_NODE=4 on 2): srun refuses the step. With
    --time=1 (under the template's 600 s signal lead) the start says so too."""
    cpu_job = [arg for arg in CPU_JOB if not arg.startswith("--time")] + ["--time=1"]
    job = slurm_cluster.sbatch([*cpu_job, "--job-name=flip-tiny-usage", str(REPO / "slurm" / "flip_g14.sh")],
                               _job_env(synthetic_dir, STEPS, NPROC_PER_NODE="4"), cwd=tmp_path)
    log = tmp_path / f"flip-tiny-usage-{job}.out"
    info = slurm_cluster.wait_for(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                                  60, "the end", log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text[-3000:]
    assert "srun could not create the job step; this is a usage error" in text and "    srun: error:" in text
    assert "the time limit 00:01:00 (60 s) is at or under the preemption signal's lead of 600 s" in text


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_the_unmask_job_follows(slurm_cluster, uninterrupted, synthetic_dir,
                                                                   tmp_path):
    job = slurm_cluster.sbatch([*CPU_JOB, "--job-name=flip-tiny-b", str(REPO / "slurm" / "flip_g14.sh")],
                               _job_env(synthetic_dir, STEPS), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "flip-tiny-b"
    # The unmasked tuning waits for the pre-training job, through its requeue.
    tune = slurm_cluster.sbatch(
        [*CPU_JOB, "--job-name=tune-tiny", f"--dependency=afterok:{job}", str(REPO / "slurm" / "unmask_tune_g14.sh")],
        _job_env(synthetic_dir, 4, FLIP_FROM=str(run_dir)), cwd=tmp_path)
    log = tmp_path / f"flip-tiny-b-{job}.out"
    deadline = time.time() + 180
    while len(_steps(run_dir)) < 3:
        assert time.time() < deadline, f"no progress\n{log.read_text()[-3000:] if log.exists() else ''}"
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job])  # what --signal=B:USR1@secs does
    info = slurm_cluster.wait_for(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING",
                                  120, "the requeue", log)
    assert slurm_cluster.job(tune)["JobState"] == "PENDING"
    # Slurm holds a requeued job back for two minutes (BeginTime) so that the node has dropped the
    # previous run; a relaunch within the second of the requeue is refused ("Job credential revoked").
    # Release it once the node is idle again and a few seconds have passed.
    deadline = time.time() + 60
    while slurm_cluster.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() != "idle":
        assert time.time() < deadline, slurm_cluster.logs()
        time.sleep(0.5)
    time.sleep(3)
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = slurm_cluster.wait_for(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                                  240, "the end after the requeue", log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (
        f"{info}\n{text[-5000:]}\n{slurm_cluster.logs()}")

    state = json.loads((run_dir / preemption.STATE_FILE).read_text())
    stopped = state["step"]
    assert state["job_id"] == job and state["count"] == 1 and 3 <= stopped < STEPS
    assert "SIGUSR1 received by the batch shell" in text
    assert f"trainer exit code {preemption.EXIT_CODE}" in text and f"requeueing job {job} (preempted" in text
    assert f"preemption requested: stopped after step {stopped}" in text
    assert ", restart 1" in text and f"resumed from runs/flip-tiny-b/step_{stopped:08d} at step {stopped}" in text
    assert f"restart 1 of job {job} follows its own requeue" in text  # restart-check: not counted twice
    assert (run_dir / f"step_{stopped:08d}" / ".metadata").is_file()  # the checkpoint written on the signal
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # resumed, no step twice
    assert (run_dir / "latest").read_text().strip() == f"step_{STEPS:08d}"
    # The same run as the one that was never stopped: the same final step and samples, and, since the
    # checkpoint holds the data position and RNG states, the same batches and so the same losses.
    assert records[-1]["step"] == uninterrupted[-1]["step"] == STEPS
    assert records[-1]["samples_seen"] == uninterrupted[-1]["samples_seen"] == STEPS * 32
    assert _exact(records) == _exact(uninterrupted)

    tune_log = tmp_path / f"tune-tiny-{tune}.out"
    tune_info = slurm_cluster.wait_for(tune, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                                       240, "the end of the unmasked tuning", tune_log)
    tune_text = tune_log.read_text()
    assert tune_info["JobState"] == "COMPLETED", tune_text[-4000:]
    end_of_pretraining = slurm_cluster.job(job)["EndTime"]
    assert tune_info["StartTime"] >= end_of_pretraining  # ISO timestamps
    tune_dir = tmp_path / "runs" / "tune-tiny"
    assert (tune_dir / "latest").read_text().strip() == "step_00000004"
    assert f"unmasked tuning from {run_dir / f'step_{STEPS:08d}'}" in tune_text
    # tools/unmask_tune.py ran (its plan, then flip-train's init from the checkpoint), on the template's layout.
    assert re.search(r"^0: unmasked tuning of ", tune_text, re.M), tune_text[-4000:]
    assert f"initialised weights from {run_dir / f'step_{STEPS:08d}'} (fresh optimizer, step 0)" in tune_text
    assert "dp_shard 1 x tp 2 (data-parallel size 1: tensor parallel)" in tune_text
    assert "mask_ratio: 0.0" in (tune_dir / "config.yaml").read_text()
    assert all(r["mask_ratio"] == 0.0 for r in read_jsonl(tune_dir / "metrics.jsonl"))


# ============================================================================ the templates' own layouts
def _template_defaults(name: str) -> tuple[int, str, list[str]]:
    """(ranks, recipe, layout overrides) that a template runs with when nothing is overridden."""
    text = (REPO / "slurm" / f"{name}.sh").read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1))
    recipe = re.search(r"^FLIP_CONFIG=\$\{FLIP_CONFIG:-([^}]+)\}$", text, re.M).group(1)
    layout = re.search(r"^FLIP_LAYOUT=\$\{FLIP_LAYOUT-([^}]*)\}$", text, re.M).group(1).split()
    return nodes * per_node, recipe, layout


@pytest.mark.parametrize("name", ["flip_b16", "flip_l16", "flip_h14", "flip_g14", "unmask_tune_g14"])
def test_each_template_default_layout_is_valid_for_its_allocation(name):
    """`sbatch slurm/NAME.sh` as shipped: the recipe, the template's layout and its #SBATCH
    allocation make a layout the trainer accepts (checked before any model is built), with a data
    stream count that splits over its data-parallel ranks and the global batch."""
    from flip_scale.config import load_config
    from flip_scale.data.loader import check_streams, default_streams
    from flip_scale.models import arch_from_config
    from flip_scale.parallel import ParallelDims

    ranks, recipe, layout = _template_defaults(name)
    cfg = load_config(REPO / recipe, layout)
    dims = ParallelDims.from_config(cfg.parallel, ranks, arch_from_config(cfg.model), cfg.train.global_batch_size,
                                    cfg.optim.grad_accum_steps)
    assert dims.world_size == ranks and dims.tp * dims.pp * dims.dp_size == ranks
    local = cfg.train.global_batch_size // dims.dp_size
    streams = cfg.data.streams or default_streams(dims.dp_size, cfg.data.num_workers, local)
    check_streams(streams, dims.dp_size, cfg.train.global_batch_size)
    if name.endswith("g14"):  # the README's sizing: tp 2 inside a node, ZeRO-3 over 128, full AC
        assert (dims.tp, dims.dp_shard, cfg.parallel.activation_checkpointing) == (2, 128, "full")
