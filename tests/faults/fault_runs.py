"""Start the real `flip-train` as N rank processes (no torchrun between: the test holds each rank's
pid to kill or stop it), wait for a moment of the run, and read what the run left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_utils import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent


def tiny_overrides(data_dir: Path, steps: int, every: int, *extra: str) -> list[str]:
    """A run of a few fast steps on the session's synthetic shards, a loss logged every step."""
    return [
        f"data.synthetic_dir={data_dir}",
        f"data.train_shards={data_dir}/train-{{000000..000007}}.tar",
        f"data.tokenizer={data_dir}/tokenizer.model",
        f"train.max_steps={steps}", f"checkpoint.every_steps={every}", "train.log_every_steps=1",
        "train.global_batch_size=16", "data.num_workers=0", "data.shuffle_buffer=50", "eval.at_end=false",
        "logging.tensorboard=false", "train.device=cpu", *extra,
    ]


class Ranks:
    """`world` rank processes of one flip-train run; their output goes to run_dir/rank<r>.log."""

    def __init__(self, run_dir: Path, args: list[str], world: int = 2, env: dict | None = None,
                 entry: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.logs, self.procs = [], []
        for rank in range(world):
            rank_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(rank),
                            WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port), **(env or {}))
            log = open(self.run_dir / f"rank{rank}.log", "ab")
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, *(entry or ["-m", "flip_scale.train"]), "--run-dir",
                                                str(self.run_dir), *args], cwd=self.run_dir.parent, env=rank_env,
                                               stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"flip-train ranks did not finish within {timeout} s:\n{self.output()}") from None
        for log in self.logs:
            log.close()
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()

    def output(self, rank: int | None = None) -> str:
        ranks = range(len(self.procs)) if rank is None else [rank]
        return "\n".join((self.run_dir / f"rank{r}.log").read_text(errors="replace") for r in ranks)


def wait_for(predicate, timeout: float, what: str, ranks: Ranks | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if ranks is not None and any(p.poll() is not None for p in ranks.procs):
            raise AssertionError(f"a rank exited before {what}:\n{ranks.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s" + (f"\n{ranks.output()}" if ranks else ""))
        time.sleep(poll)


def logged_steps(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip().endswith("}"))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the metrics file (a resumed run's lines replace the earlier ones of a step)."""
    import json

    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out
