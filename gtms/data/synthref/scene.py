"""SynthRef scenes: several coloured shapes on a textured background, drawn from their polygons.

A scene is laid out on the supersampled canvas (later shapes occlude earlier ones), each object's
visible part is traced into COCO polygons, the polygons are rasterised exactly as pycocotools
does for ``instances.json`` readers, and the image is painted from those rasterised masks. So the
annotation a loader decodes is, pixel for pixel, the region the image shows in the object's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from gtms.data.synthref.shapes import (
    CATEGORIES,
    Shape,
    downsample,
    draw_mask,
    mask_to_polygons,
    rasterize,
    sample_shape,
)
from gtms.data.transforms import rle_decode

# Colour names and the RGB they are painted with (all far apart, so a name is unambiguous).
PALETTE = {
    "red": (215, 35, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 40),
    "green": (35, 160, 55),
    "cyan": (20, 205, 215),
    "blue": (35, 65, 215),
    "purple": (135, 45, 175),
    "pink": (250, 125, 195),
    "brown": (125, 75, 30),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
MIN_POLYGON_IOU = 0.97     # traced polygons vs the drawn visible region
MIN_VISIBLE_PIXELS = 150   # an object smaller than this (after occlusion) is not placed


@dataclass(frozen=True)
class Difficulty:
    """How hard scenes are: crowding, occlusion, texture, contrast and compression."""

    objects: tuple[int, int]         # objects per image (inclusive range)
    max_occluded: float              # largest fraction of an object hidden by later objects
    near_probability: float          # chance an object is placed over another's box
    radius: tuple[float, float]      # outer radius as a fraction of min(H, W)
    texture: float                   # amplitude of background stripes/clouds (0..1 of 255)
    noise: float                     # per-pixel Gaussian noise sigma (grey levels)
    contrast: tuple[float, float]    # object colour weight against the background behind it
    jpeg_quality: int


# Version 2 (RefCOCO-like scale): the referred object's box is a fifth of the image or more at
# the median (v1: 8 %), so the CLIP backbone's stride-32 grid gives it at least 2 x 2 cells at the
# laptop input size; fewer, larger objects per image, still overlapping and occluding.
DIFFICULTIES = {
    "easy": Difficulty(objects=(2, 3), max_occluded=0.0, near_probability=0.3,
                       radius=(0.28, 0.42), texture=0.05, noise=2.0, contrast=(1.0, 1.0),
                       jpeg_quality=92),
    "standard": Difficulty(objects=(3, 4), max_occluded=0.25, near_probability=0.5,
                           radius=(0.25, 0.40), texture=0.12, noise=5.0, contrast=(0.85, 1.0),
                           jpeg_quality=80),
    "hard": Difficulty(objects=(3, 5), max_occluded=0.4, near_probability=0.7,
                       radius=(0.24, 0.40), texture=0.22, noise=9.0, contrast=(0.7, 0.9),
                       jpeg_quality=65),
}


@dataclass(frozen=True)
class SceneObject:
    """One placed object; ``mask`` is the rasterised polygons (``[H, W]`` uint8)."""

    category: str
    colour: str
    polygons: tuple[tuple[float, ...], ...]
    box_xywh: tuple[float, float, float, float]
    area: float
    mask: np.ndarray = field(compare=False, repr=False)

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box_xywh
        return (x + w / 2, y + h / 2)


def sample_layout(rng: np.random.Generator, height: int, width: int, difficulty: Difficulty,
                  repeated_categories: tuple[str, ...]) -> list[tuple[Shape, str]]:
    """Shapes and colour names; at least two share a category from ``repeated_categories``."""
    lo, hi = difficulty.objects
    count = int(rng.integers(lo, hi + 1))
    repeated = str(rng.choice(repeated_categories))
    copies = 3 if count >= 4 and rng.random() < 0.3 else 2
    categories = [repeated] * copies
    categories += [str(c) for c in rng.choice(CATEGORIES, size=count - copies)]
    rng.shuffle(categories)
    colours = list(PALETTE)
    shared = str(rng.choice(colours)) if rng.random() < 0.4 else None
    placed: list[tuple[Shape, str]] = []
    masks: list[np.ndarray] = []
    for category in categories:
        colour = shared if shared and category == repeated else str(rng.choice(colours))
        shape = _place(rng, category, height, width, difficulty, placed, masks)
        if shape is not None:
            placed.append((shape, colour))
            masks.append(draw_mask(shape, height, width, scale=1))
    return placed


def _place(rng, category, height, width, difficulty, placed, masks) -> Shape | None:
    short = min(height, width)
    for _ in range(30):
        radius = float(rng.uniform(*difficulty.radius)) * short
        if placed and rng.random() < difficulty.near_probability:
            other = placed[int(rng.integers(len(placed)))][0]
            cx = other.cx + rng.uniform(-1, 1) * other.radius
            cy = other.cy + rng.uniform(-1, 1) * other.radius
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        cx = float(np.clip(cx, radius + 2, width - radius - 2))
        cy = float(np.clip(cy, radius + 2, height - radius - 2))
        shape = sample_shape(category, rng, cx, cy, radius)
        new = draw_mask(shape, height, width, scale=1)  # placement checks at image resolution
        if all(_hidden_fraction(old, new, masks[i + 1:]) <= difficulty.max_occluded
               for i, old in enumerate(masks)):
            return shape
    return None


def _hidden_fraction(mask: np.ndarray, new: np.ndarray, later: list[np.ndarray]) -> float:
    covered = new.copy()
    for other in later:
        covered |= other
    return np.count_nonzero(mask & covered) / max(np.count_nonzero(mask), 1)


def trace_objects(layout: list[tuple[Shape, str]], height: int,
                  width: int) -> list[SceneObject] | None:
    """Visible region of each shape -> polygons -> rasterised mask; None if tracing fails.

    Tracing fails when a polygon strays from the drawn region (IoU < ``MIN_POLYGON_IOU``), an
    object is too small, or two objects' rasterised polygons share a pixel (masks are disjoint,
    so painting them in any order gives the image the annotations describe).
    """
    full = [draw_mask(shape, height, width) for shape, _ in layout]
    objects: list[SceneObject] = []
    occluder = np.zeros_like(full[0]) if full else None
    painted = np.zeros((height, width), bool)  # union of the later objects' final masks
    for index in range(len(layout) - 1, -1, -1):
        shape, colour = layout[index]
        visible = full[index] & ~occluder
        occluder |= full[index]
        polygons = mask_to_polygons(visible)
        if not polygons:
            return None
        rle = rasterize(polygons, height, width)
        mask = rle_decode(rle["counts"], height, width)
        drawn = downsample(visible)
        inter = np.count_nonzero(mask.astype(bool) & drawn)
        iou = inter / max(np.count_nonzero(mask.astype(bool) | drawn), 1)
        if iou < MIN_POLYGON_IOU or np.count_nonzero(mask) < MIN_VISIBLE_PIXELS:
            return None
        if np.any(painted & mask.astype(bool)):
            return None  # a boundary pixel claimed by two polygons: the image could show one
        painted |= mask.astype(bool)
        box = tuple(float(v) for v in mask_utils.toBbox(rle))
        objects.append(SceneObject(shape.category, colour, tuple(tuple(p) for p in polygons),
                                   box, float(mask_utils.area(rle)), mask))
    return objects[::-1]


def render(rng: np.random.Generator, height: int, width: int, objects: list[SceneObject],
           difficulty: Difficulty) -> np.ndarray:
    """Background, then each object's rasterised mask in its colour, then noise: RGB uint8."""
    image = _background(rng, height, width, difficulty)
    for obj in objects:
        colour = np.asarray(PALETTE[obj.colour], np.float32)
        cx, cy = obj.centre
        theta = rng.uniform(0, 2 * math.pi)
        weight = rng.uniform(*difficulty.contrast)
        ys, xs = np.nonzero(obj.mask)
        along = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
        shade = 1 + 0.12 * along / max(obj.box_xywh[2], obj.box_xywh[3], 1.0)
        paint = np.clip(colour[None, :] * shade[:, None], 0, 255)
        image[ys, xs] = weight * paint + (1 - weight) * image[ys, xs]
    image += rng.normal(0, difficulty.noise, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, height: int, width: int,
                difficulty: Difficulty) -> np.ndarray:
    """Muted two-colour gradient plus stripes and smooth clouds: float32 ``[H, W, 3]``."""
    ends = [_muted_colour(rng) for _ in range(2)]
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(theta) + yy * math.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = ends[0] * (1 - t[..., None]) + ends[1] * t[..., None]
    amp = 255.0 * difficulty.texture
    phi = rng.uniform(0, 2 * math.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period)
    coarse = rng.normal(0, 1, size=(max(height // 16, 2), max(width // 16, 2), 3))
    clouds = cv2.resize(coarse.astype(np.float32), (width, height),
                        interpolation=cv2.INTER_CUBIC)
    image += amp * (0.5 * stripes[..., None] + 0.7 * clouds)
    return image.astype(np.float32)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(15, 90), rng.uniform(80, 200)]]],
                   np.float32).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return data.tobytes()
