"""Shards read through webdataset's opener: `pipe:` commands and `http://` from a local server
give the same training as local files, resume mid-epoch exactly, and a remote shard that fails is
a counted bad shard after `data.shard_retries` tries (flip_scale/data/urls.py, shards.py)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

from flip_scale.metrics import read_jsonl
from flip_scale.train import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def http_root(synthetic_dir):
    """`synthetic_dir` served over HTTP on loopback (Python's http.server, in a thread)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(synthetic_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _train(run_dir, data_dir, shards: str, steps: int = 4, resume: bool = False) -> list[float]:
    args = ["--run-dir", str(run_dir), *(["--resume", "auto"] if resume else []),
            f"data.train_shards={shards}", f"data.tokenizer={data_dir}/tokenizer.model", "data.num_workers=0", "data.synthetic=false",
            "data.shuffle_buffer=64", "train.global_batch_size=16", f"train.max_steps={steps}",
            "train.log_every_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "eval.at_end=false"]
    main(args)
    return [record["loss"] for record in read_jsonl(run_dir / "metrics.jsonl")]


def test_pipe_and_http_shards_train_like_local_files_and_resume_exactly(tmp_path, synthetic_dir, http_root):
    pattern = "train-{000000..000007}.tar"
    local = _train(tmp_path / "local", synthetic_dir, f"{synthetic_dir}/{pattern}")
    assert len(local) == 4
    for name, shards in [("pipe", f"pipe:cat {synthetic_dir}/{pattern}"), ("http", f"{http_root}/{pattern}")]:
        run_dir = tmp_path / name
        assert _train(run_dir, synthetic_dir, shards) == local, name
        # Resume mid-epoch (64 of 4096 samples) from the step-2 checkpoint: the same steps 3 and 4.
        step4 = next(run_dir.rglob("step_00000004"))
        shutil.rmtree(step4)
        (run_dir / "metrics.jsonl").unlink()
        resumed = _train(run_dir, synthetic_dir, shards, resume=True)
        assert resumed == local[2:], name


def test_failing_command_and_http_404_are_counted_bad_shards_after_retries(tmp_path, synthetic_dir, http_root,
                                                                            caplog, monkeypatch):
    import logging

    from flip_scale.config import DataConfig
    from flip_scale.data import Tokenizer, build_train_loader
    from flip_scale.data import shards as shards_module

    monkeypatch.setattr(shards_module, "RETRY_DELAY_S", 0.0)
    good = f"{synthetic_dir}/train-000000.tar"
    # A command that fails in the middle of its first read (half the shard, then exit 1) and works
    # when run again: the retry goes on after the samples already given, none lost or repeated.
    marker = tmp_path / "failed-once"
    flaky = f"pipe:if [ -e {marker} ]; then cat {good}; else touch {marker}; head -c 300000 {good}; exit 1; fi"
    shards = f"{good}::pipe:false::{http_root}/no-such-shard.tar::{flaky}"
    cfg = DataConfig(train_shards=shards, tokenizer=f"{synthetic_dir}/tokenizer.model", num_workers=0,
                     shuffle_buffer=0, max_bad_fraction=1.0, bad_check_after=0, shard_retries=2, streams=1)
    loader = build_train_loader(cfg, 32, Tokenizer(cfg.tokenizer), 0, 1, 64, seed=0, epochs=1)
    with caplog.at_level(logging.WARNING, logger="flip_scale.data"):
        batches = list(loader)  # the run goes on
    keys = [key for batch in batches for key in batch["keys"]]
    local = [sample.key for sample in shards_module.read_tar_samples(good)]
    assert sorted(keys) == sorted(local + local)  # both readings of the good shard, whole
    assert sum(b["skipped"] for b in batches) == 2  # pipe:false and the 404, after their retries
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "retrying (1 of data.shard_retries=2)" in text and "failed-once" in text
    for name in ("pipe:false", "no-such-shard.tar"):
        assert any(name in r.getMessage() and "after 3 tries" in r.getMessage() for r in caplog.records), name


def test_shard_urls_expand_and_missing_local_files_fail_at_start(tmp_path):
    import importlib

    from flip_scale.data import expand_shards
    from flip_scale.data import urls

    assert urls.gopen is importlib.import_module("webdataset.gopen").gopen  # every shard is opened by webdataset's opener
    shards = expand_shards("pipe:aws s3 cp s3://b/{00..02}.tar -::https://h/x-{0..1}.tar", check_exists=True)
    assert shards == [f"pipe:aws s3 cp s3://b/{i:02d}.tar -" for i in range(3)] + ["https://h/x-0.tar",
                                                                                  "https://h/x-1.tar"]
    (tmp_path / "a-0.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* missing: .*a-1.tar"):
        expand_shards(f"{tmp_path}/a-{{0..1}}.tar::file:{tmp_path}/a-0.tar")
    with pytest.raises(FileNotFoundError, match="b-0.tar"):
        expand_shards(f"file:{tmp_path}/b-0.tar")
    with pytest.raises(ValueError, match=r"pipe:aws s3 cp s3://b/0.tar -"):
        expand_shards("s3://b/0.tar")
