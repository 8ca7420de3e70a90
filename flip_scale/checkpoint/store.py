"""The run directory: step directories, `latest`, which checkpoints are complete, pruning, resume.

    run_dir/
      step_00001234/        one checkpoint (what is inside: flip_scale/checkpoint/__init__.py)
      step_00001240.tmp/    a save in progress, or left by a crash mid-save: never a candidate
      latest                "step_00001234": the last checkpoint committed

A save is written under the `.tmp` name and renamed when every rank has finished
(`commit_step_dir`); `latest` is replaced after the rename, so a crash mid-save never leaves a
checkpoint that resume would pick. Completeness (`checkpoint_problem`) is judged from the files
alone, so `--resume auto` also skips a truncated or partly copied checkpoint (with a warning naming
it) in favour of an older one.

Nothing here writes tensors or knows what a component stores: only names, sizes and the JSON keys
the layout needs (`world_size` of trainer_state.json, which counts the rng files; `engine`
"deepspeed", whose files deepspeed_files.py knows by name; `dcp_shards`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..runtime import write_text_atomic
from . import faultpoints
from .deepspeed_files import deepspeed_files_problem
from .errors import CheckpointError  # defined there, imported from here by most of the package
from .safety import read_dcp_metadata

log = logging.getLogger("flip_scale.checkpoint")

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step of a step directory `step_XXXXXXXX`."""
    return int(STEP_DIR.match(Path(path).name).group(1))


# ----------------------------------------------------------------------------- completeness


def storage_problem(path: Path) -> Optional[str]:
    """Why the DCP data of `path` is incomplete (a storage file named by `.metadata` is missing or
    shorter than the metadata says), or None. Reads only the metadata and file sizes."""
    path = Path(path)
    try:
        metadata = read_dcp_metadata(path)
    except Exception as error:  # unreadable, truncated or refused metadata
        return f"its .metadata cannot be read ({error})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"the shard file {name} named in .metadata is missing"
        have = file.stat().st_size
        if have < size:
            return f"the shard file {name} holds {have} bytes, .metadata says at least {size} (truncated)"
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None when it is."""
    path = Path(path)
    if not STEP_DIR.match(path.name):
        return f"the name {path.name!r} is not step_XXXXXXXX (a .tmp directory is a save that never finished)"
    if not path.is_dir():
        return "it does not exist"
    for name in ("trainer_state.json", "config.yaml"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"trainer_state.json cannot be read ({error})"
    world_size = int(trainer_state.get("world_size", 0) or 0)
    for rank in range(world_size):
        if not (path / f"rng_rank{rank}.pt").is_file():
            return f"rng_rank{rank}.pt is missing (written by {world_size} ranks)"
    # The DeepSpeed engine's files (deepspeed/ inside the step directory): every rank's, at full length.
    if trainer_state.get("engine") == "deepspeed":
        return deepspeed_files_problem(path, world_size)
    # A checkpoint whose engine writes its own files (CheckpointManager kind "files", no sharded
    # component) records "dcp_shards": false and has no .metadata; every other one has DCP shards.
    if trainer_state.get("dcp_shards", True) is False:
        return None
    if not (path / ".metadata").is_file():
        return ".metadata is missing"
    return storage_problem(path)


def is_complete(path: Path) -> bool:
    """A renamed step directory with readable metadata, trainer state, config and every shard file
    at its full size (no `.tmp` suffix)."""
    return checkpoint_problem(path) is None


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def find_latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint named by `latest` if complete, else the newest complete one (with a warning
    naming each checkpoint skipped and why)."""
    run_dir = Path(run_dir)
    latest_file = run_dir / "latest"
    skipped = None
    if latest_file.exists():
        named = run_dir / latest_file.read_text().strip()
        problem = checkpoint_problem(named)
        if problem is None:
            return named
        log.warning("'latest' names %s, which is incomplete: %s; looking for an older complete one", named, problem)
        skipped = named
    for path in reversed(list_checkpoints(run_dir)):
        if skipped is not None and path.resolve() == skipped.resolve():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def remove_unfinished_saves(run_dir: Path) -> list[str]:
    """Delete the `step_XXXXXXXX.tmp/` directories of `run_dir` (saves that never finished: the job
    stopped during them), each with a warning; returns their names. Never a candidate for resume
    anyway; removed so that they do not hold disk space until the next save of that step. One
    process only (rank 0), before the run's first save."""
    removed = []
    for path in sorted(Path(run_dir).glob("step_*.tmp")):
        if path.is_dir() and STEP_DIR.match(path.name[:-len(".tmp")]):
            log.warning("removing %s: a checkpoint save that never finished (the job stopped during it); "
                        "it was never a candidate for resume", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def read_rank_blobs(step_dir: Path, prefix: str) -> list[dict]:
    """The JSON files `{prefix}{index}.json` of a step directory, sorted by index (not by name:
    rank 10 comes after rank 9)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.json$")
    found = [(int(m.group(1)), f) for f in Path(step_dir).iterdir() if (m := pattern.match(f.name))]
    return [json.loads(f.read_text()) for _, f in sorted(found)]


# ----------------------------------------------------------------------------- commit and retention


def commit_step_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written `tmp` to `final` (replacing an older save of that step) and then point
    `latest` at it. One process only (rank 0), after every rank has finished writing."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    faultpoints.reach("renamed", faultpoints.step_of_dir(final))
    write_text_atomic(final.parent / "latest", final.name + "\n")


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int, current_step: Optional[int] = None) -> None:
    """Delete complete checkpoints beyond the last `keep_last`, keeping every `keep_every`-th step
    (`keep_last` <= 0 keeps everything).

    With `current_step` (the checkpoint just written) only checkpoints up to that step count and
    can go: after a resume from an older checkpoint, later ones of the abandoned continuation are
    left alone rather than allowed to push out the checkpoint just written."""
    if keep_last <= 0:
        return
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    if current_step is not None:
        complete = [p for p in complete if step_of(p) <= current_step]
    for path in complete[:-keep_last]:
        if keep_every and step_of(path) % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- resume


def resolve_resume(resume: Optional[str], run_dir: Path, option: str = "--resume") -> Optional[Path]:
    """`--resume auto`: the latest complete checkpoint of the run directory, or none (fresh start).
    `--resume PATH`: that checkpoint (a step directory, or a run directory's latest).
    `option`: the command-line option named in errors; "auto" has its meaning only for --resume
    (`--init-from` also takes a consolidated directory: flip_scale.checkpoint.sources.resolve_init_from)."""
    if not resume:
        return None
    if resume == "auto" and option == "--resume":
        return find_latest(run_dir)
    also = "" if option == "--resume" else " or a consolidated directory (model.safetensors + flip_config.yaml)"
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    if path.is_dir() and not path.name.startswith("step_"):
        found = find_latest(path)
        if found is not None:
            return found
        raise CheckpointError(
            f"{option} {resume}: no complete checkpoint in that run directory (expected step_XXXXXXXX directories"
            f"{also})"
        )
    raise CheckpointError(
        f"{option} {resume}: not a complete checkpoint ({problem}); expected a complete step_XXXXXXXX directory"
        f"{',' if also else ' or'} a run directory{also}"
    )
