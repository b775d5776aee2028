"""CRIS (Wang et al., CVPR 2022): the segmentation model GTMS trains with box supervision.

image + tokens -> CLIP backbone -> neck (FPN fused with the sentence) -> vision-language decoder
-> text-conditioned projector -> mask logits at stride 4. ``forward`` only predicts; pseudo labels
and losses live in ``gtms.pseudo`` and the training code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from gtms.model.backbone import CLIPBackbone
from gtms.model.clip_text import padding_mask
from gtms.model.decoder import TransformerDecoder
from gtms.model.neck import FPN
from gtms.model.projector import Projector

INPUT_MULTIPLE = 32  # the backbone's coarsest stride


class CRISOutput(NamedTuple):
    logits: torch.Tensor  # [B, 1, H/4, W/4]  mask logits at stride 4 (sigmoid -> probs)
    layer4: torch.Tensor  # [B, C5, H/32, W/32]  backbone layer-4 map, before attention pooling
    sentence: torch.Tensor  # [B, D]  sentence feature after text_projection


class CRIS(nn.Module):
    """Referring image segmentation: ``model(image, tokens) -> CRISOutput``.

    ``image`` [B, 3, H, W] float, CLIP-normalised, H and W multiples of 32; ``tokens`` [B, L]
    int64 CLIP ids, zero padded. In training mode the neck's BatchNorm1d needs B >= 2.
    """

    def __init__(
        self,
        *,
        backbone: CLIPBackbone,
        neck: FPN,
        decoder: TransformerDecoder,
        proj: Projector,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decoder = decoder
        self.proj = proj
        self.backbone_frozen = False

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> CRISOutput:
        _check_image_size(image)
        visual = self.backbone.encode_image(image)
        text = self.backbone.encode_text(tokens)
        fused = self.neck(
            visual.at_stride8, visual.at_stride16, visual.at_stride32, text.sentence
        )  # [B, D, H/16, W/16]
        decoded = self.decoder(fused, text.words, padding_mask(tokens))  # [B, D, H/16, W/16]
        logits = self.proj(decoded, text.sentence)  # [B, 1, H/4, W/4]
        return CRISOutput(logits=logits, layer4=visual.layer4, sentence=text.sentence)

    def global_image_embedding(self, layer4: torch.Tensor) -> torch.Tensor:
        """CLIP's global image embedding from ``CRISOutput.layer4``: [B, C5, h, w] -> [B, D].

        Differentiable in ``layer4`` and same width as ``CRISOutput.sentence`` (for GradCAM).
        """
        return self.backbone.global_image_embedding(layer4)

    def freeze_backbone(self) -> None:
        """Stop training the CLIP backbone: no gradients to its parameters, and its batch norms
        keep their running statistics (the backbone stays in eval mode under ``train()``).
        Gradients still flow through it to its inputs (GradCAM)."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> CRIS:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def _check_image_size(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W], got {list(image.shape)}")
    h, w = image.shape[-2:]
    if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
        raise ValueError(
            f"image height and width must be multiples of {INPUT_MULTIPLE}, got {h}x{w}"
        )
