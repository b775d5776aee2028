"""Tree (Fig. 3, Eq. 1-3): minimum spanning tree of the 4-neighbour pixel grid.

The guide image is the letterboxed RGB in [0, 1] resized to the output stride, ``[H, W, 3]``.
Vertices are pixels in row-major order (``v = y * W + x``, ``N = H * W``). The edge distance
between 4-neighbours is the squared L2 colour difference (Eq. 1)
``d(u, v) = sum_c (I[u, c] - I[v, c]) ** 2``, computed in float32.

The MST is built by Kruskal's algorithm with union-find, specialised to the grid:

* edges are enumerated in a fixed order: edge ``2 u`` is the right edge ``(u, u + 1)`` of
  vertex ``u``, edge ``2 u + 1`` its down edge ``(u, u + W)`` (missing edges at the border get
  distance ``inf`` and are never used);
* they are sorted by a stable LSD radix sort on the float32 bit pattern (non-negative floats
  order like their bits), so equal distances keep the enumeration order: ties are broken
  deterministically, and the result is O(N);
* the tree is rooted at vertex 0 and traversed breadth-first, neighbours visited in the order
  right, down, left, up.

Everything runs in numba (``cache=True``: compiled lazily on first call, then loaded from the
on-disk cache next to this file; the first compile of a fresh checkout takes a few seconds).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

# Neighbour directions stored as bits of a per-vertex mask of tree edges.
_RIGHT, _DOWN, _LEFT, _UP = 1, 2, 4, 8
_RADIX_BITS = 11
_RADIX = 1 << _RADIX_BITS


class GridTree(NamedTuple):
    """A spanning tree of an ``H x W`` 4-neighbour grid, rooted at vertex 0.

    Attributes:
        parent: ``[N] int32``, the parent of each vertex; ``-1`` for the root.
        order: ``[N] int32``, the vertices in breadth-first order from the root (root first, so
            every vertex comes after its parent).
        dist: ``[N] float32``, the edge distance ``d`` from each vertex to its parent; 0 for the
            root.
    """

    parent: np.ndarray
    order: np.ndarray
    dist: np.ndarray


@numba.njit(cache=True, nogil=True)
def _edge_distances(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """Grid edge distances ``[2 N] float32``: entry ``2 u`` is the right edge ``(u, u + 1)``,
    entry ``2 u + 1`` the down edge ``(u, u + W)``; ``inf`` where the edge leaves the image.

    Also returns whether every real edge's distance is finite (no NaN, no overflow)."""
    height, width, channels = image.shape
    dist = np.empty(2 * height * width, np.float32)
    finite = True
    for y in range(height):
        for x in range(width):
            u = y * width + x
            acc = np.float32(np.inf)
            if x + 1 < width:
                acc = np.float32(0.0)
                for c in range(channels):
                    diff = image[y, x, c] - image[y, x + 1, c]
                    acc += diff * diff
                finite &= acc < np.inf
            dist[2 * u] = acc
            acc = np.float32(np.inf)
            if y + 1 < height:
                acc = np.float32(0.0)
                for c in range(channels):
                    diff = image[y, x, c] - image[y + 1, x, c]
                    acc += diff * diff
                finite &= acc < np.inf
            dist[2 * u + 1] = acc
    return dist, finite


