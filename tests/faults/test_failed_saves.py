"""A checkpoint save that fails mid-run (a read-only directory, a full file system): logged with the
path and the error, `latest` keeps naming the previous checkpoint (still complete), training goes
on and the next save succeeds; checkpoint.required or too many failures in a row stop with exit 1.

Tests run as root, where a chmod does not stop a write: the read-only directory is a write that
fails with EROFS from the shard writer (the manager's `save_state`, patched); the full file system
is a real one, a small tmpfs filled mid-run."""

import errno
import logging
import shutil
import subprocess

import pytest
from fault_runs import tiny_overrides

from flip_scale.checkpoint import checkpoint_problem, find_latest
from flip_scale.checkpoint import manager as manager_module
from flip_scale.checkpoint.space import NotEnoughSpace, check_free_space, checkpoints_on_disk
from flip_scale.config import load_config
from flip_scale.metrics import read_jsonl
from flip_scale.train import main


def _failing_writer(monkeypatch, failing_steps, seen):
    real = manager_module.save_state

    def save_state(state, path, *args, **kwargs):
        step = int(str(path).rsplit("step_", 1)[1].split(".")[0])
        seen.append((step, find_latest(path.parent)))
        if step in failing_steps:
            raise OSError(errno.EROFS, "Read-only file system", str(path / "__0_0.distcp"))
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(manager_module, "save_state", save_state)


def _failures(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if "CHECKPOINT SAVE FAILED" in line]


def test_a_failed_save_is_logged_and_training_goes_on(tmp_path, synthetic_dir, monkeypatch, capfd):
    seen = []
    _failing_writer(monkeypatch, {4}, seen)
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), *tiny_overrides(synthetic_dir, 8, 2, "checkpoint.keep_last=5")]) == 0
    failed = _failures(capfd)
    assert len(failed) == 1, failed
    assert str(run_dir / "step_00000004") in failed[0] and "Read-only file system" in failed[0]
    assert "latest still names" in failed[0] and "step_00000002" in failed[0]
    # At the next save, latest was still the checkpoint before the failed one, and complete.
    step, latest_then = seen[2]
    assert step == 6 and latest_then.name == "step_00000002" and checkpoint_problem(latest_then) is None
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000002", "step_00000006", "step_00000008"]
    assert find_latest(run_dir).name == "step_00000008"
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))


@pytest.mark.parametrize("setting, failing, message", [
    ("checkpoint.required=true", {4}, "checkpoint.required=true: stopping the run"),
    ("checkpoint.max_failed_saves=1", {4, 6}, "2 saves in a row failed, more than checkpoint.max_failed_saves=1"),
])
def test_a_required_save_or_too_many_failures_stop_with_exit_1(tmp_path, synthetic_dir, monkeypatch, capsys,
                                                               setting, failing, message):
    _failing_writer(monkeypatch, failing, [])
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), *tiny_overrides(synthetic_dir, 8, 2, setting)]) == 1
    err = capsys.readouterr().err
    assert "flip-train: checkpoint error:" in err and message in err and "step_00000002" in err, err
    assert find_latest(run_dir).name == "step_00000002" and not list(run_dir.glob("*.tmp"))


