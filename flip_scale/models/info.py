"""`python tools/model_info.py`: parameters, FLOPs and visible tokens of a recipe's model.

The model is built on the meta device, so even G/14 costs no memory and under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..config import ConfigError, load_config
from .flip import build_model, count_parameters
from .flops import decoder_flops_per_sample, ema_flops_per_sample, flops_per_sample

EXAMPLES = """\
examples:
  python tools/model_info.py --config configs/flip_l16.yaml
  python tools/model_info.py --config configs/flip_l16.yaml model.mask_ratio=0.75 --json
  python tools/model_info.py --config configs/flip_l16.yaml model.text_mask_ratio=0.5 model.text_masking=prioritized
  python tools/model_info.py            # configs/tiny.yaml
"""


def model_info(model_cfg, mae_weight: float = 0.0) -> dict:
    """The numbers `model_info` prints, for a `ModelConfig` (and `loss.mae_weight`: > 0 adds MAE's decoder)."""
    model = build_model(model_cfg, device="meta", mae_decoder=mae_weight > 0)
    arch = model.arch
    params = count_parameters(model)
    text_ratio = model_cfg.text_mask_ratio
    masked = flops_per_sample(arch, model_cfg.mask_ratio, text_mask_ratio=text_ratio)
    unmasked = flops_per_sample(arch, 0.0)
    text_unmasked = flops_per_sample(arch, model_cfg.mask_ratio)["text"]
    decoder = {}
    if mae_weight > 0:  # MAE's decoder: training only (evaluation never runs it)
        decoder = {"decoder": f"{model_cfg.decoder_layers} x {model_cfg.decoder_width} x {model_cfg.decoder_heads}",
                   "gflops_fwd_decoder": decoder_flops_per_sample(model_cfg) / 1e9}
    ema = {}
    if model_cfg.masking == "attentive":  # the EMA tower's unmasked forward: training only, no backward
        ema = {"masking": "attentive", "attentive_keep_fraction": model_cfg.attentive_keep_fraction,
               "ema_decay": model_cfg.ema_decay, "gflops_fwd_ema": ema_flops_per_sample(model_cfg) / 1e9}
    return {
        "model": model_cfg.name,
        "mask_ratio": model_cfg.mask_ratio,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "num_patches": arch.num_patches,
        "visible_tokens": masked["visible_tokens"],
        "visible_tokens_with_cls": masked["visible_tokens"] + 1,
        "context_length": arch.context_length,
        "vision_mlp_dim": arch.vision.mlp_dim,
        # The OpenCLIP-family switches (learned positions and ln_pre are in the parameter count; their
        # additions and norms, like every LayerNorm, are not counted as FLOPs).
        "vision_pos_embed": model_cfg.vision_pos_embed,
        "vision_ln_pre": model_cfg.vision_ln_pre,
        "act": model_cfg.act,
        "text_mask_ratio": text_ratio,
        "text_masking": model_cfg.text_masking,
        "text_tokens": masked["text_tokens"],
        **params,
        # Per sample, at the configured mask ratio (training forward); `_unmasked` is evaluation's.
        "gflops_fwd": masked["total"] / 1e9,
        "gflops_fwd_vision": masked["vision"] / 1e9,
        "gflops_fwd_text": masked["text"] / 1e9,
        # The text tower's forward saved by text masking (0 without it).
        "gflops_fwd_text_saved": (text_unmasked - masked["text"]) / 1e9,
        "gflops_fwd_unmasked": unmasked["total"] / 1e9,
        "gflops_train": (flops_per_sample(arch, model_cfg.mask_ratio, training=True, text_mask_ratio=text_ratio)["total"]
                         + 3 * decoder.get("gflops_fwd_decoder", 0.0) * 1e9) / 1e9 + ema.get("gflops_fwd_ema", 0.0),
        **decoder,
        **ema,
    }


def _format(info: dict) -> str:
    def millions(n: int) -> str:
        return f"{n:,} ({n / 1e6:.1f}M)"

    def giga(x: float) -> str:
        return f"{x:.2f}" if x >= 1 else f"{x:.4f}"

    lines = [
        f"model            {info['model']}",
        f"image            {info['image_size']} px, patch {info['patch_size']}, {info['num_patches']} patches",
        f"mask_ratio       {info['mask_ratio']}",
        f"visible_tokens   {info['visible_tokens']} patches ({info['visible_tokens_with_cls']} with CLS)",
        f"context_length   {info['context_length']}",
        f"options          vision_pos_embed {info['vision_pos_embed']}, vision_ln_pre {info['vision_ln_pre']}, "
        f"act {info['act']}, vision MLP {info['vision_mlp_dim']}",
        f"text masking     {info['text_mask_ratio']} ({info['text_masking']}): {info['text_tokens']} text tokens, "
        f"{giga(info['gflops_fwd_text_saved'])} GFLOPs of the text forward saved",
        f"params_vision    {millions(info['params_vision'])}",
        f"params_text      {millions(info['params_text'])}",
        f"params_total     {millions(info['params_total'])}",
        f"gflops_fwd       {giga(info['gflops_fwd'])} per sample (vision {giga(info['gflops_fwd_vision'])}, "
        f"text {giga(info['gflops_fwd_text'])}); unmasked {giga(info['gflops_fwd_unmasked'])}",
        f"gflops_train     {giga(info['gflops_train'])} per sample (3x forward, for MFU)",
    ]
    if "params_decoder" in info:
        lines[8:8] = [f"params_decoder   {millions(info['params_decoder'])} (MAE decoder {info['decoder']}, training only)"]
        lines.append(f"gflops_decoder   {giga(info['gflops_fwd_decoder'])} per sample forward (training only; "
                     f"in gflops_train)")
    if "params_ema" in info:
        lines.insert(8, f"params_ema       {millions(info['params_ema'])} (EMA image tower of model.masking=attentive, "
                        f"frozen, training only)")
        lines.append(f"gflops_ema       {giga(info['gflops_fwd_ema'])} per sample (the EMA tower's unmasked forward, no "
                     f"backward; keep_fraction {info['attentive_keep_fraction']}, decay {info['ema_decay']}; in gflops_train)")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="model_info",
        description="Print parameter counts, forward GFLOPs per sample and visible tokens of a recipe's "
        "FLIP model (built on the meta device: no memory is allocated).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="recipe YAML (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. model.mask_ratio=0.75")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    # Intermixed: `--json` may sit between or after the overrides.
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        info = model_info(cfg.model, cfg.loss.mae_weight)
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
    print(json.dumps(info) if args.json else _format(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
