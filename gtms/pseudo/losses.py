"""Losses (Sec. 3.4, Eq. 5-8) and the ablation rows of Table 2.

* ``L_loc`` (Eq. 5-6), projection Dice: ``Dice(max_x P, max_x B) + Dice(max_y P, max_y B)``
  with ``Dice(x, t) = 1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + 1e-5)`` per sample.
* ``L_pix`` (Eq. 7): ``sum_{i in box} |P_i - P-hat_i| / |box|`` per sample; or (``pixel="bce"``,
  ours) the binary cross-entropy of the logits against ``P-hat``, averaged over the box the same
  way. Through the sigmoid, L1's gradient on a logit is ``sigmoid'(z)``: a pixel at P = 0.05
  whose label is 1 gets 0.05 of a push, BCE gives it 0.95, so a model that fell below its
  label can climb back. ``region="image"`` (ours) sums the same error over every pixel of
  the image, with the target 0 outside the box, and still divides by the box's area: each
  pixel keeps the paper's weight, and a prediction outside the box is penalised too. The
  paper's ``L_pix`` leaves it to ``L_loc`` alone, which sees a pixel in the box's rows (or
  columns) through one projection and only where it is that projection's maximum.
* ``L = L_loc + gamma L_pix`` (Eq. 8).
* Baselines: BCE-with-logits against the mask (``mask-bce``, fully supervised CRIS) or against
  the box (``box-bce``).

Every term is averaged over the batch. Each loss returns a dict of named 0-d tensors with the
total under ``"loss"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from gtms.modes import get_mode

DICE_EPS = 1e-5


def _as_bhw(name: str, t: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` or ``[B, H, W]`` -> ``[B, H, W]``."""
    if t.ndim == 4 and t.shape[1] == 1:
        return t[:, 0]
    if t.ndim == 3:
        return t
    raise ValueError(f"{name} must be [B, 1, H, W] or [B, H, W], got {tuple(t.shape)}")


def dice_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + 1e-5)`` per sample: ``[B, L]`` -> ``[B]``."""
    inter = (x * target).sum(dim=1)
    denom = (x * x).sum(dim=1) + (target * target).sum(dim=1) + DICE_EPS
    return 1.0 - 2.0 * inter / denom


def location_loss(probs: torch.Tensor, box: torch.Tensor) -> dict[str, torch.Tensor]:
    """Projection Dice ``L_loc`` (Eq. 5-6).

    Args:
        probs: ``P [B, H, W]`` (or ``[B, 1, H, W]``) probabilities.
        box: ``[B, H, W]`` 0/1 box raster.

    Returns:
        ``{"loss", "loc"}``, both the batch mean of ``L_loc``.
    """
    probs = _as_bhw("probs", probs)
    box = _as_bhw("box", box).to(probs.dtype)
    per_row = dice_loss(probs.amax(dim=2), box.amax(dim=2))  # max over x: [B, H]
    per_col = dice_loss(probs.amax(dim=1), box.amax(dim=1))  # max over y: [B, W]
    loc = (per_row + per_col).mean()
    return {"loss": loc, "loc": loc}


PIXEL_LOSSES = ("l1", "bce")


PIXEL_REGIONS = ("box", "image")


def pixel_loss(
    logits: torch.Tensor, pseudo_label: torch.Tensor, box: torch.Tensor, kind: str = "l1",
    region: str = "box",
) -> dict[str, torch.Tensor]:
    """``L_pix`` (Eq. 7): the per-pixel error to the pseudo label, averaged inside the box.

    Args:
        logits: mask logits ``[B, H, W]`` (or ``[B, 1, H, W]``); ``P = sigmoid(logits)``.
        pseudo_label: ``P-hat`` of the same shape (detached here).
        box: ``[B, H, W]`` 0/1 box raster; an empty box contributes 0.
        kind: ``"l1"`` = ``|P - P-hat|`` (the paper) or ``"bce"`` (ours, see the module doc).
        region: ``"box"`` (the paper) or ``"image"``: summed over every pixel with the
            target ``P-hat * box`` (0 outside the box), divided by the box's area as in the
            paper (ours, see the module doc).

    Returns:
        ``{"loss", "pix"}``, both the batch mean of ``L_pix``.
    """
    logits = _as_bhw("logits", logits)
    target = _as_bhw("pseudo_label", pseudo_label).detach().to(logits.dtype)
    box = _as_bhw("box", box).to(logits.dtype)
    if region not in PIXEL_REGIONS:
        raise ValueError(f"pixel loss region must be one of {PIXEL_REGIONS}, got {region!r}")
    if region == "image":
        target = target * box
    if kind == "l1":
        error = (torch.sigmoid(logits) - target).abs()
    elif kind == "bce":
        error = nnf.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        raise ValueError(f"pixel loss must be one of {PIXEL_LOSSES}, got {kind!r}")
    area = box.sum(dim=(1, 2))
    counted = (error if region == "image" else error * box).sum(dim=(1, 2))
    pix = torch.where(area > 0, counted / area.clamp(min=1.0), torch.zeros_like(area)).mean()
    return {"loss": pix, "pix": pix}


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE-with-logits averaged over pixels and batch; ``[B, H, W]`` (or ``[B, 1, H, W]``).

    Returns:
        ``{"loss", "bce"}``.
    """
    logits = _as_bhw("logits", logits)
    target = _as_bhw("target", target).to(logits.dtype)
    bce = nnf.binary_cross_entropy_with_logits(logits, target)
    return {"loss": bce, "bce": bce}


