"""What a path names as a source of weights, its config, and loading its weights into a built model.

    kind, directory = checkpoint_kind(path)   # "dcp" | "consolidated" | "deepspeed"
    source = open_checkpoint(path)            # CheckpointSource: kind, directory, config, step
    check_source_architecture(source, cfg.model); load_weights(source, model_parts)

A path is one of
  a training checkpoint    a complete `step_XXXXXXXX/` (written with torch.distributed.checkpoint)
  a run directory          stands for its latest complete checkpoint (`latest`, else the newest)
  a consolidated directory `model.safetensors` + `flip_config.yaml` (or the model.safetensors in it),
                           written by `tools/convert_ckpt.py` from a training checkpoint or from
                           OpenCLIP weights (flip_scale/checkpoint/consolidated.py)
  a DeepSpeed checkpoint   recognised by its files, and refused (not readable yet)
`checkpoint_kind` is the one place that tells them apart: the converter, flip-eval, `--init-from`
and the unmask tool all ask it, so they agree on what a path is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import yaml
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from ..config import Config, config_from_dict
from ..models import arch_from_config
from ..runtime import any_rank
from .compat import check_architecture, compare_architecture
from .consolidated import (
    CONFIG_FILE, MODEL_FILE, config_from_yaml_file, load_consolidated, read_safetensors_header, resolved_config,
)
from .plain import load_checkpoint
from .safety import ConvertError, UnsupportedCheckpoint
from .store import STEP_DIR, CheckpointError, checkpoint_problem, find_latest, resolve_resume

# ----------------------------------------------------------------------------- what a path is


def deepspeed_evidence(path: Path) -> Optional[str]:
    """A file or folder that marks a DeepSpeed checkpoint under `path`, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for pattern in ("*model_states.pt", "*optim_states.pt", "zero_to_fp32.py", "global_step*"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0].name
    latest = path / "latest"
    if latest.is_file():
        text = latest.read_text(errors="replace").strip()
        if text.startswith("global_step"):
            return f"latest -> {text}"
    return None


def deepspeed_refusal(path: Path, doing: str = "converting") -> str:
    return (
        f"{path} is a DeepSpeed checkpoint (found {deepspeed_evidence(path)}); {doing} DeepSpeed checkpoints is "
        f"not supported yet. Supported inputs: a flip_scale DCP checkpoint (step_XXXXXXXX/ with .metadata), "
        f"a run directory with a 'latest' file, or a consolidated directory ({MODEL_FILE} + {CONFIG_FILE})"
    )


def refuse_deepspeed(path: Path) -> None:
    raise UnsupportedCheckpoint(deepspeed_refusal(path))


