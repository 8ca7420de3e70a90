"""Token removal strategies (`model.masking`): `random` (FLIP) and `attentive` (A-CLIP: the patches
an EMA copy of the image tower attends to most, plus a random rest; the EMA is in models/ema.py).

The noise that decides which patches a sample keeps is a pure function of (seed, step, the
sample's index in the global batch, patch): the same sample gets the same mask whatever the
parallel layout, micro-batching or pass of the feature cache. With text masking
(`model.text_mask_ratio`, `models/text_masking.py`) the text tokens' noise comes from another
stream of the same hash, so image and text masks are independent, and travels in the same tensor:
one row per sample, the image patches' columns first, then the text tokens' (`sample_mask_noise`,
`split_mask_noise`). Every path that carries the image noise (the feature cache, the pipeline's
stage inputs, the DeepSpeed engine) thus carries the text noise unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser (lowbias32); int64 arithmetic masked to 32 bits.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


IMAGE_STREAM = 0
TEXT_STREAM = 1


def masking_noise(seed: int, step: int, sample_index: torch.Tensor, num_patches: int,
                  stream: int = IMAGE_STREAM) -> torch.Tensor:
    """Uniform noise in [0, 1) of shape [len(sample_index), num_patches], reproducible per sample.
    `stream` 0 is the image patches' noise, `TEXT_STREAM` the text tokens' (an independent one)."""
    sample_index = sample_index.to(torch.int64).reshape(-1, 1)
    patch = torch.arange(num_patches, dtype=torch.int64, device=sample_index.device).reshape(1, -1)
    key = _mix32(torch.full_like(sample_index, seed & _MASK32) ^ _mix32(torch.full_like(sample_index, step) + 0x9E3779B9))
    if stream:  # stream 0 keeps the key it always had (masks of older runs resume unchanged)
        key = _mix32(key ^ _mix32(torch.full_like(sample_index, stream) * 0x5851F42D + 0x14057B7E))
    h = _mix32(key ^ _mix32(sample_index * 0x632BE5AB + 0x85EBCA6B))
    h = _mix32(h ^ _mix32(patch * 0x27D4EB2F + 0x165667B1))
    h = _mix32(h * 0x2C1B3C6D + 0x297A2D39)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Patches a sample keeps: int(L * (1 - r)), at least one."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def ratio_keeping(num_patches: int, keep: int) -> float:
    """A mask ratio whose `visible_count` is exactly `keep` of `num_patches` (half a token of margin
    against rounding: 1 - k/L itself can give k - 1 in floating point)."""
    if not 1 <= keep <= num_patches:
        raise ValueError(f"cannot keep {keep} of {num_patches} tokens")
    ratio = 1.0 - (keep + 0.5) / num_patches
    ratio = max(ratio, 0.0) if keep < num_patches else 0.0
    assert visible_count(num_patches, ratio) == keep, (num_patches, keep, ratio)
    return ratio


def sample_mask_noise(seed: int, step: int, sample_index: torch.Tensor, num_patches: int,
                      text_tokens: int = 0) -> torch.Tensor:
    """The mask noise of a batch, one row per sample: [B, num_patches] image columns, then
    [B, text_tokens] text columns from the text stream (none when text masking is off)."""
    image = masking_noise(seed, step, sample_index, num_patches)
    if not text_tokens:
        return image
    return torch.cat([image, masking_noise(seed, step, sample_index, text_tokens, TEXT_STREAM)], dim=1)


def split_mask_noise(noise: Optional[torch.Tensor], num_patches: int,
                     text_tokens: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`sample_mask_noise`'s tensor -> (image noise [B, L], text noise [B, T] or None)."""
    if noise is None:
        return None, None
    if noise.dim() != 2 or noise.shape[1] not in (num_patches, num_patches + text_tokens):
        raise ValueError(f"mask noise has shape {tuple(noise.shape)}; expected [B, {num_patches}] (image patches) or "
                         f"[B, {num_patches + text_tokens}] (image patches, then text tokens)")
    if noise.shape[1] == num_patches:
        return noise, None
    return noise[:, :num_patches], noise[:, num_patches:]


