"""Run a function on N gloo CPU processes and collect what each rank returns.

    results = run_distributed(fn, world_size=4, args=(...,))   # results[rank] = fn(rank, world, *args)

`fn` must be a module-level function (it is pickled by name). Processes are forked from a
forkserver that has torch imported once, so a process group of 4 starts in about a second instead
of re-importing torch per rank. Each rank runs with one intra-op thread (OMP_NUM_THREADS=1). A rank
that raises, dies or outlives `timeout` fails the call with the rank's traceback or the reason;
the collectives themselves time out too, so a rank left waiting on a dead peer does not hang.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path

_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "flip_scale.models"]
_context = None


def _get_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str, collective_timeout: float,
            backend: str = "gloo") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    out = Path(out_dir) / f"rank{rank}.pkl"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - report anything to the parent
        payload = ("error", traceback.format_exc())
    with open(out.with_suffix(".tmp"), "wb") as f:
        pickle.dump(payload, f)
    os.replace(out.with_suffix(".tmp"), out)


class DistributedRunError(RuntimeError):
    pass


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 180.0, backend: str = "gloo") -> list:
    """fn(rank, world_size, *args) on `world_size` gloo processes -> [result of rank 0, rank 1, ...].
    `backend`: the process group's backend string ("gloo", or a per-device one such as "cpu:gloo").

    Results must be picklable (tensors are fine: they are pickled by value, not shared memory).
    """
    ctx = _get_context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="flip_dist_") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, out_dir, timeout, backend), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        failure = None
        payloads: dict = {}
        try:
            while True:
                alive = [p.is_alive() for p in procs]
                for r in range(world_size):
                    if r not in payloads and (Path(out_dir) / f"rank{r}.pkl").exists():
                        payloads[r] = _load(out_dir, r)
                done = [r in payloads for r in range(world_size)]
                errors = [r for r in sorted(payloads) if payloads[r][0] == "error"]
                if errors:
                    failure = f"rank {errors[0]} raised:\n{payloads[errors[0]][1]}"
                    break
                dead = [r for r in range(world_size) if not alive[r] and not done[r]]
                if dead:
                    failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} without a result"
                    break
                if all(done):
                    break
                if time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if not done[r]]
                    failure = f"ranks {waiting} still running after {timeout:.0f} s (hang?); killed"
                    break
                time.sleep(0.05)
        finally:
            for proc in procs:
                proc.join(timeout=5 if failure is None else 0.5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
        if failure is not None:
            raise DistributedRunError(f"{fn.__name__} on {world_size} ranks: {failure}")
        return [payloads[r][1] for r in range(world_size)]


def _load(out_dir: str, rank: int):
    with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
        return pickle.load(f)
