"""The DeepSpeed config of a run, generated from our YAML (one source of truth), and the merge of a
raw DeepSpeed JSON on top (`parallel.deepspeed_config`). Pure: no DeepSpeed import, so `--dry-run`
prints it on a login node.

    ds = deepspeed_config(cfg, dims, precision, arch)      # the dict deepspeed.initialize gets

Keys of two kinds:
  pinned    what our config already says: the batch split, precision, clipping, the ZeRO stage, the
            offload devices. The JSON may repeat them with the same value; another value is refused
            (ConfigError naming both values and the key to change).
  defaults  what we choose for FLIP's ViT blocks (bucket sizes, ZeRO-3 prefetch and persistence,
            fp32 gradient reduction): the JSON's value wins.
`optimizer` and `scheduler` sections are refused: the optimizer is built from optim.* and the lr
schedule from schedule.*, so that both engines train the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError

# Sections of a DeepSpeed JSON that would replace what optim.* / schedule.* define.
REFUSED_SECTIONS = {
    "optimizer": "the optimizer is AdamW from optim.* (lr, betas, eps, weight_decay)",
    "scheduler": "the lr schedule is schedule.* (warmup + cosine), the same under both engines",
    "checkpoint": "checkpoints are written into flip_scale's step directories by DeepSpeed's torch checkpoint "
                  "engine, where completeness, retention and conversion can read them",
    "amp": "precision is train.precision (bf16 or fp32)",
    "torch_autocast": "autocast is the engine's, from train.precision and parallel.param_dtype",
    "load_universal_checkpoint": "resuming into another data-parallel size re-shards from the files itself",
}


def _block_params(arch) -> int:
    """Parameters of the largest transformer block of either tower (attention + MLP)."""
    sizes = []
    for tower in (arch.vision, arch.text):
        sizes.append(4 * tower.width * tower.width + 2 * tower.width * tower.mlp_dim)
    return max(sizes)


def _offload(device: str, nvme_path: str) -> dict:
    if device == "none":
        return {"device": "none"}
    section: dict[str, Any] = {"device": device}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def pinned_config(cfg, dims, precision: str) -> dict:
    """The keys our config decides (see the module docstring)."""
    p = cfg.parallel
    local = cfg.train.global_batch_size // dims.dp_size
    accum = cfg.optim.grad_accum_steps
    bf16_params = precision == "bf16" and p.param_dtype == "bf16"
    # compute_grad_norm: the trainer's skip of a non-finite step and its logged norm rest on it.
    zero: dict[str, Any] = {"stage": p.zero_stage, "offload_optimizer": _offload(p.offload_optimizer, p.nvme_path),
                            "compute_grad_norm": True}
    if p.zero_stage == 3:
        zero["offload_param"] = _offload(p.offload_params, p.nvme_path)
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": local // accum,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        # bf16 weights (DeepSpeed's bf16 mode, fp32 master weights in the optimizer) where the run
        # is bf16 with parallel.param_dtype bf16; else fp32 weights (under bf16 autocast when
        # train.precision is bf16), as FSDP's MixedPrecisionPolicy does.
        "bf16": {"enabled": bf16_params, "check_grad_overflow": True},  # a non-finite step is skipped
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # The engine calls step() after every micro-batch and lets DeepSpeed find the boundary.
        "managed_gradient_accumulation": True,
    }


def default_config(cfg, arch) -> dict:
    """Our defaults for FLIP's towers (the JSON may override each)."""
    block = _block_params(arch)
    offloading = [key for key, device in (("offload_optimizer", cfg.parallel.offload_optimizer),
                                          ("offload_param", cfg.parallel.offload_params)) if device != "none"]
    zero: dict[str, Any] = {
        **{key: {"pin_memory": True} for key in offloading},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": max(int(5e7), 2 * block),
        "allgather_bucket_size": max(int(5e7), 2 * block),
    }
    if cfg.parallel.zero_stage == 3:
        # ZeRO-3 gathers parameters module by module; fetching the tiny ones (norms, biases, the
        # temperature, the class token) one at a time is latency-bound (DeepSpeed#5047). Those stay
        # whole on every rank (persistence threshold above the widest norm), the engine makes each
        # transformer block one fetch unit (a ZeRO-3 leaf module), and two blocks are prefetched.
        widest = max(arch.vision.width, arch.text.width, arch.embed_dim)
        zero.update({
            "stage3_param_persistence_threshold": max(int(1e5), 8 * widest),
            "stage3_prefetch_bucket_size": 2 * block,
            "stage3_max_live_parameters": max(int(1e9), 4 * block),
            "stage3_max_reuse_distance": max(int(1e9), 4 * block),
        })
    return {
        "zero_optimization": zero,
        # Gradients are reduced in parallel.reduce_dtype (fp32 by default), as under FSDP.
        "communication_data_type": cfg.parallel.reduce_dtype,
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def read_user_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"parallel.deepspeed_config={path}: no such file (a DeepSpeed JSON config)")
    try:
        tree = json.loads(file.read_text())
    except ValueError as error:
        raise ConfigError(f"parallel.deepspeed_config={path}: not valid JSON ({error})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"parallel.deepspeed_config={path}: expected a JSON object, got {type(tree).__name__}")
    return tree


# Where each pinned key comes from in our config, for the refusal message.
_SOURCE_OF = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.global_batch_size / data-parallel size / optim.grad_accum_steps",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "train.precision and parallel.param_dtype",
    "fp16.enabled": "train.precision (fp16 is not offered: bf16 or fp32)",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload_optimizer / parallel.nvme_path",
    "zero_optimization.offload_param": "parallel.offload_params / parallel.nvme_path",
    "zero_optimization.compute_grad_norm": "the trainer (its logged norm and its skip of non-finite steps)",
    "bf16.check_grad_overflow": "the trainer (a non-finite step is skipped)",
    "managed_gradient_accumulation": "the engine (DeepSpeed finds the accumulation boundary)",
}


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs if isinstance(ours, bool) and isinstance(theirs, bool) else False
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return float(ours) == float(theirs)
    return ours == theirs


