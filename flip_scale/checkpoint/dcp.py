"""Sharded state through torch.distributed.checkpoint (DCP): gathering it, writing it (in the
foreground or in a background thread), reading it back without unpickling code, and RNG states.

DCP writes each rank's part of a state dict and re-shards on load: a checkpoint written with one
(pp, dp, tp) layout loads into any other. The model and optimizer state is that of every model part
of this rank (the pipeline stages it holds), merged: stages hold disjoint parameter names, and the
optimizer state is flattened to one key per (parameter name, state), so the keys of several parts
never collide.

Nothing is unpickled without restriction: `.metadata` is read by the restricted unpickler of
`safety.py` (`_RestrictedReader`), and the non-tensor entries DCP stores as pickled bytes (optimizer
hyper-parameters) by `torch.load(weights_only=True)` (`SafeLoadPlanner`).

Asynchronous writes (`AsyncWriter`): the state is copied to host memory and written by a background
thread over a gloo group of the writer's own, so that its collectives never interleave with
training's; `finalize` waits for it on every rank and then runs the commit it was given.
"""

from __future__ import annotations

import datetime
import logging
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..runtime import all_ranks, distributed
from . import faultpoints
from .safety import read_dcp_metadata
from .store import CheckpointError

log = logging.getLogger("flip_scale.checkpoint")

# Optimizer state flattened to one key per (parameter name, state): the keys of several model parts
# (pipeline stages on one rank) merge without collisions, and re-shard across any layout.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def model_state(model_parts) -> dict:
    """The model state of every part (pipeline stages hold disjoint names), merged."""
    merged = {}
    for part in _as_list(model_parts):
        merged.update(get_model_state_dict(part))
    return merged


def optimizer_state(model_parts, optimizers) -> dict:
    merged = {}
    for part, optimizer in zip(_as_list(model_parts), _as_list(optimizers)):
        merged.update(get_optimizer_state_dict(part, optimizer, options=_OPTIM_OPTIONS))
    return merged


class ModelOptimizerState:
    """A "sharded" checkpoint component (CheckpointManager) of model parts and their optimizers:
    the top-level DCP keys "model" and, with optimizers, "optim".

    `model_parts` / `optimizers`: one module and its optimizer, or lists of model parts (the
    pipeline stages of this rank) and their optimizers, in the same order; `optimizers=None`:
    the model alone. "optim" loads partially (the manager's default `partial_state_keys`): a
    parameter that never had a gradient has no optimizer state in the file."""

    checkpoint_kind = "sharded"

    def __init__(self, model_parts, optimizers=None):
        self.model_parts = model_parts
        self.optimizers = optimizers

    def state_dict(self) -> dict:
        state = {"model": model_state(self.model_parts)}
        if self.optimizers is not None:
            state["optim"] = optimizer_state(self.model_parts, self.optimizers)
        return state

    def load_state_dict(self, state: dict) -> None:
        for part in _as_list(self.model_parts):
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if self.optimizers is not None and "optim" in state:  # a model-only state loads the weights alone
            for part, optimizer in zip(_as_list(self.model_parts), _as_list(self.optimizers)):
                set_optimizer_state_dict(part, optimizer, optim_state_dict=state["optim"], options=_OPTIM_OPTIONS)


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load that it assumes one process; it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ----------------------------------------------------------------------------- reading


