"""Small building blocks shared by the CRIS neck and projector.

Their ``nn.Sequential`` layout fixes the parameter names of CRIS checkpoints
(``<name>.0.weight`` for the conv/linear, ``<name>.1.*`` for the batch norm).
"""

from __future__ import annotations

from torch import nn


def conv_bn_relu(in_dim: int, out_dim: int, *, kernel_size: int = 1) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding for odd kernels) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
    )


def linear_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias) -> BatchNorm1d -> ReLU; in training mode it needs a batch of 2 or more."""
    return nn.Sequential(
        nn.Linear(in_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
        nn.ReLU(inplace=True),
    )
