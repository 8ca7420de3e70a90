"""Parallelism applied to a FLIP model from outside, in torchtitan's order (`build.py`).

    dims = ParallelDims.from_config(cfg.parallel, world_size, arch, cfg.train.global_batch_size,
                                    cfg.optim.grad_accum_steps)       # refuses impossible layouts
    dims.build_mesh(device.type)                                      # dims carries its mesh
    parts, pipe = build_model_parts(cfg, dims, device)                # TP -> AC -> compile -> FSDP -> materialise
    loss_fn = ContrastiveLoss(dims.dp_group)                          # gathers over data parallel only
    ...
    clip_grad_norm_(parameters, cfg.optim.grad_clip, dims)

    dims.py        ParallelDims: the layout, its checks and its mesh
    tensor.py      tensor-parallel plans (Megatron column/row + sequence parallel)
    activation.py  activation checkpointing and compiled blocks
    fsdp.py        FSDP2 (ZeRO-3) with mixed precision
    pipeline*.py   the pipeline split, schedules and the two-pass feature cache across stages
    build.py       the order they are applied in, materialisation and initialisation
    utils.py       global gradient norm and clipping, parameter counts

This module only re-exports.
"""

from .activation import apply_ac, apply_compile, checkpoint_module
from .build import (
    build_model_parts, init_buffers, materialize_and_init, mixed_precision_dtypes, parallelize_model,
    parallelize_pipeline, reference_state_dict,
)
from .dims import MESH_DIM_NAMES, LayoutError, ParallelDims
from .fsdp import apply_fsdp, register_scalar_grad_averaging  # noqa: F401
from .tensor import apply_tp, replicate_partial_gradients
from .utils import (
    clip_grad_norm_,
    describe_parameter_counts,
    local_parameter_count,
    optimizer_state_bytes,
    parameter_counts_per_rank,
    shard_bytes,
    total_grad_norm,
)

__all__ = [
    "MESH_DIM_NAMES", "LayoutError", "ParallelDims", "apply_ac", "apply_compile", "apply_fsdp", "apply_tp",
    "build_model_parts", "checkpoint_module", "clip_grad_norm_", "describe_parameter_counts", "init_buffers",
    "local_parameter_count", "materialize_and_init", "mixed_precision_dtypes", "optimizer_state_bytes",
    "parallelize_model", "parallelize_pipeline", "parameter_counts_per_rank", "reference_state_dict",
    "replicate_partial_gradients", "shard_bytes", "total_grad_norm",
]
