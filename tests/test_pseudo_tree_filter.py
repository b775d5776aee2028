"""Tree filter: the O(N) two-sweep filter against the dense O(N^2) definition of Eq. 4."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import shortest_path

from gtms.pseudo import build_grid_tree, stack_grid_trees, tree_filter, tree_filter_torch


def dense_tree_filter(x, parent, dist, sigma):
    """out(i) = sum_j exp(-D_ij / sigma) x(j) / sum_j exp(-D_ij / sigma), D = tree path sums."""
    n = parent.size
    child = np.flatnonzero(parent >= 0)
    d = dist[child].astype(np.float64)
    # scipy drops zero-weight edges: shift every edge by 1 and subtract the hop counts.
    graph = coo_matrix((d + 1.0, (child, parent[child])), shape=(n, n)).tocsr()
    shifted = shortest_path(graph, directed=False)
    hops = shortest_path(graph, directed=False, unweighted=True)
    assert np.isfinite(shifted).all()  # the tree spans the grid
    affinity = np.exp(-(shifted - hops) / sigma)
    return affinity @ x / affinity.sum(axis=1)


def random_case(rng, height, width, batch=2, contrast=1.0):
    images = [0.5 + contrast * (rng.random((height, width, 3)) - 0.5) for _ in range(batch)]
    trees = stack_grid_trees([build_grid_tree(image) for image in images])
    x = rng.random((batch, height * width))
    return x, trees


def assert_matches_dense(x, trees, sigma, atol=1e-9):
    out = tree_filter(x, trees.parent, trees.order, trees.dist, sigma)
    assert out.shape == x.shape and out.dtype == np.float64
    for b in range(x.shape[0]):
        expected = dense_tree_filter(x[b], trees.parent[b], trees.dist[b], sigma)
        np.testing.assert_allclose(out[b], expected, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("shape", "sigma", "contrast"),
    [
        ((12, 13), 0.02, 1.0),
        ((12, 13), 0.02, 0.05),  # low contrast: affinities far from 0 at sigma = 0.02
        ((12, 13), 0.2, 1.0),
        ((12, 13), 5.0, 1.0),
        ((1, 40), 0.1, 0.3),
        ((40, 1), 0.1, 0.3),
        ((1, 1), 0.02, 1.0),
    ],
)
def test_matches_dense_reference(shape, sigma, contrast):
    rng = np.random.default_rng(0)
    x, trees = random_case(rng, *shape, contrast=contrast)
    assert_matches_dense(x, trees, sigma)


def test_flat_image_all_ties_is_the_mean():
    rng = np.random.default_rng(1)
    trees = stack_grid_trees([build_grid_tree(np.full((7, 9, 3), 0.4))])
    x = rng.random((1, 63))
    out = tree_filter(x, trees.parent, trees.order, trees.dist, 0.02)
    np.testing.assert_allclose(out[0], np.full(63, x.mean()), rtol=0, atol=1e-12)
    assert_matches_dense(x, trees, 0.02)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    sigma=st.sampled_from([0.02, 0.1, 1.0]),
    contrast=st.sampled_from([0.02, 0.2, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_dense_reference_small_grids(height, width, sigma, contrast, seed):
    x, trees = random_case(np.random.default_rng(seed), height, width, batch=1, contrast=contrast)
    assert_matches_dense(x, trees, sigma)


def test_constant_signal_is_preserved_and_float32_kept():
    rng = np.random.default_rng(2)
    _, trees = random_case(rng, 10, 11)
    x = np.full((2, 110), 0.7, np.float32)
    out = tree_filter(x, *trees, sigma=0.02)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x, rtol=1e-6)


def test_torch_wrapper_detaches_and_keeps_dtype():
    rng = np.random.default_rng(3)
    x_np, trees = random_case(rng, 8, 9)
    x = torch.tensor(x_np, dtype=torch.float32, requires_grad=True)
    parent, order, dist = (torch.from_numpy(a) for a in trees)
    out = tree_filter_torch(x * 1.0, parent, order, dist, 0.1)
    assert out.dtype == torch.float32 and out.device == x.device and not out.requires_grad
    expected = tree_filter(x_np, *trees, sigma=0.1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_rejects_invalid_trees_and_sigma():
    rng = np.random.default_rng(4)
    x, trees = random_case(rng, 4, 5, batch=1)
    with pytest.raises(ValueError, match="sigma"):
        tree_filter(x, *trees, sigma=0.0)
    with pytest.raises(ValueError, match="shape"):
        tree_filter(x[:, :-1], *trees, sigma=0.1)
    reversed_order = trees.order[:, ::-1].copy()  # children before parents
    with pytest.raises(ValueError, match="breadth-first"):
        tree_filter(x, trees.parent, reversed_order, trees.dist, 0.1)
    out_of_range = trees.order.copy()
    out_of_range[0, -1] = 99
    with pytest.raises(ValueError, match="breadth-first"):
        tree_filter(x, trees.parent, out_of_range, trees.dist, 0.1)


def test_vectorised_exp_matches_numpy():
    from gtms.pseudo.tree_filter import _exp_nonpositive_inplace

    x = np.concatenate([-np.linspace(0, 720, 20001), [-0.0, -1e-300, -1e5, -np.inf]])
    values = x.copy()
    _exp_nonpositive_inplace(values, np.empty(values.size, np.int64))
    expected = np.exp(x)
    normal = x > -700
    np.testing.assert_allclose(values[normal], expected[normal], rtol=5e-16, atol=0)
    assert (values[~normal] == 0).all()
