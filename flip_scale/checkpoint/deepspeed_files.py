"""The DeepSpeed engine's files inside a step directory: their names, completeness, and loading
them safely. Reading the weights and moments back is deepspeed_reader.py's.

    step_00000100/                 trainer_state.json ("engine": "deepspeed"), config.yaml, rng, data
      deepspeed/                   engine.save_checkpoint(step_tmp_dir, tag=DS_TAG, save_latest=False)
        mp_rank_00_model_states.pt                        ZeRO-1/2: rank 0's (module, param_shapes, ...)
        zero_pp_rank_{r}_mp_rank_00_model_states.pt       ZeRO-3: one per rank
        [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   one per rank (bf16_ when bf16 is on)

Loading is safe. Every file goes through `torch.load(weights_only=True)` (`safe_torch_load`): the
optimizer files need four DeepSpeed classes, admitted for that call only (so reading those needs
deepspeed installed; the model states, completeness and `inspect` do not). While DeepSpeed's own
loader reads a checkpoint, `refusing_unsafe_loads` serves its torch.load calls the same way.
"""

from __future__ import annotations

import importlib
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import CheckpointError
from .safety import ConvertError, UnsafeFile
from .safety import safe_torch_load as _weights_only_load

DS_TAG = "deepspeed"
MODEL_STATES = "mp_rank_00_model_states.pt"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
DEFAULT_RELEASE_BYTES = 256 * 1024 * 1024

# The globals a DeepSpeed checkpoint file holds besides tensors, containers and numbers.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def zero3_model_states(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def optim_states(rank: int, bf16: bool = False) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def tag_dir(path: Union[str, Path]) -> Path:
    """The folder holding DeepSpeed's files: `path/deepspeed` for a step directory, else `path`."""
    path = Path(path)
    return path / DS_TAG if (path / DS_TAG).is_dir() else path


# ----------------------------------------------------------------------------- loading files


def deepspeed_globals() -> list:
    """The classes of DEEPSPEED_GLOBALS, imported (deepspeed must be installed)."""
    classes = []
    for qualified in DEEPSPEED_GLOBALS:
        module, name = qualified.rsplit(".", 1)
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as error:
            raise CheckpointError(
                f"reading DeepSpeed's optimizer files needs the deepspeed package, which provides {qualified} "
                f"({type(error).__name__}: {error}); install it with `pip install deepspeed`"
            ) from None
    return classes


def safe_torch_load(path: Union[str, Path], mmap: bool = True):
    """A DeepSpeed checkpoint file through `torch.load(weights_only=True)`, admitting DeepSpeed's
    loss scalers, ZeRO stage enum and fragment addresses (DEEPSPEED_GLOBALS) for this call only.

    A file asking for any other global (a planted payload) is refused with CheckpointError naming
    the file, the global and what is allowed, before anything in it runs. deepspeed is imported
    only when the file asks for one of its classes. `mmap`: tensors are read when touched."""
    path = Path(path)
    try:
        try:
            return _weights_only_load(path, mmap=mmap)
        except UnsafeFile as error:
            if error.refused not in DEEPSPEED_GLOBALS:
                raise
        return _weights_only_load(path, mmap=mmap, allowed_globals=deepspeed_globals())
    except UnsafeFile as error:
        raise CheckpointError(
            f"{path} asks for the global {error.refused or '(unnamed)'}, which is not allowed in a DeepSpeed "
            f"checkpoint file: refused without unpickling it (loading it could run code). Allowed: tensors, "
            f"containers, numbers and {', '.join(DEEPSPEED_GLOBALS)}"
        ) from None
    except ConvertError as error:  # unreadable or truncated
        raise CheckpointError(str(error)) from None


@contextmanager
def refusing_unsafe_loads():
    """While DeepSpeed's own loader reads a checkpoint (`engine.load_checkpoint`), every
    `torch.load` it makes (with weights_only=False) is served by `safe_torch_load` instead: the
    same files, nothing unpickled beyond tensors and DeepSpeed's allow-listed classes. Not
    thread-safe (nothing else loads while a checkpoint does)."""
    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        if not isinstance(f, (str, Path)):
            raise CheckpointError(f"refusing a torch.load of {type(f).__name__} while a DeepSpeed checkpoint loads "
                                  f"(only files are read, through the weights-only loader)")
        torch.load = original  # the weights-only loader below calls torch.load itself
        try:
            loaded = safe_torch_load(f, mmap=False)
        finally:
            torch.load = load
        if map_location is not None:
            loaded = _to_location(loaded, map_location)
        return loaded

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _to_location(value, map_location):
    if torch.is_tensor(value):
        return value.to(map_location) if isinstance(map_location, (str, torch.device)) else value
    if isinstance(value, dict):
        return type(value)((k, _to_location(v, map_location)) for k, v in value.items())
    if isinstance(value, list):
        return [_to_location(v, map_location) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_location(v, map_location) for v in value)
    return value


