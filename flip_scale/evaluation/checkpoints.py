"""Moved to flip_scale.checkpoint.sources; these names are re-exported until their importers
(evaluation/cli.py, evaluation/checkpoint_eval.py, unmask.py, train.py) import them from
flip_scale.checkpoint. Add nothing here."""

from ..checkpoint.sources import (  # noqa: F401
    CheckpointSource, check_source_architecture, load_weights, open_checkpoint, resolve_init_from,
)
from ..checkpoint.consolidated import CONFIG_FILE, MODEL_FILE  # noqa: F401

__all__ = ["CONFIG_FILE", "MODEL_FILE", "CheckpointSource", "check_source_architecture", "load_weights",
           "open_checkpoint", "resolve_init_from"]
