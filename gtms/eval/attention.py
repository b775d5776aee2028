"""The attention source a config asks for (``pseudo.attention_source``), built for a device."""

from __future__ import annotations

import torch

from gtms.config import Config
from gtms.model.build import starting_backbone
from gtms.pseudo.attention_source import AttentionSource, FrozenAttention, TrainedAttention


def attention_sources(cfg: Config, device: torch.device,
                      roles: tuple[str, ...] = ("train", "val")) -> dict[str, AttentionSource]:
    """One attention source per split role. ``frozen``: the run's starting towers
    (:func:`gtms.model.build.starting_backbone`), shared, with a cache per role."""
    if cfg.pseudo.attention_source == "trained":
        return {role: TrainedAttention() for role in roles}
    backbone = starting_backbone(cfg.model.preset, word_len=cfg.data.word_len,
                                 clip_weights=cfg.model.clip_weights,
                                 init_checkpoint=cfg.model.init_checkpoint,
                                 seed=cfg.train.seed).to(device)
    return {role: FrozenAttention(backbone) for role in roles}
