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


class StepMetrics:
    """The training metrics of the steps since the last logged one: loss, bad samples and the time
    spent waiting for data are summed per step (`add`); at a logging step (`due`) they are reduced
    once over the data-parallel ranks and turned into the logged values (`collect`, collective).

    images/s, model TFLOP/s per rank (forward + backward, masked tokens only) and MFU (against the
    bf16 peak of a known GPU, or logging.peak_tflops) come from the interval's wall-clock time."""

    def __init__(self, cfg, dims, device, world_size: int, train_flops_per_sample: float, precision: str,
                 start_step: int):
        self.cfg = cfg
        self.dims = dims
        self.device = device
        self.world_size = world_size
        self.flops_per_sample = train_flops_per_sample
        self.progress = Progress(start_step, cfg.train.max_steps)
        peak = peak_tflops(device, cfg.logging.peak_tflops)
        # fp32 runs have another peak: given as logging.peak_tflops they get an MFU too.
        self.peak = peak if peak and (precision == "bf16" or cfg.logging.peak_tflops > 0) else None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.loss_steps, self.skipped, self.data_wait = 0.0, 0, 0, 0.0
        self.mae_sum = None  # the MAE reconstruction loss's sum over kept steps (loss.mae_weight > 0)

    def add(self, loss, skipped_step: bool, skipped_samples: int, data_wait_s: float, mae_loss=None) -> None:
        """One step: its loss (a skipped step's is not finite and stays out of the mean), the bad
        samples its batch met, the seconds it waited for the batch; the MAE loss where there is one."""
        if hasattr(skipped_step, "dtype"):  # decided on the device: summed there, read in `collect`
            import torch

            kept = ~skipped_step
            self.loss_sum = torch.where(kept, loss.detach().double(), 0.0) + self.loss_sum
            self.loss_steps = kept.long() + self.loss_steps
            if mae_loss is not None:
                self.mae_sum = torch.where(kept, mae_loss.detach().double(), 0.0) + (0.0 if self.mae_sum is None else self.mae_sum)
        elif not skipped_step:
            self.loss_sum += float(loss)
            self.loss_steps += 1
            if mae_loss is not None:
                self.mae_sum = (0.0 if self.mae_sum is None else self.mae_sum) + float(mae_loss)
        self.skipped += int(skipped_samples)
        self.data_wait += data_wait_s

    def due(self, step: int) -> bool:
        every = self.cfg.train.log_every_steps
        return step % every == 0 or step == self.cfg.train.max_steps or step == 1

    def collect(self, step: int) -> tuple[dict, int]:
        """(the interval's values, the bad samples every rank met in it); collective over the
        data-parallel group. Every rank skips the same steps, so the step counts agree."""
        from .runtime import reduce_float

        group, device, batch = self.dims.dp_group, self.device, self.cfg.train.global_batch_size
        self.loss_sum, self.loss_steps = float(self.loss_sum), int(self.loss_steps)  # the window's one host read
        loss = (reduce_float(self.loss_sum / self.loss_steps, group, device) / self.dims.dp_size
                if self.loss_steps else float("nan"))
        skipped = int(reduce_float(self.skipped, group, device))
        # The slowest rank's loader holds every rank back: its wait is the one that counts.
        wait = reduce_float(self.data_wait, group, device, "max")
        elapsed, steps = self.progress.interval(step)
        elapsed = max(elapsed, 1e-9)
        tflops = self.flops_per_sample * batch * steps / elapsed / self.world_size / 1e12
        values = {
            "loss": loss,
            **({} if self.mae_sum is None else {"mae_loss": reduce_float(
                float(self.mae_sum) / max(self.loss_steps, 1), group, device) / self.dims.dp_size}),
            "images_per_s": batch * steps / elapsed,
            # Model FLOPs (forward + backward, masked tokens only) per second per rank.
            "tflops_per_s_per_rank": tflops,
            # Share of the interval spent waiting for the next batch (data-bound when high).
            "data_wait_fraction": min(1.0, wait / elapsed),
        }
        if self.peak:
            values["mfu"] = tflops / self.peak
        finite_loss = not self.loss_steps or math.isfinite(loss)
        self._reset()
        if not finite_loss:
            raise FloatingPointError(f"loss is {loss} at step {step}: stopping (lower optim.lr or check the data)")
        return values, skipped

    def line(self, step: int, values: dict) -> str:
        return self.progress.line(step, values)
