"""Writing safetensors files one tensor at a time.

The format (and reading a header without the data: `read_safetensors_header`) is described in
flip_scale/checkpoint/consolidated.py. The shapes and dtypes are known before any tensor is read,
so the header is written first and each tensor is appended as soon as it is produced: memory stays
near the largest tensor instead of the whole model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..checkpoint.consolidated import DTYPE_NAMES, TensorSpec
from ..checkpoint.safety import ConvertError


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
