"""The sample streams of the training loader (flip_scale/data/loader.py puts them together).

Training stream (docs/design.md section 3): the global batch is drawn from S independent *sample
streams* (`data.streams`), the same S whatever the parallel layout:

    stream s = 0 .. S-1, epoch e = 0, 1, 2, ...  (the stream never ends)
      shard order = shuffle seeded by (seed, e); stream s takes its share (`assign_shards`, S readers)
        (data.resampled: e counts draws, each of shards drawn from (seed, source, e, s), `resampled_shards`)
      -> tar samples, malformed ones counted and skipped
      -> shuffle buffer seeded by (seed, e, s), drained at the end of the epoch
      -> decode + augment (per-sample seed from (seed, e, shard, key), and s when resampled)
      -> chunks of B / S samples
    global batch k = chunk k of stream 0, chunk k of stream 1, ..., chunk k of stream S-1

Data-parallel rank r of D takes the streams r*S/D .. (r+1)*S/D - 1 (so D must divide S), whose
chunks are, in order, rows r*B/D .. (r+1)*B/D of the global batch. The global batch, row for row,
is therefore the same under every layout, and so is a sample's global index (which seeds its
mask). Within a rank, DataLoader worker w builds the chunks of a contiguous block of the rank's
streams, the w-th of W (W: the largest divisor of S/D not above data.num_workers), and hands them
over as one part per batch (its chunks joined in stream order, in the worker; flip_scale/data/chunks.py).

A stream starts at `start[s] = (epoch, drawn)`: earlier epochs are skipped without reading, the
epoch's shards are read again and its first `drawn` samples are drawn from the buffer without
decoding, so the stream continues exactly where it stopped (same samples, same augmentation, same
batch boundaries).
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .chunks import join_chunks
from .fields import SMALL_IMAGE, UNDECODABLE_IMAGE, SampleFormat, caption_text, check_train_sample, image_bytes
from .mixture import iter_mixture
from .shards import (
    BadSample,
    BadSampleTracker,
    DataError,
    RawSample,
    assign_shards,
    derive_seed,
    read_tar_samples,
    resampled_shards,
)
from .transforms import TrainTransform, decode_image


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


def shards_digest(shards: Sequence[str]) -> str:
    """A short digest of the shard names (not their directory): the stream positions are only
    meaningful for the same shards in the same order."""
    import hashlib

    names = "\n".join(shard.rsplit("/", 1)[-1] for shard in shards)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


class TrainStream(IterableDataset):
    """The chunks of one data-parallel rank's sample streams (see the module docstring).

    `streams`: the global stream ids of this rank, in order; `start[s] = (epoch, drawn)` is where
    stream s resumes. Each DataLoader worker (or the process itself, with no workers) yields, batch
    after batch, one chunk of each stream it owns.
    """

    def __init__(self, shards: Sequence[str], data_cfg, transform: TrainTransform, tokenizer, streams: Sequence[int],
                 total_streams: int, chunk_size: int, seed: int, num_workers: int, epochs: Optional[int] = None,
                 start: Optional[dict] = None, sources: Optional[list] = None, resampled: bool = False,
                 source: str = ""):
        self.shards = list(shards)
        self.data_cfg = data_cfg
        self.sources = sources  # a mixture (flip_scale/data/mixture.py): [Source(name, weight, shards, resampled)]
        # Shards drawn with replacement (flip_scale.data.shards.resampled_shards): the position's
        # "epoch" then counts draws. `source`: a mixture's source name, salting the draws.
        self.resampled = resampled
        self.source = source
        self.mix_start = dict(start or {}) if sources else {}
        start = None if sources else start
        self.transform = transform
        self.tokenizer = tokenizer
        self.streams = list(streams)
        self.total_streams = total_streams
        self.chunk_size = chunk_size
        self.seed = seed
        self.num_workers = num_workers
        self.epochs = epochs
        self.start = {int(s): tuple(p) for s, p in (start or {}).items()}
        self.shuffle_size = data_cfg.shuffle_buffer
        self.max_bad_fraction = data_cfg.max_bad_fraction
        self.bad_check_after = data_cfg.bad_check_after
        self.shard_retries = int(data_cfg.shard_retries)
        self.format = SampleFormat.from_config(data_cfg)
        self.min_image_size = int(data_cfg.min_image_size)
        # Decode JPEGs at reduced scale only while a crop of the smallest area still has full resolution.
        self.decode_min_size = 2 * transform.image_size
        self.tensor_path = None  # data.image_decoder=torchvision: decode + crop there
        if getattr(data_cfg, "image_decoder", "pillow") == "torchvision":
            from .torchvision_decode import TorchvisionTrainPath

            self.tensor_path = TorchvisionTrainPath(transform)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != max(1, self.num_workers):
            raise RuntimeError(f"TrainStream built for {self.num_workers} workers runs in {workers} DataLoader workers")
        per_worker = len(self.streams) // workers
        owned = self.streams[worker * per_worker:(worker + 1) * per_worker]
        chunks = [self.iter_stream(stream) for stream in owned]
        if self.epochs is None:
            for round_ in zip(*chunks):  # endless streams: one chunk of each, batch after batch
                yield join_chunks(round_)
        else:  # finite passes end unevenly: the remainders come last
            for round_ in itertools.zip_longest(*chunks):
                yield join_chunks([chunk for chunk in round_ if chunk is not None])

    # -- one stream ---------------------------------------------------------------------------

    def _epoch_samples(self, epoch: int, stream: int, tracker: BadSampleTracker) -> Iterator[RawSample]:
        """Usable samples of this stream's shards in `epoch`, before the shuffle buffer."""
        tasks = (resampled_shards(self.shards, epoch, self.seed, stream, self.total_streams, self.source)
                 if self.resampled
                 else assign_shards(self.shards, epoch, self.seed, 0, 1, stream, self.total_streams))
        for task in tasks:
            # While replaying to a resume point (tracker.quiet) images are only located, not read.
            for sample in read_tar_samples(task.shard, task.select if task.stride > 1 else None,
                                           lazy_images=lambda: tracker.quiet, retries=self.shard_retries,
                                           image_keys=self.format.image_keys):
                if isinstance(sample, BadSample):
                    tracker.add_bad(sample)
                    continue
                problem = check_train_sample(sample, self.format)
                if problem is not None:
                    tracker.add_bad(BadSample(sample.shard, sample.key, problem[1], problem[0]))
                    continue
                yield sample

    def _load(self, sample: RawSample, epoch: int, stream: int, tracker: BadSampleTracker) -> Optional[torch.Tensor]:
        try:
            if self.tensor_path is not None:
                image, size = self.tensor_path.decode(image_bytes(sample, self.format))
            else:
                image, size = decode_image(image_bytes(sample, self.format), self.decode_min_size, with_size=True)
        except Exception as error:  # PIL raises many types for corrupt data; none may stop training
            tracker.add_bad(BadSample(sample.shard, sample.key, f"undecodable image ({type(error).__name__}: {error})",
                                      UNDECODABLE_IMAGE))
            return None
        if min(size) < self.min_image_size:
            tracker.add_bad(BadSample(sample.shard, sample.key, f"image {size[0]}x{size[1]} is below "
                                      f"data.min_image_size={self.min_image_size}", SMALL_IMAGE))
            return None
        # Per-sample seed: the same sample in the same epoch gets the same crop whatever the layout.
        # Drawn with replacement, two streams can read one shard in one draw: the stream is in the
        # seed too, so the copies are cropped apart.
        name = sample.shard.rsplit("/", 1)[-1]
        where = (epoch, name, sample.key, stream) if self.resampled else (epoch, name, sample.key)
        rng = random.Random(derive_seed(self.seed, "augment", *where))
        return (self.tensor_path or self.transform)(image, rng)

    def iter_stream(self, stream: int) -> Iterator[dict]:
        """The chunks of stream `stream`: dicts of `chunk_size` samples (a finite pass ends with fewer)."""
        if self.sources:
            yield from iter_mixture(TrainStream, self, stream)
            return
        where = f" (stream {stream} of {self.total_streams})"
        tracker = BadSampleTracker(self.max_bad_fraction, self.bad_check_after, where)
        start_epoch, skip = self.start.get(stream, (0, 0))
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        shards: list[str] = []  # each sample's shard, beside its key (a loss spike names both)
        epoch = start_epoch
        position = (epoch, skip)
        empty_draws = 0  # resampled: draws in a row that gave no usable sample

        def make_chunk() -> dict:
            chunk = {
                "images": list(images),  # stacked once per part (flip_scale.data.chunks)
                "tokens": self.tokenizer(captions),
                "skipped": tracker.take_skipped(),
                "skipped_kinds": tracker.take_skipped_kinds(),
                "samples": len(images),
                "keys": list(keys),
                "shards": list(shards),
                "_stream": stream,
                "_position": position,
            }
            images.clear()
            captions.clear()
            keys.clear()
            shards.clear()
            return chunk

        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(derive_seed(self.seed, "sample-shuffle", epoch, stream))
            drawn = produced = decoded = 0
            # Fast-forward after a resume: the pipeline state is rebuilt by drawing the samples that
            # were drawn before, without decoding them, and their bad samples are not counted twice.
            tracker.quiet = epoch == start_epoch and skip > 0
            for sample in shuffle_buffer(self._epoch_samples(epoch, stream, tracker), self.shuffle_size, rng):
                produced += 1
                if tracker.quiet:
                    drawn += 1
                    if drawn == skip:
                        tracker.quiet = False
                    continue
                image = self._load(sample, epoch, stream, tracker)
                drawn += 1
                if image is None:
                    continue
                decoded += 1
                tracker.add_good()
                images.append(image)
                captions.append(caption_text(sample, self.format))
                keys.append(sample.key)
                shards.append(sample.shard)
                if len(images) == self.chunk_size:
                    position = (epoch, drawn)
                    yield make_chunk()
            # The epoch a resume started in had usable samples before the resume point (they were
            # decoded then), even when none is left after it.
            resumed_epoch = epoch == start_epoch and skip > 0
            tracker.quiet = False
            if self.resampled:
                # One drawn shard may be empty or bad (counted above); only a run of them stops the stream.
                empty_draws = 0 if decoded or resumed_epoch else empty_draws + 1
                if empty_draws >= max(64, 4 * len(self.shards)):
                    raise DataError(
                        f"no usable samples in {empty_draws} shard draws in a row for stream {stream} of "
                        f"{self.total_streams} over {len(self.shards)} shards (first: {self.shards[0]}): every "
                        f"drawn shard was empty or held only bad samples (bad ones are in the warnings above)"
                    )
            elif produced == 0 or (decoded == 0 and not resumed_epoch):
                # A stream with nothing usable would otherwise spin through its epochs forever.
                raise DataError(
                    f"no usable samples in epoch {epoch} for stream {stream} of {self.total_streams} over "
                    f"{len(self.shards)} shards (first: {self.shards[0]}); the warnings above say why"
                )
            epoch += 1
            position = (epoch, 0)
        if images:  # a finite stream (epochs set) ends with its remainder
            position = (epoch, 0)
            yield make_chunk()
