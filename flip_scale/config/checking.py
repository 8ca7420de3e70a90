"""Typed config checking: a YAML tree against the config dataclasses' field types.

Every value is coerced to its field's type or refused with ConfigError naming the key, the value
and what is valid (for a `Literal[...]` field, its choices; for an unknown key, the closest known
one). This module imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what would be valid."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _is_choice(value: Any, options: tuple) -> bool:
    return any(value == o and type(value) is type(o) for o in options)  # True is not 1


def _choice_message(key: str, value: Any, options: tuple) -> str:
    shown = f"'{value}'" if isinstance(value, str) else repr(value)
    return f"{key}: {shown} is not valid; choose one of {', '.join(str(o) for o in options)}"


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming the key and the expected type (for a
    `Literal[...]`, the value and the valid choices)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(o, str) for o in options):
            value = "true" if value else "false"  # YAML reads true/false unquoted as bools (optim.fused: true)
        if _is_choice(value, options):
            return value
        raise ConfigError(_choice_message(key, value, options))
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "4e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads true/false unquoted as bools: the words were meant
            return "true" if value else "false"
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:  # pragma: no cover - only the types above are used
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return match[0] if match else ""


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            guess = _closest(str(key), names)
            raise ConfigError(
                f"unknown config key '{full}'; did you mean '{prefix}{guess}'? "
                f"Valid keys under '{prefix.rstrip('.') or 'config'}': {', '.join(names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full + ".")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def check_model_options(model) -> None:
    """The model keys whose valid values depend on each other (a `ModelConfig`)."""
    ratio = model.vision_mlp_ratio
    if ratio is not None:
        if not ratio > 0:
            raise ConfigError(f"model.vision_mlp_ratio: must be > 0 (MLP width int(vision width * ratio)), got {ratio}")
        if model.vision_mlp_dim is not None:
            raise ConfigError(
                f"model.vision_mlp_ratio={ratio} and model.vision_mlp_dim={model.vision_mlp_dim} both set the image MLP "
                f"width; give one of them (the other null)"
            )


def check_reconstruction(cfg) -> None:
    """The MAE reconstruction loss (loss.mae_weight) and its decoder (model.decoder_*)."""
    weight, model = cfg.loss.mae_weight, cfg.model
    if not weight >= 0:
        raise ConfigError(f"loss.mae_weight: must be 0 (off) or > 0 (the weight of the MAE reconstruction loss), "
                          f"got {weight}")
    if weight == 0:
        return
    if model.mask_ratio <= 0:
        raise ConfigError(f"loss.mae_weight={weight} reconstructs the removed patches, but model.mask_ratio="
                          f"{model.mask_ratio} removes none: set model.mask_ratio > 0 or loss.mae_weight=0 "
                          f"(unmasked tuning runs without the decoder)")
    for key in ("decoder_layers", "decoder_width", "decoder_heads"):
        if getattr(model, key) < 1:
            raise ConfigError(f"model.{key}: must be >= 1 when loss.mae_weight > 0, got {getattr(model, key)}")
    if model.decoder_width % model.decoder_heads:
        raise ConfigError(f"model.decoder_width={model.decoder_width} is not divisible by model.decoder_heads="
                          f"{model.decoder_heads}; choose heads among the divisors of the width")
    if model.decoder_width % 4:
        raise ConfigError(f"model.decoder_width={model.decoder_width}: the decoder's 2-D sin-cos position table "
                          f"needs a width divisible by 4")
    tp = cfg.parallel.tp
    if tp > 1 and (model.decoder_heads % tp or (4 * model.decoder_width) % tp):
        raise ConfigError(f"model.decoder_heads={model.decoder_heads} (MLP width {4 * model.decoder_width}) not "
                          f"divisible by parallel.tp={tp}: the decoder's blocks are split over tp like the towers'")
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"loss.mae_weight={weight} with parallel.pp={cfg.parallel.pp}: the MAE decoder needs the image tower's "
            f"token sequence, its keep indices and the images together, but the pipeline stages pass only the "
            f"towers' hidden states on and the last stage sees pooled features; use parallel.pp=1 (dp, ZeRO-3 "
            f"and tp support the decoder) or loss.mae_weight=0")


def check_attentive(cfg) -> None:
    """Attentive token removal (model.masking=attentive, models/attentive.py) and its EMA tower."""
    model = cfg.model
    if not 0.0 <= model.attentive_keep_fraction <= 1.0:
        raise ConfigError(f"model.attentive_keep_fraction: {model.attentive_keep_fraction} is outside [0, 1] (the share "
                          f"of each sample's visible patches chosen by the EMA tower's attention; the rest is random)")
    if not 0.0 <= model.ema_decay < 1.0:
        raise ConfigError(f"model.ema_decay: {model.ema_decay} is outside [0, 1) (ema = decay * ema + (1 - decay) * "
                          f"online after every optimizer step)")
    if model.masking != "attentive":
        return
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"model.masking=attentive with parallel.pp={cfg.parallel.pp}: the EMA image tower must score every patch "
            f"of an image before the online tower's first stage removes any, so it would need all its blocks on "
            f"stage 0 (and its scores on no other stage); use parallel.pp=1 (dp, ZeRO-3 and tp support it) or "
            f"model.masking=random")
    if cfg.parallel.engine != "fsdp":
        raise ConfigError(
            f"model.masking=attentive with parallel.engine={cfg.parallel.engine}: the DeepSpeed engine owns its "
            f"parameters' partitions and has no per-step EMA update of a frozen tower (nor its checkpoint re-sharding); "
            f"use parallel.engine=fsdp (dp_shard gives ZeRO-3) or model.masking=random")


def check_locks(cfg) -> None:
    """The locked towers (model.lock_*) and train.init_from_parts (a `Config`)."""
    bad = [part for part in cfg.train.init_from_parts if part not in ("visual", "text")]
    if bad or len(set(cfg.train.init_from_parts)) != len(cfg.train.init_from_parts):
        raise ConfigError(f"train.init_from_parts: {cfg.train.init_from_parts} is not a list of distinct towers; "
                          f"valid entries: visual, text (empty: the whole model)")
    if cfg.train.init_from_parts and cfg.parallel.engine != "fsdp":
        raise ConfigError(f"train.init_from_parts: {cfg.train.init_from_parts} needs parallel.engine=fsdp (the "
                          f"DeepSpeed engine loads whole models only); leave it empty or use the native engine")
    model = cfg.model
    for lock, options in (("lock_vision", ("lock_vision_unlocked_blocks", "lock_vision_norm")),
                          ("lock_text", ("lock_text_unlocked_layers", "lock_text_freeze_layer_norm"))):
        count = getattr(model, options[0])
        if count < 0:
            raise ConfigError(f"model.{options[0]}: must be 0 (the whole tower frozen) or the number of groups left "
                              f"trainable from the end (1: the projection, 2: + the last block), got {count}")
        if not getattr(model, lock) and (count or getattr(model, options[1])):
            set_keys = [key for key in options if getattr(model, key)]
            raise ConfigError(f"model.{set_keys[0]}: set, but model.{lock} is false; it refines a locked tower "
                              f"(set model.{lock}=true, or leave {', '.join('model.' + k for k in options)} at 0/false)")
    if model.lock_vision and model.lock_text and not (model.lock_vision_unlocked_blocks or model.lock_text_unlocked_layers):
        raise ConfigError("model.lock_vision and model.lock_text: both towers wholly frozen leave only the temperature "
                          "to train; unlock some groups (model.lock_vision_unlocked_blocks / "
                          "model.lock_text_unlocked_layers) or lock one tower")


def check_ranges(cfg) -> None:
    """The numeric keys against their valid ranges (one ConfigError naming the key, the value and the range)."""
    if not 0.0 <= cfg.model.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio: {cfg.model.mask_ratio} is outside [0, 1)")
    if cfg.model.text_pad_mask and (cfg.data.tokenizer == "openclip" or cfg.data.tokenizer.startswith("openclip:")):
        raise ConfigError(f"model.text_pad_mask=true with data.tokenizer={cfg.data.tokenizer}: OpenCLIP's id 0 pads "
                          f"and is also the token '!', which the mask would hide; set model.text_pad_mask=false")
    check_model_options(cfg.model)
    if not 0.0 <= cfg.model.text_mask_ratio < 1.0:
        raise ConfigError(f"model.text_mask_ratio: {cfg.model.text_mask_ratio} is outside [0, 1) (0: no text masking)")
    if cfg.eval.masked_views < 0 or cfg.eval.masked_views == 1:
        raise ConfigError(f"eval.masked_views: must be 0 (off) or >= 2 views, got {cfg.eval.masked_views}")
    if cfg.eval.masked_view_ratio and not 0.0 < cfg.eval.masked_view_ratio < 1.0:
        raise ConfigError(f"eval.masked_view_ratio: {cfg.eval.masked_view_ratio} is outside (0, 1) (0: 1 - 1/masked_views)")
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.global_batch_size": cfg.train.global_batch_size,
        "model.context_length": cfg.model.context_length,
        "optim.grad_accum_steps": cfg.optim.grad_accum_steps,
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
        "parallel.dp_replicate": cfg.parallel.dp_replicate,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key, value in (("parallel.microbatches", cfg.parallel.microbatches),
                       ("checkpoint.every_steps", cfg.checkpoint.every_steps)):
        if value < 0:
            meaning = ("0 (2 x parallel.pp under pipeline parallel, else 1)" if key == "parallel.microbatches"
                       else "0 (no periodic checkpoints: the final one and preemption saves only)")
            raise ConfigError(f"{key}: must be {meaning} or >= 1, got {value}")
    for key in ("collective_timeout_minutes", "init_timeout_minutes"):
        if not getattr(cfg.train, key) > 0:
            raise ConfigError(f"train.{key}: must be > 0, got {getattr(cfg.train, key)}")
    if cfg.train.spike_factor != 0 and not cfg.train.spike_factor > 1:
        raise ConfigError(f"train.spike_factor: must be 0 (off) or > 1 (a loss that many times the running median), "
                          f"got {cfg.train.spike_factor}")
    if cfg.train.spike_window < 1:
        raise ConfigError(f"train.spike_window: must be >= 1 steps, got {cfg.train.spike_window}")
    if cfg.checkpoint.max_failed_saves < 0:
        raise ConfigError(f"checkpoint.max_failed_saves: must be 0 (stop at the first failed save) or more, got "
                          f"{cfg.checkpoint.max_failed_saves}")
    if cfg.train.collective_timeout_seconds < 0:
        raise ConfigError(f"train.collective_timeout_seconds: must be 0 (use train.collective_timeout_minutes) or "
                          f"> 0, got {cfg.train.collective_timeout_seconds}")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard: must be -1 (fill the world) or >= 1, got {cfg.parallel.dp_shard}")
    if cfg.optim.max_nonfinite_steps < 0:
        raise ConfigError(f"optim.max_nonfinite_steps: must be 0 (stop at the first) or more, got "
                          f"{cfg.optim.max_nonfinite_steps}")
    if cfg.data.streams < 0:
        raise ConfigError(f"data.streams: must be 0 (chosen from the shard count and the batch) or >= 1, "
                          f"got {cfg.data.streams}")
    if cfg.logging.peak_tflops < 0:
        raise ConfigError(f"logging.peak_tflops: must be 0 (known GPUs) or a positive TFLOP/s, got {cfg.logging.peak_tflops}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: {cfg.data.max_bad_fraction} is outside [0, 1]")
    if not 0.0 < cfg.data.crop_scale_min <= cfg.data.crop_scale_max <= 1.0:
        raise ConfigError(
            f"data.crop_scale_min/max: need 0 < min <= max <= 1, got {cfg.data.crop_scale_min}, {cfg.data.crop_scale_max}"
        )


SIGMOID_LOGIT_SCALE_INIT = 2.302585092994046  # log(10), SigLIP's t' init
SIGMOID_LOGIT_BIAS_INIT = -10.0


def resolve_loss_parameters(cfg, default_scale_init: float) -> None:
    """loss.kind sigmoid: the model gets a logit bias (init -10) and, unless the recipe set another,
    the temperature init log 10 (SigLIP) in place of the default `default_scale_init`; resolved at
    validation so the saved config.yaml holds what runs."""
    if cfg.loss.kind == "sigmoid":
        if cfg.model.logit_bias_init is None:
            cfg.model.logit_bias_init = SIGMOID_LOGIT_BIAS_INIT
            if cfg.model.logit_scale_init == default_scale_init:
                cfg.model.logit_scale_init = SIGMOID_LOGIT_SCALE_INIT
    elif cfg.model.logit_bias_init is not None:
        raise ConfigError(f"model.logit_bias_init: {cfg.model.logit_bias_init} is set, but only loss.kind sigmoid has a "
                          f"logit bias (loss.kind is {cfg.loss.kind}); leave it null or use loss.kind=sigmoid")
