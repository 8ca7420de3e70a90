"""How evaluation splits its data over the data-parallel ranks, in lockstep.

Every data-parallel rank embeds its own share of the evaluation samples: rank r takes samples
r, r + size, r + 2 size, ... of the dataset's order (the tensor-parallel ranks of one replica share
a data-parallel rank, so they see the same samples). A sharded model needs every rank in every
forward, so all ranks run the same number of batches, each of exactly `batch_size` rows: a rank's
last batch is padded, and a rank that runs out first forwards batches of padding until the last
rank is done (one tiny all-reduce per batch decides). A `valid` mask keeps padding out of every
count, and the counts are summed over the ranks at the end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("flip_scale.eval")


class EvalProgress:
    """A log line at most every `every` seconds on long evaluations: samples done (all ranks, as
    counted on this one), rate, and an ETA when the total is known. Only the main process's logger
    prints (the other ranks log warnings only)."""

    def __init__(self, label: str, total: Optional[int] = None, every: float = 30.0):
        self.label, self.total, self.every = label, total, every
        self.started = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        if self.total:
            left = max(0, self.total - done) / max(rate, 1e-9)
            log.info("%s: %d / %d (%.0f%%), %.0f/s, ETA %.0fs", self.label, done, self.total,
                     100 * done / self.total, rate, left)
        else:
            log.info("%s: %d so far, %.0f/s", self.label, done, rate)


@dataclass(frozen=True)
class EvalGroup:
    """The data-parallel ranks that share an evaluation (one process: the default)."""

    group: Optional[object] = None  # the data-parallel process group; None with one rank
    rank: int = 0
    size: int = 1

    @classmethod
    def from_dims(cls, dims) -> "EvalGroup":
        """The data-parallel ranks of a `ParallelDims` (None: one process)."""
        if dims is None or dims.dp_size == 1:
            return cls()
        return cls(dims.dp_group, dims.dp_rank, dims.dp_size)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[n, ...] of equal shape on every rank -> [size * n, ...], rank 0's rows first."""
        if not self.distributed:
            return tensor
        out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
        return out

    def rank_limit(self, max_samples: int) -> Optional[int]:
        """How many of its samples this rank keeps so that the ranks together keep the dataset's
        first `max_samples` (0: all)."""
        if not max_samples:
            return None
        return max(0, (max_samples - self.rank + self.size - 1) // self.size)


@dataclass(frozen=True)
class Field:
    """One tensor of a batch: the shape of one row, its dtype, and the value that pads it."""

    shape: tuple
    dtype: torch.dtype
    pad: float = 0


def _pad(rows: Optional[torch.Tensor], field: Field, batch_size: int) -> torch.Tensor:
    out = torch.full((batch_size, *field.shape), field.pad, dtype=field.dtype)
    if rows is not None and rows.shape[0]:
        out[: rows.shape[0]] = rows
    return out


def lockstep_batches(
    batches: Iterable[dict],
    fields: dict[str, Field],
    batch_size: int,
    group: EvalGroup,
    device: torch.device,
    max_samples: int = 0,
    label: str = "evaluation",
    total: Optional[int] = None,
) -> Iterator[dict]:
    """This rank's batches (dicts of the `fields`, at most `batch_size` rows each), padded to
    `batch_size` rows and continued with all-padding batches until every rank is done.

    Each yielded dict also holds `valid` [batch_size] bool and `index` [batch_size] long: the
    sample's position in the dataset (rank r's k-th sample is k * size + r), -1 for padding.
    """
    limit = group.rank_limit(max_samples)
    source = iter(batches)
    taken = 0
    progress = EvalProgress(label, total=min(t for t in (max_samples, total) if t) if (max_samples or total) else None)
    exhausted = limit == 0
    while True:
        batch, rows = None, 0
        while not exhausted and rows == 0:
            batch = next(source, None)
            if batch is None:
                exhausted = True
                break
            rows = len(next(iter(batch.values())))
            if rows > batch_size:
                raise ValueError(f"an evaluation batch of {rows} rows is larger than the batch size {batch_size}")
            if limit is not None:
                rows = min(rows, limit - taken)
        # The ranks go on while any of them has samples left.
        more = group.max_(torch.tensor([1 if rows > 0 else 0], device=device))
        if int(more.item()) == 0:
            return
        out = {name: _pad(batch[name][:rows] if batch is not None else None, field, batch_size)
               for name, field in fields.items()}
        positions = torch.arange(taken, taken + rows)
        out["index"] = _pad(positions * group.size + group.rank, Field((), torch.long, -1), batch_size)
        out["valid"] = out["index"] >= 0
        taken += rows
        if limit is not None and taken >= limit:
            exhausted = True
        yield out
        progress.update(taken * group.size)
