"""Checkpoint loading: OpenAI CLIP (TorchScript archive and plain state dict), CRIS layout (with and
without ``module.``), and every refusal case.

The OpenAI layout is reproduced by ``ReferenceCLIP``, a small CLIP ResNet written here after
OpenAI's model (same parameter names, the original attention-pool formulation with the mean token
as one of the queries), with tiny widths so the test runs in seconds.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gtms.model import build_model
from gtms.model.weights import (
    CheckpointKeyError,
    CheckpointNotFoundError,
    CheckpointShapeError,
    NotACheckpointError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    load_clip_weights,
    load_cris_checkpoint,
)

SOT, EOT = 49406, 49407
CLIP_SHAPES = dict(
    layers=(1, 2, 1, 1), width=16, resolution=96, embed_dim=64, vocab=49408, context=77,
    text_width=48, text_layers=2,
)  # fmt: skip


# --- a reference CLIP in OpenAI's layout -------------------------------------------------------


class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))  # fmt: skip

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class RefAttentionPool(nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) * 0.1)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + self.positional_embedding[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )  # fmt: skip
        return x[0]


class RefResNet(nn.Module):
    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes, stages = width, []
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [RefBottleneck(inplanes, planes, stride)]
            stage += [RefBottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = RefAttentionPool(input_resolution // 32, width * 32, heads, output_dim)

    def trunk(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(torch.relu(self.bn3(self.conv3(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.attnpool(self.trunk(x))


class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, d_model, n_head, attn_mask):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", RefQuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))  # fmt: skip
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class ReferenceCLIP(nn.Module):
    def __init__(self, *, layers, width, resolution, embed_dim, vocab, context, text_width,
                 text_layers):  # fmt: skip
        super().__init__()
        self.visual = RefResNet(layers, embed_dim, width * 32 // 64, resolution, width)
        mask = torch.full((context, context), float("-inf")).triu(1)
        heads = max(1, text_width // 64)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[RefBlock(text_width, heads, mask) for _ in range(text_layers)]
        )
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context, text_width) * 0.1)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(context))
        self.register_buffer("vocab_size", torch.tensor(vocab))

    def words(self, text):
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        return self.ln_final(self.transformer.resblocks(x).permute(1, 0, 2))

    def encode_text(self, text):
        x = self.words(text)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        return self.visual(image), self.encode_text(text)


def randomise_norms(model: nn.Module) -> None:
    """Non-trivial batch/layer norm parameters and statistics, so a mismatch cannot hide."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def clip_tokens(sentences, length):
    rows = [[SOT, *ids, EOT] + [0] * (length - len(ids) - 2) for ids in sentences]
    return torch.tensor(rows)


SENTENCES = [[1823, 8687], [2533, 4919, 593, 7072, 11731]]


@pytest.fixture(scope="module")
def reference_clip():
    torch.manual_seed(0)
    ref = ReferenceCLIP(**CLIP_SHAPES)
    randomise_norms(ref)
    return ref.eval()


