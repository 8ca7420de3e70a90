"""What every entry point needs around the model: logging, precision, rank agreement, atomic files.

    setup_logging(rank)                       rank 0 logs INFO, the others WARNING
    precision = resolve_precision(cfg, device); with autocast_context(precision, device): ...
    configure_determinism(enabled, device)    train.deterministic: cuBLAS workspace + deterministic kernels
    value = on_rank0_for_all(compute)         rank 0 computes, every rank gets the result (or the error)
    any_rank(flag) / all_ranks(flag)          one flag agreed by every rank (collective, over the host group)
    set_host_group(group)                     the CPU-tensor group those agree over (init_distributed sets it)
    reduce_float(value, group, device, "sum") a data-parallel sum / max of one number
    write_json_atomic(path, value)            a reader never sees half a file
    host_to_device(tensor, device)            a host tensor to the GPU through pinned memory (no host stall)

Nothing here knows the model, the data or the layout: the parts and the entry points import it,
it imports no part of the package. torch is imported by the functions that need it, so the
batch-script helpers (flip_scale/preemption.py, run on the batch host) can use the file helpers at
the cost of the standard library only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


# ----------------------------------------------------------------------------- logging


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere (a line any rank logs at WARNING names its rank)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


# ----------------------------------------------------------------------------- determinism

# cuBLAS is deterministic only with a fixed workspace (CUDA >= 10.2): ":4096:8" or ":16:8";
# without one, torch.use_deterministic_algorithms(True) raises at the first cuBLAS call.
CUBLAS_WORKSPACE = ":4096:8"
CUBLAS_WORKSPACE_VALUES = (":4096:8", ":16:8")


def cublas_workspace_error(value: str) -> str:
    return (f"train.deterministic=true with CUBLAS_WORKSPACE_CONFIG={value}: cuBLAS is deterministic only with "
            f"{' or '.join(CUBLAS_WORKSPACE_VALUES)} (the first matrix product would fail); set one of those, or "
            f"unset the variable (then {CUBLAS_WORKSPACE} is set), or train.deterministic=false")


def configure_determinism(enabled: bool, device_setting: str = "auto", env=None) -> dict:
    """train.deterministic: deterministic kernels, and on CUDA the cuBLAS workspace they need.

    Call before anything touches cuBLAS (the variable is read when its handle is created); calling
    it again is harmless. A CUBLAS_WORKSPACE_CONFIG the user set is kept; one cuBLAS would not make
    deterministic is a ValueError here (it would raise at the first matrix product instead:
    `preflight.check_determinism` refuses it as a config error first); without a visible CUDA
    device (or with train.device=cpu) no variable is set. Returns the variables it set."""
    if not enabled:
        return {}
    import torch

    env = os.environ if env is None else env
    changed = {}
    if device_setting != "cpu" and torch.cuda.is_available():
        current = env.get("CUBLAS_WORKSPACE_CONFIG")
        if not current:
            env["CUBLAS_WORKSPACE_CONFIG"] = changed["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        elif current not in CUBLAS_WORKSPACE_VALUES:
            raise ValueError(cublas_workspace_error(current))
    torch.use_deterministic_algorithms(True)
    return changed


# ----------------------------------------------------------------------------- precision


def resolve_precision(cfg, device) -> str:
    """`train.precision` of `cfg` on `device`: "auto" is bf16 autocast where the GPU has it, else fp32."""
    import torch

    if cfg.train.precision != "auto":
        return cfg.train.precision
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_context(precision: str, device):
    """bf16 autocast for `precision` "bf16", else nothing."""
    import torch

    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_for(cfg, device):
    """The autocast the trainer runs `cfg` under on `device` (train.precision, resolved): evaluation
    of a checkpoint uses it too, so that it sees the numbers the trainer's own evaluations see."""
    return autocast_context(resolve_precision(cfg, device), device)


def host_to_device(tensor, device):
    """A host tensor on `device` without stalling the host: on CUDA through page-locked memory (a
    copy from pageable memory, non_blocking or not, waits for the GPU's queue to drain), elsewhere
    `.to(device)`."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":  # only a host tensor can be page-locked
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- rank agreement


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _world_size(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if distributed() else 1


def collective_device():
    """Where a small tensor for a collective of the default group lives (NCCL takes CUDA tensors only)."""
    import torch
    import torch.distributed as dist

    if distributed() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RemoteError(RuntimeError):
    """An error raised on rank 0 inside `on_rank0_for_all` whose type could not be sent as it is."""


def on_rank0_for_all(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0; its result on every rank, or its error raised on every rank alike
    (collective). The error keeps its type and message when it can be pickled (ConfigError,
    CheckpointError, ValueError, ...), else it is a RemoteError naming the type."""
    if _world_size() == 1:
        return compute()
    import torch.distributed as dist

    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", compute())]
        except Exception as error:  # every rank must leave the broadcast, and raise alike
            try:
                copy.deepcopy(error)  # rebuilt as a receiver rebuilds it (an error that cannot be is described)
                pickle.dumps(error)
                payload = [("error", error)]
            except Exception:  # noqa: BLE001 - an error that does not travel is described instead
                payload = [("error", RemoteError(f"on rank 0: {type(error).__name__}: {error}"))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


# The group the default-group agreements (any_rank / all_ranks without a group) run over: one that
# takes CPU tensors (gloo), so a flag agreed every step (the preemption check) syncs the hosts and
# never drains the GPU's queue, as a flag tensor all-reduced over NCCL and read back would.
_HOST = {"group": None, "world": None}


def set_host_group(group) -> None:
    """Agree over `group` (CPU tensors) when any_rank / all_ranks get no group; None: the default
    group on `collective_device()`. Tied to the current default group: a new one forgets it."""
    import torch.distributed as dist

    _HOST.update(group=group, world=dist.group.WORLD if distributed() else None)


def host_group():
    """The group set by `set_host_group` while its default group lives, else None."""
    import torch.distributed as dist

    if _HOST["group"] is None or not distributed() or _HOST["world"] is not dist.group.WORLD:
        return None
    return _HOST["group"]


def _agree(flag: bool, op: str, group=None) -> bool:
    if _world_size(group) == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist

    if group is None and host_group() is not None:
        group, device = host_group(), torch.device("cpu")
    else:
        device = collective_device()
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def any_rank(flag: bool, group=None) -> bool:
    """Whether `flag` holds on any rank of `group` (collective): ranks that would otherwise carry on
    into the next collective alone stop together instead."""
    return _agree(flag, "any", group)


def all_ranks(flag: bool, group=None) -> bool:
    """Whether `flag` holds on every rank of `group` (collective)."""
    return _agree(flag, "all", group)


def reduce_float(value: float, group, device, op: str = "sum") -> float:
    """`value` summed ("sum") or maximised ("max") over `group` (None: this process alone)."""
    if group is None:
        return float(value)
    import torch
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=reduce_op, group=group)
    return float(tensor.item())


# ----------------------------------------------------------------------------- files


def write_json_atomic(path, value, indent: Optional[int] = 1) -> Path:
    """Write `value` as JSON to `path` through a temporary file and a rename: a reader (a resume, a
    batch script) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def write_text_atomic(path, text: str) -> Path:
    """`text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
