"""Tree: the grid MST against scipy, tree invariants, pinned tie-breaking."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree

from gtms.pseudo import GridTree, build_grid_tree, stack_grid_trees


def grid_edges(height, width):
    """All 4-neighbour edges ``(u [E], v [E])`` of a row-major grid."""
    index = np.arange(height * width).reshape(height, width)
    right = (index[:, :-1].ravel(), index[:, 1:].ravel())
    down = (index[:-1, :].ravel(), index[1:, :].ravel())
    return np.concatenate([right[0], down[0]]), np.concatenate([right[1], down[1]])


def scipy_mst_weight(image):
    """Total MST weight of the grid with squared colour distances, via scipy (float64)."""
    height, width, _ = image.shape
    n = height * width
    u, v = grid_edges(height, width)
    flat = image.reshape(n, -1).astype(np.float64)
    d = ((flat[u] - flat[v]) ** 2).sum(axis=1)
    # scipy drops zero weights, so shift every edge by 1: all spanning trees have n - 1 edges.
    graph = coo_matrix((d + 1.0, (u, v)), shape=(n, n)).tocsr()
    return minimum_spanning_tree(graph).sum() - (n - 1)


def check_tree_invariants(tree: GridTree, image):
    height, width, _ = image.shape
    n = height * width
    parent, order, dist = tree
    assert parent.shape == order.shape == dist.shape == (n,)
    assert parent.dtype == np.int32 and order.dtype == np.int32 and dist.dtype == np.float32
    assert order[0] == 0 and parent[0] == -1 and dist[0] == 0
    assert np.array_equal(np.sort(order), np.arange(n))  # every vertex reached exactly once
    children = np.arange(1, n)
    assert (parent[children] >= 0).all()  # n - 1 edges
    # Each tree edge joins 4-neighbours, and dist is its squared colour difference.
    py, px = np.divmod(parent[children], width)
    cy, cx = np.divmod(children, width)
    assert (np.abs(py - cy) + np.abs(px - cx) == 1).all()
    flat = image.reshape(n, -1).astype(np.float32)
    expected = ((flat[children] - flat[parent[children]]) ** 2).sum(axis=1)
    np.testing.assert_allclose(dist[children], expected, rtol=1e-6, atol=1e-7)
    # BFS: every parent comes before its child and parents' positions never decrease (FIFO),
    # which also rules out cycles.
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    parent_position = position[parent[order[1:]]]
    assert (parent_position < np.arange(1, n)).all()
    assert (np.diff(parent_position) >= 0).all()


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    levels=st.sampled_from([2, 3, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_mst_weight_matches_scipy(height, width, levels, seed):
    # Few colour levels make many ties.
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, levels, (height, width, 3)) / (levels - 1)).astype(np.float32)
    tree = build_grid_tree(image)
    check_tree_invariants(tree, image)
    assert tree.dist.astype(np.float64).sum() == pytest.approx(scipy_mst_weight(image), abs=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (32, 45)])
def test_tree_invariants_and_weight(shape):
    rng = np.random.default_rng(0)
    image = rng.random((*shape, 3)).astype(np.float32)
    tree = build_grid_tree(image)
    check_tree_invariants(tree, image)
    assert tree.dist.sum(dtype=np.float64) == pytest.approx(scipy_mst_weight(image), rel=1e-6)


def test_deterministic():
    rng = np.random.default_rng(1)
    image = (rng.integers(0, 3, (20, 17, 3)) / 2).astype(np.float32)  # many ties
    first, second = build_grid_tree(image), build_grid_tree(image.copy())
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_flat_image_tie_breaking_is_pinned():
    # Edges are taken in the order (right of 0, down of 0, right of 1, down of 1, ...):
    # on a flat image that is the first row plus every vertical edge (a comb).
    height, width = 4, 5
    tree = build_grid_tree(np.full((height, width, 3), 0.3, np.float32))
    v = np.arange(height * width)
    expected_parent = np.where(v < width, v - 1, v - width)
    expected_parent[0] = -1
    np.testing.assert_array_equal(tree.parent, expected_parent)
    assert (tree.dist == 0).all()


def test_any_channel_count_and_float64_input():
    rng = np.random.default_rng(2)
    image = rng.random((6, 7, 1))
    tree = build_grid_tree(image)
    check_tree_invariants(tree, image)


def _overflowing_image():
    image = np.zeros((2, 2, 3), np.float32)
    image[0, 0] = 1e30  # finite, but its squared difference to a neighbour overflows float32
    return image


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4)), np.zeros((0, 4, 3)), np.full((3, 3, 3), np.nan), _overflowing_image()],
)
def test_rejects_bad_images(bad):
    with pytest.raises(ValueError):
        build_grid_tree(bad)


def test_stack_grid_trees():
    rng = np.random.default_rng(3)
    trees = [build_grid_tree(rng.random((5, 6, 3))) for _ in range(3)]
    stacked = stack_grid_trees(trees)
    assert stacked.parent.shape == stacked.order.shape == stacked.dist.shape == (3, 30)
    np.testing.assert_array_equal(stacked.order[1], trees[1].order)
