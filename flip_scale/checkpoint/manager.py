"""CheckpointManager: writes and reads one run's checkpoints from the components that hold state.

    manager = CheckpointManager(run_dir, cfg.checkpoint,
                                {"engine": engine, "trainer": trainer_state, "data": data_position},
                                config_yaml=cfg.to_yaml(), model_arch=arch.to_dict(), model_config=asdict(cfg.model))
    manager.maybe_save(step)            # every cfg.every_steps (collective)
    trainer_dict = manager.load(path)   # collective
    manager.close()                     # commits a background save still being written

The manager owns the layout of a step directory; the components own their contents and declare
how they are stored (attribute `checkpoint_kind`; without one, by key: "engine" sharded,
"trainer" json, "data" rank_blobs):

  sharded     `state_dict()` -> a DCP-able dict; its top-level entries are top-level DCP keys
              (the native engine's "model" and "optim"), every rank writing its part. On load its
              `state_dict()` is the template DCP fills, handed back to `load_state_dict(template)`.
              The top-level entries named in `partial_state_keys` (default ("optim",): a parameter
              that never had a gradient has no optimizer state) load with allow_partial_load,
              the others strictly.
  files       `save_files(tmp_dir)` / `load_files(step_dir)`, collective: a component that writes
              its own files into the step directory (the DeepSpeed engine owns its checkpoint files).
  json        `state_dict()` -> a JSON-able dict, written by rank 0 as trainer_state.json with
              "step" added; `load_state_dict(dict)` gets the file's dict. Exactly one, and it must
              carry `world_size` (the completeness checks count the rng_rank{r}.pt files by it).
  rank_blobs  `state_dict()` -> this rank's JSON-able blob, or None (this rank writes none), stored
              as `{blob_name}.json` (e.g. data_rank3.json); on load `load_state_dict(blobs)` gets
              every blob named `{blob_prefix}{index}.json`, sorted by index. Never looked inside.

Besides, every checkpoint holds config.yaml (`config_yaml`) and every rank's RNG states
(rng_rank{r}.pt), restored last on load. A save writes `step_XXXXXXXX.tmp/`, renames it when every
rank has finished, updates `latest` and prunes (flip_scale/checkpoint/store.py). With
`cfg.async_save` the sharded state is written in the background (dcp.AsyncWriter) and committed by
the next save or by `finalize` / `close`, which every rank must call before exiting; the small files
are written first, before the call returns, because they hold the state of this moment (the RNG
moves on while the shards are written).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..distributed import barrier
from ..runtime import any_rank, distributed, write_json_atomic
from . import faultpoints
from .compat import check_architecture
from .errors import CheckpointSaveError, IncompatibleCheckpoint
from .dcp import AsyncWriter, load_state, rng_state, save_state, set_rng_state
from .store import (
    CheckpointError, checkpoint_problem, commit_step_dir, find_latest, prune_checkpoints, read_rank_blobs,
    step_dir_name,
)

try:  # what DCP raises when a rank's write fails (it wraps the OSError)
    from torch.distributed.checkpoint.api import CheckpointException as _DCPWriteError
except ImportError:  # pragma: no cover - older torch
    _DCPWriteError = OSError
_WRITE_ERRORS = (OSError, CheckpointError, _DCPWriteError)


class _SaveFailed(CheckpointError):
    """One phase of a save failed on some rank (raised on every rank alike). `error`: this rank's
    own error, None where another rank failed."""

    def __init__(self, phase: str, error: Optional[BaseException]):
        self.phase, self.error = phase, error
        super().__init__(f"{phase} failed {_describe(error) if error is not None else 'on another rank'}")


def _describe(error: BaseException) -> str:
    """One line per error; DCP's wrapper names the rank and the error below it (not its traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"on rank {rank}: {type(pair[0]).__name__}: {pair[0]}" for rank, pair in failures.items())
    return f"{type(error).__name__}: {error}"


def _agreed(phase: str, action) -> Any:
    """Run `action()` on this rank; if it failed with a write error on any rank, every rank raises
    _SaveFailed (collective: ranks never go on into the next collective alone)."""
    error, result = None, None
    try:
        result = action()
    except _WRITE_ERRORS as caught:
        error = caught
    if any_rank(error is not None):
        raise _SaveFailed(phase, error)
    return result

log = logging.getLogger("flip_scale.checkpoint")

