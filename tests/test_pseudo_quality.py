"""`eval --pseudo-labels`: P-hat from one model's P with four vertex weights, by hand."""

from types import SimpleNamespace

import numpy as np
import torch

from gtms.eval.pseudo_quality import PseudoLabelMeters, format_pseudo_table, weight_variants
from gtms.pseudo import build_grid_tree, make_pseudo_labels, stack_grid_trees, structural_forest

SIZE = 12


def two_region_scene():
    """A 12 x 12 guide image: an object (bright, cols 3-5) and box background (dark, cols
    6-8) inside the box rows 3-8, cols 3-8; the rest mid-grey."""
    image = np.full((SIZE, SIZE, 3), 0.5)
    image[3:9, 3:6] = 1.0
    image[3:9, 6:9] = 0.0
    box = np.zeros((SIZE, SIZE), np.float32)
    box[3:9, 3:9] = 1
    mask = np.zeros_like(box)
    mask[3:9, 3:6] = 1
    return image, box, mask


def test_oracle_weights_are_the_subtrees_touching_the_mask():
    image, box, mask = two_region_scene()
    tree = build_grid_tree(image)
    forest = torch.from_numpy(structural_forest(tree.parent, box.reshape(-1) > 0))[None]
    flat = lambda a: torch.from_numpy(a.reshape(1, -1))  # noqa: E731
    attention = torch.zeros(1, SIZE * SIZE)
    attention[0, 3 * SIZE + 7] = 1.0  # GradCAM pointing at the box background
    w = weight_variants(flat(box), flat(mask), forest, attention)
    # The colour edge splits the box into an object sub-tree and a background sub-tree.
    np.testing.assert_array_equal(w["oracle"].numpy().reshape(SIZE, SIZE), mask)
    np.testing.assert_array_equal(w["gradcam"].numpy().reshape(SIZE, SIZE), box - mask)
    np.testing.assert_array_equal(w["box"].numpy(), flat(box).numpy())
    np.testing.assert_array_equal(w["mask"].numpy(), flat(mask).numpy())


def test_meters_match_make_pseudo_labels_and_rank_the_oracle_first():
    image, box, mask = two_region_scene()
    tree = build_grid_tree(image)
    trees = stack_grid_trees([tree, tree])
    forest = np.stack([structural_forest(tree.parent, box.reshape(-1) > 0)] * 2)
    torch.manual_seed(0)
    projection = torch.randn(4, 3)

    def pool(features):  # a global embedding: mean over the grid, then a projection
        return features.mean(dim=(2, 3)) @ projection

    layer4 = torch.randn(2, 4, 3, 3)
    sentence = torch.randn(2, 3)
    logits = torch.full((2, 1, SIZE, SIZE), 2.0)  # P = 0.88 everywhere: the box is predicted
    out = SimpleNamespace(logits=logits, layer4=layer4, sentence=sentence)
    core = SimpleNamespace(global_image_embedding=pool)
    batch = {"box": np.stack([box, box]), "mask": np.stack([mask, mask]), "parent": trees.parent,
             "order": trees.order, "dist": trees.dist, "forest": forest}
    meters = PseudoLabelMeters()
    meters.add_batch(out, core, batch, sigma=0.02, binarize_at=0.5, threshold=0.35)
    s = meters.summary()
    # The training step's own pseudo labels, with the same inputs, score the same.
    for mode, name in (("tree", "box"), ("forest-gradcam", "gradcam")):
        ref = make_pseudo_labels(logits, torch.from_numpy(batch["box"]), *trees, mode=mode,
                                 sigma=0.02, binarize_at=0.5,
                                 forest_labels=torch.from_numpy(forest), layer4=layer4,
                                 sentence=sentence, global_embedding=pool)
        hit = ref.pseudo_label.numpy() > 0.35
        inter = (hit & (mask > 0)).sum(axis=(1, 2))
        union = (hit | (mask > 0)).sum(axis=(1, 2))
        assert abs(s[f"phat_{name}_mean_iou"] - float(np.mean(inter / union))) < 1e-9
    assert s["phat_box_mean_iou"] == 0.5          # the whole box; the object is half of it
    assert s["phat_oracle_mean_iou"] == 1.0       # only the object's sub-tree survives
    assert s["w_mask_mean_iou"] == 1.0 and s["w_box_mean_iou"] == 0.5
    text = format_pseudo_table({"val": s})
    assert "50.0 (50.0)" in text and "100.0 (100.0)" in text
