"""Data pipeline: tokenizer, transforms, shard stream (bad input, rank split, resume), eval loader, synthetic data."""

import io
import json
import logging
import os
import random
import tarfile
import threading

import numpy as np
from typing import Optional

import pytest
import torch
from PIL import Image

from flip_scale.config import DataConfig
from flip_scale.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DataError,
    Tokenizer,
    TrainStream,
    assign_shards,
    build_train_loader,
    ensure_synthetic_data,
    expand_shards,
    train_tokenizer,
    write_synthetic_dataset,
)
from flip_scale.evaluation.datasets import build_eval_loader
from flip_scale.data import shards as shards_module, synthetic, tokenizer as tokenizer_module
from flip_scale.data.transforms import EvalTransform, TrainTransform, random_resized_crop_box

IMAGE = 8  # model image size in these tests: small keeps them fast
WORDS = "red green blue yellow circle square triangle cross on a photo of background".split()


# ----------------------------------------------------------------------------- helpers


def png_bytes(index: int, size: int = 12) -> bytes:
    """A small PNG whose colour encodes `index` (so images of different samples differ)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path, samples):
    """samples: list of (key, {field: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_sample(key: str, index: int, label=None):
    fields = {"png": png_bytes(index), "txt": f"a {WORDS[index % 4]} {WORDS[4 + index % 4]}".encode()}
    if label is not None:
        fields["cls"] = str(label).encode()
    return key, fields


def write_good_shards(directory, shards: int, per_shard: int, prefix="s"):
    paths = []
    for s in range(shards):
        samples = [good_sample(f"{prefix}{s}_{i}", s * per_shard + i) for i in range(per_shard)]
        paths.append(write_shard(directory / f"{prefix}-{s:06d}.tar", samples))
    return paths


def data_cfg(shards, tokenizer_path="", **changes) -> DataConfig:
    values = dict(train_shards=shards, tokenizer=tokenizer_path, num_workers=0, shuffle_buffer=8,
                  max_bad_fraction=1.0, bad_check_after=0)
    values.update(changes)
    return DataConfig(**values)


def take(loader, batches: int) -> list:
    iterator = iter(loader)
    return [next(iterator) for _ in range(batches)]


def keys_of(batches) -> list:
    return [key for batch in batches for key in batch["keys"]]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    captions = [f"a {c} {s} on a {b} background" for c in WORDS[:4] for s in WORDS[4:8] for b in ("black", "white")]
    captions += ["a photo of a red circle"] * 5
    return train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tok", vocab_size=64)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path, context_length=12)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_bos_eos_padding_and_ids(tokenizer):
    tokens = tokenizer(["a red circle", "A RED Circle", "blue"])
    assert tokens.dtype == torch.long and tokens.shape == (3, 12)
    pieces = tokenizer.encode("a red circle")
    n = len(pieces)
    assert tokens[0, 0] == BOS_ID and tokens[0, n + 1] == EOS_ID
    assert tokens[0, 1 : n + 1].tolist() == pieces
    assert (tokens[0, n + 2 :] == PAD_ID).all()
    assert torch.equal(tokens[0], tokens[1])  # lower-cased before encoding
    # Special ids never appear as pieces, and every id is inside the vocabulary.
    assert all(p > EOS_ID for p in pieces)
    assert int(tokens.max()) < tokenizer.vocab_size


def test_tokenizer_cut_keeps_eos_and_vocab_size(tokenizer, tokenizer_path):
    long_caption = " ".join(["red green blue yellow"] * 10)
    row = tokenizer([long_caption])[0]
    assert row[0] == BOS_ID and row[-1] == EOS_ID and (row != PAD_ID).all()
    assert row[1:-1].tolist() == tokenizer.encode(long_caption)[:10]
    import sentencepiece

    assert tokenizer.vocab_size == sentencepiece.SentencePieceProcessor(model_file=tokenizer_path).get_piece_size()
    assert tokenizer.vocab_size <= 64
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(tokenizer_path, context_length=1)


def test_tokenizer_missing_file_names_path_and_tool(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer(str(missing))
    assert str(missing) in str(error.value) and "train_tokenizer.py" in str(error.value)


def test_tokenizer_pickles_and_cli_reads_txt_and_shards(tmp_path, tokenizer):
    import pickle

    clone = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(clone(["a red circle"]), tokenizer(["a red circle"]))
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\n")
    shard = write_shard(tmp_path / "c-000000.tar", [good_sample(f"k{i}", i) for i in range(4)])
    status = tokenizer_module.main([str(captions), str(tmp_path / "c-{000000..000000}.tar"), "--vocab-size", "40",
                                    "--out", str(tmp_path / "cli.model")])
    path = str(tmp_path / "cli.model")
    assert status == 0 and Tokenizer(path).vocab_size <= 40
    assert os.path.isfile(shard)


def test_console_scripts_exit_zero_on_success(tmp_path):
    """The installed commands run sys.exit(main()): main must return an exit status, 0 on success."""
    import subprocess
    import sys

    out = tmp_path / "shapes"
    made = subprocess.run([sys.executable, "-c", "import sys; from flip_scale.data.synthetic import main; sys.exit(main())",
                           "--out", str(out), "--train-samples", "16", "--eval-samples", "8", "--train-shards", "2"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    trained = subprocess.run([sys.executable, "-c", "import sys; from flip_scale.data.tokenizer import main; sys.exit(main())",
                              str(out / "captions.txt"), "--vocab-size", "40", "--out", str(tmp_path / "t.model")],
                             capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "t.model").is_file()


@pytest.mark.parametrize("main", [tokenizer_module.main, synthetic.main])
def test_cli_help_has_example(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "example" in capsys.readouterr().out


# ----------------------------------------------------------------------------- transforms


def test_train_transform_shape_dtype_and_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    colour = (10, 128, 250)
    image = Image.new("RGB", (30, 20), colour)
    out = TrainTransform(IMAGE, mean=mean, std=std)(image, random.Random(0))
    assert out.shape == (3, IMAGE, IMAGE) and out.dtype == torch.float32
    for channel in range(3):
        expected = (colour[channel] / 255 - mean[channel]) / std[channel]
        assert torch.allclose(out[channel], torch.full((IMAGE, IMAGE), expected), atol=1e-5)


def test_train_transform_is_deterministic_for_a_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8))
    transform = TrainTransform(IMAGE)
    first = transform(image, random.Random(7))
    assert torch.equal(first, transform(image, random.Random(7)))
    assert any(not torch.equal(first, transform(image, random.Random(seed))) for seed in range(8, 12))


def test_random_resized_crop_respects_scale_and_aspect():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(64, 48, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        width, height = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 64 and bottom <= 48
        assert 0.5 * 64 * 48 * 0.9 <= width * height <= 64 * 48
        assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1


def test_eval_transform_resizes_short_side_and_center_crops():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (8, 0, 32, 20))  # white centre half: what a center crop keeps
    out = EvalTransform(IMAGE, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert out.shape == (3, IMAGE, IMAGE)
    assert out[:, :, 1:-1].min() > 0.95  # bicubic may ring at the border columns only


# ----------------------------------------------------------------------------- shard stream


def test_expand_shards_braces_lists_and_missing(tmp_path):
    write_good_shards(tmp_path, 3, 1, prefix="e")
    assert expand_shards(str(tmp_path / "e-{000000..000002}.tar")) == [str(tmp_path / f"e-{i:06d}.tar") for i in range(3)]
    assert len(expand_shards([str(tmp_path / "e-000000.tar"), str(tmp_path / "e-{000001..000002}.tar")])) == 3
    with pytest.raises(FileNotFoundError, match="2 of 5 shards") as error:
        expand_shards(str(tmp_path / "e-{000000..000004}.tar"))
    assert "e-000003.tar" in str(error.value) and "e-000004.tar" in str(error.value)


def write_dirty_shards(tmp_path):
    """Shard A: 6 good + corrupt image + empty caption + no caption + no image; shard B: 4 good, then cut."""
    good = [good_sample(f"a{i}", i) for i in range(6)]
    bad = [
        ("bad_corrupt", {"png": b"this is not an image", "txt": b"a red circle"}),
        ("bad_empty", {"png": png_bytes(90), "txt": b"  \n "}),
        ("bad_nocaption", {"png": png_bytes(91)}),
        ("bad_noimage", {"txt": b"a blue square"}),
    ]
    shard_a = write_shard(tmp_path / "dirty-000000.tar", good[:3] + bad[:2] + good[3:] + bad[2:])
    shard_b = write_shard(tmp_path / "dirty-000001.tar", [good_sample(f"b{i}", 10 + i) for i in range(5)])
    with tarfile.open(shard_b) as tar:
        cut_member = [m for m in tar.getmembers() if m.name == "b4.png"][0]
    with open(shard_b, "r+b") as f:  # the tar now ends in the middle of b4.png
        f.truncate(cut_member.offset_data + cut_member.size // 2)
    good_keys = {f"a{i}" for i in range(6)} | {f"b{i}" for i in range(4)}
    return [shard_a, shard_b], good_keys, 5


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, tokenizer, caplog):
    shards, good_keys, bad = write_dirty_shards(tmp_path)
    loader = build_train_loader(data_cfg(shards), IMAGE, tokenizer, 0, 1, 3, seed=0, epochs=1)
    with caplog.at_level(logging.WARNING, logger="flip_scale.data"):
        batches = list(loader)
    keys = keys_of(batches)
    assert sorted(keys) == sorted(good_keys)  # exactly the good samples, each once
    assert sum(b["skipped"] for b in batches) == bad
    assert sum(b["samples"] for b in batches) == len(good_keys)
    assert all(b["images"].shape == (b["samples"], 3, IMAGE, IMAGE) and b["tokens"].shape == (b["samples"], 12)
               for b in batches)
    reasons = " ".join(r.getMessage() for r in caplog.records)
    for reason in ("undecodable image", "empty caption", "no caption", "no image", "truncated shard"):
        assert reason in reasons


def test_too_many_bad_samples_raise_data_error(tmp_path, tokenizer):
    shards, _, _ = write_dirty_shards(tmp_path)
    loader = build_train_loader(data_cfg(shards, max_bad_fraction=0.1, bad_check_after=5), IMAGE, tokenizer, 0, 1, 3,
                                seed=0)
    with pytest.raises(DataError) as error:
        take(loader, 20)
    message = str(error.value)
    assert "data.max_bad_fraction=0.1" in message and "data.bad_check_after" in message
    # Under a looser limit, judged after one epoch (5 bad of 15), the same stream runs.
    loose = build_train_loader(data_cfg(shards, max_bad_fraction=0.6, bad_check_after=15), IMAGE, tokenizer, 0, 1, 3,
                               seed=0)
    assert len(take(loose, 8)) == 8


def test_a_stream_with_nothing_usable_stops_with_a_clear_error(tmp_path, tokenizer, caplog):
    not_a_tar = tmp_path / "junk-000000.tar"
    not_a_tar.write_bytes(b"junk" * 100)
    corrupt = write_shard(tmp_path / "junk-000001.tar", [("c0", {"png": b"junk", "txt": b"a red circle"})])
    for shards in ([str(not_a_tar)], [corrupt]):
        loader = build_train_loader(data_cfg(shards), IMAGE, tokenizer, 0, 1, 2, seed=0)
        with caplog.at_level(logging.WARNING, logger="flip_scale.data"), pytest.raises(DataError, match="no usable"):
            take(loader, 1)
    assert "cannot open shard" in caplog.text and "undecodable image" in caplog.text


def test_rank_streams_are_disjoint_cover_the_epoch_and_reproduce(tmp_path, tokenizer):
    shards = write_good_shards(tmp_path, 4, 6)
    all_keys = {f"s{s}_{i}" for s in range(4) for i in range(6)}
    cfg = data_cfg(shards)

    def epoch_keys(rank, seed):
        return keys_of(build_train_loader(cfg, IMAGE, tokenizer, rank, 2, 4, seed=seed, epochs=1))

    rank0, rank1 = epoch_keys(0, seed=3), epoch_keys(1, seed=3)
    assert len(rank0) == len(set(rank0)) == 12 and len(rank1) == len(set(rank1)) == 12
    assert not set(rank0) & set(rank1) and set(rank0) | set(rank1) == all_keys
    assert epoch_keys(0, seed=3) == rank0  # same seed, same order
    assert epoch_keys(0, seed=4) != rank0  # another seed, another order
    # The endless stream starts with the same epoch, then goes on with a reshuffled one.
    endless = keys_of(take(build_train_loader(cfg, IMAGE, tokenizer, 0, 2, 4, seed=3), 6))
    assert endless[:12] == rank0 and len(set(endless[12:])) == 12 and set(endless) <= all_keys


def test_fewer_shards_than_streams_share_shards_disjointly(tmp_path, tokenizer, caplog):
    shards = write_good_shards(tmp_path, 2, 10)
    cfg = data_cfg(shards, num_workers=2, streams=4)
    transform = TrainTransform(IMAGE)
    seen = []
    shards_module._warned_few_shards.clear()  # the warning is logged once per process
    with caplog.at_level(logging.WARNING, logger="flip_scale.data"):
        build_train_loader(cfg, IMAGE, tokenizer, 0, 2, 4, seed=0)  # 2 ranks, 4 streams
    assert "only 2 shards for data.streams=4 sample streams" in caplog.text
    for stream_id in range(4):
        stream = TrainStream(shards, cfg, transform, tokenizer, [stream_id], 4, 4, seed=0, num_workers=0, epochs=1)
        keys = keys_of(stream.iter_stream(stream_id))
        assert len(keys) == 5  # each of the 4 streams keeps every 2nd sample of one shard
        seen.extend(keys)
    assert sorted(seen) == sorted(f"s{s}_{i}" for s in range(2) for i in range(10))
    # With enough shards every stream gets whole shards, disjoint within the epoch.
    tasks = [assign_shards(list("abcdefgh"), 5, 0, 0, 1, stream, 4) for stream in range(4)]
    assert sorted(t.shard for ts in tasks for t in ts) == list("abcdefgh") and all(len(ts) == 2 for ts in tasks)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_stream(tmp_path, tokenizer, workers):
    shards = write_good_shards(tmp_path, 4, 6)
    with tarfile.open(shards[1], "a") as tar:  # one corrupt image: fast-forward must step over it alike
        info = tarfile.TarInfo("zz_corrupt.png")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"bogus"))
        info = tarfile.TarInfo("zz_corrupt.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"a red"))
    cfg = data_cfg(shards, num_workers=workers, shuffle_buffer=4)
    loader = build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 6, seed=1)  # workers 2: 2 streams of 3 per batch
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON, as the trainer stores it
    expected = [next(iterator) for _ in range(6)]  # crosses an epoch boundary (24 samples, batch 6)
    del iterator

    resumed = build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 6, seed=1)
    resumed.load_state_dict(state)
    got = take(resumed, 6)
    for a, b in zip(expected, got):
        assert a["keys"] == b["keys"] and a["skipped"] == b["skipped"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
    assert sum(b["skipped"] for b in expected) >= 1
    assert resumed.state_dict()["batches"] == 9
    # The position belongs to the streams, not to the workers: another worker count continues alike.
    other = build_train_loader(data_cfg(shards, num_workers=1 if workers == 0 else 0, shuffle_buffer=4,
                                        streams=loader.total_streams), IMAGE, tokenizer, 0, 1, 6, seed=1)
    other.load_state_dict(state)
    assert [b["keys"] for b in take(other, 6)] == [b["keys"] for b in expected]
    # Another seed or shard list has no such position.
    with pytest.raises(ValueError, match="seed: saved 1 now 2"):
        build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 6, seed=2).load_state_dict(state)


def _global_batches(cfg, tokenizer, dp_size: int, global_batch: int, batches: int, state: Optional[list] = None):
    """The global batches of `batches` steps: every rank's batch, in rank order, concatenated."""
    loaders = [build_train_loader(cfg, IMAGE, tokenizer, rank, dp_size, global_batch // dp_size, seed=5)
               for rank in range(dp_size)]
    if state is not None:
        merged = dict(state[0], positions={k: v for one in state for k, v in one["positions"].items()})
        for loader in loaders:
            loader.load_state_dict(merged)
    per_rank = [take(loader, batches) for loader in loaders]
    steps = [{"keys": [k for rank in per_rank for k in rank[step]["keys"]],
              "images": torch.cat([rank[step]["images"] for rank in per_rank]),
              "sample_index": torch.cat([rank[step]["sample_index"] for rank in per_rank])} for step in range(batches)]
    return steps, [loader.state_dict() for loader in loaders]


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batch_is_the_same_under_every_data_parallel_size(tmp_path, tokenizer, workers):
    """data.streams fixes the global batch row for row: dp 1, 2 and 4 (any worker count) draw the
    same samples with the same augmentation, and a position saved under dp 4 continues under dp 2."""
    shards = write_good_shards(tmp_path, 8, 5)
    cfg = data_cfg(shards, num_workers=workers, streams=4, shuffle_buffer=4)
    reference, _ = _global_batches(cfg, tokenizer, 1, 8, 7)  # 56 samples: into the second epoch
    assert len({k for step in reference for k in step["keys"]}) == 40  # the whole first epoch, then more
    for dp_size in (2, 4):
        steps, _ = _global_batches(cfg, tokenizer, dp_size, 8, 7)
        for got, want in zip(steps, reference):
            assert got["keys"] == want["keys"], dp_size
            assert torch.equal(got["images"], want["images"]), dp_size
            # Each sample's row of the global batch (its mask is drawn from it): rank r holds rows
            # r*B/dp .. (r+1)*B/dp - 1, so the concatenation is 0 .. B-1 under every layout.
            assert got["sample_index"].tolist() == want["sample_index"].tolist() == list(range(8)), dp_size
    # Stop after 3 steps under dp 4, continue under dp 2 (and under dp 1): the same next batches.
    _, saved = _global_batches(cfg, tokenizer, 4, 8, 3)
    saved = json.loads(json.dumps(saved))
    for dp_size in (2, 1):
        steps, _ = _global_batches(cfg, tokenizer, dp_size, 8, 4, state=saved)
        assert [s["keys"] for s in steps] == [s["keys"] for s in reference[3:]], dp_size
    # A layout the stream count does not split is refused with the sizes that fit.
    with pytest.raises(ValueError, match=r"data.streams=4 is not divisible by the data-parallel size 3.*\[1, 2, 4\]"):
        build_train_loader(cfg, IMAGE, tokenizer, 0, 3, 4, seed=5)
    with pytest.raises(ValueError, match="global_batch_size=12 is not divisible by data.streams=8"):
        build_train_loader(data_cfg(shards, streams=8), IMAGE, tokenizer, 0, 2, 6, seed=5)


# ----------------------------------------------------------------------------- eval loader


def test_eval_loader_labels_order_and_rank_split(tmp_path):
    labelled = [good_sample(f"e{i:02d}", i, label=i % 3) for i in range(11)]
    labelled.insert(4, ("e_nolabel", {"png": png_bytes(50), "txt": b"x"}))  # skipped: no cls
    shard = write_shard(tmp_path / "ev-000000.tar", labelled)
    cfg = data_cfg(shard)

    def run(rank=0, size=1, workers=0):
        cfg.num_workers = workers
        batches = list(build_eval_loader(shard, IMAGE, cfg, 4, rank, size))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    images, labels = run()
    assert images.shape == (11, 3, IMAGE, IMAGE) and labels.tolist() == [i % 3 for i in range(11)]
    images_again, _ = run()
    assert torch.equal(images, images_again)  # no augmentation, same order
    parallel_images, parallel_labels = run(workers=2)
    assert torch.equal(parallel_images, images) and torch.equal(parallel_labels, labels)
    rank0, rank1 = run(0, 2), run(1, 2)
    assert torch.equal(rank0[0], images[0::2]) and torch.equal(rank1[0], images[1::2])


# ----------------------------------------------------------------------------- synthetic data


def read_samples(path):
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def test_synthetic_dataset_files_and_consistent_captions(tmp_path):
    out = write_synthetic_dataset(tmp_path, train_samples=40, eval_samples=12, image_size=32, seed=1)
    assert [os.path.basename(p) for p in out["train_shards"]] == [f"train-{i:06d}.tar" for i in range(8)]
    assert [os.path.basename(p) for p in out["eval_shards"]] == ["eval-000000.tar"]
    classnames = (tmp_path / "classnames.txt").read_text().split("\n")[:-1]
    templates = (tmp_path / "templates.txt").read_text().split("\n")[:-1]
    assert len(classnames) == len(synthetic.COLOURS) * len(synthetic.SHAPES) and "red circle" in classnames
    assert templates and all("{}" in t for t in templates)
    assert len((tmp_path / "captions.txt").read_text().splitlines()) == 40
    checked = 0
    for path in out["train_shards"] + out["eval_shards"]:
        for _key, fields in read_samples(path).items():
            params = json.loads(fields["json"])
            name = f"{params['colour']} {params['shape']}"
            caption = fields["txt"].decode()
            assert name in caption and name in classnames
            if "background" in caption or " on " in caption:
                assert params["background"] in caption
            image = Image.open(io.BytesIO(fields["png"])).convert("RGB")
            assert image.size == (32, 32)
            cx, cy = params["center"]
            assert image.getpixel((int(cx), int(cy))) == synthetic.COLOURS[params["colour"]]
            assert image.getpixel((0, 0)) == synthetic.BACKGROUNDS[params["background"]]
            if "cls" in fields:
                assert classnames[int(fields["cls"])] == name
            checked += 1
    assert checked == 52
    # Deterministic: the same seed writes the same bytes.
    again = write_synthetic_dataset(tmp_path / "again", train_samples=40, eval_samples=12, image_size=32, seed=1)
    assert open(again["train_shards"][3], "rb").read() == open(out["train_shards"][3], "rb").read()


def test_ensure_synthetic_data_writes_once_even_concurrently(tmp_path, caplog):
    directory = tmp_path / "syn"
    cfg = DataConfig(train_shards=f"{directory}/train-{{000000..000007}}.tar", tokenizer=f"{directory}/tok.model",
                     synthetic=True, synthetic_dir=str(directory), synthetic_train_samples=48,
                     synthetic_eval_samples=8)
    results, errors = [], []

    def call():
        try:
            results.append(ensure_synthetic_data(cfg, image_size=32, vocab_size=96))
        except Exception as error:  # reported below
            errors.append(error)

    with caplog.at_level(logging.INFO, logger="flip_scale.data"):
        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and sorted(results) == [False, True]  # one wrote, the other found it done
    assert "data.synthetic: wrote 48 train samples" in caplog.text
    assert len(expand_shards(cfg.train_shards)) == 8 and (directory / "eval-000000.tar").is_file()
    assert Tokenizer(cfg.tokenizer).vocab_size <= 96
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging leftovers
    assert ensure_synthetic_data(cfg, image_size=32, vocab_size=96) is False
    cfg.train_shards = str(tmp_path / "elsewhere-{000000..000007}.tar")
    with pytest.raises(ValueError, match="data.train_shards"):
        ensure_synthetic_data(cfg, image_size=32, vocab_size=96)


def test_trainer_refuses_a_stream_count_the_batch_cannot_use_before_building(tmp_path):
    from flip_scale.config import ConfigError, load_config
    from flip_scale.distributed import ProcessInfo
    from flip_scale.train import Trainer

    cfg = load_config(None, ["data.streams=3", "train.global_batch_size=128", "train.device=cpu"])
    with pytest.raises(ConfigError, match="global_batch_size=128 is not divisible by data.streams=3"):
        Trainer(cfg, tmp_path, ProcessInfo(0, 1, 0, torch.device("cpu")), with_data=False)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written or built


def test_resume_where_only_bad_samples_are_left_in_the_epoch(tmp_path, tokenizer):
    """The epoch a resume starts in had usable samples before the resume point: that the rest of it
    is bad is no reason to stop (the uninterrupted stream does not stop either)."""
    samples = [good_sample(f"k{i}", i) for i in range(6)] + [(f"z{i}", {"png": b"bogus", "txt": b"a red"})
                                                             for i in range(3)]
    cfg = data_cfg([write_shard(tmp_path / "s-000000.tar", samples)], shuffle_buffer=1)
    loader = build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 3, seed=0)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(iterator)["keys"] for _ in range(2)]  # into the next epoch
    resumed = build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 3, seed=0)
    resumed.load_state_dict(state)
    assert [b["keys"] for b in take(resumed, 2)] == expected


