"""The backend of ``--no-ray``: the worker function runs in this process, splits are read and
preprocessed here. Checkpoints are kept exactly as Ray Train keeps them
(:mod:`gtms.backend.retention`), in the same ``<storage>/<name>/<checkpoint>`` folders."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gtms.backend import Backend, Batch, RunResult, Worker, WorkerFn, retention
from gtms.config import RayConfig
from gtms.data.pipeline import SampleSpec
from gtms.data.reading import preprocessed_samples, stacked_batches
from gtms.data.tokenizer import ClipTokenizer

CHECKPOINT_PREFIX = "checkpoint_"   # Ray's name for the folders of a run's checkpoints


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
            found = sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
            read = {p.name: checkpoint_metrics(p) for p in found}
            self.checkpoints = {n: retention.scored(m) for n, m in read.items() if m is not None}

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
        target = self.run_dir / name
        target.mkdir(parents=True, exist_ok=True)
        for file in Path(checkpoint_dir).iterdir():
            shutil.copyfile(file, target / file.name)
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


class LocalBackend(Backend):
    """Everything in this process, no Ray."""

    uses_ray = False

    def run(self, fn: WorkerFn, config: dict, *, storage: str, name: str, ray: RayConfig,
            keep: int | None = None, datasets: dict[str, Any] | None = None,
            checkpoint_metrics: Callable[[Path], dict] | None = None,
            callbacks: Sequence = ()) -> RunResult:
        if datasets:
            raise ValueError("Ray Datasets need the Ray backend")
        worker = LocalWorker(Path(storage) / name, keep=keep,
                             checkpoint_metrics=checkpoint_metrics)
        try:
            fn(config, worker)
        finally:
            worker.close()
        return worker.result()

    def batches(self, root: str, split: str, spec: SampleSpec, *, batch_size: int,
                strict: bool, limit: int, ray: RayConfig) -> Iterator[Batch]:
        samples = preprocessed_samples(root, split, spec, ClipTokenizer(), limit=limit,
                                       strict=strict)
        return stacked_batches(samples, spec, batch_size)

    def describe_streaming(self, ray: RayConfig) -> str:
        return "preprocessing it in this process"
