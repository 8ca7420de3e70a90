"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable.

A checkpoint is a directory `step_00001234/` holding
  model + optimizer      DCP shards (each rank writes its part; re-sharded on load)
  trainer_state.json     step, samples seen, lr schedule, layout it was written with, world_size
  rng_rank{r}.pt         every rank's RNG states (tensors only: loads with weights_only=True)
  data_rank{r}.json      the data stream position of each data-parallel rank
  config.yaml            the resolved config
It is written as `step_00001234.tmp/` and renamed when every rank has finished; `latest` names the
last complete one and is replaced last, so a crash mid-save never leaves a checkpoint that resume
would pick.

  store.py     the run directory: step directories, `latest`, completeness, pruning, resume choice
  dcp.py       DCP save / load of a state dict (background writes: AsyncWriter), the safe reader, RNG
  compat.py    whether a checkpoint's architecture and model options are the run's
  manager.py   CheckpointManager: a step directory written and read from the trainer's components
  plain.py     save_checkpoint / load_checkpoint of plain modules and optimizers (on the manager)
  safety.py    loading files without running code (restricted unpickler, weights_only loads)

Dependencies point one way: this package imports config, runtime and distributed, never the
entry points, the converter or the data pipeline (the data blobs are passed on unread; their
merge is flip_scale.data.resume).
"""

from .compat import FUNCTIONAL_KEYS, check_architecture, compare_architecture, functional_differences
from .dcp import (
    AsyncWriter, ModelOptimizerState, SafeLoadPlanner, load_state, model_state, optimizer_state, rng_state, save_state,
    set_rng_state,
)
from .manager import CheckpointManager
from .plain import (
    abandon_pending_save, data_state_for_resume, data_states, finalize_pending_save, load_checkpoint, pending_save,
    save_checkpoint,
)
from .safety import read_dcp_metadata
from .store import (
    STEP_DIR, CheckpointError, checkpoint_problem, find_latest, is_complete, list_checkpoints, prune_checkpoints,
    resolve_resume, step_dir_name, storage_problem,
)

__all__ = [
    "FUNCTIONAL_KEYS", "STEP_DIR",
    "AsyncWriter", "CheckpointError", "CheckpointManager", "ModelOptimizerState", "SafeLoadPlanner",
    "check_architecture", "checkpoint_problem", "compare_architecture", "find_latest", "functional_differences",
    "is_complete", "list_checkpoints", "load_checkpoint", "load_state", "model_state", "optimizer_state",
    "prune_checkpoints", "read_dcp_metadata", "resolve_resume", "rng_state", "save_checkpoint", "save_state",
    "set_rng_state", "step_dir_name", "storage_problem",
    # transitional (train.py moves to CheckpointManager):
    "abandon_pending_save", "data_state_for_resume", "data_states", "finalize_pending_save", "pending_save",
]
