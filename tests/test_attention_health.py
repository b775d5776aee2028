"""GradCAM's health (fallback share, pointing, contrast) and the attention sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import read_jsonl, small_config

from gtms.backend import LocalBackend
from gtms.eval.evaluate import evaluate, format_table
from gtms.eval.metrics import AttentionMeter
from gtms.model.build import build_model, starting_backbone
from gtms.pseudo.attention_source import FrozenAttention, TrainedAttention
from gtms.pseudo.gradcam import attention_from_cam, gradcam_attention
from gtms.train.fit import fit


def _scene(rng, n=40, side=8):
    box = np.zeros((n, side, side), np.float32)
    mask = np.zeros_like(box)
    for i in range(n):
        y0, x0 = rng.integers(0, 3, 2)
        y1, x1 = y0 + rng.integers(3, 6), x0 + rng.integers(3, 6)
        box[i, y0:y1, x0:x1] = 1
        mask[i, y0 + 1:y1, x0:x1 - 1] = rng.random((y1 - y0 - 1, x1 - x0 - 1)) > 0.4
    attention = rng.random(box.shape).astype(np.float32)
    fallback = rng.random(n) < 0.3
    mask[3] = 0   # a sample whose mask misses its box: no pointing, no contrast
    return attention, fallback, box, mask


def test_meter_matches_a_sample_by_sample_count():
    attention, fallback, box, mask = _scene(np.random.default_rng(0))
    meter = AttentionMeter()
    meter.add(attention[:25], fallback[:25], box[:25], mask[:25])
    meter = meter.merge(_one_batch(attention[25:], fallback[25:], box[25:], mask[25:]))
    hits, chances, contrasts = [], [], []
    for a, f, b, m in zip(attention, fallback, box, mask):
        inside = b > 0
        on, off = inside & (m > 0), inside & (m == 0)
        if on.any() and not f:
            cells = [(a[y, x], y, x) for y, x in zip(*np.nonzero(inside))]
            _, y, x = max(cells, key=lambda c: (c[0], -c[1], -c[2]))
            hits.append(bool(m[y, x]))
            chances.append(on.sum() / inside.sum())
        if on.any() and off.any():
            contrasts.append(a[on].mean() - a[off].mean())
    summary = meter.summary()
    assert len(meter) == 40
    assert summary["attention_fallback"] == pytest.approx(fallback.mean())
    assert summary["attention_pointing"] == pytest.approx(np.mean(hits))
    assert summary["attention_pointing_chance"] == pytest.approx(np.mean(chances))
    assert summary["attention_contrast"] == pytest.approx(np.mean(contrasts), rel=1e-5)
    # Without masks only the fallback share is known.
    assert set(_one_batch(attention, fallback, box, None).summary()) == {"attention_fallback"}


def _one_batch(*args) -> AttentionMeter:
    meter = AttentionMeter()
    meter.add(*args)
    return meter


def test_a_zero_map_falls_back_to_the_box_and_says_so():
    box = torch.zeros(3, 6, 6)
    box[:, 1:4, 1:5] = 1
    cam = torch.rand(3, 2, 2)
    cam[1] = 0                        # zero everywhere
    cam[2] = torch.tensor([[0.0, 0.0], [0.0, 5.0]])   # one corner: bilinear reaches the box
    attention = attention_from_cam(cam, box)
    assert attention.fallback.tolist() == [False, True, False]
    assert torch.equal(attention.map[1], box[1])
    assert torch.allclose(attention.map[0].amax(), torch.tensor(1.0))


def test_frozen_source_is_the_starting_towers_and_caches_per_sentence():
    torch.manual_seed(3)
    model = build_model("tiny")
    backbone = starting_backbone("tiny", word_len=17, clip_weights=None, init_checkpoint=None,
                                 seed=3)
    for name, value in backbone.state_dict().items():   # same init as the run's rank 0
        assert torch.equal(value, model.backbone.state_dict()[name]), name
    model.eval()
    image, tokens = torch.randn(4, 3, 64, 64), torch.randint(1, 400, (4, 17))
    batch = {"image": image, "tokens": tokens, "ref_id": torch.tensor([7, 7, 8, 9]),
             "sent_index": torch.tensor([0, 1, 0, 0])}
    out = model(image, tokens)
    frozen = FrozenAttention(backbone)
    cams = frozen.cams(out, batch, model)
    assert torch.allclose(cams, TrainedAttention().cams(out, batch, model), atol=1e-6)
    assert (len(frozen), frozen.computed) == (4, 4)
    with torch.no_grad():                 # training moves the model, not the frozen copy
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = model(image, tokens)
    again = frozen.cams(out, batch, model)
    assert frozen.computed == 4 and torch.equal(again, cams)
    assert not torch.allclose(TrainedAttention().cams(out, batch, model), cams, atol=1e-4)
    box = torch.ones(4, 16, 16)
    assert torch.allclose(attention_from_cam(cams, box).map,
                          gradcam_attention(_layer4(backbone, image), backbone.encode_text(
                              tokens).sentence.detach(), backbone.global_image_embedding, box),
                          atol=1e-6)


def _layer4(backbone, image):
    with torch.no_grad():
        return backbone.encode_image(image).layer4


def _silent_text_checkpoint(path: Path) -> Path:
    """A CRIS checkpoint whose sentence feature is 0 (text_projection zeroed), so every GradCAM
    map is zero and A must fall back to the box for every sample."""
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        model.backbone.text_projection.zero_()
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("source", ["trained", "frozen"])
def test_a_model_whose_map_is_zero_is_counted_as_fallback(synthref_small, tmp_path, source):
    checkpoint = _silent_text_checkpoint(tmp_path / "silent.pt")
    cfg = small_config(synthref_small, tmp_path, f"train.name={source}", "train.epochs=1",
                       f"model.init_checkpoint={checkpoint}", "model.freeze_backbone=true",
                       f"pseudo.attention_source={source}")
    summary = fit(cfg, LocalBackend())
    final = summary["final"]
    assert final["train_attention_fallback"] == 1.0
    assert final["val_attention_fallback"] == 1.0
    assert final["train_samples"] == 24
    # eval --pseudo-labels reads the same health off the checkpoint (its config's source).
    report = evaluate(summary["best_checkpoint"], None, ["val"], None, pseudo_labels=True,
                      backend=LocalBackend())
    assert report["splits"]["val"]["attention_fallback"] == 1.0
    assert "GradCAM's health" in format_table(report["splits"])
    # The same data with a working text tower: GradCAM points somewhere for every sample.
    cfg = small_config(synthref_small, tmp_path, f"train.name={source}-ok", "train.epochs=1",
                       f"pseudo.attention_source={source}")
    fit(cfg, LocalBackend())
    metrics = read_jsonl(tmp_path / f"{source}-ok" / "metrics.jsonl")[-1]
    assert metrics["train_attention_fallback"] < 1.0
    for key in ("train_attention_pointing", "train_attention_pointing_chance",
                "train_attention_contrast", "val_attention_contrast"):
        assert np.isfinite(metrics[key]), key


def test_the_mask_a_gradcam_row_carries_does_not_train_it(synthref_small, tmp_path):
    """forest-gradcam batches carry the GT mask to measure A against; the loss ignores it."""
    from gtms.data.pipeline import select_sentences, spec_for, stack_samples
    from gtms.data.reading import preprocessed_samples
    from gtms.data.tokenizer import ClipTokenizer
    from gtms.train.step import compute_losses

    spec = spec_for("train", input_size=64, word_len=17, mode="forest-gradcam", seed=0)
    assert spec.with_mask
    samples = list(preprocessed_samples(str(synthref_small), "train", spec, ClipTokenizer(),
                                        limit=4))
    batch, _ = select_sentences(stack_samples(samples, spec), seed=0, epoch=0)
    batch = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    kwargs = dict(mode="forest-gradcam", sigma=0.02, gamma=1.0, binarize_at=0.5, pixel="bce")
    with_mask = compute_losses(model, batch, **kwargs).terms
    flipped = compute_losses(model, dict(batch, mask=1 - batch["mask"]), **kwargs).terms
    assert {k: float(v.detach()) for k, v in with_mask.items()} == \
        {k: float(v.detach()) for k, v in flipped.items()}


def test_a_fallback_panel_is_captioned_as_such():
    from gtms.pseudo.pseudo_label import PseudoLabels
    from gtms.viz import PANEL_TITLES, fallback_titles

    zeros = torch.zeros(2, 4, 4)
    pseudo = PseudoLabels(zeros, zeros, zeros, fallback=torch.tensor([False, True]))
    assert fallback_titles(PANEL_TITLES, pseudo, 0) == list(PANEL_TITLES)
    marked = fallback_titles(PANEL_TITLES, pseudo, 1)
    assert "FALLBACK" in marked[2] and marked[3].endswith("(= box)")
    assert marked[:2] + marked[4:] == list(PANEL_TITLES[:2] + PANEL_TITLES[4:])
