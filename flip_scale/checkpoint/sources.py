"""What a path names as a source of weights, its config, and loading its weights into a built model.

    kind, directory = checkpoint_kind(path)   # "dcp" | "consolidated" | "deepspeed"
    source = open_checkpoint(path)            # CheckpointSource: kind, directory, config, step
    check_source_architecture(source, cfg.model); load_weights(source, model_parts)

A path is one of
  a training checkpoint    a complete `step_XXXXXXXX/` written with torch.distributed.checkpoint ("dcp"),
                           or by the DeepSpeed engine ("deepspeed": trainer_state.json, config.yaml and
                           DeepSpeed's files in deepspeed/, read by deepspeed_files.py)
  a run directory          stands for its latest complete checkpoint (`latest`, else the newest)
  a consolidated directory `model.safetensors` + `flip_config.yaml` (or the model.safetensors in it),
                           written by `tools/convert_ckpt.py` from a training checkpoint or from
                           OpenCLIP weights (flip_scale/checkpoint/consolidated.py)
A DeepSpeed checkpoint of another trainer (DeepSpeed's files without flip_scale's trainer_state.json
and config.yaml: no config to rebuild the model from) is recognised and refused.
`checkpoint_kind` is the one place that tells them apart: the converter, flip-eval, `--init-from`
and the unmask tool all ask it, so they agree on what a path is.
"""

from __future__ import annotations

import json
import logging
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
    CONFIG_FILE, MODEL_FILE, config_from_yaml_file, load_consolidated, load_full_state, read_safetensors_header,
    resolved_config,
)
from .deepspeed_files import DS_TAG, deepspeed_files_problem
from .deepspeed_reader import DeepSpeedFiles
from .plain import load_checkpoint
from .safety import ConvertError, UnsupportedCheckpoint
from .store import STEP_DIR, CheckpointError, checkpoint_problem, find_latest, resolve_resume

log = logging.getLogger("flip_scale.checkpoint")

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


def is_deepspeed_step(path: Path) -> bool:
    """A step directory the DeepSpeed engine wrote: trainer_state.json says "engine": "deepspeed", or
    it has deepspeed/ beside trainer_state.json."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return False
    if (path / DS_TAG).is_dir():
        return True
    try:
        return json.loads(state_file.read_text()).get("engine") == "deepspeed"
    except (OSError, ValueError, AttributeError):
        return False


def deepspeed_refusal(path: Path) -> str:
    return (
        f"{path} is a DeepSpeed checkpoint of another trainer (found {deepspeed_evidence(path)}, but no flip_scale "
        f"trainer_state.json and config.yaml beside it): not supported, as without flip_scale's config the model "
        f"cannot be rebuilt. Supported inputs: a flip_scale training checkpoint (step_XXXXXXXX/ with "
        f".metadata, or with {DS_TAG}/ from parallel.engine=deepspeed; trainer_state.json and config.yaml in both), "
        f"a run directory with a 'latest' file, or a consolidated directory ({MODEL_FILE} + {CONFIG_FILE})"
    )


def refuse_deepspeed(path: Path) -> None:
    raise UnsupportedCheckpoint(deepspeed_refusal(path))


def _deepspeed_kind(path: Path) -> Optional[tuple[str, Path]]:
    """("deepspeed", the step directory) for a step directory of the DeepSpeed engine, or its
    deepspeed/ folder; a DeepSpeed checkpoint without flip_scale's files is refused; else None."""
    if path.name == DS_TAG and is_deepspeed_step(path.parent):
        path = path.parent
    if is_deepspeed_step(path):
        if not (path / "config.yaml").is_file():
            raise ConvertError(f"{path} is an incomplete training checkpoint: missing config.yaml")
        if path.name.endswith(".tmp"):
            raise ConvertError(f"{path} is a checkpoint still being written (or left by a crash mid-save)")
        try:
            world_size = int(json.loads((path / "trainer_state.json").read_text()).get("world_size", 0) or 0)
        except (OSError, ValueError, AttributeError, TypeError) as error:
            raise ConvertError(f"{path}: trainer_state.json cannot be read ({error})") from None
        problem = deepspeed_files_problem(path, world_size)
        if problem is not None:
            raise ConvertError(f"{path} is an incomplete DeepSpeed training checkpoint: {problem}")
        return "deepspeed", path
    if deepspeed_evidence(path) is not None:
        refuse_deepspeed(path)
    return None


