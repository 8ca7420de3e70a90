"""The consolidated format: a model's full weights in one safetensors file, with its config.

    model.safetensors   every model tensor, full (unsharded), names as in `FLIPModel.state_dict()`;
                        `__metadata__` records the step, source and layout it came from
    flip_config.yaml    the resolved config, with every architecture field of `model` written out
                        explicitly (`resolved_config`), so the model rebuilds even if the registry
                        of sizes changes

flip_scale.convert writes it (`consolidate`, `from-openclip`); it is read here because it is a
checkpoint source like a training checkpoint (`--init-from`, flip-eval, the unmask tool load it),
and the converter imports the checkpoint package, not the other way round.

A safetensors file: 8-byte little-endian header length N, N bytes of JSON header
(`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`, padded
with spaces to a multiple of 8), then the raw little-endian tensor bytes, offsets relative to the
end of the header. `read_safetensors_header` reads the header alone (no tensor data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ..config import Config, ConfigError, config_from_dict
from ..models import arch_from_config
from .safety import ConvertError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "flip_config.yaml"

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(path: Union[str, Path]) -> tuple[dict, list[TensorSpec]]:
    """(the `__metadata__` strings, the tensor specs in file order) of a safetensors file; no data is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConvertError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ConvertError(f"{path} is not a safetensors file (header length {length} does not fit the file)")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConvertError(f"{path} is not a safetensors file (header is not JSON: {error})") from None
    metadata = header.pop("__metadata__", None) or {}
    specs = []
    for name, entry in header.items():
        dtype = DTYPES_BY_NAME.get(entry.get("dtype"))
        if dtype is None:
            raise ConvertError(f"{path}: tensor '{name}' has dtype {entry.get('dtype')}, which flip_scale does not use")
        specs.append((entry["data_offsets"][0], TensorSpec(name, tuple(entry["shape"]), dtype)))
    return metadata, [spec for _, spec in sorted(specs, key=lambda item: item[0])]


# ----------------------------------------------------------------------------- configs


def resolved_config(cfg: Config) -> Config:
    """`cfg` with the model's architecture written out field by field (registry values filled in)."""
    arch = arch_from_config(cfg.model)
    model = dataclasses.replace(
        cfg.model,
        image_size=arch.image_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
        vocab_size=arch.vocab_size, context_length=arch.context_length,
        vision_width=arch.vision.width, vision_layers=arch.vision.layers,
        vision_heads=arch.vision.heads, vision_mlp_dim=arch.vision.mlp_dim,
        text_width=arch.text.width, text_layers=arch.text.layers,
        text_heads=arch.text.heads, text_mlp_dim=arch.text.mlp_dim,
    )
    return dataclasses.replace(cfg, model=model)


def config_from_yaml_file(file: Path) -> Config:
    """The `Config` of a YAML file; a file that is not a valid config is a ConvertError naming it."""
    try:
        tree = yaml.safe_load(file.read_text()) or {}
        return config_from_dict(tree)
    except (ConfigError, ValueError, yaml.YAMLError) as error:
        raise ConvertError(f"{file}: not a valid flip_scale config: {error}") from None


# ----------------------------------------------------------------------------- loading


def load_consolidated(path: Union[str, Path], model, strict: bool = True, broadcast_from_rank0: bool = False) -> dict:
    """Load a consolidated checkpoint into a built model; returns the file's `__metadata__`.

    `path`: a consolidated directory or its model.safetensors. `model`: a module, or a list of model
    parts (the pipeline stages this rank holds), plain or sharded (FSDP2 / tensor parallel): the
    full tensors are handed to `set_model_state_dict(..., full_state_dict=True)`, which keeps the
    shard of each rank. Tensors are cast to the dtype of the parameter they load into.
    `strict`: every tensor of the model must be in the file, and (for a single module) every tensor
    of the file in the model. `broadcast_from_rank0`: only rank 0 reads the file and broadcasts
    (saves host memory when many ranks share a node; every rank must call this).
    """
    path = Path(path)
    file = path if path.is_file() else path / MODEL_FILE
    if not file.is_file():
        raise ConvertError(f"{path}: no {MODEL_FILE} (expected a consolidated directory or the file itself)")
    metadata, _ = read_safetensors_header(file)

    @contextlib.contextmanager
    def open_file():
        with safe_open(str(file), framework="pt") as reader:
            yield set(reader.keys()), reader.get_tensor

    load_full_state(model, open_file, str(file), strict=strict, broadcast_from_rank0=broadcast_from_rank0)
    return metadata


def load_full_state(model, open_tensors, where: str, strict: bool = True, broadcast_from_rank0: bool = False) -> None:
    """Full (unsharded) tensors into built model parts, each rank keeping its shard; collective.

    `open_tensors()`: a context manager yielding (the names it holds, `get(name)` -> the full
    tensor), entered only on the ranks that read: rank 0 with `broadcast_from_rank0` (the others
    get their shards from it), every rank without. `where` names the source in errors. `model`,
    `strict`, the dtype cast: as `load_consolidated`, which is this on a safetensors file (the
    DeepSpeed reader hands its assembled fp32 weights here too).
    """
    broadcast = broadcast_from_rank0 and dist.is_available() and dist.is_initialized()
    reads = not broadcast or dist.get_rank() == 0
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    names = [get_model_state_dict(part) for part in parts]  # local shards: names and dtypes, nothing gathered
    with contextlib.ExitStack() as stack:
        # The source is checked against the model before any tensor moves, and with a broadcast every
        # rank learns rank 0's verdict: a rank that raised alone would leave the others in a collective.
        problem, failure, available, get = None, None, set(), None
        if reads:
            try:
                available, get = stack.enter_context(open_tensors())
            except Exception as error:
                if not broadcast:
                    raise
                failure = error  # raised here after the other ranks have been told
                problem = f"rank 0 could not read {where}: {type(error).__name__}: {error}"
            if failure is None:
                wanted_all = {name for wanted in names for name in wanted}
                missing = sorted(wanted_all - available)
                unexpected = sorted(available - wanted_all) if len(parts) == 1 else []
                if strict and missing:
                    problem = f"{where} lacks {len(missing)} tensors of the model: {', '.join(missing[:8])}"
                elif strict and unexpected:
                    problem = f"{where} has {len(unexpected)} tensors the model does not: {', '.join(unexpected[:8])}"
        if broadcast:
            verdict = [problem]
            dist.broadcast_object_list(verdict, src=0)
            problem = verdict[0]
            if failure is not None:
                raise failure
        if problem is not None:
            raise ConvertError(problem)
        # Only the tensors this rank's parts hold are read (a pipeline stage reads its own stage's).
        for part, wanted in zip(parts, names):
            state = ({name: get(name).to(wanted[name].dtype) for name in wanted if name in available} if reads else {})
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=strict)
            set_model_state_dict(part, state, options=options)
            del state
