"""The Ray backend: worker functions on Ray Train's ``TorchTrainer`` (DDP over gloo or NCCL),
splits streamed through Ray Data's preprocessing actors. Ray is started or joined on first use
(:func:`gtms.runtime.init_ray`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gtms import console
from gtms.backend import Backend, RunResult, Worker, WorkerFn, retention
from gtms.config import RayConfig
from gtms.storage import join as storage_join


def quiet_ray_train_worker() -> None:
    """A Ray Train worker's console: no Ray Data progress bars, no DDP stride note, and no
    INFO line per report and checkpoint (:func:`quiet_ray_train_reports`)."""
    import warnings

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # DDP's note that a 1x1 conv's gradient is not laid out like its bucket: harmless here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    quiet_ray_train_reports()


def quiet_ray_train_reports() -> None:
    """Silence the two INFO lines Ray Train (2.60) logs on every worker at every report:
    "Reporting training result N: ..." and "Checkpoint successfully created at ...". They
    bury the loop's one progress line per epoch; warnings and errors still show.

    This names two loggers of Ray's private ``ray.train.v2._internal`` modules, because the
    public switch does not reach them: ``RunConfig(logging_config=ray.train.LoggingConfig(
    log_level="WARNING"))`` filters only records of loggers named ``ray.train.*``, while the
    module that logs the reports names its logger by its file path (``getLogger(__file__)``),
    so its records reach the console through the root logger; that switch would also hide the
    controller's "Requesting resources" lines that tell a user why a run waits on a cluster.
    If a Ray upgrade renames these modules nothing breaks: the two lines come back per epoch.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    try:
        import ray.train.v2._internal.execution.context as reports
    except ImportError:
        return
    logging.getLogger(reports.__file__).setLevel(logging.WARNING)



class RayWorker(Worker):
    """Inside a Ray Train worker: its Dataset shards, ``ray.train.report``, DDP."""

    uses_ray = True

    def __init__(self, threads: int):
        import ray.train
        from ray.train.torch import get_device

        quiet_ray_train_worker()
        console.forward_to_driver()
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = get_device()
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory()

    def prepare_model(self, model):
        from ray.train.torch import prepare_model

        return prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(tempfile.mkdtemp(dir=self._tmp.name)))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, *,
               checkpoint_name: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Ray keeps checkpoints by retention.ray_checkpoint_config (the trainer's RunConfig).
        ray.train.report(retention.scored(metrics), checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_name)

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def describe(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {**super().describe(), "rank": self.rank, "world_size": self.world_size,
                "resources": context.get_assigned_resources(), "node": context.get_node_id()}

    def close(self) -> None:
        self._tmp.cleanup()


def _ray_worker_entry(loop_config: dict) -> None:
    """A Ray Train worker: the worker function under a :class:`RayWorker`. Nothing is
    returned (Ray refuses tensors as a train function's result): workers report."""
    worker = RayWorker(loop_config["threads"])
    try:
        loop_config["fn"](loop_config["config"], worker)
    finally:
        worker.close()


class RayBackend(Backend):
    """Ray Train workers and Ray Data actors, on the cluster at ``address`` (default:
    ``ray.address``, ``$RAY_ADDRESS``, else a local one sized for the run)."""

    uses_ray = True

    def __init__(self, address: str | None = None):
        self.address = address

    def start(self, ray: RayConfig, *, concurrent_trials: int = 1,
              trial_cpus: float = 0.0) -> None:
        from gtms.runtime import init_ray

        init_ray(ray, cli_address=self.address, concurrent_trials=concurrent_trials,
                 trial_cpus=trial_cpus)

    def workers(self, ray: RayConfig) -> int:
        return max(ray.num_workers, 1)

    def run(self, fn: WorkerFn, config: dict, *, storage: str, name: str, ray: RayConfig,
            keep: int | None = None, datasets: dict[str, Any] | None = None,
            checkpoint_metrics: Callable[[Path], dict] | None = None,
            callbacks: Sequence = (), workers: int | None = None) -> RunResult:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        from gtms.data.pipeline import per_worker_data_config

        self.start(ray)
        trainer = TorchTrainer(
            _ray_worker_entry,
            train_loop_config={"fn": fn, "config": config,
                               "threads": max(1, int(ray.cpus_per_worker))},
            scaling_config=self._scaling(ray, workers or self.workers(ray)),
            run_config=RunConfig(
                name=name, storage_path=storage,
                checkpoint_config=retention.ray_checkpoint_config(keep) if keep
                else CheckpointConfig(),
                failure_config=FailureConfig(max_failures=ray.max_failures),
                callbacks=list(callbacks)),
            datasets=datasets or None,
            dataset_config=per_worker_data_config() if datasets else None)
        result = trainer.fit()
        run_dir = storage_join(storage, name)

        def location(checkpoint):  # Ray's paths drop the URI scheme; keep it for users
            return storage_join(run_dir, Path(checkpoint.path).name) if checkpoint else None

        kept = [(location(c), m) for c, m in result.best_checkpoints]
        latest = location(result.checkpoint)
        if latest and latest not in {where for where, _ in kept}:
            # Ray keeps the latest beside the N best but lists only the best: the last report
            # is the one that carried it
            kept.append((latest, dict(result.metrics or {})))
        return RunResult(run_dir, dict(result.metrics or {}), kept, latest)

    def _scaling(self, ray: RayConfig, workers: int):
        from ray.train import ScalingConfig

        from gtms.runtime import use_gpu

        gpu = use_gpu(ray)
        resources = {"CPU": ray.cpus_per_worker}
        if gpu:
            resources["GPU"] = ray.gpus_per_worker
        return ScalingConfig(num_workers=workers, use_gpu=gpu,
                             resources_per_worker=resources)