def gtms_loss(
    mode: str,
    logits: torch.Tensor,
    box: torch.Tensor,
    *,
    pseudo_label: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gamma: float = 0.0,
    pixel: str = "l1",
    pixel_region: str = "box",
) -> dict[str, torch.Tensor]:
    """The training loss of one ablation row.

    Args:
        mode: one of :data:`ABLATION_MODES`.
        logits: ``[B, 1, H4, W4]`` (or ``[B, H4, W4]``) mask logits at the output stride.
        box: ``[B, H4, W4]`` box raster.
        pseudo_label: ``P-hat [B, H4, W4]`` (modes ``tree`` and ``forest-gradcam``).
        mask: ``[B, H4, W4]`` ground-truth mask (mode ``mask-bce``).
        gamma: weight of ``L_pix`` (see :func:`gtms.pseudo.schedules.gamma_at`).
        pixel, pixel_region: the per-pixel error of ``L_pix`` and where it is averaged, see
            :func:`pixel_loss`.

    Returns:
        ``mask-bce`` / ``box-bce``: ``{"loss", "bce"}``; ``box-lloc``: ``{"loss", "loc"}``;
        ``tree`` / ``forest-gradcam``: ``{"loss", "loc", "pix", "gamma"}`` with
        ``loss = loc + gamma * pix``.
    """
    loss = get_mode(mode).loss
    box = _as_bhw("box", box).to(logits.dtype)
    if loss == "bce-mask":
        if mask is None:
            raise ValueError(f"mode {mode!r} needs mask")
        return bce_loss(logits, mask)
    if loss == "bce-box":
        return bce_loss(logits, box)
    probs = torch.sigmoid(_as_bhw("logits", logits))
    loc = location_loss(probs, box)["loc"]
    if loss == "loc":
        return {"loss": loc, "loc": loc}
    if pseudo_label is None:
        raise ValueError(f"mode {mode!r} needs pseudo_label")
    if loss != "loc+pix":
        raise ValueError(f"mode {mode!r}: no loss {loss!r} in gtms_loss")
    pix = pixel_loss(logits, pseudo_label, box, pixel, pixel_region)["pix"]
    gamma_t = torch.as_tensor(float(gamma), dtype=loc.dtype, device=loc.device)
    return {"loss": loc + gamma_t * pix, "loc": loc, "pix": pix, "gamma": gamma_t}


def alignment_loss(image_embedding: torch.Tensor, sentence: torch.Tensor,
                   temperature: float = 0.07) -> torch.Tensor:
    """CLIP's contrastive objective on a batch (ours, ``loss.align_weight``): symmetric
    cross-entropy of the cosine similarities ``[B, B]`` / ``temperature``, each image's own
    sentence the positive. ``image_embedding`` ``[B, D]`` (CLIP's global embedding),
    ``sentence`` ``[B, D]``; 0-d tensor. Refs of one image are false negatives here."""
    image = nnf.normalize(image_embedding.float(), dim=-1)
    text = nnf.normalize(sentence.float(), dim=-1)
    logits = image @ text.t() / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.t(), target))
