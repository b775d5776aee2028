"""What the trackers add to an epoch: the time to log one epoch's metrics line to MLflow (SQLite)
and W&B (offline), against writing it to ``metrics.jsonl`` and TensorBoard as every run does.

    python -m benchmarks.tracking_overhead [--epochs 30] [--keys 40]

Runs in a temporary folder; prints ms per epoch for each tracker, the one-off cost of opening
and closing its run, and the ratio to the metrics.jsonl + TensorBoard write of the same line.
Needs ``pip install -r requirements-tracking.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from gtms.config import load_config
from gtms.tracking import Labels, TrackedRun


def metrics_line(epoch: int, keys: int) -> dict:
    """A metrics.jsonl line of ``keys`` numbers (a GTMS epoch has ~40)."""
    return {"epoch": epoch, "step": 10 * epoch,
            **{f"val_metric_{i}": 1.0 / (epoch + i + 1) for i in range(keys - 2)}}


def baseline(folder: Path, epochs: int, keys: int) -> float:
    """ms per epoch: the metrics.jsonl line and TensorBoard scalars (what RunLogger always does)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tb"))
    start = time.perf_counter()
    with (folder / "metrics.jsonl").open("a") as f:
        for epoch in range(1, epochs + 1):
            line = metrics_line(epoch, keys)
            for key, value in line.items():
                writer.add_scalar(key, value, line["step"])
            writer.flush()
            f.write(json.dumps(line) + "\n")
            f.flush()
    writer.close()
    return (time.perf_counter() - start) * 1e3 / epochs


def tracker(name: str, folder: Path, epochs: int, keys: int) -> tuple[float, float]:
    """(ms per epoch, ms to open and close) for one tracker."""
    cfg = load_config(None, [f"train.trackers=[{name}]",
                             f"train.tracking_uri=sqlite:///{folder / 'mlflow.db'}"])
    start = time.perf_counter()
    run = TrackedRun(cfg, str(folder / name), Labels(name=name))
    opened = time.perf_counter() - start
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        run.metrics(metrics_line(epoch, keys))
    per_epoch = (time.perf_counter() - start) * 1e3 / epochs
    start = time.perf_counter()
    run.close()
    return per_epoch, (opened + time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--keys", type=int, default=40, help="numbers per metrics line")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reference = baseline(folder, args.epochs, args.keys)
        print(f"metrics.jsonl + TensorBoard: {reference:.2f} ms per epoch "
              f"({args.keys} numbers, {args.epochs} epochs)")
        for name in ("mlflow", "wandb"):
            per_epoch, fixed = tracker(name, folder, args.epochs, args.keys)
            print(f"{name:<7} {per_epoch:8.2f} ms per epoch ({per_epoch / reference:.1f}x the "
                  f"reference); opening + closing its run {fixed:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
