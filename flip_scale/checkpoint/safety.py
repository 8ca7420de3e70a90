"""Loading files without running code from them.

Every `torch.load` here uses `weights_only=True`: a file that needs full unpickling (one that holds
Python objects other than tensors, containers and numbers, or than the few classes a caller admits
for one call: DeepSpeed's, in deepspeed_files.py) is refused with a clear message, never loaded.
The `.metadata` file of a DCP checkpoint is a pickle that torch reads with plain `pickle.load`;
`read_dcp_metadata` reads it with an unpickler that admits only the checkpoint metadata classes.

It sits in the checkpoint package because resuming (the completeness checks, the DCP reader) reads
`.metadata` too; the converter (flip_scale.convert), which imports the checkpoint package and not
the other way round, uses it from here. `ConvertError` keeps its name: it is the error the
converter's users catch (a ValueError), and flip_scale.convert exports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import pickle
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted; the message names it and what is valid."""


class UnsupportedCheckpoint(ConvertError):
    """A checkpoint layout that is recognised but not supported (yet)."""


SAFETENSORS_HINT = (
    "Save the weights as safetensors instead (safetensors.torch.save_file(model.state_dict(), 'model.safetensors')), "
    "or as a plain dict of tensors (torch.save(model.state_dict(), path))"
)


class UnsafeFile(ConvertError):
    """A file `torch.load(weights_only=True)` refused: it asks for a global (a class or function)
    outside the allow-list. `refused`: that global as module.name (None where torch did not say)."""

    def __init__(self, message: str, path: Path, refused: Optional[str]):
        super().__init__(message)
        self.path = path
        self.refused = refused


def refused_global(error: BaseException) -> Optional[str]:
    """The global (module.name) a weights_only load refused, read from torch's message, or None."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def safe_torch_load(path: Union[str, Path], mmap: bool = False, allowed_globals: Sequence = ()) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a file that needs arbitrary unpickling is refused
    (UnsafeFile, naming the global it asked for) before anything in it runs.

    `allowed_globals`: classes admitted besides torch's own weights-only set, for this call only
    (`torch.serialization.safe_globals`, never the process-wide `add_safe_globals`). `mmap`: the
    tensors stay in the file, mapped, and are read when touched (large files, a few tensors wanted)."""
    path = Path(path)
    admitted = torch.serialization.safe_globals(list(allowed_globals)) if allowed_globals else contextlib.nullcontext()
    try:
        with admitted:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = refused_global(error)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        asks = f" (it asks for {refused})" if refused else ""
        raise UnsafeFile(
            f"{path} contains arbitrary Python objects{asks} and will not be loaded: unpickling them can run "
            f"code. Only tensors, containers and numbers are accepted (torch.load weights_only=True said: "
            f"{first_line}). {SAFETENSORS_HINT}.", path, refused,
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise ConvertError(f"{path} could not be read by torch.load: {error}") from None


# ----------------------------------------------------------------------------- DCP metadata

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the data classes of DCP's metadata (dataclasses and enums of its own modules),
    torch sizes, dtypes and layouts, and paths; anything else is refused."""

    source = "?"

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            value = super().find_class(module, name)
            if isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                return value
        raise ConvertError(
            f"{self.source} refers to {module}.{name}, which is not part of a DCP checkpoint's metadata; "
            f"the file will not be loaded (unpickling it could run code)"
        )


def read_dcp_metadata(path: Union[str, Path]):
    """The `Metadata` of a DCP checkpoint directory, read with the restricted unpickler."""
    file = Path(path) / ".metadata"
    if not file.is_file():
        raise ConvertError(f"{path} has no .metadata file: not a complete torch.distributed.checkpoint directory")
    with open(file, "rb") as f:
        unpickler = _MetadataUnpickler(f)
        unpickler.source = str(file)
        try:
            metadata = unpickler.load()
        except ConvertError:
            raise
        except Exception as error:  # a truncated or corrupt file
            raise ConvertError(f"{file} could not be read as DCP metadata: {error}") from None
    if not hasattr(metadata, "state_dict_metadata"):
        raise ConvertError(f"{file} does not hold DCP metadata (got {type(metadata).__name__})")
    return metadata
