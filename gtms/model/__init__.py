"""CRIS on a CLIP ResNet: one module per box of the GTMS paper's Fig. 3.

- ``clip_resnet``: image encoder (ModifiedResNet + attention pool); ``clip_text``: text encoder;
  ``backbone``: both, in OpenAI's parameter layout;
- ``neck``: FPN fused with the sentence; ``decoder``: vision-language transformer decoder;
  ``projector``: text-conditioned dynamic conv -> mask logits at stride 4;
- ``cris``: the composition; ``build``: presets and the builder; ``weights``: checkpoint loading.
"""

from gtms.model.build import (
    PRESETS,
    CRISArch,
    build_from_arch,
    build_model,
    count_parameters,
    param_groups,
    preset_arch,
)
from gtms.model.cris import CRIS, CRISOutput
from gtms.model.weights import (
    CheckpointError,
    LoadReport,
    load_clip_weights,
    load_cris_checkpoint,
)

__all__ = [
    "CRIS",
    "PRESETS",
    "CRISArch",
    "CRISOutput",
    "CheckpointError",
    "LoadReport",
    "build_from_arch",
    "build_model",
    "count_parameters",
    "load_clip_weights",
    "load_cris_checkpoint",
    "param_groups",
    "preset_arch",
]
