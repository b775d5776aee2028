"""Metrics against hand-computed values and pycocotools' IoU; the evaluation geometry."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from gtms.data.transforms import Letterbox, rle_encode
from gtms.eval.metrics import (
    SegmentationMeter,
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