def checkpoint_kind(path: Union[str, Path]) -> tuple[str, Path]:
    """('dcp' | 'consolidated' | 'deepspeed', the directory) for a training checkpoint directory
    (trainer_state.json, config.yaml and .metadata or deepspeed/), a run directory (its latest
    complete checkpoint), or a consolidated directory (or its model.safetensors); anything else,
    a DeepSpeed checkpoint of another trainer too, is a ConvertError saying what would be valid."""
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
    found = _deepspeed_kind(path)
    if found is not None:
        return found
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
    if latest_file.is_file():  # a run directory of another trainer whose latest holds DeepSpeed's files
        named = path / latest_file.read_text(errors="replace").strip()
        if named.is_dir() and not is_deepspeed_step(named) and deepspeed_evidence(named) is not None:
            refuse_deepspeed(named)
    latest = find_latest(path)
    if latest is not None:
        return checkpoint_kind(latest)
    steps = [p.name for p in path.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    hint = f" (it has {', '.join(sorted(steps))}, none complete)" if steps else ""
    raise ConvertError(
        f"{path} is not a checkpoint{hint}: expected a step_XXXXXXXX/ training checkpoint (trainer_state.json, "
        f"config.yaml and .metadata or {DS_TAG}/), a run directory with complete checkpoints, or a consolidated "
        f"directory ({MODEL_FILE} + {CONFIG_FILE})"
    )


def read_consolidated_config(path: Union[str, Path]) -> Config:
    """The `Config` of a consolidated directory (its flip_config.yaml)."""
    kind, directory = checkpoint_kind(path)
    if kind != "consolidated":
        raise ConvertError(f"{path} is a training checkpoint, not a consolidated directory; run `consolidate` first")
    return config_from_yaml_file(directory / CONFIG_FILE)


# ----------------------------------------------------------------------------- sources of weights


_KIND_NAMES = {"dcp": "training checkpoint", "deepspeed": "DeepSpeed training checkpoint", "consolidated": "consolidated"}


@dataclass(frozen=True)
class CheckpointSource:
    kind: str  # "dcp" | "deepspeed" | "consolidated"
    path: Path  # the step directory or the consolidated directory
    config_tree: dict  # its config, as a YAML tree
    step: Optional[int]
    samples_seen: Optional[int]  # samples its weights were trained on (None: unknown)
    # What a consolidated file records of its origin (from-openclip: "open_clip" and the mask
    # ratio the weights were trained with, 0 for OpenCLIP's family); None: not recorded.
    provenance: Optional[str] = None
    pretraining_mask_ratio: Optional[float] = None

    def describe(self) -> str:
        seen = f", {self.samples_seen:,} samples seen" if self.samples_seen else ""
        step = f"step {self.step}" if self.step is not None else "step unknown"
        return f"{self.path} ({_KIND_NAMES.get(self.kind, self.kind)}, {step}{seen})"


def open_checkpoint(path: Union[str, Path]) -> CheckpointSource:
    """A complete step directory (DCP or DeepSpeed), a run directory (its latest complete checkpoint)
    or a consolidated directory; anything else (a DeepSpeed checkpoint of another trainer too) is a
    CheckpointError."""
    try:
        kind, directory = checkpoint_kind(path)
    except ConvertError as error:
        raise CheckpointError(str(error)) from None
    if kind == "consolidated":
        tree = config_from_yaml_file(directory / CONFIG_FILE).to_dict()
        metadata, _ = read_safetensors_header(directory / MODEL_FILE)
        step = metadata.get("step")
        step = int(step) if step not in (None, "", "None") and str(step).isdigit() else None
        seen = step * int(tree["train"]["global_batch_size"]) if step else None
        recorded = metadata.get("pretraining_mask_ratio")
        try:
            recorded = float(recorded) if recorded is not None else None
        except ValueError:
            recorded = None
        return CheckpointSource("consolidated", directory, tree, step, seen, metadata.get("provenance"), recorded)
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointError(f"{directory} is not a complete checkpoint: {problem}")
    tree = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    state = json.loads((directory / "trainer_state.json").read_text())
    return CheckpointSource(kind, directory, tree, state.get("step"), state.get("samples_seen"))


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
    if source.kind in ("dcp", "deepspeed"):  # trainer_state.json records model_arch
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


# Tensors a fine-tune start may find missing in its source, which then keep their initial values
# (logged): the training-only additions a run without them has none of (MAE's decoder, SigLIP's
# logit bias, starting from a contrastive checkpoint), and the attentive masking's EMA tower, which
# the engine sets equal to the loaded image tower (models/ema.py) whether the source has one or not.
OPTIONAL_PREFIXES = ("decoder.", "logit_bias")
EMA_PREFIX = "ema_visual."


def _left_at_init(names, in_source) -> tuple[list, list]:
    """(names to leave unloaded, of them the optional ones the source lacks: to log)."""
    ema = [name for name in names if name.startswith(EMA_PREFIX)]
    absent = [name for name in names if name.startswith(OPTIONAL_PREFIXES) and name not in in_source]
    return ema + absent, absent


def _log_left(where: str, absent: list) -> None:
    if absent:
        log.warning("%s has no %s (%d tensors): they keep their initial values", where,
                    ", ".join(sorted({name.split(".")[0] for name in absent})), len(absent))


def _load_dcp_weights(path: Path, parts: list) -> None:
    """The model weights of a DCP checkpoint (collective); the EMA tower and what the source lacks
    of OPTIONAL_PREFIXES left out."""
    from .dcp import ModelOptimizerState, load_state, model_state, stored_names

    names = model_state(parts)
    stored = {name[len("model."):] for name in stored_names(path) if name.startswith("model.")}
    skip, absent = _left_at_init(names, stored)
    if not skip:
        load_checkpoint(path, parts)
        return
    _log_left(str(path), absent)
    state = {"model": {name: value for name, value in names.items() if name not in set(skip)}}
    load_state(state, path)
    ModelOptimizerState(parts).load_state_dict(state)


def load_weights(source: CheckpointSource, model_parts, broadcast_from_rank0: bool = False,
                 whole_model: bool = True) -> None:
    """The checkpoint's model weights into built (and parallelised) model parts; collective.

    Consolidated or DeepSpeed (its fp32 master weights and buffers, assembled from the ZeRO
    partitions): `whole_model=False` for pipeline stages (the source also holds the other stages'
    tensors: each part must find all of its own in it, the rest is not loaded here).
    `broadcast_from_rank0` (whole models only, so every rank wants the same tensor names): only
    rank 0 reads the files and `set_model_state_dict(..., full_state_dict=True,
    broadcast_from_rank0=True)` hands every rank its shard."""
    parts = list(model_parts) if isinstance(model_parts, (list, tuple)) else [model_parts]
    if source.kind == "dcp":
        _load_dcp_weights(source.path, parts)
        return
    if source.kind == "deepspeed":
        where = f"the DeepSpeed checkpoint {source.path}"
        if whole_model:  # only the reading ranks (rank 0 with a broadcast) open the files
            load_full_state(parts if len(parts) > 1 else parts[0], lambda: DeepSpeedFiles(source.path).opened_weights(),
                            where, broadcast_from_rank0=broadcast_from_rank0)
            return
        files = DeepSpeedFiles(source.path)
        in_source = set(files.weight_entries())
    else:
        _, specs = read_safetensors_header(source.path / MODEL_FILE)
        in_source = {spec.name for spec in specs}
        where = str(source.path / MODEL_FILE)
    names = [name for part in parts for name in get_model_state_dict(part)]
    skip, absent = _left_at_init(names, in_source)
    _log_left(where, absent)
    missing = [name for name in names if name not in in_source and name not in set(skip)]
    what = "this rank's pipeline stages" if not whole_model else "the model"
    if any_rank(bool(missing)) and not missing:
        raise CheckpointError(f"{where} lacks tensors of another rank's pipeline stages (that rank names them)")
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensors of {what}: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if source.kind == "deepspeed":  # every rank reads, only its stages' tensors
        own = {name for part in parts for name in get_model_state_dict(part)}
        load_full_state(parts, lambda: files.opened_weights(own), where, strict=False)
    else:
        load_consolidated(source.path, parts, strict=False)
