"""Losses (Eq. 5-8), ablation modes and the gamma schedule."""

import math

import pytest
import torch
import torch.nn.functional as nnf

from gtms.modes import get_mode
from gtms.pseudo import (
    ABLATION_MODES,
    GAMMA_SHAPES,
    dice_loss,
    gamma_at,
    gtms_loss,
    location_loss,
    pixel_loss,
)


def box_raster(batch=2, size=8):
    box = torch.zeros(batch, size, size)
    box[0, 1:5, 2:7] = 1
    box[1:, 3:8, 0:3] = 1
    return box


def test_perfect_predictions_give_zero():
    box = box_raster()
    assert location_loss(box, box)["loc"].item() == pytest.approx(0.0, abs=1e-5)
    logits = torch.randn(2, 8, 8)
    assert pixel_loss(logits, torch.sigmoid(logits), box)["pix"].item() == 0.0


def test_dice_hand_computed():
    x = torch.tensor([[0.5, 1.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    # 1 - 2 * 1.5 / (1.25 + 2 + 1e-5)
    assert dice_loss(x, t).item() == pytest.approx(1 - 3.0 / (3.25 + 1e-5), rel=1e-6)


def test_location_loss_hand_computed():
    probs = torch.tensor([[[0.2, 0.9, 0.0], [0.4, 0.1, 0.0]]])  # [1, 2, 3]
    box = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])
    # max over x: rows (0.9, 0.4) vs (1, 1); max over y: columns (0.4, 0.9, 0) vs (1, 1, 0).
    rows = 1 - 2 * 1.3 / (0.81 + 0.16 + 2 + 1e-5)
    cols = 1 - 2 * 1.3 / (0.16 + 0.81 + 2 + 1e-5)
    assert location_loss(probs, box)["loc"].item() == pytest.approx(rows + cols, rel=1e-6)
    # [B, 1, H, W] inputs are accepted too.
    assert location_loss(probs[:, None], box)["loc"].item() == pytest.approx(rows + cols, rel=1e-6)


def test_pixel_loss_hand_computed_and_batch_mean():
    probs = torch.tensor([[[0.2, 0.9], [0.4, 0.1]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    box = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # 2nd box empty
    first = (0.2 + 0.1) / 2
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    assert pixel_loss(logits, target, box)["pix"].item() == pytest.approx(first / 2, rel=1e-4)
    # BCE: -log(1 - 0.2) and -log(0.9) over the 2 box pixels of the first sample.
    first = -(math.log(0.8) + math.log(0.9)) / 2
    assert pixel_loss(logits, target, box, "bce")["pix"].item() == pytest.approx(first / 2,
                                                                                  rel=1e-4)
    with pytest.raises(ValueError, match="l2"):
        pixel_loss(logits, target, box, "l2")


def test_pixel_loss_over_the_image_targets_zero_outside_the_box():
    probs = torch.tensor([[[0.2, 0.9], [0.4, 0.1]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.7, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    box = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # 2nd box empty
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    # Every pixel counts, still divided by the box's area (2); outside the box the target is 0
    # whatever P-hat says there. A sample without a box contributes 0, as with region="box".
    first = (0.2 + 0.1 + 0.4 + 0.1) / 2
    second = 0.0
    got = pixel_loss(logits, target, box, "l1", "image")["pix"].item()
    assert got == pytest.approx((first + second) / 2, rel=1e-4)
    # A prediction outside the box gets a gradient only with region="image".
    for region, outside_grad in (("box", 0.0), ("image", True)):
        logit = logits.clone().requires_grad_(True)
        pixel_loss(logit, target, box, "bce", region)["pix"].backward()
        if outside_grad:
            assert logit.grad[0, 1, 0] > 0      # P = 0.4 outside the box is pushed down
        else:
            assert logit.grad[0, 1, 0] == 0
    terms = gtms_loss("tree", logits[:, None], box, pseudo_label=target, gamma=1.0, pixel="l1",
                      pixel_region="image")
    assert terms["pix"].item() == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="region"):
        pixel_loss(logits, target, box, "l1", "everywhere")


def test_bce_pixel_loss_pushes_a_far_pixel_harder_than_l1():
    # A pixel at P = 0.05 whose label is 1: L1's push on the logit is sigmoid' = 0.0475,
    # BCE's is 1 - P = 0.95 (both over a one-pixel box).
    box = torch.ones(1, 1, 1)
    pushes = {}
    for kind in ("l1", "bce"):
        logit = torch.logit(torch.tensor([[[0.05]]])).requires_grad_(True)
        pixel_loss(logit, torch.ones(1, 1, 1), box, kind)["pix"].backward()
        pushes[kind] = -logit.grad.item()
    assert pushes["l1"] == pytest.approx(0.05 * 0.95, rel=1e-4)
    assert pushes["bce"] == pytest.approx(0.95, rel=1e-4)


def test_mode_terms_and_totals():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    box, mask = box_raster(), (torch.rand(2, 8, 8) > 0.5).float()
    pseudo = torch.rand(2, 8, 8)
    expected_terms = {
        "mask-bce": {"loss", "bce"},
        "box-bce": {"loss", "bce"},
        "box-lloc": {"loss", "loc"},
        "tree": {"loss", "loc", "pix", "gamma"},
        "forest-gradcam": {"loss", "loc", "pix", "gamma"},
    }
    assert set(expected_terms) == set(ABLATION_MODES)
    for mode in ABLATION_MODES:
        terms = gtms_loss(mode, logits, box, pseudo_label=pseudo, mask=mask, gamma=0.3)
        assert set(terms) == expected_terms[mode], mode
        assert all(t.ndim == 0 for t in terms.values())
        terms["loss"].backward()
    probs = torch.sigmoid(logits[:, 0])
    terms = gtms_loss("tree", logits, box, pseudo_label=pseudo, gamma=0.3)
    loc = location_loss(probs, box)["loc"]
    pix = pixel_loss(logits, pseudo, box)["pix"]
    torch.testing.assert_close(terms["loss"], loc + 0.3 * pix)
    torch.testing.assert_close(pix, ((probs - pseudo).abs() * box).sum((1, 2)).div(
        box.sum((1, 2))).mean())
    terms = gtms_loss("tree", logits, box, pseudo_label=pseudo, gamma=0.3, pixel="bce")
    pix = pixel_loss(logits, pseudo, box, "bce")["pix"]
    torch.testing.assert_close(terms["loss"], loc + 0.3 * pix)
    bce = gtms_loss("mask-bce", logits, box, mask=mask)["bce"]
    torch.testing.assert_close(bce, nnf.binary_cross_entropy_with_logits(logits[:, 0], mask))
    bce = gtms_loss("box-bce", logits, box)["bce"]
    torch.testing.assert_close(bce, nnf.binary_cross_entropy_with_logits(logits[:, 0], box))


def test_pseudo_label_gets_no_gradient():
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    pseudo = torch.rand(1, 4, 4, requires_grad=True)
    gtms_loss("forest-gradcam", logits, torch.ones(1, 4, 4), pseudo_label=pseudo,
              gamma=1.0)["loss"].backward()
    assert pseudo.grad is None and logits.grad is not None


def test_missing_inputs_and_unknown_mode():
    logits, box = torch.randn(1, 1, 4, 4), torch.ones(1, 4, 4)
    with pytest.raises(ValueError, match="mask"):
        gtms_loss("mask-bce", logits, box)
    with pytest.raises(ValueError, match="pseudo_label"):
        gtms_loss("tree", logits, box)
    with pytest.raises(ValueError, match="unknown loss mode"):
        gtms_loss("boxinst", logits, box)


def test_get_mode_flags():
    assert get_mode("mask-bce").mask and not get_mode("mask-bce").pseudo_label
    lloc = get_mode("box-lloc")
    assert not (lloc.mask or lloc.tree or lloc.forest or lloc.gradcam or lloc.pseudo_label)
    tree, full = get_mode("tree"), get_mode("forest-gradcam")
    assert tree.pseudo_label and tree.tree and not tree.forest and not tree.gradcam
    assert full.pseudo_label and full.forest and full.gradcam and not full.mask
    with pytest.raises(ValueError, match="forest-gradcam"):
        get_mode("nope")


def test_one_registry_decides_config_pipeline_and_loss(monkeypatch):
    """A mode added to gtms.modes is accepted by the config and followed by the pipeline's
    spec and the loss, with no other edit."""
    import gtms.modes as modes
    from gtms.config import load_config
    from gtms.data.pipeline import spec_for

    extra = modes.Mode("tree-mask-check", loss="loc+pix", tree=True, mask=True)
    monkeypatch.setitem(modes.MODES, extra.name, extra)
    spec = spec_for("train", input_size=64, word_len=17, mode=extra.name, seed=0)
    assert spec.with_tree and spec.with_mask and not spec.with_forest
    torch.manual_seed(0)
    logits, box = torch.randn(2, 1, 8, 8), box_raster()
    terms = gtms_loss(extra.name, logits, box, pseudo_label=torch.rand(2, 8, 8), gamma=0.5)
    assert set(terms) == {"loss", "loc", "pix", "gamma"}
    assert load_config(None, ["loss.mode=tree"]).loss.mode == "tree"
    with pytest.raises(ValueError, match="loss.mode"):
        load_config(None, ["loss.mode=nope"])


@pytest.mark.parametrize(
    ("step", "shape", "expected"),
    [
        (0, "linear", 0.0),
        (250, "linear", 0.25),  # 100 steps/epoch, 10 warm-up epochs
        (999, "linear", 0.999),
        (1000, "linear", 1.0),
        (5000, "linear", 1.0),
        (0, "constant", 1.0),
        (0, "cosine", 0.0),
        (250, "cosine", (1 - math.cos(math.pi / 4)) / 2),
        (500, "cosine", 0.5),
        (1000, "cosine", 1.0),
    ],
)
def test_gamma_schedule_values(step, shape, expected):
    assert gamma_at(step, 100, shape=shape) == pytest.approx(expected)


def test_gamma_schedule_options_and_errors():
    assert set(GAMMA_SHAPES) == {"linear", "constant", "cosine"}
    assert gamma_at(30, 10, gamma_max=2.0, warmup_epochs=6) == pytest.approx(1.0)
    assert gamma_at(0, 10, warmup_epochs=0) == 1.0
    # A delay keeps gamma at 0, then the ramp starts from 0 (here 2 epochs delay, 4 of warm-up).
    assert [gamma_at(s, 10, warmup_epochs=4, delay_epochs=2) for s in (0, 19, 20, 40, 60, 99)] \
        == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    assert gamma_at(25, 10, warmup_epochs=0, delay_epochs=2.5) == 1.0
    assert gamma_at(24, 10, warmup_epochs=0, delay_epochs=2.5) == 0.0
    for kwargs in (
        {"step": 0, "steps_per_epoch": 10, "delay_epochs": -1.0},
        {"step": -1, "steps_per_epoch": 10},
        {"step": 1.5, "steps_per_epoch": 10},
        {"step": 0, "steps_per_epoch": 0},
        {"step": 0, "steps_per_epoch": 10, "gamma_max": -1.0},
        {"step": 0, "steps_per_epoch": 10, "gamma_max": float("nan")},
        {"step": 0, "steps_per_epoch": 10, "warmup_epochs": -1},
        {"step": 0, "steps_per_epoch": 10, "shape": "exponential"},
    ):
        with pytest.raises(ValueError):
            gamma_at(**kwargs)


def test_alignment_loss_is_clips_symmetric_cross_entropy():
    from gtms.pseudo.losses import alignment_loss

    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    cos = torch.nn.functional.cosine_similarity(image[:, None], text[None], dim=-1) / 0.07
    rows = -(cos.diag() - cos.logsumexp(dim=1)).mean()      # image -> its own sentence
    cols = -(cos.diag() - cos.logsumexp(dim=0)).mean()      # sentence -> its own image
    assert torch.allclose(alignment_loss(image, text), (rows + cols) / 2, atol=1e-5)
    aligned = torch.eye(5, 8)
    assert alignment_loss(aligned, aligned) < 1e-3 < alignment_loss(aligned, aligned.roll(1, 0))