def test_a_full_file_system_mid_run(tmp_path, synthetic_dir, monkeypatch, capfd):
    """A real ENOSPC: the run directory is a 40 MiB tmpfs, filled before the save of step 4 (leaving
    room for the metrics lines) and emptied before the save of step 6."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(run_dir)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this kernel refuses a tmpfs mount here: {mounted.stderr.strip()}")
    real_save = manager_module.CheckpointManager.save
    filler = run_dir / "filler"

    def save(self, step):
        if step == 4:
            free = shutil.disk_usage(run_dir).free
            with open(filler, "wb") as f:
                f.write(b"\0" * (free - 64 * 1024))
        if step == 6:
            filler.unlink()
        return real_save(self, step)

    monkeypatch.setattr(manager_module.CheckpointManager, "save", save)
    try:
        code = main(["--run-dir", str(run_dir), *tiny_overrides(synthetic_dir, 6, 2, "checkpoint.keep_last=1")])
        failed = _failures(capfd)
        names = sorted(p.name for p in run_dir.glob("step_*"))
        latest = find_latest(run_dir).name
    finally:
        subprocess.run(["umount", str(run_dir)], check=False)
    assert code == 0
    assert len(failed) == 1 and "No space left on device" in failed[0] and "step_00000004" in failed[0], failed
    assert names == ["step_00000006"] and latest == "step_00000006"


class _Usage:
    def __init__(self, free):
        self.free = free


def test_free_space_is_checked_at_start(tmp_path, monkeypatch, caplog):
    cfg = load_config(None, ["checkpoint.keep_last=2", "checkpoint.every_steps=10", "train.max_steps=100"]).checkpoint
    assert checkpoints_on_disk(cfg, 100) == 3  # keep_last + the one being written
    one = 1_000_000 * 12
    monkeypatch.setattr("flip_scale.checkpoint.space.shutil.disk_usage", lambda path: _Usage(2 * one))
    with caplog.at_level(logging.WARNING):
        warning = check_free_space(tmp_path, 1_000_000, cfg, 100)
    assert "has 0.02 GiB free" in warning and "up to 3 checkpoints of about 0.01 GiB" in warning
    assert warning in caplog.text
    monkeypatch.setattr("flip_scale.checkpoint.space.shutil.disk_usage", lambda path: _Usage(one - 1))
    with pytest.raises(NotEnoughSpace, match="one checkpoint needs about 0.01 GiB"):
        check_free_space(tmp_path, 1_000_000, cfg, 100)
    monkeypatch.setattr("flip_scale.checkpoint.space.shutil.disk_usage", lambda path: _Usage(3 * one))
    assert check_free_space(tmp_path, 1_000_000, cfg, 100) == ""


def test_a_run_directory_that_cannot_hold_one_checkpoint_is_refused(tmp_path, synthetic_dir, monkeypatch, capsys):
    monkeypatch.setattr("flip_scale.checkpoint.space.shutil.disk_usage", lambda path: _Usage(1000))
    assert main(["--run-dir", str(tmp_path / "run"), *tiny_overrides(synthetic_dir, 2, 2)]) == 2
    err = capsys.readouterr().err
    assert "flip-train: run directory error:" in err and "0.00 GiB free" in err and "parameters x 12 bytes" in err


def test_a_deepspeed_save_failing_on_one_rank_still_reaches_the_barrier_then_raises(tmp_path, monkeypatch):
    """The DeepSpeed engine's save holds this rank's write error until the trailing barrier every
    rank reaches, so the manager's agreement after it is the same collective on every rank."""
    import contextlib

    from flip_scale.engine import deepspeed_state

    calls = []

    class _Engine:
        def save_checkpoint(self, *args, **kwargs):
            calls.append("save")
            raise OSError(28, "No space left on device")

    class _State(deepspeed_state.ZeroStateMixin):
        engine, steps_taken, rank = _Engine(), 3, 1

        def _swapped_state_in_the_files(self):
            return contextlib.nullcontext()

    monkeypatch.setattr(deepspeed_state.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    with pytest.raises(OSError, match="No space left"):
        _State().save_files(tmp_path)
    assert calls == ["save", "barrier"]


@pytest.mark.slow
@pytest.mark.parametrize("required", [False, True])
def test_a_save_failing_on_one_rank_of_two_is_agreed_by_both(tmp_path, synthetic_dir, required):
    """2 ranks; DCP's write of step 4 fails on rank 1 only (FLIP_SCALE_TEST_FAIL, an EROFS from
    inside the shard write): both ranks say the save failed (DCP gathers the error to every rank,
    the manager's agreement after it), neither commits, `latest` stays step 2, the run goes on and
    the save of step 6 succeeds. With checkpoint.required both ranks stop with exit 1 and the message."""
    import time

    from fault_runs import Ranks

    run_dir = tmp_path / "run"
    extra = ["checkpoint.keep_last=5", *(["checkpoint.required=true"] if required else [])]
    started = time.monotonic()
    ranks = Ranks(run_dir, tiny_overrides(synthetic_dir, 6, 2, *extra), env={"FLIP_SCALE_TEST_FAIL": "dcp_write@4/1"})
    codes = ranks.wait(240)
    seconds = time.monotonic() - started
    logs = [ranks.output(rank) for rank in (0, 1)]
    assert "failing the save of step 4 at dcp_write" in logs[1] and "failing the save" not in logs[0]
    for log in logs:  # each rank names the failing rank, its error and the checkpoint latest keeps
        failed = [line for line in log.splitlines() if "CHECKPOINT SAVE FAILED" in line or "checkpoint error:" in line]
        assert failed and str(run_dir / "step_00000004") in failed[0], log[-3000:]
        assert "on rank 1: OSError" in failed[0] and "Read-only file system" in failed[0], failed
        assert f"{run_dir / 'latest'} still names {run_dir / 'step_00000002'}" in failed[0], failed
    assert not (run_dir / "step_00000004").exists() and not list(run_dir.glob("*.tmp"))
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    if required:
        assert codes == [1, 1], logs
        assert all("checkpoint.required=true: stopping the run" in log for log in logs)
        assert find_latest(run_dir).name == "step_00000002" and steps == [1, 2, 3, 4]
    else:
        assert codes == [0, 0], logs
        assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000002", "step_00000006"]
        assert find_latest(run_dir).name == "step_00000006" and steps == list(range(1, 7))
    print(f"\none rank's failed save, required={required}: both ranks done in {seconds:.1f} s")


def test_the_fault_points_fail_once_where_named_and_refuse_a_bad_setting(monkeypatch):
    from flip_scale.checkpoint import faultpoints

    monkeypatch.setenv("FLIP_SCALE_TEST_FAIL", "dcp_write@4/0")
    faultpoints.reach("dcp_write", 2)  # another step
    faultpoints.reach("renamed", 4)  # another point
    with pytest.raises(OSError, match=r"Read-only file system \(FLIP_SCALE_TEST_FAIL at dcp_write\)"):
        faultpoints.reach("dcp_write", 4)
    faultpoints.reach("dcp_write", 4)  # once: the next save succeeds
    monkeypatch.setenv("FLIP_SCALE_TEST_FAIL", "mid_save@4")
    with pytest.raises(ValueError, match=r"FLIP_SCALE_TEST_FAIL='mid_save@4': .* a point of dcp_write, renamed"):
        faultpoints.reach("mid_save", 4)
    monkeypatch.delenv("FLIP_SCALE_TEST_FAIL")
    assert faultpoints.dcp_writer("/tmp/x/step_00000004.tmp") is None  # unset: DCP's own writer
    monkeypatch.setenv("FLIP_SCALE_TEST_PAUSE", "dcp_writ:1")
    with pytest.raises(ValueError, match="expected <point>"):
        faultpoints.reach("dcp_write", 4)
