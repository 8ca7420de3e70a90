"""How the chunks of a rank's sample streams become its batch: joined per loader worker, merged in
the main process without a copy for one worker, the same batches and resume under any worker count."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flip_scale.config import DataConfig
from flip_scale.data import build_train_loader, train_tokenizer
from flip_scale.data.chunks import join_chunks, merge_chunks, stack_rows

IMAGE = 8


def write_shards(directory, shards: int, per_shard: int) -> list[str]:
    paths = []
    for s in range(shards):
        path = directory / f"c-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                pixels = np.random.default_rng(s * per_shard + i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, format="PNG")
                for suffix, data in (("png", buffer.getvalue()), ("txt", f"a red circle {i}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{i}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer([f"a red circle {i}" for i in range(40)], tmp_path_factory.mktemp("tok") / "tok",
                           vocab_size=48)


def chunk(stream: int, rows: int, position) -> dict:
    return {"images": torch.full((rows, 3, 2, 2), float(stream)), "tokens": torch.full((rows, 4), stream),
            "skipped": stream, "skipped_kinds": {"bad_caption": stream} if stream else {}, "samples": rows,
            "keys": [f"k{stream}_{i}" for i in range(rows)], "shards": ["a.tar"] * rows, "_stream": stream,
            "_position": position}


def test_join_keeps_stream_order_and_positions_and_one_chunk_is_not_copied():
    part = join_chunks([chunk(2, 3, (0, 3)), chunk(3, 3, (1, 0))])
    assert part["_streams"] == [2, 3] and part["_positions"] == [(0, 3), (1, 0)]
    assert part["images"][:, 0, 0, 0].tolist() == [2, 2, 2, 3, 3, 3] and part["samples"] == 6
    assert part["skipped"] == 5 and part["skipped_kinds"] == {"bad_caption": 5}
    assert part["keys"][2:4] == ["k2_2", "k3_0"]
    one = chunk(1, 4, (0, 4))
    joined = join_chunks([one])
    assert joined["images"] is one["images"] and joined["_streams"] == [1]  # no copy
    batch = merge_chunks([joined])
    assert batch["images"] is one["images"] and not any(name.startswith("_") for name in batch)
    assert batch["source_samples"] == {} and batch["source_skipped"] == {}
    merged = merge_chunks([join_chunks([chunk(0, 2, (0, 2))]), part])
    assert merged["images"][:, 0, 0, 0].tolist() == [0, 0, 2, 2, 2, 3, 3, 3] and merged["samples"] == 8


def test_batches_and_resume_alike_with_one_two_or_no_workers(tmp_path, tokenizer_path):
    shards = write_shards(tmp_path, 4, 6)

    def loader(workers):
        cfg = DataConfig(train_shards=shards, tokenizer=tokenizer_path, num_workers=workers, shuffle_buffer=4,
                         streams=4, max_bad_fraction=1.0, bad_check_after=0)
        return build_train_loader(cfg, IMAGE, tokenizer_path, 0, 1, 8, seed=3)

    def take(one, batches):
        iterator = iter(one)
        return [next(iterator) for _ in range(batches)]

    reference = take(loader(0), 5)  # 40 samples: into the second epoch
    for workers in (1, 2):
        got = take(loader(workers), 5)
        for a, b in zip(reference, got):
            assert a["keys"] == b["keys"], workers
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"]), workers
            assert b["sample_index"].tolist() == list(range(8))
    # Every stream's position is recorded from the one part a worker hands over per batch.
    first = loader(1)
    take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    assert sorted(state["positions"]) == ["0", "1", "2", "3"]
    assert sum(drawn for _, drawn in state["positions"].values()) == 16
    for workers in (1, 2, 0):
        resumed = loader(workers)
        resumed.load_state_dict(state)
        assert [b["keys"] for b in take(resumed, 3)] == [b["keys"] for b in reference[2:5]], workers


class _StackInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        rows = [torch.full((3, 2, 2), float(i)) for i in range(4)]
        stacked = stack_rows(rows)
        # Chunks hold lists of rows: a part stacks them once.
        part = join_chunks([dict(chunk(0, 1, (0, 1)), images=rows[:1]), dict(chunk(1, 3, (0, 3)), images=rows[1:])])
        yield stacked, stacked.is_shared(), part["images"]


def test_rows_are_stacked_once_and_in_a_worker_into_shared_memory():
    rows = [torch.full((3, 2, 2), float(i)) for i in range(4)]
    assert not stack_rows(rows).is_shared()  # the main process: a plain stack
    stacked, shared, images = next(iter(torch.utils.data.DataLoader(_StackInWorker(), batch_size=None,
                                                                    num_workers=1)))
    assert shared and torch.equal(stacked, torch.stack(rows)) and torch.equal(images, torch.stack(rows))