@pytest.fixture(scope="module")
def clip_archive(reference_clip, tmp_path_factory):
    """The reference saved the way OpenAI ships CLIP: a TorchScript archive."""
    path = tmp_path_factory.mktemp("clip") / "RN-tiny.pt"
    example = (torch.randn(1, 3, 96, 96), clip_tokens(SENTENCES[:1], CLIP_SHAPES["context"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(reference_clip, example, check_trace=False), str(path))
    return path


@pytest.fixture(scope="module")
def clip_plain(reference_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "RN-tiny-state-dict.pt"
    torch.save(reference_clip.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """A tiny CRIS whose batch-norm statistics moved (one training forward), and its state."""
    torch.manual_seed(1)
    model = build_model("tiny")
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), clip_tokens(SENTENCES, 17))
    return model.eval(), model.state_dict()


# --- OpenAI CLIP -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchscript", "plain"])
def test_clip_checkpoint_gives_the_reference_outputs(kind, reference_clip, request):
    path = request.getfixturevalue("clip_archive" if kind == "torchscript" else "clip_plain")
    model = build_model("tiny", clip_weights=path).eval()
    assert model.arch.vision_layers == (1, 2, 1, 1)  # read from the checkpoint, not the preset
    assert model.arch.image_resolution == 96 and model.arch.embed_dim == 64
    image = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        visual = model.backbone.encode_image(image)
        torch.testing.assert_close(visual.layer4, reference_clip.visual.trunk(image))
        torch.testing.assert_close(
            model.global_image_embedding(visual.layer4), reference_clip.visual(image),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
        ours = model.backbone.encode_text(clip_tokens(SENTENCES, 17))
        theirs = clip_tokens(SENTENCES, CLIP_SHAPES["context"])  # OpenAI pads to 77
        torch.testing.assert_close(ours.sentence, reference_clip.encode_text(theirs))
        torch.testing.assert_close(ours.words, reference_clip.words(theirs)[:, :17])


def test_clip_load_report(clip_archive):
    model = build_model("tiny", clip_weights=clip_archive)  # shapes now fit the archive
    report = load_clip_weights(model, clip_archive)
    assert set(report.missing) == {
        f"backbone.visual.attnpool.connect.{name}"
        for name in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                     "1.num_batches_tracked")
    }  # fmt: skip
    assert report.unexpected == ()
    assert report.dropped == ("input_resolution", "context_length", "vocab_size")
    assert "backbone.visual.layer2.1.conv1.weight" in report.loaded
    assert "attnpool.connect" in str(report)


def test_clip_half_precision_weights_load_as_float(reference_clip, tmp_path):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v
                for k, v in reference_clip.state_dict().items()}, path)  # fmt: skip
    model = build_model("tiny", clip_weights=path)
    assert model.backbone.text_projection.dtype == torch.float32
    torch.testing.assert_close(
        model.backbone.text_projection, reference_clip.text_projection.half().float()
    )


def test_clip_shapes_that_do_not_fit_the_model(clip_archive):
    model = build_model("tiny")  # preset grid 4x4, the archive's is 3x3
    with pytest.raises(CheckpointShapeError) as err:
        load_clip_weights(model, clip_archive)
    key = "backbone.visual.attnpool.positional_embedding"
    assert f"{key}: model [17, 512], checkpoint [10, 512]" in str(err.value)


def test_clip_head_must_fit_the_preset(clip_archive):
    with pytest.raises(ValueError, match="preset 'rn50' does not fit CLIP weights .*text_width 48"):
        build_model("rn50", clip_weights=clip_archive)


