"""Per-row preprocessing: decode, letterbox, normalise, boxes and masks at the output stride.

Plain functions and one transform object (:class:`Letterbox`), with no Ray in sight; the Ray Data
actors call them row by row and the evaluator uses :meth:`Letterbox.invert_prediction`.

Coordinate conventions (used everywhere in this module)
-------------------------------------------------------
* Images and masks are ``[H, W(, C)]`` arrays, row = y, column = x.
* Continuous pixel coordinates: pixel ``(i, j)`` (row i, column j) covers ``[j, j+1) x [i, i+1)``,
  its centre is ``(j + 0.5, i + 0.5)``. COCO boxes use this convention.
* ``box_xywh`` = ``(x, y, w, h)`` (COCO: top-left corner, width, height);
  ``box_xyxy`` = ``(x0, y0, x1, y1)``; both in continuous pixel coordinates.
* The letterbox affine ``[[s, 0, bx], [0, s, by]]`` maps continuous coordinates of the original
  image to continuous coordinates of the ``S x S`` letterboxed image (CRIS: ``s = S / max(H, W)``,
  the resized image centred, float offsets). ``cv2.warpAffine`` samples at integer indices, i.e.
  at pixel centres, so images and masks are warped with the same affine expressed in that
  convention (``bx + (s - 1) / 2``); image, mask and box therefore land on the same pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A box may stick out of the image by less than this (pixels) from rounding; it is clipped.
BOX_TOLERANCE_PX = 1.0


class ImageDecodeError(ValueError):
    """The bytes of a row are not an image OpenCV can decode."""


class BoxOutsideImageError(ValueError):
    """A box is outside its image or has no area."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> RGB ``[H, W, 3]`` uint8.

    Grey images are expanded to 3 channels, alpha is dropped. EXIF orientation is ignored so the
    array has the stored size that COCO annotations refer to.
    """
    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        except cv2.error as err:
            raise ImageDecodeError(f"cannot decode image from {buf.size} bytes: {err}") from err
    if img is None:
        head = bytes(buf[:8])
        raise ImageDecodeError(f"cannot decode image from {buf.size} bytes (starting {head!r})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def validate_box(box_xywh, h: int, w: int) -> tuple[float, float, float, float]:
    """Check a COCO ``box_xywh`` against an ``h x w`` image and return it clipped to the image.

    A box sticking out by less than ``BOX_TOLERANCE_PX`` on any side (rounding) is clipped.
    Raises :class:`BoxOutsideImageError` for non-finite values, zero or negative width/height,
    or a box reaching ``BOX_TOLERANCE_PX`` or more outside the image (fully outside included:
    usually a wrong convention such as xyxy passed as xywh).
    """
    x, y, bw, bh = (float(v) for v in box_xywh)
    if not np.all(np.isfinite([x, y, bw, bh])):
        raise BoxOutsideImageError(f"box_xywh {box_xywh} has non-finite values")
    if bw <= 0 or bh <= 0:
        raise BoxOutsideImageError(f"box_xywh {box_xywh} has zero or negative area")
    overshoot = max(-x, -y, x + bw - w, y + bh - h)
    if overshoot >= BOX_TOLERANCE_PX:
        raise BoxOutsideImageError(
            f"box_xywh {box_xywh} lies {overshoot:.2f} px outside the {h}x{w} (HxW) image"
        )
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + bw, float(w)), min(y + bh, float(h))
    if x1 <= x0 or y1 <= y0:
        raise BoxOutsideImageError(f"box_xywh {box_xywh} has no area inside the {h}x{w} image")
    return (x0, y0, x1 - x0, y1 - y0)


def normalize(img01: np.ndarray) -> np.ndarray:
    """RGB ``[S, S, 3]`` in [0, 1] -> float32 ``[3, S, S]`` standardised with CLIP mean/std."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = (np.asarray(img01, dtype=np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def denormalize(img_chw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`: float ``[3, S, S]`` -> float32 RGB ``[S, S, 3]`` in [0, 1]."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    return np.asarray(img_chw, dtype=np.float32).transpose(1, 2, 0) * std + mean


