"""Checkpoints of plain modules and optimizers in one call: `save_checkpoint` / `load_checkpoint`.

For tests, tools and scripts that hold a module (or model parts), its optimizer and an lr
scheduler rather than a trainer's components. Both build a CheckpointManager for the call (the
model and optimizer as one "sharded" component, the trainer state and scheduler as the "json"
one, the data position as a rank blob), so a step directory is written and read by one code path
whatever the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from ..config import CheckpointConfig
from ..runtime import distributed
from .dcp import ModelOptimizerState
from .manager import CheckpointManager


class _TrainerStateFile:
    """The "json" component of the plain calls: the caller's trainer state, the step and the lr
    scheduler's state, in the key order trainer_state.json has always had."""

    checkpoint_kind = "json"

    def __init__(self, trainer_state: dict, step: Optional[int], scheduler):
        self.trainer_state = trainer_state
        self.step = step
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        scheduler = self.scheduler.state_dict() if self.scheduler else None
        return dict(self.trainer_state, step=self.step, scheduler=scheduler)

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])


class _DataPosition:
    """The "rank_blobs" component of `save_checkpoint`: this data-parallel rank's stream position."""

    checkpoint_kind = "rank_blobs"
    blob_prefix = "data_rank"

    def __init__(self, data_state: Optional[dict], dp_rank: int):
        self.data_state = data_state
        self.blob_name = f"data_rank{dp_rank}"

    def state_dict(self) -> Optional[dict]:
        return self.data_state

    def load_state_dict(self, blobs: list[dict]) -> None:  # read by data_state_for_resume instead
        pass


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
    stages of this rank) and their optimizers, in the same order (`optimizer` None: the model
    alone). `trainer_state`: JSON-able; its `world_size`, which the completeness checks count the
    rng files by, is the process group's size when absent. `data_state`: this rank's data stream position, saved as data_rank{dp_rank}.json.
    Synchronous: background saves are CheckpointManager's (`checkpoint.async_save`), whose writer
    commits them.
    """
    if "world_size" not in trainer_state:
        trainer_state = dict(trainer_state, world_size=dist.get_world_size() if distributed() else 1)
    states = {
        "engine": ModelOptimizerState(model, optimizer),
        "trainer": _TrainerStateFile(trainer_state, step, scheduler),
    }
    if data_state is not None:
        states["data"] = _DataPosition(data_state, dp_rank)
    cfg = CheckpointConfig(keep_last=keep_last, keep_every=keep_every)
    manager = CheckpointManager(run_dir, cfg, states, config_yaml=config_yaml)
    return manager.save(step)


def load_checkpoint(
    path: Path,
    model,
    optimizer=None,
    scheduler=None,
    model_arch: Optional[dict] = None,
    model_config: Optional[dict] = None,
) -> dict:
    """Load a checkpoint into an already-built (and parallelised) model; return the trainer state.
    (The data stream's positions are the trainer's "data" component: flip_scale/train_state.py.)

    With `model_arch` (and `model_config`, the `model` section of the config) a checkpoint of
    another architecture is refused before anything is loaded.
    """
    path = Path(path)
    states = {"engine": ModelOptimizerState(model, optimizer), "trainer": _TrainerStateFile({}, None, scheduler)}
    manager = CheckpointManager(path.parent, CheckpointConfig(), states, config_yaml="",
                                model_arch=model_arch, model_config=model_config)
    return manager.load(path)
