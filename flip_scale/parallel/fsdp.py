"""ZeRO-3 with FSDP2: parameters, gradients and optimizer state sharded over the data-parallel ranks.

Units (one all-gather / reduce-scatter each): every transformer block of both towers, then each
tower's remaining parameters (patch embedding + CLS + ln_post + proj; token + position embedding
+ ln_final + proj), then the root. Each block prefetches the next one in the forward and the
previous one in the backward (`set_block_prefetch`). With a 2-D mesh (dp_replicate, dp_shard) this is HSDP:
sharded within a dp_shard group, replicated across them.
Under tensor parallelism the mesh must come from the same root mesh as the tp mesh
(`ParallelDims.dp_mesh`); FSDP then shards the tp-local pieces.

Mixed precision: blocks and towers compute in `param_dtype` (bf16 on GPU) with fp32 master
weights and gradients reduced in `reduce_dtype`. The towers and the root do not cast their
forward inputs (FSDP's default would): the masking noise is an input, and bf16 noise has ties
that change which patches a sample keeps. The images are cast to the patch embedding's dtype by a
pre-hook instead.

The temperature (`logit_scale`) is a 0-dim parameter, which `fully_shard` refuses (it wants 1-D).
Rather than change its shape (OpenCLIP's is 0-dim too), it is left out of FSDP: a plain fp32
parameter replicated on every rank, whose gradient a post-accumulate hook averages over the
data-parallel ranks (one number per backward, also under `set_requires_gradient_sync(False)`:
the accumulated part is already equal on every rank, so averaging again is exact).
"""

from __future__ import annotations

import weakref
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def as_dtype(value: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown dtype '{value}'; valid: {', '.join(DTYPES)}")
    return DTYPES[value]


def _cast_images_to_weight_dtype(module: nn.Module, args):
    images = args[0]
    dtype = module.weight.dtype
    if torch.is_floating_point(images) and images.dtype != dtype:
        return (images.to(dtype),) + tuple(args[1:])
    return None


def _average_over_mesh_hook(dp_mesh):
    groups = [dp_mesh.get_group(i) for i in range(dp_mesh.ndim)]
    size = dp_mesh.size()

    def hook(param: torch.Tensor) -> None:
        for group in groups:
            dist.all_reduce(param.grad, group=group)
        param.grad.div_(size)

    return hook


def register_scalar_grad_averaging(model: nn.Module, dp_mesh=None) -> int:
    """Hook every 0-dim parameter (left out of FSDP) so its gradient is averaged over `dp_mesh`.

    Idempotent; call it again after `to_empty`, which replaces the parameter objects (and so
    drops their hooks): without `dp_mesh` it reuses the mesh of the first call. Returns the
    number of parameters newly hooked.
    """
    dp_mesh = dp_mesh if dp_mesh is not None else getattr(model, "_scalar_grad_mesh", None)
    if dp_mesh is None or dp_mesh.size() == 1:  # one data-parallel rank: nothing to average
        return 0
    model._scalar_grad_mesh = dp_mesh
    hooked = model.__dict__.setdefault("_scalar_grad_hooked", weakref.WeakSet())
    count = 0
    for param in model.parameters():
        if param.ndim == 0 and param.requires_grad and param not in hooked:
            param.register_post_accumulate_grad_hook(_average_over_mesh_hook(dp_mesh))
            hooked.add(param)
            count += 1
    return count


def set_block_prefetch(blocks: list) -> None:
    """Explicit prefetch along a tower's block sequence: block i's forward starts the all-gather
    of block i+1, its backward that of block i-1 (the order the blocks run in; checkpointed blocks
    recompute in the same order). One block ahead: at most two blocks' gathered parameters live
    at once, as with FSDP2's implicit backward prefetch; the forward one is not implicit."""
    for index, block in enumerate(blocks):
        if index + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[index + 1]])
        if index > 0:
            block.set_modules_to_backward_prefetch([blocks[index - 1]])


def apply_fsdp(
    model: nn.Module,
    dp_mesh,
    param_dtype: Union[str, torch.dtype] = torch.float32,
    reduce_dtype: Union[str, torch.dtype] = torch.float32,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """`fully_shard` the blocks, the towers and the root of a FLIP model (in place); returns it.

    `reshard_after_forward=False` keeps the gathered parameters from forward to backward (use it
    with pipeline parallelism, or when memory allows, to skip the second all-gather).
    """
    param_dtype, reduce_dtype = as_dtype(param_dtype), as_dtype(reduce_dtype)
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    tower_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    # 0-dim parameters (the temperature): replicated, gradient averaged by a hook (see above).
    scalars = {p for p in model.parameters() if p.ndim == 0}
    register_scalar_grad_averaging(model, dp_mesh)
    common = dict(mesh=dp_mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload,
                  ignored_params=scalars)

    # MAE's decoder (loss.mae_weight > 0) and the EMA image tower (model.masking=attentive) are sharded
    # like a tower: one unit per block, one for the rest (the EMA's shards line up with the online's).
    for tower in (getattr(model, "visual", None), getattr(model, "text", None), getattr(model, "decoder", None),
                  getattr(model, "ema_visual", None)):
        if tower is None:
            continue
        for block in tower.blocks.values():
            fully_shard(block, mp_policy=block_policy, **common)
        set_block_prefetch(list(tower.blocks.values()))
        if getattr(tower, "patch_embed", None) is not None and param_dtype not in (None, torch.float32):
            tower.patch_embed.register_forward_pre_hook(_cast_images_to_weight_dtype)
        if any(not name.startswith("blocks.") for name, _ in tower.named_parameters()):
            fully_shard(tower, mp_policy=tower_policy, **common)
    # The root: whatever is left (nothing in FLIPModel but the ignored temperature); it drives the
    # lazy initialisation and the end-of-backward reduction of all units.
    fully_shard(model, mp_policy=root_policy, **common)
    return model
