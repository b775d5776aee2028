"""Optimiser and learning-rate schedule from the ``optim`` config section."""

from __future__ import annotations

import torch

from gtms.config import OptimConfig
from gtms.model.build import param_groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam/AdamW over the backbone (lr x ``backbone_lr_mult``) and the head (lr)."""
    groups = param_groups(model, lr=cfg.lr, backbone_lr_mult=cfg.backbone_lr_mult)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig):
    """MultiStepLR stepped once per epoch: lr x ``lr_decay`` at each milestone epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones),
                                                gamma=cfg.lr_decay)