# --- CRIS layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["module-prefix", "bare", "training-checkpoint"])
def test_cris_checkpoint_round_trip(layout, tiny_state, tmp_path):
    source, state = tiny_state
    payload = {
        "module-prefix": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "bare": state,
        "training-checkpoint": {"model": state, "optimizer": {"param_groups": [{"lr": 0.1}]}},
    }[layout]
    path = tmp_path / "cris.pth"
    torch.save(payload, path)
    torch.manual_seed(2)
    model = build_model("tiny", init_checkpoint=path).eval()
    image, tokens = torch.randn(2, 3, 128, 128), clip_tokens(SENTENCES, 17)
    with torch.no_grad():
        expected, got = source(image, tokens), model(image, tokens)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_missing_file(tmp_path):
    model = build_model("tiny")
    for load in (load_cris_checkpoint, load_clip_weights):
        with pytest.raises(CheckpointNotFoundError, match="not found: .*nowhere.pt"):
            load(model, tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError):
        build_model("tiny", clip_weights=tmp_path / "nowhere.pt")


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, b"\x80" + bytes(200), b"weights\n" * 50],
    ids=["random-bytes", "pickle-opcode-then-zeros", "text"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the zeros case
def test_files_that_are_not_checkpoints(content, tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    model = build_model("tiny")
    for load in (load_cris_checkpoint, load_clip_weights):
        with pytest.raises(NotACheckpointError, match="not a .*PyTorch checkpoint"):
            load(model, path)


def test_truncated_and_non_dict_checkpoints(tiny_state, tmp_path):
    model = build_model("tiny")
    full = save(tmp_path, "full.pt", tiny_state[1]).read_bytes()
    (tmp_path / "cut.pt").write_bytes(full[: len(full) // 2])
    with pytest.raises(NotACheckpointError):
        load_cris_checkpoint(model, tmp_path / "cut.pt")
    with pytest.raises(NotACheckpointError, match="does not hold a state dict"):
        load_cris_checkpoint(model, save(tmp_path, "list.pt", [1, 2, 3]))


class Payload:
    """Unpickling this would create ``marker``: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_needing_more_than_weights_only_is_refused(tiny_state, tmp_path):
    marker = tmp_path / "executed"
    path = save(tmp_path, "unsafe.pth", {"state_dict": tiny_state[1], "hook": Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match="needs more than weights_only.*open"):
        load_cris_checkpoint(build_model("tiny"), path)
    assert not marker.exists()


def test_wrong_shape_names_key_and_shapes(tiny_state, tmp_path):
    state = dict(tiny_state[1])
    state["neck.txt_proj.0.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointShapeError, match=r"neck\.txt_proj\.0\.weight: model \[64, 64\], "
                                                   r"checkpoint \[64, 32\]"):  # fmt: skip
        load_cris_checkpoint(build_model("tiny"), save(tmp_path, "shape.pth", state))


def test_strict_keys(tiny_state, tmp_path):
    state = dict(tiny_state[1])
    del state["proj.txt.bias"]
    with pytest.raises(CheckpointKeyError, match=r"missing proj\.txt\.bias; unexpected none"):
        load_cris_checkpoint(build_model("tiny"), save(tmp_path, "missing.pth", state))
    state = {**tiny_state[1], "decoder.extra": torch.zeros(1)}
    with pytest.raises(CheckpointKeyError, match=r"missing none; unexpected decoder\.extra"):
        load_cris_checkpoint(build_model("tiny"), save(tmp_path, "extra.pth", state))


def test_vit_clip_is_refused(tmp_path):
    vit = {
        "visual.class_embedding": torch.zeros(768),
        "visual.conv1.weight": torch.zeros(768, 3, 32, 32),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(2304, 768),
        "token_embedding.weight": torch.zeros(10, 512),
    }
    path = save(tmp_path, "ViT-B-32.pt", vit)
    message = "ViT CLIP checkpoints are not supported, use RN50/RN101"
    with pytest.raises(UnsupportedCheckpointError, match=message):
        build_model("rn50", clip_weights=path)
    cris_vit = save(tmp_path, "cris-vit.pth", {f"module.backbone.{k}": v for k, v in vit.items()})
    with pytest.raises(UnsupportedCheckpointError, match=message):
        load_cris_checkpoint(build_model("tiny"), cris_vit)


def test_clip_checkpoint_without_text_tower_is_refused(reference_clip, tmp_path):
    visual_only = {k: v for k, v in reference_clip.state_dict().items() if k.startswith("visual.")}
    with pytest.raises(UnsupportedCheckpointError, match="not an OpenAI CLIP ResNet checkpoint: "
                                                         "it has no text_projection"):  # fmt: skip
        build_model("tiny", clip_weights=save(tmp_path, "visual.pt", visual_only))


def test_checkpoint_kinds_are_not_mixed_up(clip_archive, clip_plain, tiny_state, tmp_path):
    model = build_model("tiny")
    with pytest.raises(UnsupportedCheckpointError, match="TorchScript archive .*clip_weights"):
        load_cris_checkpoint(model, clip_archive)
    with pytest.raises(UnsupportedCheckpointError, match="OpenAI CLIP state dict.*clip_weights"):
        load_cris_checkpoint(model, clip_plain)
    cris = save(tmp_path, "cris.pth", {"state_dict": tiny_state[1]})
    with pytest.raises(UnsupportedCheckpointError, match="looks like a CRIS checkpoint"):
        load_clip_weights(model, cris)
