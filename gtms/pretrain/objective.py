"""CLIP's contrastive objective: symmetric InfoNCE with a trainable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

from gtms.model.backbone import CLIPBackbone

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature at 1/100


class SynthCLIP(nn.Module):
    """The image and text towers of a CLIP backbone, as CLIP trains them.

    ``forward(images [B, 3, S, S], tokens [B, L])`` -> unit image and text embeddings
    ``[B, D]`` each and the logit scale (a scalar tensor, ``exp`` of the stored log value).
    The image embedding is the attention pool's *global* embedding, the very function GradCAM
    differentiates in GTMS. CRIS's ``attnpool.connect`` branch is not used here and is frozen
    (DistributedDataParallel refuses parameters that get no gradient).
    """

    def __init__(self, backbone: CLIPBackbone):
        super().__init__()
        self.backbone = backbone
        backbone.logit_scale.requires_grad_(True)
        for p in backbone.visual.attnpool.connect.parameters():
            p.requires_grad_(False)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.global_image_embedding(self.layer4(images))

    def layer4(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> layer-4 features [B, 32*width, S/32, S/32]."""
        visual = self.backbone.visual
        x = visual.layer1(visual.stem(images))
        return visual.layer4(visual.layer3(visual.layer2(x)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                more_images: torch.Tensor | None = None, more_tokens: torch.Tensor | None = None):
        """Pairs ``(images, tokens)`` and optionally a second set of another image size (object
        crops), in one call so DistributedDataParallel sees one forward per backward.
        Returns image ``[B, D]``, text ``[B, D]`` (unit rows, the two sets concatenated) and
        the logit scale."""
        image, texts = [], []
        for x, t in ((images, tokens), (more_images, more_tokens)):
            if x is not None and len(x):
                image.append(self.image_embedding(x))
                texts.append(t)
        image = nnf.normalize(torch.cat(image), dim=-1)
        text = nnf.normalize(self.backbone.encode_text(torch.cat(texts)).sentence, dim=-1)
        return image, text, self.backbone.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     group: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE over a batch of unit embeddings ``[B, D]``.

    Pair ``i`` is the positive of pair ``j`` when ``group[i] == group[j]`` (same caption); with
    several positives the target is uniform over them. Without ``group`` only the diagonal is
    positive (CLIP's loss). Returns ``{"loss", "image_to_text", "text_to_image"}``.
    """
    logits = logit_scale * image @ text.t()  # [B, B]; row i: image i against every text
    if group is None:
        target = torch.eye(len(image), device=image.device, dtype=logits.dtype)
    else:
        target = (group[:, None] == group[None, :]).to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(target.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return {"loss": (image_to_text + text_to_image) / 2, "image_to_text": image_to_text,
            "text_to_image": text_to_image}
