"""End-to-end: the real `flip-train` entry point on synthetic shards (tiny config, CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flip_scale.checkpoint import find_latest
from flip_scale.metrics import read_jsonl
from flip_scale.train import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _overrides(data_dir: Path, steps: int, every: int) -> list[str]:
    return [
        f"data.synthetic_dir={data_dir}",
        f"data.train_shards={data_dir}/train-{{000000..000007}}.tar",
        f"data.tokenizer={data_dir}/tokenizer.model",
        f"eval.zero_shot_shards={data_dir}/eval-{{000000..000000}}.tar",
        f"eval.classnames={data_dir}/classnames.txt",
        f"eval.templates={data_dir}/templates.txt",
        f"train.max_steps={steps}",
        f"checkpoint.every_steps={every}",
        "train.log_every_steps=10",
    ]


def test_flip_train_trains_checkpoints_evaluates_and_resumes(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    main(["--run-dir", str(run_dir), *_overrides(synthetic_dir, steps=60, every=30)])

    # A checkpoint at the end, named by `latest`, and the resolved config.
    latest = find_latest(run_dir)
    assert latest is not None and latest.name == "step_00000060"
    assert (run_dir / "config.yaml").is_file()
    # Metrics: one JSON object per logged step with the documented keys.
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert records[-1]["step"] == 60
    for key in ("step", "loss", "lr", "logit_scale", "images_per_s", "samples_seen", "mask_ratio", "skipped_samples",
                "grad_norm", "tflops_per_s_per_rank", "data_wait_fraction"):
        assert key in records[-1]
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in records)
    assert "mfu" not in records[-1]  # a CPU has no known peak (logging.peak_tflops sets one)
    assert records[-1]["samples_seen"] == 60 * 128
    assert records[-1]["loss"] < records[0]["loss"]
    # Tensorboard: the scalars issue 2 lists, and the evaluation.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "lr", "logit_scale", "grad_norm", "images_per_s", "samples_seen", "mask_ratio",
                 "skipped_samples"):
        assert any(tag.endswith(name) and not tag.startswith("eval/") for tag in tags), (name, sorted(tags))
    assert {"eval/zero_shot_top1", "eval/zero_shot_top5"} <= tags
    loss_tag = next(tag for tag in tags if tag.endswith("loss") and not tag.startswith("eval/"))
    assert [event.step for event in events.Scalars(loss_tag)][-1] == 60
    # Zero-shot accuracy clearly above chance on the held-out classes.
    evaluation = read_jsonl(run_dir / "eval.jsonl")[-1]
    chance = 1.0 / evaluation["classes"]
    print(f"zero-shot top-1 after 60 steps: {evaluation['zero_shot_top1']:.3f} (chance {chance:.3f})")
    assert evaluation["zero_shot_top1"] > 2.5 * chance

    # --resume continues from the saved step and runs to the new max_steps.
    logged_before = len(records)
    main(["--run-dir", str(run_dir), "--resume", "auto", *_overrides(synthetic_dir, steps=80, every=30), "eval.at_end=false"])
    records = read_jsonl(run_dir / "metrics.jsonl")
    # Only steps 61..80 ran (logged at 70 and 80): a fresh start would have logged 10..80 again.
    assert [r["step"] for r in records[logged_before:]] == [70, 80]
    assert records[-1]["samples_seen"] == 80 * 128
    assert find_latest(run_dir).name == "step_00000080"


def _torchrun(tmp_path, nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "flip_scale.train", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_flip_train_under_torchrun_two_ranks(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run2"
    proc = _torchrun(tmp_path, 2, ["--run-dir", str(run_dir), *_overrides(synthetic_dir, steps=20, every=20),
                                   "eval.at_end=false", "data.num_workers=0"])
    assert "layout:" in proc.stderr + proc.stdout
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert records[-1]["step"] == 20 and records[-1]["samples_seen"] == 20 * 128
    assert find_latest(run_dir).name == "step_00000020"
    # Two data-parallel ranks each wrote their data position (required: a checkpoint without them
    # would restart the stream on resume).
    assert sorted(p.name for p in find_latest(run_dir).glob("data_rank*.json")) == ["data_rank0.json", "data_rank1.json"]


def test_flip_train_pipeline_and_tensor_parallel_four_ranks(tmp_path, synthetic_dir):
    """`flip-train parallel.tp=2 parallel.pp=2` under torchrun: trains, logs the layout, checkpoints,
    and evaluates through the pipeline stages at the end."""
    run_dir = tmp_path / "run4"
    proc = _torchrun(tmp_path, 4, [
        "--run-dir", str(run_dir), *_overrides(synthetic_dir, steps=6, every=6), "eval.max_samples=100",
        "eval.every_steps=3",
        "data.num_workers=0", "parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2", "train.log_every_steps=3",
    ])
    output = proc.stdout + proc.stderr
    assert "pp 2 x dp_replicate 1 x dp_shard 1 x tp 2" in output  # the layout is printed at start
    assert "pipeline split" in output
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 6]
    assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 10 for r in records)
    assert 1.0 < records[-1]["logit_scale"] <= 100.0  # reduced from the last stage
    assert find_latest(run_dir).name == "step_00000006"
    evaluation = read_jsonl(run_dir / "eval.jsonl")  # eval.every_steps=3: in the middle, then at the end
    assert [e["step"] for e in evaluation] == [3, 6] and all(e["samples"] == 100 for e in evaluation)
    assert all(0.0 <= e["zero_shot_top1"] <= e["zero_shot_top5"] <= 1.0 for e in evaluation)
