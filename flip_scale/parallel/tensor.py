"""Tensor parallelism: Megatron's column/row split of every transformer block, with DTensor.

Per block of both towers, of MAE's decoder and of the attentive masking's EMA image tower (`flip_scale.models.transformer.Block`):

    attn.qkv  column-parallel   each rank computes whole heads (the fused weight is head-interleaved)
    attn.proj row-parallel      partial sums -> all-reduce (or reduce-scatter over tokens with SP)
    mlp.fc1   column-parallel
    mlp.fc2   row-parallel

Everything outside the blocks (patch/token embedding, position embeddings, CLS, ln_post/ln_final,
projections, temperature) stays a plain replicated tensor: each tp rank computes the same thing, so
the features handed to the loss are plain tensors equal on every rank of a tp group, and the loss
gathers over the data-parallel group only.

Sequence parallel (SP, the default): between the linears the residual stream and the LayerNorms
are split over tokens (`Shard(1)`), which divides the activation memory of norms and residuals by
tp; the column-parallel linears all-gather the tokens and the row-parallel ones reduce-scatter
them (the same traffic as the two all-reduces of plain TP). The residual stream stays a DTensor from
the first block of a tower to its last, so DTensor knows the true token count: FLIP's image
sequences (1 CLS + visible patches, e.g. 1 + 98 at ViT-H/14, 50% masking) need not divide by tp;
DTensor splits them unevenly (torch.chunk sizes) and pads its collectives. Hooks on the tower's
first block split the replicated embedding over tokens, and on its last block gather the tokens
back into a plain replicated tensor. A pipeline stage is parallelised after the split (as
torchtitan does): the hooks then go on the stage's own first and last blocks and stages exchange
plain tensors.
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def block_plan(sequence_parallel: bool) -> dict:
    """The `parallelize_module` plan of one transformer block."""
    if not sequence_parallel:
        return {
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(),
            "mlp.fc2": RowwiseParallel(),
        }
    # The residual stream is a Shard(1) DTensor: outputs stay DTensors (use_local_output=False)
    # so that uneven token splits keep their true global length.
    return {
        "ln_1": SequenceParallel(),
        "attn.qkv": ColwiseParallel(input_layouts=Shard(1)),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ln_2": SequenceParallel(),
        "mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def _tower_blocks(model: nn.Module):
    # MAE's decoder (loss.mae_weight > 0) and the attentive masking's EMA image tower have blocks of
    # the same kind: the same plan, the same hooks (so the EMA's shards line up with the online's).
    for tower in (getattr(model, "visual", None), getattr(model, "text", None), getattr(model, "decoder", None),
                  getattr(model, "ema_visual", None)):
        if tower is not None and len(tower.blocks) > 0:
            yield tower


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> nn.Module:
    """Split every block of both towers over `tp_mesh` (in place); returns the model.

    Call on the meta-device model before activation checkpointing and FSDP. Heads and MLP widths
    must divide by the tp size (`ParallelDims.from_config` checks it).
    """
    if tp_mesh is None or tp_mesh.size() == 1:
        return model
    plan = block_plan(sequence_parallel)
    for tower in _tower_blocks(model):
        blocks = list(tower.blocks.values())
        for block in blocks:
            parallelize_module(block, tp_mesh, plan)
        if sequence_parallel:
            # Enter the tower: the replicated embedding -> split over tokens (a local slice, no traffic).
            parallelize_module(
                blocks[0],
                tp_mesh,
                PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=False
                ),
            )
            # Leave the tower: tokens gathered back into a plain replicated tensor for the head.
            blocks[-1].register_forward_hook(_gather_tokens)
        if tower is getattr(model, "ema_visual", None):
            # Its last block's CLS attention (the attentive masking's scores) is a mean over this
            # rank's heads: averaged over the tp group it is the mean over all heads.
            blocks[-1].register_forward_hook(functools.partial(_average_head_scores, tp_mesh.get_group()))
    return model


def _gather_tokens(module: nn.Module, args, output):
    if not isinstance(output, DTensor):  # the EMA tower's patch scores (cls_attention), not tokens
        return None
    # Cloned: to_local() returns a view, and FSDP2 cannot see in-place changes of a view output
    # of its unit (it warns). The copy is one activation per tower and step.
    return output.redistribute(placements=[Replicate()]).to_local().clone()


def _average_head_scores(group, module: nn.Module, args, output):
    if isinstance(output, DTensor) or output.dim() != 2:  # tokens (a plain forward), not scores
        return None
    scores = output.clone()
    dist.all_reduce(scores, group=group)
    return scores / dist.get_world_size(group)


def _replicate_grad_hook(param) -> None:
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(placements=param.placements)


def replicate_partial_gradients(model: nn.Module) -> int:
    """Make the gradients of tp-replicated DTensor parameters replicated again; returns how many.

    Under sequence parallel the norms see only their rank's tokens, so their gradients come out as
    partial sums (`Partial`). FSDP2 reduces them to the parameter's placement itself (and
    `parallelize_model` always applies FSDP2 when tp > 1); for a model given `apply_tp` alone this
    hook does, right after each gradient is accumulated. Register it on the materialised model
    (parameters replaced later, e.g. by `to_empty`, lose their hooks).
    """
    count = 0
    for param in model.parameters():
        if isinstance(param, DTensor) and all(p.is_replicate() for p in param.placements):
            param.register_post_accumulate_grad_hook(_replicate_grad_hook)
            count += 1
    return count