def _check_pinned(pinned: dict, user: dict, path: str, prefix: str = "") -> None:
    for key, theirs in user.items():
        dotted = f"{prefix}{key}"
        if key not in pinned:
            if dotted == "zero_optimization.offload_param" and isinstance(theirs, dict) \
                    and theirs.get("device", "none") != "none":
                raise ConfigError(
                    f"parallel.deepspeed_config={path}: {dotted} = {json.dumps(theirs)} contradicts this config "
                    f"(parameter offload needs parallel.zero_stage=3 and parallel.offload_params); set those instead")
            continue
        ours = pinned[key]
        if isinstance(ours, dict) and isinstance(theirs, dict) and dotted not in _SOURCE_OF:
            _check_pinned(ours, theirs, path, dotted + ".")
            continue
        if isinstance(ours, dict) and isinstance(theirs, dict):  # an offload section: compare what it sets
            differing = {k: v for k, v in theirs.items() if k in ours and not _same(ours[k], v)}
            if not differing:
                continue
        elif _same(ours, theirs):
            continue
        raise ConfigError(
            f"parallel.deepspeed_config={path}: {dotted} = {json.dumps(theirs)} contradicts this config's "
            f"{json.dumps(ours)} (from {_SOURCE_OF.get(dotted, 'this config')}); change it there, or drop the key "
            f"from the JSON")


def _merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(cfg, dims, precision: str, arch, user: Optional[dict] = None) -> dict:
    """The config `deepspeed.initialize` gets: our defaults, the JSON of parallel.deepspeed_config
    (or `user`) on top, our pinned keys over both. ConfigError on a contradicting or refused key."""
    pinned = pinned_config(cfg, dims, precision)
    path = cfg.parallel.deepspeed_config
    if user is None and path:
        user = read_user_config(path)
    user = user or {}
    where = path or "(given)"
    for section, reason in REFUSED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"parallel.deepspeed_config={where}: the {section!r} section is not taken: {reason}")
    _check_pinned(pinned, user, where)
    ratio = user.get("zero_optimization", {}).get("offload_optimizer", {}).get("ratio", 1)
    if ratio != 1:
        raise ConfigError(f"parallel.deepspeed_config={where}: zero_optimization.offload_optimizer.ratio={ratio} is "
                          "not taken: the sub-groups it leaves on the device step with a second optimizer whose "
                          "moments DeepSpeed's checkpoint files do not hold (valid: 1, the default)")
    return _merge(_merge(default_config(cfg, arch), user), pinned)


def dry_run_precision(cfg) -> str:
    """The precision a run will resolve to, without a device in hand: train.precision, with "auto"
    as bf16 (a GPU with bf16) unless train.device is cpu."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "fp32" if cfg.train.device == "cpu" else "bf16"
