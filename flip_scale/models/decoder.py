"""MAE's light decoder: reconstruct the normalised pixels of the removed patches (FLIP Table 1f).

Built only when `loss.mae_weight` > 0. It takes the image tower's visible tokens after its last
block and final LayerNorm (`ln_post`, the encoder norm MAE applies before `decoder_embed`), CLS
first, and:

    linear to the decoder width (`embed`) -> put the visible tokens back at their patch positions
    and a learned `mask_token` at every removed one (unshuffle to the full length L) -> add the
    decoder's own fixed 2-D sin-cos table (CLS: none) -> `decoder_layers` pre-norm blocks ->
    LayerNorm (`ln_post`) -> linear to p*p*3 pixel values per patch (`pred`), CLS dropped.

The target is each patch's pixels (the layout `PatchEmbed` projects: channel, row, column)
normalised by that patch's own mean and variance (MAE's norm_pix_loss: unbiased variance, eps
1e-6); the loss is the mean squared error over the removed patches only. Every sample removes the
same number of patches, so the loss of a batch is the mean of its samples' losses: it adds
per-sample terms, and the mean over micro-batches or data-parallel ranks is the one-process mean.
"""

from __future__ import annotations

import torch
from torch import nn

from .transformer import make_blocks
from .vit import sincos_2d_position_embedding


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images [B, 3, H, W] -> [B, L, 3 p p], patches row-major, each (channel, row, column)."""
    batch, channels, height, width = images.shape
    p = patch_size
    patches = images.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // p) * (width // p), channels * p * p)


def reconstruction_target(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """[B, L, 3 p p]: every patch's pixels normalised by its own mean and (unbiased) variance."""
    patches = patchify(images.float(), patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def removed_mask(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] float: 1 at the patches a sample removed, 0 at those it kept."""
    mask = torch.ones(ids_keep.shape[0], length, device=ids_keep.device)
    return mask.scatter(1, ids_keep, 0.0)


def reconstruction_loss(prediction: torch.Tensor, images: torch.Tensor, ids_keep: torch.Tensor,
                        patch_size: int) -> torch.Tensor:
    """Mean squared error of `prediction` [B, L, 3 p p] against the normalised pixels, over the
    removed patches only (fp32 whatever the autocast)."""
    target = reconstruction_target(images, patch_size)
    per_patch = (prediction.float() - target).pow(2).mean(dim=-1)
    mask = removed_mask(ids_keep, target.shape[1])
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """The decoder and its loss: `decoder(tokens, ids_keep, images)` -> the reconstruction loss."""

    def __init__(self, encoder_width: int, width: int, layers: int, heads: int, patch_size: int,
                 grid_size: int, norm_eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        # Fixed, so a buffer (recomputed at init, not in checkpoints), as the encoder's table.
        self.register_buffer("pos_embed", torch.zeros(grid_size * grid_size, width), persistent=False)
        self.blocks = make_blocks(width, layers, heads, 4 * width, norm_eps)
        self.ln_post = nn.LayerNorm(width, eps=norm_eps)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)

    @torch.no_grad()
    def init_weights(self) -> None:
        table = sincos_2d_position_embedding(self.pos_embed.shape[1], self.grid_size)
        self.pos_embed.copy_(torch.from_numpy(table).to(self.pos_embed.dtype))

    def predict(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + visible, encoder width] (CLS first), ids_keep [B, visible] -> [B, L, 3 p p]."""
        x = self.embed(tokens)
        batch, visible, width = x.shape[0], ids_keep.shape[1], x.shape[2]
        length = self.pos_embed.shape[0]
        # Unshuffle: mask tokens everywhere, the visible tokens written back at their patch index.
        full = self.mask_token.to(x.dtype).expand(batch, length, width)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, visible, width), x[:, 1:])
        full = full + self.pos_embed.to(x.dtype)
        x = torch.cat([x[:, :1], full], dim=1)
        for block in self.blocks.values():
            x = block(x)
        return self.pred(self.ln_post(x))[:, 1:]

    def forward(self, tokens: torch.Tensor, ids_keep: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(self.predict(tokens, ids_keep), images, ids_keep, self.patch_size)

