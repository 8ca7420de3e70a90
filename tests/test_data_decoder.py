"""data.image_decoder=torchvision: the same crop boxes and flips as the Pillow path, nearly the same
pixels, other formats through Pillow, corrupt images counted, refused by the config when misspelt."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from flip_scale.data.transforms import TrainTransform, decode_image

pytest.importorskip("torchvision")
from flip_scale.data.torchvision_decode import TorchvisionTrainPath  # noqa: E402


def encoded(fmt: str, size=(120, 90)) -> bytes:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    coarse.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])  # BMP: torchvision.io cannot read it, Pillow does
def test_torchvision_path_matches_the_pillow_path(fmt):
    transform = TrainTransform(32)
    path = TorchvisionTrainPath(transform)
    data = encoded(fmt)
    image, size = path.decode(data)
    assert image.dtype == torch.uint8 and image.shape == (3, 90, 120) and size == (120, 90)
    for seed in range(6):
        ours = path(image, random.Random(seed))
        pillow = transform(decode_image(data), random.Random(seed))
        assert ours.shape == pillow.shape == (3, 32, 32) and ours.dtype == torch.float32
        # Same box and flip: only the resampling differs (a wrong box or flip differs by far more).
        assert (ours - pillow).abs().mean() < 0.05, seed
    assert torch.equal(path(image, random.Random(1)), path(image, random.Random(1)))


def test_undecodable_bytes_raise_and_the_config_refuses_other_decoders():
    path = TorchvisionTrainPath(TrainTransform(16))
    with pytest.raises(Exception):
        path.decode(b"not an image at all")
    import pickle

    again = pickle.loads(pickle.dumps(path))  # as a loader worker receives it
    image, _ = again.decode(encoded("JPEG"))
    assert torch.equal(again(image, random.Random(0)), path(image, random.Random(0)))
    from flip_scale.config import load_config

    with pytest.raises(Exception, match="image_decoder"):
        load_config(None, ["data.image_decoder=turbo"])


def test_the_loader_with_the_torchvision_decoder_draws_the_same_samples(tmp_path):
    import tarfile

    from flip_scale.config import DataConfig
    from flip_scale.data import build_train_loader, train_tokenizer

    tokenizer = train_tokenizer([f"a field {i}" for i in range(30)], tmp_path / "tok", vocab_size=40)
    shard = tmp_path / "d-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(10):
            for suffix, data in (("jpg", encoded("JPEG", (40 + i, 36))), ("txt", f"a field {i}".encode())):
                info = tarfile.TarInfo(f"k{i:02d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("k99.jpg")  # corrupt: counted as undecodable, as with Pillow
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\xff\xd8no"))
        info = tarfile.TarInfo("k99.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))

    def batches(decoder, workers):
        cfg = DataConfig(train_shards=[str(shard)], tokenizer=str(tokenizer), num_workers=workers, shuffle_buffer=4,
                         streams=1, image_decoder=decoder, max_bad_fraction=1.0, bad_check_after=0)
        return list(build_train_loader(cfg, 16, str(tokenizer), 0, 1, 4, seed=0, epochs=1))

    pillow, tv = batches("pillow", 0), batches("torchvision", 1)
    assert [b["keys"] for b in tv] == [b["keys"] for b in pillow] and sum(len(b["keys"]) for b in tv) == 10
    assert sum(b["skipped_kinds"].get("undecodable_image", 0) for b in tv) == 1
    for a, b in zip(pillow, tv):
        assert b["images"].shape == a["images"].shape and (a["images"] - b["images"]).abs().mean() < 0.05
