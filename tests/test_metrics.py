"""Metrics against hand-computed values and pycocotools' IoU; the evaluation geometry."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from gtms.data.transforms import Letterbox, rle_encode
from gtms.eval.metrics import (
    SegmentationMeter,
    error_shares,
    error_summary,
    intersection_union,
    iou_from_counts,
    score_prediction,
)


def test_hand_computed_meter():
    meter = SegmentationMeter()
    meter.add(5, 10)   # IoU 0.5
    meter.add(9, 10)   # IoU 0.9
    meter.add(0, 4)    # IoU 0
    s = meter.summary()
    assert s["mean_iou"] == pytest.approx((0.5 + 0.9 + 0.0) / 3)
    assert s["overall_iou"] == pytest.approx(14 / 24)
    assert s["prec@0.5"] == pytest.approx(1 / 3)      # strictly above 0.5
    assert s["prec@0.8"] == pytest.approx(1 / 3)
    assert s["prec@0.9"] == pytest.approx(0.0)
    assert s["n"] == 3


def test_merge_equals_single_meter():
    a, b, both = SegmentationMeter(), SegmentationMeter(), SegmentationMeter()
    for i, (inter, union) in enumerate([(1, 2), (3, 3), (0, 5), (2, 7)]):
        (a if i % 2 else b).add(inter, union)
        both.add(inter, union)
    assert a.merge(b).summary()["overall_iou"] == both.summary()["overall_iou"]
    assert a.merge(b).summary()["mean_iou"] == pytest.approx(both.summary()["mean_iou"])


def test_empty_meter_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        SegmentationMeter().summary()


def test_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(10):
        pred = (rng.random((37, 53)) > 0.5).astype(np.uint8)
        gt = (rng.random((37, 53)) > 0.3).astype(np.uint8)
        inter, union = intersection_union(pred, gt)
        ref = mask_utils.iou([mask_utils.encode(np.asfortranarray(pred))],
                             [mask_utils.encode(np.asfortranarray(gt))], [0])[0, 0]
        assert iou_from_counts([inter], [union])[0] == pytest.approx(ref)


def test_both_empty_counts_as_one_and_shape_mismatch_raises():
    assert iou_from_counts([0], [0])[0] == 1.0
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((2, 2)), np.zeros((2, 3)))


def test_score_prediction_maps_back_to_the_original_image():
    h, w, size = 90, 150, 256
    gt = np.zeros((h, w), np.uint8)
    gt[20:70, 30:110] = 1
    letterbox = Letterbox(h, w, size)
    probs = letterbox.mask_at_stride(gt, 4)  # a perfect stride-4 prediction
    inter, union = score_prediction(probs, (h, w), rle_encode(gt), size, 0.35)
    assert inter / union > 0.9
    inter, union = score_prediction(1 - probs, (h, w), rle_encode(gt), size, 0.35)
    assert inter / union < 0.1


def test_peak_in_box_and_grounding_summary():
    from gtms.eval.metrics import grounding_summary, peak_in_box

    box = np.zeros((4, 4))
    box[1:3, 1:3] = 1
    probs = np.zeros((4, 4))
    probs[2, 2] = 0.9
    assert peak_in_box(probs, box)
    probs[0, 3] = 0.95  # a higher peak on a distractor
    assert not peak_in_box(probs, box)
    with pytest.raises(ValueError, match="differ in shape"):
        peak_in_box(probs, box[:3])
    summary = grounding_summary([True, False, True], np.array([0.8, 0.1, 0.4]))
    assert summary["grounded"] == pytest.approx(2 / 3)
    assert summary["mean_iou_grounded"] == pytest.approx(0.6)
    assert summary["mean_iou_missed"] == pytest.approx(0.1)
    assert np.isnan(grounding_summary([True], np.array([0.5]))["mean_iou_missed"])


def test_error_shares_hand_computed():
    # 12 x 12 grid; box rows 4-7, cols 4-7; mask = its left half (cols 4-5).
    box = np.zeros((12, 12), np.float32)
    box[4:8, 4:8] = 1
    mask = np.zeros_like(box)
    mask[4:8, 4:6] = 1
    probs = np.zeros_like(box)
    probs[4:8, 4:7] = 0.9      # 8 mask cells + 4 box-background cells (col 6)
    probs[4, 8] = 0.9          # 1 cell just right of the box (near)
    probs[5, 11] = 0.9         # 1 cell in the box's rows, 4 cells away (band)
    probs[0, 0] = 0.9          # 1 cell elsewhere
    probs[7, 5] = 0.2          # below the threshold: one missed mask cell
    s = error_shares(probs, box, mask, threshold=0.35, near=2)
    union = 7 + 4 + 1 + 1 + 1 + 1  # intersection, in-box FP, near, band, elsewhere, FN
    assert s["iou"] == pytest.approx(7 / union)
    assert s["fp_in_box"] == pytest.approx(4 / union)
    assert s["fp_near_box"] == pytest.approx(1 / union)
    assert s["fp_box_band"] == pytest.approx(1 / union)
    assert s["fp_elsewhere"] == pytest.approx(1 / union)
    assert s["fn"] == pytest.approx(1 / union)
    assert sum(s.values()) == pytest.approx(1.0)
    # The same IoU as the pixel-exact meter on the same maps.
    inter, uni = intersection_union(probs > 0.35, mask > 0.5)
    assert s["iou"] == pytest.approx(inter / uni)


def test_error_shares_random_maps_add_up_and_summary_averages():
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(20):
        box = np.zeros((20, 20), np.float32)
        y, x = rng.integers(0, 14, 2)
        box[y:y + 6, x:x + 5] = 1
        mask = box * (rng.random(box.shape) < 0.6)
        s = error_shares(rng.random(box.shape), box, mask, threshold=0.5)
        assert sum(s.values()) == pytest.approx(1.0)
        assert all(v >= 0 for v in s.values())
        shares.append(s)
    summary = error_summary(shares)
    assert summary["err_fn"] == pytest.approx(np.mean([s["fn"] for s in shares]))
    assert error_summary([]) == {}
    empty = np.zeros((4, 4))
    assert error_shares(empty, empty, empty, 0.35)["iou"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        error_shares(np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)), 0.35)
