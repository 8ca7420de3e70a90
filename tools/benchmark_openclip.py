"""The OpenCLIP side of `tools/benchmark.py --compare-openclip`, the timing of both trainers, and
the peak a device's MFU is measured against.

The same architecture as a flip_scale config, built in open_clip (`convert/openclip_config.py` maps
the config; its refusals name the option OpenCLIP cannot express), with its own PatchDropout at the
config's mask ratio, its ClipLoss and torch's AdamW with default arguments (OpenCLIP's training
defaults). Both trainers take the same batches in the same process, one step each in turn.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time

import torch


def refuse_for_openclip(cfg, world_size: int) -> None:
    """Raise ValueError naming the setting when a config cannot be compared with OpenCLIP."""
    from flip_scale.checkpoint.safety import ConvertError
    from flip_scale.convert.openclip_config import check_exportable

    if world_size > 1:
        raise ValueError(f"--compare-openclip runs in one process; this run has {world_size} ranks. "
                         "Valid: a one-process layout (no torchrun, parallel.dp_shard/tp/pp = 1)")
    if cfg.optim.grad_accum_steps != 1:
        raise ValueError(f"--compare-openclip: optim.grad_accum_steps={cfg.optim.grad_accum_steps} is not built on the "
                         "OpenCLIP side (its accum_freq is a different loop). Valid: optim.grad_accum_steps=1")
    if cfg.parallel.activation_checkpointing == "selective":
        raise ValueError("--compare-openclip: parallel.activation_checkpointing=selective has no OpenCLIP equivalent "
                         "(its grad_checkpointing recomputes every block). Valid: none, or full (both sides "
                         "recompute every block)")
    if cfg.parallel.engine != "fsdp":
        raise ValueError(f"--compare-openclip: parallel.engine={cfg.parallel.engine}; the comparison is of the native "
                         "engine. Valid: parallel.engine=fsdp")
    try:
        check_exportable(cfg.model, text_eos_pool=True)  # eos pooling: the cost of causal text is the same
    except ConvertError as error:
        raise ValueError(f"--compare-openclip: {error}") from None


def build_openclip(cfg, device: torch.device, compile_model: bool = False):
    """-> (model, loss, optimizer) of OpenCLIP for `cfg.model`, PatchDropout at `cfg.model.mask_ratio`."""
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP

    from flip_scale.convert.openclip_config import openclip_model_config

    model_cfg = openclip_model_config(cfg.model, text_eos_pool=True)
    model_cfg["vision_cfg"]["patch_dropout"] = float(cfg.model.mask_ratio)
    model = CLIP(**model_cfg).to(device).train()
    if cfg.parallel.activation_checkpointing == "full":  # every block of the same towers recomputed, as ours
        towers = cfg.parallel.activation_checkpointing_towers
        model.visual.set_grad_checkpointing(towers in ("both", "vision"))
        model.transformer.grad_checkpointing = towers in ("both", "text")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.optim.weight_decay)
    if compile_model:
        model = torch.compile(model)
    return model, ClipLoss(), optimizer


class OpenClipStepper:
    """One OpenCLIP training step per call: forward, ClipLoss, backward, AdamW, the temperature clamp."""

    def __init__(self, cfg, device: torch.device, precision: str, compile_model: bool = False):
        self.model, self.loss, self.optimizer = build_openclip(cfg, device, compile_model)
        self.device = device
        self.bf16 = precision == "bf16"

    def autocast(self):
        if self.bf16:  # OpenCLIP's amp_bf16
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: dict) -> None:
        images = batch["images"].to(self.device, non_blocking=True)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            image_features, text_features, logit_scale = self.model(images, tokens)
            loss = self.loss(image_features, text_features, logit_scale)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            getattr(self.model, "_orig_mod", self.model).logit_scale.clamp_(0, 4.6052)


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, batch, device) -> float:
    sync(device)
    started = time.perf_counter()
    step(batch)
    sync(device)
    return time.perf_counter() - started


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def interleave(steppers: dict, batches: list, device: torch.device) -> dict:
    """{name: [step seconds]}: every stepper takes batch i in turn before any takes batch i + 1, so a
    change in the machine's load (shared cores) falls on all of them alike."""
    times = {name: [] for name in steppers}
    for batch in batches:
        for name, step in steppers.items():
            times[name].append(timed(step, batch, device))
    return times


def summary(seconds: list, batch: int) -> dict:
    median = statistics.median(seconds)
    return {"step_s": median, "images_per_s": batch / median, "step_s_min": min(seconds), "step_s_max": max(seconds)}


# GPU peaks (dense bf16 TFLOP/s per device) for MFU; elsewhere the peak is measured (a large matmul)
# unless --peak-tflops gives it.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0, "GH200": 989.0}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, reps: int = 3,
                       enough_s: float = 0.05) -> float:
    """The best of `reps` square matmuls: the compute this device reaches at all, a ceiling for MFU.
    From 256 the side doubles up to `size` while one product takes under `enough_s`, so that a dtype
    this CPU only emulates (bf16 without AVX-512 BF16: a 2048 product takes a minute) stays quick."""
    side, best = 128, 0.0
    while side < size and best < enough_s:
        side *= 2
        a = torch.randn(side, side, device=device, dtype=dtype)
        b = torch.randn(side, side, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(reps + 1):  # the first is a warm-up
            best = min(best, timed(lambda _, a=a, b=b: a @ b, None, device))
    return 2 * side**3 / best / 1e12


def peak_tflops(given: float, device: torch.device, precision: str) -> tuple[float, str]:
    """(TFLOP/s, where the figure comes from): `given` if set, a known GPU's bf16 peak, else measured."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, value in BF16_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name} dense bf16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return matmul_peak_tflops(device, dtype), f"measured {str(dtype).split('.')[-1]} matmul"
