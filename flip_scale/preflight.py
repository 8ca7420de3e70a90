"""Every check of a run that needs the world size, done once, before anything is built.

    plan = plan_run(cfg, world_size, tokenizer_vocab)   # ConfigError / LayoutError naming what is wrong
    print(describe_plan(plan))                          # what `flip-train --dry-run` prints

`flip-train --dry-run`, the `Trainer`, `flip-eval` and the unmask tool all call `plan_run`, so a
layout that one of them accepts the others accept too, and a job refused at start-up is refused
on the login node first. The checks:

  - the layout against the world, the model and the batch (`ParallelDims.from_config`: the product
    of the axes, heads and MLP widths divisible by tp, blocks enough for the pipeline stages,
    micro-batches the schedule accepts, a batch that splits over dp x micro-batches x accumulation);
  - options the layout rules out (per-micro-batch contrast under pipeline parallel);
  - the data streams (`data.streams` divisible by the data-parallel size, dividing the batch);
  - the tokenizer's size against `model.vocab_size`, when the tokenizer is at hand.

Evaluation (`training=False`) checks the layout against the model only: the checkpoint's training
batch does not constrain how it is evaluated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError, effective_lr
from .models import arch_from_config
from .models.masking import visible_count
from .parallel.dims import ParallelDims


@dataclass
class RunPlan:
    """The resolved facts of a run on `world_size` ranks (no mesh, no model: nothing is built)."""

    cfg: Config
    world_size: int
    arch: object  # models.FlipArch
    dims: ParallelDims
    local_batch: int  # samples per data-parallel rank and step
    streams: int  # sample streams of the data (data.streams, or the count a fresh run picks)
    tokenizer_vocab: Optional[int] = None  # the tokenizer's size where it was checked
    # parallel.engine=deepspeed: the DeepSpeed config generated (and merged with
    # parallel.deepspeed_config) for the precision a GPU run resolves to; the engine regenerates
    # it for the device in hand.
    engine_config: Optional[dict] = None
    num_shards: int = 0  # training shards the pattern names (it chooses the default stream count)

    @property
    def visible_patches(self) -> int:
        """Image patches that enter the encoder at the configured mask ratio."""
        return visible_count(self.arch.num_patches, self.cfg.model.mask_ratio)


def check_determinism(cfg: Config, env=None) -> None:
    """train.deterministic on a GPU with a CUBLAS_WORKSPACE_CONFIG cuBLAS would not make
    deterministic: refused here, not at the first matrix product."""
    from .runtime import CUBLAS_WORKSPACE_VALUES, cublas_workspace_error

    value = (os.environ if env is None else env).get("CUBLAS_WORKSPACE_CONFIG")
    if cfg.train.deterministic and cfg.train.device != "cpu" and value and value not in CUBLAS_WORKSPACE_VALUES:
        raise ConfigError(cublas_workspace_error(value))


def check_layout_options(cfg: Config, dims: ParallelDims) -> None:
    """Options the layout rules out (and the deterministic mode's cuBLAS setting)."""
    check_determinism(cfg)
    if dims.pp_enabled and cfg.loss.microbatch_contrast != "exact":
        raise ConfigError("loss.microbatch_contrast=per_microbatch is not available with pipeline parallel "
                          "(parallel.pp > 1); use exact")
    if cfg.parallel.reduce_every_microbatch == "true" and (dims.pp_enabled or cfg.parallel.engine != "fsdp"):
        raise ConfigError("parallel.reduce_every_microbatch=true is for parallel.engine=fsdp without pipeline "
                          "parallel (the pipeline schedule and DeepSpeed accumulate by their own rule); valid here: "
                          "auto or false")


def check_tokenizer_size(cfg: Config, vocab_size: int, arch) -> None:
    if vocab_size > arch.vocab_size:
        raise ConfigError(
            f"the tokenizer {cfg.data.tokenizer} has {vocab_size} tokens but model.vocab_size is "
            f"{arch.vocab_size}; set model.vocab_size={vocab_size} or more"
        )


def plan_run(cfg: Config, world_size: int, tokenizer_vocab: Optional[int] = None, *,
             training: bool = True) -> RunPlan:
    """The plan of `cfg` on `world_size` ranks, or ConfigError / LayoutError saying what is wrong and
    what would be valid. `tokenizer_vocab`: the tokenizer's size, checked against the model's."""
    from .data.loader import check_streams, default_streams
    from .data.shards import expand_shards

    arch = arch_from_config(cfg.model)
    if not training:
        dims = ParallelDims.from_config(cfg.parallel, world_size, arch=arch)
        return RunPlan(cfg, world_size, arch, dims, 0, 0, tokenizer_vocab)
    dims = ParallelDims.from_config(cfg.parallel, world_size, arch=arch, global_batch_size=cfg.train.global_batch_size,
                                    grad_accum_steps=cfg.optim.grad_accum_steps)
    check_layout_options(cfg, dims)
    local = cfg.train.global_batch_size // dims.dp_size
    try:  # the pattern's count (the files may not be visible here)
        patterns = [source.get("shards", "") for source in cfg.data.sources if isinstance(source, dict)] \
            if cfg.data.sources else [cfg.data.train_shards]
        num_shards = sum(len(expand_shards(p, check_exists=False)) for p in patterns if p)
    except ValueError:
        num_shards = 0
    streams = cfg.data.streams or default_streams(dims.dp_size, cfg.data.num_workers, local, num_shards)
    try:
        check_streams(streams, dims.dp_size, cfg.train.global_batch_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if tokenizer_vocab is not None:
        check_tokenizer_size(cfg, tokenizer_vocab, arch)
    engine_config = None
    if cfg.parallel.engine == "deepspeed":
        from .parallel.deepspeed_config import deepspeed_config, dry_run_precision

        engine_config = deepspeed_config(cfg, dims, dry_run_precision(cfg), arch)
    return RunPlan(cfg, world_size, arch, dims, local, streams, tokenizer_vocab, engine_config, num_shards)


def tokenizer_vocab_if_present(cfg: Config) -> Optional[int]:
    """The size of `data.tokenizer` where the file exists here (a login node may not see it); OpenCLIP's is
    always at hand (a missing open_clip package is a ConfigError naming the install command)."""
    from .data import TokenizerError, build_tokenizer, is_openclip

    if is_openclip(cfg.data.tokenizer):
        try:
            return build_tokenizer(cfg.data.tokenizer, context_length=cfg.model.context_length).vocab_size
        except TokenizerError as error:
            raise ConfigError(str(error)) from None
    if not Path(cfg.data.tokenizer).is_file():
        return None
    return build_tokenizer(cfg.data.tokenizer, context_length=cfg.model.context_length).vocab_size


def source_modes(cfg: Config) -> list:
    """(name, resampled) of each of `data.sources`, as the loader names them (empty: one source)."""
    from .data.mixture import check_resampled, source_entries

    try:
        check_resampled(cfg.data.resampled, "data.resampled")
        if not cfg.data.sources:
            return []
        return [(name, flag) for name, _, _, flag in source_entries(cfg.data.sources, cfg.data.resampled)]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def describe_plan(plan: RunPlan) -> str:
    """What `flip-train` would run: the layout, the batch split, the data streams, the schedule and
    the model's size and cost (the model is counted on the meta device)."""
    from .data.loader import stream_note
    from .data.mixture import sampling_note
    from .models import build_model, count_parameters
    cfg, dims, arch = plan.cfg, plan.dims, plan.arch
    counts = count_parameters(build_model(cfg.model, device="meta", mae_decoder=cfg.loss.mae_weight > 0))
    from .models.flops import train_flops_per_sample

    # MAE's decoder and the attentive masking's EMA forward: training costs, in the count.
    flops = train_flops_per_sample(cfg.model, cfg.loss.mae_weight > 0)
    samples = cfg.train.max_steps * cfg.train.global_batch_size
    shards = str(cfg.data.train_shards) if cfg.data.train_shards else "data.train_shards is not set"
    state_bytes = 16 * counts["params_total"]  # fp32 weights + grads + AdamW's two moments
    shard_over = dims.dp_shard * dims.tp * dims.pp
    per_rank = state_bytes / shard_over
    if cfg.parallel.engine == "deepspeed":  # ZeRO-1 shards the moments, 2 the gradients too, 3 the weights too
        stage, params = cfg.parallel.zero_stage, counts["params_total"]
        # fp32 master + moments sharded from ZeRO-1 on; gradients from 2; the model's weights from 3.
        per_rank = params * (12 / dims.dp_size + 4 * (1 / dims.dp_size if stage >= 2 else 1)
                             + 4 * (1 / dims.dp_size if stage >= 3 else 1))
    if plan.tokenizer_vocab is not None:
        tokenizer_note = f"tokenizer {cfg.data.tokenizer} fits model.vocab_size={arch.vocab_size}"
    else:
        tokenizer_note = (f"tokenizer {cfg.data.tokenizer} not found here (not checked; with data.synthetic the "
                          f"run writes it)")
    return "\n".join([
        f"flip-train --dry-run: {cfg.model.name}, {counts['params_total'] / 1e6:.1f}M parameters "
        f"(vision {counts['params_vision'] / 1e6:.1f}M, text {counts['params_text'] / 1e6:.1f}M"
        + (f", frozen EMA image tower {counts['params_ema'] / 1e6:.1f}M" if "params_ema" in counts else "")
        + f"), mask ratio {cfg.model.mask_ratio:g} ({plan.visible_patches} of {arch.num_patches} patches visible"
        + (", attentive" if cfg.model.masking == "attentive" else "") + ")",
        f"  layout: {dims.describe()}",
        f"  batch: {cfg.train.global_batch_size} = {dims.dp_size} data-parallel ranks x {plan.local_batch} "
        f"(grad accumulation {cfg.optim.grad_accum_steps}, pipeline micro-batches {cfg.parallel.microbatches}"
        f"{' = 2 x parallel.pp: parallel.microbatches not set' if getattr(cfg.parallel, 'microbatches_from_default', False) else ''})",
        f"  data: {shards}; {plan.streams} sample streams ({plan.streams // dims.dp_size} per data-parallel rank, "
        f"{plan.local_batch * dims.dp_size // plan.streams} samples each per step)",
        f"  data streams: {stream_note(plan.streams, plan.num_shards, cfg.train.global_batch_size, not cfg.data.streams)}",
        f"  data sampling: {sampling_note(cfg.data.resampled, source_modes(cfg))}",
        f"  schedule: {cfg.train.max_steps} steps = {samples / 1e6:.2f}M samples, peak lr {effective_lr(cfg):.3e}, "
        f"warmup {cfg.schedule.warmup_steps}, {cfg.schedule.name}",
        f"  compute: {flops / 1e9:.1f} GFLOPs per training sample, {flops * samples / 1e18:.2f} EFLOP in all",
        f"  optimizer state: {state_bytes / 2**30:.1f} GiB in all (fp32 weights, grads, AdamW moments), "
        f"{per_rank / 2**20:.0f} MiB per rank "
        + (f"under ZeRO-{cfg.parallel.zero_stage} over {dims.dp_size}" if cfg.parallel.engine == "deepspeed"
           else f"sharded over {shard_over}")
        + (f" (x{dims.dp_replicate} replicas)" if dims.dp_replicate > 1 else ""),
        f"  {tokenizer_note}",
        *_memory_lines(plan, counts["params_total"]),
        f"  activation checkpointing: {cfg.parallel.activation_checkpointing} "
        f"({cfg.parallel.activation_checkpointing_towers}); compiled blocks: {cfg.parallel.compile}",
        *_engine_lines(plan),
        "  config and layout OK",
    ])


def largest_block_parameters(arch) -> int:
    """Parameters of the widest transformer block (qkv + out projection, the MLP, two norms)."""
    return max(4 * t.width * t.width + 2 * t.width * t.mlp_dim + 9 * t.width + t.mlp_dim
               for t in (arch.vision, arch.text))


def memory_estimate(plan: RunPlan, params: int) -> dict:
    """Bytes per rank by kind, README's memory model (`parallel/memory.py`), for the plan's layout."""
    from .parallel.deepspeed_config import dry_run_precision
    from .parallel.memory import memory_per_rank

    return memory_per_rank(plan.cfg, plan.dims, plan.arch, params, plan.local_batch, dry_run_precision(plan.cfg),
                           plan.visible_patches, largest_block_parameters(plan.arch), tower_unit_parameters(plan.cfg),
                           frozen_parameters(plan.cfg))


def frozen_parameters(cfg: Config) -> int:
    """Parameters that never train (locked towers, the attentive masking's EMA tower): their fp32
    weights only, no gradient and no optimizer moments."""
    from .models import build_model

    return sum(p.numel() for p in build_model(cfg.model, device="meta").parameters() if not p.requires_grad)


def tower_unit_parameters(cfg: Config) -> int:
    """Parameters of the larger tower's own FSDP unit: all but its blocks (embeddings, norms, projection)."""
    from .models import build_model

    model = build_model(cfg.model, device="meta")
    return max(sum(p.numel() for name, p in tower.named_parameters() if not name.startswith("blocks."))
               for tower in (model.visual, model.text))


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _memory_lines(plan: RunPlan, params: int) -> list[str]:
    from .parallel.deepspeed_config import dry_run_precision
    from .parallel.memory import accumulation_microbatches, can_reduce_every_microbatch, reduce_every_microbatch

    cfg, dims = plan.cfg, plan.dims
    memory = memory_estimate(plan, params)
    if memory["unsharded_grads"]:
        instead = ("parallel.reduce_every_microbatch=true reduce-scatters each instead"
                   if can_reduce_every_microbatch(cfg, dims) else
                   "the pipeline schedule holds them; parallel.reduce_every_microbatch does not apply under pp")
        accumulation = (f"unsharded fp32 gradients {_size(memory['unsharded_grads'])} (4 B/param over tp x pp, held "
                        f"across {accumulation_microbatches(cfg, dims)} micro-batches; {instead})")
    else:
        why = reduce_every_microbatch(cfg, dims, params)[1]
        accumulation = f"no unsharded gradients ({why})"
    return [
        f"  memory per rank (README's model, {dry_run_precision(cfg)} compute): total {_size(memory['total'])} = "
        f"states {_size(memory['states'])} + {accumulation} + gathered parameters {_size(memory['gathered_params'])}",
        f"    + activations {_size(memory['activations'])} (one micro-batch, checkpointing "
        f"{cfg.parallel.activation_checkpointing}) + loss logits {_size(memory['loss'])}; allocator slack, "
        f"communication buffers and the CUDA context come on top",
    ]


def _engine_lines(plan: RunPlan) -> list[str]:
    cfg = plan.cfg
    if plan.engine_config is None:
        return [f"  engine: {cfg.parallel.engine} (FSDP2 + tensor + pipeline parallel)"]
    import json

    from .parallel.deepspeed_config import dry_run_precision

    p = cfg.parallel
    lines = [f"  engine: deepspeed, ZeRO-{p.zero_stage}, offload optimizer {p.offload_optimizer}, parameters "
             f"{p.offload_params}" + (f", merged with {p.deepspeed_config}" if p.deepspeed_config else ""),
             f"  deepspeed config (for precision {dry_run_precision(cfg)}; the run regenerates it on its device):"]
    lines += ["    " + line for line in json.dumps(plan.engine_config, indent=2, sort_keys=True).splitlines()]
    return lines
