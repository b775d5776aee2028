"""CRIS's vision-language transformer decoder.

Visual tokens (the neck's stride-16 map) self-attend, then cross-attend to the word features
(padded words masked out), then pass an FFN. Each sub-layer is pre-normed (``norm1..3``) and its
attention output is normed again (``self_attn_norm``, ``cross_attn_norm``) before the residual
add; the FFN has a LayerNorm inside (``ffn.3``). Queries and keys carry fixed sine positions:
2D for the visual grid, 1D for the words. Parameter names follow CRIS.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sine_positions_1d(length: int, dim: int, *, device=None) -> torch.Tensor:
    """Transformer sine/cosine positions [length, dim]: sin on even, cos on odd channels."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


def sine_positions_2d(height: int, width: int, dim: int, *, device=None) -> torch.Tensor:
    """2D positions [height*width, dim] (row-major): the first dim/2 channels encode the column,
    the last dim/2 the row, each as interleaved sin/cos like ``sine_positions_1d``."""
    if dim % 4:
        raise ValueError(f"2D sine positions need a dimension divisible by 4, got {dim}")
    half = dim // 2
    cols = sine_positions_1d(width, half, device=device)  # [W, dim/2]
    rows = sine_positions_1d(height, half, device=device)  # [H, dim/2]
    pe = torch.cat(
        [cols[None, :, :].expand(height, -1, -1), rows[:, None, :].expand(-1, width, -1)], dim=-1
    )
    return pe.reshape(height * width, dim)


class DecoderLayer(nn.Module):
    """Self-attention over visual tokens, cross-attention to words, FFN."""

    def __init__(self, *, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_ffn),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.LayerNorm(dim_ffn),
            nn.Linear(dim_ffn, d_model),
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        vis: torch.Tensor,
        words: torch.Tensor,
        vis_pos: torch.Tensor,
        word_pos: torch.Tensor,
        pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """vis [B, N, D], words [B, L, D], vis_pos [N, D], word_pos [L, D], pad_mask [B, L]
        (True = padding) -> [B, N, D]"""
        h = self.norm1(vis)
        q = h + vis_pos
        h = self.self_attn(q, q, h, need_weights=False)[0]
        vis = vis + self.dropout(self.self_attn_norm(h))
        h = self.norm2(vis)
        h = self.multihead_attn(
            h + vis_pos, words + word_pos, words, key_padding_mask=pad_mask, need_weights=False
        )[0]
        vis = vis + self.dropout(self.cross_attn_norm(h))
        return vis + self.dropout(self.ffn(self.norm3(vis)))


class TransformerDecoder(nn.Module):
    """``num_layers`` ``DecoderLayer`` and a final LayerNorm; d_model = visual = word width."""

    def __init__(self, *, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d_model, nhead=nhead, dim_ffn=dim_ffn, dropout=dropout)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis: torch.Tensor, words: torch.Tensor, pad_mask: torch.Tensor):
        """vis [B, D, h, w], words [B, L, D], pad_mask [B, L] (True = padding) -> [B, D, h, w]"""
        _, dim, h, w = vis.shape
        vis_pos = sine_positions_2d(h, w, dim, device=vis.device).to(vis.dtype)
        word_pos = sine_positions_1d(words.shape[1], dim, device=vis.device).to(vis.dtype)
        x = vis.flatten(2).transpose(1, 2)  # [B, h*w, D]
        for layer in self.layers:
            x = layer(x, words, vis_pos, word_pos, pad_mask)
        return self.norm(x).transpose(1, 2).unflatten(2, (h, w))
