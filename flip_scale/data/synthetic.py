"""Synthetic, learnable image-text data: one coloured shape on a plain background, with captions.

Each image shows one of 4 shapes in one of 5 colours, at a random position and size, on a neutral
background (black, gray or white: never a shape colour, so "the red one" is always the shape). The
caption names colour, shape and often the background, in a few phrasings; zero-shot classes are
"<colour> <shape>" (20 classes, chance 5%) and the prompt templates reuse the caption phrasings.
A tiny FLIP learns this well above chance in minutes on a CPU.

Files written to `out_dir`:
    train-000000.tar ... train-000007.tar   samples <key>.png, <key>.txt, <key>.json (drawing parameters)
    eval-000000.tar                         held-out samples that also carry <key>.cls (class index)
    classnames.txt, templates.txt           for zero-shot evaluation
    captions.txt                            every training caption, one per line (tokenizer training)

    python tools/make_synthetic_shards.py --out data/synthetic --tokenizer-vocab 512
"""

from __future__ import annotations

import argparse
import hashlib
import fcntl
import io
import json
import logging
import sys
import math
import os
import random
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, ImageDraw

from .openclip_tokenizer import is_openclip
from .shards import derive_seed, expand_shards

log = logging.getLogger("flip_scale.data")

# Saturated colours far apart in RGB, so a 32-pixel crop still tells them apart.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")

CAPTIONS = (
    "a {colour} {shape} on a {background} background",
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
    "a picture of a {colour} {shape} on {background}",
    "an image of a {colour} {shape}",
    "a {background} background with a {colour} {shape}",
)
# Zero-shot prompts: the caption phrasings that do not name the background.
TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}")

DEFAULT_TRAIN_SHARDS = 8
# The shape's half-size as a fraction of the image side: big enough to survive a 50%-area crop.
RADIUS_RANGE = (0.2, 0.36)


