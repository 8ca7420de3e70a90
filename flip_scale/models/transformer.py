"""The pre-norm transformer block shared by both towers.

Names are chosen so that tensor parallelism can be applied from outside by module path
(`attn.qkv` column-parallel, `attn.proj` row-parallel, `mlp.fc1` column, `mlp.fc2` row).
The fused QKV weight is laid out head by head, `[heads, (q, k, v), head_dim]` along its output
dimension, so a column split over tp ranks hands each rank whole heads with their q, k and v.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                cls_attention: bool = False):
        """-> [batch, tokens, width]; with `cls_attention` instead the first token's attention to
        every other token, the mean over this rank's heads [batch, tokens - 1] (the attentive
        masking's patch scores; no mask: an image tower's)."""
        batch, tokens, _ = x.shape
        # -1 heads: under tensor parallelism this rank holds only its share of the heads.
        qkv = self.qkv(x).view(batch, tokens, -1, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [batch, heads, tokens, head_dim]
        if cls_attention:
            logits = (q[:, :, :1].float() * self.head_dim ** -0.5) @ k.float().transpose(-2, -1)
            return logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(out)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP and OpenCLIP's `-quickgelu` models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}  # model.act


class MLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, norm_eps: float = 1e-6, act: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, cls_attention: bool = False):
        if cls_attention:  # the scores of Attention(cls_attention=True), not the block's output
            return self.attn(self.ln_1(x), cls_attention=True)
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


def make_blocks(width: int, layers: int, heads: int, mlp_dim: int, norm_eps: float, act: str = "gelu") -> nn.ModuleDict:
    # A ModuleDict keyed by layer index: a pipeline stage deletes the blocks it does not hold and
    # the remaining names (and so checkpoint keys) stay those of the whole model.
    return nn.ModuleDict({str(i): Block(width, heads, mlp_dim, norm_eps, act) for i in range(layers)})
