"""End-to-end under the DeepSpeed engine: the real `flip-train` on synthetic shards, 2 ranks (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import free_port
from flip_scale.checkpoint import find_latest
from flip_scale.metrics import read_jsonl
from test_train_e2e import _overrides as train_e2e_overrides

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DS = ["parallel.engine=deepspeed", "parallel.zero_stage=3"]


def _overrides(data_dir: Path, steps: int, every: int) -> list[str]:
    """flip-train's end-to-end overrides (tests/test_train_e2e.py), with retrieval, a capped
    evaluation, no loader workers and no tensorboard."""
    return [*train_e2e_overrides(data_dir, steps, every), f"eval.retrieval_shards={data_dir}/eval-{{000000..000000}}.tar",
            "eval.max_samples=64", "data.num_workers=0", "logging.tensorboard=false"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _torchrun(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flip_scale.train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_flip_train_deepspeed_zero3_trains_evaluates_checkpoints_and_resumes(tmp_path, synthetic_dir):
    run_dir = tmp_path / "ds"
    proc = _torchrun(tmp_path, ["--run-dir", str(run_dir), *_overrides(synthetic_dir, steps=6, every=3),
                                "eval.every_steps=3", "train.log_every_steps=3", *DS])
    output = proc.stdout + proc.stderr
    assert "engine deepspeed" in output and "ZeRO-3" in output and "deepspeed config:" in output
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 6]
    assert all(0 < r["loss"] < 10 and 1.0 < r["logit_scale"] <= 100.0 for r in records)
    evaluation = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evaluation] == [3, 6]
    assert all(0.0 <= e["zero_shot_top1"] <= 1.0 and "retrieval_i2t_r1" in e for e in evaluation), evaluation
    latest = find_latest(run_dir)
    assert latest.name == "step_00000006" and (run_dir / "step_00000003").is_dir()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["engine"] == "deepspeed" and state["dcp_shards"] is False and state["world_size"] == 2
    files = sorted(p.name for p in (latest / "deepspeed").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files and "zero_pp_rank_1_mp_rank_00_model_states.pt" in files
    assert not list(latest.glob("*.py"))  # DeepSpeed's recovery scripts are not shipped in checkpoints

    # --resume auto continues at step 7 (the weights, the optimizer, the lr schedule, the data position).
    proc = _torchrun(tmp_path, ["--run-dir", str(run_dir), "--resume", "auto", *_overrides(synthetic_dir, steps=8, every=4),
                                "eval.at_end=false", "train.log_every_steps=1", *DS])
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records][-2:] == [7, 8]
    assert records[-1]["samples_seen"] == 8 * 128
    assert "resumed from" in proc.stdout + proc.stderr
    assert find_latest(run_dir).name == "step_00000008"

    # flip-eval reads the DeepSpeed checkpoint (into the native build, any layout), and its numbers
    # are those the run's own evaluation logged at step 6.
    from flip_scale.evaluate import main as eval_main

    report = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(run_dir / "step_00000006"), "--json", str(report), "train.device=cpu",
                      "data.num_workers=0"]) == 0
    measured = json.loads(report.read_text())
    assert measured["step"] == 6 and measured["zero_shot_top1"] == pytest.approx(evaluation[-1]["zero_shot_top1"], abs=1e-6)


def _srun_like(tmp_path: Path, args: list[str]) -> list[subprocess.Popen]:
    """Two ranks started as srun starts them (one process per task, no torchrun in between), so
    each process's exit status is the trainer's own."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "flip_scale.train", *args], cwd=tmp_path, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_sigusr1_makes_a_deepspeed_run_save_and_exit_42_then_resume(tmp_path, synthetic_dir):
    run_dir = tmp_path / "pre"
    args = ["--run-dir", str(run_dir), *_overrides(synthetic_dir, steps=400, every=1000), "eval.at_end=false",
            "train.log_every_steps=1", *DS]
    procs = _srun_like(tmp_path, args)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
            if steps and steps[-1] >= 2:
                break
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)  # one rank is enough: the ranks agree at the step boundary
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log0 = (tmp_path / "rank0.log").read_text()
    assert codes == [42, 42], log0[-3000:]
    latest = find_latest(run_dir)
    stopped = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped < 400 and f"stopped after step {stopped}" in log0
    assert (latest / "deepspeed").is_dir()

    resume = ["--run-dir", str(run_dir), "--resume", "auto", *_overrides(synthetic_dir, steps=stopped + 2, every=1000),
              "eval.at_end=false", "train.log_every_steps=1", *DS]
    procs = _srun_like(tmp_path, resume)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps[-2:] == [stopped + 1, stopped + 2] and steps.count(stopped) == 1


def test_unmasked_tuning_of_a_deepspeed_run_runs_under_the_same_engine(tmp_path, synthetic_dir):
    """tools/unmask_tune.py --from a DeepSpeed run: the tuning run takes the run's engine and its
    weights (a DeepSpeed step directory as --init-from)."""
    from flip_scale.train import main as train_main
    from flip_scale.unmask import main as unmask_main

    run_dir, tuned = tmp_path / "masked", tmp_path / "tuned"
    base = [*_overrides(synthetic_dir, steps=4, every=4), "eval.at_end=false", "train.device=cpu", *DS]
    assert train_main(["--run-dir", str(run_dir), *base]) == 0
    assert unmask_main(["--from", str(run_dir), "--run-dir", str(tuned), "--samples", "256", "--warmup-samples", "128",
                        "data.num_workers=0", "eval.at_end=false"]) == 0
    state = json.loads((find_latest(tuned) / "trainer_state.json").read_text())
    assert state["engine"] == "deepspeed" and state["step"] == 2
