"""Where work runs: in this process (``--no-ray``) or on Ray. One small interface for both.

:meth:`Backend.run` runs a *worker function* ``fn(config, worker)`` on the workers (one in
this process; ``ray.num_workers`` Ray Train workers under DDP, or as many as asked) and
collects what the workers report: per-epoch metrics and checkpoint folders, kept by
:mod:`gtms.backend.retention` in ``<storage>/<name>/``. Training, SynthCLIP pretraining and
evaluation are worker functions: on Ray each runs where a training worker would, with its
resources (its GPU on a cluster), and reads the Ray Datasets it is given (preprocessed by Ray
Data's actors); in this process it reads and preprocesses its data itself.

A worker function sees only a :class:`Worker`: its rank, the device, DDP wrapping, the Ray
Dataset shards (when on Ray), the checkpoint to resume from, ``report`` and ``gather``.
The ablation's trials (:mod:`gtms.tune.trial`) take a backend and hand it to training and
evaluation; Ray Tune's own scheduling of trials stays Tune's.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtms.config import RayConfig
from gtms.errors import UserError

WorkerFn = Callable[[dict, "Worker"], Any]


class Worker(ABC):
    """What a worker function sees of where it runs."""

    rank: int = 0
    world_size: int = 1
    uses_ray: bool = False
    device: Any = None
    threads: int = 1          # CPU threads this worker may use

    def prepare_model(self, model):
        """The model as this worker trains it (DDP-wrapped on several Ray workers)."""
        return model

    def dataset_shard(self, name: str):
        """This worker's shard of the Ray Dataset ``name`` given to :meth:`Backend.run`."""
        raise KeyError(f"no dataset {name!r}: datasets exist on Ray only")

    @abstractmethod
    def latest_checkpoint(self) -> Path | None:
        """A local folder holding the last checkpoint reported (by an earlier session of the
        same run: a resume), or None."""

    @abstractmethod
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, *,
               checkpoint_name: str | None = None) -> None:
        """Report one epoch's ``metrics`` (with its ``epoch``), and from rank 0 a checkpoint
        folder, stored as ``<run>/<checkpoint_name>``. Every worker reports every epoch."""

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every worker, by rank."""
        return [obj]

    def describe(self) -> dict[str, Any]:
        """Where this worker runs, for reports: backend, device, process (and on Ray its rank
        and the resources it holds)."""
        return {"backend": "ray" if self.uses_ray else "local", "device": str(self.device),
                "pid": os.getpid()}

    def close(self) -> None:
        """Release what the worker holds (temporary copies of restored checkpoints); a local
        worker holds nothing."""
        return None


@dataclass(frozen=True)
class RunResult:
    """What :meth:`Backend.run` collected."""

    run_dir: str                                 # <storage>/<name>, a folder or a URI
    metrics: dict[str, Any]                      # the last report
    checkpoints: list[tuple[str, dict[str, Any]]]   # kept checkpoints: (location, metrics)
    latest: str | None                           # the last checkpoint's location


class Backend(ABC):
    """Runs worker functions and streams splits, in this process or on Ray."""

    uses_ray: bool = False

    def start(self, ray: RayConfig, *, concurrent_trials: int = 1,
              trial_cpus: float = 0.0) -> None:
        """Get ready to run (start or join Ray); calling it again is harmless. Nothing to do
        without Ray."""
        return None

    def workers(self, ray: RayConfig) -> int:
        """How many workers :meth:`run` starts."""
        return 1

    @abstractmethod
    def run(self, fn: WorkerFn, config: dict, *, storage: str, name: str, ray: RayConfig,
            keep: int | None = None, datasets: dict[str, Any] | None = None,
            checkpoint_metrics: Callable[[Path], dict] | None = None,
            callbacks: Sequence = (), workers: int | None = None) -> RunResult:
        """Run ``fn(config, worker)`` on every worker (``workers``, default
        :meth:`workers`); checkpoints go to ``<storage>/<name>/``, ``keep`` of them are kept
        (:mod:`gtms.backend.retention`; all when None). ``datasets``: Ray Datasets the workers
        read their shards of (Ray only).
        ``checkpoint_metrics``: reads the metrics of a checkpoint folder an earlier session
        left, None for a folder that holds no checkpoint (a resumed local run ranks them with
        the new ones). ``callbacks``: Ray Train
        callbacks (Tune's report forwarding)."""


# The two backends (defined on top of the interface above).
from gtms.backend.local import LocalBackend  # noqa: E402
from gtms.backend.ray import RayBackend  # noqa: E402


def backend_for(*, no_ray: bool, address: str | None = None) -> Backend:
    """The backend the ``--no-ray`` / ``--address`` flags ask for."""
    if no_ray:
        if address:
            raise UserError("--no-ray runs in this process: it takes no --address")
        return LocalBackend()
    return RayBackend(address)
