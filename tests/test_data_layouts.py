"""The default `data.streams` is chosen from the data, so a fresh run with the same config draws the
same batches under every data-parallel size that divides it: the losses of one process, dp_shard=2,
dp_shard=2 x tp=2 and pp=2 x dp_shard=2 agree (flip_scale/data/loader.py, `default_streams`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from dist_utils import run_distributed

from flip_scale.data.loader import data_streams, default_streams, stream_note
from flip_scale.metrics import read_jsonl

pytestmark = pytest.mark.slow


def _mixture(data_dir: Path) -> str:
    """Two sources over the synthetic shards (0-5 and 6-7) at weights 0.75 / 0.25."""
    return (f'data.sources=[{{shards: "{data_dir}/train-{{000000..000005}}.tar", weight: 0.75, name: big}}, '
            f'{{shards: "{data_dir}/train-{{000006..000007}}.tar", weight: 0.25, name: small}}]')


def _args(data_dir: Path, run_dir: Path, *layout: str) -> list[str]:
    return ["--run-dir", str(run_dir), f"data.synthetic_dir={data_dir}",
            f"data.train_shards={data_dir}/train-{{000000..000007}}.tar", f"data.tokenizer={data_dir}/tokenizer.model",
            "train.max_steps=3", "train.global_batch_size=32", "train.log_every_steps=1", "checkpoint.every_steps=3",
            "data.num_workers=0", "eval.at_end=false", "logging.tensorboard=false", *layout]


def _ranks(rank: int, world: int, runs: list) -> None:
    import flip_scale.train as train

    train.shutdown = lambda: None  # the process group belongs to run_distributed
    for argv in runs:  # several layouts in one process group, one after the other
        assert train.main(argv) == 0


def _losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_jsonl(run_dir / "metrics.jsonl")]


def test_a_fresh_default_run_logs_the_same_losses_under_every_layout(tmp_path, synthetic_dir, capfd):
    from flip_scale.train import main

    main(_args(synthetic_dir, tmp_path / "one"))
    out, err = capfd.readouterr()
    assert "8 sample streams (chosen from the 8 shards and the batch of 32): a fresh run under data-parallel " \
           "sizes 1, 2, 4, 8 draws these same batches" in out + err
    one = _losses(tmp_path / "one")
    run_distributed(_ranks, 2, args=([_args(synthetic_dir, tmp_path / "dp2", "parallel.dp_shard=2")],))
    # A two-source mixture in one process, and resumed from its step-2 checkpoint.
    mix = _args(synthetic_dir, tmp_path / "mix", _mixture(synthetic_dir), "checkpoint.every_steps=2",
                "data.synthetic=false")
    main(mix)
    mixed = read_jsonl(tmp_path / "mix" / "metrics.jsonl")
    assert [r["source_big_samples"] + r["source_small_samples"] for r in mixed] == [32, 64, 96]
    assert mixed[-1]["source_small_samples"] < mixed[-1]["source_big_samples"]
    assert mixed[-1]["source_big_skipped"] == mixed[-1]["source_small_skipped"] == 0
    state = json.loads((tmp_path / "mix" / "step_00000002" / "trainer_state.json").read_text())
    assert state["source_counts"] == {k: v for k, v in mixed[1].items() if k.startswith("source_")}
    resumed = tmp_path / "mix_resumed"
    shutil.copytree(tmp_path / "mix", resumed)
    shutil.rmtree(resumed / "step_00000003")
    (resumed / "metrics.jsonl").unlink()
    main(["--resume", "auto", *_args(synthetic_dir, resumed, _mixture(synthetic_dir), "checkpoint.every_steps=2",
                                     "data.synthetic=false")])
    assert read_jsonl(resumed / "metrics.jsonl") [-1:][0]["loss"] == mixed[-1]["loss"]
    assert {k: v for k, v in read_jsonl(resumed / "metrics.jsonl")[-1].items() if k.startswith("source_")} == \
        {k: v for k, v in mixed[-1].items() if k.startswith("source_")}

    run_distributed(_ranks, 4, args=([
        _args(synthetic_dir, tmp_path / "tp", "parallel.dp_shard=2", "parallel.tp=2"),
        _args(synthetic_dir, tmp_path / "pp", "parallel.pp=2", "parallel.dp_shard=2", "parallel.microbatches=2"),
        _args(synthetic_dir, tmp_path / "mix_tp", _mixture(synthetic_dir), "data.synthetic=false",
              "parallel.dp_shard=2", "parallel.tp=2"),
    ],))
    for name, want in (("dp2", one), ("tp", one), ("pp", one), ("mix_tp", [r["loss"] for r in mixed])):
        losses = _losses(tmp_path / name)
        assert len(losses) == 3 and all(math.isclose(a, b, rel_tol=2e-5) for a, b in zip(losses, want)), \
            (name, losses, want)
    assert read_jsonl(tmp_path / "mix_tp" / "metrics.jsonl")[-1]["source_small_samples"] == \
        mixed[-1]["source_small_samples"]  # counted over the data-parallel ranks


def test_default_stream_counts_and_what_the_note_says():
    assert data_streams(8, 128) == 8 and data_streams(41408, 65536) == 256 and data_streams(3, 96) == 3
    assert data_streams(100, 96) == 96 and data_streams(1, 7) == 1
    # Every data-parallel size dividing the data's count gets it; others the least common multiple.
    assert [default_streams(dp, 2, 128 // dp, 8) for dp in (1, 2, 4, 8)] == [8, 8, 8, 8]
    assert default_streams(16, 2, 8, 8) == 16
    assert default_streams(3, 2, 32, 8) == 24 and default_streams(5, 1, 5, 8) == 5  # lcm does not divide 25
    assert "the data gives 8" in stream_note(24, 8, 96, True)
    assert "data.streams): runs under data-parallel sizes 1, 2, 3, 6" in stream_note(6, 8, 96, False)
