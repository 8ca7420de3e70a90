"""Token removal strategies (`model.masking`). Only `random` (FLIP) so far.

The noise that decides which patches a sample keeps is a pure function of (seed, step, the
sample's index in the global batch, patch): the same sample gets the same mask whatever the
parallel layout, micro-batching or pass of the feature cache.
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


def masking_noise(seed: int, step: int, sample_index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Uniform noise in [0, 1) of shape [len(sample_index), num_patches], reproducible per sample."""
    sample_index = sample_index.to(torch.int64).reshape(-1, 1)
    patch = torch.arange(num_patches, dtype=torch.int64, device=sample_index.device).reshape(1, -1)
    key = _mix32(torch.full_like(sample_index, seed & _MASK32) ^ _mix32(torch.full_like(sample_index, step) + 0x9E3779B9))
    h = _mix32(key ^ _mix32(sample_index * 0x632BE5AB + 0x85EBCA6B))
    h = _mix32(h ^ _mix32(patch * 0x27D4EB2F + 0x165667B1))
    h = _mix32(h * 0x2C1B3C6D + 0x297A2D39)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Patches a sample keeps: int(L * (1 - r)), at least one."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


class RandomMasking(torch.nn.Module):
    """Keep a random `1 - mask_ratio` of the patches of each sample (argsort of uniform noise)."""

    def __init__(self, mask_ratio: float):
        super().__init__()
        self.mask_ratio = mask_ratio

    def keep_indices(self, batch: int, length: int, noise: Optional[torch.Tensor] = None,
                     device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        """[B, int(L(1-r))] indices of the patches each sample keeps (the first of the noise's stable
        argsort), or None where every patch is kept (eval, or r=0). The image tower gathers the
        pixels of these patches before embedding them, so only visible patches are projected."""
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


MASKING = {"random": RandomMasking}


def build_masking(name: str, mask_ratio: float) -> torch.nn.Module:
    if name not in MASKING:
        raise ValueError(f"model.masking: unknown strategy '{name}'; valid: {', '.join(MASKING)}")
    return MASKING[name](mask_ratio)
