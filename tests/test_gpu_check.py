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
    assert set(sections) == {"flash", "bf16_vs_fp32", "deepspeed", "throughput", "openclip", "memory", "batch_search"}
    assert sections["flash"]["pass"] is None and "not applicable on CPU" in sections["flash"]["note"]
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