def test_another_shard_list_of_the_same_length_is_not_continued(tmp_path, tokenizer):
    (tmp_path / "a").mkdir()
    first = write_good_shards(tmp_path / "a", 2, 4)
    other = write_good_shards(tmp_path / "a", 2, 4, prefix="t")
    loader = build_train_loader(data_cfg(first), IMAGE, tokenizer, 0, 1, 2, seed=0)
    take(loader, 1)
    with pytest.raises(ValueError, match="shards_digest"):
        build_train_loader(data_cfg(other), IMAGE, tokenizer, 0, 1, 2, seed=0).load_state_dict(loader.state_dict())


def test_lazy_images_are_located_then_read_when_needed(tmp_path):
    from flip_scale.data.fields import image_bytes
    from flip_scale.data.shards import MemberRef, read_tar_samples

    shard = write_shard(tmp_path / "l-000000.tar", [good_sample(f"k{i}", i) for i in range(3)])
    eager = list(read_tar_samples(shard))
    lazy = list(read_tar_samples(shard, lazy_images=lambda: True))
    assert all(isinstance(s.fields["png"], MemberRef) for s in lazy)
    assert [s.fields["txt"] for s in lazy] == [s.fields["txt"] for s in eager]  # captions are read
    assert [image_bytes(s) for s in lazy] == [image_bytes(s) for s in eager]
    # A reference past the end of a shard cut afterwards is an error the loader counts as bad.
    with open(shard, "r+b") as f:
        f.truncate(lazy[-1].fields["png"].offset + 10)
    with pytest.raises(EOFError, match="ends inside the image of 'k2'"):
        image_bytes(lazy[-1])