def rle_decode(counts: str | bytes | list[int], h: int, w: int) -> np.ndarray:
    """COCO RLE of an ``h x w`` mask -> ``[H, W]`` uint8 in {0, 1}.

    ``counts`` is the compressed string (``str``/``bytes``) as stored in our Parquet shards, or an
    uncompressed list of run lengths (COCO ``iscrowd`` style).
    """
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        rle = {"size": [h, w], "counts": raw}
    with warnings.catch_warnings():
        # pycocotools' Cython RLE object predates NumPy 2's __array__(copy=...) protocol
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        decoded = mask_utils.decode(rle)
    return np.ascontiguousarray(decoded, dtype=np.uint8)


def rle_encode(mask: np.ndarray) -> str:
    """``[H, W]`` binary mask (any dtype, nonzero = in) -> compressed COCO RLE counts string."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return rle["counts"].decode("ascii")


@dataclass(frozen=True)
class Letterbox:
    """CRIS letterbox of an ``orig_h x orig_w`` image into ``size x size`` (S), and back.

    One object moves the image, its box and its mask together, rasterises box and mask at the
    output stride, and maps a prediction back to the original image. See the module docstring
    for the coordinate conventions.
    """

    orig_h: int
    orig_w: int
    size: int

    def __post_init__(self) -> None:
        if min(self.orig_h, self.orig_w, self.size) <= 0:
            raise ValueError(f"sizes must be positive, got {self}")

    @property
    def scale(self) -> float:
        """``s = S / max(H, W)``."""
        return self.size / max(self.orig_h, self.orig_w)

    @property
    def offset_xy(self) -> tuple[float, float]:
        """``(bx, by)``: where the original's top-left corner lands (continuous coordinates)."""
        s = self.scale
        return ((self.size - self.orig_w * s) / 2.0, (self.size - self.orig_h * s) / 2.0)

    @cached_property
    def matrix(self) -> np.ndarray:
        """``[2, 3]`` float64 ``[[s, 0, bx], [0, s, by]]``: original -> letterbox, continuous."""
        bx, by = self.offset_xy
        return np.array([[self.scale, 0.0, bx], [0.0, self.scale, by]])

    @cached_property
    def inverse_matrix(self) -> np.ndarray:
        """``[2, 3]`` float64: letterbox -> original, continuous coordinates."""
        return cv2.invertAffineTransform(self.matrix)

    @cached_property
    def _warp_matrix(self) -> np.ndarray:
        """:attr:`matrix` in OpenCV's convention (integer index = pixel centre)."""
        m = self.matrix.copy()
        m[:, 2] += (self.scale - 1.0) / 2.0
        return m

    def _check_hw(self, arr: np.ndarray, name: str) -> None:
        if arr.shape[:2] != (self.orig_h, self.orig_w):
            raise ValueError(
                f"{name} has shape {arr.shape}, expected (H, W)=({self.orig_h}, {self.orig_w})"
            )

    def _cells(self, stride: int) -> int:
        if stride <= 0 or self.size % stride:
            raise ValueError(f"stride {stride} does not divide the input size {self.size}")
        return self.size // stride

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` -> float32 ``[S, S, 3]`` in [0, 1].

        Bilinear warp; the border outside the resized image is filled with ``CLIP_MEAN``.
        """
        self._check_hw(img, "image")
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        img01 = img.astype(np.float32) / 255.0
        return cv2.warpAffine(
            img01,
            self._warp_matrix,
            (self.size, self.size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=CLIP_MEAN,
        )

    def apply_box_xywh(self, box_xywh) -> np.ndarray:
        """COCO ``box_xywh`` in the original -> ``box_xyxy`` float64 ``[4]`` in letterbox pixels."""
        x, y, w, h = (float(v) for v in box_xywh)
        s = self.scale
        bx, by = self.offset_xy
        return np.array([s * x + bx, s * y + by, s * (x + w) + bx, s * (y + h) + by])

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """Binary uint8 ``[H, W]`` -> uint8 ``[S, S]`` (nearest neighbour, border 0)."""
        self._check_hw(mask, "mask")
        return cv2.warpAffine(
            np.ascontiguousarray(mask, dtype=np.uint8),
            self._warp_matrix,
            (self.size, self.size),
            flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )

    def box_at_stride(self, box_xywh, stride: int = 4) -> np.ndarray:
        """Rasterise a COCO box at the output stride -> float32 ``[S/stride, S/stride]`` in {0, 1}.

        Cell ``(i, j)`` is 1 when its centre ``((j + 0.5) * stride, (i + 0.5) * stride)`` (letterbox
        pixels) lies in the half-open letterboxed box ``[x0, x1) x [y0, y1)``. Rows and columns are
        decided separately; when a box is so thin that no cell centre falls inside along an axis,
        the one cell along that axis that contains the box's centre is used instead, so every box
        covers at least one cell.
        """
        n = self._cells(stride)
        x0, y0, x1, y1 = self.apply_box_xywh(box_xywh) / stride
        out = np.zeros((n, n), dtype=np.float32)
        cols, rows = _cells_in(x0, x1, n), _cells_in(y0, y1, n)
        out[rows, cols] = 1.0
        return out

    def mask_at_stride(self, mask: np.ndarray, stride: int = 4) -> np.ndarray:
        """Binary uint8 ``[H, W]`` -> float32 ``[S/stride, S/stride]`` in {0, 1}.

        The mask is letterboxed at full size (:meth:`apply_mask`), averaged over each
        ``stride x stride`` cell, and a cell is 1 when at least half of it is covered (>= 0.5).
        """
        n = self._cells(stride)
        full = self.apply_mask(mask).astype(np.float32)
        area = full.reshape(n, stride, n, stride).mean(axis=(1, 3))
        return (area >= 0.5).astype(np.float32)

    def guide_image(self, img01: np.ndarray, stride: int = 4) -> np.ndarray:
        """Letterboxed RGB ``[S, S, 3]`` in [0, 1] -> float32 ``[S/stride, S/stride, 3]``.

        Bilinear resize (``cv2.INTER_LINEAR``, half-pixel centres, no anti-aliasing: the same as
        ``F.interpolate(mode="bilinear", align_corners=False)``), taken before mean/std.
        """
        n = self._cells(stride)
        if img01.shape != (self.size, self.size, 3):
            raise ValueError(f"guide input must be [S, S, 3] with S={self.size}, got {img01.shape}")
        return cv2.resize(
            np.asarray(img01, dtype=np.float32), (n, n), interpolation=cv2.INTER_LINEAR
        )

    def invert_prediction(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities on the letterbox -> float32 ``[H, W]`` on the original image.

        ``probs`` is ``[S, S]``, or ``[S/k, S/k]`` for an integer k (e.g. sigmoid of the stride-4
        logits), which is first upsampled bilinearly to ``[S, S]`` (as
        ``F.interpolate(align_corners=False)``). The inverse affine is applied with bilinear
        interpolation (edge values replicated where a bilinear neighbour falls off the canvas).
        Threshold the result to get the predicted mask (CRIS: > 0.35).
        """
        probs = np.asarray(probs, dtype=np.float32)
        side = probs.shape[0]
        if probs.ndim != 2 or probs.shape[1] != side or self.size % side:
            raise ValueError(
                f"prediction must be square [S/k, S/k] with S={self.size}, got {probs.shape}"
            )
        if side != self.size:
            probs = cv2.resize(probs, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return cv2.warpAffine(
            probs,
            self._warp_matrix,
            (self.orig_w, self.orig_h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )


def _cells_in(lo: float, hi: float, n: int) -> slice:
    """Cells ``k`` in ``[0, n)`` whose centre ``k + 0.5`` lies in ``[lo, hi)`` (cell units).

    Falls back to the single cell containing ``(lo + hi) / 2`` when that range is empty.
    """
    first = max(int(np.ceil(lo - 0.5)), 0)
    stop = min(int(np.ceil(hi - 0.5)), n)
    if stop <= first:
        first = min(max(int(np.floor((lo + hi) / 2.0)), 0), n - 1)
        stop = first + 1
    return slice(first, stop)
