"""The training modes (the rows of the paper's Table 2): one registry that every part consults.

A mode says which loss trains the model and what that loss needs from the data pipeline and
from the training step. Config validation, the pipeline's sample spec, the training step and
the loop all read it from here, so adding a row (or a pseudo-label variant) is one entry below
plus, where it trains with a new loss, that loss in :func:`gtms.pseudo.losses.gtms_loss`.

No torch import: the config and the data pipeline use this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """One training mode.

    Attributes:
        name: the ``loss.mode`` value.
        loss: ``"bce-mask"`` (BCE against the GT mask), ``"bce-box"`` (BCE against the box),
            ``"loc"`` (``L_loc``, Eq. 5-6) or ``"loc+pix"`` (``L_loc + gamma L_pix``, Eq. 8).
        mask: training batches carry the ground-truth mask at the output stride.
        tree: training batches carry the whole-image MST (parent, order, dist).
        forest: training batches carry the structural-forest labels.
        gradcam: the step computes the GradCAM attention (layer-4 features, sentence features,
            the attention pool) to weigh the vertices; without it W is the box.
        table2: the row's name in the paper's Table 2.
    """

    name: str
    loss: str
    mask: bool = False
    tree: bool = False
    forest: bool = False
    gradcam: bool = False
    table2: str = ""

    @property
    def pseudo_label(self) -> bool:
        """Trains against pseudo labels P-hat (the tree filter, Eq. 4) with ``L_pix``."""
        return self.loss == "loc+pix"


_MODES = (
    Mode("mask-bce", loss="bce-mask", mask=True, table2="fully supervised (mask)"),
    Mode("box-bce", loss="bce-box", table2="box as mask"),
    Mode("box-lloc", loss="loc", table2="L_loc"),
    Mode("tree", loss="loc+pix", tree=True, table2="L_loc + L_pix (tree)"),
    Mode("forest-gradcam", loss="loc+pix", tree=True, forest=True, gradcam=True,
         table2="L_loc + L_pix (forest + GradCAM)"),
)
MODES: dict[str, Mode] = {m.name: m for m in _MODES}
ABLATION_MODES: tuple[str, ...] = tuple(MODES)
PSEUDO_LABEL_MODES: tuple[str, ...] = tuple(m.name for m in _MODES if m.pseudo_label)
# The mode whose pseudo labels validation measures for rows that train without any.
QUALITY_MODE = "forest-gradcam"


def get_mode(name: str) -> Mode:
    """The registered mode ``name``; a ValueError names the allowed ones."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss mode {name!r}; expected one of "
                         f"{', '.join(ABLATION_MODES)}") from None
