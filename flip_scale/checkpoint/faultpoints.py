"""Named points inside a checkpoint save where the fault-injection tests pause or fail a rank.

    FLIP_SCALE_TEST_PAUSE=<point>[@<step>][/<rank>]:<seconds>   sleep there (the test kills the job meanwhile)
    FLIP_SCALE_TEST_FAIL=<point>[@<step>][/<rank>]              raise OSError(EROFS) there

Without `@step` the first save that reaches the point is meant (every save for a pause), without
`/rank` every rank. A failure is raised at `dcp_write` and `renamed` only (phases whose failure
every rank agrees on, checkpoint/manager.py). The points, in the order a save reaches them:

  dcp_write   inside torch.distributed.checkpoint's (synchronous) write: this rank's shard files are written,
              `.metadata` is not (DCP's coordinator writes it once every rank has written)
  mid_save    every file of `step_XXXXXXXX.tmp/` is written, the rename has not happened
  renamed     rank 0 has renamed `.tmp` to `step_XXXXXXXX/`, `latest` still names the previous one

With neither variable set a save pays one environment lookup per point and nothing else: the DCP
write goes through DCP's own writer (`dcp_writer` returns None).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("flip_scale.checkpoint")

PAUSE_ENV, FAIL_ENV = "FLIP_SCALE_TEST_PAUSE", "FLIP_SCALE_TEST_FAIL"
POINTS = ("dcp_write", "mid_save", "renamed")
FAIL_POINTS = ("dcp_write", "renamed")  # inside a phase whose failure the ranks agree on
_SETTING = re.compile(r"^(?P<point>[a-z_]+)(?:@(?P<step>\d+))?(?:/(?P<rank>\d+))?$")


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _matches(where: str, point: str, step: int, variable: str) -> bool:
    found = _SETTING.match(where)
    points = FAIL_POINTS if variable == FAIL_ENV else POINTS
    if found is None or found["point"] not in points:
        raise ValueError(f"{variable}={os.environ.get(variable)!r}: expected <point>[@<step>][/<rank>] with a point "
                         f"of {', '.join(points)}")
    return (found["point"] == point and (found["step"] is None or int(found["step"]) == step)
            and (found["rank"] is None or int(found["rank"]) == _rank()))


def armed(point: str) -> bool:
    """Whether either variable names `point` (cheap: the environment only)."""
    return any(os.environ.get(variable, "").startswith(point) for variable in (PAUSE_ENV, FAIL_ENV))


def reach(point: str, step: int) -> None:
    """The save of `step` is at `point` on this rank: pause or fail as the variables say."""
    pause = os.environ.get(PAUSE_ENV, "")
    if ":" in pause:
        where, seconds = pause.rsplit(":", 1)
        if _matches(where, point, step, PAUSE_ENV):
            log.warning("%s: rank %d pausing %s s at %s of step %d", PAUSE_ENV, _rank(), seconds, point, step)
            time.sleep(float(seconds))
    fail = os.environ.get(FAIL_ENV, "")
    if fail and _matches(fail, point, step, FAIL_ENV):
        os.environ.pop(FAIL_ENV)  # once: the next save of this run succeeds
        log.warning("%s: rank %d failing the save of step %d at %s", FAIL_ENV, _rank(), step, point)
        raise OSError(errno.EROFS, f"Read-only file system ({FAIL_ENV} at {point})")


def step_of_dir(path) -> int:
    """The step of `step_XXXXXXXX` or `step_XXXXXXXX.tmp`."""
    found = re.search(r"step_(\d+)", Path(path).name)
    return int(found.group(1)) if found else -1


def dcp_writer(path) -> Optional[object]:
    """DCP's file writer with the `dcp_write` point after this rank's write, when a variable
    names it; else None (DCP makes its own writer from the checkpoint id)."""
    if not armed("dcp_write"):
        return None
    from torch.distributed.checkpoint import FileSystemWriter

    class _PointWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            written = super().write_data(plan, planner)
            written.wait()
            reach("dcp_write", step_of_dir(path))
            return written

    return _PointWriter(str(path))
