"""One validation step: the model's prediction scored against the mask, and the pseudo labels
(W, P-hat, GradCAM's health) it would train on, measured only. Training validates with it each
epoch; ``visualize`` draws its panels from it.

``model`` may be wrapped by DDP; the GTMS pseudo-label generator calls the unwrapped model's
CLIP attention pool (GradCAM), which needs no gradient synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gtms.eval.metrics import (
    AttentionMeter,
    SegmentationMeter,
    intersection_union,
    score_prediction,
)
from gtms.modes import get_mode
from gtms.pseudo import make_pseudo_labels
from gtms.pseudo.attention_source import AttentionSource, TrainedAttention
from gtms.pseudo.pseudo_label import PseudoLabels


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def pseudo_labels_for(model: torch.nn.Module, out, batch: dict[str, torch.Tensor], *, mode: str,
                      sigma: float, binarize_at: float = 0.0,
                      attention: AttentionSource | None = None) -> PseudoLabels:
    """GTMS pseudo labels of a batch: W (box or forest x GradCAM) and P-hat = filter(P * W).
    ``attention``: where GradCAM's map comes from (default: the model's own towers)."""
    cam = None
    if get_mode(mode).gradcam:
        source = attention if attention is not None else TrainedAttention()
        cam = source.cams(out, batch, unwrap(model))
    return make_pseudo_labels(
        out.logits, batch["box"], batch["parent"], batch["order"], batch["dist"], mode=mode,
        sigma=sigma, binarize_at=binarize_at, forest_labels=batch.get("forest"), cam=cam)


def add_attention(meter: AttentionMeter, pseudo: PseudoLabels | None,
                  batch: dict[str, Any]) -> None:
    """Count a batch's GradCAM health into ``meter`` (nothing for rows without GradCAM); the
    mask, when the batch has one, is only measured against."""
    if pseudo is None or pseudo.attention is None:
        return
    mask = batch.get("mask")
    meter.add(pseudo.attention.float().cpu().numpy(), pseudo.fallback.cpu().numpy(),
              np.asarray(torch.as_tensor(batch["box"]).cpu()),
              None if mask is None else np.asarray(torch.as_tensor(mask).cpu()))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Numeric numpy/torch columns -> tensors on ``device``; other columns pass through."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(value if value.flags.writeable else value.copy())
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        moved[key] = value
    return moved


@dataclass
class ValidationMeters:
    """Prediction quality at the original resolution, and pseudo-label quality at stride 4."""

    prediction: SegmentationMeter
    pseudo_label: SegmentationMeter
    weights: SegmentationMeter
    attention: AttentionMeter


def new_meters() -> ValidationMeters:
    return ValidationMeters(SegmentationMeter(), SegmentationMeter(), SegmentationMeter(),
                            AttentionMeter())


@torch.no_grad()
def validation_step(model: torch.nn.Module, batch: dict[str, Any], meters: ValidationMeters, *,
                    input_size: int, threshold: float, pseudo_mode: str | None,
                    sigma: float, binarize_at: float = 0.0,
                    attention: AttentionSource | None = None) -> dict[str, Any]:
    """Score one evaluation batch (numpy columns from the pipeline, eval meta included).

    Prediction: CRIS evaluation against the original mask. Pseudo labels (``pseudo_mode`` set
    and tree columns present): IoU of P-hat > threshold and of W > 0.5 against the mask at
    stride 4, and GradCAM's health (:class:`AttentionMeter`) — measured only, never used for
    training. Returns the tensors for image grids.
    """
    device = next(unwrap(model).parameters()).device
    tensors = to_device({k: v for k, v in batch.items() if k not in ("mask_rle", "sentence")},
                        device)
    out = unwrap(model)(tensors["image"], tensors["tokens"])
    probs = torch.sigmoid(out.logits.float())[:, 0].cpu().numpy()
    for i in range(len(probs)):
        meters.prediction.add(*score_prediction(probs[i], batch["orig_hw"][i],
                                                batch["mask_rle"][i], input_size, threshold))
    pseudo = None
    if pseudo_mode and "parent" in tensors:
        pseudo = pseudo_labels_for(model, out, tensors, mode=pseudo_mode, sigma=sigma,
                                   binarize_at=binarize_at, attention=attention)
        add_attention(meters.attention, pseudo, tensors)
        side = probs.shape[-1]
        masks = batch["mask"] > 0.5
        p_hat = pseudo.pseudo_label.reshape(len(probs), side, side).cpu().numpy()
        weights = pseudo.weights.reshape(len(probs), side, side).cpu().numpy()
        for i in range(len(probs)):
            meters.pseudo_label.add(*intersection_union(p_hat[i] > threshold, masks[i]))
            meters.weights.add(*intersection_union(weights[i] > 0.5, masks[i]))
    return {"probs": probs, "pseudo": pseudo}
