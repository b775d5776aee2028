"""Where GradCAM's attention A comes from: the towers being trained, or a frozen copy of them.

The paper computes A from the model's own encoders as they train (``trained``). Fine-tuning moves
those encoders away from the image-text alignment GradCAM reads, and on SynthRef it erodes it
within a few epochs: A falls back to the box for up to 40 % of samples, or peaks off the object
(measured, see the README's "Table 2 on the laptop"). ``frozen`` computes A from a copy of the
towers the run started from, which never changes, so A depends only on the image and the
sentence and is computed once per sentence: the raw map at layer 4's resolution (``[h, w]``
float32; 676 bytes at 416 px) is cached by (ref id, sentence index) and reused every epoch.

Both give the raw GradCAM map ``[B, h, w]`` (:func:`gtms.pseudo.gradcam.gradcam_cam`), which
:func:`gtms.pseudo.gradcam.attention_from_cam` turns into A on the box's grid.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from gtms.pseudo.gradcam import gradcam_cam

ATTENTION_SOURCES = ("trained", "frozen")


class AttentionSource(Protocol):
    def cams(self, out: Any, batch: dict[str, Any], model: nn.Module) -> torch.Tensor:
        """Raw GradCAM ``[B, h, w]`` for a batch: ``out`` is the model's output on it (``layer4``,
        ``sentence``), ``batch`` holds ``image``, ``tokens``, ``ref_id``, ``sent_index``, and
        ``model`` is the unwrapped model being trained."""
        ...


class TrainedAttention:
    """A from the model's own layer 4 and sentence feature, through its own attention pool."""

    def cams(self, out: Any, batch: dict[str, Any], model: nn.Module) -> torch.Tensor:
        return gradcam_cam(out.layer4, out.sentence, model.global_image_embedding)


class FrozenAttention:
    """A from ``backbone`` (a copy of the starting CLIP towers: ``encode_image``,
    ``encode_text``, ``global_image_embedding``), frozen in eval mode, cached per sentence.

    The cache key is (ref id, sentence index): a sample's letterboxed image and tokens are the
    same every epoch (no augmentation), so its A is too. Use one instance per split.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone.eval().requires_grad_(False)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self.computed = 0   # sentences whose map was computed (the rest came from the cache)

    def __len__(self) -> int:
        return len(self._cache)

    def cams(self, out: Any, batch: dict[str, Any], model: nn.Module) -> torch.Tensor:
        ref_ids = torch.as_tensor(batch["ref_id"]).reshape(-1).tolist()
        sentences = torch.as_tensor(batch["sent_index"]).reshape(-1).tolist()
        keys = list(zip(ref_ids, sentences))
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            device = next(self.backbone.parameters()).device
            index = torch.as_tensor(missing, device=batch["image"].device)
            with torch.no_grad():
                visual = self.backbone.encode_image(batch["image"].index_select(0, index)
                                                    .to(device).float())
                text = self.backbone.encode_text(batch["tokens"].index_select(0, index)
                                                 .to(device))
            cam = gradcam_cam(visual.layer4, text.sentence, self.backbone.global_image_embedding)
            for j, i in enumerate(missing):
                self._cache[keys[i]] = cam[j].cpu()
            self.computed += len(missing)
        return torch.stack([self._cache[key] for key in keys]).to(batch["image"].device)
