"""Starting or joining Ray, and the one place where local resources are planned.

Ray on a 2-core machine deadlocks easily: trainer workers take whole CPUs,
the preprocessing actors take theirs, and Ray Data's read tasks then wait forever for a CPU.
:func:`local_num_cpus` sizes a local cluster so that every consumer fits at once (logical
oversubscription: Ray's CPU counts are for scheduling, the OS shares the real cores). On a real
cluster (``RAY_ADDRESS`` / ``--address``) nothing is resized: the same config scales up unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from gtms import console
from gtms.config import RayConfig
from gtms.errors import UserError

# A local cluster's processes (Ray's settings, read from the environment of the processes that
# ray.init starts; setdefault, so a user's own setting wins). Measured with
# benchmarks/footprint.py on the laptop run, each Ray worker process holds ~115-130 MB of PSS:
# * by default Ray prestarts a worker per logical CPU for the first driver and keeps up to that
#   many idle ones (two "ray::IDLE" through the whole run). Here none is prestarted and an idle
#   one exits after Ray's idle time (1 s); the cost is a worker start (~1 s) for a task that
#   finds none idle, rare once the splits are kept in memory;
# * Ray Train's PreemptionWatcher actor watches for cloud nodes being preempted, which a local
#   cluster has none of.
LOCAL_RAY_SETTINGS = {
    "RAY_prestart_worker_first_driver": "0",
    "RAY_num_workers_soft_limit": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# This process's Ray settings (setdefault: a user's own setting wins): no token authentication
# (RAY_AUTH_MODE=token joins a cluster that uses it), Ray Train's print patch off (our console
# marks its own lines), a fast health check.
DRIVER_RAY_SETTINGS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}

# Logical CPUs held back for Ray Data's read tasks and the driver-side split coordinator.
READ_TASK_CPUS = 1


@dataclass(frozen=True)
class CpuPlan:
    """CPU cores that each GPU worker needs beside it.

    Attributes:
        trainer: the Train worker's own CPUs (``ray.cpus_per_worker``): its loop, the pseudo-label
            work of the step (tree filter, W), and Ray Data's iterator that formats and prefetches
            its batches.
        actors_min: preprocessing actors per GPU at the start (``ray.preprocess_actors`` =
            ``actors_min * num_workers``), one CPU each (``ray.actor_cpus``).
        actors_max: the autoscaling pool's ceiling per GPU (``ray.preprocess_actors_max``).
    """

    trainer: int
    actors_min: int
    actors_max: int

    def ray_settings(self, num_workers: int) -> dict[str, int]:
        """The ``ray.*`` values of this plan for ``num_workers`` GPU workers."""
        return {"cpus_per_worker": self.trainer,
                "preprocess_actors": self.actors_min * num_workers,
                "preprocess_actors_max": self.actors_max * num_workers}


# RefCOCO scale (416 px input, 104 x 104 trees), measured by `python -m benchmarks.preprocess_cost`
# on one core, with the decode of COCO-sized (~160 KB) JPEGs: a train ref costs ~9 ms (JPEG
# decode 2.6, letterbox 2.7, MST + BFS 0.6, the hand-over of its 0.5 MB uint8 image 0.6: mean/std
# run on the trainer's device), a val sentence ~3.4 ms. RN50 CRIS trains at T / 401.5 GFLOP
# samples/s per GPU (50/s at the 20 TFLOP/s of cluster/README.md) and validates at
# T / 137.7 GFLOP (145/s; val is streamed: it does not fit data.memory_budget_mb), i.e. 0.45 and
# 0.5 actor cores. One actor per GPU keeps training fed up to ~44 TFLOP/s and validation up to
# ~40; the autoscaling pool grows to two (~89 and ~81). The trainer's own CPU work is small
# (pseudo labels of 16 samples at 104^2: ~3 ms a step) but its loop and Ray Data's prefetching
# iterator each want a core. experiments/paper_base.yaml and the cluster's GPU nodes follow this
# plan (cluster/README.md, "CPU cores per GPU"; tests/test_cluster.py checks both).
CPUS_PER_GPU = CpuPlan(trainer=2, actors_min=1, actors_max=2)


class RayStartError(UserError, RuntimeError):
    """Ray could not be started or joined."""


def local_num_cpus(cfg: RayConfig, concurrent_trials: int = 1, trial_cpus: float = 0.0) -> int:
    """Logical CPUs for a local cluster running ``concurrent_trials`` trainings at once.

    Each training needs its workers (``num_workers * cpus_per_worker``; none when the loop runs
    in the driver), its preprocessing actors at their maximum pool size, one whole CPU for Ray
    Data's read tasks (they cannot run on a fraction), and under Tune the trial's own process
    (``trial_cpus``).
    """
    if cfg.local_num_cpus:
        return cfg.local_num_cpus
    actors = max(cfg.preprocess_actors, cfg.preprocess_actors_max)
    per_trial = cfg.num_workers * cfg.cpus_per_worker + actors * cfg.actor_cpus + READ_TASK_CPUS
    return max(2, math.ceil((per_trial + trial_cpus) * concurrent_trials))


def cluster_address(cfg: RayConfig, cli_address: str | None = None) -> str | None:
    """The cluster to join: ``--address`` beats ``ray.address`` beats ``$RAY_ADDRESS``."""
    return cli_address or cfg.address or os.environ.get("RAY_ADDRESS") or None


def _refuse_dashboard_url(address: str | None) -> None:
    """An ``http(s)://`` address is the dashboard / Jobs API (``ray.init`` rejects it with a
    ValueError): never a cluster to join, whether or not Ray is already running here."""
    if address and address.lower().startswith(("http://", "https://")):
        raise RayStartError(
            f"{address!r} is a dashboard (job submission) address, not a Ray cluster address. "
            f"Submit the command as a job: 'ray job submit --address {address} --working-dir . "
            "-- python run.py ...' (see cluster/README.md), or join with --address HEAD:6379 / "
            "ray://HEAD:10001.")


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast with a clear message when a ``host:port`` / ``ray://`` address cannot be parsed
    or does not answer (``ray.init`` would otherwise retry for a long time)."""
    if address == "auto":
        return
    _refuse_dashboard_url(address)
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:  # a port that is not a number or is out of range
        host = port = None
    if not host or not port:
        raise RayStartError(f"cannot parse Ray address {address!r}; expected host:port, "
                            "ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise RayStartError(
            f"Ray cluster at {address!r} is unreachable ({err.strerror or err}). Start one with "
            "'ray start --head', fix --address / RAY_ADDRESS, or unset it to run locally."
        ) from None


