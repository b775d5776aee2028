"""Structural forest (Alg. 1, lines 1-6): the box cuts the tree into sub-trees.

Keep only the tree edges ``(v, parent[v])`` whose two endpoints lie inside the box (pixel
centres inside the box, rasterised at the output stride by the data pipeline); the connected
components of what remains are the sub-trees of the structural forest. Vertices outside the box
belong to no sub-tree. (The paper's ``FindParent(j, L)`` and ``W[j]`` are typos for ``v`` and
``u``.)

Labels are dense: ``0 .. K-1`` numbered in order of each sub-tree's smallest vertex index,
``-1`` outside the box.
"""

from __future__ import annotations

import numba
import numpy as np

from gtms.pseudo.tree import _find


@numba.njit(cache=True, nogil=True)
def _forest_labels(parent: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Union-find over the in-box tree edges; ``parent [N] int32``, ``inside [N] bool``."""
    n = parent.size
    uf_parent = np.arange(n).astype(np.int32)
    for v in range(n):
        p = parent[v]
        if p < 0 or not inside[v] or not inside[p]:
            continue
        rv, rp = _find(uf_parent, v), _find(uf_parent, p)
        if rv != rp:
            # Attach the larger index under the smaller one: roots are component minima.
            if rv < rp:
                uf_parent[rp] = rv
            else:
                uf_parent[rv] = rp
    labels = np.full(n, -1, np.int32)
    next_label = 0
    for v in range(n):
        if not inside[v]:
            continue
        r = _find(uf_parent, v)
        if r == v:
            labels[v] = next_label
            next_label += 1
        else:
            labels[v] = labels[r]  # r < v, already labelled
    return labels


def structural_forest(parent: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
    """Sub-tree labels of the structural forest of one image.

    Args:
        parent: ``[N]`` int, the tree's parent array (root's parent ``-1``), see
            :class:`gtms.pseudo.tree.GridTree`.
        box_mask: ``[N]`` (or ``[H, W]`` with ``H * W = N``) bool or 0/1 float; True where the
            pixel centre lies inside the box.

    Returns:
        ``[N] int32`` labels ``0 .. K-1`` (ordered by smallest member vertex), ``-1`` outside
        the box.
    """
    parent = np.ascontiguousarray(parent, dtype=np.int32)
    inside = np.ascontiguousarray(np.asarray(box_mask).reshape(-1) > 0)
    if parent.ndim != 1 or inside.shape != parent.shape:
        raise ValueError(
            f"parent must be [N] and box_mask hold N values, got {parent.shape} and "
            f"{np.shape(box_mask)}"
        )
    return _forest_labels(parent, inside)


@numba.njit(cache=True, nogil=True)
def _forest_maxima(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Numba kernel of :func:`forest_maxima`; returns ``(out, bad_sample)``, ``bad_sample`` -1
    or the first sample with a label outside ``[-1, N)`` (then ``out`` is incomplete)."""
    batch, n = values.shape
    out = np.zeros((batch, n), values.dtype)
    peak = np.empty(n, values.dtype)
    for b in range(batch):
        values_b, labels_b, out_b = values[b], labels[b], out[b]
        peak[:] = 0
        for v in range(n):
            label = labels_b[v]
            if label < -1 or label >= n:
                return out, b
            if label >= 0:
                value, current = values_b[v], peak[label]
                if (value > current or value != value) and current == current:
                    peak[label] = value  # a NaN stays: it propagates as in torch's amax
        for v in range(n):
            label = labels_b[v]
            if label >= 0:
                out_b[v] = peak[label]
    return out, -1


def forest_maxima(values: np.ndarray, forest_labels: np.ndarray) -> np.ndarray:
    """Every in-box vertex gets the largest value of its sub-tree (floored at 0), others 0.

    Args:
        values: ``[B, N]`` float32 or float64 (e.g. GradCAM attention).
        forest_labels: ``[B, N]`` int sub-tree labels in ``[0, N)``, ``-1`` outside the box (see
            :func:`structural_forest`).

    Returns:
        ``[B, N]`` in ``values``' dtype. A NaN in a sub-tree makes its maximum NaN.
    """
    values = np.ascontiguousarray(values)
    labels = np.ascontiguousarray(forest_labels)
    if values.ndim != 2 or labels.shape != values.shape:
        raise ValueError(
            f"values and forest_labels must both be [B, N], got {values.shape} and {labels.shape}"
        )
    if values.dtype not in (np.float32, np.float64):
        raise ValueError(f"values must be float32 or float64, got {values.dtype}")
    if labels.dtype not in (np.int32, np.int64):
        labels = labels.astype(np.int64)
    out, bad_sample = _forest_maxima(values, labels)
    if bad_sample >= 0:
        raise ValueError(
            f"sample {bad_sample}: forest labels must lie in [-1, N = {values.shape[1]})"
        )
    return out