def class_names() -> list[str]:
    """Zero-shot classes "<colour> <shape>"; the class index is colour_index * len(SHAPES) + shape_index."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw `shape` around (cx, cy) with half-size r; the centre pixel is always inside the shape."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.85 * r  # about the circle's area
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        bar = 0.33 * r
        draw.rectangle((cx - r, cy - bar, cx + r, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - r, cx + bar, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def make_sample(rng: random.Random, image_size: int, image_format: str = "png") -> tuple[bytes, str, dict]:
    """One random (image bytes, caption, parameters) triple; PNG (lossless) unless `image_format`."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    background = rng.choice(list(BACKGROUNDS))
    r = rng.uniform(*RADIUS_RANGE) * image_size
    cx = rng.uniform(r, image_size - r)
    cy = rng.uniform(r, image_size - r)
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLOURS[colour])
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)  # lossless: colours stay exact; level 1 is fast
    else:
        image.save(buffer, format=IMAGE_FORMATS[image_format], quality=90)
    caption = rng.choice(CAPTIONS).format(colour=colour, shape=shape, background=background)
    params = {
        "colour": colour, "shape": shape, "background": background, "center": [cx, cy], "radius": r,
        "class": list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape),
    }
    return buffer.getvalue(), caption, params


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same seed, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_split(out_dir: Path, split: str, count: int, num_shards: int, image_size: int, seed: int,
                 with_class: bool, layout: str = "shapes", image_format: str = "png") -> tuple[list[str], list[str]]:
    paths, captions = [], []
    per_shard = math.ceil(count / num_shards) if count else 0
    index = 0
    for shard_index in range(num_shards):
        path = out_dir / f"{split}-{shard_index:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(min(per_shard, count - index)):
                # One seed per sample: any sample can be regenerated alone.
                image, caption, params = make_sample(random.Random(derive_seed(seed, split, index)), image_size,
                                                     image_format)
                if layout == "laion":  # img2dataset: <shard><index in shard>.jpg/.txt/.json
                    key = f"{shard_index:05d}{index - shard_index * per_shard:04d}"
                    meta = {"url": f"https://example.invalid/{split}/{index}.{image_format}", "caption": caption,
                            "key": key, "status": "success", "error_message": None, "width": image_size,
                            "height": image_size, "original_width": image_size, "original_height": image_size,
                            "exif": None, "sha256": hashlib.sha256(image).hexdigest()}
                else:
                    key, meta = f"{split}{index:07d}", params
                _add_member(tar, f"{key}.{image_format}", image)
                _add_member(tar, f"{key}.txt", caption.encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
                if with_class:
                    _add_member(tar, f"{key}.cls", str(params["class"]).encode())
                captions.append(caption)
                index += 1
        paths.append(str(path))
    return paths, captions


def write_synthetic_dataset(out_dir: Union[str, os.PathLike], train_samples: int, eval_samples: int,
                            image_size: int = 64, seed: int = 0, samples_per_shard: Optional[int] = None,
                            train_shards: int = DEFAULT_TRAIN_SHARDS, layout: str = "shapes",
                            image_format: Optional[str] = None) -> dict:
    """Write the synthetic dataset (module docstring) into `out_dir`; returns the paths written.

    `layout="laion"` writes the members as img2dataset does for LAION / DataComp (`<key>.jpg`,
    `<key>.txt`, `<key>.json` with url, caption, key, status, sizes; 9-digit keys), in
    `image_format` (default png for "shapes", jpg for "laion"; webp too).

    Training samples are split over `train_shards` shards (8, as configs/tiny.yaml expects), or over
    as many as `samples_per_shard` needs; the evaluation samples go into one shard unless
    `samples_per_shard` is given. Deterministic: the same arguments write the same bytes.
    """
    if train_samples < 1 or eval_samples < 0:
        raise ValueError(f"need train_samples >= 1 and eval_samples >= 0, got {train_samples} and {eval_samples}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the shapes to be recognisable, got {image_size}")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if train_shards < 1:
        raise ValueError(f"train_shards must be >= 1, got {train_shards}")
    if layout not in ("shapes", "laion"):
        raise ValueError(f"layout must be 'shapes' or 'laion', got {layout!r}")
    image_format = image_format or ("jpg" if layout == "laion" else "png")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if samples_per_shard is not None:
        train_shards = math.ceil(train_samples / samples_per_shard)
        eval_shards = max(1, math.ceil(eval_samples / samples_per_shard))
    else:
        eval_shards = 1
    started = time.perf_counter()
    train_paths, captions = _write_split(out, "train", train_samples, train_shards, image_size, seed, False, layout,
                                         image_format)
    eval_paths, _ = _write_split(out, "eval", eval_samples, eval_shards, image_size, seed, True, layout, image_format)
    (out / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (out / "captions.txt").write_text("\n".join(captions) + "\n")
    log.info("wrote synthetic data to %s: %d train samples in %d shards, %d eval samples, %d px, %.1fs",
             out, train_samples, train_shards, eval_samples, image_size, time.perf_counter() - started)
    return {
        "train_shards": train_paths, "eval_shards": eval_paths, "classnames": str(out / "classnames.txt"),
        "templates": str(out / "templates.txt"), "captions": str(out / "captions.txt"),
    }


# ----------------------------------------------------------------------------- on-demand creation


@contextmanager
def _file_lock(path: Path):
    """An exclusive lock held for the block: concurrent processes on this host take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _expected_train_shards(data_cfg) -> tuple[list[str], int]:
    """The configured train shard paths, checked to be `synthetic_dir/train-NNNNNN.tar`, 0..n-1."""
    paths = expand_shards(data_cfg.train_shards, check_exists=False)
    directory = Path(data_cfg.synthetic_dir).resolve()
    expected = [str(directory / f"train-{i:06d}.tar") for i in range(len(paths))]
    if [str(Path(p).resolve()) for p in paths] != expected:
        raise ValueError(
            f"data.synthetic is true but data.train_shards={data_cfg.train_shards!r} does not name "
            f"'{data_cfg.synthetic_dir}/train-{{000000..{len(paths) - 1:06d}}}.tar'; point it at data.synthetic_dir "
            f"(e.g. '{data_cfg.synthetic_dir}/train-{{000000..000007}}.tar') or set data.synthetic=false"
        )
    return paths, len(paths)


def ensure_synthetic_data(data_cfg, image_size: int, vocab_size: int) -> bool:
    """With `data.synthetic`, write the synthetic shards and tokenizer where the config expects them
    unless they exist. Returns whether anything was written. A sentencepiece tokenizer is trained
    only where `data.tokenizer` names a model file; `openclip` needs none.

    Safe against concurrent calls: a lock file beside `synthetic_dir` serialises writers on a host,
    and every file is written under a temporary name and renamed, so a reader (or a writer on
    another host sharing the directory) never sees a half-written file.
    """
    if not data_cfg.synthetic:
        return False
    train_paths, num_shards = _expected_train_shards(data_cfg)
    tokenizer_path = Path(data_cfg.tokenizer)
    wants_model_file = not is_openclip(data_cfg.tokenizer)

    def missing() -> tuple[bool, bool]:
        return not all(os.path.isfile(p) for p in train_paths), wants_model_file and not tokenizer_path.is_file()

    if not any(missing()):
        return False
    directory = Path(data_cfg.synthetic_dir)
    with _file_lock(directory.with_name(directory.name + ".lock")):
        need_shards, need_tokenizer = missing()  # another process may have finished meanwhile
        if not (need_shards or need_tokenizer):
            log.info("data.synthetic: %s was written by another process meanwhile", directory)
            return False
        if need_shards:
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
            try:
                write_synthetic_dataset(
                    staging, data_cfg.synthetic_train_samples, data_cfg.synthetic_eval_samples,
                    image_size=max(64, image_size), seed=0, train_shards=num_shards,
                )
                directory.mkdir(parents=True, exist_ok=True)
                # Shards last: their presence is what says "done".
                for name in sorted(os.listdir(staging), key=lambda n: n.startswith("train-")):
                    os.replace(staging / name, directory / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("data.synthetic: wrote %d train samples (%d shards) and %d eval samples to %s",
                     data_cfg.synthetic_train_samples, num_shards, data_cfg.synthetic_eval_samples, directory)
        if need_tokenizer:
            from .tokenizer import iter_captions, train_tokenizer

            captions_file = directory / "captions.txt"
            sources = [str(captions_file)] if captions_file.is_file() else list(train_paths)
            path = train_tokenizer(iter_captions(sources), tokenizer_path, vocab_size)
            import sentencepiece

            size = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
            if size > vocab_size:  # hard_vocab_limit=false only ever shrinks; checked to be sure
                raise ValueError(f"the synthetic tokenizer {path} has {size} tokens, more than vocab_size={vocab_size}")
            log.info("data.synthetic: trained a %d-token tokenizer at %s", size, path)
    return True


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="make_synthetic_shards",
        description="Write synthetic coloured-shape webdataset shards (train + held-out eval with classes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/make_synthetic_shards.py --out data/synthetic --tokenizer-vocab 512\n"
            "  python tools/make_synthetic_shards.py --out /tmp/shapes --train-samples 100000 --samples-per-shard 5000 "
            "--image-size 224\n"
            "  python tools/make_synthetic_shards.py --out /tmp/laion --format laion --image-size 256  # jpg+txt+json"
        ),
    )
    parser.add_argument("--out", default="data/synthetic", help="output directory (default data/synthetic)")
    parser.add_argument("--train-samples", type=int, default=8192, help="training samples (default 8192)")
    parser.add_argument("--eval-samples", type=int, default=600, help="held-out samples with classes (default 600)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"number of training shards (default {DEFAULT_TRAIN_SHARDS}, as configs/tiny.yaml expects)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="samples per shard instead of a fixed shard count (eval is split the same way)")
    parser.add_argument("--format", choices=("shapes", "laion"), default="shapes",
                        help="member layout: shapes (png + txt + json drawing parameters, default) or laion (jpg + txt + "
                             "json metadata with the caption, as img2dataset writes)")
    parser.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default=None,
                        help="image encoding (default png for shapes, jpg for laion)")
    parser.add_argument("--tokenizer-vocab", type=int, default=0,
                        help="also train a tokenizer of at most this many tokens to OUT/tokenizer.model (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = write_synthetic_dataset(args.out, args.train_samples, args.eval_samples, image_size=args.image_size,
                                      seed=args.seed, samples_per_shard=args.samples_per_shard,
                                      train_shards=args.train_shards, layout=args.format,
                                      image_format=args.image_format)
    if args.tokenizer_vocab:
        from .tokenizer import iter_captions, train_tokenizer

        written["tokenizer"] = train_tokenizer(iter_captions([written["captions"]]),
                                               Path(args.out) / "tokenizer.model", args.tokenizer_vocab)
    for name, value in written.items():
        print(f"{name}: {value if isinstance(value, str) else ' '.join(value)}")
    return 0  # an exit status: console scripts run sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
