"""The FLIP model: image tower + text tower + learnable temperature (+ a logit bias for the sigmoid loss)."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .masking import split_mask_noise
from .registry import FlipArch, arch_from_config
from .text import TextTower
from .vit import VisionTower


class FLIPModel(nn.Module):
    def __init__(
        self,
        arch: FlipArch,
        mask_ratio: float = 0.5,
        masking: str = "random",
        vision_pool: str = "avg_patches",
        text_pad_mask: bool = False,
        text_causal: bool = False,
        norm_eps: float = 1e-6,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100.0),
        temperature_shape: tuple = (),
        vision_pos_embed: str = "sincos",
        vision_ln_pre: bool = False,
        act: str = "gelu",
        text_pool: str = "auto",
        logit_bias_init: Optional[float] = None,
        text_mask_ratio: float = 0.0,
        text_masking: str = "random",
        decoder: Optional[dict] = None,
        keep_fraction: float = 0.5,
    ):
        super().__init__()
        self.arch = arch
        self.logit_scale_init = logit_scale_init
        self.logit_scale_max = logit_scale_max
        self.visual = VisionTower(arch, mask_ratio, masking, vision_pool, norm_eps, vision_pos_embed, vision_ln_pre, act,
                                  keep_fraction)
        # model.masking=attentive: an EMA copy of the image tower (never masked, never trained: its
        # parameters are frozen by models/lock.py and moved by models/ema.py after every step) whose
        # last block's CLS attention chooses the patches the online tower keeps. Else no module.
        self.ema_visual = None
        if masking == "attentive":
            self.ema_visual = VisionTower(arch, 0.0, "random", vision_pool, norm_eps, vision_pos_embed, vision_ln_pre, act)
        self.text = TextTower(arch, text_pad_mask, text_causal, norm_eps, act, text_pool, text_mask_ratio, text_masking)
        # A 0-dim parameter, as OpenCLIP's; the DeepSpeed engine builds it with shape (1,) (DeepSpeed
        # broadcasts parameters through a uint8 view, which a 0-dim tensor cannot take), and its
        # checkpoints are reshaped to () wherever they are read.
        self.logit_scale = nn.Parameter(torch.zeros(tuple(temperature_shape)))
        # SigLIP's learnable logit bias (loss.kind sigmoid only), shaped and handled as the temperature.
        self.logit_bias_init = logit_bias_init
        if logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.zeros(tuple(temperature_shape)))
        else:
            self.logit_bias = None
        # MAE's decoder (loss.mae_weight > 0; `decoder`: width, layers, heads), else no module at all.
        self.decoder = None
        if decoder is not None:
            from .decoder import MAEDecoder

            self.decoder = MAEDecoder(arch.vision.width, patch_size=arch.patch_size, grid_size=arch.grid_size,
                                      norm_eps=norm_eps, **decoder)

    @property
    def mask_ratio(self) -> float:
        return self.visual.mask_ratio

    @mask_ratio.setter
    def mask_ratio(self, value: float) -> None:
        self.visual.mask_ratio = value

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initial weights: a function of (seed, parameter name) alone (see models/init.py);
        `seed` defaults to the seed of torch's global generator (`torch.manual_seed`)."""
        from .init import initialize_parameters

        from .ema import reset_ema_

        self.visual.init_weights()  # the fixed sin-cos table (a buffer; none if learned)
        if self.ema_visual is not None:
            self.ema_visual.init_weights()
        if self.decoder is not None:
            self.decoder.init_weights()
        initialize_parameters(self, torch.initial_seed() if seed is None else seed, self.logit_scale_init,
                              self.logit_bias_init)
        reset_ema_(self)  # the EMA tower starts as the online one

    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, log 100]; called after every optimizer step."""
        clamp_logit_scale_(self)

    def _frozen(self, tower: nn.Module):
        """No autograd graph (no activations kept) for a tower whose every parameter is frozen."""
        frozen = all(not p.requires_grad for p in tower.parameters())
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def patch_scores(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """The attentive masking's patch scores [B, L] (the EMA tower, unmasked, no autograd), or None
        where nothing is scored: no EMA tower, evaluation, or mask ratio 0."""
        if self.ema_visual is None or not self.training or self.visual.mask_ratio <= 0:
            return None
        with torch.no_grad():
            return self.ema_visual(images, cls_attention=True)

    def encode_image(self, images: torch.Tensor, mask_noise: Optional[torch.Tensor] = None, normalize: bool = True):
        with self._frozen(self.visual):
            features = self.visual(images, mask_noise, patch_scores=self.patch_scores(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, mask_noise: Optional[torch.Tensor] = None):
        with self._frozen(self.text):
            features = self.text(tokens, mask_noise=mask_noise)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor], mask_noise: Optional[torch.Tensor] = None,
                reconstruct: Optional[bool] = None):
        """-> (image features, text features, log temperature); features L2-normalised [B, embed_dim].

        Either input may be None (its features are then None): evaluation embeds images and class
        prompts separately, through forward, so that a sharded model gathers its weights. The
        temperature is returned from inside forward for the same reason. With a logit bias (the
        sigmoid loss) the third output is [log temperature, bias], shape (2,) (see loss_parameters).
        `mask_noise`: one row per sample, the image patches' columns, then (text masking) the text
        tokens' (`sample_mask_noise`).

        With a decoder, in training mode (or `reconstruct=True`), a fourth output: the MAE
        reconstruction loss of this batch's removed patches (a scalar, the mean over its samples);
        `reconstruct=False` skips the decoder (the feature cache's first pass).
        """
        if reconstruct is None:
            reconstruct = self.decoder is not None and self.training
        image_noise, text_noise = split_mask_noise(mask_noise, self.arch.num_patches, self.arch.context_length)
        if reconstruct and images is not None:
            with self._frozen(self.visual):
                features, visible_tokens, ids_keep = self.visual(images, image_noise, return_tokens=True,
                                                                 patch_scores=self.patch_scores(images))
            if ids_keep is None:
                raise ValueError("the MAE reconstruction loss needs removed patches: model.mask_ratio is 0 "
                                 "(or the model is in eval mode)")
            image_features = F.normalize(features, dim=-1)
            text_features = self.encode_text(tokens, mask_noise=text_noise) if tokens is not None else None
            return (image_features, text_features, loss_parameters(self.logit_scale, self.logit_bias),
                    self.decoder(visible_tokens, ids_keep, images))
        image_features = self.encode_image(images, image_noise) if images is not None else None
        text_features = self.encode_text(tokens, mask_noise=text_noise) if tokens is not None else None
        return image_features, text_features, loss_parameters(self.logit_scale, self.logit_bias)


def build_model(model_cfg, device: str | torch.device = "cpu", init: bool = True,
                temperature_shape: tuple = (), mae_decoder: bool = False) -> FLIPModel:
    """Build the model of a `ModelConfig`. On `device="meta"` nothing is allocated or initialised.
    `temperature_shape`: () (every engine's checkpoints) or (1,) (the DeepSpeed engine's live model).
    `mae_decoder`: add MAE's decoder (`model.decoder_*`; a run's is `cfg.loss.mae_weight > 0`)."""
    arch = arch_from_config(model_cfg)
    with torch.device(device):
        model = FLIPModel(
            arch,
            mask_ratio=model_cfg.mask_ratio,
            masking=model_cfg.masking,
            vision_pool=model_cfg.vision_pool,
            text_pad_mask=model_cfg.text_pad_mask,
            text_causal=model_cfg.text_causal,
            norm_eps=model_cfg.norm_eps,
            logit_scale_init=model_cfg.logit_scale_init,
            logit_scale_max=model_cfg.logit_scale_max,
            temperature_shape=temperature_shape,
            vision_pos_embed=model_cfg.vision_pos_embed,
            vision_ln_pre=model_cfg.vision_ln_pre,
            act=model_cfg.act,
            text_pool=model_cfg.text_pool,
            logit_bias_init=getattr(model_cfg, "logit_bias_init", None),
            text_mask_ratio=model_cfg.text_mask_ratio,
            text_masking=model_cfg.text_masking,
            decoder=dict(width=model_cfg.decoder_width, layers=model_cfg.decoder_layers,
                         heads=model_cfg.decoder_heads) if mae_decoder else None,
            keep_fraction=getattr(model_cfg, "attentive_keep_fraction", 0.5),
        )
    if init and torch.device(device).type != "meta":
        model.init_weights()
    lock_model(model, model_cfg)
    return model


def lock_model(module: nn.Module, model_cfg) -> int:
    """Freeze the locked towers' parameters of `module` (a FLIP model, a pipeline stage, sharded or
    not) as `model_cfg` says (models/lock.py); the layouts call it again on their built parts."""
    from .lock import apply_locks

    arch = arch_from_config(model_cfg)
    return apply_locks(module, model_cfg, {"visual": arch.vision.layers, "text": arch.text.layers})


def count_parameters(model: nn.Module) -> dict:
    """Parameter counts by tower (works on the meta device)."""
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    total = sum(p.numel() for p in model.parameters())
    counts = {"params_vision": vision, "params_text": text, "params_total": total}
    if getattr(model, "ema_visual", None) is not None:
        counts["params_ema"] = sum(p.numel() for p in model.ema_visual.parameters())
    if getattr(model, "decoder", None) is not None:
        counts["params_decoder"] = sum(p.numel() for p in model.decoder.parameters())
    return counts


@torch.no_grad()
def clamp_logit_scale_(module) -> None:
    """Keep the temperature of `module` in [0, module.logit_scale_max], in place: a FLIP model, a
    pipeline stage (a no-op on stages that do not hold it) or a wrapper with `.module`. A sharded
    or tensor-parallel temperature (a DTensor) is clamped on its local tensor, which every rank
    holds whole (it is replicated), so the ranks stay equal."""
    module = getattr(module, "module", module)
    param = getattr(module, "logit_scale", None)
    if param is None:
        return
    local = param.to_local() if hasattr(param, "to_local") else param
    local.clamp_(0.0, module.logit_scale_max)


def loss_parameters(logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss's learnable scalars as the model hands them out: the log temperature alone (its own
    shape), or with a logit bias the (2,) tensor [log temperature, bias]. One tensor, so that the
    feature cache, the pipeline's packed output and the DeepSpeed surrogate carry both unchanged
    (flip_scale.loss.split_loss_parameters undoes it)."""
    if logit_bias is None:
        return logit_scale * 1.0
    return torch.cat([logit_scale.reshape(1), logit_bias.reshape(1)])

