"""A checkpoint written by the code before the checkpoint package (tests/fixtures/legacy_checkpoint:
2 ranks, parallel.dp_shard=2, step 2 of 4) resumes exactly under today's code: in one process,
re-sharded, its data streams merged, the steps after it give the uninterrupted run's numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flip_scale.metrics import read_jsonl

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint"
RTOL = 1e-4  # same machine kind and torch in CI; another process count sums in another order


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_code_resumes_exactly(tmp_path, synthetic_dir):
    from flip_scale.train import main

    expected = json.loads((FIXTURE / "expected.json").read_text())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(FIXTURE / "step_00000002", run_dir / "step_00000002")
    data = [f"data.synthetic_dir={synthetic_dir}", f"data.train_shards={synthetic_dir}/train-{{000000..000007}}.tar",
            f"data.tokenizer={synthetic_dir}/tokenizer.model"]
    assert main(["--run-dir", str(run_dir), "--resume", "auto", *data, *expected["overrides"]]) == 0
    got = {row["step"]: row for row in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(got) == [row["step"] for row in expected["uninterrupted_steps"]] == [3, 4]  # resumed at step 2
    for want in expected["uninterrupted_steps"]:
        row = got[want["step"]]
        assert row["samples_seen"] == want["samples_seen"]
        assert row["lr"] == pytest.approx(want["lr"], rel=1e-9)
        for key in ("loss", "grad_norm", "logit_scale"):
            assert row[key] == pytest.approx(want[key], rel=RTOL), (want["step"], key)
    # The checkpoint it wrote has the files the old code wrote for one rank.
    written = sorted(p.name for p in (run_dir / "step_00000004").iterdir())
    assert written == [".metadata", "__0_0.distcp", "config.yaml", "data_rank0.json", "rng_rank0.pt",
                       "trainer_state.json"]
