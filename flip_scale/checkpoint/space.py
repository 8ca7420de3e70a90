"""Whether the run directory can hold the checkpoints the run will keep, checked at start.

A checkpoint holds, per parameter, its fp32 value and AdamW's two fp32 moments: 12 bytes (the
small files are noise beside that). The run keeps `checkpoint.keep_last` of them plus the one being
written (every one planned when keep_last is 0). Too little for all of them: a warning with both
numbers; too little for even one: refused before anything heavy is built.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("flip_scale.checkpoint")

BYTES_PER_PARAMETER = 12  # fp32 weight + fp32 exp_avg + fp32 exp_avg_sq


class NotEnoughSpace(RuntimeError):
    pass


def expected_checkpoint_bytes(parameters: int) -> int:
    return int(parameters) * BYTES_PER_PARAMETER


def checkpoints_on_disk(cfg, max_steps: int) -> int:
    """The most checkpoints the run directory holds at once: keep_last + the one being written."""
    every = int(cfg.every_steps or 0)
    planned = (max_steps // every if every > 0 else 0) + 1  # the periodic ones and the final one
    kept = planned if cfg.keep_last <= 0 else min(planned, cfg.keep_last + 1)
    if cfg.keep_every:
        kept = min(planned, kept + max_steps // cfg.keep_every)
    return max(1, kept)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_free_space(run_dir: Path, parameters: int, cfg, max_steps: int) -> str:
    """Warn (and return the warning) when `run_dir` cannot hold every checkpoint the run keeps;
    raise NotEnoughSpace when it cannot hold one."""
    run_dir = Path(run_dir)
    free = shutil.disk_usage(run_dir).free
    one = expected_checkpoint_bytes(parameters)
    count = checkpoints_on_disk(cfg, max_steps)
    if free < one:
        raise NotEnoughSpace(
            f"{run_dir} has {_gib(free)} free and one checkpoint needs about {_gib(one)} ({parameters} parameters x "
            f"{BYTES_PER_PARAMETER} bytes: fp32 weights + AdamW moments): free space or choose another --run-dir")
    if free < one * count:
        message = (f"{run_dir} has {_gib(free)} free, and the run keeps up to {count} checkpoints of about {_gib(one)} "
                   f"({_gib(one * count)}; checkpoint.keep_last={cfg.keep_last} + the one being written): saves will "
                   f"fail when the disk fills (each failure is logged and training goes on)")
        log.warning("%s", message)
        return message
    return ""