class _RestrictedReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler (DCP's own uses pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank DCP metadata (written without collectives) is not supported")
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def stored_names(path: Path) -> set:
    """The names of the entries a DCP checkpoint holds (flattened: `model.visual.cls_token`, ...)."""
    return set(read_dcp_metadata(Path(path)).state_dict_metadata)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries (optimizer hyper-parameters, stored as pickled
    bytes) read by `torch.load(weights_only=True)`: DCP's own planner unpickles them with
    `weights_only=False`, which would run code planted in a checkpoint shard."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DCP's planner uses

        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as error:  # UnpicklingError naming the refused global, usually
            lines = str(error).splitlines()
            reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
            refused = (f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data (numbers, strings, lists, "
                            f"dicts, tensors) and is refused rather than unpickled: {reason}")
            raise CheckpointError(refused) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_state(state: dict, path: Path, allow_partial_load: bool = False) -> None:
    """Fill `state` (a template: its tensors are loaded in place) from the DCP data of `path`
    (collective), with the restricted reader and planner. `allow_partial_load`: entries of
    `state` the checkpoint lacks are left as they are instead of refused. A refused entry surfaces
    as CheckpointError (DCP wraps errors of its read step in its own exception)."""
    planner = SafeLoadPlanner(allow_partial_load=allow_partial_load)
    try:
        with _single_process_quiet():
            torch_dcp.load(state, storage_reader=_RestrictedReader(str(path)), planner=planner,
                           no_dist=not distributed())
    except CheckpointError:
        raise
    except CheckpointException as error:  # a BaseException holding each rank's error
        refused = [exc for exc, _ in error.failures.values() if isinstance(exc, CheckpointError)]
        if refused:
            raise CheckpointError(f"{path}: {refused[0]}") from None
        raise


def save_state(state: dict, path: Path) -> None:
    """Write `state` as DCP data into the directory `path` (collective; every rank its part)."""
    with _single_process_quiet():
        torch_dcp.save(state, checkpoint_id=str(path), storage_writer=faultpoints.dcp_writer(path),
                       no_dist=not distributed())


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states, as tensors only (the file loads with weights_only=True)."""
    _, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(words, dtype=torch.int64)}
    if gauss_next is not None:  # the second normal of the last `random.gauss` pair, still to come
        state["python_gauss_next"] = torch.tensor([gauss_next], dtype=torch.float64)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gauss_next = float(state["python_gauss_next"].item()) if "python_gauss_next" in state else None
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- asynchronous writes


@dataclass
class _PendingWrite:
    future: Any  # what DCP's async_save returned (the upload's completion)
    final: Path  # the checkpoint the write will be committed as
    commit: Callable[[], None]  # collective: run on every rank once every rank has written


class AsyncWriter:
    """DCP writes in a background thread, at most one at a time; committed by `finalize`.

    The writer owns the gloo group its background collectives run on (DCP's async save gathers the
    plan over a process group; on the training group it could interleave with training's own
    collectives). The group is made on first use under the current default process group, and
    again under a later one (the next run in the same process). `group_timeout_s`: its collective
    timeout (the run's long one: a save may skew the ranks; the short one set after the first step
    is for training's groups), torch's default without it."""

    def __init__(self, group_timeout_s: Optional[float] = None) -> None:
        self.group_timeout_s = group_timeout_s
        self._pending: Optional[_PendingWrite] = None
        self._group = None
        self._group_world = None

    @property
    def pending(self) -> Optional[Path]:
        """The final path of the write not yet committed, if any."""
        return self._pending.final if self._pending is not None else None

    def _writer_group(self):
        if not distributed():
            return None
        world = dist.group.WORLD
        if self._group is None or self._group_world is not world:
            timeout = None if self.group_timeout_s is None else datetime.timedelta(seconds=self.group_timeout_s)
            self._group = dist.new_group(backend="gloo", timeout=timeout)
            self._group_world = world
        return self._group

    def start(self, state: dict, tmp: Path, final: Path, commit: Callable[[], None]) -> None:
        """Begin writing `state` into `tmp` (collective); `commit` runs at `finalize`."""
        if self._pending is not None:
            raise CheckpointError(f"the background write of {self._pending.final} is still pending; finalize it first")
        with _single_process_quiet():
            response = torch_dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._writer_group(),
                                            no_dist=not distributed())
        # Newer DCP returns staging and upload futures; the upload is what the commit waits for.
        self._pending = _PendingWrite(getattr(response, "upload_completion", response), Path(final), commit)

    def finalize(self) -> Optional[Path]:
        """Wait for the pending write on every rank and commit it (collective; a no-op when none
        is pending). Returns the committed checkpoint, or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = None
        try:
            pending.future.result()
        except Exception as caught:  # reported below, after every rank has said whether it succeeded
            error = caught
        if not all_ranks(error is None):
            where = f"on this rank: {type(error).__name__}: {error}" if error is not None else "on another rank"
            raise CheckpointError(
                f"the background write of checkpoint {pending.final} failed {where}; it was not committed and "
                f"{pending.final.parent / 'latest'} still names the previous checkpoint"
            )
        pending.commit()
        return pending.final

    def abandon(self) -> None:
        """After a failure: let this rank's background write finish, but do not commit it (the
        other ranks may be gone). The `.tmp` directory is left for the next save of that step to
        replace."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except Exception:  # noqa: BLE001 - the run is failing already; the write is dropped either way
            pass
        log.warning("checkpoint %s was not committed: the run stopped before every rank had finished it", pending.final)
