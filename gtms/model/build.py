"""The one place that maps plain arguments (a preset name, weight paths) to a CRIS model.

``CRISArch`` holds every architecture hyperparameter; presets ``tiny``, ``rn50``, ``rn101`` give
one each. With CLIP weights, the backbone's shapes are read from the checkpoint (as OpenAI's
``build_model`` does: stages counted from key names, widths from tensor shapes) and replace the
preset's. ``model.arch`` records the result so a training checkpoint can rebuild the model with
``build_from_arch(CRISArch.from_dict(...))``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gtms.model.backbone import CLIPBackbone
from gtms.model.cris import CRIS
from gtms.model.decoder import TransformerDecoder
from gtms.model.neck import FPN
from gtms.model.projector import Projector
from gtms.model.weights import (
    UnsupportedCheckpointError,
    load_clip_state_dict,
    load_cris_checkpoint,
    read_clip_state_dict,
)

CLIP_STRIDE = 32
CLIP_HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64


@dataclass(frozen=True)
class CRISArch:
    """Architecture hyperparameters of CRIS (CLIP backbone + neck + decoder + projector)."""

    # CLIP image tower (ModifiedResNet)
    vision_layers: tuple[int, int, int, int]  # Bottlenecks per stage
    vision_width: int  # layer1 width; layer4 has 32x this many channels
    vision_heads: int  # attention-pool heads
    image_resolution: int  # CLIP's pretraining size; attention-pool grid = this / 32
    embed_dim: int  # CLIP joint embedding = sentence feature = stride-32 feature width
    # CLIP text tower
    vocab_size: int
    context_length: int  # rows of the positional embedding (77 for OpenAI CLIP)
    word_len: int  # tokens per sentence the model accepts (<= context_length)
    text_width: int  # word feature width; must equal fpn_out[1] (the decoder width)
    text_layers: int
    text_heads: int
    # CRIS head
    fpn_out: tuple[int, int, int]  # neck widths at stride 8/16/32; fpn_out[1] = decoder width
    decoder_layers: int
    decoder_heads: int
    decoder_ffn: int
    dropout: float
    projector_kernel: int = 3

    def __post_init__(self):
        for name in ("vision_layers", "fpn_out"):  # lists (JSON, YAML) become tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = _type_problems(self) or _value_problems(self)
        if problems:
            raise ValueError(f"invalid CRIS architecture: {'; '.join(problems)}")

    @property
    def fpn_in(self) -> tuple[int, int, int]:
        """Backbone widths at stride 8 (layer2), 16 (layer3), 32 (attention pool)."""
        return (self.vision_width * 8, self.vision_width * 16, self.embed_dim)

    @property
    def decoder_dim(self) -> int:
        return self.fpn_out[1]

    def to_dict(self) -> dict:
        """Plain types only (lists, ints, floats), for checkpoints and JSON."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> CRISArch:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CRIS architecture keys: {', '.join(unknown)}")
        return cls(**values)


def _type_problems(arch: CRISArch) -> list[str]:
    """Every count and width a positive int (stage tuples of them), dropout a float in [0, 1)."""
    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    problems = []
    for f in dataclasses.fields(arch):
        value = getattr(arch, f.name)
        if f.name == "dropout":
            ok = isinstance(value, (int, float)) and 0 <= value < 1
        elif f.name in ("vision_layers", "fpn_out"):
            ok = isinstance(value, tuple) and all(positive_int(v) for v in value)
        else:
            ok = positive_int(value)
        if not ok:
            problems.append(f"{f.name}={value!r} is not a valid {f.type}")
    return problems


def _value_problems(arch: CRISArch) -> list[str]:
    checks = [
        (len(arch.vision_layers) == 4, f"vision_layers needs 4 stages, got {arch.vision_layers}"),
        (len(arch.fpn_out) == 3, f"fpn_out needs 3 widths, got {arch.fpn_out}"),
        (arch.image_resolution % CLIP_STRIDE == 0,
         f"image_resolution {arch.image_resolution} is not a multiple of {CLIP_STRIDE}"),
        ((arch.vision_width * 32) % arch.vision_heads == 0,
         f"layer4 width {arch.vision_width * 32} is not divisible by vision_heads "
         f"{arch.vision_heads}"),
        (arch.text_width % arch.text_heads == 0,
         f"text_width {arch.text_width} is not divisible by text_heads {arch.text_heads}"),
        (arch.word_len <= arch.context_length,
         f"word_len {arch.word_len} exceeds context_length {arch.context_length}"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        return problems
    decoder_checks = [
        (arch.text_width == arch.fpn_out[1],
         f"text_width {arch.text_width} must equal fpn_out[1] {arch.fpn_out[1]} (the decoder "
         "attends from visual tokens to word features of the same width)"),
        (arch.fpn_out[1] % 4 == 0 and arch.fpn_out[1] % arch.decoder_heads == 0,
         f"decoder width fpn_out[1]={arch.fpn_out[1]} must be divisible by 4 and by "
         f"decoder_heads {arch.decoder_heads}"),
    ]
    return [message for ok, message in decoder_checks if not ok]


_RESNET_CLIP = dict(
    vision_width=64, vision_heads=32, image_resolution=224, vocab_size=49408, context_length=77,
    word_len=17, text_width=512, text_layers=12, text_heads=8, fpn_out=(256, 512, 1024),
    decoder_layers=3, decoder_heads=8, decoder_ffn=2048, dropout=0.1,
)  # fmt: skip

PRESETS: dict[str, CRISArch] = {
    "rn50": CRISArch(vision_layers=(3, 4, 6, 3), embed_dim=1024, **_RESNET_CLIP),
    "rn101": CRISArch(vision_layers=(3, 4, 23, 3), embed_dim=512, **_RESNET_CLIP),
    # CPU tests and the SynthRef default; random init. Heads follow CLIP's width // 64 rule so a
    # CLIP-layout checkpoint of these shapes rebuilds the same model.
    "tiny": CRISArch(
        vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=8, image_resolution=128,
        embed_dim=64, vocab_size=49408, context_length=77, word_len=17, text_width=48,
        text_layers=2, text_heads=1, fpn_out=(32, 48, 64), decoder_layers=1, decoder_heads=4,
        decoder_ffn=192, dropout=0.1,
    ),  # fmt: skip
}


def preset_arch(preset: str, *, word_len: int = 17) -> CRISArch:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], word_len=word_len)


