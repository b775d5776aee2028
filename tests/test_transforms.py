"""Letterbox, box/mask rasterisation, normalisation, decoding and RLE (DESIGN.md, "Data")."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    model_input,
    normalize,
    rle_decode,
    rle_encode,
    validate_box,
)
from gtms.eval.metrics import score_prediction

SIZE = 416
SHAPES = [(150, 230), (230, 150), (480, 640), (37, 300)]
# CRIS passes CLIP_MEAN * 255 as the border of a uint8 image; OpenCV rounds it to (123, 117, 104)
BORDER_RGB01 = np.round(np.asarray(CLIP_MEAN) * 255.0) / 255.0


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
        assert letterboxed.shape == (SIZE, SIZE) and letterboxed.dtype == np.float32
        assert letterboxed.min() >= 0.0 and letterboxed.max() <= 1.0
        back = lb.invert_prediction(letterboxed)
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
    x, y, bw, bh = mask_box_xywh(lb.apply_mask(mask) >= 0.5)
    np.testing.assert_allclose(box_xyxy, [x, y, x + bw, y + bh], atol=1.0)


def test_image_and_mask_land_on_the_same_pixels():
    h, w = 150, 230
    mask = blob_mask(h, w, 11)
    lb = Letterbox(h, w, SIZE)
    img = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    # away from the letterbox border, where INTER_CUBIC rings between black and the CLIP mean
    inside = lb.apply_mask(np.ones((h, w), np.uint8)) == 1.0
    from_image = (lb.apply_image(img)[..., 0] > 0.5) & inside
    assert coco_iou(from_image, (lb.apply_mask(mask) >= 0.5) & inside) >= 0.99


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
    ring = 2 * lb.scale  # INTER_CUBIC reaches 2 source pixels into the border
    border = out[: int(by - ring) - 1] if h < w else out[:, : int(bx - ring) - 1]
    assert border.size > 0
    np.testing.assert_allclose(border - BORDER_RGB01, 0.0, atol=1e-6)
    np.testing.assert_allclose(out[SIZE // 2, SIZE // 2], colour / 255.0, atol=1e-6)


def test_guide_image_shape_and_values():
    lb = Letterbox(150, 230, SIZE)
    img01 = lb.apply_image(np.full((150, 230, 3), 200, np.uint8))
    guide = lb.guide_image(img01)
    assert guide.shape == (SIZE // 4, SIZE // 4, 3) and guide.dtype == np.float32
    np.testing.assert_allclose(guide[52, 52], 200 / 255.0, atol=1e-6)
    np.testing.assert_allclose(guide[0, 0], BORDER_RGB01, atol=1e-6)
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


# --- CRIS fidelity ----------------------------------------------------------------------------
# An independent transcription of CRIS.pytorch's formulas (utils/dataset.py getTransformMat and
# convert, engine/engine.py validate/inference), written from its equations; our Letterbox must
# reproduce it exactly (DESIGN.md "Data").

CRIS_SHAPES = [(333, 517), (517, 333), (1, 7)]
CRIS_STD = (0.26862954, 0.26130258, 0.27577711)


def cris_matrices(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """CRIS getTransformMat(inverse=True): (mat, mat_inv)."""
    scale = min(size / h, size / w)
    new_h, new_w = h * scale, w * scale
    bias_x, bias_y = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bias_x, bias_y], [new_w + bias_x, bias_y], [bias_x, new_h + bias_y]],
                   np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)


def cris_warped_uint8(img: np.ndarray, size: int) -> np.ndarray:
    mat, _ = cris_matrices(img.shape[0], img.shape[1], size)
    return cv2.warpAffine(img, mat, (size, size), flags=cv2.INTER_CUBIC,
                          borderValue=[m * 255 for m in CLIP_MEAN])


def cris_input(img: np.ndarray, size: int) -> np.ndarray:
    """CRIS: warp the uint8 RGB image, ToTensor, /255, - mean, / std -> ``[3, S, S]``."""
    t = torch.from_numpy(cris_warped_uint8(img, size).transpose(2, 0, 1)).float()
    t.div_(255.0).sub_(torch.tensor(CLIP_MEAN).reshape(3, 1, 1))
    return t.div_(torch.tensor(CRIS_STD).reshape(3, 1, 1)).numpy()


def cris_mask_back(logits_at_stride: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """CRIS evaluation: sigmoid, bicubic (align_corners) to S, inverse warp, > 0.35."""
    _, mat_inv = cris_matrices(h, w, size)
    pred = torch.sigmoid(torch.from_numpy(logits_at_stride)[None, None])
    pred = F.interpolate(pred, size=(size, size), mode="bicubic", align_corners=True)
    pred = cv2.warpAffine(pred.squeeze(1)[0].numpy(), mat_inv, (w, h),
                          flags=cv2.INTER_CUBIC, borderValue=0.0)
    return pred > 0.35


def logits_at_stride4(noisy: bool, seed: int = 0) -> np.ndarray:
    """``[S/4, S/4]`` float32 logits: a smooth off-centre ellipse, optionally with noise."""
    n = SIZE // 4
    y, x = np.mgrid[0:n, 0:n] / n
    z = 6.0 * (1.0 - ((x - 0.45) / 0.3) ** 2 - ((y - 0.55) / 0.25) ** 2)
    if noisy:
        z = z + np.random.default_rng(seed).normal(0.0, 3.0, z.shape)
    return z.astype(np.float32)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w"), CRIS_SHAPES)
def test_matrices_are_cris(h, w):
    mat, mat_inv = cris_matrices(h, w, SIZE)
    lb = Letterbox(h, w, SIZE)
    np.testing.assert_array_equal(lb.matrix, mat)
    np.testing.assert_array_equal(lb.inverse_matrix, mat_inv)


@pytest.mark.parametrize(("h", "w"), CRIS_SHAPES)
def test_input_tensor_is_cris(h, w):
    img = random_image(h, w)
    lb = Letterbox(h, w, SIZE)
    ours = normalize(lb.apply_image(img))
    assert ours.shape == (3, SIZE, SIZE) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, cris_input(img, SIZE), rtol=0, atol=1e-6)
    # The pipeline hands over the letterboxed uint8 pixels; the model's mean/std on its device
    # gives exactly the same tensor, so CRIS's input is unchanged to the same tolerance.
    pixels = lb.apply_image_uint8(img)
    assert pixels.dtype == np.uint8
    on_device = model_input(torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None])[0]
    np.testing.assert_array_equal(on_device.numpy(), ours)
    np.testing.assert_allclose(on_device.numpy(), cris_input(img, SIZE), rtol=0, atol=1e-6)
    already = torch.from_numpy(ours)[None]
    assert model_input(already) is already            # float input is taken as standardised


@pytest.mark.parametrize(("h", "w"), CRIS_SHAPES)
@pytest.mark.parametrize("noisy", [False, True], ids=["smooth", "noisy"])
def test_mask_mapped_back_is_cris(h, w, noisy):
    logits = logits_at_stride4(noisy)
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    ours = Letterbox(h, w, SIZE).invert_prediction(probs) > 0.35
    expected = cris_mask_back(logits, h, w, SIZE)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("noisy", [False, True], ids=["smooth", "noisy"])
def test_score_prediction_is_cris(noisy):
    h, w = 333, 517
    target = blob_mask(h, w, 2)
    logits = logits_at_stride4(noisy, seed=1)
    pred = cris_mask_back(logits, h, w, SIZE)
    expected = (int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum()))
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    assert score_prediction(probs, (h, w), rle_encode(target), SIZE, 0.35) == expected


@pytest.mark.parametrize(("h", "w"), CRIS_SHAPES)
def test_guide_image_is_the_cris_letterbox_resized(h, w):
    img = random_image(h, w, seed=3)
    lb = Letterbox(h, w, SIZE)
    expected = cv2.resize(cris_warped_uint8(img, SIZE).astype(np.float32) / 255.0,
                          (SIZE // 4, SIZE // 4), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(lb.guide_image(lb.apply_image(img)), expected, rtol=0, atol=1e-6)


def half_crossings(profile: np.ndarray, near: tuple[float, float]) -> tuple[float, float]:
    """The rising and the falling 0.5 crossing of a 1-D profile nearest to ``near``, in
    continuous coordinates (linear between samples, sample k at k + 0.5). Taking the nearest
    skips the INTER_CUBIC ringing at the letterbox border."""
    k = np.flatnonzero((profile[:-1] < 0.5) != (profile[1:] < 0.5))
    at = k + (0.5 - profile[k]) / (profile[k + 1] - profile[k]) + 0.5
    rising = at[profile[k + 1] > profile[k]]
    falling = at[profile[k + 1] < profile[k]]
    return (rising[np.argmin(abs(rising - near[0]))], falling[np.argmin(abs(falling - near[1]))])


@pytest.mark.parametrize(("h", "w", "box_xywh"), [
    (150, 230, (40, 30, 100, 60)),
    (40, 13, (3, 10, 7, 20)),
])  # upscaling only: when downscaling, too few samples cross an edge to locate it this well
def test_box_follows_the_cris_image(h, w, box_xywh):
    """A white rectangle warped by CRIS's formulas has its edges (0.5 crossings) where
    ``apply_box_xywh`` puts the rectangle's box: pixel centres agree with CRIS's matrix."""
    x, y, bw, bh = box_xywh
    img = np.zeros((h, w, 3), np.uint8)
    img[y:y + bh, x:x + bw] = 255
    warped = cris_warped_uint8(img, SIZE)[..., 0].astype(np.float64) / 255.0
    x0, y0, x1, y1 = Letterbox(h, w, SIZE).apply_box_xywh(box_xywh)
    tolerance = 0.05 * SIZE / max(h, w)  # 1/20 of a source pixel
    row, col = int((y0 + y1) / 2), int((x0 + x1) / 2)
    np.testing.assert_allclose(half_crossings(warped[row], (x0, x1)), (x0, x1), atol=tolerance)
    np.testing.assert_allclose(half_crossings(warped[:, col], (y0, y1)), (y0, y1), atol=tolerance)


@pytest.mark.parametrize(("h", "w"), CRIS_SHAPES[:2])
def test_mask_at_stride_follows_the_cris_mask(h, w):
    """CRIS's training mask (0/255, INTER_LINEAR, border 0, /255), averaged per 4x4 cell, >= 0.5."""
    mask = blob_mask(h, w, 4)
    mat, _ = cris_matrices(h, w, SIZE)
    cris = cv2.warpAffine(mask * np.uint8(255), mat, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                          borderValue=0.0) / 255.0
    n = SIZE // 4
    expected = cris.reshape(n, 4, n, 4).mean(axis=(1, 3)) >= 0.5
    np.testing.assert_array_equal(Letterbox(h, w, SIZE).mask_at_stride(mask), expected)
