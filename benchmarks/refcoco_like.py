"""RefCOCO-sized synthetic inputs for the benchmarks: shard rows and preprocessed batches.

A row is what ``gtms.data.shards`` stores for one ref: a 640 x 480 JPEG (COCO's usual size) of
a photo-like scene (smooth colour fields, a few flat objects, sensor noise), a box around one
object, its mask as COCO RLE, and 3 sentences (RefCOCO has 2.8 per ref). Batches come from the
real preprocessing (:func:`gtms.data.pipeline.preprocess_ref`), so the images, boxes, trees and
forests have the pipeline's shapes, dtypes and content.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from gtms.data.pipeline import preprocess_ref, spec_for
from gtms.data.tokenizer import ClipTokenizer
from gtms.data.transforms import rle_encode

SENTENCES = ("man in red shirt on the left", "left guy", "person holding the umbrella")


def photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1]: colour gradients, 4 flat ellipses, noise (sigma 0.02)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([np.sin(6 * xx * rng.random() + 6 * yy * rng.random() + c)
                      for c in range(3)], axis=-1) * 0.25 + 0.5
    for _ in range(4):
        cy, cx, ry, rx = rng.random(4) * [height / max(height, width), 1, 0.3, 0.3]
        inside = ((yy - cy) / (ry + 0.02)) ** 2 + ((xx - cx) / (rx + 0.02)) ** 2 < 1
        image[inside] = rng.random(3)
    image += rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1)


def refcoco_like_row(ref_id: int, rng: np.random.Generator, *, height: int = 480,
                     width: int = 640, quality: int = 90) -> dict:
    """One shard row (the columns of ``gtms.data.pipeline.SHARD_COLUMNS``)."""
    image = photo_like(height, width, rng)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    w, h = rng.integers(width // 8, width // 2), rng.integers(height // 8, height // 2)
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (int(x0 + w // 2), int(y0 + h // 2)), (int(w // 2), int(h // 2)), 0, 0,
                360, 1, -1)
    image[mask > 0] = rng.random(3)  # the referred object is one flat-coloured region
    bgr = (image[..., ::-1] * 255).round().astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return {"ref_id": ref_id, "image": jpeg.tobytes(), "height": height, "width": width,
            "box_xywh": [float(x0), float(y0), float(w), float(h)],
            "sentences": list(SENTENCES), "mask_rle_counts": rle_encode(mask)}


def training_batch(batch: int, input_size: int, *, mode: str = "forest-gradcam", seed: int = 0,
                   word_len: int = 17) -> dict[str, torch.Tensor]:
    """A training batch as the loop receives it (first sentence of each ref), from ``batch``
    RefCOCO-like rows through :func:`preprocess_ref` with the training spec of ``mode``."""
    rng = np.random.default_rng(seed)
    spec = spec_for("train", input_size=input_size, word_len=word_len, mode=mode, seed=seed)
    tokenizer = ClipTokenizer()
    samples = [preprocess_ref(refcoco_like_row(i, rng), spec, tokenizer)[0] for i in range(batch)]
    columns = [key for key in ("image", "box", "parent", "order", "dist", "forest", "mask")
               if key in samples[0]]
    out = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in columns}
    out["tokens"] = torch.from_numpy(np.stack([s["tokens"][0] for s in samples]))
    return out
