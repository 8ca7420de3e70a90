"""Loss spikes: which samples a spiking batch held, so that the data can be found and removed.

    detector = SpikeDetector(factor=3.0, window=50, path=run_dir / "spikes.jsonl", writes=is_main)
    detector.check(step, loss, batch, group, device)   # after every step (collective when on)

Off unless `train.spike_factor` > 0. A step whose loss (the global batch's, the mean over the
data-parallel ranks) exceeds `factor` x the median of the previous `train.spike_window` steps'
losses is a spike: every data-parallel rank's (shard, key) of that batch is gathered to rank 0 and
one JSON line is appended to RUN_DIR/spikes.jsonl: step, loss, median, factor, window, samples.
The check waits for a full window, so the first steps (whose loss is still falling fast) are never
reported. A spiking loss enters the window like any other: the median is robust to a few.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Optional

from .runtime import reduce_float

log = logging.getLogger("flip_scale")


class SpikeDetector:
    def __init__(self, factor: float, window: int, path: Path, writes: bool):
        self.factor, self.window = float(factor), int(window)
        self.path, self.writes = Path(path), writes
        self.history: deque = deque(maxlen=self.window)

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def check(self, step: int, loss, batch: dict, group=None, device="cpu") -> Optional[dict]:
        """Record step `step` (collective over the data-parallel `group` when enabled); returns the
        spike's record (on rank 0 with every sample, elsewhere with this rank's) or None."""
        if not self.enabled:
            return None
        size = _group_size(group)
        value = reduce_float(float(loss), group, device, "sum") / size
        full = len(self.history) == self.window
        median = statistics.median(self.history) if full else None
        if math.isfinite(value):  # a non-finite step (skipped by the trainer) would poison the median
            self.history.append(value)
        if median is None or not value > self.factor * median:
            return None
        mine = [{"shard": shard, "key": key}
                for shard, key in zip(batch.get("shards") or [None] * len(batch.get("keys", [])), batch.get("keys", []))]
        samples = _gather(mine, group)
        record = {"step": step, "loss": value, "median": median, "factor": self.factor, "window": self.window,
                  "samples": samples}
        if self.writes:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            shards = sorted({s["shard"] for s in samples if s["shard"]})
            log.warning("step %d: loss spike %.4f > %g x the median %.4f of the last %d steps: its %d samples (shards "
                        "%s) are in %s", step, value, self.factor, median, self.window, len(samples),
                        ", ".join(shards) or "unknown", self.path)
        return record


def _group_size(group) -> int:
    import torch.distributed as dist

    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather(items: list, group) -> list:
    """Every data-parallel rank's list, in rank order (rows of the global batch)."""
    import torch.distributed as dist

    if _group_size(group) == 1:
        return items
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, items, group=group)
    return [item for part in gathered for item in part]
