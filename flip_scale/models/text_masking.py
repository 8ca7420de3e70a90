"""Text token removal (`model.text_mask_ratio`, `model.text_masking`; FLIP's Table 1c).

A sample keeps `int(T * (1 - text_mask_ratio))` of its T tokens; the removed ones never enter the
text encoder, so the text sequence is shorter and its FLOPs fall. As for the image patches, the
position embeddings belong to the tokens (they are looked up at each kept token's position), and
the noise is a pure function of (seed, step, the sample's global index, token) from its own stream
(`masking.TEXT_STREAM`), so every layout and both passes of the feature cache remove the same
tokens.

- `random`: the kept tokens are the lowest-noise ones (argsort, as the image mask).
- `prioritized`: padding tokens are removed before any real token, then random ones: the noise of a
  pad is raised by 1 (it is in [0, 1)), the hook FLIP's `random_mask(..., bias)` has for it ("small
  is keep, large is remove"). A caption shorter than the kept length keeps all its tokens and some
  pads.

The token the tower pools is always kept: the first token of the non-causal tower (FLIP pools
position 0; FLIP's released code has no text masking, its language tower raises
NotImplementedError for a ratio > 0, so this choice is ours: without it the pooled token would be a
random kept one), the end-of-text token of the causal one (end-of-text pooling). The kept tokens
stay in sentence order, so causal attention and the pad mask (`text_pad_mask`) mean what they mean
unmasked. Evaluation (eval mode) never masks text.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .masking import visible_count

TEXT_MASKING = ("random", "prioritized")


class TextMasking(nn.Module):
    def __init__(self, mask_ratio: float = 0.0, strategy: str = "random", pad_id: int = 0):
        super().__init__()
        if strategy not in TEXT_MASKING:
            raise ValueError(f"model.text_masking: unknown strategy '{strategy}'; valid: {', '.join(TEXT_MASKING)}")
        self.mask_ratio = mask_ratio
        self.strategy = strategy
        self.pad_id = pad_id

    def keep_indices(self, tokens: torch.Tensor, noise: Optional[torch.Tensor],
                     pooled: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, int(T(1-r))] positions of the tokens each sample keeps, ascending, always including
        `pooled` [B] (the position the tower pools); None where every token is kept (eval, r=0)."""
        if not self.training or self.mask_ratio <= 0:
            return None
        batch, length = tokens.shape
        if noise is None:
            noise = torch.rand(batch, length, device=tokens.device)
        if noise.shape != (batch, length):
            raise ValueError(f"text mask noise has shape {tuple(noise.shape)}, expected {(batch, length)}")
        score = noise.to(device=tokens.device, dtype=torch.float32)
        if self.strategy == "prioritized":
            score = score + (tokens == self.pad_id).to(score.dtype)  # every pad ranks after every real token
        score = score.scatter(1, pooled.reshape(-1, 1).to(torch.int64), -1.0)  # the pooled token goes first
        keep = visible_count(length, self.mask_ratio)
        return score.argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}, strategy={self.strategy}"
