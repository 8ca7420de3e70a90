"""FLIP's text tower: a non-autoregressive transformer over a fixed-length token sequence.

token embedding + learned 1-D positions -> blocks -> final LayerNorm -> first-token pooling ->
bias-free projection. As in FLIP's code, padding is not masked out of attention unless
`pad_mask` is set. `causal=True` gives the CLIP variant: causal mask + end-of-text pooling (the
last non-padding token). `pool="argmax"` pools the position of the highest token id, as
OpenCLIP's text tower does (its end-of-text token has the highest id of its vocabulary).
`text_mask_ratio` > 0 removes tokens before the blocks in training
(`text_masking.py`): the embeddings of the kept tokens only, at their own positions.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import FlipArch
from .text_masking import TextMasking
from .transformer import make_blocks

PAD_ID = 0  # the tokenizer pads with id 0


class TextTower(nn.Module):
    def __init__(self, arch: FlipArch, pad_mask: bool = False, causal: bool = False, norm_eps: float = 1e-6,
                 act: str = "gelu", pool: str = "auto", mask_ratio: float = 0.0, masking: str = "random"):
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
        self.masking = TextMasking(mask_ratio, masking, PAD_ID)

    def pooled_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] the position `head` pools: the highest id (argmax), the end-of-text token (causal: the
        last non-padding one), else 0. Text masking keeps it, and keeps the kept tokens in order, so
        the same rule finds it among the kept tokens."""
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        if self.causal:
            return (tokens != PAD_ID).sum(dim=1).clamp(min=1) - 1
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)

    def keep(self, tokens: torch.Tensor, mask_noise: torch.Tensor | None = None):
        """(the tokens the blocks see [B, K], their positions [B, K] or None when all are kept)."""
        ids_keep = self.masking.keep_indices(tokens, mask_noise, self.pooled_position(tokens))
        if ids_keep is None:
            return tokens, None
        return tokens.gather(1, ids_keep), ids_keep

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

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position embeddings; `positions` [B, K]: those of kept tokens (text masking)."""
        pos = self.pos_embed.to(self.token_embedding.weight.dtype)
        if positions is not None:
            return self.token_embedding(tokens) + pos[positions]
        if tokens.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(
                f"text of {tokens.shape[1]} tokens; the model is built for model.context_length={self.pos_embed.shape[0]}"
            )
        return self.token_embedding(tokens) + pos

    def head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_final(x)
        if self.causal or self.pool == "argmax":
            pooled = x[torch.arange(x.shape[0], device=x.device), self.pooled_position(tokens)]
        else:
            pooled = x[:, 0]
        return self.proj(pooled)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None,
                mask_noise: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> features [B, embed_dim]. `hidden`: a pipeline stage's input tokens (and
        `tokens` the kept ones); `mask_noise` [B, T]: the text mask's noise (training only)."""
        positions = None
        if self.token_embedding is not None:
            tokens, positions = self.keep(tokens, mask_noise)
        attn_mask, is_causal = self.attention_mask(tokens)
        x = self.embed(tokens, positions) if self.token_embedding is not None else hidden
        for block in self.blocks.values():
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.ln_final is not None:
            x = self.head(x, tokens)
        return x
