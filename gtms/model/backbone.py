"""The CLIP backbone of CRIS: image encoder and text encoder (Fig. 3, the I and T encoders).

OpenAI's checkpoint layout puts the text tower's parameters at the top level beside ``visual``;
``CLIPBackbone`` therefore *is* the text tower (``CLIPText``) and owns the image tower as
``visual``, so its state-dict names are OpenAI's (CRIS adds the ``backbone.`` prefix).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gtms.data.transforms import model_input
from gtms.model.clip_resnet import ModifiedResNet, VisualFeatures
from gtms.model.clip_text import CLIPText


class CLIPBackbone(CLIPText):
    """CLIP ResNet + text transformer.

    ``encode_image``: image [B, 3, H, W] -> ``VisualFeatures`` (stride 8/16/32 maps and layer4).
    ``encode_text``: tokens [B, L] -> ``TextFeatures`` (words [B, L, text_width], sentence
    [B, embed_dim]).
    """

    def __init__(
        self,
        *,
        vision_layers: tuple[int, int, int, int],
        vision_width: int,
        vision_heads: int,
        grid_size: int,
        embed_dim: int,
        vocab_size: int,
        context_length: int,
        word_len: int,
        text_width: int,
        text_layers: int,
        text_heads: int,
    ):
        super().__init__(
            vocab_size=vocab_size,
            context_length=context_length,
            word_len=word_len,
            width=text_width,
            layers=text_layers,
            heads=text_heads,
            embed_dim=embed_dim,
        )
        self.visual = ModifiedResNet(
            layers=vision_layers,
            width=vision_width,
            heads=vision_heads,
            grid_size=grid_size,
            output_dim=embed_dim,
        )
        # CLIP's contrastive temperature: unused by CRIS, kept so checkpoints load unchanged, and
        # not trainable (an unused trainable parameter breaks DistributedDataParallel).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=False)

    def encode_image(self, image: torch.Tensor) -> VisualFeatures:
        return self.visual(model_input(image))

    def global_image_embedding(self, layer4: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding from layer-4 features: [B, 32*width, h, w] -> [B, embed_dim]."""
        return self.visual.attnpool.global_embedding(layer4)
