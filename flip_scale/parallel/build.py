"""Build the model parts of a config on a layout, in torchtitan's order:

    meta-device model -> tensor parallel -> activation checkpointing -> compiled blocks -> FSDP2
    (ZeRO-3) -> [pipeline split before all of these, one call per stage] -> materialise + initialise

    dims = ParallelDims.from_config(...); dims.build_mesh(device.type)   # dims carries its mesh
    parts, pipe = build_model_parts(cfg, dims, device)                    # training and evaluation alike

Initialisation: every parameter's initial value is a pure function of (seed, its name, its shape)
(`flip_scale.models.init`), so after materialising (`to_empty`) each rank draws the full tensor of
one parameter at a time and keeps its own shard (`distribute_tensor(..., src_data_rank=None)`): no
communication, no rank ever holds the whole model (peak: the largest tensor), and any layout
starts from the weights of the one-process model, bit for bit. Training from a checkpoint loads
shards directly with DCP.

Pipeline parallelism plugs in between FSDP and materialisation: split the meta model into stages
first (a stage keeps a slice of each tower's `blocks` ModuleDict, the others set to None), then
call `parallelize_model` on each stage module (as torchtitan does), with
`reshard_after_forward=False` (done here when dims.pp > 1).
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import apply_ac, apply_compile
from .dims import ParallelDims
from .fsdp import apply_fsdp, register_scalar_grad_averaging
from .tensor import apply_tp


def build_model_parts(cfg, dims: ParallelDims, device) -> tuple[list[nn.Module], object]:
    """This rank's model parts of `cfg.model` on the layout `dims` (whose mesh is built):
    ([the whole model], None) without pipeline parallel, else (this rank's stage modules, the
    `FLIPPipeline` running them). The model is built on the meta device here and never exists
    whole on one rank."""
    from flip_scale.models import build_model, lock_model

    model = build_model(cfg.model, device="meta", mae_decoder=cfg.loss.mae_weight > 0)
    if dims.pp_enabled:
        parts, pipe = parallelize_pipeline(model, dims, cfg, device)
    else:
        parts, pipe = [parallelize_model(model, dims, cfg, device)], None
    for part in parts:  # locked towers (LiT): again on the built parts, whose parameters TP/FSDP replaced
        lock_model(part, cfg.model)
    return parts, pipe


def mixed_precision_dtypes(cfg, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype, reduce_dtype) for FSDP: fp32 on the CPU, or where the resolved precision is fp32
    (train.precision=fp32, or "auto" on a GPU without bf16: the weights are not cast for a step that
    runs without autocast)."""
    from ..runtime import resolve_precision
    from .fsdp import as_dtype

    if torch.device(device).type == "cpu" or resolve_precision(cfg, device) == "fp32":
        return torch.float32, torch.float32
    return as_dtype(cfg.parallel.param_dtype), as_dtype(cfg.parallel.reduce_dtype)


def reference_state_dict(model_cfg, seed: int, mae_decoder: bool = False) -> dict:
    """The state dict of the one-process model: `torch.manual_seed(seed); build_model(model_cfg)` (CPU).

    The global RNG state is left as it was.
    """
    from flip_scale.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model_cfg, device="cpu", mae_decoder=mae_decoder).state_dict()