def clip_backbone_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``CRISArch`` backbone fields read from an OpenAI CLIP ResNet state dict."""
    stages = [_count_indices(state_dict, rf"visual\.layer{s}\.(\d+)\.") for s in (1, 2, 3, 4)]
    vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
    grid_tokens = state_dict["visual.attnpool.positional_embedding"].shape[0]
    grid = round((grid_tokens - 1) ** 0.5)
    if grid**2 + 1 != grid_tokens:
        raise UnsupportedCheckpointError(
            f"visual.attnpool.positional_embedding has {grid_tokens} rows: not 1 + a square grid"
        )
    text_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        vision_layers=tuple(stages),
        vision_width=vision_width,
        vision_heads=max(1, vision_width * 32 // CLIP_HEAD_WIDTH),
        image_resolution=grid * CLIP_STRIDE,
        embed_dim=state_dict["text_projection"].shape[1],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        context_length=state_dict["positional_embedding"].shape[0],
        text_width=text_width,
        text_layers=_count_indices(state_dict, r"transformer\.resblocks\.(\d+)\."),
        text_heads=max(1, text_width // CLIP_HEAD_WIDTH),
    )


def _count_indices(state_dict: Mapping, pattern: str) -> int:
    return len({m.group(1) for k in state_dict if (m := re.match(pattern, k))})


def build_from_arch(arch: CRISArch) -> CRIS:
    """A randomly initialised CRIS of the given architecture; ``model.arch`` records it."""
    backbone = CLIPBackbone(
        vision_layers=arch.vision_layers,
        vision_width=arch.vision_width,
        vision_heads=arch.vision_heads,
        grid_size=arch.image_resolution // CLIP_STRIDE,
        embed_dim=arch.embed_dim,
        vocab_size=arch.vocab_size,
        context_length=arch.context_length,
        word_len=arch.word_len,
        text_width=arch.text_width,
        text_layers=arch.text_layers,
        text_heads=arch.text_heads,
    )
    decoder = TransformerDecoder(
        num_layers=arch.decoder_layers,
        d_model=arch.decoder_dim,
        nhead=arch.decoder_heads,
        dim_ffn=arch.decoder_ffn,
        dropout=arch.dropout,
    )
    model = CRIS(
        backbone=backbone,
        neck=FPN(in_dims=arch.fpn_in, out_dims=arch.fpn_out),
        decoder=decoder,
        proj=Projector(
            word_dim=arch.embed_dim, in_dim=arch.decoder_dim // 2, kernel_size=arch.projector_kernel
        ),
    )
    model.arch = arch  # a record for checkpoints; the modules never read it
    return model


def build_model(
    preset: str,
    *,
    word_len: int = 17,
    clip_weights: str | Path | None = None,
    init_checkpoint: str | Path | None = None,
    freeze_backbone: bool = False,
) -> CRIS:
    """CRIS from a preset, optionally initialised from CLIP and/or a CRIS-layout checkpoint.

    ``clip_weights``: OpenAI CLIP ResNet checkpoint; its shapes replace the preset's backbone.
    ``init_checkpoint``: CRIS-layout checkpoint, loaded strictly after the CLIP weights.
    """
    arch = preset_arch(preset, word_len=word_len)
    clip_state = None
    if clip_weights is not None:
        clip_state = read_clip_state_dict(clip_weights)
        try:
            arch = dataclasses.replace(arch, **clip_backbone_shapes(clip_state))
        except ValueError as err:
            raise ValueError(
                f"preset {preset!r} does not fit CLIP weights {clip_weights}: {err}"
            ) from err
    model = build_from_arch(arch)
    if clip_state is not None:
        load_clip_state_dict(model, clip_state, source=str(clip_weights))
    if init_checkpoint is not None:
        load_cris_checkpoint(model, init_checkpoint)
    if freeze_backbone:
        model.freeze_backbone()
    return model


def param_groups(model: CRIS, *, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Optimiser parameter groups: ``backbone`` at ``lr * backbone_lr_mult``, ``head`` (neck,
    decoder, projector) at ``lr``. Frozen parameters are left out, and so is the backbone group
    when its multiplier is 0. Each group carries a ``name``."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    groups = [dict(name="head", params=head, lr=lr)]
    if backbone_lr_mult > 0:
        groups.insert(0, dict(name="backbone", params=backbone, lr=lr * backbone_lr_mult))
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def starting_backbone(preset: str, *, word_len: int, clip_weights: str | Path | None,
                      init_checkpoint: str | Path | None, seed: int) -> torch.nn.Module:
    """The CLIP towers a run starts from, built again: the same builder call as the run's model,
    under ``seed`` (so a randomly initialised preset gets the same weights as rank 0 of the run)
    without touching the caller's random state. Eval mode, no gradients."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(preset, word_len=word_len, clip_weights=clip_weights,
                            init_checkpoint=init_checkpoint)
    return model.backbone.eval().requires_grad_(False)
