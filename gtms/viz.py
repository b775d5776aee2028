"""Fig. 5-style pictures: image + box + sentence, structural forest, A, W, P-hat, prediction, mask.

All panels are uint8 RGB ``[P, P, 3]`` at the letterboxed input size; maps at stride 4 are
upsampled with nearest neighbour so the cells stay visible.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from gtms.data.transforms import denormalize

PANEL_TITLES = ("image + box", "forest", "attention A", "weights W", "pseudo label P^",
                "prediction", "ground truth")


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
    """Write ``text`` in a strip above ``panel`` (wrapped to the panel width)."""
    size = panel.shape[1]
    scale = max(size / 400, 0.3)
    chars = max(int(size / (9 * scale)), 8)
    lines = [text[i:i + chars] for i in range(0, len(text), chars)][:3] or [""]
    line_h = int(16 * scale) + 4
    strip = np.full((line_h * 3 + 4, size, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(strip, line, (2, line_h * (k + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def image_with_box(image_chw: np.ndarray, box_at_stride: np.ndarray) -> np.ndarray:
    """Normalised image ``[3, S, S]`` + box raster -> RGB with the box outline in red."""
    img = np.ascontiguousarray(_to_uint8(denormalize(image_chw)))
    size = img.shape[0]
    ys, xs = np.nonzero(box_at_stride)
    if len(ys):
        k = size / box_at_stride.shape[0]
        cv2.rectangle(img, (int(xs.min() * k), int(ys.min() * k)),
                      (int((xs.max() + 1) * k) - 1, int((ys.max() + 1) * k) - 1),
                      (255, 0, 0), max(1, size // 128))
    return img


def sample_row(batch: dict[str, Any], result: dict[str, Any], i: int) -> list[np.ndarray]:
    """The panels of sample ``i``: image+box+text, forest, A, W, P-hat, prediction, GT."""
    image = batch["image"][i]
    size = image.shape[-1]
    side = batch["box"].shape[-1]
    blank = np.zeros((side, side), np.float32)
    pseudo = result.get("pseudo")

    def cells(t):
        return blank if t is None else np.asarray(t[i].detach().cpu()).reshape(side, side)

    text = str(batch["sentence"][i]) if "sentence" in batch else ""
    panels = [caption(image_with_box(image, batch["box"][i]), text)]
    forest = batch.get("forest")
    panels.append(caption(forest_colours(forest[i], side, size) if forest is not None
                          else np.zeros((size, size, 3), np.uint8), PANEL_TITLES[1]))
    maps = [cells(pseudo.attention) if pseudo is not None else blank,
            cells(pseudo.weights) if pseudo is not None else blank,
            cells(pseudo.pseudo_label) if pseudo is not None else blank,
            result["probs"][i],
            batch["mask"][i] if "mask" in batch else blank]
    for title, values in zip(PANEL_TITLES[2:], maps):
        panels.append(caption(heatmap(values, size), title))
    return panels


def sample_panels(batch: dict[str, Any], result: dict[str, Any], max_samples: int = 4):
    """A grid: one row of panels per sample (up to ``max_samples``)."""
    n = min(max_samples, len(batch["image"]))
    rows = [np.concatenate(sample_row(batch, result, i), axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)
