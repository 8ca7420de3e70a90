"""FLIP's image tower: a ViT whose removed patches never enter the encoder.

keep a random (1 - mask_ratio) of the patches of each sample -> embed those patches (a linear map
of their pixels, the weight of a stride-p convolution) + their fixed 2-D sin-cos position embedding
-> prepend CLS (no position embedding) -> blocks on the visible tokens -> final LayerNorm -> pool ->
bias-free projection. No LayerNorm right after the patch embedding. The pixels of the removed
patches are dropped before the projection, so at mask 0.75 the projection and its gradient run on a
quarter of the patches; the result is that of convolving every patch and then dropping tokens.

OpenCLIP's ViT CLIP family is a set of switches (defaults are FLIP's): `pos_embed="learned"` (a trained
[1 + L, width] table whose row 0 goes on the CLS token and whose patch rows are taken for the kept
patches, as OpenCLIP's `positional_embedding` added before its patch dropout), `ln_pre` (a LayerNorm
on the tokens before the blocks) and `act="quick_gelu"`. OpenCLIP's pooling order is ours: ln_post,
pool, projection.

A pipeline stage may hold only some of the blocks: the parts it does not hold (`patch_embed`,
`pos_embed`, `ln_pre` before the blocks, `ln_post`/`proj` after them) are set to None and skipped.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .masking import build_masking
from .registry import FlipArch
from .transformer import make_blocks


def sincos_2d_position_embedding(width: int, grid_size: int) -> np.ndarray:
    """[grid^2, width] fixed 2-D sin-cos table (MAE / FLIP / OpenCLIP `sin_cos_2d` layout)."""
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {width}")

    def one_dim(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_dim(width // 2, grid[0]), one_dim(width // 2, grid[1])], axis=1)


class PatchEmbed(nn.Module):
    """The patch projection: `weight` [width, 3, p, p] (a stride-p, bias-free convolution's weight,
    the same tensor and name in checkpoints), applied as one matrix product to the pixels of the
    patches a sample keeps. A module, so that sharding wrappers (FSDP2, ZeRO-3) gather its weight."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(width, 3, patch_size, patch_size))

    def forward(self, images: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, L or len(ids_keep[0]), width], patches in row-major order."""
        batch, channels, height, width = images.shape
        p = self.patch_size
        if channels != 3 or height % p or width % p:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected [B, 3, H, W] with H and W multiples "
                             f"of the patch size {p}")
        # [B, 3, gh, p, gw, p] -> [B, gh, gw, 3, p, p] -> [B, L, 3 p p]: the layout of weight's rows.
        patches = images.reshape(batch, 3, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, (height // p) * (width // p), 3 * p * p)
        if ids_keep is not None:
            patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[2]))
        return F.linear(patches, self.weight.reshape(self.weight.shape[0], -1))


class VisionTower(nn.Module):
    def __init__(
        self,
        arch: FlipArch,
        mask_ratio: float = 0.0,
        masking: str = "random",
        pool: str = "avg_patches",
        norm_eps: float = 1e-6,
        pos_embed: str = "sincos",
        ln_pre: bool = False,
        act: str = "gelu",
        keep_fraction: float = 0.5,
    ):
        super().__init__()
        width = arch.vision.width
        self.arch = arch
        self.pool = pool
        self.patch_size = arch.patch_size
        self.pos_embed_kind = pos_embed
        self.patch_embed = PatchEmbed(width, arch.patch_size)
        if pos_embed == "learned":  # row 0: the CLS token's
            self.pos_embed = nn.Parameter(torch.zeros(1 + arch.num_patches, width))
        elif pos_embed == "sincos":
            # Fixed, so a buffer: recomputed by init_weights, never trained, not in checkpoints.
            self.register_buffer("pos_embed", torch.zeros(arch.num_patches, width), persistent=False)
        else:
            raise ValueError(f"model.vision_pos_embed: '{pos_embed}' is not valid; choose one of sincos, learned")
        self.cls_token = nn.Parameter(torch.zeros(width))
        self.ln_pre = nn.LayerNorm(width, eps=norm_eps) if ln_pre else None
        self.masking = build_masking(masking, mask_ratio, keep_fraction)
        self.blocks = make_blocks(width, arch.vision.layers, arch.vision.heads, arch.vision.mlp_dim, norm_eps, act)
        self.ln_post = nn.LayerNorm(width, eps=norm_eps)
        self.proj = nn.Linear(width, arch.embed_dim, bias=False)

    @property
    def mask_ratio(self) -> float:
        return self.masking.mask_ratio

    @mask_ratio.setter
    def mask_ratio(self, value: float) -> None:
        self.masking.mask_ratio = value

    @torch.no_grad()
    def init_weights(self) -> None:
        """Recompute the fixed sin-cos table; parameters are set by `models.init` by name."""
        if self.pos_embed is not None and self.pos_embed_kind == "sincos":
            table = sincos_2d_position_embedding(self.pos_embed.shape[1], self.arch.grid_size)
            self.pos_embed.copy_(torch.from_numpy(table).to(self.pos_embed.dtype))

    def embed(self, images: torch.Tensor, mask_noise: Optional[torch.Tensor] = None, return_keep: bool = False,
              patch_scores: Optional[torch.Tensor] = None):
        """images [B, 3, H, W] -> tokens [B, 1 + visible, width] (CLS first); with `return_keep`,
        (tokens, the kept patches' indices [B, visible] or None). `patch_scores` [B, L]: the
        attentive strategy's (model.masking=attentive), ignored by the random one."""
        length = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        if length != self.arch.num_patches or images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(
                f"image of {tuple(images.shape[-2:])} px does not give the model's patches; the model is built for "
                f"{self.arch.image_size} px ({self.arch.num_patches} patches of {self.patch_size} px)"
            )
        ids_keep = self.masking.keep_indices(images.shape[0], length, mask_noise, images.device, scores=patch_scores)
        x = self.patch_embed(images, ids_keep)  # [B, visible, width]
        pos = self.pos_embed.to(x.dtype)
        cls = self.cls_token.to(x.dtype)
        if self.pos_embed_kind == "learned":
            cls, pos = cls + pos[0], pos[1:]
        x = x + (pos if ids_keep is None else pos[ids_keep])
        tokens = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1)
        if self.ln_pre is not None:
            tokens = self.ln_pre(tokens)
        return (tokens, ids_keep) if return_keep else tokens

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, width] -> features [B, embed_dim] (not normalised)."""
        return self.pool_project(self.ln_post(x))

    def pool_project(self, x: torch.Tensor) -> torch.Tensor:
        """normalised tokens [B, N, width] -> features [B, embed_dim]."""
        if self.pool == "avg_patches":
            pooled = x[:, 1:].mean(dim=1)
        elif self.pool == "avg_all":
            pooled = x.mean(dim=1)
        else:
            pooled = x[:, 0]
        return self.proj(pooled)

    def forward(self, x: torch.Tensor, mask_noise: Optional[torch.Tensor] = None, return_tokens: bool = False,
                patch_scores: Optional[torch.Tensor] = None, cls_attention: bool = False):
        """-> features; with `return_tokens` (the MAE decoder's input, whole tower only),
        (features, the tokens after ln_post [B, 1 + visible, width], the keep indices or None).
        `patch_scores`: the attentive masking's (see embed). `cls_attention` (the EMA tower's use,
        whole tower only): instead the last block's CLS-to-patch attention, mean over heads, [B, L]."""
        if cls_attention:
            blocks = list(self.blocks.values())
            x = self.embed(x, mask_noise)
            for block in blocks[:-1]:
                x = block(x)
            return blocks[-1](x, cls_attention=True)
        ids_keep = None
        if self.patch_embed is not None:
            x, ids_keep = self.embed(x, mask_noise, return_keep=True, patch_scores=patch_scores)
        for block in self.blocks.values():
            x = block(x)
        if self.ln_post is not None:
            if return_tokens:
                tokens = self.ln_post(x)
                return self.pool_project(tokens), tokens, ids_keep
            x = self.head(x)
        return x