# ----------------------------------------------------------------------------- completeness


def _file_problem(file: Path) -> Optional[str]:
    where = f"{DS_TAG}/{file.name}"
    if not file.is_file():
        return f"{where} is missing"
    if file.stat().st_size == 0:
        return f"{where} is empty"
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; a cut one has no end record
        return f"{where} is truncated (not a complete torch.save archive)"
    return None


def deepspeed_files_problem(step_dir: Union[str, Path], world_size: int) -> Optional[str]:
    """Why the DeepSpeed part of a step directory is incomplete, or None: deepspeed/ missing, the
    model states or a rank's optimizer file missing, empty or truncated, or files of more ranks
    than `world_size` (the data-parallel size it was written with; 0: unknown, the files decide).
    Reads names, sizes and each file's zip end record only."""
    directory = Path(step_dir) / DS_TAG
    if not directory.is_dir():
        return f"{DS_TAG}/ (the DeepSpeed engine's files) is missing"
    found = {}
    for file in directory.iterdir():
        match = _OPTIM_FILE.match(file.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(file)
    ranks = world_size if world_size > 0 else max(found, default=0) + 1
    extra = sorted(rank for rank in found if rank >= ranks)
    if extra:
        return (f"{DS_TAG}/ holds optimizer files of rank {extra[0]}, but the checkpoint was written by {ranks} "
                f"ranks (files of another save mixed in?)")
    if (directory / MODEL_STATES).exists():
        problem = _file_problem(directory / MODEL_STATES)
        if problem:
            return problem
    elif not (directory / zero3_model_states(0)).exists():
        return (f"{DS_TAG}/ has no model states ({MODEL_STATES} for ZeRO-1/2, {zero3_model_states(0)} "
                f"for ZeRO-3)")
    else:
        for rank in range(ranks):
            problem = _file_problem(directory / zero3_model_states(rank))
            if problem:
                return f"{problem} (ZeRO-3 writes one per rank, {ranks} ranks)"
    for rank in range(ranks):
        files = found.get(rank)
        if not files:
            return f"{DS_TAG}/{optim_states(rank)} (or its bf16_ name) is missing (written by {ranks} ranks)"
        for file in files:
            problem = _file_problem(file)
            if problem:
                return problem
    return None


def find_optim_files(directory: Path, dp_world_size: int, model_file: str) -> list[Path]:
    """The optimizer file of every data-parallel rank of a DeepSpeed folder, in rank order; a rank's
    file missing, one of another model-parallel rank, or two saves mixed is a CheckpointError."""
    by_rank: dict = {}
    for file in directory.iterdir():
        match = _OPTIM_FILE.match(file.name)
        if match is None:
            continue
        if int(match.group(3)) != 0:
            raise CheckpointError(f"{file}: model-parallel rank {int(match.group(3))}; flip_scale reads "
                                  f"data-parallel DeepSpeed checkpoints (mp_rank_00 only)")
        by_rank.setdefault(int(match.group(2)), []).append(file)
    ranks = sorted(by_rank)
    if ranks != list(range(dp_world_size)):
        missing = sorted(set(range(dp_world_size)) - set(ranks))
        detail = (f"rank {missing[0]}'s ({optim_states(missing[0])}) is missing" if missing
                  else f"found ranks {ranks}")
        raise CheckpointError(f"{directory}: written by {dp_world_size} data-parallel ranks "
                              f"(dp_world_size in {model_file}), but the optimizer files do not match: {detail}")
    for rank in ranks:
        if len(by_rank[rank]) > 1:
            raise CheckpointError(f"{directory}: rank {rank} has both a bf16_ and a plain optimizer file "
                                  f"(two saves mixed in one folder)")
    return [by_rank[rank][0] for rank in ranks]


def checked_optimizer_state(file: Path, state, zero_stage: int, dp_world_size: int) -> dict:
    """The ZeRO optimizer state dict loaded from `file`, checked against the model states' stage and
    rank count."""
    osd = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(osd, dict):
        raise CheckpointError(f"{file} is not a DeepSpeed ZeRO optimizer file (no optimizer_state_dict)")
    stage = osd.get("zero_stage")  # DeepSpeed's BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation) has none
    if stage is not None and int(stage) != zero_stage:
        raise CheckpointError(f"{file}: ZeRO stage {int(stage)}, the model states say {zero_stage}")
    count = osd.get("partition_count")
    count = max(count) if isinstance(count, (list, tuple)) else count
    if count is not None and int(count) != dp_world_size:
        raise CheckpointError(f"{file}: partitioned over {int(count)} ranks, the model states say {dp_world_size}")
    return osd
