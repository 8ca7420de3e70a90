"""Whether a checkpoint's weights belong to the model being built: shapes and what it computes.

The architecture (`FlipArch.to_dict()`: widths, depths, heads, sizes) decides whether the tensors
fit at all; a checkpoint records it in trainer_state.json `model_arch` and is refused by a model of
another one, naming each differing field and the `model.*` config keys behind it. A few options
change what the model computes without changing any tensor's shape (FUNCTIONAL_KEYS): the weights
would load without an error, so they are compared too: refused on resume (the run must compute
what was trained), only logged for a fine-tune start (`--init-from`, which may intend them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import ModelConfig, flatten_tree
from .store import CheckpointError

log = logging.getLogger("flip_scale.checkpoint")


def _differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    saved, now = flatten_tree(saved), flatten_tree(now)
    return [(key, saved.get(key), now.get(key)) for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


# Model options that change what the model computes without changing any tensor's shape: weights
# load into either setting without an error, so they are compared besides the shapes.
FUNCTIONAL_KEYS = ("vision_pool", "text_causal", "text_pad_mask", "norm_eps", "act", "text_pool")
# Model options that add or remove tensors the recorded architecture does not name (a learned
# position table, ln_pre): a non-strict load would drop them silently, so a difference is refused
# like an architecture difference, for a resume and a fine-tune start alike.
TENSOR_KEYS = ("vision_pos_embed", "vision_ln_pre")


def _option_differences(saved_model: dict, model_config: dict, keys) -> list[tuple[str, Any, Any]]:
    defaults = asdict(ModelConfig())
    return [(key, saved_model.get(key, defaults[key]), model_config.get(key, defaults[key])) for key in keys
            if saved_model.get(key, defaults[key]) != model_config.get(key, defaults[key])]


def functional_differences(saved_model: Optional[dict], model_config: dict) -> list[tuple[str, Any, Any]]:
    """The FUNCTIONAL_KEYS that differ between a checkpoint's `model` config section and
    `model_config` (a key the checkpoint's config lacks has ModelConfig's default)."""
    defaults = asdict(ModelConfig())
    saved_model = saved_model or {}
    diffs = []
    for key in FUNCTIONAL_KEYS:
        old, new = saved_model.get(key, defaults[key]), model_config.get(key, defaults[key])
        if key == "norm_eps":
            try:
                same = float(old) == float(new)
            except (TypeError, ValueError):
                same = old == new
        else:
            same = old == new
        if not same:
            diffs.append((key, old, new))
    return diffs


def compare_architecture(
    where: str,
    saved_arch: Optional[dict],
    model_arch: dict,
    saved_model: Optional[dict] = None,
    model_config: Optional[dict] = None,
    functional: str = "refuse",
    config_file: Optional[Path] = None,
) -> None:
    """Refuse weights (`where`) of another architecture: `saved_arch` (FlipArch.to_dict of the
    weights; None: unknown, shapes not checked) against `model_arch`, and the FUNCTIONAL_KEYS of
    `saved_model` (the weights' `model` config section) against `model_config`, naming the keys.
    `functional`: "refuse" (resume: the run must compute what the checkpoint computed) or "warn"
    (a fine-tune start, which may mean another pooling or mask option: logged, not refused)."""
    if functional not in ("refuse", "warn"):
        raise ValueError(f"functional={functional!r}: expected 'refuse' or 'warn'")
    arch_diffs = _differences(saved_arch, model_arch) if saved_arch is not None else []
    if saved_model is not None and model_config is not None:
        arch_diffs += _option_differences(saved_model or {}, model_config, TENSOR_KEYS)
    func_diffs = (
        functional_differences(saved_model, model_config) if saved_model is not None and model_config is not None else []
    )
    if not arch_diffs and not func_diffs:
        return
    see = f" (see {config_file})" if config_file is not None else ""
    func_text = ", ".join(f"model.{key} ({old!r} in the checkpoint, {new!r} now)" for key, old, new in func_diffs)
    if not arch_diffs:
        if functional == "warn":
            log.warning(
                "%s was trained with other model options: %s. The weights load (the shapes are the same) but the "
                "model computes differently with these options; continuing, as a fine-tune may intend it", where, func_text,
            )
            return
        raise CheckpointError(
            f"{where} was written with other model options ({func_text}): the shapes match, but the model would "
            f"compute something else than the one that was trained. To resume, set those keys to the checkpoint's "
            f"values{see}; to start a fine-tune from its weights with other options, use --init-from"
        )
    text = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in arch_diffs)
    config_text = ""
    if saved_model is not None and model_config is not None:
        config_diffs = _differences(saved_model, model_config)
        if config_diffs:
            config_text = "; config keys that differ: " + ", ".join(
                f"model.{key} ({old!r} in the checkpoint, {new!r} now)" for key, old, new in config_diffs
            )
    raise CheckpointError(
        f"{where} holds a different model architecture ({text}){config_text}. A checkpoint loads only into "
        f"the architecture it was written with: set those model keys to the checkpoint's values{see}"
    )


def check_architecture(path: Path, model_arch: dict, model_config: Optional[dict] = None, functional: str = "refuse") -> None:
    """Refuse a checkpoint whose model architecture (trainer_state.json `model_arch`) differs from
    `model_arch`, naming the differing architecture fields and `model.*` config keys. With
    `model_config` (the run's `model` section) the options that change the computation but no shape
    (FUNCTIONAL_KEYS: pooling, text masks, norm eps) are compared with the checkpoint's config.yaml
    too: refused (`functional="refuse"`, resume) or logged (`"warn"`, a fine-tune start)."""
    path = Path(path)
    saved = json.loads((path / "trainer_state.json").read_text()).get("model_arch")
    if saved is None:
        log.warning("%s records no model architecture; loading it without checking its shapes", path)
    saved_model = None
    if model_config is not None and (path / "config.yaml").is_file():
        saved_model = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model") or {}
    compare_architecture(str(path), saved, model_arch, saved_model, model_config, functional, path / "config.yaml")
