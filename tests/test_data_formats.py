"""Real shard formats: img2dataset's jpg + txt + json layout (`tools/make_synthetic_shards.py
--format laion`), captions from a JSON member (`data.caption_key=json:caption`), webp images, and
images below `data.min_image_size` counted as skipped (flip_scale/data/fields.py)."""

from __future__ import annotations

import json
import tarfile

import pytest

from flip_scale.config import DataConfig
from flip_scale.data import Tokenizer, build_train_loader
from flip_scale.data.fields import SampleFormat, caption_text, check_train_sample
from flip_scale.data.shards import RawSample
from flip_scale.data.synthetic import main as make_shards


def _make(out, *extra) -> str:
    make_shards(["--out", str(out), "--train-samples", "48", "--eval-samples", "4", "--train-shards", "2",
                 "--image-size", "32", *extra])
    return f"{out}/train-{{000000..000001}}.tar"


def _pass(shards, synthetic_dir, **changes) -> list[dict]:
    cfg = DataConfig(train_shards=shards, tokenizer=f"{synthetic_dir}/tokenizer.model", num_workers=0,
                     shuffle_buffer=8, max_bad_fraction=1.0, bad_check_after=0, **changes)
    return list(build_train_loader(cfg, 32, Tokenizer(cfg.tokenizer), 0, 1, 8, seed=0, epochs=1))


def test_laion_layout_json_captions_webp_and_small_images(tmp_path, synthetic_dir):
    laion = _make(tmp_path / "laion", "--format", "laion")
    with tarfile.open(tmp_path / "laion" / "train-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[2]).read())
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]  # as img2dataset writes them
    assert {"url", "caption", "key", "status", "width", "height"} <= set(meta) and meta["key"] == "000000000"

    from_txt = _pass(laion, synthetic_dir)
    from_json = _pass(laion, synthetic_dir, caption_key="json:caption")
    assert sum(b["samples"] for b in from_json) == 48 and sum(b["skipped"] for b in from_json) == 0
    for a, b in zip(from_txt, from_json):  # the same captions from either member
        assert a["keys"] == b["keys"] and a["tokens"].equal(b["tokens"]) and a["images"].equal(b["images"])

    webp = _make(tmp_path / "webp", "--format", "laion", "--image-format", "webp")
    assert tarfile.open(tmp_path / "webp" / "train-000001.tar").getnames()[0].endswith(".webp")
    batches = _pass(webp, synthetic_dir, caption_key="json:caption")
    assert sum(b["samples"] for b in batches) == 48 and batches[0]["images"].shape == (8, 3, 32, 32)

    # 16-pixel images among 32-pixel ones: the small ones are skipped and counted under their kind.
    make_shards(["--out", str(tmp_path / "small"), "--train-samples", "8", "--eval-samples", "0",
                 "--train-shards", "1", "--image-size", "16", "--format", "laion"])
    mixed = f"{laion}::{tmp_path}/small/train-000000.tar"
    batches = _pass(mixed, synthetic_dir, min_image_size=20, streams=1)  # one stream: it meets both kinds
    assert sum(b["samples"] for b in batches) == 48
    assert sum(b["skipped_kinds"].get("small_image", 0) for b in batches) == 8
    assert sum(b["skipped"] for b in batches) == 8


def test_caption_keys_json_paths_and_what_is_refused():
    def sample(**fields):
        return RawSample("s.tar", "k", {name: value.encode() if isinstance(value, str) else value
                                         for name, value in fields.items()})

    nested = SampleFormat.from_config(DataConfig(caption_key="json:meta.caption", image_keys="webp;jpg"))
    assert nested.image_keys == ("webp", "jpg") and nested.caption_field == "json"
    good = sample(jpg=b"x", json=json.dumps({"meta": {"caption": "  a  red\ncircle "}}))
    assert check_train_sample(good, nested) is None and caption_text(good, nested) == "a red circle"
    assert check_train_sample(sample(jpg=b"x", json='{"meta": {}}'), nested)[0] == "missing_field"
    assert check_train_sample(sample(jpg=b"x", json='{"meta": {"caption": 3}}'), nested)[0] == "bad_caption"
    assert check_train_sample(sample(jpg=b"x", json="not json"), nested)[0] == "bad_caption"
    assert check_train_sample(sample(jpg=b"x", txt="a caption"), nested)[0] == "missing_field"  # no json member
    assert check_train_sample(sample(png=b"x", json='{"meta": {"caption": "a"}}'), nested)[0] == "missing_field"
    assert check_train_sample(sample(png=b"x", txt=b"caf\xe9")) == ("bad_caption", "caption is not UTF-8")
    for bad in ({"caption_key": "json:"}, {"caption_key": ""}, {"image_keys": " ; "}):
        with pytest.raises(ValueError, match="data.caption_key|data.image_keys"):
            SampleFormat.from_config(DataConfig(**bad))
