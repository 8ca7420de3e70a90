"""flip_scale's image tower -> a timm `VisionTransformer` (timm 1.0), for fine-tuning with timm-based code.

Writes `OUT/model.safetensors` + `OUT/config.json` in the layout timm's `local-dir:` loader reads
(`architecture`, `model_args`, `pretrained_cfg`), so either of these builds the same tower:

    timm.create_model('local-dir:OUT', pretrained=True)
    timm.create_model('vit_base_patch16_224', pretrained=False, **config['model_args'])  # + load_state_dict

What maps (checked against timm's vision_transformer.py):

  flip_scale                          timm VisionTransformer
  visual.patch_embed (no bias)        patch_embed.proj (timm's conv has a bias unless pre_norm: zeros)
  visual.cls_token                    cls_token [1, 1, width]; class_token=True
  fixed sin-cos buffer (not saved)    pos_embed [1, L, width] (a parameter), no_embed_class=True: the
                                      patches get their rows before CLS is prepended, CLS gets none
  (no LayerNorm before the blocks)    pre_norm=False
  blocks.i.ln_1 / ln_2                blocks.i.norm1 / norm2 (timm's LayerNorm, eps 1e-6)
  blocks.i.attn.qkv [heads,(q,k,v),d] blocks.i.attn.qkv [(q,k,v), heads, d]; qkv_bias=True
  blocks.i.attn.proj, mlp.fc1 / fc2   blocks.i.attn.proj, mlp.fc1 / fc2; exact GELU (timm's default)
  ln_post, pool avg_patches           norm, then global_pool='avg' (mean of x[:, 1:]), fc_norm=False
                                      (timm's default for 'avg' would norm after pooling instead)
  ln_post, pool cls                   norm, then global_pool='token' (x[:, 0])
  visual.proj.weight [embed, width]   head (num_classes=embed_dim, bias zero): model(x) is our image
                                      embedding (not normalised); forward_head(pre_logits=True) the
                                      pooled features. --no-head: num_classes=0 (model(x) is the
                                      pooled features) and the projection in OUT/projection.safetensors.

Refused, by name: model.vision_pool=avg_all (timm's pooling leaves the CLS token out or takes it
alone), model.norm_eps other than timm's 1e-6 (timm's config cannot carry an eps), an MLP width
that timm's `int(width * mlp_ratio)` does not give back, and the architecture options not yet
mapped here (model.vision_pos_embed other than sincos, model.vision_ln_pre, model.act other than
gelu; timm would express them as pos_embed with a CLS row, pre_norm=True, act_layer='quick_gelu').
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint.consolidated import TensorSpec
from ..checkpoint.safety import ConvertError
from ..models import arch_from_config
from ..models.vit import sincos_2d_position_embedding
from .checkpoints import read_consolidated_tensors
from .openclip import log_ema_dropped
from .safetensors_io import write_safetensors

TIMM_CONFIG_FILE = "config.json"
TIMM_MODEL_FILE = "model.safetensors"
PROJECTION_FILE = "projection.safetensors"
TIMM_ARCHITECTURE = "vit_base_patch16_224"  # a registered name; model_args override every size
TIMM_NORM_EPS = 1e-6  # timm's VisionTransformer LayerNorm
POOLS = {"avg_patches": "avg", "cls": "token"}
# Architecture options of the model config with the one value mapped here (read with a default,
# so a config without them is the default architecture).
_UNMAPPED_OPTIONS = (
    ("vision_pos_embed", "sincos", "a learned table with a CLS row would be timm's pos_embed with no_embed_class=False"),
    ("vision_ln_pre", False, "a LayerNorm before the blocks would be timm's pre_norm=True"),
    ("act", "gelu", "QuickGELU would be timm's act_layer='quick_gelu'"),
)


def timm_model_args(model_cfg, head: bool = True) -> dict:
    """The `timm.create_model` keyword arguments of `model_cfg`'s image tower; refuses, naming the
    key, what timm's VisionTransformer cannot express (or what is not mapped yet)."""
    for key, mapped, note in _UNMAPPED_OPTIONS:
        value = getattr(model_cfg, key, mapped)
        if value != mapped:
            raise ConvertError(f"model.{key}={value!r} is not exported to timm yet ({note}); "
                               f"to-timm exports model.{key}={mapped!r} only")
    if model_cfg.vision_pool not in POOLS:
        raise ConvertError(
            f"model.vision_pool={model_cfg.vision_pool!r} has no timm equivalent (timm's global_pool 'avg' averages "
            f"the patch tokens without CLS, 'token' takes CLS alone); valid for to-timm: {', '.join(POOLS)}"
        )
    if model_cfg.norm_eps != TIMM_NORM_EPS:
        raise ConvertError(f"model.norm_eps={model_cfg.norm_eps:g}: timm's VisionTransformer uses LayerNorm eps "
                           f"{TIMM_NORM_EPS:g} and its config cannot carry another; to-timm needs model.norm_eps=1e-6")
    arch = arch_from_config(model_cfg)
    width, mlp_dim = arch.vision.width, arch.vision.mlp_dim
    mlp_ratio = mlp_dim / width
    if int(width * mlp_ratio) != mlp_dim:
        raise ConvertError(f"model.vision_mlp_dim={mlp_dim}: timm's int(width * mlp_ratio) with width {width} "
                           f"gives {int(width * mlp_ratio)} for mlp_ratio {mlp_ratio!r}")
    pool = POOLS[model_cfg.vision_pool]
    return {
        "img_size": arch.image_size, "patch_size": arch.patch_size, "embed_dim": width,
        "depth": arch.vision.layers, "num_heads": arch.vision.heads, "mlp_ratio": mlp_ratio,
        "qkv_bias": True, "class_token": True, "no_embed_class": True, "pre_norm": False,
        "global_pool": pool, "fc_norm": False, "act_layer": "gelu",
        "num_classes": arch.embed_dim if head else 0,
    }


