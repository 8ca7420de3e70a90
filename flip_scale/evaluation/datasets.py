"""Evaluation datasets, each split over the data-parallel ranks (rank r: samples r, r + size, ...).

Classification (zero-shot):
  - an image folder `root/<class folder>/*.jpg` (also .jpeg .png .webp .bmp): the classes are the
    sorted folder names, or, with a class-names file, its lines in sorted-folder order (ImageNet
    style: folders named by synset id, the file holding readable names); images in sorted order;
  - webdataset shards whose samples carry an image and an integer class under `cls`
    (`build_eval_loader`); the class names come from a file.
Retrieval: webdataset shards of images with captions (`txt`), e.g. the synthetic eval shards.

Batches are dicts of tensors: images [B,3,H,W] plus labels [B], or tokens [B,T] and caption keys
[B] (`scoring.caption_key` of the caption text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..data.fields import caption_text, check_eval_sample, check_train_sample, class_index, image_bytes
from ..data.shards import BadSample, BadSampleTracker, RawSample, expand_shards, read_tar_samples
from ..data.transforms import EvalTransform, build_eval_transform, decode_image
from .scoring import caption_key
from .templates import load_classnames

log = logging.getLogger("flip_scale.evaluation")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def rank_samples(shards, check, rank: int, size: int, tracker: BadSampleTracker) -> Iterator[RawSample]:
    """The usable samples of `shards` in order (`check(sample)` -> a reason to skip it, or None),
    every `size`-th from the `rank`-th: rank r of an evaluation takes samples r, r + size, ...
    Unusable ones go to `tracker` (counted, logged) and take no place in the numbering."""
    usable = 0
    for shard in shards:
        for sample in read_tar_samples(shard):
            if isinstance(sample, BadSample):
                tracker.add_bad(sample)
                continue
            problem = check(sample)
            if problem is not None:
                tracker.add_bad(BadSample(sample.shard, sample.key, problem[1], problem[0]))
                continue
            usable += 1
            if (usable - 1) % size == rank:
                yield sample


def is_image_folder(spec: Union[str, Sequence[str]]) -> bool:
    return isinstance(spec, (str, Path)) and Path(spec).is_dir()


def image_folder_items(root: Union[str, Path]) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folder names, sorted; [(image path, class index)] in folder then file order)."""
    root = Path(root)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"image folder {root}: no class folders (expected {root}/<class name>/*.jpg)")
    items = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((str(p), label) for p in files)
    if not items:
        raise ValueError(f"image folder {root}: {len(folders)} class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return folders, items


class _FolderImages(Dataset):
    def __init__(self, items: Sequence[tuple[str, int]], transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            return self.transform(decode_image(Path(path).read_bytes())), label
        except Exception as error:  # a broken file is skipped and reported, as in the shard reader
            log.warning("skipped an evaluation image: %s (%s: %s)", path, type(error).__name__, error)
            return None


def _collate_images(rows) -> dict:
    rows = [row for row in rows if row is not None]
    if not rows:
        return {"images": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    return {"images": torch.stack([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows], dtype=torch.long)}


@dataclass
class ClassificationSet:
    """A labelled evaluation set: where it is, its class names, and this rank's batches."""

    source: Union[str, list]
    classnames: list[str]
    items: Optional[list] = None  # image folder: [(path, label)]; shards: None

    @property
    def kind(self) -> str:
        return "folder" if self.items is not None else "shards"

    def batches(self, image_size: int, data_cfg, batch_size: int, rank: int = 0, size: int = 1) -> Iterator[dict]:
        if self.items is not None:
            dataset = _FolderImages(self.items[rank::size], build_eval_transform(data_cfg, image_size))
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=max(0, int(data_cfg.num_workers)),
                                collate_fn=_collate_images)
            yield from loader
            return
        for images, labels in build_eval_loader(self.source, image_size, data_cfg, batch_size, rank, size):
            yield {"images": images, "labels": labels}


def open_classification(source: Union[str, list], classnames_file: str = "") -> ClassificationSet:
    """An image folder or `cls`-labelled shards (module docstring), with its class names."""
    if is_image_folder(source):
        folders, items = image_folder_items(source)
        names = folders
        if classnames_file:
            names = load_classnames(classnames_file)
            if len(names) != len(folders):
                raise ValueError(
                    f"{classnames_file} holds {len(names)} class names but {source} has {len(folders)} class folders; "
                    f"give one name per folder, in sorted folder order (or no names file: the folder names are used)"
                )
        return ClassificationSet(str(source), names, items)
    if not classnames_file:
        raise ValueError(
            f"zero-shot shards {source!r} need a class-names file (eval.classnames / --classnames), one name per "
            f"line in class-index order; an image folder (root/<class>/*.jpg) names its classes itself"
        )
    expand_shards(source)  # refuses missing shards now, with their names
    return ClassificationSet(source, load_classnames(classnames_file))


class CaptionStream(IterableDataset):
    """One deterministic pass over image-caption shards, split by rank, batched in the workers.

    The same scheme as `EvalStream` (which reads classes): usable samples are
    numbered in shard order, rank r takes every size-th starting at r, and DataLoader worker w
    builds batches w, w + W, ... so that the order does not depend on the number of workers.
    """

    def __init__(self, shards: Sequence[str], transform, tokenizer, batch_size: int, rank: int, size: int,
                 max_bad_fraction: float, bad_check_after: int):
        self.shards = list(shards)
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank, self.size = rank, size
        self.max_bad_fraction = max_bad_fraction
        self.bad_check_after = bad_check_after

    def _rank_samples(self, tracker: BadSampleTracker):
        return rank_samples(self.shards, check_train_sample, self.rank, self.size, tracker)

    def _batch(self, images: list, captions: list) -> dict:
        return {"images": torch.stack(images), "tokens": self.tokenizer(captions),
                "caption_keys": torch.tensor([caption_key(c) for c in captions], dtype=torch.long)}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tracker = BadSampleTracker(self.max_bad_fraction, self.bad_check_after, " (retrieval evaluation)")
        tracker.quiet = worker != 0
        images, captions = [], []
        for position, sample in enumerate(self._rank_samples(tracker)):
            if (position // self.batch_size) % workers != worker:
                continue
            try:
                images.append(self.transform(decode_image(image_bytes(sample))))
                captions.append(caption_text(sample))
            except Exception as error:
                log.warning("skipped a retrieval sample: %s key=%r: undecodable image (%s: %s)",
                            sample.shard, sample.key, type(error).__name__, error)
            if (position + 1) % self.batch_size == 0 and images:
                yield self._batch(images, captions)
                images, captions = [], []
        if images:
            yield self._batch(images, captions)


def caption_batches(shards: Union[str, Sequence[str]], image_size: int, data_cfg, tokenizer, batch_size: int,
                    rank: int = 0, size: int = 1) -> DataLoader:
    """This rank's {images, tokens, caption_keys} batches of image-caption shards (one pass)."""
    stream = CaptionStream(expand_shards(shards), build_eval_transform(data_cfg, image_size), tokenizer, batch_size,
                           rank, size, data_cfg.max_bad_fraction, data_cfg.bad_check_after)
    return DataLoader(stream, batch_size=None, num_workers=max(0, int(data_cfg.num_workers)))


# ----------------------------------------------------------------------------- labelled shards


class EvalStream(IterableDataset):
    """One deterministic pass over labelled shards, split by rank, batched inside the workers.

    Samples are numbered in shard order; rank r takes every dp_size-th usable sample starting at r.
    A rank's samples are cut into batches and DataLoader worker w builds batches w, w+W, ...;
    the round-robin hand-out then yields them in order, so the result does not depend on
    data.num_workers. Ranks' sample counts differ by at most one.
    """

    def __init__(self, shards: Sequence[str], transform: EvalTransform, batch_size: int, dp_rank: int, dp_size: int,
                 max_bad_fraction: float, bad_check_after: int):
        self.shards = list(shards)
        self.transform = transform
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.max_bad_fraction = max_bad_fraction
        self.bad_check_after = bad_check_after

    def _rank_samples(self, tracker: BadSampleTracker) -> Iterator[RawSample]:
        return rank_samples(self.shards, check_eval_sample, self.dp_rank, self.dp_size, tracker)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Workers other than 0 read the same shards to find their batches; only worker 0 reports.
        tracker = BadSampleTracker(self.max_bad_fraction, self.bad_check_after, " (evaluation)")
        tracker.quiet = worker != 0
        batch_index, images, labels = 0, [], []
        for position, sample in enumerate(self._rank_samples(tracker)):
            batch_index = position // self.batch_size
            if batch_index % workers != worker:
                continue
            try:
                image = decode_image(image_bytes(sample))
            except Exception as error:
                log.warning("skipped an evaluation sample: %s key=%r: undecodable image (%s: %s)",
                            sample.shard, sample.key, type(error).__name__, error)
                image = None
            if image is not None:
                images.append(self.transform(image))
                labels.append(class_index(sample))
            if (position + 1) % self.batch_size == 0 and images:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                images, labels = [], []
        if images:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long)


def build_eval_loader(shards: Union[str, Sequence[str]], image_size: int, data_cfg, batch_size: int,
                      dp_rank: int = 0, dp_size: int = 1) -> DataLoader:
    """(images FloatTensor [B,3,H,W], labels LongTensor [B]) over shards whose samples carry `cls`:
    one pass, deterministic order, no augmentation (resize short side + center crop), split by rank."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = EvalStream(expand_shards(shards), build_eval_transform(data_cfg, image_size), batch_size, dp_rank,
                         dp_size, data_cfg.max_bad_fraction, data_cfg.bad_check_after)
    return DataLoader(dataset, batch_size=None, num_workers=max(0, int(data_cfg.num_workers)))
