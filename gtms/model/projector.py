"""CRIS's text-to-pixel projector: a per-sample dynamic conv gives the mask logits at stride 4.

The visual branch upsamples the decoder output twice (stride 16 -> 4) with conv-BN-ReLU after
each step and a final 1x1 conv. The text branch maps the sentence feature to one
``kernel_size x kernel_size`` conv kernel over ``in_dim`` channels plus one bias per sample,
which is applied to that sample's visual map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gtms.model.layers import conv_bn_relu


class Projector(nn.Module):
    """Decoder map [B, 2*in_dim, H/16, W/16] + sentence [B, word_dim] -> logits [B, 1, H/4, W/4]."""

    def __init__(self, *, word_dim: int, in_dim: int, kernel_size: int = 3):
        super().__init__()
        self.in_dim = in_dim
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(2 * in_dim, 2 * in_dim, kernel_size=3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(2 * in_dim, in_dim, kernel_size=3),
            nn.Conv2d(in_dim, in_dim, 1),
        )
        self.txt = nn.Linear(word_dim, in_dim * kernel_size**2 + 1)

    def forward(self, vis: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        x = self.vis(vis)  # [B, in_dim, H/4, W/4]
        b, c, h, w = x.shape
        params = self.txt(sentence)  # [B, in_dim*k*k + 1]
        kernels = params[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return self._per_offset(x, kernels, params[:, -1])
        # One group per sample: [1, B*in_dim, h, w] * [B, in_dim, k, k] -> [1, B, h, w]
        logits = F.conv2d(
            x.reshape(1, b * c, h, w),
            kernels,
            bias=params[:, -1],
            padding=self.kernel_size // 2,
            groups=b,
        )
        return logits.transpose(0, 1)  # [B, 1, H/4, W/4]

    def _per_offset(self, x: torch.Tensor, kernels: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
        """The same per-sample convolution as a sum over the kernel's offsets, for exporting
        (ONNX's ``Conv`` needs a constant group count; here the batch stays dynamic). Equal up
        to float rounding (the order of the sum differs)."""
        b, c, h, w = x.shape
        k = self.kernel_size
        padded = F.pad(x, (k // 2, k // 2, k // 2, k // 2))
        out = bias.reshape(b, 1, 1).expand(b, h, w)
        for dy in range(k):
            for dx in range(k):
                window = padded[:, :, dy:dy + h, dx:dx + w]
                out = out + torch.einsum("bchw,bc->bhw", window, kernels[:, :, dy, dx])
        return out.unsqueeze(1)
