"""`data.image_decoder: torchvision`: decode with libjpeg-turbo (torchvision.io) and crop on uint8 tensors.

The same crop boxes and flips as `TrainTransform` (the same draws from the same per-sample
`random.Random`), resampled by torchvision's bicubic resize with antialias instead of Pillow's: the
pixels differ slightly from the default Pillow path, so a run keeps one decoder. About 1.9x less CPU
per 224-pixel crop of a 500x400 JPEG than the Pillow path (BENCHMARKS.md). torchvision is optional:
it is imported only here, when this decoder is chosen. Formats torchvision.io cannot read are
decoded by Pillow and go on as tensors.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .transforms import TrainTransform, decode_image, random_resized_crop_box


class TorchvisionTrainPath:
    """bytes -> (uint8 [3,H,W], (width, height)) with `decode`; then `path(image, rng)` -> float [3,S,S]."""

    def __init__(self, transform: TrainTransform):
        try:
            from torchvision.io import ImageReadMode, decode_image as tv_decode_image
            from torchvision.transforms.v2 import functional as F
        except ImportError as error:
            raise ImportError(f"data.image_decoder=torchvision needs torchvision ({error}): pip install torchvision, "
                              f"or keep data.image_decoder=pillow") from None
        self.transform = transform
        self._decode, self._rgb, self._F = tv_decode_image, ImageReadMode.RGB, F
        # The same (x / 255 - mean) / std as the Pillow path's Normalize, per channel.
        self.scale = torch.from_numpy(transform.normalize.scale.reshape(3, 1, 1).copy())
        self.shift = torch.from_numpy(transform.normalize.shift.reshape(3, 1, 1).copy())

    def __getstate__(self):  # the torchvision functions are imported again in each loader worker
        return {"transform": self.transform}

    def __setstate__(self, state):
        self.__init__(state["transform"])

    def decode(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        try:
            image = self._decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=self._rgb)
        except RuntimeError:  # a format torchvision.io does not read: Pillow (raises on undecodable data)
            pixels = np.asarray(decode_image(data))
            image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return image, (int(image.shape[2]), int(image.shape[1]))

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        t = self.transform
        left, top, right, bottom = random_resized_crop_box(image.shape[2], image.shape[1], t.scale, t.ratio, rng)
        crop = self._F.resized_crop(image, top, left, bottom - top, right - left, [t.image_size, t.image_size],
                                    interpolation=self._F.InterpolationMode.BICUBIC, antialias=True)
        if t.hflip and rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop.float() * self.scale - self.shift
