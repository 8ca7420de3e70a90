"""The native engine: FSDP2 (ZeRO-3) + tensor parallel + pipeline parallel on one ParallelDims.

The model parts are built by `parallel.build_model_parts` (meta device -> TP -> AC -> compile ->
FSDP2 -> [pipeline split] -> materialise), the optimizer is an `OptimizerGroup` over the parts
(one per pipeline stage this rank holds), and the checkpoint state is DCP's (model and optimizer
state dicts, re-sharded on load into any layout).
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..checkpoint.dcp import ModelOptimizerState
from ..loss import build_loss
from ..models import clamp_logit_scale_
from ..models.ema import reset_ema_, update_ema_
from ..optim import OptimizerGroup, nvidia_apex_available
from ..parallel import build_model_parts, clip_grad_norm_, total_grad_norm
from ..parallel.memory import reduce_every_microbatch
from ..parallel.pipeline import PipelineEvalModel, pipeline_forward_backward
from ..runtime import resolve_precision
from ..step import forward_backward
from .base import Engine, StepResult

log = logging.getLogger("flip_scale")

class NativeEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg, plan, device):
        super().__init__(cfg, plan, device)
        self.dims.build_mesh(self.device.type)
        self.precision = resolve_precision(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        self.model_parts, self.pipe = build_model_parts(cfg, self.dims, self.device)
        # The whole model on this rank (None when it is split into pipeline stages).
        self.model = None if self.pipe is not None else self.model_parts[0]
        self.loss_fn = build_loss(cfg.loss, self.dims.dp_group)
        self.optimizers = OptimizerGroup(self.model_parts, cfg, self.device)
        # The skip decided on the device (no host read per step) where every optimizer is PyTorch's
        # fused AdamW, whose kernel takes a found_inf flag (the grad scaler's): a no-op step that
        # leaves weights, moments and step counts exactly as a skipped one. Else one host read.
        self.skip_on_device = self.device.type == "cuda" and all(
            isinstance(opt, torch.optim.Adam) and opt.defaults.get("fused") for opt in self.optimizers.optimizers)
        # Under CPU offload the fused kernel of the offloaded shards runs on the host and reads its
        # found_inf at once: a flag left on the GPU would reach it by the kernel's non-blocking
        # device-to-host copy, not yet written when read (a race). So the flag is brought to the host
        # first, blocking (offload waits for its gradients there each step anyway); GPU parameters get
        # it back by a host-to-device copy, which the stream orders.
        self._found_inf_on_host = self.device.type == "cuda" and any(
            p.device.type == "cpu" for p in self.parameters())
        params = sum(p.numel() for p in self.parameters())  # this rank's stage, whole tensors
        self.reduce_every_microbatch, self._reduce_why = reduce_every_microbatch(cfg, self.dims, params)

    # -- one step --------------------------------------------------------------------------
    def train(self) -> None:
        for part in self.model_parts:
            part.train()

    def forward_backward(self, images, tokens, mask_noise: Optional[torch.Tensor]) -> torch.Tensor:
        self.step_stats.clear()
        if self.pipe is not None:
            return pipeline_forward_backward(self.pipe, self.loss_fn, images, tokens, mask_noise,
                                             autocast=self.autocast)
        return forward_backward(
            self.model, self.loss_fn, images, tokens, mask_noise,
            microbatches=self.cfg.optim.grad_accum_steps,
            exact=self.cfg.loss.microbatch_contrast == "exact",
            autocast=self.autocast,
            reduce_every_microbatch=self.reduce_every_microbatch,
            mae_weight=self.cfg.loss.mae_weight, stats=self.step_stats,
        )

    def clip_and_step(self) -> StepResult:
        parameters = list(self.parameters())
        if self.cfg.optim.grad_clip > 0:
            grad_norm = clip_grad_norm_(parameters, self.cfg.optim.grad_clip, self.dims)
        else:
            grad_norm = total_grad_norm(parameters, self.dims)
        lr = self.optimizers.lr
        # The norm is global (every rank holds the same value), so every rank decides alike.
        if self.skip_on_device:
            return self._step_unless_nonfinite(grad_norm, lr)
        if not math.isfinite(float(grad_norm)):
            self.optimizers.skip()
            self.optimizers.zero_grad()
            return StepResult(grad_norm, lr, skipped=True)
        self.optimizers.step()
        self.optimizers.zero_grad()
        for part in self.model_parts:
            clamp_logit_scale_(part)
            update_ema_(part, self.cfg.model.ema_decay)  # model.masking=attentive: its EMA tower
        return StepResult(grad_norm, lr)

    def _step_unless_nonfinite(self, grad_norm: torch.Tensor, lr: float) -> StepResult:
        """The step with the skip decided on the device: `skipped` is a 0-dim bool tensor, read by
        the trainer at its logging steps only. The lr schedule moves on either way (as `skip`)."""
        skipped = ~torch.isfinite(grad_norm)
        found_inf = skipped.float().cpu() if self._found_inf_on_host else skipped.float()
        for optimizer in self.optimizers.optimizers:
            optimizer.found_inf = found_inf
        try:
            self.optimizers.step()
        finally:
            for optimizer in self.optimizers.optimizers:
                del optimizer.found_inf
        self.optimizers.zero_grad()
        for part in self.model_parts:  # a skipped step's temperature was clamped already: a no-op
            clamp_logit_scale_(part)
            update_ema_(part, self.cfg.model.ema_decay, skipped=skipped)  # a skipped step leaves the EMA
        return StepResult(grad_norm, lr, skipped=skipped)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for part in self.model_parts:
            yield from part.parameters()

    @property
    def lr(self) -> float:
        return self.optimizers.lr

    def logit_scale(self) -> float:
        """exp(temperature); under pipelining only the last stage holds it (a max over the pp group)."""
        value = 0.0
        for part in self.model_parts:
            param = getattr(getattr(part, "module", part), "logit_scale", None)
            if param is not None:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                value = float(full.detach().exp())
        if self.pipe is not None:
            tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.dims.pp_group)
            value = float(tensor.item())
        return value

    # -- evaluation ------------------------------------------------------------------------
    def eval_model(self):
        # Under pipeline parallel the stages run forward-only schedules of their own; their
        # buffers live as long as the returned object.
        return self.model if self.pipe is None else PipelineEvalModel(self.pipe, self.arch)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self._state().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._state().load_state_dict(state)

    def _state(self):
        # The one definition of the on-disk format ({"model", "optim"}, optimizer state flattened).
        return ModelOptimizerState(self.model_parts, self.optimizers.optimizers)

    def schedule_state(self) -> dict:
        return self.optimizers.state_dict()

    def load_schedule_state(self, state: dict) -> None:
        self.optimizers.load_state_dict(state)

    def load_weights(self, source) -> None:
        from ..checkpoint import load_weights

        # Without pipeline stages every rank holds every tensor name: rank 0 alone reads a
        # consolidated file and the tensors are broadcast (each rank keeps its shard).
        whole = self.pipe is None
        load_weights(source, self.model_parts, broadcast_from_rank0=whole, whole_model=whole)
        if sum(reset_ema_(part) for part in self.model_parts):
            log.info("--init-from: the EMA image tower (model.masking=attentive) starts equal to the loaded image tower")

    def describe(self) -> list[str]:
        kinds = sorted({getattr(opt, "flip_kind", type(opt).__name__) for opt in self.optimizers.optimizers})
        return [f"engine fsdp (FSDP2 + tensor + pipeline parallel); optimizer {', '.join(kinds)}; LayerNorm: "
                f"PyTorch's (NVIDIA apex {'importable' if nvidia_apex_available() else 'not importable'}); gradients "
                f"reduce-scattered {'every micro-batch' if self.reduce_every_microbatch else 'after the last micro-batch'} "
                f"({self._reduce_why})"]
