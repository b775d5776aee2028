"""Vertex weights W (Alg. 1, lines 7-19) and pseudo label P-hat (Eq. 4).

* ``W``: every in-box vertex gets the largest attention score of its sub-tree of the structural
  forest; vertices outside the box get 0.
* ``P-hat = TreeFilter(P * W)`` over the whole-image tree, with ``P = sigmoid(logits)``; soft and
  detached (the paper), or binarised at a fraction of its in-box maximum (``binarize_at``, ours).

Why binarise (measured on SynthRef v2, tiny preset from SynthCLIP weights, see the README): with
the soft label, L_pix = |P - P-hat| pulls every sub-tree whose weight W < 1 towards W * P, then
towards W * (W * P) on the next steps: a contraction whose only fixed point is 0 wherever
GradCAM is not at its peak. Full GTMS then collapsed within two epochs (val P-hat mean IoU 0.61
-> 0.10, P 0.20 -> 0.13) while the tree row (W = box, so no contraction inside the object) did
not. A binary P-hat (1 where the filtered P * W reaches half its in-box maximum) keeps the
weights' ranking and removes the contraction.

:func:`make_pseudo_labels` is the one entry point of the training step. Its ``mode`` is an
ablation row of Table 2: ``tree`` uses ``W`` = box indicator (no forest, no GradCAM),
``forest-gradcam`` is full GTMS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from gtms.modes import PSEUDO_LABEL_MODES, get_mode
from gtms.pseudo.forest import forest_maxima
from gtms.pseudo.gradcam import attention_from_cam, gradcam_cam
from gtms.pseudo.tree_filter import tree_filter_torch


class PseudoLabels(NamedTuple):
    """What the pseudo-label engine produced for one batch (all detached, ``[B, H4, W4]``).

    Attributes:
        attention: GradCAM attention ``A`` in [0, 1]; ``None`` in mode ``tree``.
        weights: vertex weights ``W`` (0 outside the box).
        pseudo_label: the soft pseudo label ``P-hat`` in [0, 1].
        fallback: ``[B]`` bool, A was zero in the sample's box and fell back to the box (so W
            is the box and P-hat the tree row's); ``None`` in mode ``tree``.
    """

    attention: torch.Tensor | None
    weights: torch.Tensor
    pseudo_label: torch.Tensor
    fallback: torch.Tensor | None = None


def vertex_weights(attention: torch.Tensor, forest_labels: torch.Tensor) -> torch.Tensor:
    """Sub-tree maximum of the attention, broadcast to the sub-tree's vertices.

    Args:
        attention: ``A [B, N]`` float, non-negative (GradCAM maps are in [0, 1]; negative
            values would be raised to 0).
        forest_labels: ``[B, N]`` int sub-tree labels in ``[0, N)``, ``-1`` outside the box (see
            :func:`gtms.pseudo.forest.structural_forest`).

    Returns:
        ``W [B, N]`` in ``attention``'s dtype and on its device, 0 outside the box.

    On the CPU this is one pass of a numba kernel (:func:`~gtms.pseudo.forest.forest_maxima`,
    which also checks the labels' range); elsewhere a scatter-max over per-sample slots.
    """
    if attention.shape != forest_labels.shape or attention.ndim != 2:
        raise ValueError(
            f"attention and forest_labels must both be [B, N], got {tuple(attention.shape)} "
            f"and {tuple(forest_labels.shape)}"
        )
    if attention.device.type == "cpu" and attention.dtype in (torch.float32, torch.float64):
        labels = torch.as_tensor(forest_labels, device="cpu")
        return torch.from_numpy(forest_maxima(attention.detach().numpy(), labels.numpy()))
    return _scatter_max(attention, forest_labels)


def _scatter_max(attention: torch.Tensor, forest_labels: torch.Tensor) -> torch.Tensor:
    """:func:`vertex_weights` on any device: scatter-max into per-sample slots (labels are not
    range-checked: that would synchronise with the device)."""
    batch, n = attention.shape
    # One slot per (sample, sub-tree) plus a slot 0 per sample that collects the outside.
    offset = torch.arange(batch, device=attention.device).unsqueeze(1) * (n + 1) + 1
    index = (forest_labels.to(device=attention.device, dtype=torch.long) + offset).reshape(-1)
    slots = attention.new_zeros(batch * (n + 1))
    slots.scatter_reduce_(0, index, attention.reshape(-1), reduce="amax", include_self=True)
    slots.view(batch, n + 1)[:, 0] = 0
    return slots.index_select(0, index).view(batch, n)


def pseudo_label(
    probs: torch.Tensor, weights: torch.Tensor, parent, order, dist, sigma: float
) -> torch.Tensor:
    """``P-hat = TreeFilter(P * W)`` (Eq. 4), detached.

    Args:
        probs: ``P [B, N]`` predicted probabilities.
        weights: ``W [B, N]`` vertex weights.
        parent, order, dist: ``[B, N]`` whole-image trees (tensors or arrays), see
            :class:`gtms.pseudo.tree.GridTree`.
        sigma: affinity temperature of Eq. 3 (0.02 in the paper).

    Returns:
        ``[B, N]`` soft pseudo label on ``probs``' device and dtype.
    """
    return tree_filter_torch(probs.detach() * weights.detach(), parent, order, dist, sigma)


def binarize_relative(label: torch.Tensor, box: torch.Tensor, fraction: float) -> torch.Tensor:
    """``1[label >= fraction * max over the box]`` inside the box, 0 elsewhere (and 0 for a box
    whose label is all zero). ``label``, ``box``: ``[B, N]``; returns ``label``'s dtype."""
    inside = box > 0
    peak = torch.where(inside, label, torch.zeros_like(label)).amax(dim=1, keepdim=True)
    return ((label >= fraction * peak) & inside & (peak > 0)).to(label.dtype)


def filtered_label(probs: torch.Tensor, weights: torch.Tensor, box: torch.Tensor, parent, order,
                   dist, *, sigma: float, binarize_at: float = 0.0) -> torch.Tensor:
    """``P-hat`` from ``P [B, N]`` and any ``W [B, N]``: the filter of Eq. 4, then (with
    ``binarize_at`` > 0) :func:`binarize_relative` inside ``box [B, N]``. The one place the
    training step and ``eval --pseudo-labels`` turn weights into a pseudo label."""
    label = pseudo_label(probs, weights, parent, order, dist, sigma)
    if binarize_at > 0:
        label = binarize_relative(label, box, binarize_at)
    return label


def _probs_at_stride4(logits: torch.Tensor, box_at_stride4: torch.Tensor) -> torch.Tensor:
    """``P = sigmoid(logits)``, detached float ``[B, H4, W4]``; a ValueError when ``logits``
    (``[B, 1, H4, W4]`` or ``[B, H4, W4]``) do not match the box raster ``[B, H4, W4]``."""
    probs = torch.sigmoid(logits.detach().float())
    if probs.ndim == 4:
        probs = probs[:, 0]
    if probs.shape != box_at_stride4.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match box_at_stride4 "
            f"{tuple(box_at_stride4.shape)}"
        )
    return probs


