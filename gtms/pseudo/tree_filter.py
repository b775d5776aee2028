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

# exp(x) for x <= 0 as 2**k * exp(r), |r| <= ln(2) / 2, with a degree-12 Taylor polynomial
# (truncation error < 2e-16 relative). Written out so that LLVM vectorises it; libm's scalar exp
# was the filter's largest cost. Arguments below -700 give exactly 0 (true value < 1e-304).
_LOG2_E = 1.4426950408889634
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10
_EXP_FLOOR = -700.0


@numba.njit(cache=True, nogil=True)
def _exp_nonpositive_inplace(values: np.ndarray, scratch_bits: np.ndarray) -> None:
    """``values [n] float64 <= 0`` -> ``exp(values)`` in place; ``scratch_bits [n] int64``."""
    n = values.size
    for i in range(n):
        x = max(values[i], _EXP_FLOOR)
        k = np.floor(x * _LOG2_E + 0.5)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = 2.08767569878681e-09
        p = p * r + 2.505210838544172e-08
        p = p * r + 2.755731922398589e-07
        p = p * r + 2.7557319223985893e-06
        p = p * r + 2.48015873015873e-05
        p = p * r + 0.0001984126984126984
        p = p * r + 0.001388888888888889
        p = p * r + 0.008333333333333333
        p = p * r + 0.041666666666666664
        p = p * r + 0.16666666666666666
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        scratch_bits[i] = (np.int64(k) + 1023) << 52  # the float64 bits of 2**k
        values[i] = p if values[i] >= _EXP_FLOOR else 0.0
    scale = scratch_bits.view(np.float64)
    for i in range(n):
        values[i] *= scale[i]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _tree_filter_batch(
    x: np.ndarray, parent: np.ndarray, order: np.ndarray, dist: np.ndarray, sigma: float
) -> tuple[np.ndarray, int]:
    """Numba kernel: ``x [B, N]`` float, trees ``[B, N]`` -> filtered ``[B, N]`` (x's dtype).

    Returns ``(out, bad_image)``: ``bad_image`` is -1, or the first image whose ``order`` /
    ``parent`` are not a BFS order of a tree (then ``out`` is incomplete).

    Works in BFS-position space: vertex ``order[k]`` lives at position ``k`` and its parent at
    ``parent_pos[k] < k``, so both sweeps run over contiguous arrays. Each image's inputs are
    first copied sequentially into small buffers, which keeps the gathers in cache; the sweeps
    of x and of ones share one ``[N, 2]`` array (one cache line per vertex), and the division
    is its own loop so that it vectorises (``error_model="numpy"``: no zero-division branch;
    the denominator is >= 1, the vertex's own affinity).
    """
    batch, n = x.shape
    out = np.empty((batch, n), x.dtype)
    x_local = np.empty(n, x.dtype)
    parent_local = np.empty(n, np.int32)
    dist_local = np.empty(n, np.float32)
    out_local = np.empty(n, np.float64)
    position = np.empty(n, np.int32)
    parent_pos = np.empty(n, np.int32)
    weight = np.empty(n, np.float64)  # affinity of position k to its parent
    sums = np.empty((n, 2), np.float64)  # [:, 0] sweeps of x, [:, 1] sweeps of ones
    ratio = np.empty(n, np.float64)
    bits = np.empty(n, np.int64)
    neg_inv_sigma = -1.0 / sigma
    for b in range(batch):
        order_b = order[b]
        x_local[:] = x[b]
        parent_local[:] = parent[b]
        dist_local[:] = dist[b]
        position[:] = n
        for k in range(n):
            v = order_b[k]
            if v < 0 or v >= n:
                return out, b
            position[v] = k
        v = order_b[0]
        parent_pos[0] = 0
        weight[0] = 0.0
        sums[0, 0] = x_local[v]
        sums[0, 1] = 1.0
        for k in range(1, n):
            v = order_b[k]
            p = parent_local[v]
            if p < 0 or p >= n or position[p] >= k:
                return out, b  # not a BFS order of a tree: parent missing or after child
            parent_pos[k] = position[p]
            weight[k] = np.float64(dist_local[v]) * neg_inv_sigma
            sums[k, 0] = x_local[v]
            sums[k, 1] = 1.0
        _exp_nonpositive_inplace(weight, bits)
        for k in range(n - 1, 0, -1):  # leaf -> root: sub-tree sums
            p = parent_pos[k]
            w = weight[k]
            sums[p, 0] += w * sums[k, 0]
            sums[p, 1] += w * sums[k, 1]
        for k in range(1, n):  # root -> leaf: sums over the whole tree
            p = parent_pos[k]
            w = weight[k]
            keep = 1.0 - w * w
            sums[k, 0] = w * sums[p, 0] + keep * sums[k, 0]
            sums[k, 1] = w * sums[p, 1] + keep * sums[k, 1]
        for k in range(n):
            ratio[k] = sums[k, 0] / sums[k, 1]
        for k in range(n):
            out_local[order_b[k]] = ratio[k]
        out[b] = out_local
    return out, -1


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
        ``[B, N]``, the filtered signal, float32 for float32 ``x`` and float64 otherwise;
        accumulation is float64.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = np.asarray(x)
    parent, order, dist = np.asarray(parent), np.asarray(order), np.asarray(dist)
    _check_tree_arrays(x, parent, order, dist)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    out, bad_image = _tree_filter_batch(
        np.ascontiguousarray(x),
        np.ascontiguousarray(parent, dtype=np.int32),
        np.ascontiguousarray(order, dtype=np.int32),
        np.ascontiguousarray(dist, dtype=np.float32),
        float(sigma),
    )
    if bad_image >= 0:
        raise ValueError(
            f"image {bad_image}: order/parent do not describe a tree in breadth-first order "
            "(order must be a permutation of 0..N-1 with every parent before its child)"
        )
    return out


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
    x_cpu = x.detach().to("cpu")
    if x_cpu.dtype not in (torch.float32, torch.float64):
        x_cpu = x_cpu.float()
    x_cpu = x_cpu.numpy()
    out = tree_filter(x_cpu, _to_numpy(parent), _to_numpy(order), _to_numpy(dist), sigma)
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
