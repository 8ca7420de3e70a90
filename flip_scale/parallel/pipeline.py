"""Pipeline parallelism for FLIP: stage split, schedules, and exact global-batch contrast.

    specs   = split_stages(arch, mask_ratio, num_stages(pp, schedule))       # same on every rank
    modules = build_stage_modules(meta_model, specs, pp_rank, pp, schedule)  # this rank's stages
    ... per module: apply_tp -> apply_ac -> apply_fsdp(reshard_after_forward=False) -> materialise,
        loading `stage_state_dict(full_state_dict, module)`
    pipe = build_pipeline(modules, dims.pp_mesh, schedule, microbatches, device)
    loss = pipeline_forward_backward(pipe, ContrastiveLoss(dims.dp_group), images, tokens, mask_noise)

Schedules (`torch.distributed.pipelining`): GPipe and 1F1B hold one stage per rank
(num_stages = pp); interleaved 1F1B holds two per rank, assigned loop-style (rank r holds stages r
and r + pp; num_stages = 2 pp).

Exact contrast (the two-pass feature cache of `flip_scale.step`, docs/design.md section 5): the
contrastive loss couples every sample, so the pipeline's micro-batches cannot each compute their
own loss. Pass 1 runs the schedule forward-only; its merged output on the last stage is the
embeddings of the whole local batch. The last stage computes the loss on them (the loss gathers over
the data-parallel group) and d(loss)/d(embeddings), d(loss)/d(log temperature). Pass 2 is an
ordinary training step whose "loss" for a micro-batch is (output * cached gradient).sum(), with
`scale_grads=False`: each micro-batch back-propagates exactly its slice of the cached gradient. The
temperature column of the cached gradient is zero except in row 0 of the batch, which carries the
whole d(loss)/d(log temperature), so it enters once. Both passes see the same `mask_noise` rows
(a per-sample input chunked with the batch), hence the same masks. The result equals one process
on the whole global batch, for any pp x dp x tp layout and any number of micro-batches.

Each pass has its own `PipelineStage` objects around the same stage modules: the schedules infer
the shapes exchanged between stages from the first micro-batch, and a stage switched between
forward-only and training re-runs that inference (an extra forward, and backward, of one
micro-batch) on every switch. With one set per pass it runs once, on the first step.

FSDP2 with pipelining: shard each stage module with `reshard_after_forward=False` (as torchtitan
does); otherwise every micro-batch all-gathers the weights again, in both passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .pipeline_split import (
    FLIPStage,
    StageSpec,
    build_stage_module,
    describe_split,
    naive_split,
    split_stage_output,
    split_stages,
    stage_state_dict,
)

__all__ = [
    "FLIPPipeline", "FLIPStage", "PIPELINE_SCHEDULES", "PipelineEvalModel", "StageSpec", "build_pipeline", "build_stage_module",
    "build_stage_modules", "check_microbatches", "describe_split", "naive_split", "num_stages",
    "pipeline_forward_backward", "split_stage_output", "split_stages", "stage_indices", "stage_state_dict",
    "stages_per_rank",
]

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def _check_schedule(schedule_name: str) -> None:
    if schedule_name not in PIPELINE_SCHEDULES:
        raise ValueError(f"parallel.pp_schedule: unknown schedule '{schedule_name}'; valid: {', '.join(PIPELINE_SCHEDULES)}")


def stages_per_rank(schedule_name: str) -> int:
    _check_schedule(schedule_name)
    return 2 if schedule_name == "interleaved_1f1b" else 1


def num_stages(pp: int, schedule_name: str) -> int:
    """Pipeline stages for `pp` ranks: pp, or 2 pp with interleaved 1F1B."""
    return pp * stages_per_rank(schedule_name)


def stage_indices(pp_rank: int, pp: int, schedule_name: str) -> list[int]:
    """The stages rank `pp_rank` holds (loop-style: r, r + pp, ...)."""
    return [pp_rank + k * pp for k in range(stages_per_rank(schedule_name))]


def check_microbatches(microbatches: int, pp: int, schedule_name: str) -> None:
    """Refuse micro-batch counts the schedule cannot run (or runs with a stage always idle)."""
    _check_schedule(schedule_name)
    if microbatches < pp:
        raise ValueError(
            f"parallel.microbatches={microbatches} < parallel.pp={pp}: the {schedule_name} schedule needs at least "
            f"one micro-batch per pipeline rank; set parallel.microbatches >= {pp}"
        )
    if schedule_name == "interleaved_1f1b":
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            valid = [m for m in range(pp, 4 * pp + 1) if m % max(1, m // pp) == 0]
            raise ValueError(
                f"parallel.microbatches={microbatches} with parallel.pp={pp}: interleaved 1F1B runs the micro-batches "
                f"in {rounds} rounds and needs a multiple of {rounds}; valid counts include {valid}"
            )


def build_stage_modules(model: nn.Module, specs: list[StageSpec], pp_rank: int, pp: int,
                        schedule_name: str) -> list[FLIPStage]:
    """This rank's stage modules, cut from `model` (best on the meta device; it is not changed)."""
    expected = num_stages(pp, schedule_name)
    if len(specs) != expected:
        raise ValueError(f"{schedule_name} on pp={pp} ranks needs {expected} stages, the split has {len(specs)}")
    return [build_stage_module(model, specs[index]) for index in stage_indices(pp_rank, pp, schedule_name)]


