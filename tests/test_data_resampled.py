"""Shards drawn with replacement (`data.resampled`, and per source in `data.sources`): the draws are
the same under every layout and resume exactly; per-epoch sampling (the default) is unchanged."""

from __future__ import annotations

import collections
import dataclasses
import tarfile

import pytest
import torch

from flip_scale.config import DataConfig
from flip_scale.data import Tokenizer, build_train_loader
from flip_scale.data.resume import data_state_for_resume
from flip_scale.data.shards import DataError, resampled_shards
from test_data_mixture import _source


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_dir):
    directory = tmp_path_factory.mktemp("resampled")
    a = _source(directory, "a", 4, 30)
    b = _source(directory, "b", 4, 10)
    cfg = DataConfig(train_shards=a, tokenizer=f"{synthetic_dir}/tokenizer.model", num_workers=0,
                     shuffle_buffer=16, max_bad_fraction=1.0, bad_check_after=0)
    return cfg, a, b, Tokenizer(f"{synthetic_dir}/tokenizer.model")


def _batches(cfg, tokenizer, dp: int, count: int, states=None, batch: int = 8):
    """`count` global batches (sample keys) under `dp` data-parallel ranks, and the loaders."""
    loaders = [build_train_loader(cfg, 8, tokenizer, r, dp, batch // dp, seed=0) for r in range(dp)]
    if states is not None:
        for loader in loaders:
            state, reason = data_state_for_resume(states, dict(loader.state_dict(), dp_size=dp))
            assert reason is None, reason
            loader.load_state_dict(state)
    iterators = [iter(loader) for loader in loaders]
    return [[key for it in iterators for key in next(it)["keys"]] for _ in range(count)], loaders


def test_resampled_shards_draw_with_replacement_and_deterministically():
    shards = [f"s{i}" for i in range(4)]

    def draws(stream=1, streams=4, salt="", count=400):
        return [[t.shard for t in resampled_shards(shards, d, 3, stream, streams, salt)] for d in range(count)]

    one = draws()
    assert one == draws() and all(len(d) == 1 for d in one)
    assert one != draws(stream=2) and one != draws(salt="coyo")
    counts = collections.Counter(d[0] for d in one)
    assert set(counts) == set(shards) and all(70 < n < 130 for n in counts.values()), counts  # ~100 each
    # With replacement: 400 independent draws from 4 shards repeat a shard back to back about 100
    # times (per epoch, at most once per pass boundary, under 100 in all).
    assert sum(a == b for a, b in zip(one, one[1:])) > 60
    # A draw reads as many shards as a per-epoch pass gives the stream: 8 shards over 2 streams, 4,
    # distinct within the draw (a shard read twice in one draw would repeat its crops), and the
    # two streams' draws overlap (drawn independently).
    shards = [f"s{i}" for i in range(8)]
    wide, other = draws(stream=0, streams=2, count=50), draws(stream=1, streams=2, count=50)
    assert all(len(d) == len(set(d)) == 4 for d in wide)
    assert any(set(a) & set(b) for a, b in zip(wide, other)) and len({tuple(sorted(d)) for d in wide}) > 20


def test_a_resampled_stream_is_the_same_under_every_layout_and_resumes_exactly(data, caplog):
    cfg, _, _, tokenizer = data
    cfg = dataclasses.replace(cfg, resampled=True)
    with caplog.at_level("INFO", logger="flip_scale.data"):
        one, _ = _batches(cfg, tokenizer, 1, 30)
    assert "sampling with replacement" in caplog.text
    assert _batches(cfg, tokenizer, 2, 30)[0] == one
    assert _batches(cfg, tokenizer, 4, 30)[0] == one
    assert _batches(dataclasses.replace(cfg, num_workers=2), tokenizer, 1, 30)[0] == one
    # 30 batches = 240 samples = two passes over the 120: drawn with replacement, the counts are
    # uneven (per epoch they are exactly 2 each).
    counts = collections.Counter(key for batch in one for key in batch)
    assert max(counts.values()) > 2 and min(counts.values()) < 2
    per_epoch, _ = _batches(dataclasses.replace(cfg, resampled=False), tokenizer, 1, 30)
    assert set(collections.Counter(key for batch in per_epoch for key in batch).values()) == {2}
    # Resume after 11 batches under dp 2 into dp 1 and dp 4: the next batches are the same.
    _, loaders = _batches(cfg, tokenizer, 2, 11)
    states = [loader.state_dict() for loader in loaders]
    assert states[0]["sampling"] == "resampled"
    assert _batches(cfg, tokenizer, 1, 19, states)[0] == one[11:]
    assert _batches(cfg, tokenizer, 4, 19, states)[0] == one[11:]


def test_copies_of_a_sample_in_one_batch_are_cropped_apart(data, tmp_path):
    """Two shards for four streams: streams often read the same shard in the same draw."""
    cfg, _, _, tokenizer = data
    cfg = dataclasses.replace(cfg, train_shards=_source(tmp_path, "c", 2, 30), resampled=True, streams=4)
    batches = iter(build_train_loader(cfg, 8, tokenizer, 0, 1, 8, seed=0))
    copies = 0
    for _ in range(20):
        batch = next(batches)
        rows: dict = {}
        for row, key in enumerate(batch["keys"]):
            rows.setdefault(key, []).append(row)
        for same in (r for r in rows.values() if len(r) > 1):
            copies += 1
            assert not torch.equal(batch["images"][same[0]], batch["images"][same[1]])
    assert copies > 0


def test_empty_or_bad_draws_are_skipped_and_only_a_run_of_them_stops_the_stream(data, tmp_path):
    cfg, _, _, tokenizer = data
    good = _source(tmp_path, "g", 3, 10)
    (tmp_path / "g-000003.tar").write_bytes(b"not a tar file")  # one bad shard among four
    cfg = dataclasses.replace(cfg, train_shards=good.replace("000002", "000003"), resampled=True, streams=1)
    batches = iter(build_train_loader(cfg, 8, tokenizer, 0, 1, 8, seed=0))
    keys = [key for _ in range(20) for key in next(batches)["keys"]]
    assert len(keys) == 160 and {key[:2] for key in keys} == {"g0", "g1", "g2"}
    with tarfile.open(tmp_path / "e-000000.tar", "w"):
        pass  # a shard with no sample
    empty = dataclasses.replace(cfg, train_shards=str(tmp_path / "e-000000.tar"))
    with pytest.raises(DataError, match="64 shard draws in a row .* every drawn shard was empty or held only bad"):
        next(iter(build_train_loader(empty, 8, tokenizer, 0, 1, 8, seed=0)))


def test_per_epoch_state_is_read_as_before_and_a_mode_change_restarts_with_the_reason(data):
    cfg, _, _, tokenizer = data
    _, loaders = _batches(cfg, tokenizer, 1, 5)
    state = loaders[0].state_dict()
    assert state["sampling"] == "epochs"
    # A checkpoint written before the key existed meant per-epoch sampling: it continues.
    old = {k: v for k, v in state.items() if k != "sampling"}
    assert data_state_for_resume([old], build_train_loader(cfg, 8, tokenizer, 0, 1, 8, seed=0).state_dict())[1] is None
    build_train_loader(cfg, 8, tokenizer, 0, 1, 8, seed=0).load_state_dict(old)
    fresh = build_train_loader(dataclasses.replace(cfg, resampled=True), 8, tokenizer, 0, 1, 8, seed=0)
    restarted, reason = data_state_for_resume([state], fresh.state_dict())
    assert "drawn another way (sampling epochs -> resampled)" in reason and "restarts at epoch 1" in reason
    assert "data.streams" not in reason  # the layout advice is for layout changes
    fresh.load_state_dict(restarted)
    for saved in (state, old):
        with pytest.raises(ValueError, match="sampling: saved epochs now resampled.*and sampling mode"):
            fresh.load_state_dict(saved)


def test_a_mixture_with_one_resampled_source(data):
    cfg, a, b, tokenizer = data
    sources = [{"shards": a, "weight": 0.75, "name": "laion"},
               {"shards": b, "weight": 0.25, "name": "coyo", "resampled": True}]
    cfg = dataclasses.replace(cfg, sources=sources, streams=4)
    one, loaders = _batches(cfg, tokenizer, 1, 30)
    assert loaders[0].state_dict()["sampling"] == "laion=epochs,coyo=resampled"
    keys = [key for batch in one for key in batch]
    laion = collections.Counter(k for k in keys if k.startswith("a"))
    assert len(laion) == 120 and set(laion.values()) <= {1, 2}  # per epoch: none seen a third time
    # Rows 2s, 2s+1 of each batch are stream s's, and a draw (or epoch) of a stream reads one coyo
    # shard of 10 samples: per epoch the four streams split the four shards in every round; drawn
    # with replacement, streams meet on a shard in some round.
    def rounds(batches):
        per_stream = [[k[:2] for batch in batches for k in batch[2 * s:2 * s + 2] if k.startswith("b")]
                      for s in range(4)]
        count = min(len(keys) for keys in per_stream) // 10
        return [{keys[10 * r] for keys in per_stream} for r in range(count)]

    long_run = _batches(cfg, tokenizer, 1, 80)[0]
    assert long_run[:30] == one and len(rounds(long_run)) >= 3
    assert any(len(shards) < 4 for shards in rounds(long_run))
    per_epoch = dataclasses.replace(cfg, sources=[sources[0], dict(sources[1], resampled=False)])
    assert all(len(shards) == 4 for shards in rounds(_batches(per_epoch, tokenizer, 1, 80)[0]))
    assert _batches(cfg, tokenizer, 2, 30)[0] == one
    _, loaders = _batches(cfg, tokenizer, 2, 13)
    assert _batches(cfg, tokenizer, 1, 17, [loader.state_dict() for loader in loaders])[0] == one[13:]
    # data.resampled is the default of the sources that do not say.
    every = build_train_loader(dataclasses.replace(cfg, resampled=True), 8, tokenizer, 0, 1, 8, seed=0)
    assert every.state_dict()["sampling"] == "laion=resampled,coyo=resampled"


def test_a_mode_change_of_one_source_restarts_only_that_source(data):
    """coyo turns from per-epoch to resampled at a resume (under another layout): laion's samples and the
    mixture's rows continue sample for sample, coyo starts at a draw index no stream had begun."""
    cfg, a, b, tokenizer = data
    sources = [{"shards": a, "weight": 0.75, "name": "laion"}, {"shards": b, "weight": 0.25, "name": "coyo"}]
    before = dataclasses.replace(cfg, sources=sources, streams=4)
    after = dataclasses.replace(cfg, sources=[sources[0], dict(sources[1], resampled=True)], streams=4)
    whole = _batches(before, tokenizer, 1, 20)[0]
    _, loaders = _batches(before, tokenizer, 2, 8)
    blobs = [loader.state_dict() for loader in loaders]
    fresh = build_train_loader(after, 8, tokenizer, 0, 1, 8, seed=0)
    state, reason = data_state_for_resume(blobs, fresh.state_dict())
    assert "drew 'coyo' another way (sampling epochs -> laion=epochs,coyo=resampled)" in reason
    assert "that source restarts at coyo draw 1" in reason and "laion" not in reason.split(":")[1].split("(")[0]
    assert all(p["sources"]["laion"] != [0, 0] and p["sources"]["coyo"] == [1, 0] for p in state["positions"].values())
    fresh.load_state_dict(state)
    it = iter(fresh)
    resumed = [list(next(it)["keys"]) for _ in range(12)]
    for got, want in zip(resumed, whole[8:]):
        assert [k[0] for k in got] == [k[0] for k in want]  # each row from the same source
        assert [k for k in got if k.startswith("a")] == [k for k in want if k.startswith("a")]  # laion continues
    coyo_seen = {k for batch in whole[:8] for k in batch if k.startswith("b")}
    assert {k for batch in resumed for k in batch if k.startswith("b")} - coyo_seen  # coyo is drawn afresh
    # A mode change of every source restarts every source (the rows still continue).
    every = dataclasses.replace(after, resampled=True, sources=[dict(s, resampled=True) for s in sources])
    _, reason = data_state_for_resume(blobs, build_train_loader(every, 8, tokenizer, 0, 1, 8, seed=0).state_dict())
    assert "drew 'laion', 'coyo' another way" in reason and "those sources restart" in reason


def test_a_mixture_warns_of_each_source_with_fewer_shards_than_streams(data, caplog):
    """Each source's shards are split over the streams on their own: 4 + 4 shards under 8 streams are
    two sources each read by two streams a shard (the union's 8 would say nothing), and the
    resampled one gets the with-replacement wording."""
    import logging

    from flip_scale.data import shards as shards_module

    cfg, a, b, tokenizer = data
    sources = [{"shards": a, "weight": 0.75, "name": "laion"},
               {"shards": b, "weight": 0.25, "name": "coyo", "resampled": True}]
    shards_module._warned_few_shards.clear()  # the warning is logged once per process
    with caplog.at_level(logging.WARNING, logger="flip_scale.data"):
        build_train_loader(dataclasses.replace(cfg, sources=sources, streams=8), 8, tokenizer, 0, 1, 8, seed=0)
    assert "only 4 shards in source 'laion' for data.streams=8 sample streams: each shard is shared" in caplog.text
    assert "only 4 shards in source 'coyo' for data.streams=8 sample streams drawing with replacement" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flip_scale.data"):
        build_train_loader(dataclasses.replace(cfg, sources=sources, streams=4), 8, tokenizer, 0, 1, 8, seed=0)
    assert "only" not in caplog.text  # 4 shards a source for 4 streams: each read once


def test_refusals(data):
    cfg, a, _, tokenizer = data
    with pytest.raises(ValueError, match="data.resampled must be true or false"):
        build_train_loader(dataclasses.replace(cfg, resampled="yes"), 8, tokenizer, 0, 1, 8, seed=0)
    with pytest.raises(ValueError, match=r"data.sources\[0\].resampled \(x\) must be true or false"):
        build_train_loader(dataclasses.replace(cfg, sources=[{"shards": a, "name": "x", "resampled": 1}]), 8,
                           tokenizer, 0, 1, 8, seed=0)
    with pytest.raises(ValueError, match="an endless stream: epochs must be None"):
        build_train_loader(dataclasses.replace(cfg, resampled=True), 8, tokenizer, 0, 1, 8, seed=0, epochs=1)


def test_the_dry_run_says_how_shards_are_drawn(capsys, monkeypatch, tmp_path):
    from flip_scale.train import main

    monkeypatch.chdir(tmp_path)
    assert main(["--dry-run", "data.resampled=true"]) == 0
    assert "data sampling: with replacement" in capsys.readouterr().out
    assert main(["--dry-run"]) == 0
    assert "data sampling: per epoch, without replacement" in capsys.readouterr().out


@pytest.mark.slow
def test_flip_train_with_resampled_shards_logs_the_same_losses_under_dp2_and_resumed(tmp_path, synthetic_dir):
    """Through the entry point users run: a resampled run in one process, under dp_shard=2, and
    resumed from its step-2 checkpoint, logs the same losses."""
    import json
    import shutil

    from dist_utils import run_distributed
    from test_data_layouts import _args, _losses, _ranks

    from flip_scale.train import main

    args = ("data.resampled=true", "checkpoint.every_steps=2")
    assert main(_args(synthetic_dir, tmp_path / "one", *args)) == 0
    one = _losses(tmp_path / "one")
    saved = [json.loads(p.read_text()) for p in (tmp_path / "one" / "step_00000002").rglob("data*.json")]
    assert saved and all(blob["sampling"] == "resampled" for blob in saved), saved
    run_distributed(_ranks, 2, args=([_args(synthetic_dir, tmp_path / "dp2", *args, "parallel.dp_shard=2")],))
    assert _losses(tmp_path / "dp2") == pytest.approx(one, abs=1e-4)
    per_epoch = tmp_path / "per_epoch"
    assert main(_args(synthetic_dir, per_epoch, "checkpoint.every_steps=2")) == 0
    assert _losses(per_epoch) != pytest.approx(one, abs=1e-4)  # other batches than per epoch
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", resumed)
    shutil.rmtree(resumed / "step_00000003")
    (resumed / "metrics.jsonl").unlink()
    assert main(["--resume", "auto", *_args(synthetic_dir, resumed, *args)]) == 0
    assert _losses(resumed)[-1] == pytest.approx(one[-1], abs=1e-6)
