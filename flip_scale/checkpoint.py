"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable.

A checkpoint is a directory `step_00001234/` holding
  model + optimizer      DCP shards (each rank writes its part; re-sharded on load)
  trainer_state.json     step, samples seen, lr schedule, layout it was written with
  rng_rank{r}.pt         every rank's RNG states (tensors only: loads with weights_only=True)
  data_rank{r}.json      the data stream position of each data-parallel rank
  config.yaml            the resolved config
It is written as `step_00001234.tmp/` and renamed when every rank has finished; `latest` names the
last complete one and is replaced last, so a crash mid-save never leaves a checkpoint that resume
would pick.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import barrier

log = logging.getLogger("flip_scale.checkpoint")

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


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


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_complete(path: Path) -> bool:
    """A renamed step directory with DCP metadata and trainer state (no `.tmp` suffix)."""
    path = Path(path)
    return (
        bool(STEP_DIR.match(path.name))
        and (path / ".metadata").is_file()
        and (path / "trainer_state.json").is_file()
        and (path / "config.yaml").is_file()
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint named by `latest` if complete, else the newest complete one (with a warning)."""
    run_dir = Path(run_dir)
    latest_file = run_dir / "latest"
    if latest_file.exists():
        named = run_dir / latest_file.read_text().strip()
        if is_complete(named):
            return named
        log.warning("'latest' names %s, which is missing or incomplete; looking for an older one", named)
    for path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
        log.warning("skipping incomplete checkpoint %s", path)
    return None


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    config_yaml: str,
    data_state: Optional[dict] = None,
    dp_rank: int = 0,
    keep_last: int = 3,
    keep_every: int = 0,
) -> Path:
    """Write `run_dir/step_XXXXXXXX/` collectively (every rank calls this) and update `latest`.

    `model` / `optimizer`: one module and its optimizer, or lists of model parts (the pipeline
    stages of this rank) and their optimizers, in the same order.
    """
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / (step_dir_name(step) + ".tmp")
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": model_state(model), "optim": optimizer_state(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if data_state is not None:
        _write_json_atomic(tmp / f"data_rank{dp_rank}.json", data_state)
    if rank == 0:
        full_state = dict(trainer_state, step=step, scheduler=scheduler.state_dict() if scheduler else None)
        _write_json_atomic(tmp / "trainer_state.json", full_state)
        (tmp / "config.yaml").write_text(config_yaml)
    _pause_for_tests("mid_save")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = run_dir / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, run_dir / "latest")
        prune_checkpoints(run_dir, keep_last, keep_every)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def _pause_for_tests(point: str) -> None:
    """Test hook: FLIP_SCALE_TEST_PAUSE=<point>:<seconds> sleeps at that point of a save."""
    setting = os.environ.get("FLIP_SCALE_TEST_PAUSE", "")
    if setting.startswith(point + ":"):
        import time

        time.sleep(float(setting.split(":", 1)[1]))


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints beyond the last `keep_last`, keeping every `keep_every`-th step."""
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    if keep_last <= 0:
        return
    for path in complete[:-keep_last]:
        step = int(STEP_DIR.match(path.name).group(1))
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model,
    optimizer=None,
    scheduler=None,
    dp_rank: int = 0,
) -> dict:
    """Load a checkpoint into an already-built (and parallelised) model; return the trainer state
    with `data_state` (this data-parallel rank's stream position, or None)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing .metadata, trainer_state.json or config.yaml)")
    state = {"model": model_state(model)}
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        # Partial: a parameter that never had a gradient has no optimizer state in the file.
        state["optim"] = optimizer_state(model, optimizer)
        dcp.load({"optim": state["optim"]}, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    for part in _as_list(model):
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        for part, opt in zip(_as_list(model), _as_list(optimizer)):
            set_optimizer_state_dict(part, opt, optim_state_dict=state["optim"], options=_OPTIM_OPTIONS)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    if scheduler is not None and trainer_state.get("scheduler"):
        scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    data_file = path / f"data_rank{dp_rank}.json"
    trainer_state["data_state"] = json.loads(data_file.read_text()) if data_file.exists() else None
    return trainer_state


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """`--resume auto`: the latest complete checkpoint of the run directory, or none (fresh start).
    `--resume PATH`: that checkpoint (a step directory, or a run directory's latest)."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir():
        found = find_latest(path)
        if found is not None:
            return found
    raise CheckpointError(f"--resume {resume}: no complete checkpoint there (expected a step_XXXXXXXX directory or a run directory)")
