"""Pseudo label P-hat = TreeFilter(P * W) and the training-step entry point."""

import numpy as np
import pytest
import torch
from torch import nn

from gtms.pseudo import (
    build_grid_tree,
    gradcam_attention,
    make_pseudo_labels,
    pseudo_label,
    stack_grid_trees,
    structural_forest,
    tree_filter,
    vertex_weights,
)

SIZE = 12


class MeanPool(nn.Module):
    def __init__(self, channels=4, embed_dim=3):
        super().__init__()
        self.project = nn.Linear(channels, embed_dim)

    def forward(self, features):
        return self.project(features.mean(dim=(2, 3)))


def make_batch(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 4, (batch, SIZE, SIZE, 3)) / 3
    trees = stack_grid_trees([build_grid_tree(image) for image in images])
    box = np.zeros((batch, SIZE, SIZE), np.float32)
    box[0, 2:9, 3:11] = 1
    box[1:, 5:12, 0:6] = 1
    forest = np.stack([structural_forest(trees.parent[b], box[b]) for b in range(batch)])
    logits = torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return logits, torch.from_numpy(box), trees, torch.from_numpy(forest)


def test_pseudo_label_is_filtered_weighted_prediction():
    logits, box, trees, _ = make_batch()
    probs = torch.sigmoid(logits[:, 0]).reshape(2, -1).double()
    weights = box.reshape(2, -1).double()
    out = pseudo_label(probs.requires_grad_(True), weights, *trees, sigma=0.05)
    expected = tree_filter((probs * weights).detach().numpy(), *trees, sigma=0.05)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert not out.requires_grad


def test_mode_tree_uses_the_box_as_weights():
    logits, box, trees, _ = make_batch()
    logits.requires_grad_(True)
    parent, order, dist = (torch.from_numpy(a) for a in trees)
    result = make_pseudo_labels(logits, box, parent, order, dist, mode="tree", sigma=0.02)
    assert result.attention is None
    torch.testing.assert_close(result.weights, box)
    assert result.pseudo_label.shape == (2, SIZE, SIZE) and not result.pseudo_label.requires_grad
    probs = torch.sigmoid(logits.detach()[:, 0]).reshape(2, -1)
    expected = tree_filter((probs * box.reshape(2, -1)).numpy(), *trees, sigma=0.02)
    np.testing.assert_allclose(result.pseudo_label.reshape(2, -1).numpy(), expected, rtol=1e-6)
    assert 0 <= result.pseudo_label.min() and result.pseudo_label.max() <= 1


def test_mode_forest_gradcam_combines_the_parts():
    torch.manual_seed(0)
    logits, box, trees, forest = make_batch(seed=1)
    layer4, sentence, pool = torch.randn(2, 4, 3, 3), torch.randn(2, 3), MeanPool()
    result = make_pseudo_labels(
        logits, box, *trees, mode="forest-gradcam", sigma=0.02, forest_labels=forest,
        layer4=layer4, sentence=sentence, global_embedding=pool,
    )
    attention = gradcam_attention(layer4, sentence, pool, box)
    torch.testing.assert_close(result.attention, attention)
    weights = vertex_weights(attention.reshape(2, -1), forest).reshape(2, SIZE, SIZE)
    torch.testing.assert_close(result.weights, weights)
    assert (result.weights[box == 0] == 0).all()
    probs = torch.sigmoid(logits[:, 0]).reshape(2, -1)
    expected = tree_filter((probs * weights.reshape(2, -1)).numpy(), *trees, sigma=0.02)
    np.testing.assert_allclose(result.pseudo_label.reshape(2, -1).numpy(), expected, rtol=1e-6)
    assert all(p.grad is None for p in pool.parameters())


def test_forest_gradcam_names_missing_inputs_and_bad_mode():
    logits, box, trees, forest = make_batch()
    with pytest.raises(ValueError, match="layer4"):
        make_pseudo_labels(logits, box, *trees, mode="forest-gradcam", sigma=0.02,
                           forest_labels=forest)
    with pytest.raises(ValueError, match="mode"):
        make_pseudo_labels(logits, box, *trees, mode="box-lloc", sigma=0.02)


def test_binarized_pseudo_label_is_half_of_the_in_box_maximum():
    logits, box, trees, _ = make_batch()
    parent, order, dist = (torch.from_numpy(a) for a in trees)
    soft = make_pseudo_labels(logits, box, parent, order, dist, mode="tree", sigma=0.02)
    hard = make_pseudo_labels(logits, box, parent, order, dist, mode="tree", sigma=0.02,
                              binarize_at=0.5)
    label, inside = soft.pseudo_label.numpy(), box.numpy() > 0
    for b in range(2):
        peak = label[b][inside[b]].max()
        expected = (label[b] >= 0.5 * peak) & inside[b]
        np.testing.assert_array_equal(hard.pseudo_label[b].numpy(), expected.astype(np.float32))
        assert 0 < expected.sum() < inside[b].sum()  # a real split, neither empty nor the box
    # An all-zero prediction gives an all-zero label, not the whole box.
    zero = make_pseudo_labels(torch.full_like(logits, -1e4), box, parent, order, dist,
                              mode="tree", sigma=0.02, binarize_at=0.5)
    assert zero.pseudo_label.sum() == 0
