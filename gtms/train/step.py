"""One training step: model, pseudo labels (:mod:`gtms.eval.validation` makes them the same
way for validation) and the loss terms of ``loss.mode``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtms.eval.validation import pseudo_labels_for, unwrap
from gtms.modes import get_mode
from gtms.pseudo import gtms_loss
from gtms.pseudo.attention_source import AttentionSource
from gtms.pseudo.losses import alignment_loss
from gtms.pseudo.pseudo_label import PseudoLabels


@dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor                 # [B, 1, S/4, S/4]
    pseudo: PseudoLabels | None


def compute_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, mode: str,
                   sigma: float, gamma: float, binarize_at: float = 0.0,
                   pixel: str = "l1", pixel_region: str = "box",
                   attention: AttentionSource | None = None,
                   align_weight: float = 0.0) -> StepOutput:
    """Forward, pseudo labels (modes ``tree`` / ``forest-gradcam``) and the loss terms. Only
    ``mask-bce`` trains on the batch's mask; other rows may carry it to be measured against."""
    out = model(batch["image"], batch["tokens"])
    pseudo = None
    if get_mode(mode).pseudo_label:
        pseudo = pseudo_labels_for(model, out, batch, mode=mode, sigma=sigma,
                                   binarize_at=binarize_at, attention=attention)
    terms = gtms_loss(mode, out.logits.float(), batch["box"],
                      pseudo_label=None if pseudo is None else pseudo.pseudo_label,
                      mask=batch.get("mask") if get_mode(mode).mask else None, gamma=gamma,
                      pixel=pixel,
                      pixel_region=pixel_region)
    if align_weight > 0:
        terms["align"] = alignment_loss(unwrap(model).global_image_embedding(out.layer4),
                                        out.sentence)
        terms["loss"] = terms["loss"] + align_weight * terms["align"]
    return StepOutput(terms, out.logits, pseudo)


