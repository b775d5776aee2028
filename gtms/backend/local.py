"""The backend of ``--no-ray``: the worker function runs in this process, splits are read and
preprocessed here. Checkpoints are kept exactly as Ray Train keeps them
(:mod:`gtms.backend.retention`), in the same ``<storage>/<name>/<checkpoint>`` folders.

A checkpoint is committed atomically: its files are copied into a hidden
``.<checkpoint>.partial`` folder, which is renamed into place once complete. A kill leaves at
most that partial folder; the next session of the run removes it with a warning. A checkpoint
folder that cannot be read (damaged: its checksum fails) is passed over with a warning, and the
run resumes from the latest good one."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gtms import console, killpoints
from gtms.backend import Backend, RunResult, Worker, WorkerFn, retention
from gtms.config import RayConfig
from gtms.errors import UserError

CHECKPOINT_PREFIX = "checkpoint_"   # Ray's name for the folders of a run's checkpoints
PARTIAL_SUFFIX = ".partial"         # a checkpoint being written: .<name>.partial
COPY_CHUNK = 1 << 20


class LocalWorker(Worker):
    """The one worker of a local run: reports are kept in memory, checkpoints copied into the
    run folder and thinned by :func:`retention.kept_epochs`."""

    def __init__(self, run_dir: Path, *, keep: int | None,
                 checkpoint_metrics: Callable[[Path], dict] | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = torch.get_num_threads()
        self.run_dir, self.keep = run_dir, keep
        self.metrics: dict[str, Any] = {}
        # Every checkpoint in the run folder (a resumed run's earlier ones too): name -> metrics
        self.checkpoints: dict[str, dict] = {}
        if checkpoint_metrics is not None and run_dir.is_dir():
            self.checkpoints = earlier_checkpoints(run_dir, checkpoint_metrics)

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints:
            return None
        name = max(self.checkpoints, key=lambda n: int(self.checkpoints[n]["epoch"]))
        return self.run_dir / name

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, *,
               checkpoint_name: str | None = None) -> None:
        self.metrics = dict(metrics)
        if checkpoint_dir is None:
            return
        name = checkpoint_name or f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
        commit_folder(Path(checkpoint_dir), self.run_dir / name, epoch=int(metrics["epoch"]))
        self.checkpoints[name] = retention.scored(metrics)
        if self.keep is None:
            return
        kept = retention.kept_epochs(list(self.checkpoints.values()), self.keep)
        for stale in [n for n, m in self.checkpoints.items() if int(m["epoch"]) not in kept]:
            shutil.rmtree(self.run_dir / stale)
            del self.checkpoints[stale]

    def result(self) -> RunResult:
        latest = self.latest_checkpoint()
        return RunResult(str(self.run_dir), self.metrics,
                         [(str(self.run_dir / n), m) for n, m in self.checkpoints.items()],
                         str(latest) if latest else None)


def earlier_checkpoints(run_dir: Path,
                        checkpoint_metrics: Callable[[Path], dict | None]) -> dict[str, dict]:
    """The checkpoints an earlier session of the run left, by folder name, with their metrics.
    Partial folders (a kill while committing) are removed; unreadable ones are passed over;
    both with a warning."""
    for partial in sorted(run_dir.glob(f".{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}")):
        console.say(f"warning: removing {partial.name}, a checkpoint whose writing was "
                    "interrupted (its epoch is rerun)", stream=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)
    found = {}
    for folder in sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()):
        try:
            metrics = checkpoint_metrics(folder)
        except UserError as err:
            console.say(f"warning: passing over checkpoint {folder.name}: {err}",
                        stream=sys.stderr)
            continue
        if metrics is not None:
            found[folder.name] = retention.scored(metrics)
    return found


def commit_folder(source: Path, target: Path, *, epoch: int) -> None:
    """Copy the files of ``source`` to the folder ``target`` atomically: into a partial
    folder first, renamed to ``target`` once every file is complete."""
    partial = target.parent / f".{target.name}{PARTIAL_SUFFIX}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        with file.open("rb") as src, (partial / file.name).open("wb") as dst:
            while block := src.read(COPY_CHUNK):
                dst.write(block)
                dst.flush()
                killpoints.reached("checkpoint_write", epoch)   # a torn file, for the tests
            os.fsync(dst.fileno())
    if target.exists():   # a checkpoint of this epoch that could not be read: replaced
        shutil.rmtree(target)
    os.replace(partial, target)


class LocalBackend(Backend):
    """Everything in this process, no Ray."""

    uses_ray = False

    def run(self, fn: WorkerFn, config: dict, *, storage: str, name: str, ray: RayConfig,
            keep: int | None = None, datasets: dict[str, Any] | None = None,
            checkpoint_metrics: Callable[[Path], dict] | None = None,
            callbacks: Sequence = (), workers: int | None = None) -> RunResult:
        if datasets:
            raise ValueError("Ray Datasets need the Ray backend")
        worker = LocalWorker(Path(storage) / name, keep=keep,
                             checkpoint_metrics=checkpoint_metrics)
        try:
            fn(config, worker)
        finally:
            worker.close()
        return worker.result()
