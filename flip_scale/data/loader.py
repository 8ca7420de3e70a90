"""Training and evaluation loaders over webdataset tar shards.

Training stream (per data-parallel rank; DESIGN.md section 3):

    epoch e = 0, 1, 2, ...  (resampled: the stream never ends)
      shard order = shuffle seeded by (seed, e); reader (rank, worker) takes its share (`assign_shards`)
      -> tar samples, malformed ones counted and skipped
      -> shuffle buffer seeded by (seed, e, rank, worker), drained at the end of the epoch
      -> decode + augment (per-sample seed from (seed, e, shard, key)) -> batch of `local_batch_size`
         inside the DataLoader worker, so the bad-sample count travels with the batch it belongs to

Each DataLoader worker is one reader; torch's DataLoader hands out batches from its workers in
strict round-robin order, which the resume logic relies on.

Resume (`TrainLoader.state_dict` / `load_state_dict`): the state is, per reader, the epoch and the
number of samples it has drawn from its shuffle buffer in that epoch, plus the number of batches
delivered. Resuming replays each reader's pipeline deterministically: earlier epochs are skipped
without reading, the current epoch's shards are read again and its first samples are drawn from
the buffer without decoding, so the stream continues exactly where it stopped (same samples, same
augmentation, same batch boundaries). The bad-sample limit is judged afresh from the resume point.
The state is tied to (seed, dp_rank, dp_size, num_workers, shard count); a mismatch is refused.
"""

from __future__ import annotations

import logging
import random
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import (
    BadSample,
    BadSampleTracker,
    DataError,
    RawSample,
    assign_shards,
    caption_text,
    check_eval_sample,
    check_train_sample,
    class_index,
    derive_seed,
    expand_shards,
    image_bytes,
    read_tar_samples,
    warn_if_few_shards,
)
from .tokenizer import Tokenizer
from .transforms import EvalTransform, TrainTransform, build_eval_transform, build_train_transform, decode_image

log = logging.getLogger("flip_scale.data")

