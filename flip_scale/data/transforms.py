"""Image transforms with PIL + numpy + torch only.

Train: RandomResizedCrop (area fraction `crop_scale_min`..`crop_scale_max` of the image, aspect
3/4..4/3, bicubic) to the model's size, random horizontal flip, normalise. Eval: resize the short
side (bicubic), center crop, normalise. All randomness comes from a `random.Random` the caller
passes in, so a stream of augmentations is reproducible from its seed alone (the data pipeline
seeds one per sample).
"""

from __future__ import annotations

import io
import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, min_size: int = 0, with_size: bool = False):
    """Bytes -> RGB PIL image; raises on undecodable data (the pipeline counts that as a bad sample).

    For JPEG, `draft` lets the decoder downscale by a power of two while keeping both sides at least
    `min_size`, which saves most of the decode time on images much larger than the model's input.
    `with_size`: (image, (width, height) as stored, before any downscaling).
    """
    image = Image.open(io.BytesIO(data))
    size = image.size
    if min_size > 0 and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))
    image = image.convert("RGB")
    return (image, size) if with_size else image


class Normalize:
    """PIL RGB image -> float32 tensor [3, H, W], (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got mean={list(mean)}, std={list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        self.scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(1, 1, 3)
        self.shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).reshape(1, 1, 3)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels * self.scale - self.shift
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop draws it:
    up to 10 tries at an area fraction in `scale` and a log-uniform aspect in `ratio`, else the
    largest center crop whose aspect lies in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return left, top, left + crop_w, top + crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


class TrainTransform:
    """RandomResizedCrop + random horizontal flip + normalise; `transform(image, rng)`."""

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop aspect ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.image_size = int(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.normalize = Normalize(mean, std)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, rng)
        # `box` makes PIL resample straight from the crop region, without an intermediate copy.
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self.normalize(image)


class EvalTransform:
    """Resize the short side to `image_size` (bicubic), center crop, normalise; `transform(image)`."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)
        self.normalize = Normalize(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.image_size
        width, height = image.size
        short = min(width, height)
        new_w, new_h = max(size, round(width * size / short)), max(size, round(height * size / short))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return self.normalize(image)


def build_train_transform(data_cfg, image_size: int) -> TrainTransform:
    return TrainTransform(
        image_size, scale=(data_cfg.crop_scale_min, data_cfg.crop_scale_max), hflip=data_cfg.hflip,
        mean=data_cfg.mean, std=data_cfg.std,
    )


def build_eval_transform(data_cfg, image_size: int) -> EvalTransform:
    return EvalTransform(image_size, mean=data_cfg.mean, std=data_cfg.std)