def init_ray(cfg: RayConfig, *, cli_address: str | None = None, concurrent_trials: int = 1,
             trial_cpus: float = 0.0):
    """Join the configured cluster, or start a local one sized by :func:`local_num_cpus`.

    Inside a submitted job ``RAY_ADDRESS`` is set, so the job joins its own cluster and never
    starts a second one. Calling this twice is harmless.
    """
    import ray

    for key, value in DRIVER_RAY_SETTINGS.items():
        os.environ.setdefault(key, value)
    quiet = not console.verbose()
    if not console.is_terminal():  # no colour codes in a file, verbose or not
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = cluster_address(cfg, cli_address)
    _refuse_dashboard_url(address)
    if ray.is_initialized():
        if cli_address:  # an explicit --address is still checked, never ignored silently
            _check_reachable(cli_address)
        configure_ray_data()  # DataContext is per process: a Tune trial's process needs it too
        return ray.get_runtime_context()
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True,
                     logging_level=logging.WARNING if quiet else logging.INFO)
            where = f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}"
        except (ConnectionError, ray.exceptions.AuthenticationError) as err:
            # A token mismatch shows up as a ConnectionError after ~20 s of retries.
            reason = str(getattr(err, "message", err)).splitlines()[0]
            raise RayStartError(
                f"could not join the Ray cluster at {address!r} ({reason}). Is it the head's GCS "
                "port (6379 by default)? A cluster started with token authentication also needs "
                "RAY_AUTH_MODE=token here and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN."
            ) from None
    else:
        # The dashboard stays on loopback; it also serves the State API that Ray Train's
        # placement-group cleaner and Tune's early stopping rely on.
        for key, value in LOCAL_RAY_SETTINGS.items():
            os.environ.setdefault(key, value)
        cpus = local_num_cpus(cfg, concurrent_trials, trial_cpus)
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True, logging_level=logging.WARNING if quiet else logging.INFO)
        where = f"started a local Ray ({cpus} logical CPUs on {os.cpu_count()} cores)"
    console.say(f"{where}; Ray's own logs: {_logs_dir()}"
                f"{' (--verbose shows them here)' if quiet else ''}")
    # Concurrent Tune trials: keep Ray's "(pid=...)" prefix, it tells their lines apart.
    install_console_filter(quiet=quiet, prefixes=not quiet or concurrent_trials > 1)
    configure_ray_data()
    return ray.get_runtime_context()


