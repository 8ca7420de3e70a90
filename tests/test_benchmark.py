"""tools/benchmark.py --config: the JSON line users and BENCHMARKS.md read, with and without OpenCLIP; tools/benchmark_data.py runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
NUMBERS = ("images_per_s", "step_s", "step_s_min", "step_s_max", "tflops_per_s_per_rank", "mfu", "peak_tflops",
           "peak_mem_bytes", "forward_s", "backward_s", "optimizer_s", "communication_s", "comm_bytes")
OPENCLIP_NUMBERS = ("openclip_images_per_s", "openclip_step_s", "ratio")


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("compare", [False, True], ids=["ours", "compare-openclip"])
def test_benchmark_json_has_every_field_as_a_number(compare):
    args = ["--config", "configs/tiny.yaml", "--steps", "1", "--warmup", "1", "--json"]
    proc = _benchmark(*args, *(["--compare-openclip"] if compare else []))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in NUMBERS + (OPENCLIP_NUMBERS if compare else ()):
        value = result[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), (key, value)
    assert result["images_per_s"] > 0 and result["peak_mem_bytes"] > 0 and 0 < result["mfu"] < 1
    assert result["forward_s"] > 0 and result["backward_s"] > 0 and result["optimizer_s"] > 0
    assert result["model"] == "tiny" and result["world_size"] == 1
    if compare:
        assert result["ratio"] == pytest.approx(result["images_per_s"] / result["openclip_images_per_s"])
    else:
        assert "ratio" not in result


@pytest.mark.parametrize("separate", [False, True], ids=["one-process", "separate-processes"])
def test_a_config_openclip_cannot_express_is_refused_by_name(separate):
    proc = _benchmark("--config", "configs/tiny.yaml", "model.text_pad_mask=true", "--compare-openclip", "--json",
                      *(["--separate-processes", "2"] if separate else []))
    assert proc.returncode == 2
    assert "model.text_pad_mask=true has no OpenCLIP equivalent" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_side_in_a_process_of_its_own():
    """--separate-processes: ours and OpenCLIP each alone in a process (nothing of the other in its heap),
    the medians over both processes' timed steps, the same JSON fields as the one-process comparison."""
    proc = _benchmark("--config", "configs/tiny.yaml", "--steps", "2", "--warmup", "0", "--json", "--compare-openclip",
                      "--separate-processes", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in NUMBERS + OPENCLIP_NUMBERS:
        value = result[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), (key, value)
    assert result["separate_processes"] == 1 and len(result["step_times"]) == 2
    assert result["ratio"] == pytest.approx(result["images_per_s"] / result["openclip_images_per_s"])
    assert "round 1/1 ours" in proc.stderr and "round 1/1 openclip" in proc.stderr


def test_the_layout_sweep_measures_a_sharded_layout_and_counts_its_traffic():
    """The sweep's ranks count their collectives on one extra step (CommCounter on the trainer's device)."""
    proc = _benchmark("--layouts", "1", "dp_shard=2", "--batch", "8", "--steps", "1", "--warmup", "0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
            for line in proc.stdout.splitlines() if line.count("|") == 7 and "layout" not in line}
    assert set(rows) == {"1", "dp_shard=2"}, proc.stdout
    assert rows["1"][0] == "1" and rows["dp_shard=2"][0] == "2"
    assert float(rows["1"][5]) == 0.0 and float(rows["dp_shard=2"][5]) > 0  # comm MB/step: FSDP2's gathers


def test_a_failed_layout_fails_the_sweep():
    proc = _benchmark("--layouts", "tp=3", "--batch", "8", "--steps", "1", "--warmup", "0")
    assert proc.returncode == 1
    assert "1 of 1 layouts failed: tp=3" in proc.stderr


def test_benchmark_data_runs_its_throughput_and_both_replays():
    """tools/benchmark_data.py patches the stream's reader for its eager replay: it must still reach it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_data.py"), "--shards", "2", "--per-shard",
                             "16", "--batch", "8", "--batches", "2", "--image-kib", "4", "--image-size", "16",
                             "--workers", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "throughput:" in result.stdout
    assert "(lazy replay)" in result.stdout and "(eager replay)" in result.stdout


def test_activation_checkpointing_is_compared_like_for_like():
    """Full checkpointing is built on the OpenCLIP side too (its grad_checkpointing, the same towers);
    selective (every k-th block) has no OpenCLIP equivalent and is refused by name, not compared unfairly."""
    sys.path.insert(0, str(REPO / "tools"))
    from benchmark_openclip import build_openclip, refuse_for_openclip

    from flip_scale.config import load_config

    selective = load_config(str(REPO / "configs/tiny.yaml"), ["parallel.activation_checkpointing=selective"])
    with pytest.raises(ValueError, match="parallel.activation_checkpointing=selective has no OpenCLIP equivalent"):
        refuse_for_openclip(selective, 1)
    for towers, vision, text in (("both", True, True), ("vision", True, False), ("text", False, True)):
        cfg = load_config(str(REPO / "configs/tiny.yaml"), ["parallel.activation_checkpointing=full",
                                                             f"parallel.activation_checkpointing_towers={towers}"])
        refuse_for_openclip(cfg, 1)
        model, _, _ = build_openclip(cfg, torch.device("cpu"))
        assert model.visual.transformer.grad_checkpointing is vision and model.transformer.grad_checkpointing is text
    model, _, _ = build_openclip(load_config(str(REPO / "configs/tiny.yaml")), torch.device("cpu"))
    assert not model.visual.transformer.grad_checkpointing and not model.transformer.grad_checkpointing
