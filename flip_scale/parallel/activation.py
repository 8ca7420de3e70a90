"""Activation checkpointing of transformer blocks: `none | full | selective` (every k-th block).

A checkpointed block keeps only its input during the forward and recomputes its activations
in the backward (`torch.utils.checkpoint`, non-reentrant: it works with inputs that do not require
grad, with DTensor activations under tensor parallelism, and with FSDP2's hooks).

The block is not wrapped in another module: its `forward` is replaced by a checkpointed call of
the original one. So parameter names, state-dict keys and optimizer-state keys are exactly those
of the model without checkpointing (`visual.blocks.3.attn.qkv.weight`), and a checkpoint written
with one setting loads under another. Hooks on the block (FSDP2's unshard, the tensor-parallel
input/output layouts) run once, outside the checkpointed region, in the forward; in the backward
FSDP2 has unsharded the block's parameters before its recomputation runs.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full", "selective")
AC_TOWERS = {"both": ("visual", "text"), "vision": ("visual",), "text": ("text",)}


def _checkpointed_forward(original_forward, *args, **kwargs):
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make `module`'s forward recompute its activations in the backward (in place; idempotent)."""
    if getattr(module, "activation_checkpointed", False):
        return module
    module.forward = functools.partial(_checkpointed_forward, module.forward)
    module.activation_checkpointed = True
    return module


def is_checkpointed(module: nn.Module) -> bool:
    return bool(getattr(module, "activation_checkpointed", False))


def selects_block(mode: str, layer_index: int, every: int) -> bool:
    """Whether block `layer_index` (0-based, the index in the whole tower) is checkpointed."""
    if mode == "full":
        return True
    if mode == "selective":
        # Every k-th block, counting from 1 as torchtitan does (k=2: blocks 1, 3, 5, ...). The
        # index is the block's name in the whole tower, so a pipeline stage picks the same blocks.
        return (layer_index + 1) % every == 0
    return False


def apply_ac(model: nn.Module, mode: str, every: int = 2, towers: str = "both") -> nn.Module:
    """Checkpoint the blocks of the towers `towers` names (in place); returns the model.

    mode: none | full (every block) | selective (every `every`-th block of each tower).
    towers: both | vision | text (e.g. `vision` for unmasked images, whose activations dominate).
    """
    if towers not in AC_TOWERS:
        raise ValueError(f"parallel.activation_checkpointing_towers: '{towers}' is not valid; choose one of "
                         f"{', '.join(AC_TOWERS)}")
    if mode not in AC_MODES:
        raise ValueError(f"parallel.activation_checkpointing: '{mode}' is not valid; choose one of {', '.join(AC_MODES)}")
    if mode == "selective" and every < 1:
        raise ValueError(f"parallel.activation_checkpointing_every: must be >= 1, got {every}")
    if mode == "none":
        return model
    for tower in (getattr(model, name, None) for name in AC_TOWERS[towers]):
        if tower is None:
            continue
        for name, block in tower.blocks.items():
            if selects_block(mode, int(name), every):
                checkpoint_module(block)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile the forward of every transformer block of both towers, in place.

    The block's `forward` is compiled, not its `__call__`: module hooks (FSDP2's unshard/reshard,
    the tensor-parallel input/output layouts) stay outside the compiled region and run eagerly,
    and the parameter names and state-dict keys stay those of the plain model. Applied after
    activation checkpointing, whose checkpointed forward is compiled with the block, and before
    FSDP (whose hooks are added around it)."""
    import torch

    for tower in (getattr(model, "visual", None), getattr(model, "text", None)):
        if tower is None:
            continue
        for block in tower.blocks.values():
            if not getattr(block, "compiled", False):
                block.forward = torch.compile(block.forward)
                block.compiled = True
    return model