def _logs_dir() -> str:
    """This Ray session's log folder (on the head node when joining a cluster)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path()
    except (ImportError, AttributeError):
        return "/tmp/ray/session_latest/logs"


def install_console_filter(*, quiet: bool, prefixes: bool = False) -> bool:
    """Print the output Ray forwards from its workers through :func:`forwarded_lines`: our own
    lines (marked by :func:`gtms.console.say` in a worker) lose their mark and Ray's
    ``(Actor pid=...)`` prefix (kept with ``prefixes``); on a quiet console Ray's own lines
    are dropped (they stay in the workers' files in Ray's log folder). Returns False where
    this Ray has no such hook (then Ray prints everything, marks included)."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(ray_worker, "print_to_stdstream"):
        return False

    def handle(data: dict) -> None:
        system = data.get("pid") in ("raylet", "autoscaler")
        lines = forwarded_lines(data.get("lines", []), quiet=quiet, system=system)
        if lines:
            ray_worker.print_to_stdstream(dict(data, lines=lines),
                                          ignore_prefix=not (prefixes or system))

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
    return True


def forwarded_lines(lines: list[str], *, quiet: bool, system: bool = False) -> list[str]:
    """The lines of a Ray worker's output to print on the driver's console.

    Quiet: our marked lines (mark removed) and error reports that are not known noise
    (:func:`gtms.console.is_ray_noise`): tracebacks and ``Error`` lines; from the raylet or
    the autoscaler (``system``: e.g. a task killed for lack of memory) every line but known
    noise. Verbose: every line, marks removed."""
    out, in_traceback = [], False
    for line in lines:
        ours = console.unmark(line)
        if ours is not None:
            out.append(ours)
            in_traceback = False
        elif not quiet:
            out.append(line)
        elif console.is_ray_noise(line):
            continue
        elif system:
            out.append(line)
        elif line.startswith("Traceback "):
            in_traceback = True
            out.append(line)
        elif in_traceback:
            out.append(line)
            in_traceback = line.startswith(" ")   # the exception's own line ends it
        elif console.looks_like_error(line):
            out.append(line)
    return out


def configure_ray_data() -> None:
    """This process's Ray Data settings.

    * No per-operator progress bars: they flood a console; our loops print their own. Quiet
      (no ``--verbose``): Ray Data's INFO lines go only to its log file.
    * Parquet through the V1 datasource: V2's ``ListFiles -> ReadFiles`` chain cost 1.8-6.5 s
      per execution of a one-file split here, V1 0.1-0.3 s (measured, Ray 2.60, 2 cores), paid
      on every streamed epoch and every evaluation.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    if not console.verbose():  # Ray Data's console handler; its ray-data.log keeps every line
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):  # not its file handler
                handler.setLevel(logging.WARNING)
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.use_datasource_v2 = False


def use_gpu(cfg: RayConfig) -> bool:
    """``ray.use_gpu`` if set, else whether the cluster has a GPU."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
