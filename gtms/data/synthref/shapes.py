"""SynthRef shapes: drawing them as masks and turning masks into COCO polygons.

Shapes are drawn on a canvas ``SUPERSAMPLE`` times finer than the image, so the polygons traced
from them have sub-pixel vertices. Half the categories are non-convex (ring, star, crescent,
blob; the cross too), which keeps the box far from the mask.

Coordinates follow COCO (and ``gtms.data.transforms``): pixel ``(row i, col j)`` covers
``[j, j+1) x [i, i+1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

SUPERSAMPLE = 4
_SHIFT = 4  # cv2 fixed-point bits for sub-pixel polygon vertices

# Category ids are positions in this tuple + 1 (COCO ids start at 1).
CATEGORIES = ("square", "triangle", "ellipse", "cross", "ring", "star", "crescent", "blob")
# testA refs are about group A only, testB refs about group B (like RefCOCO's people/objects).
GROUP_A = ("ring", "star", "square", "ellipse")
GROUP_B = ("crescent", "blob", "triangle", "cross")


@dataclass(frozen=True)
class Shape:
    """One drawable shape: ``category`` at centre ``(cx, cy)`` (image pixels), outer ``radius``,
    rotation ``angle`` (radians) and category-specific ``params``."""

    category: str
    cx: float
    cy: float
    radius: float
    angle: float
    params: tuple[float, ...]


def sample_shape(category: str, rng: np.random.Generator, cx: float, cy: float,
                 radius: float) -> Shape:
    """Random proportions and rotation for ``category``."""
    angle = float(rng.uniform(0, 2 * math.pi))
    if category == "ellipse":
        params = (float(rng.uniform(0.45, 0.8)),)           # minor / major axis
    elif category == "cross":
        params = (float(rng.uniform(0.28, 0.42)),)          # arm half-width / radius
    elif category == "ring":
        params = (float(rng.uniform(0.5, 0.66)), float(rng.uniform(0.75, 1.0)))  # hole, aspect
    elif category == "star":
        params = (float(rng.integers(5, 7)), float(rng.uniform(0.4, 0.55)))  # points, inner
    elif category == "crescent":
        params = (float(rng.uniform(0.8, 0.95)), float(rng.uniform(0.4, 0.6)))  # bite r, offset
    elif category == "blob":
        amps = rng.uniform(0.05, 0.16, size=4) * np.array([1.0, 1.0, 0.8, 0.6])
        phases = rng.uniform(0, 2 * math.pi, size=4)
        params = tuple(float(v) for v in np.concatenate([amps, phases]))
    else:
        params = ()
    return Shape(category, float(cx), float(cy), float(radius), angle, params)


def _rotate(points: np.ndarray, shape: Shape) -> np.ndarray:
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    x, y = points[:, 0], points[:, 1]
    return np.stack([shape.cx + c * x - s * y, shape.cy + s * x + c * y], axis=1)


def _circle(radius_x: float, radius_y: float, n: int = 96, dx: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([dx + radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)


def _outline(shape: Shape) -> list[tuple[np.ndarray, int]]:
    """Polygons (in image pixels) with the value to fill: 1 adds, 0 cuts away (in order)."""
    r, p = shape.radius, shape.params
    if shape.category == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (r / math.sqrt(2))
        return [(pts, 1)]
    if shape.category == "triangle":
        t = np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 1)]
    if shape.category == "ellipse":
        return [(_circle(r, r * p[0]), 1)]
    if shape.category == "cross":
        a = r * p[0]
        pts = np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r],
                        [-a, a], [-r, a], [-r, -a], [-a, -a]])
        return [(pts, 1)]
    if shape.category == "ring":
        return [(_circle(r, r * p[1]), 1), (_circle(r * p[0], r * p[0] * p[1]), 0)]
    if shape.category == "star":
        n = int(p[0])
        t = -math.pi / 2 + np.arange(2 * n) * math.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, r, r * p[1])
        return [(np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1), 1)]
    if shape.category == "crescent":
        return [(_circle(r, r), 1), (_circle(r * p[0], r * p[0], dx=r * p[1]), 0)]
    if shape.category == "blob":
        t = np.linspace(0, 2 * math.pi, 128, endpoint=False)
        amps, phases = np.array(p[:4]), np.array(p[4:])
        wobble = sum(a * np.cos((k + 2) * t + ph) for k, (a, ph) in enumerate(zip(amps, phases)))
        radii = r * (1 - amps.sum() + wobble)
        return [(np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1), 1)]
    raise ValueError(f"unknown SynthRef category {shape.category!r}")


def draw_mask(shape: Shape, height: int, width: int, scale: int = SUPERSAMPLE) -> np.ndarray:
    """The shape on a canvas ``scale`` times finer than the image: bool ``[H*s, W*s]``."""
    canvas = np.zeros((height * scale, width * scale), np.uint8)
    for polygon, value in _outline(shape):
        pts = (_rotate(polygon, shape) * scale - 0.5) * (1 << _SHIFT)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], value, cv2.LINE_8, _SHIFT)
    return canvas.astype(bool)


def downsample(mask_ss: np.ndarray) -> np.ndarray:
    """Supersampled bool mask -> image-resolution bool mask (pixel more than half covered)."""
    h, w = mask_ss.shape[0] // SUPERSAMPLE, mask_ss.shape[1] // SUPERSAMPLE
    cover = cv2.resize(mask_ss.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return cover > 0.5


def mask_to_polygons(mask_ss: np.ndarray, *, min_points: int = 3) -> list[list[float]]:
    """Supersampled bool mask -> COCO polygons (flat ``[x0, y0, x1, y1, ...]`` in pixels).

    Each connected piece becomes one polygon; its holes are joined to it by a zero-width cut
    (a "bridge"), because COCO unions the polygons of an annotation and so cannot express a
    hole as a polygon of its own.
    """
    contours, hierarchy = cv2.findContours(mask_ss.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    polygons = []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    for index, contour in enumerate(contours):
        if links[index][3] >= 0:
            continue
        outline = _simplify(contour)
        child = links[index][2]
        while child >= 0:
            hole = _simplify(contours[child])
            if len(hole) >= min_points:
                outline = _bridge(outline, hole)
            child = links[child][0]
        if len(outline) >= min_points:
            xy = (outline + 0.5) / SUPERSAMPLE
            polygons.append([float(v) for v in xy.ravel()])
    return polygons


def _simplify(contour: np.ndarray) -> np.ndarray:
    return cv2.approxPolyDP(contour, 1.0, True)[:, 0, :].astype(np.float64)


def _bridge(outline: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Splice ``hole`` into ``outline`` through the closest pair of their vertices."""
    d2 = ((outline[:, None, :] - hole[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(d2.argmin()), d2.shape)
    around = np.concatenate([hole[j:], hole[:j + 1]])
    return np.concatenate([outline[:i + 1], around, outline[i:]])


def rasterize(polygons: list[list[float]], height: int, width: int) -> dict:
    """COCO polygons -> one compressed RLE (what ``annToRLE`` computes for them)."""
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
