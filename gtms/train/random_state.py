"""Every random number generator a training worker draws from, captured into a checkpoint and
restored on resume, so that a resumed run continues exactly where the uninterrupted one would
be: Python's ``random``, NumPy's global generator, torch's CPU generator and, on GPUs, CUDA's
(dropout in CRIS's decoder draws from torch's).

The state is plain tensors, numbers and tuples, so a checkpoint holding it still loads with
``torch.load(weights_only=True)``. The data order needs no state: each epoch's order is a
function of the seed and the epoch (:func:`gtms.data.reading.row_positions`), and a killed epoch
is rerun from its start.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """This process's generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (what :func:`capture` returned)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
