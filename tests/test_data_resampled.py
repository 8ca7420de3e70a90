"""Shards drawn with replacement (`data.resampled`, and per source in `data.sources`): the draws are
the same under every layout and resume exactly; per-epoch sampling (the default) is unchanged."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from flip_scale.config import DataConfig
from flip_scale.data import Tokenizer, build_train_loader
from flip_scale.data.resume import data_state_for_resume
from flip_scale.data.shards import resampled_shards
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
    draws = [resampled_shards(shards, d, seed=3, stream=1)[0].shard for d in range(400)]
    assert draws == [resampled_shards(shards, d, seed=3, stream=1)[0].shard for d in range(400)]
    assert draws != [resampled_shards(shards, d, seed=3, stream=2)[0].shard for d in range(400)]
    counts = collections.Counter(draws)
    assert set(counts) == set(shards) and all(70 < n < 130 for n in counts.values()), counts  # ~100 each
    # With replacement: some shard comes again before every shard has been drawn once.
    first_four = draws[:4]
    assert len(set(first_four)) < 4 or any(draws[i] == draws[i + 1] for i in range(20))


def test_a_resampled_stream_is_the_same_under_every_layout_and_resumes_exactly(data, caplog):
    cfg, _, _, tokenizer = data
    cfg = dataclasses.replace(cfg, resampled=True)
    with caplog.at_level("INFO", logger="flip_scale.data"):
        one, _ = _batches(cfg, tokenizer, 1, 30)
    assert "sampling with replacement" in caplog.text
    assert _batches(cfg, tokenizer, 2, 30)[0] == one
    # 30 batches = 240 samples = two passes over the 120: drawn with replacement, the counts are
    # uneven (per epoch they would be exactly 2 each).
    counts = collections.Counter(key for batch in one for key in batch)
    assert max(counts.values()) > 2 and min(counts.values()) < 2
    per_epoch, _ = _batches(dataclasses.replace(cfg, resampled=False), tokenizer, 1, 30)
    assert set(collections.Counter(key for batch in per_epoch for key in batch).values()) == {2}
    # Resume after 11 batches under dp 2 into dp 1: the next batches are the same.
    _, loaders = _batches(cfg, tokenizer, 2, 11)
    states = [loader.state_dict() for loader in loaders]
    assert states[0]["sampling"] == "resampled"
    assert _batches(cfg, tokenizer, 1, 19, states)[0] == one[11:]


def test_per_epoch_state_is_read_as_before_and_a_mode_change_restarts_with_the_reason(data):
    cfg, _, _, tokenizer = data
    _, loaders = _batches(cfg, tokenizer, 1, 5)
    state = loaders[0].state_dict()
    assert state["sampling"] == "epochs"
    # A checkpoint written before the key existed meant per-epoch sampling: it continues.
    old = {k: v for k, v in state.items() if k != "sampling"}
    assert data_state_for_resume([old], build_train_loader(cfg, 8, tokenizer, 0, 1, 8, seed=0).state_dict())[1] is None
    fresh = build_train_loader(dataclasses.replace(cfg, resampled=True), 8, tokenizer, 0, 1, 8, seed=0)
    restarted, reason = data_state_for_resume([state], fresh.state_dict())
    assert "sampling epochs -> resampled" in reason and "restarts at epoch 1" in reason
    fresh.load_state_dict(restarted)
    with pytest.raises(ValueError, match="sampling: saved epochs now resampled"):
        fresh.load_state_dict(state)


def test_a_mixture_with_one_resampled_source(data):
    cfg, a, b, tokenizer = data
    sources = [{"shards": a, "weight": 0.75, "name": "laion"},
               {"shards": b, "weight": 0.25, "name": "coyo", "resampled": True}]
    cfg = dataclasses.replace(cfg, sources=sources)
    one, loaders = _batches(cfg, tokenizer, 1, 30)
    assert loaders[0].state_dict()["sampling"] == "laion=epochs,coyo=resampled"
    keys = [key for batch in one for key in batch]
    laion = collections.Counter(k for k in keys if k.startswith("a"))
    coyo = collections.Counter(k for k in keys if k.startswith("b"))
    assert len(laion) == 120 and set(laion.values()) <= {1, 2}  # per epoch: none seen a third time
    assert len(coyo) < 40 or max(coyo.values()) - min(coyo.values()) > 1  # resampled: uneven
    assert _batches(cfg, tokenizer, 2, 30)[0] == one
    _, loaders = _batches(cfg, tokenizer, 2, 13)
    assert _batches(cfg, tokenizer, 1, 17, [loader.state_dict() for loader in loaders])[0] == one[13:]
    # data.resampled is the default of the sources that do not say.
    every = build_train_loader(dataclasses.replace(cfg, resampled=True), 8, tokenizer, 0, 1, 8, seed=0)
    assert every.state_dict()["sampling"] == "laion=resampled,coyo=resampled"


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
