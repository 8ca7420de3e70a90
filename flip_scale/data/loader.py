"""The training loader over webdataset tar shards (evaluation datasets: flip_scale/evaluation/datasets.py).

Training stream (docs/design.md section 3): the global batch is drawn from S independent *sample
streams* (`data.streams`), the same S whatever the parallel layout:

    stream s = 0 .. S-1, epoch e = 0, 1, 2, ...  (the stream never ends)
      shard order = shuffle seeded by (seed, e); stream s takes its share (`assign_shards`, S readers)
      -> tar samples, malformed ones counted and skipped
      -> shuffle buffer seeded by (seed, e, s), drained at the end of the epoch
      -> decode + augment (per-sample seed from (seed, e, shard, key)) -> chunks of B / S samples
    global batch k = chunk k of stream 0, chunk k of stream 1, ..., chunk k of stream S-1

Data-parallel rank r of D takes the streams r*S/D .. (r+1)*S/D - 1 (so D must divide S), whose
chunks are, in order, rows r*B/D .. (r+1)*B/D of the global batch. The global batch, row for row,
is therefore the same under every layout, and so is a sample's global index (which seeds its
mask). Within a rank, DataLoader worker w builds the chunks of a contiguous block of the rank's
streams, the w-th of W (W: the largest divisor of S/D not above data.num_workers), and hands them
over as one part per batch (its chunks joined in stream order, in the worker); the main process
puts the W parts of one batch together in stream order, and with one worker (or none) takes the
part as it is, without a copy. torch's DataLoader hands out items from its workers in strict
round-robin order and every worker yields one part per batch, so the parts of a batch arrive together.

Resume (`TrainLoader.state_dict` / `load_state_dict`): the state is, per stream, the epoch and the
number of samples drawn from its shuffle buffer in that epoch. It does not depend on the layout:
each data-parallel rank saves the positions of its streams, and a resumed run under any layout
whose data-parallel size divides S takes the positions of its streams from all the saved ones.
Resuming replays each stream deterministically: earlier epochs are skipped without reading, the
current epoch's shards are read again and its first samples are drawn from the buffer without
decoding, so the stream continues exactly where it stopped (same samples, same augmentation, same
batch boundaries). The bad-sample limit is judged afresh from the resume point.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .chunks import join_chunks, merge_chunks
from .mixture import (  # noqa: F401  (sampling_note: also used from here)
    check_resampled,
    iter_mixture,
    parse_sources,
    sampling_mode,
    sampling_note,
)
from .fields import SMALL_IMAGE, UNDECODABLE_IMAGE, SampleFormat, caption_text, check_train_sample, image_bytes
from .streams import (  # noqa: F401  (check_streams, default_streams, stream_note: also used from here)
    DEFAULT_STREAMS_CAP,
    check_streams,
    data_streams,
    default_streams,
    loader_workers,
    stream_note,
)
from .shards import (
    BadSample,
    BadSampleTracker,
    DataError,
    RawSample,
    assign_shards,
    derive_seed,
    expand_shards,
    read_tar_samples,
    resampled_shards,
    warn_if_few_shards,
)
from .resume import SAVED_DEFAULTS
from .tokenizer import Tokenizer, build_tokenizer
from .transforms import TrainTransform, build_train_transform, decode_image

log = logging.getLogger("flip_scale.data")

STATE_VERSION = 2  # 2: per-stream positions, layout-free (1: per data-parallel rank and worker)


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


class TrainLoader:
    """Iterable of this data-parallel rank's training batch dicts, with a resumable position
    (`state_dict` / `load_state_dict`, layout-free: per sample stream).

    Each `iter()` continues from the current position; a fresh loader starts at the beginning.
    Batch dict: images FloatTensor [B,3,H,W], tokens LongTensor [B,T], skipped (bad samples met
    since the previous batch), skipped_kinds (the same per kind, flip_scale.data.fields), samples (B),
    keys (sample keys, for inspection), shards (each sample's shard), sample_index LongTensor [B] (each
    sample's row in the global batch: dp_rank * B + i).
    """

    def __init__(self, shards: Sequence[str], data_cfg, transform: TrainTransform, tokenizer, dp_rank: int,
                 dp_size: int, batch_size: int, seed: int, epochs: Optional[int] = None, pin_memory: bool = False,
                 streams: int = 0, sources: Optional[list] = None, resampled: bool = False):
        self.shards = list(shards)
        self.sources = sources
        self.resampled = resampled
        if sources and epochs is not None:
            raise ValueError("a mixture of data.sources is an endless stream: epochs must be None")
        if resampled and epochs is not None:
            raise ValueError("data.resampled draws shards with replacement, an endless stream: epochs must be None")
        # The digest covers the mixture too: other weights or names are another stream.
        self.digest_names = self.shards + [f"{src.name}:{src.weight!r}:{len(src.shards)}" for src in (sources or [])]
        # Per epoch or with replacement, per source: a resume under the other mode restarts the stream.
        # (All per epoch is "epochs", as checkpoints from before the key meant.)
        resampled_any = any(src.resampled for src in sources) if sources else resampled
        self.sampling = (",".join(f"{src.name}={sampling_mode(src.resampled)}" for src in sources)
                         if sources and resampled_any else sampling_mode(resampled_any))
        self.data_cfg = data_cfg
        self.transform = transform
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.pin_memory = pin_memory
        self.requested_workers = int(data_cfg.num_workers)
        self.streams_auto = not streams
        self.batches = 0
        self._set_streams(streams or default_streams(dp_size, self.requested_workers, batch_size, len(self.shards)))
        if dp_rank == 0:
            log.info("data: %s", stream_note(self.total_streams, len(self.shards), batch_size * dp_size,
                                             self.streams_auto))
            log.info("data: sampling %s", sampling_note(resampled, [(src.name, src.resampled) for src in sources or []]))

    def _set_streams(self, streams: int) -> None:
        check_streams(streams, self.dp_size, self.batch_size * self.dp_size)
        self.total_streams = streams
        per_rank = streams // self.dp_size
        self.rank_streams = list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        self.chunk_size = self.batch_size // per_rank
        self.num_workers = loader_workers(per_rank, self.requested_workers)
        if self.num_workers != self.requested_workers and self.requested_workers > 0 and self.dp_rank == 0:
            fits = [w for w in range(1, per_rank + 1) if per_rank % w == 0]
            report = log.warning if self.num_workers < max(1, self.requested_workers // 2) else log.info
            report("data: %d loader workers per rank instead of data.num_workers=%d: workers share a rank's %d "
                   "streams evenly (worker counts that fit: %s; or choose data.streams as dp size x workers)",
                   self.num_workers, self.requested_workers, per_rank, fits)
        self.positions = {stream: self._fresh_position() for stream in self.rank_streams}
        warn_if_few_shards(len(self.shards), streams, self.resampled and not self.sources)

    def _fresh_position(self):
        if self.sources:
            return {"batch": 0, "sources": {source.name: [0, 0] for source in self.sources}}
        return (0, 0)

    def _dataset(self) -> TrainStream:
        return TrainStream(
            self.shards, self.data_cfg, self.transform, self.tokenizer, self.rank_streams, self.total_streams,
            self.chunk_size, self.seed, self.num_workers, epochs=self.epochs, start=self.positions,
            sources=self.sources, resampled=self.resampled,
        )

    def __iter__(self) -> Iterator[dict]:
        # A batch takes one part (its streams' chunks joined) of each worker: prefetch two batches' worth.
        extra = {"prefetch_factor": 2} if self.num_workers > 0 else {}
        loader = DataLoader(
            self._dataset(), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, **extra,
        )
        pending: list[dict] = []
        covered = 0
        for part in loader:
            pending.append(part)
            covered += len(part["_streams"])
            if covered >= len(self.rank_streams):
                yield self._assemble(pending)
                pending, covered = [], 0
        if pending:  # the end of a finite pass
            yield self._assemble(pending)

    def _assemble(self, parts: list[dict]) -> dict:
        parts = sorted(parts, key=lambda part: part["_streams"][0])
        streams = [stream for part in parts for stream in part["_streams"]]
        if self.epochs is None and streams != self.rank_streams:
            raise RuntimeError(f"data loader: a batch's chunks came from streams {streams}, expected {self.rank_streams}")
        for part in parts:
            for stream, position in zip(part["_streams"], part["_positions"]):
                self.positions[stream] = (position if isinstance(position, dict)
                                          else (int(position[0]), int(position[1])))
        self.batches += 1
        batch = merge_chunks(parts)  # one part (one worker, or none): no copy
        first = self.dp_rank * self.batch_size  # this rank's rows of the global batch (module docstring)
        # Each sample's row in the global batch: its mask noise is drawn from it (and the step),
        # so a sample is masked alike under every layout.
        batch["sample_index"] = torch.arange(first, first + batch["samples"])
        return batch

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "streams": self.total_streams,
            "streams_auto": self.streams_auto,
            "positions": {str(stream): position if isinstance(position, dict) else list(position)
                          for stream, position in self.positions.items()},
            "batches": self.batches,
            "seed": self.seed,
            "num_shards": len(self.shards),
            "shards_digest": shards_digest(self.digest_names),
            "sampling": self.sampling,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: this rank's streams' positions (a merge of every rank's saved
        state, see `flip_scale.data.resume.data_state_for_resume`), possibly of another layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}: the data "
                             f"stream of an older checkpoint cannot be continued sample for sample")
        differ = {k: (state.get(k, SAVED_DEFAULTS.get(k)), v) for k, v in (("seed", self.seed), ("num_shards", len(self.shards)),
                                                     ("shards_digest", shards_digest(self.digest_names)),
                                                     ("sampling", self.sampling))
                  if state.get(k, SAVED_DEFAULTS.get(k)) != v}
        if differ:
            text = ", ".join(f"{k}: saved {old} now {new}" for k, (old, new) in differ.items())
            raise ValueError(f"cannot resume the data stream: {text}. The stream position is only meaningful for the "
                             f"same seed, shard list and sampling mode; start the data stream afresh instead")
        streams = int(state["streams"])
        if streams != self.total_streams:
            if not self.streams_auto:
                raise ValueError(f"cannot resume the data stream: the checkpoint has data.streams={streams}, this run "
                                 f"asks for {self.total_streams}")
            self._set_streams(streams)  # data.streams: 0 keeps the checkpoint's
        saved = {int(s): (p if isinstance(p, dict) else tuple(int(x) for x in p))
                 for s, p in state["positions"].items()}
        missing = [s for s in self.rank_streams if s not in saved]
        if missing:
            raise ValueError(f"data loader state has no position for streams {missing[:8]} of this rank")
        self.positions = {s: saved[s] for s in self.rank_streams}
        self.batches = int(state.get("batches", 0))


def pin_memory_for(device) -> bool:
    """Batches go to page-locked host memory when the model is on a CUDA device (the copy to it can
    then overlap the step: the trainer moves them with non_blocking=True); never on a CPU run."""
    return torch.device(device).type == "cuda"


def build_train_loader(data_cfg, image_size: int, tokenizer: Union[Tokenizer, str], dp_rank: int, dp_size: int,
                       local_batch_size: int, seed: int, *, epochs: Optional[int] = None,
                       pin_memory: bool = False) -> TrainLoader:
    """The training stream of data-parallel rank `dp_rank` of `dp_size` (see the module docstring).

    `epochs=None` is the endless stream used for training; a number gives that many passes
    ending with partial batches, for inspection and tests. The stream count is `data.streams`
    (0: chosen from the shard count and the batch, `default_streams`).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if local_batch_size < 1:
        raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
    if data_cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 (0: load in the training process), got {data_cfg.num_workers}")
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    resampled = check_resampled(getattr(data_cfg, "resampled", False), "data.resampled")
    sources = parse_sources(data_cfg.sources, resampled) if getattr(data_cfg, "sources", None) else None
    shards = [s for source in sources for s in source.shards] if sources else expand_shards(data_cfg.train_shards)
    transform = build_train_transform(data_cfg, image_size)
    return TrainLoader(shards, data_cfg, transform, tokenizer, dp_rank, dp_size, local_batch_size, seed,
                       epochs=epochs, pin_memory=pin_memory, streams=int(getattr(data_cfg, "streams", 0)),
                       sources=sources, resampled=resampled)
