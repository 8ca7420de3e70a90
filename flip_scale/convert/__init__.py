"""Checkpoint conversion: training checkpoints (DCP) -> one consolidated safetensors file + config;
consolidated <-> OpenCLIP; inspection. The command line is `tools/convert_ckpt.py` (`main`).

Nothing here unpickles arbitrary objects: `torch.load` always runs with `weights_only=True`, DCP
metadata is read with a restricted unpickler, and exports are safetensors.
"""

from .checkpoints import (
    CONFIG_FILE, MODEL_FILE, checkpoint_kind, consolidate, format_inspect, inspect_checkpoint,
    load_consolidated, read_consolidated_config,
)
from .cli import main
from .openclip import OPENCLIP_MODEL_FILE, from_openclip, key_pairs, to_openclip
from .openclip_config import (
    OPENCLIP_CONFIG_FILE, check_exportable, model_config_from_openclip, openclip_model_config,
)
from .safetensors_io import TensorSpec, read_safetensors_header, write_safetensors
from ..checkpoint.safety import ConvertError, UnsupportedCheckpoint, read_dcp_metadata, safe_torch_load

__all__ = [
    "CONFIG_FILE", "MODEL_FILE", "OPENCLIP_CONFIG_FILE", "OPENCLIP_MODEL_FILE",
    "ConvertError", "TensorSpec", "UnsupportedCheckpoint",
    "check_exportable", "checkpoint_kind", "consolidate", "format_inspect", "from_openclip",
    "inspect_checkpoint", "key_pairs", "load_consolidated", "main", "model_config_from_openclip",
    "openclip_model_config", "read_consolidated_config", "read_dcp_metadata", "read_safetensors_header",
    "safe_torch_load", "to_openclip", "write_safetensors",
]
