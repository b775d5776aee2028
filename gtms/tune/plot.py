"""``ablation.png``: how each Table 2 row trains, epoch by epoch, from its trials' metrics.jsonl.

Left: val mean IoU of the model's prediction P per epoch, one line per row (mean over seeds,
band = min..max). Right, for the pseudo-label rows (:data:`gtms.modes.PSEUDO_LABEL_MODES`:
``tree``, ``forest-gradcam``): the val mean IoU of the pseudo label P-hat (solid) and of the
vertex weights W (dashed) against the ground truth, the two inputs GTMS's L_pix learns from.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from gtms.modes import PSEUDO_LABEL_MODES

CURVES = {"val_mean_iou": "P", "val_pseudo_label_mean_iou": "P-hat",
          "val_weights_mean_iou": "W"}


def read_curves(trials: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """``trials``: ``mode`` and ``run_dir`` each -> {row: {"epoch": [E] array, metric: [seeds, E]
    array}} over the epochs that were validated (``train.val_every``); an epoch a seed did not
    reach is NaN. Epoch numbers are those of ``metrics.jsonl`` (from 1); IoU as fractions.
    """
    per_row: dict[str, list[dict[int, dict]]] = defaultdict(list)
    for trial in trials:
        lines = (Path(trial["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        per_row[trial["mode"]].append({int(r["epoch"]): r for r in records
                                       if "val_mean_iou" in r})
    out = {}
    for row, seeds in per_row.items():
        epochs = sorted(set().union(*seeds))
        out[row] = {"epoch": np.array(epochs, float)}
        for key in CURVES:
            out[row][key] = np.array([[seed.get(e, {}).get(key, np.nan) for e in epochs]
                                      for seed in seeds], float)
    return out


def plot_ablation(curves: dict[str, dict[str, np.ndarray]], path: Path, *, title: str) -> Path:
    """Draw :func:`read_curves`' output into ``path`` (PNG), IoU in percent; returns
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (row, metrics) in enumerate(curves.items()):
        colour = f"C{i}"
        epochs = metrics["epoch"]
        _line(left, epochs, metrics["val_mean_iou"], colour, row, "-")
        if row in PSEUDO_LABEL_MODES:
            _line(right, epochs, metrics["val_pseudo_label_mean_iou"], colour, f"{row} P-hat",
                  "-")
            _line(right, epochs, metrics["val_weights_mean_iou"], colour, f"{row} W", "--")
    left.set(title="val mean IoU of the prediction P", xlabel="epoch", ylabel="mean IoU (%)")
    right.set(title="val mean IoU of P-hat and W against the mask", xlabel="epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line(ax, epochs: np.ndarray, runs: np.ndarray, colour: str, label: str,
          style: str) -> None:
    if np.isnan(runs).all():
        return
    runs = 100 * runs   # fractions -> percent, as the tables show them
    ax.plot(epochs, np.nanmean(runs, axis=0), style, color=colour, label=label)
    if len(runs) > 1:
        ax.fill_between(epochs, np.nanmin(runs, axis=0), np.nanmax(runs, axis=0),
                        color=colour, alpha=0.15)