@numba.njit(cache=True, nogil=True)
def _stable_argsort_nonneg_f32(values: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative float32 ``values [E]`` by LSD radix sort on their bits."""
    n = values.size
    keys = values.view(np.uint32)
    n_passes = (32 + _RADIX_BITS - 1) // _RADIX_BITS
    counts = np.zeros((n_passes, _RADIX), np.int32)
    for i in range(n):
        k = keys[i]
        for p in range(n_passes):
            counts[p, (k >> (p * _RADIX_BITS)) & (_RADIX - 1)] += 1
    perm = np.arange(n).astype(np.int32)
    scratch = np.empty(n, np.int32)
    for p in range(n_passes):
        shift = p * _RADIX_BITS
        if n == 0 or counts[p, (keys[0] >> shift) & (_RADIX - 1)] == n:
            continue  # every key has the same digit: this pass is the identity
        start = np.empty(_RADIX, np.int64)
        total = 0
        for b in range(_RADIX):
            start[b] = total
            total += counts[p, b]
        for i in range(n):
            j = perm[i]
            b = (keys[j] >> shift) & (_RADIX - 1)
            scratch[start[b]] = j
            start[b] += 1
        perm, scratch = scratch, perm
    return perm


@numba.njit(cache=True, nogil=True, inline="always")
def _find(uf_parent: np.ndarray, v: int) -> int:
    """Union-find root of ``v`` with path halving."""
    while uf_parent[v] != v:
        uf_parent[v] = uf_parent[uf_parent[v]]
        v = uf_parent[v]
    return v


@numba.njit(cache=True, nogil=True)
def _kruskal_grid(edge_dist: np.ndarray, height: int, width: int) -> np.ndarray:
    """Kruskal on the ``height x width`` grid with finite ``edge_dist [2 N]`` (see
    ``_edge_distances``); returns the tree edges at each vertex as bits (right, down, left, up),
    ``mask [N] uint8``."""
    n = height * width
    perm = _stable_argsort_nonneg_f32(edge_dist)
    uf_parent = np.arange(n).astype(np.int32)
    uf_rank = np.zeros(n, np.uint8)
    mask = np.zeros(n, np.uint8)
    taken = 0
    for k in range(perm.size):
        if taken == n - 1:
            break
        e = perm[k]
        u = e >> 1
        down = e & 1
        v = u + width if down else u + 1
        ru, rv = _find(uf_parent, u), _find(uf_parent, v)
        if ru == rv:
            continue
        if uf_rank[ru] < uf_rank[rv]:
            uf_parent[ru] = rv
        elif uf_rank[ru] > uf_rank[rv]:
            uf_parent[rv] = ru
        else:
            uf_parent[rv] = ru
            uf_rank[ru] += 1
        taken += 1
        if down:
            mask[u] |= _DOWN
            mask[v] |= _UP
        else:
            mask[u] |= _RIGHT
            mask[v] |= _LEFT
    return mask


@numba.njit(cache=True, nogil=True)
def _bfs_grid(
    mask: np.ndarray, edge_dist: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Breadth-first traversal of the tree from vertex 0; returns ``(parent, order, dist)``."""
    n = mask.size
    parent = np.full(n, -1, np.int32)
    order = np.empty(n, np.int32)
    dist = np.zeros(n, np.float32)
    order[0] = 0
    head, tail = 0, 1
    while head < tail:
        u = order[head]
        head += 1
        m = mask[u]
        p = parent[u]
        if m & _RIGHT and u + 1 != p:
            v = u + 1
            parent[v], dist[v] = u, edge_dist[2 * u]
            order[tail] = v
            tail += 1
        if m & _DOWN and u + width != p:
            v = u + width
            parent[v], dist[v] = u, edge_dist[2 * u + 1]
            order[tail] = v
            tail += 1
        if m & _LEFT and u - 1 != p:
            v = u - 1
            parent[v], dist[v] = u, edge_dist[2 * v]
            order[tail] = v
            tail += 1
        if m & _UP and u - width != p:
            v = u - width
            parent[v], dist[v] = u, edge_dist[2 * v + 1]
            order[tail] = v
            tail += 1
    return parent, order, dist


@numba.njit(cache=True, nogil=True)
def _grid_tree(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """MST + BFS of ``image [H, W, C] float32``: ``(parent, order, dist, ok)``; ``ok`` is False
    (and the arrays empty) when an edge distance is NaN or overflows."""
    height, width, _ = image.shape
    edge_dist, finite = _edge_distances(image)
    if not finite:
        empty = np.empty(0, np.int32)
        return empty, empty, np.empty(0, np.float32), False
    mask = _kruskal_grid(edge_dist, height, width)
    parent, order, dist = _bfs_grid(mask, edge_dist, width)
    return parent, order, dist, True


def build_grid_tree(guide_image: np.ndarray) -> GridTree:
    """Minimum spanning tree of the 4-neighbour grid of one guide image.

    Args:
        guide_image: ``[H, W, 3]`` (any number of channels works) float, colours in [0, 1];
            the letterboxed RGB at the output stride.

    Returns:
        A :class:`GridTree` with ``N = H * W`` vertices in row-major order, rooted at vertex 0.
    """
    image = np.ascontiguousarray(guide_image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"guide_image must be [H, W, C] with H, W, C >= 1, got {image.shape}")
    parent, order, dist, ok = _grid_tree(image)
    if not ok:
        raise ValueError("guide_image gives NaN or infinite edge distances (NaN/inf/huge values)")
    return GridTree(parent=parent, order=order, dist=dist)


def stack_grid_trees(trees: list[GridTree]) -> GridTree:
    """Stack per-image trees of the same grid size into batched arrays ``[B, N]``."""
    if not trees:
        raise ValueError("stack_grid_trees needs at least one tree")
    return GridTree(
        parent=np.stack([t.parent for t in trees]),
        order=np.stack([t.order for t in trees]),
        dist=np.stack([t.dist for t in trees]),
    )
