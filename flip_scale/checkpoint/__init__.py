"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable.

A checkpoint is a directory `step_00001234/` holding
  model + optimizer      DCP shards (each rank writes its part; re-sharded on load), or, written by
                         the DeepSpeed engine, DeepSpeed's own files in deepspeed/
  trainer_state.json     step, samples seen, lr schedule, layout it was written with, world_size
  rng_rank{r}.pt         every rank's RNG states (tensors only: loads with weights_only=True)
  data_rank{r}.json      the data stream position of each data-parallel rank
  config.yaml            the resolved config
It is written as `step_00001234.tmp/` and renamed when every rank has finished; `latest` names the
last complete one and is replaced last, so a crash mid-save never leaves a checkpoint that resume
would pick.

  store.py         the run directory: step directories, `latest`, completeness, pruning, resume choice
  dcp.py           DCP save / load of a state dict (background writes: AsyncWriter), safe reader, RNG
  compat.py        whether a checkpoint's architecture and model options are the run's
  manager.py       CheckpointManager: a step directory written and read from the trainer's components
  plain.py         save_checkpoint / load_checkpoint of plain modules and optimizers (on the manager)
  sources.py       what a path names (training, run, consolidated or DeepSpeed directory); loading
                   its weights (--init-from, flip-eval, the unmask tool)
  consolidated.py  the consolidated format (model.safetensors + flip_config.yaml): header, config, loading
  deepspeed_files.py  the DeepSpeed engine's files: completeness, safe loading, the full fp32 weights
                   and Adam moments assembled from the ZeRO-1/2/3 partitions one parameter at a time
  safety.py        loading files without running code (restricted unpickler, weights_only loads)
  space.py         the free-space check at start (expected checkpoint size x checkpoints kept)
  faultpoints.py   named points of a save where the fault-injection tests pause or fail a rank
  errors.py        CheckpointError, CheckpointSaveError (a failed save that stops the run),
                   IncompatibleCheckpoint (one this run can never load: exit 2)

Dependencies point one way. This package imports config, runtime, distributed and models (the
architecture of a consolidated config), never the entry points, the data pipeline (the data blobs
are passed on unread; their merge is flip_scale.data.resume) or the converter: flip_scale.convert
imports this package. What loading a consolidated directory needs (the safetensors header, its
config, `load_consolidated`) and the safe loaders therefore live here, and the converter, which
writes that format, takes them from here; before, the two packages imported each other lazily.
"""

from .compat import FUNCTIONAL_KEYS, check_architecture, compare_architecture, functional_differences
from .dcp import (
    AsyncWriter, ModelOptimizerState, SafeLoadPlanner, load_state, model_state, optimizer_state, rng_state, save_state,
    set_rng_state,
)
from .errors import CheckpointSaveError, IncompatibleCheckpoint
from .manager import CheckpointManager, check_compatible
from .plain import load_checkpoint, save_checkpoint
from .consolidated import CONFIG_FILE, MODEL_FILE, load_consolidated
from .deepspeed_files import DS_TAG, deepspeed_files_problem
from .deepspeed_reader import DeepSpeedFiles
from .safety import read_dcp_metadata
from .sources import (
    CheckpointSource, check_source_architecture, checkpoint_kind, load_weights, open_checkpoint, resolve_init_from,
)
from .store import (
    STEP_DIR, CheckpointError, checkpoint_problem, find_latest, is_complete, list_checkpoints, prune_checkpoints,
    read_rank_blobs, remove_unfinished_saves, resolve_resume, step_dir_name, storage_problem,
)

__all__ = [
    "CONFIG_FILE", "DS_TAG", "FUNCTIONAL_KEYS", "MODEL_FILE", "STEP_DIR",
    "AsyncWriter", "CheckpointError", "CheckpointSaveError", "CheckpointManager", "CheckpointSource", "DeepSpeedFiles",
    "IncompatibleCheckpoint", "ModelOptimizerState", "SafeLoadPlanner",
    "check_architecture", "check_compatible", "check_source_architecture", "checkpoint_kind", "checkpoint_problem", "compare_architecture",
    "deepspeed_files_problem",
    "find_latest", "functional_differences", "is_complete", "list_checkpoints", "load_checkpoint",
    "load_consolidated", "load_state", "load_weights", "model_state", "open_checkpoint", "optimizer_state",
    "prune_checkpoints", "read_dcp_metadata", "read_rank_blobs",
    "remove_unfinished_saves", "resolve_init_from", "resolve_resume", "rng_state", "save_checkpoint",
    "save_state", "set_rng_state", "step_dir_name", "storage_problem",
]
