"""OpenCLIP model configs <-> flip_scale `ModelConfig`: what maps, and what is refused by name.

See `openclip.py` for the table of tensors. An OpenCLIP key absent from a config takes OpenCLIP's
default (checked against open_clip 3.3's `CLIPVisionCfg` / `CLIPTextCfg`) and is judged like any other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

from ..config import ModelConfig
from ..models import MODEL_SIZES, arch_from_config
from ..checkpoint.safety import ConvertError

OPENCLIP_CONFIG_FILE = "open_clip_config.json"
# open_clip's preprocessing when a config has no preprocess_cfg (OPENAI_DATASET_MEAN / _STD).
OPENCLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENCLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def check_exportable(model_cfg: ModelConfig, text_eos_pool: bool = False) -> None:
    """Refuse the model options OpenCLIP cannot represent, naming the option."""
    if model_cfg.text_pad_mask:
        raise ConvertError(
            "model.text_pad_mask=true has no OpenCLIP equivalent: OpenCLIP's config never passes a padding "
            "mask to the text tower (use_pad_mask is not a config option), so the embeddings would differ. "
            "Exportable: model.text_pad_mask=false"
        )
    if model_cfg.vision_pool == "avg_all":
        raise ConvertError(
            "model.vision_pool=avg_all has no OpenCLIP equivalent: OpenCLIP's pool_type=avg averages the patch "
            "tokens only (CLS excluded). Exportable: model.vision_pool=avg_patches (pool_type avg) or cls (pool_type tok)"
        )
    if model_cfg.text_causal and model_cfg.text_pool == "auto" and not text_eos_pool:
        raise ConvertError(
            "model.text_causal=true with model.text_pool=auto: flip_scale pools the last non-padding token, which "
            "OpenCLIP's 'argmax' pooling (the highest token id) does not match. OpenCLIP's pool_type 'eos' (first "
            "end-of-text token) gives the same result for every sequence flip_scale's tokenizer produces ([BOS] pieces "
            "[EOS] then padding); pass --text-eos-pool to export with it. Exportable without it: model.text_pool=argmax "
            "(OpenCLIP's own pooling) or model.text_causal=false"
        )


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    # OpenCLIP builds int(width * mlp_ratio) hidden units: pick a ratio that gives mlp_dim exactly.
    ratio = mlp_dim / width
    for _ in range(4):
        if int(width * ratio) == mlp_dim:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ConvertError(f"no mlp_ratio gives int({width} * ratio) == {mlp_dim} in OpenCLIP")


def openclip_model_config(model_cfg: ModelConfig, text_eos_pool: bool = False) -> dict:
    """The OpenCLIP `model_cfg` (CLIP(**model_cfg) / open_clip_config.json) of a flip_scale model."""
    from ..data.tokenizer import EOS_ID, PAD_ID

    check_exportable(model_cfg, text_eos_pool)
    arch = arch_from_config(model_cfg)
    norm = {"eps": model_cfg.norm_eps}
    if model_cfg.text_pool == "argmax":
        text_pool = "argmax"
    else:
        text_pool = "eos" if model_cfg.text_causal else "first"
    vision = {
        "image_size": arch.image_size, "patch_size": arch.patch_size, "layers": arch.vision.layers,
        "width": arch.vision.width, "head_width": arch.vision.width // arch.vision.heads,
        "mlp_ratio": _mlp_ratio(arch.vision.width, arch.vision.mlp_dim),
        "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
        "no_ln_pre": not model_cfg.vision_ln_pre, "final_ln_after_pool": False,
        "pos_embed_type": "learnable" if model_cfg.vision_pos_embed == "learned" else "sin_cos_2d",
        "pool_type": "avg" if model_cfg.vision_pool == "avg_patches" else "tok",
        "act_kwargs": None, "norm_kwargs": norm,
    }
    text = {
        "context_length": arch.context_length, "vocab_size": arch.vocab_size, "width": arch.text.width,
        "heads": arch.text.heads, "layers": arch.text.layers,
        "mlp_ratio": _mlp_ratio(arch.text.width, arch.text.mlp_dim), "ls_init_value": None,
        "embed_cls": False, "pad_id": PAD_ID, "eos_id": EOS_ID,
        "no_causal_mask": not model_cfg.text_causal, "final_ln_after_pool": False,
        "pool_type": text_pool,
        "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "norm_kwargs": norm,
    }
    out = {"embed_dim": arch.embed_dim, "quick_gelu": model_cfg.act == "quick_gelu", "init_logit_scale": model_cfg.logit_scale_init,
           "vision_cfg": vision, "text_cfg": text}
    if getattr(model_cfg, "logit_bias_init", None) is not None:  # loss.kind sigmoid: OpenCLIP's SigLIP bias
        out["init_logit_bias"] = model_cfg.logit_bias_init
    return out


# OpenCLIP config keys and the values flip_scale can represent. A key absent from the config has
# OpenCLIP's default, and is checked like any other.
_VISION_MUST = {  # key: (OpenCLIP default, accepted values, what it is)
    "ls_init_value": (None, (None,), "layer scale"),
    "attentional_pool": (False, (False,), "attentional pooling"),
    "no_ln_pre": (False, (False, True), "a LayerNorm before the blocks (ln_pre)"),
    "pos_embed_type": ("learnable", ("learnable", "sin_cos_2d"), "the image position embedding"),
    "final_ln_after_pool": (False, (False,), "LayerNorm after pooling"),
    "pool_type": ("tok", ("avg", "tok"), "image pooling"),
    "act_kwargs": (None, (None, {}), "activation arguments"),
    "block_type": (None, (None, "default"), "a custom attention block"),
    "qk_norm": (False, (False,), "q/k LayerNorm"),
    "scaled_cosine_attn": (False, (False,), "scaled cosine attention"),
    "scale_heads": (False, (False,), "per-head attention scale"),
    "scale_attn_inner": (False, (False,), "LayerNorm inside attention"),
    "scale_attn": (False, (False,), "LayerNorm after attention"),
    "scale_fc": (False, (False,), "LayerNorm inside the MLP"),
    "timm_model_name": (None, (None, ""), "a timm image tower"),
}
_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
                "attn_pooler_queries", "attn_pooler_heads", "output_tokens", "norm_kwargs",
                "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_MUST = {
    "ls_init_value": (None, (None,), "layer scale"),
    "embed_cls": (False, (False,), "a CLS token appended to the text (CoCa)"),
    "final_ln_after_pool": (False, (False,), "LayerNorm after pooling"),
    "proj_bias": (False, (False,), "a bias in the text projection"),
    "proj_type": ("linear", ("linear",), "the text projection"),
    "act_kwargs": (None, (None, {}), "activation arguments"),
    "block_type": (None, (None, "default"), "a custom attention block"),
    "qk_norm": (False, (False,), "q/k LayerNorm"),
    "scaled_cosine_attn": (False, (False,), "scaled cosine attention"),
    "scale_heads": (False, (False,), "per-head attention scale"),
    "scale_attn_inner": (False, (False,), "LayerNorm inside attention"),
    "scale_attn": (False, (False,), "LayerNorm after attention"),
    "scale_fc": (False, (False,), "LayerNorm inside the MLP"),
    "hf_model_name": (None, (None, ""), "a Hugging Face text tower"),
}
_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id",
              "no_causal_mask", "pool_type", "output_tokens", "norm_kwargs", "hf_tokenizer_name",
              "tokenizer_mode", "tokenizer_kwargs", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_FREE = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
             "nonscalar_logit_scale", "custom_text"}


def _check_section(section: dict, where: str, must: dict, free: set) -> None:
    for key in section:
        if key not in must and key not in free:
            raise ConvertError(f"OpenCLIP {where}.{key} is not an option flip_scale knows how to map; refusing rather than guessing")
    for key, (default, accepted, what) in must.items():
        value = section.get(key, default)
        if value not in accepted:
            raise ConvertError(
                f"OpenCLIP {where}.{key}={json.dumps(value)} ({what}) has no flip_scale equivalent; "
                f"representable: {', '.join(json.dumps(a) for a in accepted)}"
            )


def _square(value, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConvertError(f"OpenCLIP {where}={value}: flip_scale needs a square size (one number)")
        value = value[0]
    return int(value)


def _eps(section: dict, where: str) -> float:
    kwargs = section.get("norm_kwargs") or {}
    unknown = [k for k in kwargs if k != "eps"]
    if unknown:
        raise ConvertError(f"OpenCLIP {where}.norm_kwargs has {', '.join(unknown)}; only eps maps onto flip_scale")
    return float(kwargs.get("eps", 1e-5))  # torch's LayerNorm default, which OpenCLIP uses without norm_kwargs


def _nearest_name(arch_fields: dict) -> str:
    """The registry size a model matches, else the one closest in image-tower width and depth
    (only a label: every architecture field is written out explicitly)."""
    for name, arch in MODEL_SIZES.items():
        if (arch.vision.width, arch.vision.layers, arch.text.width, arch.text.layers, arch.patch_size) == (
            arch_fields["vision_width"], arch_fields["vision_layers"], arch_fields["text_width"],
            arch_fields["text_layers"], arch_fields["patch_size"],
        ):
            return name
    return min(MODEL_SIZES, key=lambda n: (abs(MODEL_SIZES[n].vision.width - arch_fields["vision_width"]),
                                           abs(MODEL_SIZES[n].vision.layers - arch_fields["vision_layers"])))


def model_config_from_openclip(model_cfg: dict, extras: Optional[dict] = None) -> ModelConfig:
    """The flip_scale `ModelConfig` of an OpenCLIP model config; refuses what cannot be represented.

    `extras`: the `flip_scale` section our exporter writes beside `model_cfg` (name, mask_ratio,
    masking, logit_scale_max): restored when present, so a round trip gives the same config.
    """
    from ..data.tokenizer import EOS_ID

    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise ConvertError("an OpenCLIP model config needs embed_dim, vision_cfg and text_cfg")
    for key in model_cfg:
        if key not in _TOP_FREE:
            what = "a multimodal decoder (CoCa)" if key == "multimodal_cfg" else "an option flip_scale does not map"
            raise ConvertError(f"OpenCLIP model config key '{key}' ({what}) has no flip_scale equivalent")
    # The towers first: a timm or HF tower (SigLIP, EVA) is named before the flags that come with it.
    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    _check_section(vision, "vision_cfg", _VISION_MUST, _VISION_FREE)
    _check_section(text, "text_cfg", _TEXT_MUST, _TEXT_FREE)
    if model_cfg.get("quick_gelu") not in (None, False, True):
        raise ConvertError(f"OpenCLIP quick_gelu={model_cfg['quick_gelu']!r}: expected true or false")
    if model_cfg.get("custom_text"):
        raise ConvertError("OpenCLIP custom_text=true (a CustomTextCLIP text tower) has no flip_scale equivalent")
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise ConvertError("OpenCLIP vision_cfg.layers is a list (a ResNet image tower); flip_scale has a ViT only")
    eps_v, eps_t = _eps(vision, "vision_cfg"), _eps(text, "text_cfg")
    if eps_v != eps_t:
        raise ConvertError(f"OpenCLIP LayerNorm eps differs between towers (vision {eps_v}, text {eps_t}); "
                           f"flip_scale has one model.norm_eps")
    causal = not text.get("no_causal_mask", False)
    pool = text.get("pool_type", "argmax")
    if pool == "argmax":
        text_pool = "argmax"  # OpenCLIP's default: the position of the highest token id, causal or not
    elif pool == "first" and not causal:
        text_pool = "auto"
    elif pool == "eos" and causal and text.get("eos_id", 2) == EOS_ID:
        text_pool = "auto"  # the last non-padding token: the end-of-text of flip_scale's tokenizer
    else:
        raise ConvertError(
            f"OpenCLIP text_cfg.pool_type={pool} (no_causal_mask {not causal}, eos_id {text.get('eos_id', 2)}) has no "
            f"flip_scale equivalent; representable: pool_type argmax (causal or not), first with no_causal_mask: true, "
            f"eos with eos_id {EOS_ID} (flip_scale's end-of-text) and the causal mask"
        )
    width, text_width = int(vision.get("width", 768)), int(text.get("width", 512))
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise ConvertError(f"OpenCLIP vision_cfg.width={width} is not a multiple of head_width={head_width}")
    fields = dict(
        embed_dim=int(model_cfg["embed_dim"]),
        image_size=_square(vision.get("image_size", 224), "vision_cfg.image_size"),
        patch_size=_square(vision.get("patch_size", 16), "vision_cfg.patch_size"),
        vision_width=width, vision_layers=int(vision.get("layers", 12)), vision_heads=width // head_width,
        # OpenCLIP's rounding, int(width * mlp_ratio), written as the width itself (what model.vision_mlp_ratio
        # would give), so that a flip_scale model's round trip keeps its config
        vision_mlp_dim=int(width * float(vision.get("mlp_ratio", 4.0))),
        text_width=text_width, text_layers=int(text.get("layers", 12)), text_heads=int(text.get("heads", 8)),
        text_mlp_dim=int(text_width * float(text.get("mlp_ratio", 4.0))),
        vocab_size=int(text.get("vocab_size", 49408)), context_length=int(text.get("context_length", 77)),
    )
    extras = extras or {}
    name = extras.get("name") if extras.get("name") in MODEL_SIZES else _nearest_name(fields)
    patch_dropout = float(vision.get("patch_dropout", 0.0) or 0.0)
    mask_ratio = extras.get("mask_ratio", patch_dropout if patch_dropout > 0 else ModelConfig.mask_ratio)
    cfg = ModelConfig(
        name=name, mask_ratio=float(mask_ratio), masking=extras.get("masking", ModelConfig.masking),
        vision_pool="avg_patches" if vision.get("pool_type", "tok") == "avg" else "cls",
        text_pad_mask=False, text_causal=causal, text_pool=text_pool, norm_eps=eps_v,
        vision_pos_embed="learned" if vision.get("pos_embed_type", "learnable") == "learnable" else "sincos",
        vision_ln_pre=not vision.get("no_ln_pre", False), act="gelu" if not model_cfg.get("quick_gelu") else "quick_gelu",
        logit_scale_init=float(model_cfg.get("init_logit_scale", ModelConfig.logit_scale_init)),
        logit_scale_max=float(extras.get("logit_scale_max", ModelConfig.logit_scale_max)),
        logit_bias_init=(None if model_cfg.get("init_logit_bias") is None else float(model_cfg["init_logit_bias"])),
        **fields,
    )
    try:
        arch_from_config(cfg)
    except ValueError as error:
        raise ConvertError(f"the OpenCLIP config gives an invalid flip_scale model: {error}") from None
    return cfg


def read_openclip_config(path: Union[str, Path]) -> tuple[dict, dict, dict]:
    """(model_cfg, preprocess_cfg, flip_scale extras) of an OpenCLIP JSON: either the bare model
    config (embed_dim, vision_cfg, text_cfg) or the open_clip_config.json format with model_cfg."""
    path = Path(path)
    if path.is_dir():
        path = path / OPENCLIP_CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConvertError(f"{path}: cannot read an OpenCLIP config JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: an OpenCLIP config is a JSON object, got {type(data).__name__}")
    if "model_cfg" in data:
        return data["model_cfg"], data.get("preprocess_cfg") or {}, data.get("flip_scale") or {}
    return data, {}, {}


def named_openclip_config(name: str) -> tuple[dict, dict, dict]:
    """(model_cfg, preprocess_cfg, {}) of a model name the installed open_clip knows (`--openclip-model`),
    read through open_clip's own `get_model_config`."""
    try:
        import open_clip
    except ImportError:
        raise ConvertError(f"--openclip-model {name} needs the open_clip package (pip install \"flip_scale[openclip]\" "
                           f"or pip install open_clip_torch); or pass --config with the model config JSON") from None
    config = open_clip.get_model_config(name)
    if config is None:
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ConvertError(f"--openclip-model {name}: not a model the installed open_clip {open_clip.__version__} knows"
                           f"{'; close names: ' + ', '.join(close) if close else ''} (open_clip.list_models() lists them)")
    config = dict(config)
    preprocess = config.pop("preprocess_cfg", None) or {}
    return config.get("model_cfg", config), preprocess, {}
