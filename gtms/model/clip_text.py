"""CLIP's text transformer: token ids -> word features and a sentence feature.

A causal (GPT-style) transformer over ``[SOT] + BPE ids + [EOT]`` padded with zeros. The word
features are the final-layer-norm outputs at every position (CRIS feeds them to the decoder,
unprojected); the sentence feature is the output at the EOT position (EOT has the largest id, so
``tokens.argmax(-1)`` finds it) times ``text_projection``, as in CLIP. Because attention is causal,
padding after EOT never changes the sentence feature; the decoder masks padded words.

Parameter names follow OpenAI's layout (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

PAD_ID = 0


class TextFeatures(NamedTuple):
    words: torch.Tensor  # [B, L, text_width]  after ln_final, not projected
    sentence: torch.Tensor  # [B, embed_dim]    EOT position through text_projection


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids [B, L] -> bool [B, L], True at padding (id 0)."""
    return tokens == PAD_ID


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, *, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                gelu=QuickGELU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, width], attn_mask [L, L] bool (True = masked) -> [B, L, width]"""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """A stack of ``ResidualAttentionBlock`` (``resblocks``)."""

    def __init__(self, *, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width=width, heads=heads) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def causal_mask(length: int) -> torch.Tensor:
    """Bool mask [L, L], True above the diagonal (masked), so position i sees positions <= i."""
    return torch.ones(length, length, dtype=torch.bool).triu_(1)


class CLIPText(nn.Module):
    """CLIP's text tower: token ids [B, L] (L <= word_len) -> ``TextFeatures``.

    ``positional_embedding`` keeps ``context_length`` rows (77 for OpenAI's models) so checkpoints
    load unchanged; only the first L rows are used.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        context_length: int,
        word_len: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
    ):
        super().__init__()
        if word_len > context_length:
            raise ValueError(f"word_len {word_len} exceeds the context length {context_length}")
        self.word_len = word_len
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = TextTransformer(width=width, layers=layers, heads=heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", causal_mask(word_len), persistent=False)
        self._init_text_weights(width=width, layers=layers)

    def _init_text_weights(self, *, width: int, layers: int) -> None:
        """CLIP's initialisation (matters only when training from scratch)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        residual_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        """Token ids [B, L] int64 -> words [B, L, width], sentence [B, embed_dim]."""
        length = tokens.shape[1]
        if length > self.word_len:
            raise ValueError(
                f"tokens have length {length}, but the model was built for word_len "
                f"{self.word_len}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, self.attn_mask[:length, :length])
        words = self.ln_final(x)
        eot = words[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        return TextFeatures(words=words, sentence=eot @ self.text_projection)
