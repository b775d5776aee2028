"""Structural forest and vertex weights against scipy connected components / brute force."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from gtms.pseudo import build_grid_tree, structural_forest, vertex_weights


def reference_components(parent, inside):
    """scipy components of the tree edges with both endpoints inside; -1 outside."""
    n = parent.size
    child = np.flatnonzero(parent >= 0)
    keep = inside[child] & inside[parent[child]]
    graph = coo_matrix(
        (np.ones(keep.sum()), (child[keep], parent[child[keep]])), shape=(n, n)
    ).tocsr()
    _, component = connected_components(graph, directed=False)
    return np.where(inside, component, -1)


def assert_same_partition(labels, reference):
    assert ((labels >= 0) == (reference >= 0)).all()
    inside = labels >= 0
    pairs = set(zip(labels[inside].tolist(), reference[inside].tolist()))
    # A bijection between label sets: each label maps to one component and back.
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def rectangle_mask(height, width, y0, y1, x0, x1):
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 8),
    width=st.integers(1, 8),
    levels=st.sampled_from([2, 4, 256]),
    rectangle=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forest_matches_connected_components(height, width, levels, rectangle, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, levels, (height, width, 3)) / (levels - 1)
    tree = build_grid_tree(image)
    if rectangle:
        y0, y1 = np.sort(rng.integers(0, height + 1, 2))
        x0, x1 = np.sort(rng.integers(0, width + 1, 2))
        box = rectangle_mask(height, width, y0, y1, x0, x1)
    else:
        box = rng.random((height, width)) < 0.6  # any mask works
    labels = structural_forest(tree.parent, box)
    assert labels.dtype == np.int32 and labels.shape == (height * width,)
    assert_same_partition(labels, reference_components(tree.parent, box.reshape(-1)))
    # Dense labels 0..K-1, numbered by each sub-tree's smallest vertex.
    inside = labels[labels >= 0]
    if inside.size:
        firsts = [np.flatnonzero(labels == k)[0] for k in range(inside.max() + 1)]
        assert sorted(set(inside.tolist())) == list(range(inside.max() + 1))
        assert firsts == sorted(firsts)


def test_two_objects_in_a_box_give_two_sub_trees():
    # Red left half, blue right half, green rising with the row: horizontal edges cost 0 inside
    # a half, vertical ones 1e-4, and the one red-blue edge the tree needs (cost 2) is the first
    # in edge order, in row 0, outside the box. Inside the box each half is one sub-tree.
    image = np.zeros((6, 8, 3))
    image[:, :4, 0] = 1.0
    image[:, 4:, 2] = 1.0
    image[:, :, 1] = 0.01 * np.arange(6)[:, None]
    tree = build_grid_tree(image)
    box = rectangle_mask(6, 8, 2, 6, 0, 8)
    labels = structural_forest(tree.parent, box).reshape(6, 8)
    assert (labels[2:6, :4] == 0).all() and (labels[2:6, 4:] == 1).all()
    assert (labels[~box] == -1).all()


def test_forest_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        structural_forest(np.array([-1, 0, 1]), np.ones(4, bool))


def test_vertex_weights_are_sub_tree_maxima():
    rng = np.random.default_rng(0)
    batch, height, width = 3, 9, 10
    labels, attention = [], rng.random((batch, height * width))
    for _ in range(batch):
        tree = build_grid_tree(rng.integers(0, 3, (height, width, 3)) / 2)
        labels.append(structural_forest(tree.parent, rectangle_mask(height, width, 1, 8, 2, 9)))
    labels.append(np.full(height * width, -1, np.int32))  # an empty box
    attention = np.concatenate([attention, rng.random((1, height * width))])
    labels = np.stack(labels)
    weights = vertex_weights(torch.from_numpy(attention), torch.from_numpy(labels)).numpy()
    assert weights.shape == attention.shape
    assert (weights[labels < 0] == 0).all()
    for b in range(batch + 1):
        for k in np.unique(labels[b][labels[b] >= 0]):
            members = labels[b] == k
            np.testing.assert_array_equal(weights[b, members], attention[b, members].max())


def test_vertex_weights_float32_and_shape_check():
    labels = torch.tensor([[0, 0, -1, 1]])
    attention = torch.tensor([[0.2, 0.5, 0.9, 0.1]])
    expected = torch.tensor([[0.5, 0.5, 0.0, 0.1]])
    torch.testing.assert_close(vertex_weights(attention, labels), expected)
    with pytest.raises(ValueError):
        vertex_weights(attention, labels[:, :3])


@pytest.mark.parametrize(("dtype", "label_dtype"), [(torch.float32, torch.int32),
                                                     (torch.float64, torch.int64)])
def test_vertex_weights_cpu_kernel_matches_the_scatter_path(dtype, label_dtype):
    from gtms.pseudo.pseudo_label import _scatter_max  # the path taken off the CPU

    rng = np.random.default_rng(5)
    height, width = 23, 17
    labels = np.stack([
        structural_forest(build_grid_tree(rng.integers(0, 4, (height, width, 3)) / 3).parent,
                          rectangle_mask(height, width, 2, 20, 3 + b, 15))
        for b in range(6)
    ])
    attention = torch.from_numpy(rng.normal(0.3, 0.5, labels.shape)).to(dtype)  # some < 0
    labels = torch.from_numpy(labels).to(label_dtype)
    weights = vertex_weights(attention, labels)
    assert weights.dtype == dtype and (weights[labels < 0] == 0).all()
    assert (weights >= 0).all() and (weights[labels >= 0] > 0).any()
    torch.testing.assert_close(weights, _scatter_max(attention, labels), rtol=0, atol=0)


def test_vertex_weights_propagate_nan_and_check_labels():
    attention = torch.tensor([[0.2, float("nan"), 0.9, 0.7], [0.1, 0.4, 0.3, 0.2]])
    labels = torch.tensor([[0, 0, -1, 1], [1, 0, 0, 1]])
    weights = vertex_weights(attention, labels)
    assert weights[0, :2].isnan().all() and weights[0, 2:].tolist() == pytest.approx([0, 0.7])
    assert weights[1].tolist() == pytest.approx([0.2, 0.4, 0.4, 0.2])
    for bad in (-2, 4):
        with pytest.raises(ValueError, match=r"sample 1: forest labels must lie in \[-1, N = 4\)"):
            vertex_weights(attention, torch.tensor([[0, 0, -1, 1], [0, bad, 0, 1]]))
