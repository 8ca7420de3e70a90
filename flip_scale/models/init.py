"""Weight initialisation by parameter name, one seeded generator per parameter.

Every parameter's initial value is a pure function of (seed, its name, its shape). A sharded model
materialised on many ranks therefore gets exactly the weights of the one-process model without any
rank holding the whole model or receiving it from another: each rank draws the full tensor of one
parameter at a time (memory: the largest tensor) and keeps its own shard.

Rules (ViT/MAE and FLIP's code): linear and patch-embedding matrices Xavier-uniform, biases zero,
LayerNorm scale one, CLS token and token embedding N(0, 0.02), text positions N(0, 0.01),
tower projections N(0, width^-1/2), the temperature log(1/0.07) (model.logit_scale_init), the sigmoid loss's bias model.logit_bias_init.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch
from torch import nn


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


def initial_value(name: str, shape, seed: int, logit_scale_init: float = math.log(1 / 0.07),
                  logit_bias_init: Optional[float] = -10.0) -> torch.Tensor:
    """The initial fp32 value (CPU) of the parameter called `name` with full shape `shape`."""
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    generator = _generator(seed, name)
    value = torch.empty(shape, dtype=torch.float32)
    if leaf == "logit_scale":
        return value.fill_(logit_scale_init)
    if leaf == "logit_bias":  # the sigmoid loss's bias (SigLIP: -10)
        return value.fill_(-10.0 if logit_bias_init is None else logit_bias_init)
    if leaf == "bias":
        return value.zero_()
    if owner.startswith("ln"):  # LayerNorm scale
        return value.fill_(1.0)
    if leaf in ("cls_token", "mask_token") or owner == "token_embedding":  # mask_token: MAE's decoder
        return nn.init.normal_(value, std=0.02, generator=generator)
    if leaf == "pos_embed":
        return nn.init.normal_(value, std=0.01, generator=generator)
    if owner == "proj" and ".blocks." not in name:  # tower projection
        return nn.init.normal_(value, std=shape[1] ** -0.5, generator=generator)
    if leaf == "weight" and len(shape) >= 2:  # linear layers and the patch embedding
        nn.init.xavier_uniform_(value.view(shape[0], -1), generator=generator)
        return value
    raise ValueError(f"no initialisation rule for parameter '{name}' of shape {shape}")


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int, logit_scale_init: float = math.log(1 / 0.07),
                          logit_bias_init: Optional[float] = -10.0, select: Optional[Callable[[str], bool]] = None) -> None:
    """Give every parameter of `model` (whole, a pipeline stage, or sharded DTensors) its initial
    value; with `select`, only those whose name it accepts."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        if select is not None and not select(name):
            continue
        full = initial_value(name, param.shape, seed, logit_scale_init, logit_bias_init)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds `full` and keeps its own slice; no communication.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
