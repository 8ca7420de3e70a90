"""FLIP's text tower: a non-autoregressive transformer over a fixed-length token sequence.

token embedding + learned 1-D positions -> blocks -> final LayerNorm -> first-token pooling ->
bias-free projection. As in FLIP's code, padding is not masked out of attention unless
`pad_mask` is set. `causal=True` gives the CLIP variant: causal mask + end-of-text pooling (the
last non-padding token). `pool="argmax"` pools the position of the highest token id, as
OpenCLIP's text tower does (its end-of-text token has the highest id of its vocabulary).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import FlipArch
from .transformer import make_blocks

PAD_ID = 0  # the tokenizer pads with id 0


class TextTower(nn.Module):
    def __init__(self, arch: FlipArch, pad_mask: bool = False, causal: bool = False, norm_eps: float = 1e-6,
                 act: str = "gelu", pool: str = "auto"):
        super().__init__()
        width = arch.text.width
        self.arch = arch
        self.pad_mask = pad_mask
        self.causal = causal
        self.pool = pool  # auto: first token (non-causal) or last non-padding (causal); argmax: OpenCLIP's
        self.token_embedding = nn.Embedding(arch.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(arch.context_length, width))
        self.blocks = make_blocks(width, arch.text.layers, arch.text.heads, arch.text.mlp_dim, norm_eps, act)
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        self.proj = nn.Linear(width, arch.embed_dim, bias=False)

    def attention_mask(self, tokens: torch.Tensor):
        """(attn_mask, is_causal) for scaled_dot_product_attention; True = may attend."""
        if not self.pad_mask:
            return None, self.causal
        keys = (tokens != PAD_ID)[:, None, None, :]  # [B, 1, 1, T]
        if self.causal:
            length = tokens.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
            keys = keys & causal
        return keys, False

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(
                f"text of {tokens.shape[1]} tokens; the model is built for model.context_length={self.pos_embed.shape[0]}"
            )
        return self.token_embedding(tokens) + self.pos_embed.to(self.token_embedding.weight.dtype)

    def head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_final(x)
        if self.pool == "argmax":
            pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        elif self.causal:
            last = (tokens != PAD_ID).sum(dim=1).clamp(min=1) - 1
            pooled = x[torch.arange(x.shape[0], device=x.device), last]
        else:
            pooled = x[:, 0]
        return self.proj(pooled)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> features [B, embed_dim]. `hidden`: a pipeline stage's input tokens."""
        attn_mask, is_causal = self.attention_mask(tokens)
        x = self.embed(tokens) if self.token_embedding is not None else hidden
        for block in self.blocks.values():
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.ln_final is not None:
            x = self.head(x, tokens)
        return x
