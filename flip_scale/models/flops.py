"""FLOPs of a FLIP model: an analytic count and a measurement with torch's flop counter.

Conventions (those of `torch.utils.flop_counter`): a multiply-add is 2 FLOPs and only matrix
products are counted (convolution, linear layers, the two attention matmuls). LayerNorm, GELU,
softmax, bias additions and pooling are left out; they are a fraction of a percent at every size.

The image tower embeds only the visible patches (their pixels are gathered before the patch
projection), and only `1 + visible` tokens (CLS + kept patches) enter the blocks; that is where the
paper's 0.52x (50% mask) and 0.28x (75% mask) of the unmasked forward FLOPs for ViT-L/16 come from.
The text tower sees `context_length` tokens, or `int(T * (1 - text_mask_ratio))` under text masking
(the removed tokens never enter it either).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .masking import visible_count
from .registry import FlipArch, TowerArch, arch_from_config

# Forward + backward: the backward of a matmul costs two matmuls of the same size (gradient of the
# input and of the weight), so a training step is ~3x the forward FLOPs (the usual MFU convention).
TRAIN_FLOPS_FACTOR = 3


def _block_flops(tower: TowerArch, tokens: int) -> int:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens (one sample)."""
    width, mlp_dim = tower.width, tower.mlp_dim
    qkv = 2 * tokens * width * 3 * width
    # Q K^T and attn @ V: per head tokens x tokens x head_dim each; summed over heads = width.
    attention = 2 * (2 * tokens * tokens * width)
    out_proj = 2 * tokens * width * width
    mlp = 2 * (2 * tokens * width * mlp_dim)
    return qkv + attention + out_proj + mlp


def flops_per_sample(arch: FlipArch, mask_ratio: float, training: bool = False, text_mask_ratio: float = 0.0) -> dict:
    """Analytic FLOPs of one sample through both towers at `mask_ratio` (and `text_mask_ratio`).

    -> {"vision", "text", "total", "visible_tokens", "text_tokens"}: FLOPs as ints; `visible_tokens`
    is the number of patches kept (CLS not included), `text_tokens` the text tokens kept.
    `training=True` gives a training step's FLOPs (3x the forward) for MFU; the forward of
    evaluation is `flops_per_sample(arch, 0.0)`.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 0.0 <= text_mask_ratio < 1.0:
        raise ValueError(f"text_mask_ratio must be in [0, 1), got {text_mask_ratio}")
    text_tokens = visible_count(arch.context_length, text_mask_ratio) if text_mask_ratio > 0 else arch.context_length
    num_patches = arch.num_patches
    visible = visible_count(num_patches, mask_ratio)
    width = arch.vision.width

    patch_embed = 2 * visible * width * 3 * arch.patch_size**2
    vision = (
        patch_embed
        + arch.vision.layers * _block_flops(arch.vision, 1 + visible)
        + 2 * width * arch.embed_dim  # projection of the pooled token
    )
    text = arch.text.layers * _block_flops(arch.text, text_tokens) + 2 * arch.text.width * arch.embed_dim
    factor = TRAIN_FLOPS_FACTOR if training else 1
    return {
        "vision": factor * vision,
        "text": factor * text,
        "total": factor * (vision + text),
        "visible_tokens": visible,
        "text_tokens": text_tokens,
    }


def flops_for_config(model_cfg, mask_ratio: Optional[float] = None, training: bool = False) -> dict:
    """`flops_per_sample` for a `ModelConfig` (its own `mask_ratio` unless one is given, its own
    `text_mask_ratio` when training)."""
    ratio = model_cfg.mask_ratio if mask_ratio is None else mask_ratio
    text_ratio = getattr(model_cfg, "text_mask_ratio", 0.0) if (training or mask_ratio is None) else 0.0
    return flops_per_sample(arch_from_config(model_cfg), ratio, training=training, text_mask_ratio=text_ratio)


def decoder_flops_per_sample(model_cfg, training: bool = False) -> int:
    """FLOPs of MAE's decoder (loss.mae_weight > 0; models/decoder.py) for one sample: the embedding
    of the 1 + visible encoder tokens, `decoder_layers` blocks over 1 + L tokens (every patch, mask
    tokens included), the pixel prediction of every token. `training`: forward + backward."""
    arch = arch_from_config(model_cfg)
    visible = visible_count(arch.num_patches, model_cfg.mask_ratio)
    width, tokens = model_cfg.decoder_width, 1 + arch.num_patches
    tower = TowerArch(width=width, layers=model_cfg.decoder_layers, heads=model_cfg.decoder_heads, mlp_dim=4 * width)
    flops = (2 * (1 + visible) * arch.vision.width * width + model_cfg.decoder_layers * _block_flops(tower, tokens)
             + 2 * tokens * width * 3 * arch.patch_size**2)
    return (TRAIN_FLOPS_FACTOR if training else 1) * flops


def ema_flops_per_sample(model_cfg) -> int:
    """FLOPs of the attentive masking's EMA image tower (model.masking=attentive; models/ema.py) for
    one training sample: one unmasked image-tower forward, no backward (its scores need no
    gradient). Counted as the whole tower's forward, although its last block stops at the CLS
    attention (the difference is well under one block). 0 with random masking or mask ratio 0
    (nothing is scored)."""
    if getattr(model_cfg, "masking", "random") != "attentive" or model_cfg.mask_ratio <= 0:
        return 0
    return flops_per_sample(arch_from_config(model_cfg), 0.0)["vision"]


def train_flops_per_sample(model_cfg, mae_decoder: bool = False) -> int:
    """FLOPs of one training sample (forward + backward) at the configured mask ratio, for MFU;
    `mae_decoder` (a run's `loss.mae_weight > 0`) adds the decoder's, model.masking=attentive the
    EMA tower's forward."""
    decoder = decoder_flops_per_sample(model_cfg, training=True) if mae_decoder else 0
    return flops_for_config(model_cfg, training=True)["total"] + decoder + ema_flops_per_sample(model_cfg)


def model_flops_utilization(samples_per_second: float, train_flops_per_sample: float, peak_flops_per_second: float) -> float:
    """MFU: achieved model FLOPs per second over the hardware's peak (both for the same devices)."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak_flops_per_second must be > 0, got {peak_flops_per_second}")
    return samples_per_second * train_flops_per_sample / peak_flops_per_second


def measure_forward_flops(
    model: nn.Module,
    images: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor],
    mask_noise: Optional[torch.Tensor] = None,
) -> int:
    """FLOPs of one `model(images, tokens, mask_noise)` forward over the whole batch, as counted by
    `torch.utils.flop_counter.FlopCounterMode`. The model's train/eval mode decides the masking.

    Works on the meta device (model built with `build_model(cfg, device="meta")`, meta inputs),
    which costs no memory and well under a second even for G/14.
    """
    # On CPU, scaled_dot_product_attention dispatches to `_scaled_dot_product_flash_attention_for_cpu`,
    # which the flop counter has no formula for: it would count the attention matmuls as 0 FLOPs.
    # Forcing the math backend decomposes attention into bmm ops, which are counted (on the meta
    # device the math path is taken anyway). Only the count changes, not the numbers.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, tokens, mask_noise)
    return int(counter.get_total_flops())
