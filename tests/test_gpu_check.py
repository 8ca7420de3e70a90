"""tools/gpu_check.py --smoke: the GPU check's own code path on the CPU (tiny model), every section
in its JSON with numbers and booleans."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_gpu_check_smoke_reports_every_section():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--smoke", "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mode"] == "smoke" and report["skipped"] == [] and report["pass"] is True
    sections = report["sections"]
    assert set(sections) == {"flash", "host_syncs", "bf16_vs_fp32", "deepspeed", "throughput", "openclip", "memory",
                             "batch_search"}
    for name in ("flash", "host_syncs"):
        assert sections[name]["pass"] is None and "not applicable on CPU" in sections[name]["note"]
    for name in ("bf16_vs_fp32", "deepspeed"):
        check = sections[name]
        assert check["pass"] is True, (name, check)
        assert all(_number(check[key]) for key in ("loss_rel_error", "update_rel_error")), check
        assert all(_number(value) for value in check["tolerance"].values())
    rows = sections["throughput"]["rows"]
    assert len(rows) == 3 and sections["throughput"]["skipped"] == []  # tiny x 3 mask ratios, uncompiled
    for row in rows:
        for key in ("images_per_s", "mfu", "peak_mem_bytes", "model_mem_bytes", "ratio_vs_openclip"):
            assert _number(row[key]) and row[key] > 0, (key, row)
    assert {row["mask_ratio"] for row in rows} == {0.0, 0.5, 0.75}
    assert len(sections["openclip"]["ratios"]) == 3 and all(_number(r) for r in sections["openclip"]["ratios"].values())
    assert sections["memory"]["pass"] is None and all(_number(r["ratio"]) for r in sections["memory"]["rows"])
    searched = sections["batch_search"]["largest_batch"]
    assert len(searched) == 6  # 3 mask ratios x activation checkpointing none / full
    for result in searched.values():  # no OOM on the CPU: the search stops at its bound
        assert result["largest"] == sections["batch_search"]["bound"] and result["bounded"] is True
    assert all(_number(s["seconds"]) for s in sections.values() if "seconds" in s)


def test_batch_search_catches_oom_and_bisects():
    """The largest batch below a fake memory limit: OOM raised above it is caught, the search doubles
    then bisects in multiples of its step, and stays within its bound and its number of tries."""
    import types

    sys.path.insert(0, str(REPO / "tools"))
    import torch

    from gpu_check_sections import largest_batch

    class FakeTrainer:
        arch = types.SimpleNamespace(image_size=2, vocab_size=8, context_length=2)
        def __init__(self):
            self.tried = []

        def train_step(self, batch):
            self.tried.append(len(batch["images"]))
            if len(batch["images"]) > 100:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

        def parameters(self):
            return [torch.nn.Parameter(torch.zeros(1))]

    trainer = FakeTrainer()
    result = largest_batch(trainer, torch.device("cpu"), start=8, bound=4096, step=4, max_tries=10)
    assert result == {"largest": 100, "tries": len(trainer.tried), "bounded": False}, (result, trainer.tried)
    assert trainer.tried[:5] == [8, 16, 32, 64, 128]
    assert largest_batch(FakeTrainer(), torch.device("cpu"), start=8, bound=64, step=4, max_tries=10)["largest"] == 64
    # A start above the limit (the memory model's guess too high) is halved, then the search goes on.
    trainer = FakeTrainer()
    result = largest_batch(trainer, torch.device("cpu"), start=256, bound=4096, step=4, max_tries=10, growth=1.5)
    assert trainer.tried[:3] == [256, 128, 64] and trainer.tried[3] == 96
    assert result["largest"] == 100 and result["tries"] == len(trainer.tried), (result, trainer.tried)
    never = FakeTrainer()
    never.train_step = lambda batch: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("fake"))
    assert largest_batch(never, torch.device("cpu"), start=64, bound=256, step=16, max_tries=10)["largest"] == 0


def test_a_failed_or_skipped_run_fails_the_report(monkeypatch):
    """One throughput run that raised (an inductor or OOM failure), or a run left out against the deadline,
    must not let the report say "all checks pass"."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check
    import gpu_check_sections as sections

    setup = gpu_check.smoke_setup()
    calls = []

    def run_config(args):
        calls.append(args.overrides)
        if len(calls) == 2:
            raise RuntimeError("inductor: no C compiler (fake)")
        return {"images_per_s": 1.0, "mfu": 0.5, "tflops_per_s_per_rank": 0.1, "peak_mem_bytes": 10,
                "mem_baseline_bytes": 4, "ratio": 1.0}

    monkeypatch.setattr(sections, "run_config", run_config)
    monkeypatch.setattr(sections, "model_memory", lambda config, overrides: 6)
    result = sections.throughput(setup, deadline=float("inf"))
    assert result["pass"] is False and len(result["rows"]) == 3
    assert result["rows"][1]["error"] == "RuntimeError: inductor: no C compiler (fake)"
    assert result["rows"][0]["peak_mem_bytes"] == 6  # the peak less what the process held before the run

    for name in ("flash_check", "host_syncs", "bf16_vs_fp32", "deepspeed_vs_native"):
        monkeypatch.setattr(sections, name, lambda setup: {"pass": True})
    monkeypatch.setattr(sections, "throughput", lambda setup, deadline: {"pass": True, "rows": [],
                                                                         "skipped": ["B/16 mask 0.75 compiled"]})
    monkeypatch.setattr(sections, "batch_search", lambda setup, deadline: {"pass": True, "skipped": []})
    report = gpu_check.run_sections(setup, total_budget=1000.0)
    assert report["skipped"] == ["throughput: B/16 mask 0.75 compiled"] and report["pass"] is False