KINDS = ("sharded", "files", "json", "rank_blobs")
_KIND_BY_KEY = {"engine": "sharded", "trainer": "json", "data": "rank_blobs"}
_NEEDS = {
    "sharded": ("state_dict", "load_state_dict"),
    "files": ("save_files", "load_files"),
    "json": ("state_dict", "load_state_dict"),
    "rank_blobs": ("state_dict", "load_state_dict", "blob_name", "blob_prefix"),
}
DEFAULT_PARTIAL_STATE_KEYS = ("optim",)
def check_compatible(path: Path, model_arch: Optional[dict] = None, model_config: Optional[dict] = None) -> None:
    """Refuse (IncompatibleCheckpoint) a complete checkpoint this flip_scale cannot load: a newer
    format_version, or (with `model_arch`) another architecture. Reads only its small files, so
    the trainer checks it before building the engine."""
    path = Path(path)
    written = json.loads((path / "trainer_state.json").read_text()).get("format_version", 1)
    if not isinstance(written, int) or written > FORMAT_VERSION:
        raise IncompatibleCheckpoint(
            f"{path} has checkpoint format_version {written!r} (trainer_state.json), newer than the {FORMAT_VERSION} "
            f"this flip_scale reads: resume it with the flip_scale that wrote it, or start from its weights with that "
            f"version's tools/convert_ckpt.py consolidate")
    if model_arch is not None:
        try:
            check_architecture(path, model_arch, model_config)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as error:
            raise IncompatibleCheckpoint(str(error)) from None


# The layout of a step directory this code writes and reads (trainer_state.json "format_version";
# checkpoints from before it was recorded are version 1). A newer one is refused before loading.
FORMAT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if distributed() else 0


def component_kind(key: str, component: Any) -> str:
    """How `component` (the entry `key` of the manager's states) is stored."""
    kind = getattr(component, "checkpoint_kind", None) or _KIND_BY_KEY.get(key)
    if kind not in KINDS:
        declared = f"declares checkpoint_kind={kind!r}" if kind else "declares no checkpoint_kind"
        raise ValueError(f"checkpoint component {key!r} {declared}; valid kinds: {', '.join(KINDS)} "
                         f"(without the attribute: {', '.join(f'{k!r} is {v}' for k, v in _KIND_BY_KEY.items())})")
    missing = [name for name in _NEEDS[kind] if not hasattr(component, name)]
    if missing:
        raise ValueError(f"checkpoint component {key!r} ({kind}) lacks {', '.join(missing)}")
    return kind


