"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases (``train.trackers``).

A training run is one tracker run. Rank 0 opens it when training starts (the resolved config as
parameters, ``config.yaml`` as an artefact), logs every ``metrics.jsonl`` value of an epoch once
that epoch's checkpoint is committed (so an epoch rerun after a crash is logged once), and the
driver closes it after training with ``summary.json``, the best checkpoint's path and, with
``train.track_checkpoints``, its weights. The ids live in ``<run>/tracking.json``: a resumed run
(``--resume``, or an ablation trial picked up again) continues the same tracker runs.

An ablation or a sweep is a parent run (its report and plot as artefacts) with one run per
trial, tagged with the trial's row, seed and swept values: MLflow nests them
(``mlflow.parentRunId``), W&B groups them (``group`` = the parent's name).

Both libraries are optional (``requirements-tracking.txt``); :func:`check_trackers` stops a
command that asks for a missing one before anything runs. Both are driven through their own
client APIs, so the same code runs in this process (``--no-ray``) and on a Ray Train worker.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtms import storage
from gtms.config import Config, config_to_dict, replace
from gtms.errors import UserError

# What each optional tracker imports (MLflow's SQLite store needs SQLAlchemy and Alembic).
MODULES = {"mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",)}
INSTALL = "pip install -r requirements-tracking.txt"
IDS_FILE = "tracking.json"
# Environment a Ray worker needs to reach the same tracker as the driver (W&B's mode, project,
# entity; MLflow's server). Secrets are not forwarded: Ray workers on this machine read the
# login files (~/.netrc); on a cluster, set them in the job's runtime_env.
FORWARDED_PREFIXES = ("WANDB_", "MLFLOW_")
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET")
MAX_PARAM_CHARS = 500


class TrackingError(UserError):
    """A tracker that cannot be used: not installed, or nowhere to write."""


def library_trackers(cfg: Config) -> list[str]:
    """The trackers of ``train.trackers`` that are libraries of their own (not TensorBoard)."""
    return [name for name in cfg.train.trackers if name in MODULES]


def check_trackers(cfg: Config) -> None:
    """Stop with the install command when ``train.trackers`` names a library that is not
    installed (before any run folder is made)."""
    for name in library_trackers(cfg):
        for module in MODULES[name]:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise TrackingError(
                    f"train.trackers has '{name}', but the Python package '{module}' is not "
                    f"installed ({error}); install the trackers with: {INSTALL}") from None


def with_tracking_uri(cfg: Config, folder: str) -> Config:
    """``cfg`` with ``train.tracking_uri`` resolved for MLflow (so every worker and trial writes
    to the same store): as given, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
    ``<folder>/mlflow.db``, where ``folder`` is where the runs are (a local folder)."""
    if "mlflow" not in cfg.train.trackers or cfg.train.tracking_uri:
        return cfg
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        if storage.is_uri(folder):
            raise TrackingError(
                f"train.trackers has 'mlflow' and the runs go to {folder}: set "
                "train.tracking_uri (an MLflow server, e.g. http://mlflow-host:5000) or "
                "MLFLOW_TRACKING_URI; a SQLite file cannot live in a bucket")
        uri = "sqlite:///" + str(Path(storage.absolute(folder)) / "mlflow.db")
    return replace(cfg, train={"tracking_uri": uri})


def forwarded_environment() -> dict[str, str]:
    """The tracker settings of this process's environment, for a Ray worker to apply."""
    return {key: value for key, value in os.environ.items()
            if key.startswith(FORWARDED_PREFIXES)
            and not any(word in key for word in SECRET_WORDS)}


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """A nested config dict as ``{"section.key": text}`` (long values shortened)."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            flat[f"{section}.{key}"] = text[:MAX_PARAM_CHARS]
    return flat


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` line (booleans as 0/1; NaN, which neither tracker
    takes, left out)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and value == value}


@dataclass
class Labels:
    """What a tracker run is called and tagged with, and the run it belongs to."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)
    group: str = ""                                   # W&B group: the parent's name
    parent: dict[str, str] = field(default_factory=dict)   # {"mlflow": parent run id}
    kind: str = "train"                               # W&B job type

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tags": dict(self.tags), "group": self.group,
                "parent": dict(self.parent), "kind": self.kind}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, name: str) -> Labels:
        values = dict(values or {})
        values.setdefault("name", name)
        return cls(**values)


