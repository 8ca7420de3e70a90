"""Writing safetensors files one tensor at a time, and reading their header without the data.

The format: 8-byte little-endian header length N, N bytes of JSON header
(`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`, padded
with spaces to a multiple of 8), then the raw little-endian tensor bytes, offsets relative to the
end of the header. The shapes and dtypes are known before any tensor is read, so the header is
written first and each tensor is appended as soon as it is produced: memory stays near the
largest tensor instead of the whole model.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..checkpoint.safety import ConvertError

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


def write_safetensors(
    path: Union[str, Path],
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: Optional[dict] = None,
) -> int:
    """Write `specs` in order, calling `produce(spec)` for each tensor just before it is written.

    The file is written under a temporary name and renamed when complete. Returns its size in bytes.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise ConvertError("writing safetensors needs a little-endian machine")
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ConvertError(f"tensor name '{spec.name}' appears twice")
        if spec.dtype not in DTYPE_NAMES:
            raise ConvertError(f"{spec.name}: dtype {spec.dtype} cannot be stored; valid: {', '.join(map(str, DTYPE_NAMES))}")
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for spec in specs:
                tensor = produce(spec)
                if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
                    raise ConvertError(
                        f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, the header says "
                        f"{tuple(spec.shape)} {spec.dtype}"
                    )
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del tensor, data
            written = f.tell()
        expected = 8 + len(blob) + offset
        if written != expected:
            raise ConvertError(f"{path}: wrote {written} bytes, expected {expected}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return expected


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