def test_compressed_shards_are_read_whole_even_when_lazy(tmp_path):
    """In a .tar.gz a member's offset is not a file position: images are read, never referenced."""
    from flip_scale.data.shards import MemberRef, read_tar_samples

    plain = write_shard(tmp_path / "p-000000.tar", [good_sample(f"k{i}", i) for i in range(2)])
    packed = tmp_path / "p-000000.tar.gz"
    with tarfile.open(plain) as src, tarfile.open(packed, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
    lazy = list(read_tar_samples(str(packed), lazy_images=lambda: True))
    assert lazy and not any(isinstance(s.fields["png"], MemberRef) for s in lazy)
    assert [s.fields["png"] for s in lazy] == [s.fields["png"] for s in read_tar_samples(plain)]


def test_batches_are_pinned_for_a_cuda_device_only(tmp_path, tokenizer, monkeypatch):
    """The trainer asks for page-locked batches (`pin_memory_for(its device)`) on CUDA, not on CPU;
    the loader hands the choice to torch's DataLoader (checked here without a GPU)."""
    from flip_scale.data import loader as loader_module
    from flip_scale.data.loader import pin_memory_for

    assert pin_memory_for("cuda") and pin_memory_for(torch.device("cuda", 1)) and not pin_memory_for("cpu")
    shards = write_good_shards(tmp_path, 2, 4)
    asked = []
    real = loader_module.DataLoader

    def recording(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real(*args, pin_memory=False, **kwargs)  # no CUDA here to pin for

    monkeypatch.setattr(loader_module, "DataLoader", recording)
    for device in ("cpu", "cuda:0"):
        loader = build_train_loader(data_cfg(shards), IMAGE, tokenizer, 0, 1, 2, seed=0,
                                    pin_memory=pin_memory_for(device))
        next(iter(loader))
    assert asked == [False, True]


def test_a_batch_joined_from_several_workers_is_joined_into_pinned_memory(tmp_path, tokenizer, monkeypatch):
    """With 2 workers a batch is joined from their parts: the DataLoader must not pin each part (the join
    would copy it into pageable memory again); the join writes into page-locked memory itself, so the
    trainer's non_blocking copy overlaps. Checked without a GPU: the pinned allocation is recorded."""
    from flip_scale.data import chunks as chunks_module
    from flip_scale.data import loader as loader_module

    shards = write_good_shards(tmp_path, 4, 8)
    asked, pinned = [], []
    real = loader_module.DataLoader

    def recording(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real(*args, pin_memory=False, **kwargs)

    def fake_pinned(shape, dtype):
        pinned.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(loader_module, "DataLoader", recording)
    monkeypatch.setattr(chunks_module, "pinned_empty", fake_pinned)
    cfg = data_cfg(shards, num_workers=2, streams=4)
    want = take(build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 4, seed=0), 2)
    got = take(build_train_loader(cfg, IMAGE, tokenizer, 0, 1, 4, seed=0, pin_memory=True), 2)
    assert asked == [False, False]
    assert pinned == [((4, 3, IMAGE, IMAGE), torch.float32), ((4, tokenizer.context_length), torch.long)] * 2
    for a, b in zip(want, got):  # the same batches either way
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
        assert a["keys"] == b["keys"]
