"""GTMS pseudo-label engine, one module per box of the paper's Fig. 3.

* :mod:`~gtms.pseudo.tree`: minimum spanning tree of the pixel grid (Eq. 1-3).
* :mod:`~gtms.pseudo.tree_filter`: exact O(N) tree filter (Eq. 4).
* :mod:`~gtms.pseudo.forest`: structural forest (Alg. 1, lines 1-6).
* :mod:`~gtms.pseudo.gradcam`: GradCAM attention A (Sec. 3.2).
* :mod:`~gtms.pseudo.pseudo_label`: vertex weights W and pseudo label P-hat (Alg. 1, Eq. 4).
* :mod:`~gtms.pseudo.losses`: L_loc, L_pix and the ablation rows of Table 2 (Eq. 5-8).
* :mod:`~gtms.pseudo.schedules`: the warm-up of gamma.

The tree and the forest depend only on the image and the box (data pipeline, CPU, one image at a
time); GradCAM, W and the filter run in the training step.
"""

from gtms.modes import ABLATION_MODES, PSEUDO_LABEL_MODES
from gtms.pseudo.forest import structural_forest
from gtms.pseudo.gradcam import gradcam_attention
from gtms.pseudo.losses import (
    bce_loss,
    dice_loss,
    gtms_loss,
    location_loss,
    pixel_loss,
)
from gtms.pseudo.pseudo_label import (
    PseudoLabels,
    make_pseudo_labels,
    pseudo_label,
    vertex_weights,
)
from gtms.pseudo.schedules import GAMMA_SHAPES, gamma_at
from gtms.pseudo.tree import GridTree, build_grid_tree, stack_grid_trees
from gtms.pseudo.tree_filter import tree_filter, tree_filter_torch

__all__ = [
    "ABLATION_MODES",
    "GAMMA_SHAPES",
    "PSEUDO_LABEL_MODES",
    "GridTree",
    "PseudoLabels",
    "bce_loss",
    "build_grid_tree",
    "dice_loss",
    "gamma_at",
    "gradcam_attention",
    "gtms_loss",
    "location_loss",
    "make_pseudo_labels",
    "pixel_loss",
    "pseudo_label",
    "stack_grid_trees",
    "structural_forest",
    "tree_filter",
    "tree_filter_torch",
    "vertex_weights",
]
