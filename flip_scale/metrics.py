"""Metrics: one writer (rank 0) to `metrics.jsonl`, tensorboard and the console."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("flip_scale")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors the scalars to tensorboard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(run_dir) / filename
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except Exception as error:  # tensorboard missing or broken: keep training, say so
                log.warning("tensorboard disabled: %s", error)

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# Dense bf16 tensor-core peak of one GPU, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(device, configured: float = 0.0) -> Optional[float]:
    """The accelerator's peak for MFU: `logging.peak_tflops` if set, else a known GPU's, else None."""
    if configured > 0:
        return float(configured)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    # PCIe / NVL variants of the H100 run at lower clocks; the table keeps SXM figures.
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


class Progress:
    """Step rate and ETA over the steps run in this process (a resumed run starts its own clock)."""

    def __init__(self, start_step: int, max_steps: int):
        self.start_step = start_step
        self.max_steps = max_steps
        self.start_time = time.perf_counter()
        self.last_time = self.start_time
        self.last_step = start_step

    def interval(self, step: int) -> tuple[float, float]:
        """(seconds since the last call, steps since the last call)."""
        now = time.perf_counter()
        elapsed, steps = now - self.last_time, step - self.last_step
        self.last_time, self.last_step = now, step
        return elapsed, steps

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("inf")
        rate = (time.perf_counter() - self.start_time) / done
        return rate * (self.max_steps - step)

    def line(self, step: int, values: dict) -> str:
        extra = ""
        if "mfu" in values:
            extra += f" | MFU {100 * values['mfu']:.1f}%"
        if "data_wait_fraction" in values:
            extra += f" | data {100 * values['data_wait_fraction']:.0f}%"
        return (
            f"step {step}/{self.max_steps} | loss {values['loss']:.4f} | lr {values['lr']:.3e} | "
            f"scale {values['logit_scale']:.2f} | {values['images_per_s']:.1f} img/s{extra} | "
            f"ETA {format_duration(self.eta_seconds(step))}"
        )


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_record(path: Path, key: Optional[str] = None) -> Optional[dict]:
    records = [r for r in read_jsonl(path) if key is None or key in r]
    return records[-1] if records else None
