"""Tree filter (Eq. 2-4): exact O(N) filtering of a signal over a spanning tree.

For vertices ``i, j`` of the tree, ``D_ij`` is the sum of the edge distances ``d`` along the
tree path between them and ``S(i, j) = exp(-D_ij / sigma)``. The filter is

    out(i) = sum_j S(i, j) x(j) / sum_j S(i, j).

Because ``S`` multiplies along tree paths, both sums are computed exactly with two sweeps over
the breadth-first order. With ``w_v = exp(-dist_v / sigma)`` the affinity of ``v`` to its
parent:

* leaf -> root (reverse BFS order): ``up[v] = x[v] + sum_{children c} w_c up[c]`` is the sum
  over the sub-tree of ``v``;
* root -> leaf (BFS order): ``out[root] = up[root]`` and
  ``out[v] = w_v out[parent] + (1 - w_v ** 2) up[v]`` (the parent's total minus the share that
  came from ``v``'s own sub-tree, carried over the edge, plus ``v``'s sub-tree).

The normaliser is the same two sweeps on ones; both run in the same loops, in float64.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(cache=True, nogil=True)
def _tree_filter_batch(
    x: np.ndarray, parent: np.ndarray, order: np.ndarray, dist: np.ndarray, sigma: float
) -> np.ndarray:
    """Numba kernel: ``x [B, N] float64``, trees ``[B, N]`` -> filtered ``[B, N] float64``."""
    batch, n = x.shape
    out = np.empty((batch, n), np.float64)
    up = np.empty(n, np.float64)
    up_norm = np.empty(n, np.float64)
    weight = np.empty(n, np.float64)
    out_norm = np.empty(n, np.float64)
    inv_sigma = 1.0 / sigma
    for b in range(batch):
        for v in range(n):
            up[v] = x[b, v]
            up_norm[v] = 1.0
            weight[v] = np.exp(-np.float64(dist[b, v]) * inv_sigma)
        for k in range(n - 1, 0, -1):
            v = order[b, k]
            p = parent[b, v]
            up[p] += weight[v] * up[v]
            up_norm[p] += weight[v] * up_norm[v]
        root = order[b, 0]
        out[b, root] = up[root]
        out_norm[root] = up_norm[root]
        for k in range(1, n):
            v = order[b, k]
            p = parent[b, v]
            w = weight[v]
            keep = 1.0 - w * w
            out[b, v] = w * out[b, p] + keep * up[v]
            out_norm[v] = w * out_norm[p] + keep * up_norm[v]
        for v in range(n):
            out[b, v] /= out_norm[v]
    return out


def _check_tree_arrays(x: np.ndarray, parent: np.ndarray, order: np.ndarray, dist: np.ndarray):
    if x.ndim != 2:
        raise ValueError(f"x must be [B, N], got shape {x.shape}")
    for name, arr in (("parent", parent), ("order", order), ("dist", dist)):
        if arr.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {x.shape}, got {arr.shape}")


def tree_filter(
    x: np.ndarray, parent: np.ndarray, order: np.ndarray, dist: np.ndarray, sigma: float
) -> np.ndarray:
    """Filter ``x`` over each image's tree (Eq. 4), exactly, in O(N) per image.

    Args:
        x: ``[B, N]`` float signal on the vertices.
        parent: ``[B, N]`` int, parent of each vertex (the root's entry is ignored).
        order: ``[B, N]`` int, breadth-first order of each tree, root first.
        dist: ``[B, N]`` float, edge distance of each vertex to its parent.
        sigma: ``> 0``, the affinity temperature of Eq. 3.

    Returns:
        ``[B, N]``, the filtered signal, in ``x``'s dtype when it is floating (float64 otherwise);
        accumulation is float64.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = np.asarray(x)
    parent, order, dist = np.asarray(parent), np.asarray(order), np.asarray(dist)
    _check_tree_arrays(x, parent, order, dist)
    out = _tree_filter_batch(
        np.ascontiguousarray(x, dtype=np.float64),
        np.ascontiguousarray(parent, dtype=np.int32),
        np.ascontiguousarray(order, dtype=np.int32),
        np.ascontiguousarray(dist, dtype=np.float32),
        float(sigma),
    )
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    return out.astype(out_dtype, copy=False)


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def tree_filter_torch(
    x: torch.Tensor, parent, order, dist, sigma: float
) -> torch.Tensor:
    """:func:`tree_filter` for tensors; no gradient flows through it.

    Args:
        x: ``[B, N]`` float tensor on any device; it is detached and filtered on the CPU.
        parent, order, dist: ``[B, N]`` tensors (any device) or numpy arrays, as in
            :func:`tree_filter`.
        sigma: ``> 0``.

    Returns:
        ``[B, N]`` detached tensor on ``x``'s device with ``x``'s dtype.
    """
    x_cpu = x.detach().to("cpu", torch.float64).numpy()
    out = tree_filter(x_cpu, _to_numpy(parent), _to_numpy(order), _to_numpy(dist), sigma)
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