class Tracker(ABC):
    """One run in one tracking library, started by the constructor or continued from its
    ``run_id`` (:func:`open_tracker`)."""

    name = ""
    run_id = ""

    @abstractmethod
    def params(self, values: dict[str, str], nested: dict[str, Any]) -> None:
        """The resolved config: ``values`` flat (``section.key``), ``nested`` as sections."""

    @abstractmethod
    def metrics(self, values: dict[str, float], step: int) -> None:
        """One epoch's numbers at optimizer step ``step``."""

    @abstractmethod
    def artifact(self, path: Path) -> None:
        """A file kept with the run."""

    @abstractmethod
    def note(self, key: str, value: str) -> None:
        """A text value of the run as a whole (MLflow tag, W&B summary)."""

    @abstractmethod
    def close(self, *, failed: bool = False, final: bool = True) -> None:
        """End this session of the run; ``final`` False leaves it open for the driver."""


class MLflowTracker(Tracker):
    """An MLflow run, through ``MlflowClient`` (no global active run)."""

    name = "mlflow"

    def __init__(self, cfg: Config, labels: Labels, run_id: str | None):
        from mlflow import MlflowClient

        quiet_mlflow()
        self.client = MlflowClient(tracking_uri=cfg.train.tracking_uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self._experiment(cfg)
        tags = {**labels.tags, "gtms.kind": labels.kind}
        if labels.parent.get("mlflow"):
            tags["mlflow.parentRunId"] = labels.parent["mlflow"]
        self.run_id = self.client.create_run(experiment, run_name=labels.name,
                                             tags=tags).info.run_id

    def _experiment(self, cfg: Config) -> str:
        """The id of ``train.tracking_project``'s experiment, made if new (its artefacts beside
        a SQLite store's file)."""
        name = cfg.train.tracking_project
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        uri = cfg.train.tracking_uri
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def params(self, values: dict[str, str], nested: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in values.items()]
        for start in range(0, len(items), 100):   # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(mlflow_name(key), value, stamp, step) for key, value in values.items()])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def note(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def close(self, *, failed: bool = False, final: bool = True) -> None:
        if final or failed:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts: ``val_prec@0.5`` -> ``val_prec_at_0.5`` (no ``@``)."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def quiet_mlflow() -> None:
    """MLflow's store setup logs every database migration at INFO: keep the console readable."""
    import logging

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


class WandbTracker(Tracker):
    """A Weights & Biases run (``wandb.init``; ``WANDB_MODE=offline`` keeps it on disk under
    ``<run>/wandb/``, for ``wandb sync`` later)."""

    name = "wandb"

    def __init__(self, cfg: Config, labels: Labels, run_id: str | None, folder: Path):
        import wandb

        self.run = wandb.init(
            project=cfg.train.tracking_project, name=labels.name,
            id=run_id or uuid.uuid4().hex[:12], resume="allow", dir=str(folder),
            group=labels.group or None, job_type=labels.kind,
            tags=[f"{k}={v}"[:64] for k, v in labels.tags.items()] or None,
            reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        self.run_id = self.run.id

    def params(self, values: dict[str, str], nested: dict[str, Any]) -> None:
        self.run.config.update(nested, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifact(self, path: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.id}-{path.name}".replace("/", "-"),
                                  type="run-file")
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def note(self, key: str, value: str) -> None:
        self.run.summary[key] = value

    def close(self, *, failed: bool = False, final: bool = True) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(name: str, cfg: Config, labels: Labels, run_id: str | None,
                 folder: Path) -> Tracker:
    if name == "mlflow":
        return MLflowTracker(cfg, labels, run_id)
    return WandbTracker(cfg, labels, run_id, folder)


class TrackedRun:
    """The tracker runs of one folder (a training run, or an ablation's or sweep's parent):
    started, or continued from the ids in ``<folder>/tracking.json``. A new run gets the
    resolved config as parameters. A tracker that fails while logging is reported once and
    dropped: the training goes on."""

    def __init__(self, cfg: Config, run_dir: str, labels: Labels):
        self.folder = storage.RunFolder(run_dir, fetch=True)
        ids_file = self.folder.path / IDS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        self.trackers: list[Tracker] = []
        try:
            for name in library_trackers(cfg):
                self.trackers.append(open_tracker(name, cfg, labels, ids.get(name),
                                                  self.folder.path))
        except BaseException:
            self.close(failed=True)   # the ones already open are not left running
            raise
        new = [tracker for tracker in self.trackers if tracker.name not in ids]
        ids.update(self.ids)
        ids_file.write_text(json.dumps(ids, indent=2) + "\n")
        self.folder.sync()
        nested = config_to_dict(cfg)
        config_file = self.folder.path / "config.yaml"
        for tracker in new:
            self._call(tracker, "params", flat_params(nested), nested)
            if config_file.is_file() and tracker in self.trackers:
                self._call(tracker, "artifact", config_file)

    @property
    def ids(self) -> dict[str, str]:
        return {tracker.name: tracker.run_id for tracker in self.trackers}

    def metrics(self, metrics: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` line, at its optimizer step (TensorBoard's x axis)."""
        values = numeric(metrics)
        for tracker in list(self.trackers):
            self._call(tracker, "metrics", values, int(metrics.get("step", 0)))

    def artifact(self, path: Path) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "artifact", Path(path))

    def note(self, key: str, value: str) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "note", key, value)

    def close(self, *, failed: bool = False, final: bool = True) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "close", failed=failed, final=final)
        self.folder.sync()

    def _call(self, tracker: Tracker, method: str, *args, **kwargs) -> None:
        try:
            getattr(tracker, method)(*args, **kwargs)
        except Exception as error:   # a tracker's server or disk: not a reason to stop training
            import sys

            from gtms.console import say

            say(f"warning: {tracker.name}: {method} failed ({type(error).__name__}: {error}); "
                f"the run goes on without {tracker.name}", stream=sys.stderr)
            self.trackers.remove(tracker)


def folder_name(run_dir: str) -> str:
    """The last part of a run folder's path or URI: the tracker run's name."""
    return str(run_dir).rstrip("/").rsplit("/", 1)[-1]


def start_tracking(cfg: Config, run_dir: str, labels: Labels | None) -> TrackedRun | None:
    """The tracker runs of ``run_dir`` (None when ``train.trackers`` has no library)."""
    if not library_trackers(cfg):
        return None
    return TrackedRun(cfg, run_dir, labels or Labels(name=folder_name(run_dir)))


def finish_tracking(cfg: Config, run_dir: str, summary: dict[str, Any]) -> None:
    """After training (driver): ``summary.json``, the best checkpoint's path and, with
    ``train.track_checkpoints``, its weights on the run's tracker runs, which then end."""
    if not library_trackers(cfg):
        return
    import tempfile

    run = TrackedRun(cfg, run_dir, Labels(name=folder_name(run_dir)))
    run.artifact(run.folder.path / "summary.json")
    best = str(summary.get("best_checkpoint") or "")
    if best:
        run.note("best_checkpoint", best)
    if best and cfg.train.track_checkpoints:
        with tempfile.TemporaryDirectory(prefix="gtms-tracked-") as tmp:
            for path in checkpoint_files(best, Path(tmp)):
                run.artifact(path)
    run.close()


def checkpoint_files(checkpoint: str, scratch: Path) -> list[Path]:
    """The best checkpoint's weights and their checksum as local files (copied into
    ``scratch`` from a bucket)."""
    from gtms.model.checkpoint import FILENAME

    names = [FILENAME, FILENAME + ".sha256"]
    if not storage.is_uri(checkpoint):
        return [Path(checkpoint) / name for name in names if (Path(checkpoint) / name).is_file()]
    for name in names:
        (scratch / name).write_bytes(storage.read_bytes(storage.join(checkpoint, name)))
    return [scratch / name for name in names]


def where_to_look(cfg: Config, run_dir: str) -> dict[str, str]:
    """For each tracker of ``train.trackers``: where the run is and the command that shows it."""
    look = {}
    if "tensorboard" in cfg.train.trackers:
        look["TensorBoard"] = shlex.join(["tensorboard", "--logdir", storage.join(run_dir, "tb")])
    ids_path = storage.join(run_dir, IDS_FILE)
    ids = json.loads(storage.read_bytes(ids_path)) if storage.exists(ids_path) else {}
    if ids.get("mlflow"):
        look["MLflow"] = (f"run {ids['mlflow']} of experiment {cfg.train.tracking_project}: "
                          + shlex.join(["mlflow", "ui", "--backend-store-uri",
                                        cfg.train.tracking_uri]))
    if ids.get("wandb"):
        offline = os.environ.get("WANDB_MODE", "") in ("offline", "dryrun")
        files = f"{storage.join(run_dir, 'wandb')}/offline-run-*-{ids['wandb']}"
        look["W&B"] = (f"run {ids['wandb']} of project {cfg.train.tracking_project}"
                       if not offline else
                       f"offline run {ids['wandb']}: wandb sync {files}"
                       if not storage.is_uri(run_dir) else
                       f"offline run {ids['wandb']} in {files}: copy it here, then wandb sync")
    return look
