"""Fig. 5-style pictures: image + box + sentence, structural forest, A, W, P-hat, prediction, mask.

All panels are uint8 RGB ``[P, P, 3]`` under a caption strip; ``P`` is the letterboxed input size
unless a ``panel_size`` is asked for. Maps at stride 4 are upsampled with nearest neighbour so
the cells stay visible. :func:`overlay_mask` is the picture ``run.py predict`` writes: a mask
tinted on the original image, the sentence above it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from gtms.data.transforms import denormalize

PANEL_TITLES = ("image + box", "forest", "attention A", "weights W", "pseudo label P^",
                "prediction", "ground truth")
CAPTION_LINES = 3
OVERLAY_RGB = (255, 48, 48)
OUTLINE_RGB = (255, 255, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _to_uint8(img01: np.ndarray) -> np.ndarray:
    return (np.clip(img01, 0, 1) * 255).round().astype(np.uint8)


def heatmap(values: np.ndarray, size: int) -> np.ndarray:
    """``[h, w]`` in [0, 1] -> RGB ``[size, size, 3]`` (viridis-like colormap)."""
    grey = _to_uint8(np.asarray(values, np.float32))
    big = cv2.resize(grey, (size, size), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(cv2.applyColorMap(big, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def forest_colours(labels: np.ndarray, side: int, size: int) -> np.ndarray:
    """Forest labels ``[N]`` (-1 outside the box) -> a colour per sub-tree, black outside."""
    labels = np.asarray(labels).reshape(side, side)
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 256, size=(labels.size + 1, 3), dtype=np.uint8)
    _, dense = np.unique(labels, return_inverse=True)
    out = palette[dense.reshape(side, side)]
    out[labels < 0] = 0
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_NEAREST)


def caption(panel: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in a white strip above ``panel`` (word-wrapped, at most 3 lines).

    The strip's height depends only on the panel's width, so captioned panels of one width line
    up when concatenated side by side.
    """
    size = panel.shape[1]
    scale = max(size / 600, 0.35)
    thickness = max(1, round(scale))
    (alphabet_w, text_h), baseline = cv2.getTextSize(_ALPHABET, _FONT, scale, thickness)
    chars = max(int(0.9 * (size - 4) * len(_ALPHABET) / alphabet_w), 8)
    lines = textwrap.wrap(text, chars, max_lines=CAPTION_LINES, placeholder=" ...") or [""]
    line_h = text_h + baseline + 3
    strip = np.full((line_h * CAPTION_LINES + 4, size, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(strip, line, (2, line_h * k + text_h + 3), _FONT, scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def image_with_box(image_chw: np.ndarray, box_at_stride: np.ndarray,
                   size: int | None = None) -> np.ndarray:
    """Normalised image ``[3, S, S]`` + box raster -> RGB ``[size, size, 3]`` (default S) with the
    box outline in red."""
    img = _to_uint8(denormalize(image_chw))
    size = size or img.shape[0]
    if size != img.shape[0]:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    img = np.ascontiguousarray(img)
    ys, xs = np.nonzero(box_at_stride)
    if len(ys):
        k = size / box_at_stride.shape[0]
        cv2.rectangle(img, (int(xs.min() * k), int(ys.min() * k)),
                      (int((xs.max() + 1) * k) - 1, int((ys.max() + 1) * k) - 1),
                      (255, 0, 0), max(1, size // 128))
    return img


def fallback_titles(titles: Sequence[str], pseudo, i: int) -> list[str]:
    """``titles`` with the A and W panels of sample ``i`` marked when its GradCAM map was zero
    in the box (``pseudo.fallback[i]``): A is then the box itself, and so is W."""
    titles = list(titles)
    if pseudo is not None and pseudo.fallback is not None and bool(pseudo.fallback[i]):
        titles[2] = f"{titles[2]}: FALLBACK, map 0 in box"
        titles[3] = f"{titles[3]} (= box)"
    return titles


def sample_row(batch: dict[str, Any], result: dict[str, Any], i: int, *,
               panel_size: int | None = None,
               titles: Sequence[str] = PANEL_TITLES) -> list[np.ndarray]:
    """The panels of sample ``i``: image+box+text, forest, A, W, P-hat, prediction, GT.

    ``batch`` holds pipeline columns (numpy) of an evaluation batch, ``result`` the
    ``{"probs", "pseudo"}`` of :func:`gtms.eval.validation.validation_step`. Panels are
    ``panel_size`` wide (default: the input size); ``titles[1:]`` caption panels 2-7 (the first
    panel is captioned with the sentence).
    """
    image = batch["image"][i]
    size = panel_size or image.shape[-1]
    side = batch["box"].shape[-1]
    blank = np.zeros((side, side), np.float32)
    pseudo = result.get("pseudo")

    def cells(t):
        return blank if t is None else np.asarray(t[i].detach().cpu()).reshape(side, side)

    text = str(batch["sentence"][i]) if "sentence" in batch else ""
    panels = [caption(image_with_box(image, batch["box"][i], size), text)]
    forest = batch.get("forest")
    panels.append(caption(forest_colours(forest[i], side, size) if forest is not None
                          else np.zeros((size, size, 3), np.uint8), titles[1]))
    maps = [cells(pseudo.attention) if pseudo is not None else blank,
            cells(pseudo.weights) if pseudo is not None else blank,
            cells(pseudo.pseudo_label) if pseudo is not None else blank,
            result["probs"][i],
            batch["mask"][i] if "mask" in batch else blank]
    for title, values in zip(fallback_titles(titles, pseudo, i)[2:], maps):
        panels.append(caption(heatmap(values, size), title))
    return panels


def sample_panels(batch: dict[str, Any], result: dict[str, Any], max_samples: int = 4):
    """A grid: one row of panels per sample (up to ``max_samples``)."""
    n = min(max_samples, len(batch["image"]))
    rows = [np.concatenate(sample_row(batch, result, i), axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)


def overlay_mask(image_rgb: np.ndarray, mask: np.ndarray, text: str, *, alpha: float = 0.5,
                 tint: tuple[int, int, int] = OVERLAY_RGB) -> np.ndarray:
    """The mask tinted on the image and outlined, the sentence in a strip above.

    ``image_rgb`` uint8 ``[H, W, 3]`` and ``mask`` ``[H, W]`` (nonzero = in) at the original
    resolution -> uint8 ``[T + H, W, 3]``: a caption strip of ``T`` rows, then the image.
    """
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image_rgb.shape} differ in (H, W)")
    inside = np.asarray(mask) != 0
    out = image_rgb.copy()
    blend = (1 - alpha) * out[inside].astype(np.float32) + alpha * np.float32(tint)
    out[inside] = blend.round().astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, OUTLINE_RGB, max(1, max(out.shape[:2]) // 256))
    return caption(out, text)


def write_png(path, image_rgb: np.ndarray) -> None:
    """Write an RGB ``[H, W, 3]`` or grey ``[H, W]`` uint8 array as PNG; OSError on failure."""
    bgr = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    try:
        ok = cv2.imwrite(str(path), bgr)
    except cv2.error as err:
        raise OSError(f"cannot write {path}: {err}") from None
    if not ok:
        raise OSError(f"cannot write {path} (missing folder or no permission?)")
