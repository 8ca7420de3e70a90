"""Model sizes by name, and the resolved architecture of a config.

The table follows docs/design.md section 1 (FLIP paper Table 9; G/14 as OpenCLIP's bigG/14).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TowerArch:
    width: int
    layers: int
    heads: int
    mlp_dim: int


@dataclass(frozen=True)
class FlipArch:
    embed_dim: int
    image_size: int
    patch_size: int
    vision: TowerArch
    text: TowerArch
    vocab_size: int
    context_length: int = 32

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict:
        return asdict(self)


# Vocabulary of the large recipes: a 32k sentencepiece model (FLIP used BERT's 30,523 WordPieces).
DEFAULT_VOCAB = 32000

MODEL_SIZES: dict[str, FlipArch] = {
    "tiny": FlipArch(
        embed_dim=64, image_size=32, patch_size=4,
        vision=TowerArch(width=96, layers=4, heads=4, mlp_dim=384),
        text=TowerArch(width=64, layers=2, heads=4, mlp_dim=256),
        vocab_size=512,
    ),
    "B/16": FlipArch(
        embed_dim=512, image_size=224, patch_size=16,
        vision=TowerArch(width=768, layers=12, heads=12, mlp_dim=3072),
        text=TowerArch(width=512, layers=12, heads=8, mlp_dim=2048),
        vocab_size=DEFAULT_VOCAB,
    ),
    "L/16": FlipArch(
        embed_dim=768, image_size=224, patch_size=16,
        vision=TowerArch(width=1024, layers=24, heads=16, mlp_dim=4096),
        text=TowerArch(width=768, layers=12, heads=12, mlp_dim=3072),
        vocab_size=DEFAULT_VOCAB,
    ),
    "H/14": FlipArch(
        embed_dim=1024, image_size=224, patch_size=14,
        vision=TowerArch(width=1280, layers=32, heads=16, mlp_dim=5120),
        text=TowerArch(width=1024, layers=24, heads=16, mlp_dim=4096),
        vocab_size=DEFAULT_VOCAB,
    ),
    "G/14": FlipArch(
        embed_dim=1280, image_size=224, patch_size=14,
        vision=TowerArch(width=1664, layers=48, heads=16, mlp_dim=8192),
        text=TowerArch(width=1280, layers=32, heads=20, mlp_dim=5120),
        vocab_size=DEFAULT_VOCAB,
    ),
}


def arch_from_config(model_cfg) -> FlipArch:
    """The registry entry for `model.name` with the config's overrides applied, checked."""
    if model_cfg.name not in MODEL_SIZES:
        raise ValueError(f"model.name: unknown model '{model_cfg.name}'; valid names: {', '.join(MODEL_SIZES)}")
    arch = MODEL_SIZES[model_cfg.name]

    def pick(value, default):
        return default if value is None else value

    vision = TowerArch(
        width=pick(model_cfg.vision_width, arch.vision.width),
        layers=pick(model_cfg.vision_layers, arch.vision.layers),
        heads=pick(model_cfg.vision_heads, arch.vision.heads),
        mlp_dim=pick(model_cfg.vision_mlp_dim, arch.vision.mlp_dim),
    )
    ratio = getattr(model_cfg, "vision_mlp_ratio", None)
    if ratio is not None:  # OpenCLIP's rounding: int(width * mlp_ratio) (bigG: int(1664 * 4.9231) = 8192)
        vision = replace(vision, mlp_dim=int(vision.width * float(ratio)))
    text = TowerArch(
        width=pick(model_cfg.text_width, arch.text.width),
        layers=pick(model_cfg.text_layers, arch.text.layers),
        heads=pick(model_cfg.text_heads, arch.text.heads),
        mlp_dim=pick(model_cfg.text_mlp_dim, arch.text.mlp_dim),
    )
    arch = replace(
        arch,
        embed_dim=pick(model_cfg.embed_dim, arch.embed_dim),
        image_size=pick(model_cfg.image_size, arch.image_size),
        patch_size=pick(model_cfg.patch_size, arch.patch_size),
        vision=vision,
        text=text,
        vocab_size=pick(model_cfg.vocab_size, arch.vocab_size),
        context_length=model_cfg.context_length,
    )
    for tower_name, tower in (("vision", arch.vision), ("text", arch.text)):
        if tower.width % tower.heads:
            raise ValueError(
                f"model.{tower_name}_width={tower.width} is not divisible by model.{tower_name}_heads={tower.heads}"
            )
    if arch.image_size % arch.patch_size:
        raise ValueError(f"model.image_size={arch.image_size} is not divisible by model.patch_size={arch.patch_size}")
    return arch
