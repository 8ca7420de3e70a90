"""Locked towers (LiT): which parameters of a FLIP model are frozen, by name.

OpenCLIP's `--lock-image` / `--lock-text` semantics (open_clip VisionTransformer.lock and
lock_text_tower): a locked tower freezes every parameter; `unlocked` N > 0 leaves the last N of
the tower's groups trainable, the groups being, in order,

    [embeddings], block 0, ..., block L-2, [block L-1 + the final LayerNorm], [the projection]

so N=1 trains the projection alone, N=2 also the last block and the final LayerNorm, and N >= L+2
the whole tower. `freeze_norm` keeps the LayerNorms of the unlocked groups frozen too. (OpenCLIP's
`--lock-image-freeze-bn-stats` freezes BatchNorm statistics, which a ViT has none of, and its
`--lock-text-freeze-layer-norm` is accepted but does nothing; here the norm flags act on the
LayerNorms, the one meaning they can have for these towers.)

The attentive masking's EMA image tower (`ema_visual`, models/ema.py) is always frozen this way.

Frozen parameters get requires_grad False wherever they live (whole, a pipeline stage, FSDP2 or
tensor-parallel DTensors, DeepSpeed partitions): no gradient is made or reduced for them, the
optimizer never sees them (optim.param_groups skips them) and the grad norm leaves them out.
Names are matched with the wrappers' components (activation checkpointing, torch.compile, FSDP1)
removed, so the rule is the same on every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_WRAPPERS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
_NORMS = ("ln_1", "ln_2", "ln_pre", "ln_post", "ln_final")
_HEAD_NORM = {"visual": "ln_post", "text": "ln_final"}
_EMBEDDINGS = {"visual": ("patch_embed", "cls_token", "pos_embed", "ln_pre"), "text": ("token_embedding", "pos_embed")}


@dataclass(frozen=True)
class TowerLock:
    locked: bool = False
    unlocked: int = 0  # OpenCLIP's unlocked groups, counted from the end
    freeze_norm: bool = False


def tower_locks(model_cfg) -> dict:
    """{"visual": TowerLock, "text": TowerLock} of a ModelConfig."""
    return {
        "visual": TowerLock(bool(getattr(model_cfg, "lock_vision", False)),
                            int(getattr(model_cfg, "lock_vision_unlocked_blocks", 0)),
                            bool(getattr(model_cfg, "lock_vision_norm", False))),
        "text": TowerLock(bool(getattr(model_cfg, "lock_text", False)),
                          int(getattr(model_cfg, "lock_text_unlocked_layers", 0)),
                          bool(getattr(model_cfg, "lock_text_freeze_layer_norm", False))),
    }


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' components (as FLIPModel.named_parameters gives it)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def _group_from_end(parts: list, layers: int) -> int:
    """1-based position from the end of OpenCLIP's group list of the tower parameter `parts`."""
    total = layers + 2
    head = parts[1]
    if head == "proj":
        return 1
    if head == "blocks":
        index = int(parts[2])
        return 2 if index == layers - 1 else total - (index + 1)
    if head in _HEAD_NORM.values():
        return 2
    return total  # the embeddings


def is_frozen(name: str, locks: dict, layers: dict) -> bool:
    """Whether parameter `name` (any wrapper) is frozen under `locks` (tower_locks); `layers`:
    {"visual": image blocks, "text": text blocks} of the whole model."""
    parts = canonical_name(name).split(".")
    tower = parts[0]
    if tower == "ema_visual":  # the attentive masking's EMA tower (models/ema.py): never trained
        return True
    lock = locks.get(tower)
    if lock is None or not lock.locked or len(parts) < 2:
        return False  # the temperature, the logit bias, an unlocked tower
    if _group_from_end(parts, layers[tower]) > lock.unlocked:
        return True
    return lock.freeze_norm and any(part in _NORMS for part in parts[1:])


def fully_locked(model_cfg, tower: str) -> bool:
    lock = tower_locks(model_cfg)[tower]
    return lock.locked and lock.unlocked == 0


def apply_locks(module: nn.Module, model_cfg, layers: dict) -> int:
    """Set requires_grad False on the frozen parameters of `module` (a FLIP model or a part of
    one); idempotent. Returns the number of frozen parameter elements (this rank's shards)."""
    locks = tower_locks(model_cfg)
    frozen = 0
    if not any(lock.locked for lock in locks.values()) and getattr(model_cfg, "masking", "random") != "attentive":
        return 0
    for name, param in module.named_parameters():
        if is_frozen(name, locks, layers):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def reinitialize_other_towers(module: nn.Module, model_cfg, seed: int, kept: list) -> None:
    """Every parameter of `module` outside the towers `kept` ("visual", "text") back to its initial
    value (a function of seed and name, as at build): `train.init_from_parts`."""
    from .init import initialize_parameters

    initialize_parameters(module, seed, model_cfg.logit_scale_init, model_cfg.logit_bias_init,
                          select=lambda name: canonical_name(name).split(".")[0] not in kept)