@torch.no_grad()
def init_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers (the fixed sin-cos position table) after `to_empty`."""
    from flip_scale.models.vit import sincos_2d_position_embedding

    for visual in (getattr(model, "visual", None), getattr(model, "ema_visual", None)):
        if (visual is not None and getattr(visual, "pos_embed", None) is not None
                and getattr(visual, "pos_embed_kind", "sincos") == "sincos"):  # a learned table is a parameter
            table = sincos_2d_position_embedding(visual.pos_embed.shape[1], visual.arch.grid_size)
            visual.pos_embed.copy_(torch.from_numpy(table).to(visual.pos_embed.dtype))
    if getattr(model, "decoder", None) is not None:  # MAE's decoder: its own table
        model.decoder.init_weights()


def materialize_and_init(model: nn.Module, model_cfg, seed: int, device, cpu_offload: bool = False) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on `device` and give it the one-process weights.

    With `cpu_offload` (FSDP2's CPUOffloadPolicy) the sharded parameters live in host memory; the
    buffers and the parameters FSDP does not manage (the temperature) still go to `device`.
    """
    from torch.distributed.tensor import DTensor

    device = torch.device(device)
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    if cpu_offload and device.type != "cpu":
        with torch.no_grad():
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    setattr(module, name, buffer.to(device))
            for param in model.parameters():
                if not isinstance(param, DTensor):
                    param.data = param.data.to(device)
    from flip_scale.models.init import initialize_parameters

    register_scalar_grad_averaging(model)  # to_empty replaced the parameters, and dropped their hooks
    # Each parameter's initial value is a function of (seed, name), so every rank draws one full
    # tensor at a time and keeps its shard: no communication, no rank ever holds the whole model,
    # and the weights equal those of the one-process model.
    initialize_parameters(model, seed, model_cfg.logit_scale_init, getattr(model_cfg, "logit_bias_init", None))
    init_buffers(model)
    from flip_scale.models.ema import reset_ema_

    reset_ema_(model)  # the attentive masking's EMA tower starts as the online one (shard by shard)
    return model


def parallelize_pipeline(model: nn.Module, dims: ParallelDims, cfg, device):
    """Split a meta-device FLIP model into this rank's pipeline stages, parallelise each, and wrap
    them in the configured schedule. Returns (stage modules, `FLIPPipeline`).

    Gradient accumulation under pipelining is more micro-batches through the same exact feature
    cache: the schedule runs `parallel.microbatches x optim.grad_accum_steps` micro-batches.
    """
    from .pipeline import build_pipeline, build_stage_modules, num_stages, split_stages

    pcfg = cfg.parallel
    specs = split_stages(model.arch, cfg.model.mask_ratio, num_stages(dims.pp, pcfg.pp_schedule))
    modules = build_stage_modules(model, specs, dims.pp_rank, dims.pp, pcfg.pp_schedule)
    modules = [parallelize_model(module, dims, cfg, device) for module in modules]
    microbatches = (pcfg.microbatches or 2 * dims.pp) * cfg.optim.grad_accum_steps  # 0: not set, 2 x pp
    pipe = build_pipeline(modules, dims.pp_mesh, pcfg.pp_schedule, microbatches, device)
    return modules, pipe


def parallelize_model(
    model: nn.Module,
    dims: ParallelDims,
    cfg,
    device,
    sequence_parallel: bool = True,
) -> nn.Module:
    """Tensor parallel -> activation checkpointing -> FSDP2 -> materialise + initialise.

    `model` is built on the meta device; `cfg` is the full `Config` (parallel, model, train.seed);
    `dims` carries the mesh (`dims.build_mesh` first; with one rank it has none).
    FSDP2 wraps the model when `dims.fsdp_enabled` (dp > 1, or tp > 1). With one rank this
    materialises, initialises and applies checkpointing only.
    """
    device = torch.device(device)
    pcfg = cfg.parallel
    if dims.tp_enabled:
        apply_tp(model, dims.tp_mesh, sequence_parallel=sequence_parallel)
    apply_ac(model, pcfg.activation_checkpointing, pcfg.activation_checkpointing_every,
             pcfg.activation_checkpointing_towers)
    if pcfg.compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        param_dtype, reduce_dtype = mixed_precision_dtypes(cfg, device)
        apply_fsdp(
            model,
            dims.dp_mesh,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            cpu_offload=pcfg.cpu_offload,
            reshard_after_forward=not dims.pp_enabled,
        )
    materialize_and_init(model, cfg.model, cfg.train.seed, device, cpu_offload=pcfg.cpu_offload and dims.fsdp_enabled)
    return model
