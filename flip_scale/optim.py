"""AdamW with decay / no-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .config import Config, effective_lr

log = logging.getLogger("flip_scale.optim")

# Parameters that never decay, by name: position embeddings and the temperature
# (FLIP's code: biases, norm scales and position embeddings; the temperature and the sigmoid loss's
# logit bias too, as OpenCLIP).
NO_DECAY_NAMES = ("pos_embed", "logit_scale", "logit_bias", "cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norms, embeddings of position and the temperature do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 partitioned parameter holds a flat slice; its full shape is `ds_shape`.
        ndim = len(getattr(param, "ds_shape", param.shape))
        if ndim <= 1 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Devices with a fused AdamW kernel in PyTorch. On the CPU the fused kernel is several times faster
# than the foreach path (one pass over each parameter, no whole-model temporaries: ~1.5 s against
# ~10 s for B/16's 140M parameters on 2 cores, see BENCHMARKS.md).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def _use_fused(setting: str, device: torch.device) -> bool:
    if setting == "true":
        return True
    if setting == "false":
        return False
    return device.type in FUSED_ADAMW_DEVICES


def nvidia_apex_available() -> bool:
    """True only for NVIDIA's apex (the PyPI package named `apex` is an unrelated toolkit)."""
    try:
        import apex  # noqa: F401
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:
        return False
    return True


def apex_fused_adam_usable(model: nn.Module, device: torch.device) -> bool:
    """NVIDIA apex's FusedAdam is used only where it works: apex importable (and NVIDIA's), a CUDA
    device, and plain-tensor parameters. FSDP2 and tensor parallel hold DTensors, which apex's
    kernels do not take; PyTorch's fused AdamW does, so sharded runs use that."""
    if device.type != "cuda" or not nvidia_apex_available():
        return False
    from torch.distributed.tensor import DTensor

    return not any(isinstance(param, DTensor) for param in model.parameters())


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: apex's FusedAdam (AdamW mode) where usable and optim.fused allows a fused kernel, else
    PyTorch's AdamW (its fused kernel on CUDA and CPU by default, foreach with optim.fused=false).
    `optimizer.flip_kind` names it."""
    groups = param_groups(model, cfg.optim.weight_decay)
    if cfg.optim.fused != "false" and apex_fused_adam_usable(model, device):
        from apex.optimizers import FusedAdam

        optimizer = FusedAdam(groups, lr=effective_lr(cfg), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                              adam_w_mode=True)
        optimizer.flip_kind = "apex FusedAdam (AdamW mode)"
    else:
        fused = _use_fused(cfg.optim.fused, device)
        optimizer = torch.optim.AdamW(
            groups,
            lr=effective_lr(cfg),
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            fused=fused if fused else None,
            foreach=None if fused else True,
        )
        optimizer.flip_kind = f"PyTorch AdamW ({'fused' if fused else 'foreach'})"
    log.info("optimizer: %s", optimizer.flip_kind)
    return optimizer


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then cosine to min_lr."""
    peak = effective_lr(cfg)
    warmup = cfg.schedule.warmup_steps
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule.name == "constant":
        return peak
    total = max(1, cfg.train.max_steps - warmup)
    progress = min(1.0, (step - warmup) / total)
    return cfg.schedule.min_lr + 0.5 * (peak - cfg.schedule.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    peak = effective_lr(cfg)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / peak if peak else 0.0)


class OptimizerGroup:
    """The optimizers of this rank's model parts (one part, or several pipeline stages), stepped
    together, each with its own identical lr schedule."""

    def __init__(self, model_parts: list[nn.Module], cfg: Config, device: torch.device):
        self.optimizers = [build_optimizer(part, cfg, device) for part in model_parts]
        self.schedulers = [build_scheduler(optimizer, cfg) for optimizer in self.optimizers]

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()

    def skip(self) -> None:
        """A step whose gradients are dropped: the weights stay, the lr schedule moves on."""
        for scheduler in self.schedulers:
            scheduler.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    # The lr schedule's position (all schedulers move together), for checkpoints.
    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state)
