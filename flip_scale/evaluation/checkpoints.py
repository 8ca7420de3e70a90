"""Which checkpoint a path names, its config, and loading its weights into a built model.

Two kinds: a training checkpoint (`step_XXXXXXXX/`, written with torch.distributed.checkpoint; a
run directory stands for its latest complete one) and a consolidated directory
(`model.safetensors` + `flip_config.yaml`, written by `tools/convert_ckpt.py`, also from OpenCLIP
weights), which `flip_scale.convert.load_consolidated` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import yaml

from ..checkpoint import (
    CheckpointError, check_architecture, compare_architecture, find_latest, is_complete, load_checkpoint, resolve_resume,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "flip_config.yaml"


@dataclass(frozen=True)
class CheckpointSource:
    kind: str  # "dcp" | "consolidated"
    path: Path  # the step directory or the consolidated directory
    config_tree: dict  # its config, as a YAML tree
    step: Optional[int]
    samples_seen: Optional[int]  # samples its weights were trained on (None: unknown)

    def describe(self) -> str:
        seen = f", {self.samples_seen:,} samples seen" if self.samples_seen else ""
        step = f"step {self.step}" if self.step is not None else "step unknown"
        return f"{self.path} ({'training checkpoint' if self.kind == 'dcp' else 'consolidated'}, {step}{seen})"


def _convert():
    """`flip_scale.convert`, or a clear error where it is not installed."""
    try:
        from .. import convert
    except ImportError as error:
        raise CheckpointError(
            f"loading a consolidated checkpoint ({MODEL_FILE} + {CONFIG_FILE}) needs flip_scale.convert, which cannot "
            f"be imported here ({error}); use a training checkpoint (a step_XXXXXXXX directory or a run directory)"
        ) from None
    if not hasattr(convert, "load_consolidated"):
        raise CheckpointError("flip_scale.convert has no load_consolidated: consolidated checkpoints cannot be loaded; "
                              "use a training checkpoint (a step_XXXXXXXX directory or a run directory)")
    return convert


def open_checkpoint(path: Union[str, Path]) -> CheckpointSource:
    """A step directory, a run directory (its latest complete checkpoint) or a consolidated directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if path.is_dir() and (path / MODEL_FILE).is_file():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} has {MODEL_FILE} but no {CONFIG_FILE}; a consolidated directory needs both")
        convert = _convert()
        tree = convert.read_consolidated_config(path).to_dict()
        metadata, _ = convert.read_safetensors_header(path / MODEL_FILE)
        step = metadata.get("step")
        step = int(step) if step not in (None, "", "None") and str(step).isdigit() else None
        seen = step * int(tree["train"]["global_batch_size"]) if step else None
        return CheckpointSource("consolidated", path, tree, step, seen)
    step_dir = path if is_complete(path) else (find_latest(path) if path.is_dir() else None)
    if step_dir is None:
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a complete step_XXXXXXXX directory, a run directory holding one, "
            f"or a consolidated directory ({MODEL_FILE} + {CONFIG_FILE})"
        )
    tree = yaml.safe_load((step_dir / "config.yaml").read_text()) or {}
    state = json.loads((step_dir / "trainer_state.json").read_text())
    return CheckpointSource("dcp", step_dir, tree, state.get("step"), state.get("samples_seen"))


def resolve_init_from(value: Union[str, Path]) -> CheckpointSource:
    """`flip-train --init-from PATH`: a complete step directory, a run directory (its latest complete
    checkpoint) or a consolidated directory (or its model.safetensors); errors name --init-from."""
    path = Path(value)
    directory = path.parent if path.is_file() and path.name == MODEL_FILE else path
    if directory.is_dir() and (directory / MODEL_FILE).is_file():
        try:
            return open_checkpoint(directory)
        except (CheckpointError, ValueError) as error:  # ConvertError is a ValueError
            raise CheckpointError(f"--init-from {value}: {error}") from None
    return open_checkpoint(resolve_resume(str(value), path, option="--init-from"))


def check_source_architecture(source: CheckpointSource, model_cfg, functional: str = "refuse") -> None:
    """Refuse weights of another architecture than `model_cfg` (a ModelConfig) builds, naming the
    differing keys; the options that change the computation but no shape (pooling, text masks, norm
    eps) are refused too, or only logged with `functional="warn"` (a fine-tune start)."""
    from dataclasses import asdict

    from ..config import Config, config_from_dict
    from ..models import arch_from_config

    model_arch = arch_from_config(model_cfg).to_dict()
    if source.kind == "dcp":
        check_architecture(source.path, model_arch, asdict(model_cfg), functional)
        return
    # A consolidated config has the architecture written out field by field: compare it with this
    # run's written out the same way, so that only real differences are named.
    saved_model = config_from_dict(source.config_tree).model
    now_model = _convert().checkpoints.resolved_config(Config(model=model_cfg)).model
    compare_architecture(
        str(source.path), arch_from_config(saved_model).to_dict(), model_arch, asdict(saved_model), asdict(now_model),
        functional, source.path / CONFIG_FILE,
    )


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (collective when distributed): ranks that would otherwise
    carry on into the next collective alone stop together instead."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def load_weights(source: CheckpointSource, model_parts, broadcast_from_rank0: bool = False,
                 whole_model: bool = True) -> None:
    """The checkpoint's model weights into built (and parallelised) model parts; collective.

    Consolidated: `whole_model=False` for pipeline stages (the file also holds the other stages'
    tensors: each part must find all of its own in it, the rest is not loaded here).
    `broadcast_from_rank0` (whole models only, so every rank wants the same tensor names): only
    rank 0 reads the file and `set_model_state_dict(..., full_state_dict=True,
    broadcast_from_rank0=True)` hands every rank its shard."""
    parts = list(model_parts) if isinstance(model_parts, (list, tuple)) else [model_parts]
    if source.kind != "consolidated":
        load_checkpoint(source.path, parts)
        return
    convert = _convert()
    if whole_model:
        convert.load_consolidated(source.path, parts if len(parts) > 1 else parts[0],
                                  broadcast_from_rank0=broadcast_from_rank0)
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _, specs = convert.read_safetensors_header(source.path / MODEL_FILE)
    in_file = {spec.name for spec in specs}
    missing = [name for part in parts for name in get_model_state_dict(part) if name not in in_file]
    if _any_rank(bool(missing)) and not missing:
        raise CheckpointError(f"{source.path / MODEL_FILE} lacks tensors of another rank's pipeline stages "
                              f"(that rank names them)")
    if missing:
        raise CheckpointError(f"{source.path / MODEL_FILE} lacks {len(missing)} tensors of this rank's pipeline "
                              f"stages: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    convert.load_consolidated(source.path, parts, strict=False)