def _qkv_to_timm(heads: int):
    # ours: output rows [heads, (q, k, v), head_dim]; timm's qkv: [(q, k, v), heads, head_dim].
    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()

    return convert


def _pairs(arch, head: bool) -> list:
    """(timm name, flip name or None for a computed tensor, convert) in timm's state-dict order."""
    same = lambda t: t  # noqa: E731
    width = arch.vision.width
    pairs = [
        ("cls_token", "visual.cls_token", lambda t: t.reshape(1, 1, width)),
        ("pos_embed", None, None),
        ("patch_embed.proj.weight", "visual.patch_embed.weight", same),
        ("patch_embed.proj.bias", None, None),
    ]
    qkv = _qkv_to_timm(arch.vision.heads)
    for i in range(arch.vision.layers):
        ours, theirs = f"visual.blocks.{i}", f"blocks.{i}"
        for flip_name, timm_name, convert in (("ln_1", "norm1", same), ("attn.qkv", "attn.qkv", qkv),
                                              ("attn.proj", "attn.proj", same), ("ln_2", "norm2", same),
                                              ("mlp.fc1", "mlp.fc1", same), ("mlp.fc2", "mlp.fc2", same)):
            for leaf in ("weight", "bias"):
                pairs.append((f"{theirs}.{timm_name}.{leaf}", f"{ours}.{flip_name}.{leaf}", convert))
    pairs += [("norm.weight", "visual.ln_post.weight", same), ("norm.bias", "visual.ln_post.bias", same)]
    if head:
        pairs += [("head.weight", "visual.proj.weight", same), ("head.bias", None, None)]
    return pairs


def _computed(name: str, arch) -> torch.Tensor:
    width = arch.vision.width
    if name == "pos_embed":
        table = sincos_2d_position_embedding(width, arch.grid_size)
        return torch.from_numpy(table).to(torch.float32).reshape(1, arch.num_patches, width)
    if name == "patch_embed.proj.bias":
        return torch.zeros(width)
    return torch.zeros(arch.embed_dim)  # head.bias: our projection has none


def to_timm(consolidated: Union[str, Path], out_dir: Union[str, Path], head: bool = True,
            architecture: str = TIMM_ARCHITECTURE) -> dict:
    """A consolidated directory (or its model.safetensors) -> `out_dir/model.safetensors` +
    `out_dir/config.json` (+ `out_dir/projection.safetensors` when `head` is False)."""
    from safetensors import safe_open

    cfg, file, header, found = read_consolidated_tensors(consolidated)
    model_args = timm_model_args(cfg.model, head)  # refuses what timm cannot express
    log_ema_dropped("to-timm", found)
    arch = arch_from_config(cfg.model)
    pairs = _pairs(arch, head)
    by_name = {name: (flip, convert) for name, flip, convert in pairs}
    out_specs = []
    for name, flip, convert in pairs:
        if flip is None:
            # Computed tensors: the fixed table in float32 (as our tower adds it), zeros in the weights' dtype.
            dtype = torch.float32 if name == "pos_embed" else found["visual.patch_embed.weight"].dtype
            out_specs.append(TensorSpec(name, tuple(_computed(name, arch).shape), dtype))
        else:
            shape = tuple(convert(torch.empty(found[flip].shape, device="meta")).shape)
            out_specs.append(TensorSpec(name, shape, found[flip].dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "producer": "flip_scale.convert", "step": header.get("step", "unknown"),
                "source": str(file.resolve())}
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        def produce(spec: TensorSpec) -> torch.Tensor:
            flip, convert = by_name[spec.name]
            if flip is None:
                return _computed(spec.name, arch).to(spec.dtype)
            return convert(handle.get_tensor(flip))

        write_safetensors(out_dir / TIMM_MODEL_FILE, out_specs, produce, metadata)
        projection: Optional[Path] = None
        if not head:
            projection = out_dir / PROJECTION_FILE
            spec = found["visual.proj.weight"]
            write_safetensors(projection, [TensorSpec("proj.weight", spec.shape, spec.dtype)],
                              lambda _: handle.get_tensor("visual.proj.weight"), metadata)
    size = arch.image_size
    document = {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "num_features": arch.vision.width,
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "num_classes": model_args["num_classes"], "pool_size": None, "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        # Ignored by timm.
        "flip_scale": {"name": cfg.model.name, "vision_pool": cfg.model.vision_pool, "step": header.get("step"),
                       "source": str(file.resolve()),
                       "head": "the image projection (bias zero): model(x) = flip_scale's image embedding"
                               if head else f"none: the projection is {PROJECTION_FILE} (proj.weight [embed, width])"},
    }
    (out_dir / TIMM_CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return {"out": str(out_dir), "weights": str(out_dir / TIMM_MODEL_FILE), "config": str(out_dir / TIMM_CONFIG_FILE),
            "projection": str(projection) if projection else None, "tensors": len(out_specs),
            "model_args": model_args}
