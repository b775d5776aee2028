"""What SynthCLIP pretraining is for, measured: retrieval, and where GradCAM points.

- **text->image R@K**: for each val sentence, is its own scene among the K scenes with the
  highest cosine similarity (all distinct val scenes are the gallery)?
- **pointing in the box**: does the argmax of GradCAM's A inside the box lie on the object's
  mask? Chance = the mask's mean share of the box cells (a uniformly random in-box cell).
- **pointing over the image**: the same over the whole (letterboxed) image; chance = the mask's
  share of all cells.
- **A contrast**: mean A on the mask minus mean A off the mask, both inside the box (A divided by
  its in-box maximum, as GTMS uses it). Positive means GradCAM separates object from box
  background, which is what the vertex weights W need.
"""

from __future__ import annotations

import numpy as np
import torch


def recall_at_k(text: torch.Tensor, image: torch.Tensor, image_index, ks=(1, 5)) -> dict:
    """text ``[N, D]``, image ``[M, D]`` (unit rows), ``image_index[n]`` = text n's image."""
    similarity = text @ image.t()                                     # [N, M]
    own = similarity[torch.arange(len(text)), torch.as_tensor(image_index)]
    rank = (similarity > own[:, None]).sum(dim=1)                      # 0 = best
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def pointing(raw_cam: np.ndarray, attention: np.ndarray, box: np.ndarray,
             mask: np.ndarray) -> dict:
    """Pointing accuracies, their chance levels and the A contrast.

    ``raw_cam``: un-normalised GradCAM ``[N, h, w]``; ``attention``: A normalised inside the box
    ``[N, h, w]``; ``box``/``mask``: ``{0, 1}`` rasters ``[N, h, w]``. Refs whose mask misses
    the box raster are left out of the in-box figures (no cell to hit).
    """
    box, mask = box > 0.5, mask > 0.5
    n = len(box)
    flat = lambda a: a.reshape(n, -1)  # noqa: E731
    in_box = np.where(flat(box), flat(attention), -np.inf)
    hit_box = flat(mask)[np.arange(n), in_box.argmax(1)]
    hit_image = flat(mask)[np.arange(n), flat(raw_cam).argmax(1)]
    on = flat(mask & box).sum(1)
    off = flat(box & ~mask).sum(1)
    usable = (on > 0) & (off > 0)
    a_on = (flat(attention) * flat(mask & box)).sum(1)[usable] / on[usable]
    a_off = (flat(attention) * flat(box & ~mask)).sum(1)[usable] / off[usable]
    has = on > 0
    return {
        "pointing_box": float(hit_box[has].mean()) if has.any() else float("nan"),
        "pointing_box_chance": float((on[has] / flat(box).sum(1)[has]).mean()),
        "pointing_image": float(hit_image.mean()),
        "pointing_image_chance": float(flat(mask).mean(1).mean()),
        "a_contrast": float((a_on - a_off).mean()) if usable.any() else float("nan"),
    }