class RandomMasking(torch.nn.Module):
    """Keep a random `1 - mask_ratio` of the patches of each sample (argsort of uniform noise)."""

    def __init__(self, mask_ratio: float):
        super().__init__()
        self.mask_ratio = mask_ratio

    def keep_indices(self, batch: int, length: int, noise: Optional[torch.Tensor] = None,
                     device: Optional[torch.device] = None, scores: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """[B, int(L(1-r))] indices of the patches each sample keeps (the first of the noise's stable
        argsort), or None where every patch is kept (eval, or r=0). The image tower gathers the
        pixels of these patches before embedding them, so only visible patches are projected.
        `scores` (the attentive strategy's) is ignored."""
        if not self.training or self.mask_ratio <= 0:
            return None
        if noise is None:
            noise = torch.rand(batch, length, device=device)
        if noise.shape != (batch, length):
            raise ValueError(f"mask noise has shape {tuple(noise.shape)}, expected {(batch, length)}")
        keep = visible_count(length, self.mask_ratio)
        return noise.to(device).argsort(dim=1, stable=True)[:, :keep]

    def forward(self, patches: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """patches [B, L, D] -> visible patches [B, int(L(1-r)), D] (identity in eval or at r=0)."""
        ids_keep = self.keep_indices(patches.shape[0], patches.shape[1], noise, patches.device)
        if ids_keep is None:
            return patches
        return torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[2]))


class AttentiveMasking(RandomMasking):
    """A-CLIP's attentive removal: of the `visible_count` patches a sample keeps, the
    round(keep_fraction x visible) with the highest scores (the EMA tower's CLS attention, given by
    the caller), then a random rest among the others, drawn by the sample's mask noise (the first of
    its argsort, the scored ones left out), so it is reproducible per sample as the random strategy.
    Without scores (no EMA tower in the call: the masked-view evaluation) it is the random strategy."""

    def __init__(self, mask_ratio: float, keep_fraction: float = 0.5):
        super().__init__(mask_ratio)
        self.keep_fraction = keep_fraction

    def keep_indices(self, batch: int, length: int, noise: Optional[torch.Tensor] = None,
                     device: Optional[torch.device] = None, scores: Optional[torch.Tensor] = None):
        """[B, visible]: the top-scored patches first (by score), then the random rest."""
        if scores is None or not self.training or self.mask_ratio <= 0:
            return super().keep_indices(batch, length, noise, device)
        if scores.shape != (batch, length):
            raise ValueError(f"patch scores have shape {tuple(scores.shape)}, expected {(batch, length)}")
        if noise is None:
            noise = torch.rand(batch, length, device=device)
        if noise.shape != (batch, length):
            raise ValueError(f"mask noise has shape {tuple(noise.shape)}, expected {(batch, length)}")
        keep = visible_count(length, self.mask_ratio)
        top = int(round(self.keep_fraction * keep))
        top_ids = scores.to(device).float().argsort(dim=1, descending=True, stable=True)[:, :top]
        # The scored patches get noise 2 (> any uniform draw): the rest is the noise's first keep - top.
        rest_noise = noise.to(device).scatter(1, top_ids, 2.0)
        rest_ids = rest_noise.argsort(dim=1, stable=True)[:, :keep - top]
        return torch.cat([top_ids, rest_ids], dim=1)


MASKING = {"random": RandomMasking, "attentive": AttentiveMasking}


def build_masking(name: str, mask_ratio: float, keep_fraction: float = 0.5) -> torch.nn.Module:
    if name not in MASKING:
        raise ValueError(f"model.masking: unknown strategy '{name}'; valid: {', '.join(MASKING)}")
    if name == "attentive":
        return AttentiveMasking(mask_ratio, keep_fraction)
    return MASKING[name](mask_ratio)
