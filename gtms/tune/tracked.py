"""An ablation's or a sweep's runs in MLflow / W&B (``train.trackers``): a parent run for the
experiment, one run per trial below it (:mod:`gtms.tracking`).

The parent is opened (or, on ``--resume``, continued) on the driver before the trials start;
each trial's labels carry its id, so MLflow nests the trial runs under it and W&B groups them.
When the report is written, its files become the parent's artefacts and the parent ends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from gtms import storage
from gtms.config import Config
from gtms.tracking import (
    Labels,
    TrackedRun,
    check_trackers,
    folder_name,
    forwarded_environment,
    start_tracking,
    with_tracking_uri,
)
from gtms.tune.tuner import format_value


def start_parent(cfg: Config, out_dir: str, kind: str) -> tuple[Config, TrackedRun | None,
                                                                  dict | None]:
    """Check the trackers, resolve MLflow's store to ``<out>/mlflow.db`` (one store for the
    parent and every trial) and open the parent run of an ablation or sweep. Returns the
    config for the trials, the parent (None without a tracking library) and what a trial needs
    of it (:func:`trial_labels`; ``env``: the driver's tracker settings, for a Tune trial's
    process, :func:`apply_environment`)."""
    check_trackers(cfg)
    cfg = with_tracking_uri(cfg, out_dir)
    name = f"{kind} {folder_name(out_dir)}"
    parent = start_tracking(cfg, out_dir, Labels(name=name, group=name, kind=kind))
    if parent is None:
        return cfg, None, None
    return cfg, parent, {"group": name, "env": forwarded_environment(),
                         "parent": {k: v for k, v in parent.ids.items() if k == "mlflow"}}


def trial_labels(name: str, params: dict[str, Any], parent: dict | None) -> Labels:
    """A trial's tracker run: named like its folder, tagged with its row and seed (an
    ablation) and every swept value, below the experiment's parent run."""
    tags = {key: format_value(value) for key, value in params.items()}
    if "loss.mode" in params:
        tags["row"] = str(params["loss.mode"])
    if "train.seed" in params:
        tags["seed"] = str(params["train.seed"])
    parent = parent or {}
    return Labels(name=name, tags=tags, group=parent.get("group", ""),
                  parent=dict(parent.get("parent") or {}), kind="trial")


def apply_environment(parent: dict | None) -> None:
    """The driver's tracker settings (``WANDB_MODE``, ...) in this trial's process: a Ray Tune
    trial runs in a process of a Ray started earlier, without them."""
    os.environ.update((parent or {}).get("env") or {})


def finish_parent(parent: TrackedRun | None, out_dir: str, files: list[str],
                  notes: dict[str, Any] | None = None) -> None:
    """The experiment's result ``files`` (in ``out_dir``, a folder or bucket) and ``notes`` on
    the parent run, which then ends."""
    if parent is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            path = storage.join(out_dir, name)
            if not storage.exists(path):
                continue
            local = Path(path) if not storage.is_uri(path) else Path(tmp) / name
            if storage.is_uri(path):
                local.write_bytes(storage.read_bytes(path))
            parent.artifact(local)
        for key, value in (notes or {}).items():
            parent.note(key, str(value))
        parent.close()
