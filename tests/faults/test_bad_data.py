"""Dirty data: every kind of bad sample mixed into the shards is skipped and counted under its kind
(flip_scale/data/fields.py), the run finishes, and the per-kind counts kept in checkpoints are exact
before and after a resume between log steps."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from flip_scale.config import load_config
from flip_scale.data import Tokenizer, build_train_loader
from flip_scale.data.fields import SKIP_KINDS
from flip_scale.metrics import read_jsonl
from flip_scale.train import main

pytestmark = pytest.mark.slow

# One of each per epoch: what the shards below hold.
EXPECTED = {"undecodable_image": 1, "bad_caption": 2, "missing_field": 2, "bad_shard": 2, "small_image": 1}


def _png(index: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _dirty_shards(directory) -> str:
    good = [(f"g{i:03d}", {"png": _png(i), "txt": b"a red circle"}) for i in range(40)]
    bad = [
        ("tiny", {"png": _png(100, size=1), "txt": b"a red circle"}),  # decodes, but 1x1
        ("latin1", {"png": _png(101), "txt": "a caf\xe9 sign".encode("latin-1")}),  # not UTF-8
        ("empty", {"png": _png(102), "txt": b"   "}),  # empty caption
        ("noimage", {"txt": b"a red circle"}),  # no image
        ("nocaption", {"png": _png(103)}),  # no caption
        ("broken", {"png": b"\x89PNG not really", "txt": b"a red circle"}),  # does not decode
    ]
    _write(directory / "d-000000.tar", good[:20] + bad[:3] + good[20:23])
    _write(directory / "d-000001.tar", good[23:] + bad[3:])
    (directory / "d-000002.tar").write_bytes(b"")  # zero bytes
    (directory / "d-000003.tar").write_bytes(gzip.compress(b"this is not a tar archive" * 50))  # gzip, not tar
    return f"{directory}/d-{{000000..000003}}.tar"


def test_every_kind_of_bad_sample_is_counted_exactly_and_kept_across_a_resume(tmp_path, synthetic_dir):
    shards = _dirty_shards(tmp_path)
    overrides = [f"data.train_shards={shards}", f"data.tokenizer={synthetic_dir}/tokenizer.model",
                 "data.synthetic=false", "data.num_workers=0", "data.streams=1", "data.shuffle_buffer=16",
                 "data.min_image_size=4", "data.max_bad_fraction=1.0", "train.global_batch_size=16",
                 "train.max_steps=6", "train.log_every_steps=4", "checkpoint.every_steps=3", "checkpoint.keep_last=5",
                 "eval.at_end=false"]
    cfg = load_config(None, overrides)
    tokenizer = Tokenizer(cfg.data.tokenizer)

    # One pass over the data: exactly what was put in, per kind.
    one_pass = list(build_train_loader(cfg.data, 32, tokenizer, 0, 1, 16, seed=0, epochs=1))
    totals = {kind: sum(b["skipped_kinds"].get(kind, 0) for b in one_pass) for kind in SKIP_KINDS}
    assert totals == EXPECTED
    assert sum(b["samples"] for b in one_pass) == 40

    # The stream the trainer draws: its skipped samples per kind up to steps 3 and 6.
    stream = iter(build_train_loader(cfg.data, 32, tokenizer, 0, 1, 16, seed=cfg.train.seed))
    batches = [next(stream) for _ in range(6)]

    def upto(steps: int) -> dict:
        return {kind: sum(b["skipped_kinds"].get(kind, 0) for b in batches[:steps]) for kind in SKIP_KINDS}

    def saved(run_dir, step: int) -> dict:
        state = json.loads(next(run_dir.rglob(f"step_{step:08d}/trainer_state.json")).read_text())
        return {kind: state["skipped_by_kind"].get(kind, 0) for kind in SKIP_KINDS} | {"total": state["skipped_samples"]}

    run_dir = tmp_path / "run"
    main(["--run-dir", str(run_dir), *overrides])  # the run finishes
    for step in (3, 6):  # step 3 is a save between log steps (logged: 1, 4, 6)
        assert saved(run_dir, step) == upto(step) | {"total": sum(upto(step).values())}, step
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert last["step"] == 6 and last["skipped_samples"] == sum(upto(6).values())
    assert {kind: last[f"skipped_{kind}"] for kind in SKIP_KINDS} == upto(6)
    assert all(upto(6)[kind] >= 1 for kind in SKIP_KINDS)  # every kind was met

    # Resume from step 3 (between log steps): the same counts at step 6 as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(next(resumed.rglob("step_00000006")))
    (resumed / "metrics.jsonl").unlink()
    main(["--run-dir", str(resumed), "--resume", "auto", *overrides])
    assert saved(resumed, 6) == saved(run_dir, 6)
    again = read_jsonl(resumed / "metrics.jsonl")[-1]
    assert {k: v for k, v in again.items() if k.startswith("skipped_")} == \
        {k: v for k, v in last.items() if k.startswith("skipped_")}
