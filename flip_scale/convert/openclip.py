"""flip_scale <-> OpenCLIP (open_clip 3.3 `CLIP`, the config format of `open_clip_config.json`).

What maps (checked against open_clip's model.py / transformer.py):

  flip_scale                          OpenCLIP
  visual.patch_embed (conv, no bias)  visual.conv1 (bias=False)
  visual.cls_token                    visual.class_embedding
  vision_pos_embed sincos: fixed      visual.positional_embedding: a frozen parameter (in the state
    buffer (not saved)                dict) of grid^2 + 1 rows, CLS row zero; pos_embed_type sin_cos_2d
  vision_pos_embed learned:           visual.positional_embedding (pos_embed_type learnable), row 0
    visual.pos_embed [1 + L, width]   on the CLS token, added before patch dropout (our masking)
  vision_ln_pre false / true          no_ln_pre true / false (visual.ln_pre)
  blocks.i.attn.qkv  [heads,(q,k,v),d] transformer.resblocks.i.attn.in_proj_* = cat(q, k, v) (biased)
  blocks.i.attn.proj                  ...attn.out_proj
  blocks.i.mlp.fc1 / fc2, model.act   ...mlp.c_fc / c_proj; act gelu: quick_gelu false, quick_gelu: true
  blocks.i.ln_1 / ln_2, eps           ...ln_1 / ln_2, norm_kwargs {eps} (absent: torch's 1e-5)
  vision_mlp_ratio / vision_mlp_dim   mlp_ratio (int(width * mlp_ratio) hidden units; bigG 8192)
  heads                               head_width = width / heads (text: heads)
  visual.ln_post, pool avg_patches    visual.ln_post then pool_type avg (mean of x[:, 1:]);
                      pool cls        pool_type tok (x[:, 0]); final_ln_after_pool false
  visual.proj.weight [embed, width]   visual.proj [width, embed] (x @ proj, no bias): transposed
  text.token_embedding, text.pos_embed token_embedding, positional_embedding [context_length, width]
  text non-causal, first-token pool   no_causal_mask: true, pool_type first
  text causal, text_pool argmax       the default CLIP text: causal attn_mask, pool_type argmax
  text.ln_final, text.proj.weight     ln_final, text_projection [width, embed] (no bias): transposed
  logit_scale (0-dim)                 logit_scale (0-dim; nonscalar_logit_scale false)
  logit_bias (loss.kind sigmoid)      logit_bias (0-dim; init_logit_bias in the config)

Not representable, refused by name: model.text_pad_mask (OpenCLIP's config never turns on the
text padding mask), model.vision_pool=avg_all (OpenCLIP averages patch tokens only), causal text
with text_pool auto (the last non-padding token) unless --text-eos-pool (pool_type eos with our
EOS id, equal for every sequence our tokenizer makes). From OpenCLIP: no image position embedding,
layer scale, attentional pooling, custom blocks (qk_norm, scaled cosine attention, ...),
final_ln_after_pool, timm / HF / custom text towers, a CLS token in the text tower, a projection
bias, and different LayerNorm eps in the two towers. OpenCLIP's logit_bias (SigLIP) maps to ours
(loss.kind sigmoid).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..config import Config, LossConfig, validate
from ..models import arch_from_config
from ..models.vit import sincos_2d_position_embedding
from ..checkpoint.consolidated import MODEL_FILE, TensorSpec, read_safetensors_header
from ..checkpoint.safety import ConvertError, safe_torch_load
from .checkpoints import expected_state, read_consolidated_tensors, write_config
from .openclip_config import (
    OPENCLIP_CONFIG_FILE, OPENCLIP_MEAN, OPENCLIP_STD, model_config_from_openclip, named_openclip_config,
    openclip_model_config, read_openclip_config,
)
from .safetensors_io import write_safetensors

OPENCLIP_MODEL_FILE = "open_clip_model.safetensors"
OPENCLIP_BIN_FILE = "open_clip_pytorch_model.bin"
POS_EMBED_KEY = "visual.positional_embedding"
log = logging.getLogger("flip_scale.convert")


# ----------------------------------------------------------------------------- tensor mapping


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _qkv_to_openclip(heads: int) -> Callable:
    # ours: output rows [heads, (q, k, v), head_dim]; OpenCLIP's in_proj: [(q, k, v), heads, head_dim].
    def convert(t: torch.Tensor) -> torch.Tensor:
        rest = tuple(t.shape[1:])
        return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()

    return convert


def _qkv_to_flip(heads: int) -> Callable:
    def convert(t: torch.Tensor) -> torch.Tensor:
        rest = tuple(t.shape[1:])
        return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()

    return convert


@dataclass(frozen=True)
class KeyPair:
    flip: Optional[str]  # None: computed (the fixed sin-cos table, not in flip_scale's state)
    openclip: str
    to_openclip: Callable = _identity
    to_flip: Callable = _identity


def _block_pairs(flip_prefix: str, oc_prefix: str, heads: int) -> list:
    pairs = [
        KeyPair(f"{flip_prefix}.ln_1.weight", f"{oc_prefix}.ln_1.weight"),
        KeyPair(f"{flip_prefix}.ln_1.bias", f"{oc_prefix}.ln_1.bias"),
        KeyPair(f"{flip_prefix}.attn.qkv.weight", f"{oc_prefix}.attn.in_proj_weight", _qkv_to_openclip(heads), _qkv_to_flip(heads)),
        KeyPair(f"{flip_prefix}.attn.qkv.bias", f"{oc_prefix}.attn.in_proj_bias", _qkv_to_openclip(heads), _qkv_to_flip(heads)),
    ]
    for flip_name, oc_name in (("attn.proj", "attn.out_proj"), ("ln_2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        for leaf in ("weight", "bias"):
            pairs.append(KeyPair(f"{flip_prefix}.{flip_name}.{leaf}", f"{oc_prefix}.{oc_name}.{leaf}"))
    return pairs


def key_pairs(arch, model_cfg=None) -> list:
    """Every tensor of the OpenCLIP state dict with the flip_scale tensor it comes from
    (`model_cfg` None: FLIP's defaults, a fixed sin-cos table, no ln_pre and no logit bias)."""
    learned = model_cfg is not None and model_cfg.vision_pos_embed == "learned"
    logit_bias = model_cfg is not None and getattr(model_cfg, "logit_bias_init", None) is not None
    pairs = [
        KeyPair("visual.cls_token", "visual.class_embedding"),
        KeyPair("visual.pos_embed" if learned else None, POS_EMBED_KEY),
        KeyPair("visual.patch_embed.weight", "visual.conv1.weight"),
    ]
    if model_cfg is not None and model_cfg.vision_ln_pre:
        pairs += [KeyPair(f"visual.ln_pre.{leaf}", f"visual.ln_pre.{leaf}") for leaf in ("weight", "bias")]
    for i in range(arch.vision.layers):
        pairs += _block_pairs(f"visual.blocks.{i}", f"visual.transformer.resblocks.{i}", arch.vision.heads)
    pairs += [
        KeyPair("visual.ln_post.weight", "visual.ln_post.weight"),
        KeyPair("visual.ln_post.bias", "visual.ln_post.bias"),
        KeyPair("visual.proj.weight", "visual.proj", _transpose, _transpose),
        KeyPair("text.pos_embed", "positional_embedding"),
        KeyPair("text.token_embedding.weight", "token_embedding.weight"),
    ]
    for i in range(arch.text.layers):
        pairs += _block_pairs(f"text.blocks.{i}", f"transformer.resblocks.{i}", arch.text.heads)
    pairs += [
        KeyPair("text.ln_final.weight", "ln_final.weight"),
        KeyPair("text.ln_final.bias", "ln_final.bias"),
        KeyPair("text.proj.weight", "text_projection", _transpose, _transpose),
        KeyPair("logit_scale", "logit_scale"),
    ]
    if logit_bias:
        pairs.append(KeyPair("logit_bias", "logit_bias"))
    return pairs


def openclip_position_table(arch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """OpenCLIP's `visual.positional_embedding` for sin_cos_2d: a zero CLS row, then our table."""
    table = torch.from_numpy(sincos_2d_position_embedding(arch.vision.width, arch.grid_size)).to(torch.float32)
    return torch.cat([torch.zeros(1, arch.vision.width), table]).to(dtype)


# ----------------------------------------------------------------------------- state files


class _StateSource:
    """Tensors of a state file by name: safetensors read lazily, .pt/.bin loaded with weights_only=True."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path} does not exist (expected a .safetensors, .bin or .pt state dict)")
        self._handle = None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            specs = read_safetensors_header(self.path)[1]
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        else:
            state = safe_torch_load(self.path)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]  # an OpenCLIP training checkpoint
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ConvertError(f"{self.path} is not a dict of tensors (a state dict)")
            if state and all(k.startswith("module.") for k in state):
                state = {k[len("module."):]: v for k, v in state.items()}
            self._state = state
            specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
        self.specs = {spec.name: spec for spec in specs}

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name) if self._handle is not None else self._state[name]


# ----------------------------------------------------------------------------- to / from OpenCLIP


def log_ema_dropped(command: str, found: dict) -> None:
    """Say that the attentive masking's EMA image tower (model.masking=attentive) is not exported."""
    ema = [name for name in found if name.startswith("ema_visual.")]
    if ema:  # training only: it chooses the patches the online tower keeps; the export is the online tower
        log.info("%s: EMA image tower dropped (%d tensors, %s parameters): it scores the patches of "
                 "model.masking=attentive in training only; the online image tower is exported", command, len(ema),
                 f"{sum(found[n].numel for n in ema):,}")


def to_openclip(consolidated: Union[str, Path], out_dir: Union[str, Path], text_eos_pool: bool = False,
                fmt: str = "safetensors") -> dict:
    """A consolidated directory -> `out_dir/open_clip_model.safetensors` (or `.bin`) +
    `out_dir/open_clip_config.json`, loadable with `open_clip.create_model('local-dir:' + out_dir)`."""
    from safetensors import safe_open

    if fmt not in ("safetensors", "bin"):
        raise ConvertError(f"--format {fmt}: valid values are safetensors, bin")
    cfg, file, header, found = read_consolidated_tensors(consolidated)
    model_cfg = openclip_model_config(cfg.model, text_eos_pool)  # refuses what OpenCLIP cannot represent
    arch = arch_from_config(cfg.model)
    decoder = [name for name in found if name.startswith("decoder.")]
    if decoder:  # training only (loss.mae_weight); OpenCLIP's model has no place for it
        log.info("to-openclip: MAE decoder dropped (%d tensors, %s parameters): it serves the reconstruction loss "
                 "in training only", len(decoder), f"{sum(found[n].numel for n in decoder):,}")
    log_ema_dropped("to-openclip", found)
    pairs = key_pairs(arch, cfg.model)
    # The fixed table stays float32 even in a bf16 export: it is not a trained weight, and rounding
    # it would move the embeddings away from flip_scale's (which adds the float32 buffer).
    pos_dtype = torch.float32
    out_specs = []
    for pair in pairs:
        if pair.flip is None:
            out_specs.append(TensorSpec(pair.openclip, (arch.num_patches + 1, arch.vision.width), pos_dtype))
        else:
            source = found[pair.flip]
            shape = tuple(pair.to_openclip(torch.empty(source.shape, device="meta")).shape)
            out_specs.append(TensorSpec(pair.openclip, shape, source.dtype))
    by_name = {p.openclip: p for p in pairs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        def produce(spec: TensorSpec) -> torch.Tensor:
            pair = by_name[spec.name]
            if pair.flip is None:
                return openclip_position_table(arch, spec.dtype)
            return pair.to_openclip(handle.get_tensor(pair.flip))

        metadata = {"format": "pt", "producer": "flip_scale.convert", "step": header.get("step", "unknown"),
                    "source": str(file.resolve())}
        if fmt == "safetensors":
            weights = out_dir / OPENCLIP_MODEL_FILE
            write_safetensors(weights, out_specs, produce, metadata)
        else:
            weights = out_dir / OPENCLIP_BIN_FILE
            torch.save({spec.name: produce(spec) for spec in out_specs}, weights)
    document = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": arch.image_size, "mode": "RGB", "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        # Ignored by open_clip; read back by from-openclip so that a round trip restores these.
        "flip_scale": {
            "name": cfg.model.name, "mask_ratio": cfg.model.mask_ratio, "masking": cfg.model.masking,
            "logit_scale_max": cfg.model.logit_scale_max, "step": header.get("step"), "source": str(file.resolve()),
            "tokenizer": cfg.data.tokenizer,
            "note": tokenizer_note(cfg.data.tokenizer),
        },
    }
    (out_dir / OPENCLIP_CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return {"out": str(out_dir), "weights": str(weights), "config": str(out_dir / OPENCLIP_CONFIG_FILE),
            "tensors": len(out_specs), "model_cfg": model_cfg, "note": document["flip_scale"]["note"]}


def tokenizer_note(tokenizer: str) -> str:
    """What an OpenCLIP user must tokenise with: open_clip's own BPE for `data.tokenizer: openclip`
    (or `openclip:NAME`), else flip_scale's sentencepiece model."""
    if tokenizer == "openclip" or tokenizer.startswith("openclip:"):
        name = tokenizer.partition(":")[2]
        return (f"text tokens come from open_clip's tokenizer (open_clip.get_tokenizer({name!r}))" if name else
                "text tokens come from open_clip's default CLIP BPE tokenizer (open_clip.tokenize)")
    return (f"text tokens come from flip_scale's sentencepiece tokenizer {tokenizer} (pad 0, bos 2, eos 3), "
            "not open_clip's default tokenizer")


def from_openclip(state_path: Union[str, Path], config_path: Optional[Union[str, Path]], out_dir: Union[str, Path],
                  mask_ratio: Optional[float] = None, dtype: str = "keep", openclip_model: Optional[str] = None) -> dict:
    """An OpenCLIP state dict + model config (a JSON file, or `openclip_model`: a name the installed
    open_clip knows) -> a flip_scale consolidated directory (model.safetensors + flip_config.yaml)
    that `load_consolidated` / `--init-from` accept."""
    dtypes = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ConvertError(f"--dtype {dtype}: valid values are {', '.join(dtypes)}")
    if (config_path is None) == (openclip_model is None):
        raise ConvertError("give the OpenCLIP model config as one of --config JSON or --openclip-model NAME")
    if openclip_model is not None:
        oc_cfg, preprocess, extras = named_openclip_config(openclip_model)
    else:
        oc_cfg, preprocess, extras = read_openclip_config(config_path)
    model_cfg = model_config_from_openclip(oc_cfg, extras)
    # Provenance, read by the unmask planner: the mask ratio these weights were trained with.
    # OpenCLIP's family trains on whole images unless patch_dropout is set; a model flip_scale
    # exported says its own.
    patch_dropout = float(oc_cfg.get("vision_cfg", {}).get("patch_dropout", 0.0) or 0.0)
    pretraining_mask_ratio = float(extras.get("mask_ratio", patch_dropout))
    provenance = "flip_scale (through OpenCLIP)" if extras else "open_clip"
    if mask_ratio is not None:
        model_cfg = dataclasses.replace(model_cfg, mask_ratio=float(mask_ratio))
    # An OpenCLIP model with a logit bias (SigLIP) was trained with the sigmoid loss.
    cfg = Config(model=model_cfg, loss=LossConfig(kind="sigmoid" if model_cfg.logit_bias_init is not None else "contrastive"))
    if not (preprocess.get("mean") and preprocess.get("std")) and not extras:
        preprocess = dict(preprocess, mean=OPENCLIP_MEAN, std=OPENCLIP_STD)  # what open_clip normalises with
    if preprocess.get("mean") and preprocess.get("std"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=list(preprocess["mean"]), std=list(preprocess["std"])))
    validate(cfg)
    arch = arch_from_config(model_cfg)
    source = _StateSource(state_path)
    pairs = key_pairs(arch, model_cfg)
    expected_oc = {p.openclip for p in pairs}
    unexpected = [n for n in source.specs if n not in expected_oc]
    if unexpected:
        hints = {"logit_bias": "a SigLIP-style logit bias the config has no init_logit_bias for",
                 "visual.ln_pre.weight": "a LayerNorm before the blocks (ln_pre)"}
        named = [f"{n} ({hints[n]})" if n in hints else n for n in unexpected[:8]]
        raise ConvertError(f"{state_path} has {len(unexpected)} tensors with no flip_scale equivalent: {', '.join(named)}"
                           f"{' ...' if len(unexpected) > 8 else ''}")
    missing = [p.openclip for p in pairs if p.openclip not in source.specs]
    if missing:
        raise ConvertError(f"{state_path} lacks {len(missing)} tensors the config implies: {', '.join(missing[:8])}")
    flip_shapes = expected_state(cfg)
    for pair in pairs:
        shape = tuple(source.specs[pair.openclip].shape)
        if pair.openclip in ("logit_scale", "logit_bias") and shape in ((), (1,)):
            continue
        want = ((arch.num_patches + 1, arch.vision.width) if pair.flip is None
                else tuple(pair.to_openclip(torch.empty(flip_shapes[pair.flip], device="meta")).shape))
        if shape != want:
            raise ConvertError(f"{state_path}: {pair.openclip} has shape {shape}, the config implies {want}")
    positions = source.get(POS_EMBED_KEY)
    table = openclip_position_table(arch, torch.float32)
    tolerance = 1e-6 if positions.dtype in (torch.float32, torch.float64) else 1e-2
    difference = (positions.float() - table).abs().max().item()
    if model_cfg.vision_pos_embed == "sincos" and difference > tolerance:
        raise ConvertError(
            f"{state_path}: {POS_EMBED_KEY} is not the fixed 2-D sin-cos table with a zero CLS row (max difference "
            f"{difference:.3g}), as its config's pos_embed_type sin_cos_2d says"
        )
    by_flip = {p.flip: p for p in pairs if p.flip is not None}
    specs = []
    for name, shape in flip_shapes.items():
        pair = by_flip[name]
        source_dtype = source.specs[pair.openclip].dtype
        target = (dtypes[dtype] or source_dtype) if source_dtype.is_floating_point else source_dtype
        specs.append(TensorSpec(name, shape, target))

    def produce(spec: TensorSpec) -> torch.Tensor:
        pair = by_flip[spec.name]
        tensor = pair.to_flip(source.get(pair.openclip))
        if spec.name in ("logit_scale", "logit_bias"):
            tensor = tensor.reshape(())
        return tensor.to(spec.dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "producer": "flip_scale.convert", "kind": "flip_scale_consolidated", "step": 0,
                "source": str(Path(state_path).resolve()), "source_format": "open_clip",
                "source_layout": "open_clip", "source_world_size": 1, "provenance": provenance,
                "pretraining_mask_ratio": repr(pretraining_mask_ratio)}
    write_safetensors(out_dir / MODEL_FILE, specs, produce, metadata)
    write_config(cfg, out_dir, f"flip_scale model converted from OpenCLIP weights {Path(state_path).resolve()} "
                               f"({provenance}; pre-trained at mask ratio {pretraining_mask_ratio:g})")
    return {"out": str(out_dir), "tensors": len(specs), "params": sum(s.numel for s in specs),
            "model": dataclasses.asdict(model_cfg), "provenance": provenance,
            "pretraining_mask_ratio": pretraining_mask_ratio}
