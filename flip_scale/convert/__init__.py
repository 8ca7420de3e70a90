"""Checkpoint conversion: training checkpoints (DCP or DeepSpeed) -> one consolidated safetensors file + config;
consolidated <-> OpenCLIP; the image tower -> timm; inspection. The command line is `tools/convert_ckpt.py` (`main`).

The consolidated format's reading and loading (`load_consolidated`, `read_consolidated_config`,
`read_safetensors_header`), what a path names (`checkpoint_kind`) and the safe loaders live in the
checkpoint package, which this package imports (never the other way round); they are exported here
too, as the converter's API.

Nothing here unpickles arbitrary objects: `torch.load` always runs with `weights_only=True`, DCP
metadata is read with a restricted unpickler, and exports are safetensors.
"""

from ..checkpoint.consolidated import CONFIG_FILE, MODEL_FILE, TensorSpec, load_consolidated, read_safetensors_header
from ..checkpoint.safety import ConvertError, UnsupportedCheckpoint, read_dcp_metadata, safe_torch_load
from ..checkpoint.sources import checkpoint_kind, read_consolidated_config
from .checkpoints import consolidate, format_inspect, inspect_checkpoint
from .cli import main
from .openclip import OPENCLIP_MODEL_FILE, from_openclip, key_pairs, to_openclip
from .openclip_config import (
    OPENCLIP_CONFIG_FILE, check_exportable, model_config_from_openclip, openclip_model_config,
)
from .safetensors_io import write_safetensors
from .timm import timm_model_args, to_timm

__all__ = [
    "CONFIG_FILE", "MODEL_FILE", "OPENCLIP_CONFIG_FILE", "OPENCLIP_MODEL_FILE",
    "ConvertError", "TensorSpec", "UnsupportedCheckpoint",
    "check_exportable", "checkpoint_kind", "consolidate", "format_inspect", "from_openclip",
    "inspect_checkpoint", "key_pairs", "load_consolidated", "main", "model_config_from_openclip",
    "openclip_model_config", "read_consolidated_config", "read_dcp_metadata", "read_safetensors_header",
    "safe_torch_load", "timm_model_args", "to_openclip", "to_timm", "write_safetensors",
]
