"""CRIS's neck: a feature pyramid fused with the sentence feature, ending in a coord-conv.

Stride-32 features are gated by the projected sentence feature; the result is merged top-down
into the stride-16 and stride-8 features; all three are brought to stride 16, concatenated and
aggregated; two coordinate-aware 3x3 convs give the decoder's visual input at stride 16.
Parameter names follow CRIS (``txt_proj``, ``f1_v_proj`` ... ``aggr``, ``coordconv``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gtms.model.layers import conv_bn_relu, linear_bn_relu


def add_coordinates(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C+2, H, W]: append x and y coordinates in [-1, 1] (x first)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y]).expand(b, -1, -1, -1)
    return torch.cat([x, coords], dim=1)


class CoordConv(nn.Module):
    """3x3 conv-BN-ReLU over the input with its two coordinate channels appended."""

    def __init__(self, *, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = conv_bn_relu(in_dim + 2, out_dim, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(add_coordinates(x))


class FPN(nn.Module):
    """Multi-modal FPN.

    ``in_dims``: channels of the stride-8, stride-16, stride-32 visual features; the stride-32
    width must equal the sentence feature's. ``out_dims``: widths of the three levels; the
    output has ``out_dims[1]`` channels.
    """

    def __init__(self, *, in_dims: tuple[int, int, int], out_dims: tuple[int, int, int]):
        super().__init__()
        in8, in16, in32 = in_dims
        out8, out16, out32 = out_dims
        self.txt_proj = linear_bn_relu(in32, out32)
        # stride 32: visual * sentence
        self.f1_v_proj = conv_bn_relu(in32, out32)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(out32), nn.ReLU(inplace=True))
        # stride 16: + upsampled stride-32
        self.f2_v_proj = conv_bn_relu(in16, out16, kernel_size=3)
        self.f2_cat = conv_bn_relu(out32 + out16, out16)
        # stride 8, pooled to 16: + stride-16
        self.f3_v_proj = conv_bn_relu(in8, out8, kernel_size=3)
        self.f3_cat = conv_bn_relu(out8 + out16, out16)
        # all three levels at stride 16
        self.f4_proj5 = conv_bn_relu(out32, out16, kernel_size=3)
        self.f4_proj4 = conv_bn_relu(out16, out16, kernel_size=3)
        self.f4_proj3 = conv_bn_relu(out16, out16, kernel_size=3)
        self.aggr = conv_bn_relu(3 * out16, out16)
        self.coordconv = nn.Sequential(
            CoordConv(in_dim=out16, out_dim=out16), conv_bn_relu(out16, out16, kernel_size=3)
        )

    def forward(
        self,
        at_stride8: torch.Tensor,
        at_stride16: torch.Tensor,
        at_stride32: torch.Tensor,
        sentence: torch.Tensor,
    ) -> torch.Tensor:
        """Visual [B, in8, H/8, W/8], [B, in16, H/16, W/16], [B, in32, H/32, W/32] and sentence
        [B, in32] -> fused map [B, out16, H/16, W/16]."""
        gate = self.txt_proj(sentence)[:, :, None, None]  # [B, out32, 1, 1]
        f5 = self.norm_layer(self.f1_v_proj(at_stride32) * gate)  # [B, out32, H/32, W/32]
        f4 = self.f2_v_proj(at_stride16)
        f4 = self.f2_cat(torch.cat([f4, _upsample_to(f5, f4)], dim=1))  # [B, out16, H/16, W/16]
        f3 = F.avg_pool2d(self.f3_v_proj(at_stride8), 2)
        f3 = self.f3_cat(torch.cat([f3, f4], dim=1))  # [B, out16, H/16, W/16]
        fq5 = _upsample_to(self.f4_proj5(f5), f4)
        fq = torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), fq5], dim=1)
        return self.coordconv(self.aggr(fq))


def _upsample_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of x [B, C, h, w] to reference's spatial size (2x in the pyramid)."""
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)
