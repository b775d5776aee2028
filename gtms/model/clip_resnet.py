"""CLIP's ModifiedResNet image encoder, with CRIS's spatial attention pool.

Differences from a torchvision ResNet (CLIP, Radford et al. 2021): a stem of three 3x3 convs and an
average pool; anti-aliased strided Bottlenecks (the stride is an average pool before the last 1x1
conv, and before the 1x1 conv of the shortcut); an attention pool instead of global average
pooling. CRIS keeps every spatial token of the attention pool (not just CLIP's global one), with
its positional embedding resized to the input's grid, and adds a residual ``connect`` branch
(1x1 conv + BN) before a ReLU: that map is the stride-32 feature of the neck.

Parameter names follow OpenAI's ``visual.*`` layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 4  # Bottleneck output channels = planes * EXPANSION


class VisualFeatures(NamedTuple):
    """What the image encoder hands to the neck (and to GradCAM)."""

    at_stride8: torch.Tensor  # [B, 8*width, H/8, W/8]      layer2
    at_stride16: torch.Tensor  # [B, 16*width, H/16, W/16]  layer3
    at_stride32: torch.Tensor  # [B, embed_dim, H/32, W/32]  attention pool, spatial tokens
    layer4: torch.Tensor  # [B, 32*width, H/32, W/32]       layer4, before the attention pool


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg-pool stride) -> 1x1 residual block, 4x channel expansion."""

    def __init__(self, *, in_dim: int, planes: int, stride: int = 1):
        super().__init__()
        out_dim = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_dim, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_dim)
        self.downsample = None
        if stride > 1 or in_dim != out_dim:
            # The shortcut shares the main path's average pool, then projects channels.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_dim, H, W] -> [B, 4*planes, H/stride, W/stride]"""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(self.avgpool(x))
        return F.relu(out + identity)


def resize_grid_embedding(grid_embedding: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Spatial positional embedding [n*n, C] -> [h*w, C] by bicubic interpolation (as CRIS).

    Identity (no interpolation) when the grid already has the requested size.
    """
    n = math.isqrt(int(grid_embedding.shape[0]))   # int(): a constant when traced
    if (n, n) == tuple(size):
        return grid_embedding
    grid = grid_embedding.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # [1, C, n, n]
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    return grid.flatten(2).squeeze(0).transpose(0, 1)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool, used two ways.

    ``forward``: CRIS's spatial map — every spatial token attends to the others, goes through
    ``c_proj`` and is added to the ``connect`` branch, then ReLU.
    ``global_embedding``: CLIP's image embedding — the mean token attends to all tokens.
    """

    def __init__(self, *, grid_size: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        # Row 0: the mean ("class") token; rows 1..: the grid_size x grid_size spatial tokens.
        self.positional_embedding = nn.Parameter(
            torch.randn(grid_size**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.connect = nn.Sequential(
            nn.Conv2d(embed_dim, output_dim, 1, bias=False), nn.BatchNorm2d(output_dim)
        )
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(linear.weight, std=embed_dim**-0.5)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, heads, N, C/heads]"""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _attend(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of queries [B, Q, C] over tokens [B, N, C] -> [B, Q, output_dim]"""
        q = self._split_heads(self.q_proj(queries))
        k = self._split_heads(self.k_proj(tokens))
        v = self._split_heads(self.v_proj(tokens))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Q, C/heads]
        return self.c_proj(out.transpose(1, 2).flatten(2))

    def _spatial_tokens(self, layer4: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h*w, C] with the (resized) spatial positional embedding added."""
        grid_embedding = resize_grid_embedding(self.positional_embedding[1:], layer4.shape[-2:])
        return layer4.flatten(2).transpose(1, 2) + grid_embedding

    def forward(self, layer4: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> spatial features [B, output_dim, h, w]"""
        tokens = self._spatial_tokens(layer4)
        spatial = self._attend(tokens, tokens).transpose(1, 2).unflatten(2, layer4.shape[-2:])
        return F.relu(spatial + self.connect(layer4))

    def global_embedding(self, layer4: torch.Tensor) -> torch.Tensor:
        """CLIP's global image embedding from a layer-4 map: [B, C, h, w] -> [B, output_dim].

        A pure differentiable function of ``layer4`` (no batch norm, no dropout), so GradCAM can
        take gradients with respect to its input.
        """
        mean_token = layer4.mean(dim=(2, 3)).unsqueeze(1) + self.positional_embedding[0]
        tokens = torch.cat([mean_token, self._spatial_tokens(layer4)], dim=1)
        return self._attend(mean_token, tokens).squeeze(1)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: image [B, 3, H, W] -> ``VisualFeatures``.

    ``width`` is the stem/layer1 width (64 for RN50/RN101); layer4 has ``32 * width`` channels.
    ``grid_size`` is the attention pool's pretraining grid (CLIP resolution / 32, 7 for 224).
    """

    def __init__(
        self,
        *,
        layers: tuple[int, int, int, int],
        width: int,
        heads: int,
        grid_size: int,
        output_dim: int,
    ):
        super().__init__()
        stem = width // 2
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = nn.Conv2d(stem, stem, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem)
        self.conv3 = nn.Conv2d(stem, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.layer1 = _make_stage(width, width, layers[0], stride=1)
        self.layer2 = _make_stage(width * EXPANSION, width * 2, layers[1], stride=2)
        self.layer3 = _make_stage(width * 2 * EXPANSION, width * 4, layers[2], stride=2)
        self.layer4 = _make_stage(width * 4 * EXPANSION, width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(
            grid_size=grid_size, embed_dim=width * 32, num_heads=heads, output_dim=output_dim
        )
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each block starts as its shortcut (as CLIP)

    def stem(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, width, H/4, W/4]"""
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, image: torch.Tensor) -> VisualFeatures:
        x = self.layer1(self.stem(image))
        at_stride8 = self.layer2(x)
        at_stride16 = self.layer3(at_stride8)
        layer4 = self.layer4(at_stride16)
        return VisualFeatures(at_stride8, at_stride16, self.attnpool(layer4), layer4)


def _make_stage(in_dim: int, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
    """``blocks`` Bottlenecks; only the first one strides and changes the channel count."""
    first = Bottleneck(in_dim=in_dim, planes=planes, stride=stride)
    rest = [Bottleneck(in_dim=planes * EXPANSION, planes=planes) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)
