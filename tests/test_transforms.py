"""Letterbox, box/mask rasterisation, normalisation, decoding and RLE (DESIGN.md, "Data")."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from gtms.data.transforms import (
    CLIP_MEAN,
    BoxOutsideImageError,
    ImageDecodeError,
    Letterbox,
    decode_image,
    denormalize,
    normalize,
    rle_decode,
    rle_encode,
    validate_box,
)

SIZE = 416
SHAPES = [(150, 230), (230, 150), (480, 640), (37, 300)]


def blob_mask(h: int, w: int, seed: int) -> np.ndarray:
    """A random non-convex polygon blob, uint8 ``[H, W]``."""
    rng = np.random.default_rng(seed)
    n = 24
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.4, 1.0, n)
    cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
    rx, ry = 0.4 * w, 0.4 * h
    pts = np.stack([cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)], 1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def coco_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks, computed by pycocotools on their RLEs."""
    ra = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
    rb = mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))
    return float(mask_utils.iou([ra], [rb], [0])[0, 0])


def mask_box_xywh(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight COCO box of a mask in continuous pixel coordinates."""
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())


# --- Letterbox geometry ---------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_matrix_centres_the_resized_image(h, w):
    lb = Letterbox(h, w, SIZE)
    s = SIZE / max(h, w)
    bx, by = lb.offset_xy
    np.testing.assert_allclose(lb.matrix, [[s, 0, bx], [0, s, by]])
    corners = lb.matrix @ np.array([[0, w], [0, h], [1, 1]], dtype=float)
    np.testing.assert_allclose(corners[:, 0] + corners[:, 1], [SIZE, SIZE])  # centred
    assert max(corners[0, 1] - corners[0, 0], corners[1, 1] - corners[1, 0]) == pytest.approx(SIZE)
    back = lb.inverse_matrix @ np.vstack([corners, np.ones(2)])
    np.testing.assert_allclose(back, [[0, w], [0, h]], atol=1e-9)


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_mask_round_trip_iou(h, w):
    for seed in range(3):
        mask = blob_mask(h, w, seed)
        lb = Letterbox(h, w, SIZE)
        letterboxed = lb.apply_mask(mask)
        assert letterboxed.shape == (SIZE, SIZE) and letterboxed.dtype == np.uint8
        back = lb.invert_prediction(letterboxed.astype(np.float32))
        assert back.shape == (h, w)
        assert coco_iou(back > 0.5, mask) >= 0.99


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_prediction_at_stride4_inverts_to_original(h, w):
    mask = blob_mask(h, w, 7)
    lb = Letterbox(h, w, SIZE)
    at4 = lb.mask_at_stride(mask)
    assert at4.shape == (SIZE // 4, SIZE // 4) and at4.dtype == np.float32
    back = lb.invert_prediction(at4)
    assert back.shape == (h, w)
    assert coco_iou(back > 0.35, mask) >= 0.85


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_box_matches_transformed_mask_box(h, w):
    mask = blob_mask(h, w, 3)
    lb = Letterbox(h, w, SIZE)
    box_xyxy = lb.apply_box_xywh(mask_box_xywh(mask))
    x, y, bw, bh = mask_box_xywh(lb.apply_mask(mask))
    np.testing.assert_allclose(box_xyxy, [x, y, x + bw, y + bh], atol=1.0)


def test_image_and_mask_land_on_the_same_pixels():
    h, w = 150, 230
    mask = blob_mask(h, w, 11)
    lb = Letterbox(h, w, SIZE)
    img = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    from_image = lb.apply_image(img)[..., 0] > 0.5
    assert coco_iou(from_image, lb.apply_mask(mask)) >= 0.99


# --- Image ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(150, 230), (230, 150)])
def test_letterbox_border_is_clip_mean(h, w):
    colour = np.array([255, 0, 128], np.uint8)
    img = np.broadcast_to(colour, (h, w, 3)).copy()
    lb = Letterbox(h, w, SIZE)
    out = lb.apply_image(img)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    bx, by = lb.offset_xy
    border = out[: int(by) - 1] if h < w else out[:, : int(bx) - 1]
    assert border.size > 0
    np.testing.assert_allclose(border - np.asarray(CLIP_MEAN, np.float32), 0.0, atol=1e-6)
    np.testing.assert_allclose(out[SIZE // 2, SIZE // 2], colour / 255.0, atol=1e-6)


def test_guide_image_shape_and_values():
    lb = Letterbox(150, 230, SIZE)
    img01 = lb.apply_image(np.full((150, 230, 3), 200, np.uint8))
    guide = lb.guide_image(img01)
    assert guide.shape == (SIZE // 4, SIZE // 4, 3) and guide.dtype == np.float32
    np.testing.assert_allclose(guide[52, 52], 200 / 255.0, atol=1e-6)
    np.testing.assert_allclose(guide[0, 0], CLIP_MEAN, atol=1e-6)
    assert lb.guide_image(img01, stride=8).shape == (SIZE // 8, SIZE // 8, 3)
    with pytest.raises(ValueError):
        lb.guide_image(img01[:100])


def test_normalize_inverts():
    rng = np.random.default_rng(0)
    img01 = rng.random((32, 32, 3), dtype=np.float32)
    chw = normalize(img01)
    assert chw.shape == (3, 32, 32) and chw.dtype == np.float32
    np.testing.assert_allclose(denormalize(chw), img01, atol=1e-6)
    np.testing.assert_allclose(normalize(np.broadcast_to(CLIP_MEAN, (4, 4, 3))), 0.0, atol=1e-6)


def test_decode_image_rgb_order():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 250  # red
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    out = decode_image(png.tobytes())
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    grey = cv2.imencode(".png", np.full((5, 6), 9, np.uint8))[1].tobytes()
    assert decode_image(grey).shape == (5, 6, 3)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage"])
def test_decode_image_garbage_raises(data):
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data)
    assert issubclass(ImageDecodeError, ValueError)


def test_shape_mismatch_raises():
    lb = Letterbox(150, 230, SIZE)
    with pytest.raises(ValueError, match="expected"):
        lb.apply_image(np.zeros((230, 150, 3), np.uint8))
    with pytest.raises(ValueError, match="expected"):
        lb.apply_mask(np.zeros((230, 150), np.uint8))
    with pytest.raises(ValueError, match="stride"):
        lb.box_at_stride((0, 0, 10, 10), stride=5)


# --- Boxes ------------------------------------------------------------------------------------


def brute_force_box_cells(lb: Letterbox, box_xywh, stride: int) -> np.ndarray:
    x0, y0, x1, y1 = lb.apply_box_xywh(box_xywh)
    centres = (np.arange(lb.size // stride) + 0.5) * stride
    inside_x = (centres >= x0) & (centres < x1)
    inside_y = (centres >= y0) & (centres < y1)
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def test_box_raster_covers_box_cells():
    lb = Letterbox(150, 230, SIZE)
    box = (40.0, 30.0, 100.0, 60.0)
    raster = lb.box_at_stride(box)
    assert raster.shape == (SIZE // 4, SIZE // 4) and raster.dtype == np.float32
    np.testing.assert_array_equal(raster, brute_force_box_cells(lb, box, 4))
    x0, y0, x1, y1 = lb.apply_box_xywh(box)
    ys, xs = np.nonzero(raster)
    # every cell lying fully inside the box is on; every cell that is on touches the box
    assert xs.min() * 4 <= x0 + 4 and (xs.max() + 1) * 4 >= x1 - 4
    assert ys.min() * 4 <= y0 + 4 and (ys.max() + 1) * 4 >= y1 - 4
    assert xs.min() * 4 + 2 >= x0 and (xs.max() + 1) * 4 - 2 <= x1


def test_tiny_and_thin_boxes_cover_a_cell():
    lb = Letterbox(150, 230, SIZE)
    tiny = (100.2, 70.1, 0.3, 0.3)
    raster = lb.box_at_stride(tiny)
    assert raster.sum() == 1
    cx, cy = lb.apply_box_xywh(tiny).reshape(2, 2).mean(0)
    assert raster[int(cy // 4), int(cx // 4)] == 1
    thin = (10.0, 70.0, 150.0, 0.4)
    raster = lb.box_at_stride(thin)
    assert np.count_nonzero(raster.any(axis=1)) == 1
    assert np.count_nonzero(raster.any(axis=0)) > 50


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(8, 300),
    w=st.integers(8, 300),
    fx=st.floats(0, 0.99),
    fy=st.floats(0, 0.99),
    fw=st.floats(0.001, 1),
    fh=st.floats(0.001, 1),
)
def test_box_raster_property(h, w, fx, fy, fw, fh):
    x, y = fx * w, fy * h
    box = (x, y, max(fw * (w - x), 1e-3), max(fh * (h - y), 1e-3))
    lb = Letterbox(h, w, SIZE)
    raster = lb.box_at_stride(box)
    assert raster.sum() >= 1
    reference = brute_force_box_cells(lb, box, 4)
    if reference.any():
        np.testing.assert_array_equal(raster, reference)


def test_mask_at_stride_of_a_rectangle_is_its_box():
    h, w = 150, 230
    mask = np.zeros((h, w), np.uint8)
    mask[30:90, 40:140] = 1
    lb = Letterbox(h, w, SIZE)
    by_mask, by_box = lb.mask_at_stride(mask), lb.box_at_stride((40, 30, 100, 60))
    assert set(np.unique(by_mask)) <= {0.0, 1.0}
    # they may only disagree on the boundary ring of cells
    assert np.count_nonzero(by_mask != by_box) <= 2 * (by_box.sum(0).max() + by_box.sum(1).max())
    assert coco_iou(by_mask > 0, by_box > 0) >= 0.9


def test_validate_box():
    assert validate_box((10, 20, 30, 40), 100, 100) == (10, 20, 30, 40)
    assert validate_box((-0.4, 0, 10, 10), 100, 100) == pytest.approx((0, 0, 9.6, 10))
    assert validate_box((95, 95, 5.5, 5.9), 100, 100) == pytest.approx((95, 95, 5, 5))
    bad = [
        (10, 20, 0, 40),  # zero width
        (10, 20, 30, -1),  # negative height
        (200, 200, 10, 10),  # fully outside
        (-30, -30, 10, 10),  # fully outside, negative side
        (50, 50, 80, 20),  # reaches 30 px past the right edge (xyxy passed as xywh?)
        (10, float("nan"), 5, 5),
    ]
    for box in bad:
        with pytest.raises(BoxOutsideImageError):
            validate_box(box, 100, 100)
    assert issubclass(BoxOutsideImageError, ValueError)


# --- RLE --------------------------------------------------------------------------------------


def test_rle_round_trip():
    mask = blob_mask(150, 230, 5)
    counts = rle_encode(mask)
    assert isinstance(counts, str)
    np.testing.assert_array_equal(rle_decode(counts, 150, 230), mask)
    np.testing.assert_array_equal(rle_decode(counts.encode(), 150, 230), mask)
    decoded = rle_decode(counts, 150, 230)
    assert decoded.dtype == np.uint8 and decoded.shape == (150, 230)
    # uncompressed COCO counts (column-major runs, starting with zeros)
    np.testing.assert_array_equal(rle_decode([2, 3, 1], 2, 3), [[0, 1, 1], [0, 1, 0]])
