"""The training loader over webdataset tar shards (evaluation datasets: flip_scale/evaluation/datasets.py).

The global batch is drawn from `data.streams` sample streams, the same whatever the parallel
layout (flip_scale/data/sample_stream.py, docs/design.md section 3); this module gives each data-parallel
rank its streams, runs them in DataLoader workers and puts a batch together from its workers'
parts in stream order: torch's DataLoader hands out items from its workers in strict round-robin
order and every worker yields one part per batch, so the parts of a batch arrive together, and
with one worker (or none) the part is taken as it is, without a copy.

Resume (`TrainLoader.state_dict` / `load_state_dict`): the state is, per stream, the epoch and the
number of samples drawn from its shuffle buffer in that epoch. It does not depend on the layout:
each data-parallel rank saves the positions of its streams, and a resumed run under any layout
whose data-parallel size divides S takes the positions of its streams from all the saved ones, and
replays each stream to it (TrainStream). The bad-sample limit is judged afresh from the resume point.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from .chunks import merge_chunks
from .mixture import check_resampled, parse_sources, sampling_mode, sampling_note
from .streams import (  # noqa: F401  (check_streams, default_streams, stream_note: also used from here)
    DEFAULT_STREAMS_CAP,
    check_streams,
    data_streams,
    default_streams,
    loader_workers,
    stream_note,
)
from .shards import (
    expand_shards,
    warn_if_few_shards,
)
from .resume import SAVED_DEFAULTS
from .sample_stream import TrainStream, shards_digest
from .tokenizer import Tokenizer, build_tokenizer
from .transforms import TrainTransform, build_train_transform

log = logging.getLogger("flip_scale.data")

STATE_VERSION = 2  # 2: per-stream positions, layout-free (1: per data-parallel rank and worker)


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
        if self.sources:  # each source's shards are split over the streams on their own
            for source in self.sources:
                warn_if_few_shards(len(source.shards), streams, source.resampled, source.name)
        else:
            warn_if_few_shards(len(self.shards), streams, self.resampled)

    @property
    def joins_parts(self) -> bool:
        """A batch is joined from more than one worker's part."""
        return self.num_workers > 1

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
        # With several workers a batch is joined from their parts: joined straight into page-locked
        # memory (`_assemble`), not pinned part by part by the DataLoader first (a copy the join discards).
        loader = DataLoader(
            self._dataset(), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory and not self.joins_parts, persistent_workers=False, **extra,
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
        # One part (one worker, or none) is taken as it is, pinned by the DataLoader where asked.
        batch = merge_chunks(parts, pin=self.pin_memory and self.joins_parts)
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
