"""The ablation table: rows (Table 2 modes) x splits, mean ± std over seeds, beside the paper."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

# Table 2 of the paper (R50, RefCOCO, mean IoU %): val, testA, testB.
PAPER_TABLE2 = {
    "mask-bce": {"val": 69.52, "testA": 72.72, "testB": 64.70},
    "box-bce": {"val": 46.11, "testA": 45.70, "testB": 47.09},
    "box-lloc": {"val": 58.62, "testA": 61.17, "testB": 55.53},
    "tree": {"val": 61.72, "testA": 65.14, "testB": 57.94},
    "forest-gradcam": {"val": 64.33, "testA": 67.59, "testB": 60.39},
}


def collect(trials: list[dict[str, Any]], rows: list[str], splits: list[str]) -> dict:
    """Trial results (``mode``, ``seed``, ``metrics``) -> {row: {split: {metric: [per seed]}}}."""
    table: dict = {row: {split: {"mean_iou": [], "overall_iou": [], "seeds": []}
                         for split in splits} for row in rows}
    for trial in sorted(trials, key=lambda t: (t["mode"], t["seed"])):
        for split in splits:
            cell = table[trial["mode"]][split]
            cell["mean_iou"].append(trial["metrics"][f"{split}_mean_iou"])
            cell["overall_iou"].append(trial["metrics"][f"{split}_overall_iou"])
            cell["seeds"].append(trial["seed"])
    return table


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    pct = 100 * np.asarray(values)
    return f"{pct.mean():.2f}" + (f" ± {pct.std(ddof=1):.2f}" if len(values) > 1 else "")


def markdown(table: dict, splits: list[str], *, dataset: str, title: str) -> str:
    """Paper-style table: one row per mode, mean IoU and overall IoU per split (%)."""
    with_paper = dataset == "refcoco"
    header = ["row"]
    for split in splits:
        header += [f"{split} mIoU", f"{split} oIoU"] + ([f"{split} paper"] if with_paper else [])
    lines = [f"# {title}", "",
             "mIoU = mean of per-sentence IoU (what the paper reports), oIoU = overall IoU "
             "(total intersection / total union), in %, mean ± std over seeds"
             + ("; 'paper' = Table 2 (R50, RefCOCO, mIoU)." if with_paper else "."), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, cells in table.items():
        out = [row]
        for split in splits:
            out += [_fmt(cells[split]["mean_iou"]), _fmt(cells[split]["overall_iou"])]
            if with_paper:
                paper = PAPER_TABLE2.get(row, {}).get(split)
                out.append("—" if paper is None else f"{paper:.2f}")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out_dir: Path, table: dict, splits: list[str], *, dataset: str, title: str,
                 extra: dict[str, Any]) -> str:
    """Write ablation.md / .csv / .json into ``out_dir``; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(table, splits, dataset=dataset, title=title)
    (out_dir / "ablation.md").write_text(text)
    with (out_dir / "ablation.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "split", "seed", "mean_iou", "overall_iou"])
        for row, cells in table.items():
            for split in splits:
                cell = cells[split]
                for seed, miou, oiou in zip(cell["seeds"], cell["mean_iou"],
                                            cell["overall_iou"]):
                    writer.writerow([row, split, seed, f"{miou:.6f}", f"{oiou:.6f}"])
    summary = {row: {split: {"mean_iou_mean": float(np.mean(c["mean_iou"])) if c["mean_iou"]
                             else None,
                             "mean_iou_std": float(np.std(c["mean_iou"], ddof=1))
                             if len(c["mean_iou"]) > 1 else 0.0,
                             "overall_iou_mean": float(np.mean(c["overall_iou"]))
                             if c["overall_iou"] else None,
                             **c}
                     for split, c in cells.items()} for row, cells in table.items()}
    payload = {"title": title, "dataset": dataset, "splits": splits, "rows": summary,
               "paper_table2_refcoco_r50": PAPER_TABLE2 if dataset == "refcoco" else None,
               **extra}
    (out_dir / "ablation.json").write_text(json.dumps(payload, indent=2))
    return text
