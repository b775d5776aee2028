"""CRIS model: shapes, parameter layout against the CRIS fixture, text/decoder/projector behaviour,
GradCAM compatibility, optimiser groups. Fast: only the tiny preset runs forward passes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gtms.model import (
    CRISArch,
    build_from_arch,
    build_model,
    count_parameters,
    param_groups,
    preset_arch,
)
from gtms.model.decoder import TransformerDecoder, sine_positions_2d
from gtms.model.projector import Projector

# A copy of shared/fixtures/cris_state_dict_shapes.json, kept in the repository.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SOT, EOT = 49406, 49407


def tokens_of(*sentences: list[int], word_len: int = 17) -> torch.Tensor:
    """BPE id lists -> [B, word_len] with SOT/EOT and zero padding."""
    rows = [[SOT, *ids, EOT] + [0] * (word_len - len(ids) - 2) for ids in sentences]
    return torch.tensor(rows, dtype=torch.int64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def cris_fixture():
    return json.loads((FIXTURES / "cris_state_dict_shapes.json").read_text())


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [416, 128, 320])
def test_output_shapes(tiny, size):
    tokens = tokens_of([1823, 8687], [2533, 4919, 593])
    with torch.no_grad():
        out = tiny(torch.randn(2, 3, size, size), tokens)
    assert out.logits.shape == (2, 1, size // 4, size // 4)
    assert out.layer4.shape == (2, 32 * tiny.arch.vision_width, size // 32, size // 32)
    assert out.sentence.shape == (2, tiny.arch.embed_dim)
    assert torch.isfinite(out.logits).all()


def test_416_gives_104(tiny):
    with torch.no_grad():
        out = tiny(torch.randn(1, 3, 416, 416), tokens_of([1823]))
    assert out.logits.shape[-2:] == (104, 104)


def test_image_size_must_be_multiple_of_32(tiny):
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny(torch.randn(1, 3, 100, 128), tokens_of([1823]))


def test_tokens_longer_than_word_len_are_refused(tiny):
    with pytest.raises(ValueError, match="word_len 17"):
        tiny.backbone.encode_text(torch.ones(1, 18, dtype=torch.int64))


# --- parameter layout --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["rn50", "rn101"])
def test_state_dict_matches_cris_fixture(preset, cris_fixture):
    with torch.device("meta"):
        model = build_model(preset)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == cris_fixture[preset]
    counts = dict(re.findall(r"(rn\d+) ([\d,]+)", cris_fixture["about"]))
    assert count_parameters(model) == int(counts[preset].replace(",", ""))


def test_tiny_is_small(tiny):
    assert count_parameters(tiny) <= 5_000_000
    assert tiny.arch.embed_dim == tiny.proj.txt.in_features  # sentence width feeds the projector


def test_arch_round_trip_and_validation():
    arch = preset_arch("rn101", word_len=20)
    assert arch.word_len == 20
    restored = CRISArch.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert restored == arch
    with pytest.raises(ValueError, match="unknown CRIS architecture keys: colour"):
        CRISArch.from_dict({**arch.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="text_width 512 must equal fpn_out"):
        CRISArch.from_dict({**arch.to_dict(), "fpn_out": [256, 256, 1024]})
    with pytest.raises(ValueError, match="decoder_heads=0 is not a valid int"):
        CRISArch.from_dict({**arch.to_dict(), "decoder_heads": 0})
    with pytest.raises(ValueError, match=r"fpn_out=\('256', 512, 1024\) is not a valid"):
        CRISArch.from_dict({**arch.to_dict(), "fpn_out": ["256", 512, 1024]})
    with pytest.raises(ValueError, match="fpn_out needs 3 widths"):
        CRISArch.from_dict({**arch.to_dict(), "fpn_out": [256, 512]})
    with pytest.raises(ValueError, match="unknown model preset 'rn18'"):
        preset_arch("rn18")


# --- text encoder ------------------------------------------------------------------------------


def test_sentence_feature_is_taken_at_eot_in_padded_batches(tiny):
    short, long = [1823, 8687], [2533, 4919, 593, 7072, 11731, 525]
    with torch.no_grad():
        batch = tiny.backbone.encode_text(tokens_of(short, long))
        for i, ids in enumerate([short, long]):
            alone = torch.tensor([[SOT, *ids, EOT]])  # unpadded, its own length
            single = tiny.backbone.encode_text(alone)
            torch.testing.assert_close(batch.sentence[i], single.sentence[0])
            torch.testing.assert_close(batch.words[i, : len(ids) + 2], single.words[0])


def test_sentence_feature_ignores_tokens_after_eot(tiny):
    tokens = tokens_of([1823, 8687])
    garbage = tokens.clone()
    garbage[0, 5:] = torch.arange(100, 112)  # smaller than EOT, after it: causally invisible
    with torch.no_grad():
        a = tiny.backbone.encode_text(tokens).sentence
        b = tiny.backbone.encode_text(garbage).sentence
    torch.testing.assert_close(a, b)


def test_runs_under_autocast(tiny):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(torch.randn(2, 3, 64, 64), tokens_of([1823], [2533, 4919]))
    assert out.logits.shape == (2, 1, 16, 16) and torch.isfinite(out.logits.float()).all()


def test_logits_change_when_tokens_change(tiny):
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a = tiny(image, tokens_of([1823, 8687])).logits
        b = tiny(image, tokens_of([2533, 4919, 593])).logits
    assert (a - b).abs().max() > 1e-4


# --- decoder and projector ---------------------------------------------------------------------


def cris_pos2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Dense reference of CRIS's 2D sine positions, channel by channel: [height*width, dim]."""
    half = dim // 2
    pe = torch.zeros(height, width, dim)
    for c in range(dim):
        pair = (c % half) // 2
        freq = math.exp(-2 * pair * math.log(10000.0) / half)
        for y in range(height):
            for x in range(width):
                pos = x if c < half else y
                pe[y, x, c] = math.sin(pos * freq) if c % 2 == 0 else math.cos(pos * freq)
    return pe.reshape(height * width, dim)


