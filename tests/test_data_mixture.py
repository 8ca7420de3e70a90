"""Weighted mixtures (`data.sources`, flip_scale/data/mixture.py): the sources' shares follow the
weights, the batches are the same under every data-parallel size, and the stream resumes exactly."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

from flip_scale.config import DataConfig
from flip_scale.data import Tokenizer, build_train_loader
from flip_scale.data.resume import data_state_for_resume


def _png(index: int) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _source(directory, prefix: str, shards: int, per_shard: int) -> str:
    for s in range(shards):
        with tarfile.open(directory / f"{prefix}-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                for name, data in (("png", _png(hash((prefix, s, i)) % 1000)), ("txt", b"a red circle")):
                    info = tarfile.TarInfo(f"{prefix}{s}_{i:04d}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{directory}/{prefix}-{{000000..{shards - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, synthetic_dir):
    directory = tmp_path_factory.mktemp("mix")
    sources = [{"shards": _source(directory, "a", 4, 60), "weight": 0.75, "name": "laion"},
               {"shards": _source(directory, "b", 4, 20), "weight": 0.25, "name": "coyo"}]
    return DataConfig(sources=sources, tokenizer=f"{synthetic_dir}/tokenizer.model", num_workers=0,
                      shuffle_buffer=16, max_bad_fraction=1.0, bad_check_after=0), Tokenizer(f"{synthetic_dir}/tokenizer.model")


def _global(cfg, tokenizer, dp: int, batches: int, states=None, batch: int = 8):
    loaders = [build_train_loader(cfg, 8, tokenizer, r, dp, batch // dp, seed=0) for r in range(dp)]
    if states is not None:
        for loader in loaders:
            state, reason = data_state_for_resume(states, dict(loader.state_dict(), dp_size=dp))
            assert reason is None
            loader.load_state_dict(state)
    iterators = [iter(loader) for loader in loaders]
    out = [[key for it in iterators for key in next(it)["keys"]] for _ in range(batches)]
    return out, loaders, iterators


def test_shares_follow_the_weights_and_are_counted(mixture):
    cfg, tokenizer = mixture
    loader = build_train_loader(cfg, 8, tokenizer, 0, 1, 8, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(400)]
    n = 400 * 8
    coyo = sum(b["source_samples"].get("coyo", 0) for b in batches)
    assert sum(b["source_samples"].get("laion", 0) for b in batches) + coyo == n
    assert coyo == sum(key.startswith("b") for b in batches for key in b["keys"])
    assert abs(coyo - 0.25 * n) < 4 * math.sqrt(n * 0.25 * 0.75), coyo  # binomial noise, 4 sigma
    # Each source runs through its own epochs: all of it is seen, the small one about ten times.
    keys = [key for b in batches for key in b["keys"]]
    assert len({k for k in keys if k.startswith("b")}) == 80 and len({k for k in keys if k.startswith("a")}) == 240


def test_same_batches_under_every_layout_and_exact_resume(mixture):
    cfg, tokenizer = mixture
    one, _, _ = _global(cfg, tokenizer, 1, 12)
    for dp in (2, 4):
        assert _global(cfg, tokenizer, dp, 12)[0] == one, dp
    # Resume after 7 batches under dp 2 into dp 1 and dp 4: the next 5 batches are the same.
    _, loaders, _ = _global(cfg, tokenizer, 2, 7)
    states = [loader.state_dict() for loader in loaders]
    for dp in (1, 4):
        assert _global(cfg, tokenizer, dp, 5, states)[0] == one[7:], dp
