"""GradCAM attention A (Sec. 3.2): where the sentence is in the image, according to CLIP.

``F`` are the backbone's layer-4 features before attention pooling; ``g`` is CLIP's global image
embedding computed from ``F`` by the backbone's own attention pool; ``s = cos(g, t)`` with ``t``
the sentence feature. With ``alpha_c`` the spatial mean of ``ds / dF_c``,
``A = ReLU(sum_c alpha_c F_c)``, bilinearly upsampled to the output stride and divided by its
maximum inside the box. A sample whose map is zero everywhere inside the box falls back to the
box indicator, and says so (:class:`Attention`): that share is GTMS's health figure, reported
every epoch (:class:`gtms.eval.metrics.AttentionMeter`).

Gradients are taken with :func:`torch.autograd.grad` with respect to ``F`` only: no parameter's
``.grad`` is touched, and the graph is built under :func:`torch.enable_grad`, so this works inside
``torch.no_grad()`` too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as nnf


def gradcam_cam(
    layer4: torch.Tensor,
    sentence: torch.Tensor,
    global_embedding: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Raw GradCAM ``ReLU(sum_c alpha_c F_c)`` at layer 4's resolution: ``[B, h, w]`` float32,
    detached, not normalised. Small enough to keep per sentence (a frozen attention source
    caches it, :class:`gtms.pseudo.attention_source.FrozenAttention`)."""
    with torch.enable_grad():
        features = layer4.detach().requires_grad_(True)
        image_embedding = global_embedding(features)
        text = sentence.detach().to(image_embedding.dtype)
        score = nnf.cosine_similarity(image_embedding, text, dim=-1)  # [B]
        (grad,) = torch.autograd.grad(score.sum(), features)
    alpha = grad.float().mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
    return torch.relu((alpha * features.detach().float()).sum(dim=1))  # [B, h, w]


def upsample_cam(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]`` raw map -> ``[B, *size]``, bilinear (the output stride's grid)."""
    return nnf.interpolate(cam[:, None].float(), size=tuple(size), mode="bilinear",
                           align_corners=False)[:, 0]


def gradcam_map(
    layer4: torch.Tensor,
    sentence: torch.Tensor,
    global_embedding: Callable[[torch.Tensor], torch.Tensor],
    size: tuple[int, int],
) -> torch.Tensor:
    """Raw GradCAM bilinearly upsampled to ``size``: ``[B, *size]`` float32, detached, not
    normalised (see :func:`gradcam_attention`)."""
    return upsample_cam(gradcam_cam(layer4, sentence, global_embedding), size)


class Attention(NamedTuple):
    """``A [B, H4, W4]`` in [0, 1] and ``fallback [B]`` bool: the sample's map was zero (or not
    finite) everywhere in its box, so ``A`` is the box indicator there."""

    map: torch.Tensor
    fallback: torch.Tensor


def attention_from_cam(cam: torch.Tensor, box_at_stride4: torch.Tensor) -> Attention:
    """Raw GradCAM ``[B, h, w]`` (any resolution) -> :class:`Attention` on the box's grid:
    upsampled, divided by its maximum inside the box, the box itself where that is zero."""
    if cam.ndim != 3 or box_at_stride4.ndim != 3:
        raise ValueError(f"expected cam [B, h, w] and box_at_stride4 [B, H4, W4]; got "
                         f"{tuple(cam.shape)}, {tuple(box_at_stride4.shape)}")
    attention = upsample_cam(cam.detach(), box_at_stride4.shape[-2:])
    box = box_at_stride4.to(device=attention.device, dtype=attention.dtype)
    in_box_max = (attention * box).amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]; cam >= 0
    usable = torch.isfinite(in_box_max) & (in_box_max > 0)
    attention.div_(torch.where(usable, in_box_max, torch.ones_like(in_box_max))).clamp_(max=1.0)
    fallback = ~usable[:, 0, 0]
    if fallback.any():
        attention[fallback] = box[fallback]
    return Attention(attention, fallback)


def gradcam_attention(
    layer4: torch.Tensor,
    sentence: torch.Tensor,
    global_embedding: Callable[[torch.Tensor], torch.Tensor],
    box_at_stride4: torch.Tensor,
) -> torch.Tensor:
    """GradCAM map of the sentence-image cosine score, normalised inside the box.

    Args:
        layer4: ``[B, C, h, w]`` layer-4 features (detached here).
        sentence: ``[B, D]`` sentence features (detached here).
        global_embedding: maps ``[B, C, h, w]`` features to ``[B, D]`` global image embeddings
            (the backbone's attention pool).
        box_at_stride4: ``[B, H4, W4]`` 0/1 float (or bool) box raster at the output stride.

    Returns:
        ``A [B, H4, W4]`` float32 in [0, 1], detached; 1 at the in-box maximum (see
        :func:`attention_from_cam` for which samples fell back to the box).
    """
    if layer4.ndim != 4 or sentence.ndim != 2 or box_at_stride4.ndim != 3:
        raise ValueError(
            "expected layer4 [B, C, h, w], sentence [B, D], box_at_stride4 [B, H4, W4]; got "
            f"{tuple(layer4.shape)}, {tuple(sentence.shape)}, {tuple(box_at_stride4.shape)}"
        )
    return attention_from_cam(gradcam_cam(layer4, sentence, global_embedding),
                              box_at_stride4).map