STATE_VERSION = 1


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Yield `items` in a random order using a buffer of `size` (<= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class TrainStream(IterableDataset):
    """The resampled training stream of one data-parallel rank, as batch dicts.

    `start[w] = (epoch, drawn)` is where reader w resumes (see the module docstring);
    `worker_offset` maps DataLoader worker p to reader (p + offset) % num_readers, so that after a
    resume the round-robin continues with the reader whose turn it was.
    """

    def __init__(self, shards: Sequence[str], data_cfg, transform: TrainTransform, tokenizer, dp_rank: int,
                 dp_size: int, batch_size: int, seed: int, num_readers: int, epochs: Optional[int] = None,
                 start: Optional[Sequence[Sequence[int]]] = None, worker_offset: int = 0):
        self.shards = list(shards)
        self.transform = transform
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_readers = num_readers
        self.epochs = epochs
        self.start = [tuple(s) for s in start] if start is not None else [(0, 0)] * num_readers
        self.worker_offset = worker_offset
        self.shuffle_size = data_cfg.shuffle_buffer
        self.max_bad_fraction = data_cfg.max_bad_fraction
        self.bad_check_after = data_cfg.bad_check_after
        # Decode JPEGs at reduced scale only while a crop of the smallest area still has full resolution.
        self.decode_min_size = 2 * transform.image_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_readers:
            raise RuntimeError(f"TrainStream built for {self.num_readers} readers runs in {workers} DataLoader workers")
        return self.iter_reader((physical + self.worker_offset) % self.num_readers)

    # -- one reader ---------------------------------------------------------------------------

    def _epoch_samples(self, epoch: int, reader: int, tracker: BadSampleTracker) -> Iterator[RawSample]:
        """Usable samples of this reader's shards in `epoch`, before the shuffle buffer."""
        tasks = assign_shards(self.shards, epoch, self.seed, self.dp_rank, self.dp_size, reader, self.num_readers)
        for task in tasks:
            for sample in read_tar_samples(task.shard, task.select if task.stride > 1 else None):
                if isinstance(sample, BadSample):
                    tracker.add_bad(sample)
                    continue
                problem = check_train_sample(sample)
                if problem is not None:
                    tracker.add_bad(BadSample(sample.shard, sample.key, problem))
                    continue
                yield sample

    def _load(self, sample: RawSample, epoch: int, tracker: BadSampleTracker) -> Optional[torch.Tensor]:
        try:
            image = decode_image(image_bytes(sample), self.decode_min_size)
        except Exception as error:  # PIL raises many types for corrupt data; none may stop training
            tracker.add_bad(BadSample(sample.shard, sample.key, f"undecodable image ({type(error).__name__}: {error})"))
            return None
        # Per-sample seed: the same sample in the same epoch gets the same crop whatever the layout.
        rng = random.Random(derive_seed(self.seed, "augment", epoch, sample.shard.rsplit("/", 1)[-1], sample.key))
        return self.transform(image, rng)

    def iter_reader(self, reader: int) -> Iterator[dict]:
        """The batches of reader `reader` (one DataLoader worker) of this rank."""
        where = f" (rank {self.dp_rank}, reader {reader})"
        tracker = BadSampleTracker(self.max_bad_fraction, self.bad_check_after, where)
        start_epoch, skip = self.start[reader]
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        epoch = start_epoch
        position = (epoch, skip)

        def make_batch() -> dict:
            batch = {
                "images": torch.stack(images),
                "tokens": self.tokenizer(captions),
                "skipped": tracker.take_skipped(),
                "samples": len(images),
                "keys": list(keys),
                "_reader": reader,
                "_position": position,
            }
            images.clear()
            captions.clear()
            keys.clear()
            return batch

        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(derive_seed(self.seed, "sample-shuffle", epoch, self.dp_rank, reader))
            drawn = produced = decoded = 0
            # Fast-forward after a resume: the pipeline state is rebuilt by drawing the samples that
            # were drawn before, without decoding them, and their bad samples are not counted twice.
            tracker.quiet = epoch == start_epoch and skip > 0
            for sample in shuffle_buffer(self._epoch_samples(epoch, reader, tracker), self.shuffle_size, rng):
                produced += 1
                if tracker.quiet:
                    drawn += 1
                    if drawn == skip:
                        tracker.quiet = False
                    continue
                image = self._load(sample, epoch, tracker)
                drawn += 1
                if image is None:
                    continue
                decoded += 1
                tracker.add_good()
                images.append(image)
                captions.append(caption_text(sample))
                keys.append(sample.key)
                if len(images) == self.batch_size:
                    position = (epoch, drawn)
                    yield make_batch()
            fast_forwarded = epoch == start_epoch and drawn <= skip
            tracker.quiet = False
            if produced == 0 or (decoded == 0 and not fast_forwarded):
                # A reader with nothing usable would otherwise spin through its epochs forever.
                raise DataError(
                    f"no usable samples in epoch {epoch} for rank {self.dp_rank} reader {reader} of "
                    f"{len(self.shards)} shards (first: {self.shards[0]}); the warnings above say why"
                )
            epoch += 1
            position = (epoch, 0)
        if images:  # a finite stream (epochs set) ends with its remainder
            position = (epoch, 0)
            yield make_batch()


class TrainLoader:
    """Iterable of training batch dicts with a resumable position (`state_dict` / `load_state_dict`).

    Each `iter()` continues from the current position; a fresh loader starts at the beginning.
    Batch dict: images FloatTensor [B,3,H,W], tokens LongTensor [B,T], skipped (bad samples since
    the previous batch of the same reader), samples (B), keys (sample keys, for inspection).
    """

    def __init__(self, shards: Sequence[str], data_cfg, transform: TrainTransform, tokenizer, dp_rank: int,
                 dp_size: int, batch_size: int, seed: int, epochs: Optional[int] = None, pin_memory: bool = False):
        self.shards = list(shards)
        self.data_cfg = data_cfg
        self.transform = transform
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.pin_memory = pin_memory
        self.num_workers = int(data_cfg.num_workers)
        self.num_readers = max(1, self.num_workers)
        self.batches = 0
        self.positions = [(0, 0)] * self.num_readers
        self._warned_order = False
        warn_if_few_shards(len(self.shards), dp_size, self.num_readers)

    def _dataset(self) -> TrainStream:
        return TrainStream(
            self.shards, self.data_cfg, self.transform, self.tokenizer, self.dp_rank, self.dp_size, self.batch_size,
            self.seed, self.num_readers, epochs=self.epochs, start=self.positions,
            worker_offset=self.batches % self.num_readers,
        )

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            self._dataset(), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for batch in loader:
            reader = batch.pop("_reader")
            position = batch.pop("_position")
            expected = self.batches % self.num_readers
            if reader != expected and not self._warned_order:
                self._warned_order = True
                log.warning("batch came from loader worker %d, expected %d: resume may not reproduce the order",
                            reader, expected)
            self.positions[reader] = (int(position[0]), int(position[1]))
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "positions": [list(p) for p in self.positions],
            "num_workers": self.num_workers,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_shards": len(self.shards),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        have = {"num_workers": self.num_workers, "seed": self.seed, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "num_shards": len(self.shards)}
        differ = {k: (state.get(k), v) for k, v in have.items() if state.get(k) != v}
        if differ:
            text = ", ".join(f"{k}: saved {old} now {new}" for k, (old, new) in differ.items())
            raise ValueError(
                f"cannot resume the data stream: {text}. The stream position is only meaningful for the same seed, "
                f"data-parallel layout, data.num_workers and shard list; start the data stream afresh instead"
            )
        positions = [tuple(int(x) for x in p) for p in state["positions"]]
        if len(positions) != self.num_readers:
            raise ValueError(f"data loader state holds {len(positions)} reader positions, expected {self.num_readers}")
        self.positions = positions
        self.batches = int(state["batches"])


def build_train_loader(data_cfg, image_size: int, tokenizer: Union[Tokenizer, str], dp_rank: int, dp_size: int,
                       local_batch_size: int, seed: int, *, epochs: Optional[int] = None,
                       pin_memory: bool = False) -> TrainLoader:
    """The training stream of data-parallel rank `dp_rank` of `dp_size` (see the module docstring).

    `epochs=None` is the resampled, endless stream used for training; a number gives that many
    passes ending with a partial batch, for inspection and tests.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if local_batch_size < 1:
        raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
    if data_cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 (0: load in the training process), got {data_cfg.num_workers}")
    if isinstance(tokenizer, str):
        tokenizer = Tokenizer(tokenizer)
    shards = expand_shards(data_cfg.train_shards)
    transform = build_train_transform(data_cfg, image_size)
    return TrainLoader(shards, data_cfg, transform, tokenizer, dp_rank, dp_size, local_batch_size, seed,
                       epochs=epochs, pin_memory=pin_memory)


# ----------------------------------------------------------------------------- evaluation


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
        usable = 0
        for shard in self.shards:
            for sample in read_tar_samples(shard):
                problem = sample.reason if isinstance(sample, BadSample) else check_eval_sample(sample)
                if problem is not None:
                    tracker.add_bad(BadSample(sample.shard, sample.key, problem))
                    continue
                usable += 1
                if (usable - 1) % self.dp_size == self.dp_rank:
                    yield sample

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
