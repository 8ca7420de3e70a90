"""The engine seam: the one object the trainer talks to for everything that depends on how the
model is distributed.

    engine = build_engine(cfg, plan, device)          # flip_scale.engine
    loss = engine.forward_backward(images, tokens, mask_noise)   # one global batch, exact contrast
    result = engine.clip_and_step()                    # global grad norm; a non-finite one skips the step
    engine.eval_model() / engine.autocast()            # what evaluation runs, and under which precision
    engine.state_dict() / engine.load_state_dict(...)  # its checkpoint state (CheckpointManager "engine")

What is behind it is the engine's own business: the native engine composes FSDP2 + tensor
parallel + pipeline parallel (engine/native.py); an engine that owns its model, optimizer and
checkpoint files (DeepSpeed) implements the same methods, with `checkpoint_kind = "files"` and
`save_files` / `load_files` instead of a DCP state dict. The loop, the data, the loss, evaluation
and the checkpoint directory rules are the same for every engine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from ..runtime import autocast_context


@dataclass
class StepResult:
    """What one optimizer step did: the global gradient norm (over every rank of the layout, before
    clipping), the lr it stepped with, and whether it was skipped (a non-finite norm: the weights
    are kept, the lr schedule moves on): a bool, or a 0-dim bool tensor on the device where the
    engine decided there (the trainer reads it at logging steps only, to spare a host sync)."""

    grad_norm: torch.Tensor
    lr: float
    skipped: Union[bool, torch.Tensor] = False


class Engine(abc.ABC):
    """The model, its optimizer and its distribution, behind one interface (module docstring)."""

    name: str = "engine"
    # How CheckpointManager stores this component: "sharded" (state_dict is DCP-able) or "files".
    checkpoint_kind: str = "sharded"
    # Top-level state entries that may be missing in a checkpoint (a parameter that never had a
    # gradient has no optimizer state).
    partial_state_keys: tuple = ("optim",)

    def __init__(self, cfg, plan, device):
        self.cfg = cfg
        self.plan = plan
        self.dims = plan.dims
        self.arch = plan.arch
        self.device = torch.device(device)
        self.precision = "fp32"
        # Extra values of the last forward_backward, for the metrics (mae_loss: a detached tensor).
        self.step_stats: dict = {}

    # -- one step --------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_backward(self, images: torch.Tensor, tokens: torch.Tensor,
                         mask_noise: Optional[torch.Tensor]) -> torch.Tensor:
        """Accumulate the gradients of the global-batch loss over this rank's rows; return the loss
        of this data-parallel rank (detached). Micro-batches, pipeline stages and gradient
        accumulation go through the exact two-pass feature cache: the same gradients as one
        process on the whole batch."""

    @abc.abstractmethod
    def clip_and_step(self) -> StepResult:
        """Clip the gradients to optim.grad_clip by their global norm, step the optimizer and the lr
        schedule, clamp the temperature, zero the gradients. A non-finite norm (every rank holds
        the same value, so every rank decides alike) skips the optimizer step."""

    @abc.abstractmethod
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """This rank's parameters (local shards where sharded)."""

    def local_parameter_count(self) -> int:
        """Parameter elements this rank holds (its shards where sharded)."""
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.parameters())

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The lr the next step takes."""

    @abc.abstractmethod
    def logit_scale(self) -> float:
        """exp(temperature), the same on every rank (collective where the layout needs one)."""

    @abc.abstractmethod
    def train(self) -> None:
        """Training mode (masking on) for the next step."""

    def autocast(self):
        """The autocast the model runs under (train.precision, resolved)."""
        return autocast_context(self.precision, self.device)

    # -- evaluation ------------------------------------------------------------------------
    @abc.abstractmethod
    def eval_model(self):
        """A model with FLIPModel's call interface, `model(images, tokens, mask_noise)`, for the
        evaluation library; build it per evaluation and drop it after."""

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The DCP-able state (checkpoint_kind "sharded")."""
        raise NotImplementedError(f"the {self.name} engine stores its own files (checkpoint_kind={self.checkpoint_kind})")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"the {self.name} engine stores its own files (checkpoint_kind={self.checkpoint_kind})")

    @abc.abstractmethod
    def schedule_state(self) -> dict:
        """The lr schedule's position (kept in trainer_state.json)."""

    @abc.abstractmethod
    def load_schedule_state(self, state: dict) -> None:
        ...

    @abc.abstractmethod
    def load_weights(self, source) -> None:
        """Weights only (fresh optimizer) from a `checkpoint.CheckpointSource`, into this layout."""

    def describe(self) -> list[str]:
        """Lines for the start-up log."""
        return []

    def close(self) -> None:  # noqa: B027 - a hook most engines do not need
        """Free what the engine holds beyond Python's reach (nothing, by default)."""

