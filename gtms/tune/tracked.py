"""An ablation's or a sweep's runs in MLflow / W&B (``train.trackers``): a parent run for the
experiment, one run per trial below it (:mod:`gtms.tracking`).

The parent (:func:`parent_run`) is opened, or on ``--resume`` continued, on the driver before
the trials start; each trial's labels carry its id, so MLflow nests the trial runs under it and
W&B groups them. When the report is written, its files become the parent's artefacts and the
parent ends.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class Parent:
    """The parent run of an ablation or sweep, as its trials need it.

    ``cfg``: the config for the trials (MLflow's store resolved to ``<out>/mlflow.db``, one
    store for the parent and every trial). ``spec``: what a trial needs of the parent
    (:func:`trial_labels`; ``env``: the driver's tracker settings for a Tune trial's process,
    :func:`apply_environment`), None without a tracking library."""

    cfg: Config
    out_dir: str
    run: TrackedRun | None = None
    spec: dict | None = None

    def finish(self, files: list[str], notes: dict[str, Any] | None = None) -> None:
        """The experiment's result ``files`` (in ``out_dir``, a folder or bucket) and
        ``notes`` on the parent run, which then ends."""
        if self.run is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name in files:
                path = storage.join(self.out_dir, name)
                if not storage.exists(path):
                    continue
                local = Path(tmp) / name if storage.is_uri(path) else Path(path)
                if storage.is_uri(path):
                    local.write_bytes(storage.read_bytes(path))
                self.run.artifact(local)
            for key, value in (notes or {}).items():
                self.run.note(key, str(value))
            self.run.close()


@contextmanager
def parent_run(cfg: Config, out_dir: str, kind: str) -> Iterator[Parent]:
    """Check the trackers and open the parent run of an ablation or sweep (``kind``) for the
    block, which calls :meth:`Parent.finish` when its report is written; an exception out of
    the block ends the parent as failed."""
    check_trackers(cfg)
    cfg = with_tracking_uri(cfg, out_dir)
    name = f"{kind} {folder_name(out_dir)}"
    run = start_tracking(cfg, out_dir, Labels(name=name, group=name, kind=kind))
    spec = None if run is None else {
        "group": name, "env": forwarded_environment(),
        "parent": {k: v for k, v in run.ids.items() if k == "mlflow"}}
    try:
        yield Parent(cfg, out_dir, run, spec)
    except BaseException:
        if run is not None:
            run.close(failed=True)
        raise


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