class CheckpointManager:
    """The checkpoints of `run_dir` (see the module docstring). `cfg`: a config.CheckpointConfig
    (every_steps, keep_last, keep_every, async_save). `model_arch` / `model_config` (the run's
    FlipArch.to_dict() and `model` section): `load` refuses a checkpoint of another architecture,
    or of other options that change what the model computes, before anything is loaded.
    `writer`: the AsyncWriter background saves go through (default: the manager's own, its gloo
    group with the collective timeout `writer_timeout_s`)."""

    def __init__(self, run_dir, cfg, states: dict, *, config_yaml: str, model_arch: Optional[dict] = None,
                 model_config: Optional[dict] = None, writer: Optional[AsyncWriter] = None,
                 writer_timeout_s: Optional[float] = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.states = dict(states)
        self.config_yaml = config_yaml
        self.model_arch = model_arch
        self.model_config = model_config
        self.kinds = {key: component_kind(key, component) for key, component in self.states.items()}
        trainer = [key for key, kind in self.kinds.items() if kind == "json"]
        if len(trainer) != 1:
            raise ValueError(f"checkpoint components need exactly one of kind 'json' (trainer_state.json), "
                             f"got {trainer or 'none'}")
        self._trainer_key = trainer[0]
        # Checked here, on every rank alike: a save would raise only on the ranks writing a blob,
        # leaving the others in the next barrier.
        for key, kind in self.kinds.items():
            if kind == "rank_blobs":
                component = self.states[key]
                if not re.fullmatch(rf"{re.escape(component.blob_prefix)}\d+", component.blob_name):
                    raise ValueError(f"checkpoint component {key!r}: blob_name {component.blob_name!r} is not "
                                     f"blob_prefix {component.blob_prefix!r} followed by an index: a load would not "
                                     f"find it")
        self._writer = writer if writer is not None else AsyncWriter(writer_timeout_s)
        self.failed_in_a_row = 0  # saves that failed since the last one that was written

    def _of_kind(self, kind: str) -> list:
        return [self.states[key] for key, k in self.kinds.items() if k == kind]

    @property
    def pending(self) -> Optional[Path]:
        """The final path of the background save not yet committed, if any."""
        return self._writer.pending

    # ------------------------------------------------------------------ saving

    def maybe_save(self, step: int, force: bool = False) -> Optional[Path]:
        """`save(step)` when `step` is a multiple of cfg.every_steps or `force` (collective: every
        rank decides alike); else None."""
        every = int(self.cfg.every_steps or 0)
        if force or (every > 0 and step % every == 0):
            return self.save(step)
        return None

    def _trainer_state(self, step: int) -> dict:
        own = self.states[self._trainer_key].state_dict()
        # "step" before "scheduler", where the checkpoints before the manager had it.
        state = {k: v for k, v in own.items() if k != "scheduler"}
        state["step"] = step
        state["format_version"] = FORMAT_VERSION
        if "scheduler" in own:
            state["scheduler"] = own["scheduler"]
        if "sharded" not in self.kinds.values():
            state["dcp_shards"] = False  # no .metadata: the completeness check must not ask for one
        if "world_size" not in state:
            raise ValueError(f"checkpoint component {self._trainer_key!r}: its state_dict() has no 'world_size' "
                             f"(the completeness checks count the rng_rank{{r}}.pt files by it)")
        return state

    def _rank_blobs(self) -> dict:
        """blob name -> this rank's blob, of every rank_blobs component that has one."""
        blobs = {}
        for component in self._of_kind("rank_blobs"):
            blob = component.state_dict()
            if blob is None:
                continue
            name, prefix = component.blob_name, component.blob_prefix
            if not re.fullmatch(rf"{re.escape(prefix)}\d+", name):
                raise ValueError(f"blob_name {name!r} is not blob_prefix {prefix!r} followed by an index: "
                                 f"a load would not find it")
            blobs[name] = blob
        return blobs

    def _sharded_state(self) -> dict:
        merged: dict = {}
        for key, kind in self.kinds.items():
            if kind != "sharded":
                continue
            for entry, value in self.states[key].state_dict().items():
                if entry in merged:
                    raise ValueError(f"checkpoint component {key!r}: top-level entry {entry!r} is another "
                                     f"component's too")
                merged[entry] = value
        return merged

    def save(self, step: int) -> Optional[Path]:
        """Write `run_dir/step_XXXXXXXX/` collectively (every rank calls this), update `latest`,
        prune; with cfg.async_save the sharded state is still being written when this returns
        (the returned path exists once it is committed).

        A save that fails on any rank (no space, permission, I/O error) is logged with the path and
        the error on every rank that saw it, its `.tmp` directory removed, `latest` left naming the
        previous checkpoint, and None returned: training goes on, the next save tries again.
        checkpoint.required, or more than checkpoint.max_failed_saves failures in a row, raise
        CheckpointSaveError instead."""
        self.finalize()
        final = self.run_dir / step_dir_name(step)
        tmp = self.run_dir / (step_dir_name(step) + ".tmp")
        try:
            path = self._write(step, tmp, final)
        except _SaveFailed as failure:
            self._failed(final, tmp, failure)
            return None
        return path

    def _write(self, step: int, tmp: Path, final: Path) -> Path:
        rank = _rank()
        trainer_state, blobs = self._trainer_state(step), self._rank_blobs()

        def make_dir():
            if rank == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)

        _agreed(f"creating {tmp}", make_dir)
        sharded = self._sharded_state()

        def small_files():
            # The small files first: they hold the state of this moment (the RNG moves on during an async write).
            torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
            for name, blob in blobs.items():
                write_json_atomic(tmp / f"{name}.json", blob)
            if rank == 0:
                write_json_atomic(tmp / "trainer_state.json", trainer_state)
                (tmp / "config.yaml").write_text(self.config_yaml)

        _agreed(f"writing the state files into {tmp}", small_files)
        for component in self._of_kind("files"):
            _agreed(f"writing the engine's files into {tmp}", functools.partial(component.save_files, tmp))
        commit = functools.partial(self._commit, tmp, final, step, self.cfg.keep_last, self.cfg.keep_every,
                                   time.perf_counter())
        if sharded and self.cfg.async_save:
            _agreed(f"starting the background write of {tmp}",
                    functools.partial(self._writer.start, sharded, tmp, final, commit))
            log.info("checkpoint %s: writing in the background", final)
            return final
        if sharded:
            _agreed(f"writing the model and optimizer shards into {tmp}", functools.partial(save_state, sharded, tmp))
        commit()
        return final

    def _commit(self, tmp: Path, final: Path, step: int, keep_last: int, keep_every: int, started: float) -> None:
        """Every rank has written its part of `tmp`: rename it, update `latest`, prune."""
        faultpoints.reach("mid_save", step)
        barrier()

        def rename():
            if _rank() == 0:
                commit_step_dir(tmp, final)

        _agreed(f"renaming {tmp} to {final.name} and pointing latest at it", rename)
        self.failed_in_a_row = 0  # written and committed: synchronous, background or engine files alike
        if _rank() == 0:
            try:
                prune_checkpoints(self.run_dir, keep_last, keep_every, step)
            except OSError as error:  # the new checkpoint is in place: an old one left behind is no failure
                log.warning("checkpoint %s written, but pruning older ones failed: %s", final, error)
            log.info("checkpoint written: %s (%.1f s)", final, time.perf_counter() - started)
        barrier()

    def _failed(self, final: Path, tmp: Path, failure: _SaveFailed) -> None:
        """Log a failed save loudly, clean up, and stop the run if the policy says so."""
        self.failed_in_a_row += 1
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = find_latest(self.run_dir)
        kept = f"{self.run_dir / 'latest'} still names {latest}" if latest else "there is no earlier checkpoint"
        message = f"checkpoint {final} was NOT written: {failure} (rank {_rank()}); {kept}"
        limit = int(getattr(self.cfg, "max_failed_saves", 3))
        if getattr(self.cfg, "required", False):
            raise CheckpointSaveError(f"{message}; checkpoint.required=true: stopping the run")
        if self.failed_in_a_row > limit:
            raise CheckpointSaveError(f"{message}; {self.failed_in_a_row} saves in a row failed, more than "
                                      f"checkpoint.max_failed_saves={limit}: stopping the run")
        if failure.error is not None or _rank() == 0:
            log.error("CHECKPOINT SAVE FAILED: %s; training goes on and the next save tries again (%d in a row, "
                      "the run stops after checkpoint.max_failed_saves=%d)", message, self.failed_in_a_row, limit)

    def finalize(self) -> None:
        """Wait for the pending background save on every rank and commit it (collective; a no-op
        when none is pending). A failed one is handled as `save` handles a failure."""
        final = self._writer.pending
        try:
            self._writer.finalize()
        except CheckpointError as error:
            failure = error if isinstance(error, _SaveFailed) else _SaveFailed("the background write", error)
            self._failed(final, final.with_name(final.name + ".tmp"), failure)
            return

    def abandon(self) -> None:
        """After a failure: let this rank's background write finish, but do not commit it (the
        other ranks may be gone)."""
        self._writer.abandon()

    def close(self) -> None:
        self.finalize()

    # ------------------------------------------------------------------ loading

    def load(self, path) -> dict:
        """Load checkpoint `path` into every component (collective) and restore this rank's RNG
        states; return the trainer_state.json dict. An incomplete checkpoint, or one of another
        architecture (with `model_arch`), is refused before anything is loaded."""
        path = Path(path)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
        check_compatible(path, self.model_arch, self.model_config)
        for component in self._of_kind("sharded"):
            template = component.state_dict()
            partial_keys = set(getattr(component, "partial_state_keys", DEFAULT_PARTIAL_STATE_KEYS))
            strict = {key: value for key, value in template.items() if key not in partial_keys}
            partial = {key: value for key, value in template.items() if key in partial_keys}
            if strict:
                load_state(strict, path)
            if partial:
                load_state(partial, path, allow_partial_load=True)
            component.load_state_dict(template)
        for component in self._of_kind("files"):
            component.load_files(path)
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        self.states[self._trainer_key].load_state_dict(trainer_state)
        for component in self._of_kind("rank_blobs"):
            component.load_state_dict(read_rank_blobs(path, component.blob_prefix))
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return trainer_state
