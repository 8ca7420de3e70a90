"""A planted shard of noise images that all carry the same caption makes the loss spike once the
model has learned the real pairs: the spiking steps are written to RUN_DIR/spikes.jsonl with the
shard and key of every sample of their batch."""

import io
import json
import random
import tarfile

import pytest
from PIL import Image

from flip_scale.data.shards import assign_shards
from flip_scale.data.synthetic import _add_member, make_sample
from flip_scale.metrics import read_jsonl
from flip_scale.spikes import SpikeDetector
from flip_scale.train import main

BATCH = 16
NORMAL, PLANTED = 512, 32  # 32 steps of real pairs, then 2 of the planted shard


def _write_shard(path, count, planted: bool, prefix: str) -> str:
    rng = random.Random(7 if planted else 3)
    caption = make_sample(random.Random(0), 32)[1]
    with tarfile.open(path, "w") as tar:
        for index in range(count):
            image, text, _ = make_sample(rng, 32)
            if planted:  # noise, all with one caption
                noise = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
                buffer = io.BytesIO()
                noise.save(buffer, format="PNG")
                image, text = buffer.getvalue(), caption
            key = f"{prefix}{index:05d}"
            _add_member(tar, f"{key}.png", image)
            _add_member(tar, f"{key}.txt", text.encode())
    return str(path)


def test_a_spiking_batch_is_recorded_with_its_shard_and_keys(tmp_path, synthetic_dir):
    normal = _write_shard(tmp_path / "normal.tar", NORMAL, False, "good")
    planted = _write_shard(tmp_path / "planted.tar", PLANTED, True, "noise")
    shards = [normal, planted]
    # The seed whose epoch-0 order reads the real pairs first (one stream, shuffle buffer 1: in order).
    seed = next(s for s in range(100) if [t.shard for t in assign_shards(shards, 0, s, 0, 1, 0, 1)] == shards)
    run_dir = tmp_path / "run"
    steps = (NORMAL + PLANTED) // BATCH
    assert main(["--run-dir", str(run_dir), f"data.train_shards={json.dumps(shards)}",
                 f"data.tokenizer={synthetic_dir}/tokenizer.model", f"train.max_steps={steps}",
                 f"train.global_batch_size={BATCH}", f"train.seed={seed}", "data.streams=1", "data.num_workers=0",
                 "data.shuffle_buffer=1", "schedule.warmup_steps=0", "checkpoint.every_steps=0",
                 "train.log_every_steps=1", "eval.at_end=false", "logging.tensorboard=false", "train.device=cpu",
                 "train.spike_factor=1.15", "train.spike_window=8", "data.synthetic=false"]) == 0
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    spikes = read_jsonl(run_dir / "spikes.jsonl")
    print({s["step"]: (round(s["loss"], 3), round(s["median"], 3)) for s in spikes},
          {k: round(v, 3) for k, v in losses.items() if k > steps - 6})
    assert [s["step"] for s in spikes] == [steps - 1, steps]  # the planted shard's two batches, nothing else
    first = spikes[0]
    assert first["loss"] == pytest.approx(losses[steps - 1]) and first["loss"] > 1.15 * first["median"]
    assert first["factor"] == 1.15 and first["window"] == 8
    assert [s["key"] for s in first["samples"]] == [f"noise{i:05d}" for i in range(BATCH)]
    assert {s["shard"] for spike in spikes for s in spike["samples"]} == {planted}


def test_spike_detector_needs_a_full_window_and_is_off_by_default(tmp_path):
    path = tmp_path / "spikes.jsonl"
    off = SpikeDetector(0.0, 3, path, writes=True)
    assert not off.enabled and off.check(1, 100.0, {"keys": ["a"]}) is None
    detector = SpikeDetector(2.0, 3, path, writes=True)
    batch = {"keys": ["a", "b"], "shards": ["s0.tar", "s1.tar"]}
    assert [detector.check(step, loss, batch) for step, loss in enumerate([9.0, 1.0, 1.0], 1)] == [None] * 3
    assert detector.check(4, 1.9, batch) is None  # under 2 x the median 1.0
    record = detector.check(5, 2.5, batch)  # median of (1.0, 1.0, 1.9) is 1.0
    assert record["step"] == 5 and record["samples"] == [{"shard": "s0.tar", "key": "a"}, {"shard": "s1.tar", "key": "b"}]
    assert read_jsonl(path) == [record]


def test_a_non_finite_loss_stays_out_of_the_spike_history(tmp_path):
    detector = SpikeDetector(2.0, 3, tmp_path / "spikes.jsonl", writes=False)
    for step, loss in enumerate([1.0, float("nan"), 1.0, float("inf"), 1.0], 1):
        assert detector.check(step, loss, {"keys": ["a"]}) is None
    assert list(detector.history) == [1.0, 1.0, 1.0]
    assert detector.check(6, 2.5, {"keys": ["a"]})["median"] == 1.0
