"""The training modes (the rows of the paper's Table 2): one registry that every part consults.

A mode says which loss trains the model and what that loss needs from the data pipeline and
from the training step. Config validation, the pipeline's sample spec, the training step and
the loop all read it from here, so adding a row (or a pseudo-label variant) is one entry below
plus, where it trains with a new loss, that loss in :func:`gtms.pseudo.losses.gtms_loss`. The
ablation tables and plot (:mod:`gtms.tune.table`, :mod:`gtms.tune.plot`) take the rows' order,
the paper's claimed order and the pseudo-label rows from here too.

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
    """

    name: str
    loss: str
    mask: bool = False
    tree: bool = False
    forest: bool = False
    gradcam: bool = False

    @property
    def pseudo_label(self) -> bool:
        """Trains against pseudo labels P-hat (the tree filter, Eq. 4) with ``L_pix``."""
        return self.loss == "loc+pix"


# In the order of the paper's Table 2, whose rows read: fully supervised (mask), box as mask,
# L_loc, L_loc + L_pix (tree), L_loc + L_pix (forest + GradCAM).
_MODES = (
    Mode("mask-bce", loss="bce-mask", mask=True),
    Mode("box-bce", loss="bce-box"),
    Mode("box-lloc", loss="loc"),
    Mode("tree", loss="loc+pix", tree=True),
    Mode("forest-gradcam", loss="loc+pix", tree=True, forest=True, gradcam=True),
)
MODES: dict[str, Mode] = {m.name: m for m in _MODES}
ABLATION_MODES: tuple[str, ...] = tuple(MODES)
PSEUDO_LABEL_MODES: tuple[str, ...] = tuple(m.name for m in _MODES if m.pseudo_label)
# The full method (GTMS) and its fully supervised bound.
FULL_METHOD = "forest-gradcam"
SUPERVISED_BOUND = "mask-bce"
# The paper's claim (Table 2) as an order of rows, weakest first: the rows trained without the
# mask in the table's order, each below the next, then the fully supervised bound (which the
# full method may match).
CLAIMED_ORDER: tuple[str, ...] = (*(m.name for m in _MODES if not m.mask),
                                  *(m.name for m in _MODES if m.mask))
# The mode whose pseudo labels validation measures for rows that train without any.
QUALITY_MODE = FULL_METHOD


def get_mode(name: str) -> Mode:
    """The registered mode ``name``; a ValueError names the allowed ones."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss mode {name!r}; expected one of "
                         f"{', '.join(ABLATION_MODES)}") from None
