"""Layout-aware helpers: gradient-norm clipping and per-rank parameter counts.

The gradient norm of a parallel model is that of the one-process model: each gradient contributes
the sum of its squares once. A DTensor gradient's local piece is summed over the mesh axes it is
sharded on (FSDP's dp_shard, tp for split weights) and not over those it is replicated on
(dp_replicate under HSDP, tp for norms and row-parallel biases); a plain tensor (replicated
everywhere) is counted as is. Pipeline stages hold disjoint parameters: their sums are added over
the pp group. The result is a plain 0-dim fp32 tensor, equal on every rank.
"""

from __future__ import annotations

import math
from typing import Iterable, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _norm_contribution(grad: torch.Tensor, norm_type: float):
    """(local contribution, process groups to reduce it over) of one gradient."""
    groups = ()
    if isinstance(grad, DTensor):
        if any(p.is_partial() for p in grad.placements):  # e.g. a sequence-parallel norm without FSDP
            grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])
        # Sharded on a mesh axis = neither replicated nor partial there (Shard, or FSDP+TP's
        # _StridedShard, which is not a Shard subclass): the pieces of that axis are summed.
        groups = tuple(
            grad.device_mesh.get_group(i)
            for i, p in enumerate(grad.placements)
            if not (p.is_replicate() or p.is_partial())
        )
        grad = grad.to_local()
    if grad.numel() == 0:
        value = torch.zeros((), dtype=torch.float32, device=grad.device)
    elif math.isinf(norm_type):
        value = grad.detach().abs().max().float()
    else:
        value = torch.linalg.vector_norm(grad.detach(), norm_type, dtype=torch.float32) ** norm_type
    return value, groups


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor], dims=None, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients as one vector, over the whole (parallel) model."""
    norm_type = float(norm_type)
    is_inf = math.isinf(norm_type)
    grads = [p.grad for p in parameters if p.grad is not None]
    buckets: dict = {}  # group names -> (groups, [contributions]), in first-seen (parameter) order
    device = None
    for grad in grads:
        value, groups = _norm_contribution(grad, norm_type)
        device = device or value.device
        key = tuple(group.group_name for group in groups)
        buckets.setdefault(key, (groups, []))[1].append(value)
    if device is None:
        device = torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
    for groups, values in buckets.values():
        stacked = torch.stack([v.to(device) for v in values])
        part = stacked.max() if is_inf else stacked.sum()
        for group in groups:
            dist.all_reduce(part, op=op, group=group)
        total = torch.maximum(total, part) if is_inf else total + part
    pp_group = getattr(dims, "pp_group", None) if dims is not None else None
    if pp_group is not None:
        dist.all_reduce(total, op=op, group=pp_group)
    return total if is_inf else total ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    max_norm: float,
    dims=None,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale the gradients in place so that their global norm is at most `max_norm`; return that norm.

    Same formula as `torch.nn.utils.clip_grad_norm_` (coefficient max_norm / (norm + 1e-6),
    clamped to 1), on the norm of the whole model across every rank of `dims`'s layout.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = [p for p in parameters if p.grad is not None]
    total_norm = total_grad_norm(parameters, dims, norm_type)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(f"the total norm of the gradients is {total_norm.item()}; not clipping")
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for param in parameters:
        local = _local(param.grad)
        local.mul_(clip_coef.to(local.device, local.dtype))
    return total_norm


# ----------------------------------------------------------------------------- parameter counts


def local_parameter_count(model: nn.Module) -> int:
    """Elements of the parameters this rank holds (its shards)."""
    return sum(_local(p).numel() for p in model.parameters())


def global_parameter_count(model: nn.Module) -> int:
    """Elements of the parameters of the whole model held by this rank's pipeline stage."""
    return sum(p.numel() for p in model.parameters())


def parameter_counts_per_rank(model: nn.Module) -> list[int]:
    """Local parameter count of every rank (a collective: every rank must call it)."""
    count = local_parameter_count(model)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [count]
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return counts


def describe_parameter_counts(model: nn.Module, dims=None) -> str:
    """One line for the log: model size and the elements each rank holds (a collective)."""
    counts = parameter_counts_per_rank(model)
    total = global_parameter_count(model)
    per_rank = ", ".join(f"{c / 1e6:.2f}M" if c >= 1e5 else str(c) for c in counts)
    prefix = f"{dims.describe()}; " if dims is not None else ""
    return f"{prefix}parameters {total:,} in all; held per rank: [{per_rank}]"


def shard_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the local pieces of `tensors` (plain or DTensor)."""
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the local pieces of every tensor in the optimizer's state (e.g. AdamW's moments)."""
    return shard_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