def test_sine_positions_2d_follow_cris():
    torch.testing.assert_close(sine_positions_2d(3, 5, 16), cris_pos2d(16, 3, 5))


def test_decoder_ignores_padded_words():
    torch.manual_seed(0)
    decoder = TransformerDecoder(num_layers=2, d_model=16, nhead=2, dim_ffn=32, dropout=0.1).eval()
    vis, words = torch.randn(2, 16, 3, 4), torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, True, True, True], [False] * 4 + [True]])
    changed = words.clone()
    changed[pad] = torch.randn(int(pad.sum()), 16)
    with torch.no_grad():
        out = decoder(vis, words, pad)
        torch.testing.assert_close(out, decoder(vis, changed, pad))
    assert out.shape == vis.shape


def test_projector_applies_each_samples_own_kernel():
    torch.manual_seed(0)
    proj = Projector(word_dim=8, in_dim=4).eval()
    vis, sentence = torch.randn(3, 8, 5, 6), torch.randn(3, 8)
    with torch.no_grad():
        logits = proj(vis, sentence)
        maps = proj.vis(vis)
        params = proj.txt(sentence)
    assert logits.shape == (3, 1, 20, 24)
    for i in range(3):
        kernel = params[i, :-1].reshape(1, 4, 3, 3)
        expected = F.conv2d(maps[i : i + 1], kernel, bias=params[i, -1:], padding=1)
        torch.testing.assert_close(logits[i : i + 1], expected)


# --- GradCAM hook ------------------------------------------------------------------------------


def test_global_image_embedding_is_differentiable_in_layer4(tiny):
    tiny.train()  # GradCAM runs inside the training step
    try:
        out = tiny(torch.randn(2, 3, 128, 128), tokens_of([1823], [2533, 4919]))
        layer4 = out.layer4.detach().requires_grad_(True)
        embedding = tiny.global_image_embedding(layer4)
        assert embedding.shape == out.sentence.shape
        torch.testing.assert_close(embedding, tiny.global_image_embedding(layer4))  # no dropout
        score = F.cosine_similarity(embedding, out.sentence.detach(), dim=-1).sum()
        (grad,) = torch.autograd.grad(score, layer4)
    finally:
        tiny.eval()
    assert grad.shape == layer4.shape and grad.abs().sum() > 0
    # per-sample: sample 0's embedding depends on sample 0's map only
    torch.testing.assert_close(
        tiny.global_image_embedding(layer4[:1]), embedding[:1], rtol=1e-5, atol=1e-6
    )


# --- optimiser groups and freezing -------------------------------------------------------------


def test_param_groups_split_backbone_and_head():
    model = build_from_arch(preset_arch("tiny"))
    groups = param_groups(model, lr=1e-4, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-5) and groups[1]["lr"] == 1e-4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    torch.optim.Adam(groups)  # accepted as is
    assert [g["name"] for g in param_groups(model, lr=1e-4, backbone_lr_mult=0)] == ["head"]


def test_frozen_backbone_gets_no_gradients_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = build_model("tiny", freeze_backbone=True).train()
    assert not model.backbone.training and model.neck.training
    before = model.backbone.visual.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64), tokens_of([1823], [2533])).logits.sum().backward()
    torch.testing.assert_close(model.backbone.visual.bn1.running_mean, before)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.proj.txt.weight.grad is not None
    assert [g["name"] for g in param_groups(model, lr=1e-4, backbone_lr_mult=0.1)] == ["head"]


def test_every_trainable_parameter_gets_a_gradient():
    """DistributedDataParallel needs every trainable parameter in the graph of the logits."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    model(torch.randn(2, 3, 64, 64), tokens_of([1823], [2533])).logits.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert not model.backbone.logit_scale.requires_grad  # CLIP's temperature, unused by CRIS
