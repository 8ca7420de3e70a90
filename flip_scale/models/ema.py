"""The EMA image tower of attentive token removal (`model.masking: attentive`, A-CLIP).

`FLIPModel.ema_visual` is a second `VisionTower` of the same shape as `visual`. It is never
trained (models/lock.py freezes it: no gradient, no optimizer state, not in the grad norm) and
never masked; after every optimizer step it moves towards the online tower,

    ema = decay * ema + (1 - decay) * online        (model.ema_decay)

and it starts equal to it (at build and after --init-from). Both towers are split the same way by
every layout (the same FSDP2 units and tensor-parallel plan), so each rank's shard of an EMA
parameter lines up element for element with its shard of the online one: the update is local,
with no communication, and the result is the one-process update on every layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .lock import canonical_name


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A sharded or tensor-parallel parameter (a DTensor): this rank's piece, a view of its storage.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def ema_pairs(module: nn.Module) -> list:
    """[(ema parameter, online parameter)] of a FLIP model (or a wrapper with `.module`), matched by
    name; [] without an EMA tower."""
    module = getattr(module, "module", module)
    ema = getattr(module, "ema_visual", None)
    if ema is None:
        return []
    online = {canonical_name(name): param for name, param in module.visual.named_parameters()}
    pairs = []
    for name, param in ema.named_parameters():
        key = canonical_name(name)
        if key not in online or online[key].shape != param.shape:
            raise ValueError(f"EMA tower parameter '{key}' has no online counterpart of shape {tuple(param.shape)}")
        pairs.append((param, online[key]))
    return pairs


@torch.no_grad()
def reset_ema_(module: nn.Module) -> int:
    """EMA tower := online tower (this rank's shards); returns the number of tensors copied."""
    pairs = ema_pairs(module)
    for ema, online in pairs:
        _local(ema).copy_(_local(online))
    return len(pairs)


@torch.no_grad()
def update_ema_(module: nn.Module, decay: float, skipped: Optional[torch.Tensor] = None) -> int:
    """ema = decay * ema + (1 - decay) * online, in place on this rank's shards. `skipped` (a 0-dim
    bool tensor: a non-finite step decided on the device) leaves the EMA as it is where true,
    without a host read. Returns the number of tensors updated."""
    pairs = ema_pairs(module)
    if not pairs:
        return 0
    emas = [_local(ema) for ema, _ in pairs]
    onlines = [_local(online).to(local.dtype) for (_, online), local in zip(pairs, emas)]
    if skipped is None:  # one fused kernel per device and dtype, not one per tensor
        torch._foreach_mul_(emas, decay)
        torch._foreach_add_(emas, onlines, alpha=1.0 - decay)
        return len(pairs)
    weight = (1.0 - decay) * (~skipped).float()
    for local, source in zip(emas, onlines):
        step = weight.to(local.device, local.dtype)
        local.mul_(1.0 - step).add_(source * step)
    return len(pairs)