def _cached_gradient_loss(output: torch.Tensor, cached_grad: torch.Tensor) -> torch.Tensor:
    # d/d(output) of this is exactly `cached_grad`: pass 2 back-propagates the pass-1 gradient.
    return (output * cached_grad).sum()


@dataclass
class FLIPPipeline:
    """What `build_pipeline` returns: both passes' schedules and where this rank sits."""

    modules: list[FLIPStage]
    train_schedule: object
    eval_schedule: object
    pp_group: Optional[dist.ProcessGroup]
    pp_rank: int
    pp_size: int
    num_stages: int
    microbatches: int
    schedule_name: str
    device: torch.device
    embed_dim: int
    stage_ids: list[int] = field(default_factory=list)
    # A new forward-only schedule over the same stage modules (evaluation: its own batch shapes).
    new_forward_schedule: Optional[object] = None

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def last_stage_rank(self) -> int:
        """The pp rank that holds the last stage (pp - 1 for every schedule here)."""
        return (self.num_stages - 1) % self.pp_size

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()

    def clamp_logit_scale(self) -> None:
        for module in self.modules:
            module.clamp_logit_scale()


def build_pipeline(stage_modules: list[FLIPStage], pp, schedule_name: str, microbatches: int,
                   device) -> FLIPPipeline:
    """Wrap this rank's stage modules (already parallelised and materialised) in pipeline schedules.

    `pp`: the 1-D "pp" `DeviceMesh` or its process group (None: the default group).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    _check_schedule(schedule_name)
    group = pp.get_group() if isinstance(pp, DeviceMesh) else pp
    pp_size = dist.get_world_size(group)
    pp_rank = dist.get_rank(group)
    check_microbatches(microbatches, pp_size, schedule_name)
    total = num_stages(pp_size, schedule_name)
    wanted = stage_indices(pp_rank, pp_size, schedule_name)
    held = [module.spec.index for module in stage_modules]
    if held != wanted or any(module.spec.num_stages != total for module in stage_modules):
        raise ValueError(
            f"pp rank {pp_rank} of {pp_size} with {schedule_name} must hold stages {wanted} of {total}, "
            f"got stages {held} of {[m.spec.num_stages for m in stage_modules]}"
        )
    device = torch.device(device)

    def stages():
        return [PipelineStage(m, m.spec.index, total, device, group=group) for m in stage_modules]

    schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}.get(schedule_name)
    if schedule_name == "interleaved_1f1b":
        train = ScheduleInterleaved1F1B(stages(), microbatches, loss_fn=_cached_gradient_loss, scale_grads=False)
        forward_only = ScheduleInterleaved1F1B(stages(), microbatches)
    else:
        train = schedule_cls(stages()[0], microbatches, loss_fn=_cached_gradient_loss, scale_grads=False)
        forward_only = schedule_cls(stages()[0], microbatches)
    return FLIPPipeline(
        modules=list(stage_modules), train_schedule=train, eval_schedule=forward_only, pp_group=group,
        pp_rank=pp_rank, pp_size=pp_size, num_stages=total, microbatches=microbatches,
        schedule_name=schedule_name, device=device, embed_dim=stage_modules[0].embed_dim, stage_ids=wanted,
        new_forward_schedule=lambda: (ScheduleInterleaved1F1B(stages(), microbatches) if schedule_name == "interleaved_1f1b"
                                      else schedule_cls(stages()[0], microbatches)),
    )


def _first_stage_inputs(pipe: FLIPPipeline, images, tokens, mask_noise) -> tuple:
    if not pipe.has_first_stage:
        return ()  # only stage 0 reads the batch; other ranks may pass it or None
    batch = images.shape[0]
    if batch % pipe.microbatches:
        raise ValueError(
            f"a local batch of {batch} samples cannot be split into parallel.microbatches={pipe.microbatches} "
            f"equal micro-batches"
        )
    visual, text = pipe.modules[0].visual, pipe.modules[0].text
    if mask_noise is None and ((visual.training and visual.mask_ratio > 0)
                               or (text.masking.training and text.masking.mask_ratio > 0)):
        raise ValueError(
            "pipeline_forward_backward needs mask_noise (one row per sample) when masking: the feature cache runs "
            "every sample twice and both passes must remove the same patches"
        )
    return (images, tokens) if mask_noise is None else (images, tokens, mask_noise)


def pipeline_forward_backward(
    pipe: FLIPPipeline,
    loss_fn,
    images: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor],
    mask_noise: Optional[torch.Tensor] = None,
    autocast=contextlib.nullcontext,
) -> torch.Tensor:
    """Accumulate the gradients of the loss over the local batch into the stage modules; return the loss.

    `loss_fn(image_features, text_features, log_temperature)` gathers over the data-parallel group
    (as `ContrastiveLoss(dims.dp_group)`); it runs on the last stage only. The returned loss is
    this data-parallel rank's loss (as `flip_scale.step.forward_backward` returns it), broadcast to
    every rank of the pipeline. Gradients are accumulated, not zeroed, and reduced over the
    data-parallel ranks by FSDP at the end of pass 2.
    """
    inputs = _first_stage_inputs(pipe, images, tokens, mask_noise)

    # Pass 1: the embeddings of the whole local batch, no autograd graph.
    with torch.no_grad(), autocast():
        output = pipe.eval_schedule.step(*inputs)

    cached_grad = None
    loss = torch.zeros((), dtype=torch.float32, device=pipe.device)
    if pipe.has_last_stage:
        image_features, text_features, log_temperature = (
            part.detach().requires_grad_(True) for part in split_stage_output(output, pipe.embed_dim)
        )
        with torch.enable_grad(), autocast():
            batch_loss = loss_fn(image_features, text_features, log_temperature)
        batch_loss.backward()
        dim = pipe.embed_dim
        cached_grad = torch.zeros_like(output)
        cached_grad[:, :dim] = image_features.grad
        cached_grad[:, dim : 2 * dim] = text_features.grad
        cached_grad[0, 2 * dim:] = log_temperature.grad  # the temperature's (and bias') gradient enters once
        loss = batch_loss.detach().float()
        del output

    # Pass 2: re-run every micro-batch with autograd, back-propagating its slice of the cache.
    with autocast():
        pipe.train_schedule.step(*inputs, target=cached_grad, return_outputs=False)

    if pipe.pp_size > 1:
        dist.broadcast(loss, group=pipe.pp_group, group_src=pipe.last_stage_rank)
    return loss


class PipelineEvalModel:
    """A pipeline seen as one model for evaluation: `model(images, tokens, noise=None)` ->
    (image features, text features, log temperature) on every pp rank, as `FLIPModel` returns them
    (None for a tower given no input), forward only.

    Each call runs a forward-only schedule over the stages. A schedule fixes its micro-batch shapes
    at its first step, so there is one schedule per (padded batch size, image view): a batch is
    padded up to a multiple of parallel.microbatches and the rows of the padding are cut off. A
    tower given no input gets zeros; without images the image tower keeps a single patch, so
    embedding prompts costs about what the text tower costs. The last stage's output is broadcast
    over the pp group. Every pp rank must make the same calls with batches of the same size (the
    evaluation's lockstep batches do: the pp ranks of a replica read the same data). The schedules
    hold receive buffers and the last activations: build one of these per evaluation and drop it.
    """

    def __init__(self, pipe: FLIPPipeline, arch):
        if pipe.new_forward_schedule is None:
            raise ValueError("this pipeline was built without a forward-only schedule factory")
        self.pipe = pipe
        self.arch = arch
        self._schedules: dict = {}

    @property
    def visual(self):
        # Every stage keeps its image tower's masking module; the first stage's is the one that acts.
        return self.pipe.modules[0].visual

    @property
    def training(self) -> bool:
        return self.pipe.modules[0].training

    def train(self, mode: bool = True) -> "PipelineEvalModel":
        for module in self.pipe.modules:
            module.train(mode)
        return self

    def eval(self) -> "PipelineEvalModel":
        return self.train(False)

    @contextlib.contextmanager
    def _one_patch(self):
        """The first stage's image tower keeps one patch (zero noise: the first) for the block."""
        masking = self.pipe.modules[0].visual.masking
        ratio, training = masking.mask_ratio, masking.training
        masking.mask_ratio = 1.0 - 1e-6  # visible_count -> max(1, int(L * 1e-6)) = 1
        masking.train(True)
        try:
            yield
        finally:
            masking.mask_ratio = ratio
            masking.train(training)

    def __call__(self, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor],
                 mask_noise: Optional[torch.Tensor] = None):
        pipe, arch = self.pipe, self.arch
        given = images if images is not None else tokens
        if given is None:
            raise ValueError("PipelineEvalModel needs images, tokens or both")
        rows = given.shape[0]
        padded = -(-rows // pipe.microbatches) * pipe.microbatches
        device = pipe.device

        def pad(tensor: Optional[torch.Tensor], shape: tuple, dtype) -> torch.Tensor:
            out = torch.zeros((padded, *shape), dtype=dtype, device=device)
            if tensor is not None:
                out[:rows] = tensor.to(device)
            return out

        masking = self.visual.masking
        text_only = images is None
        if text_only:
            mask_noise = torch.zeros(rows, arch.num_patches)
            view = "one patch"
        else:  # the number of image tokens each stage sees
            view = masking.mask_ratio if (masking.training and masking.mask_ratio > 0) else 0.0
        text_masking = self.pipe.modules[0].text.masking  # the text length each stage sees
        text_view = text_masking.mask_ratio if (text_masking.training and text_masking.mask_ratio > 0) else 0.0
        key = (padded, view, text_view)
        if key not in self._schedules:
            self._schedules[key] = pipe.new_forward_schedule()
        schedule = self._schedules[key]
        with torch.no_grad(), (self._one_patch() if text_only else contextlib.nullcontext()):
            if pipe.has_first_stage:
                inputs = [pad(images, (3, arch.image_size, arch.image_size), torch.float32),
                          pad(tokens, (arch.context_length,), torch.long)]
                if mask_noise is not None:
                    inputs.append(pad(mask_noise, tuple(mask_noise.shape[1:]), mask_noise.dtype))
                output = schedule.step(*inputs)
            else:
                output = schedule.step()
            width = 2 * pipe.embed_dim + getattr(pipe.modules[0], "loss_width", 1)
            packed = output.float() if pipe.has_last_stage else torch.empty(padded, width, device=device)
            if pipe.pp_size > 1:
                dist.broadcast(packed, group=pipe.pp_group, group_src=pipe.last_stage_rank)
        image_features, text_features, log_temperature = split_stage_output(packed[:rows], pipe.embed_dim)
        return (None if text_only else image_features,
                text_features if tokens is not None else None, log_temperature)
