"""Per-row preprocessing: decode, letterbox, normalise, boxes and masks at the output stride.

Plain functions and one transform object (:class:`Letterbox`), with no Ray in sight; the Ray Data
actors call them row by row and the evaluator uses :meth:`Letterbox.invert_prediction`.

Coordinate conventions (used everywhere in this module)
-------------------------------------------------------
* Images and masks are ``[H, W(, C)]`` arrays, row = y, column = x.
* Two coordinate systems. *Index* coordinates: the centre of pixel ``(i, j)`` (row i, column j)
  is the point ``(j, i)``; this is what ``cv2.warpAffine`` and ``F.interpolate`` work in.
  *Continuous* coordinates: pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, its centre is
  ``(j + 0.5, i + 0.5)``; COCO boxes use this one. continuous = index + 0.5.
* ``box_xywh`` = ``(x, y, w, h)`` (COCO: top-left corner, width, height);
  ``box_xyxy`` = ``(x0, y0, x1, y1)``; both in continuous pixel coordinates.

The letterbox is exactly CRIS's (``utils/dataset.py``, ``engine/engine.py`` of CRIS.pytorch), so a
CRIS checkpoint evaluated here gives CRIS's numbers:

* ``s = min(S/H, S/W)``, ``bx = (S - s W) / 2``, ``by = (S - s H) / 2``; the matrix is
  ``cv2.getAffineTransform`` of the float32 corners ``(0,0), (W,0), (0,H)`` onto
  ``(bx,by), (bx+sW,by), (bx,by+sH)``, and its inverse is ``getAffineTransform`` the other way
  round. OpenCV applies it in index coordinates (no half-pixel offset).
* Image: the uint8 RGB image is warped with ``INTER_CUBIC``, border ``CLIP_MEAN * 255`` (which
  OpenCV rounds to uint8), then divided by 255; :func:`normalize` applies mean/std.
* Prediction back to the original: sigmoid, ``F.interpolate(bicubic, align_corners=True)`` to
  ``S x S``, ``warpAffine`` with the inverse matrix (``INTER_CUBIC``, border 0), then threshold.
* The mask is warped as CRIS warps its training mask (0/255, ``INTER_LINEAR``, border 0, /255).
* Boxes follow the image content: a point at continuous ``x`` (index ``x - 0.5``) lands at index
  ``s (x - 0.5) + bx``, i.e. continuous ``s x + bx + (1 - s) / 2``. Box, mask and image therefore
  cover the same letterbox pixels, and the stride-``k`` cell ``(i, j)`` has its centre at
  continuous ``((j + 0.5) k, (i + 0.5) k)``, which is also where :meth:`Letterbox.guide_image`
  (half-pixel bilinear resize) samples it.
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


def model_input(image):
    """A batch of images as the model takes them (a torch tensor ``[B, 3, S, S]``, on any
    device): uint8 letterboxed pixels (what the pipeline hands over) are divided by 255 and
    standardised with CLIP's mean/std there, in float32 and in :func:`normalize`'s order of
    operations, so the values equal what :func:`normalize` computes; float input is taken as
    already standardised."""
    import torch

    if image.dtype != torch.uint8:
        return image
    shape = (1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=image.device).view(shape)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=image.device).view(shape)
    return (image.to(torch.float32) / 255.0 - mean) / std


def denormalize(img_chw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`: float ``[3, S, S]`` -> float32 RGB ``[S, S, 3]`` in [0, 1];
    uint8 ``[3, S, S]`` (the pipeline's letterboxed pixels) is only divided by 255."""
    if np.asarray(img_chw).dtype == np.uint8:
        return np.asarray(img_chw).transpose(1, 2, 0).astype(np.float32) / np.float32(255.0)
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
        """``s = min(S / H, S / W)`` (CRIS)."""
        return min(self.size / self.orig_h, self.size / self.orig_w)

    @property
    def offset_xy(self) -> tuple[float, float]:
        """``(bx, by)``: where the original's corner ``(0, 0)`` lands (CRIS)."""
        s = self.scale
        return ((self.size - self.orig_w * s) / 2.0, (self.size - self.orig_h * s) / 2.0)

    @cached_property
    def _corners(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[3, 2]``: corners ``(0,0), (W,0), (0,H)`` of the original, where they land."""
        s, (bx, by) = self.scale, self.offset_xy
        new_w, new_h = self.orig_w * s, self.orig_h * s
        src = np.array([[0, 0], [self.orig_w, 0], [0, self.orig_h]], np.float32)
        dst = np.array([[bx, by], [bx + new_w, by], [bx, by + new_h]], np.float32)
        return src, dst

    @cached_property
    def matrix(self) -> np.ndarray:
        """``[2, 3]`` float64 ``~[[s, 0, bx], [0, s, by]]``: original -> letterbox, index
        coordinates, as ``cv2.getAffineTransform`` gives it from the float32 corners (CRIS)."""
        src, dst = self._corners
        return cv2.getAffineTransform(src, dst)

    @cached_property
    def inverse_matrix(self) -> np.ndarray:
        """``[2, 3]`` float64: letterbox -> original, index coordinates (CRIS's ``mat_inv``)."""
        src, dst = self._corners
        return cv2.getAffineTransform(dst, src)

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
        """RGB uint8 ``[H, W, 3]`` -> float32 ``[S, S, 3]`` in [0, 1] (before mean/std): the
        letterboxed uint8 image (:meth:`apply_image_uint8`) divided by 255, as CRIS does."""
        return self.apply_image_uint8(img).astype(np.float32) / np.float32(255.0)

    def apply_image_uint8(self, img: np.ndarray) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` -> the letterboxed uint8 ``[S, S, 3]``.

        CRIS: the uint8 image is warped with ``INTER_CUBIC`` and border ``CLIP_MEAN * 255``
        (rounded to uint8 by OpenCV). The pipeline hands this uint8 image over; the model
        divides by 255 and applies mean/std on its device (:func:`model_input`).
        """
        self._check_hw(img, "image")
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        return cv2.warpAffine(
            np.ascontiguousarray(img),
            self.matrix,
            (self.size, self.size),
            flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=[m * 255.0 for m in CLIP_MEAN],
        )

    def apply_box_xywh(self, box_xywh) -> np.ndarray:
        """COCO ``box_xywh`` in the original -> ``box_xyxy`` float64 ``[4]`` in letterbox pixels.

        Both continuous coordinates; the box moves with the image content (index coordinates
        through :attr:`matrix`, i.e. ``s x + bx + (1 - s) / 2``).
        """
        x, y, w, h = (float(v) for v in box_xywh)
        corners_index = np.array([[x - 0.5, x + w - 0.5], [y - 0.5, y + h - 0.5], [1.0, 1.0]])
        (x0, x1), (y0, y1) = self.matrix @ corners_index + 0.5
        return np.array([x0, y0, x1, y1])

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """Binary ``[H, W]`` (nonzero = in) -> float32 ``[S, S]`` coverage in [0, 1].

        CRIS's training mask: the 0/255 uint8 mask warped with ``INTER_LINEAR``, border 0, / 255.
        """
        self._check_hw(mask, "mask")
        mask255 = np.where(np.asarray(mask) != 0, np.uint8(255), np.uint8(0))
        warped = cv2.warpAffine(
            mask255,
            self.matrix,
            (self.size, self.size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        return warped.astype(np.float32) / np.float32(255.0)

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
        """Binary ``[H, W]`` -> float32 ``[S/stride, S/stride]`` in {0, 1}.

        The mask is letterboxed at full size (:meth:`apply_mask`), its coverage averaged over each
        ``stride x stride`` cell, and a cell is 1 when at least half of it is covered (>= 0.5).
        """
        n = self._cells(stride)
        area = self.apply_mask(mask).reshape(n, stride, n, stride).mean(axis=(1, 3))
        return (area >= 0.5).astype(np.float32)

    def guide_image(self, img01: np.ndarray, stride: int = 4) -> np.ndarray:
        """Letterboxed RGB ``[S, S, 3]`` in [0, 1] -> float32 ``[S/stride, S/stride, 3]``.

        Bilinear resize (``cv2.INTER_LINEAR``, half-pixel centres, no anti-aliasing: the same as
        ``F.interpolate(mode="bilinear", align_corners=False)``), taken before mean/std; cell
        ``(i, j)`` is sampled at its centre, as :meth:`box_at_stride` decides it.
        """
        n = self._cells(stride)
        if img01.shape != (self.size, self.size, 3):
            raise ValueError(f"guide input must be [S, S, 3] with S={self.size}, got {img01.shape}")
        return cv2.resize(
            np.asarray(img01, dtype=np.float32), (n, n), interpolation=cv2.INTER_LINEAR
        )

    def invert_prediction(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities on the letterbox -> float32 ``[H, W]`` on the original image (CRIS).

        ``probs`` (sigmoid already applied) is ``[S, S]``, or ``[S/k, S/k]`` for an integer k
        (e.g. the sigmoid of the stride-4 logits), which is first upsampled to ``[S, S]`` with
        ``F.interpolate(mode="bicubic", align_corners=True)``. The inverse affine is applied with
        ``INTER_CUBIC`` and border 0, so values may overshoot [0, 1] slightly. Threshold the
        result to get the predicted mask (CRIS: > 0.35).
        """
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        side = probs.shape[0]
        if probs.ndim != 2 or probs.shape[1] != side or self.size % side:
            raise ValueError(
                f"prediction must be square [S/k, S/k] with S={self.size}, got {probs.shape}"
            )
        if side != self.size:
            probs = _upsample_bicubic_corners(probs, self.size)
        return cv2.warpAffine(
            probs,
            self.inverse_matrix,
            (self.orig_w, self.orig_h),
            flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0.0,
        )


def _upsample_bicubic_corners(probs: np.ndarray, size: int) -> np.ndarray:
    """float32 ``[n, n]`` -> ``[size, size]``: ``F.interpolate(bicubic, align_corners=True)``.

    torch is imported here so the data-loading workers, which never call it, do not load it.
    """
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(probs)[None, None]
    up = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)
    return up[0, 0].numpy()


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