def checkpoint_kind(path: Union[str, Path]) -> tuple[str, Path]:
    """('dcp' | 'consolidated' | 'deepspeed', the directory) for a training checkpoint directory
    (.metadata, trainer_state.json, config.yaml), a run directory (its latest complete checkpoint),
    a consolidated directory (or its model.safetensors), or a DeepSpeed checkpoint; anything else
    is a ConvertError saying what would be valid."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.is_dir():
        raise ConvertError(
            f"{path} is a file; expected a checkpoint directory (step_XXXXXXXX/, a run directory, "
            f"or a consolidated directory with {MODEL_FILE} + {CONFIG_FILE})"
        )
    if deepspeed_evidence(path) is not None:
        return "deepspeed", path
    if (path / ".metadata").is_file():
        # Enough to read its model (the converter's need); loading it to train or evaluate asks for
        # more (open_checkpoint: every rank's files at their full size, as resume does).
        missing = [name for name in ("trainer_state.json", "config.yaml") if not (path / name).is_file()]
        if missing:
            raise ConvertError(f"{path} is an incomplete training checkpoint: missing {', '.join(missing)}")
        if path.name.endswith(".tmp"):
            raise ConvertError(f"{path} is a checkpoint still being written (or left by a crash mid-save)")
        return "dcp", path
    if (path / MODEL_FILE).is_file():
        if not (path / CONFIG_FILE).is_file():
            raise ConvertError(f"{path} has {MODEL_FILE} but no {CONFIG_FILE}; a consolidated directory needs both")
        return "consolidated", path
    latest_file = path / "latest"
    if latest_file.is_file():  # a run directory whose latest step holds DeepSpeed's files
        named = path / latest_file.read_text(errors="replace").strip()
        if named.is_dir() and deepspeed_evidence(named) is not None:
            return "deepspeed", named
    latest = find_latest(path)
    if latest is not None:
        return checkpoint_kind(latest)
    steps = [p.name for p in path.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    hint = f" (it has {', '.join(sorted(steps))}, none complete)" if steps else ""
    raise ConvertError(
        f"{path} is not a checkpoint{hint}: expected a step_XXXXXXXX/ DCP directory (.metadata, trainer_state.json, "
        f"config.yaml), a run directory with complete checkpoints, or a consolidated directory ({MODEL_FILE} + {CONFIG_FILE})"
    )


def read_consolidated_config(path: Union[str, Path]) -> Config:
    """The `Config` of a consolidated directory (its flip_config.yaml)."""
    kind, directory = checkpoint_kind(path)
    if kind == "deepspeed":
        refuse_deepspeed(directory)
    if kind != "consolidated":
        raise ConvertError(f"{path} is a training checkpoint, not a consolidated directory; run `consolidate` first")
    return config_from_yaml_file(directory / CONFIG_FILE)


# ----------------------------------------------------------------------------- sources of weights


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


def open_checkpoint(path: Union[str, Path]) -> CheckpointSource:
    """A complete step directory, a run directory (its latest complete checkpoint) or a consolidated
    directory; anything else (a DeepSpeed checkpoint too, for now) is a CheckpointError."""
    try:
        kind, directory = checkpoint_kind(path)
    except ConvertError as error:
        raise CheckpointError(str(error)) from None
    if kind == "deepspeed":
        raise CheckpointError(deepspeed_refusal(directory, "loading weights from"))
    if kind == "consolidated":
        tree = config_from_yaml_file(directory / CONFIG_FILE).to_dict()
        metadata, _ = read_safetensors_header(directory / MODEL_FILE)
        step = metadata.get("step")
        step = int(step) if step not in (None, "", "None") and str(step).isdigit() else None
        seen = step * int(tree["train"]["global_batch_size"]) if step else None
        return CheckpointSource("consolidated", directory, tree, step, seen)
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointError(f"{directory} is not a complete checkpoint: {problem}")
    tree = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    state = json.loads((directory / "trainer_state.json").read_text())
    return CheckpointSource("dcp", directory, tree, state.get("step"), state.get("samples_seen"))


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
    model_arch = arch_from_config(model_cfg).to_dict()
    if source.kind == "dcp":
        check_architecture(source.path, model_arch, asdict(model_cfg), functional)
        return
    # A consolidated config has the architecture written out field by field: compare it with this
    # run's written out the same way, so that only real differences are named.
    saved_model = config_from_dict(source.config_tree).model
    now_model = resolved_config(Config(model=model_cfg)).model
    compare_architecture(
        str(source.path), arch_from_config(saved_model).to_dict(), model_arch, asdict(saved_model), asdict(now_model),
        functional, source.path / CONFIG_FILE,
    )


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
    if whole_model:
        load_consolidated(source.path, parts if len(parts) > 1 else parts[0], broadcast_from_rank0=broadcast_from_rank0)
        return
    _, specs = read_safetensors_header(source.path / MODEL_FILE)
    in_file = {spec.name for spec in specs}
    missing = [name for part in parts for name in get_model_state_dict(part) if name not in in_file]
    if any_rank(bool(missing)) and not missing:
        raise CheckpointError(f"{source.path / MODEL_FILE} lacks tensors of another rank's pipeline stages "
                              f"(that rank names them)")
    if missing:
        raise CheckpointError(f"{source.path / MODEL_FILE} lacks {len(missing)} tensors of this rank's pipeline "
                              f"stages: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    load_consolidated(source.path, parts, strict=False)