def _gradcam_weights(
    mode: str,
    box: torch.Tensor,
    *,
    forest_labels: torch.Tensor | None,
    layer4: torch.Tensor | None,
    sentence: torch.Tensor | None,
    global_embedding: Callable[[torch.Tensor], torch.Tensor] | None,
    cam: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W from the structural forest and GradCAM: (attention ``A [B, H4, W4]``, fallback
    ``[B]``, ``W [B, N]``). ``box``: ``[B, H4, W4]`` on the device and in the dtype of P; the
    other arguments as in :func:`make_pseudo_labels` (a ValueError names those ``mode``
    lacks)."""
    needed = dict(forest_labels=forest_labels) if cam is not None else dict(
        forest_labels=forest_labels,
        layer4=layer4,
        sentence=sentence,
        global_embedding=global_embedding,
    )
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ValueError(f"mode {mode!r} needs {', '.join(missing)}")
    if cam is None:
        cam = gradcam_cam(layer4, sentence, global_embedding)
    attention, fallback = attention_from_cam(cam.to(box.device), box)
    labels = torch.as_tensor(forest_labels, device=box.device)
    weights = vertex_weights(attention.reshape(box.shape[0], -1), labels)
    return attention, fallback, weights


def make_pseudo_labels(
    logits: torch.Tensor, box_at_stride4: torch.Tensor, parent, order, dist, *, mode: str,
    sigma: float, binarize_at: float = 0.0, forest_labels: torch.Tensor | None = None,
    layer4: torch.Tensor | None = None, sentence: torch.Tensor | None = None,
    global_embedding: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cam: torch.Tensor | None = None,
) -> PseudoLabels:
    """All pseudo-label work of one training step.

    Args:
        logits: ``[B, 1, H4, W4]`` (or ``[B, H4, W4]``) mask logits at the output stride.
        box_at_stride4: ``[B, H4, W4]`` 0/1 float (or bool) box raster.
        parent, order, dist: ``[B, N]`` whole-image trees, ``N = H4 * W4``.
        mode: ``"tree"`` (W = box) or ``"forest-gradcam"`` (W from forest + GradCAM).
        sigma: affinity temperature of Eq. 3.
        binarize_at: 0 keeps the soft P-hat of Eq. 4; in (0, 1], P-hat becomes 1 where it
            reaches this fraction of its maximum inside the box, else 0 (see the module doc).
        forest_labels: ``[B, N]`` sub-tree labels (mode ``forest-gradcam`` only).
        layer4: ``[B, C, h, w]`` layer-4 features (mode ``forest-gradcam`` only).
        sentence: ``[B, D]`` sentence features (mode ``forest-gradcam`` only).
        global_embedding: ``[B, C, h, w] -> [B, D]`` attention pool (mode ``forest-gradcam``).
        cam: ``[B, h, w]`` raw GradCAM computed elsewhere (a frozen attention source,
            :mod:`gtms.pseudo.attention_source`); replaces ``layer4``, ``sentence`` and
            ``global_embedding``.

    Returns:
        :class:`PseudoLabels` with ``[B, H4, W4]`` tensors, all detached.
    """
    if not get_mode(mode).pseudo_label:
        raise ValueError(f"mode must be one of {PSEUDO_LABEL_MODES}, got {mode!r}")
    probs = _probs_at_stride4(logits, box_at_stride4)
    batch, height, width = probs.shape
    box = box_at_stride4.to(device=probs.device, dtype=probs.dtype)
    attention = fallback = None
    if get_mode(mode).gradcam:
        attention, fallback, weights = _gradcam_weights(
            mode, box, forest_labels=forest_labels, layer4=layer4, sentence=sentence,
            global_embedding=global_embedding, cam=cam)
    else:
        weights = box.reshape(batch, -1)
    label = filtered_label(probs.reshape(batch, -1), weights, box.reshape(batch, -1), parent,
                           order, dist, sigma=sigma, binarize_at=binarize_at)
    return PseudoLabels(attention=attention, weights=weights.reshape(batch, height, width),
                        pseudo_label=label.reshape(batch, height, width), fallback=fallback)
