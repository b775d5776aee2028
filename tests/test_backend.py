"""The execution backend: one worker function, run in this process or on Ray Train, reports the
same epochs and leaves the same checkpoint folders, and a second session resumes from them."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

import run
from gtms.backend import LocalBackend, RayBackend, backend_for
from gtms.config import RayConfig
from gtms.errors import UserError

SCORES = [0.5, 0.7, 0.6, 0.65, 0.2]


def toy_worker(config: dict, worker) -> None:
    """Epochs ``start+1 .. config['epochs']``, each reporting what ``gather`` saw and, from
    rank 0, a checkpoint holding the epoch's metrics; ``start`` comes from the latest
    checkpoint (a resumed run)."""
    start = 0
    latest = worker.latest_checkpoint()
    if latest is not None:
        start = json.loads((Path(latest) / "state.json").read_text())["epoch"]
    for epoch in range(start + 1, config["epochs"] + 1):
        ranks = worker.gather(worker.rank)
        metrics = {"epoch": epoch, "val_mean_iou": SCORES[epoch - 1], "world": len(ranks),
                   "rank_sum": sum(ranks), "resumed_after": start}
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if worker.rank == 0:
                folder = Path(tmp)
                (folder / "state.json").write_text(json.dumps(metrics))
            worker.report(metrics, folder, checkpoint_name=f"checkpoint_{epoch:04d}")


def read_state(folder: Path) -> dict | None:
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_toy(backend, tmp_path: Path, epochs: int, ray: RayConfig | None = None):
    return backend.run(toy_worker, {"epochs": epochs}, storage=str(tmp_path), name="toy",
                       ray=ray or RayConfig(), keep=1, checkpoint_metrics=read_state)


def kept_names(result) -> list[str]:
    return sorted(Path(location).name for location, _ in result.checkpoints)


def test_local_backend_reports_keeps_and_resumes(tmp_path):
    result = run_toy(LocalBackend(), tmp_path, epochs=3)
    assert result.run_dir == str(tmp_path / "toy")
    assert result.metrics["epoch"] == 3 and result.metrics["world"] == 1
    # keep=1: the best (epoch 2, 0.7) and the latest (epoch 3), on disk too
    assert kept_names(result) == ["checkpoint_0002", "checkpoint_0003"]
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == kept_names(result)
    assert Path(result.latest).name == "checkpoint_0003"
    # a second session continues after epoch 3 and ranks the old checkpoints with the new
    resumed = run_toy(LocalBackend(), tmp_path, epochs=5)
    assert resumed.metrics == {"epoch": 5, "val_mean_iou": 0.2, "world": 1, "rank_sum": 0,
                               "resumed_after": 3}
    assert kept_names(resumed) == ["checkpoint_0002", "checkpoint_0005"]


def test_backend_flags(capsys):
    assert isinstance(backend_for(no_ray=True), LocalBackend)
    ray = backend_for(no_ray=False, address="127.0.0.1:1")
    assert isinstance(ray, RayBackend) and ray.address == "127.0.0.1:1"
    with pytest.raises(UserError, match="no --address"):
        backend_for(no_ray=True, address="127.0.0.1:1")
    assert run.main(["train", "--no-ray", "--address", "127.0.0.1:1"]) == 2
    assert "no --address" in capsys.readouterr().err
    for command in ("train", "eval", "pretrain", "ablate", "sweep"):
        text = run.build_parser()._subparsers._group_actions[0].choices[command].format_help()
        assert "--address" in text and ("--no-ray" in text) == (command != "sweep"), command


@pytest.mark.integration
def test_ray_backend_runs_the_same_worker_function_on_two_workers(tmp_path, ray_cluster):
    """Two DDP-style workers: every report sees both ranks; the kept checkpoint folders and
    the resume behave as in the local run."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # tests/ is not a package
    config = RayConfig(num_workers=2, cpus_per_worker=1)
    result = run_toy(RayBackend(), tmp_path, epochs=3, ray=config)
    assert result.metrics["epoch"] == 3
    assert (result.metrics["world"], result.metrics["rank_sum"]) == (2, 1)
    assert kept_names(result) == ["checkpoint_0002", "checkpoint_0003"]
    assert Path(result.latest).name == "checkpoint_0003"
    resumed = run_toy(RayBackend(), tmp_path, epochs=4, ray=config)
    assert (resumed.metrics["epoch"], resumed.metrics["resumed_after"]) == (4, 3)


@pytest.fixture(scope="module")
def tiny_checkpoint(synthref_small, small_data, tmp_path_factory) -> Path:
    from gtms.config import load_config
    from gtms.train.fit import fit

    cfg = load_config(None, [*small_data, "data.input_size=64", "data.limit_train_refs=8",
                             "data.limit_eval_refs=6", "train.epochs=1", "model.preset=tiny",
                             f"train.run_dir={tmp_path_factory.mktemp('runs')}",
                             "train.name=tiny", "pretrain.before_train=false"])
    return Path(fit(cfg, LocalBackend())["latest_checkpoint"])


@pytest.mark.integration
def test_evaluation_runs_on_a_ray_train_worker_with_a_training_workers_resources(
        tiny_checkpoint, ray_cluster):
    """eval on Ray is a worker function: it runs in a Ray Train worker holding the training
    workers' CPUs (and a GPU on a cluster), not in the calling process (an ablation trial's,
    which holds almost nothing), and scores exactly as in this process."""
    from gtms.eval.evaluate import evaluate

    on_ray = evaluate(tiny_checkpoint, None, ["val"], backend=RayBackend())
    where = on_ray["evaluated_on"]
    cfg = load_trained_config(tiny_checkpoint)
    assert where["backend"] == "ray" and where["pid"] != os.getpid()
    # one worker holding what the training workers held together (their CPUs; a GPU each)
    assert where["resources"] == {"CPU": cfg.ray.cpus_per_worker * cfg.ray.num_workers}
    assert where["world_size"] == 1
    here = evaluate(tiny_checkpoint, None, ["val"], backend=LocalBackend())
    assert here["evaluated_on"]["backend"] == "local" and here["evaluated_on"]["pid"] == os.getpid()
    for key in ("n", "mean_iou", "overall_iou"):
        assert on_ray["splits"]["val"][key] == pytest.approx(here["splits"]["val"][key], abs=1e-9)
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["model.pt", "model.pt.sha256"]


def load_trained_config(checkpoint: Path):
    from gtms.model.checkpoint import load_trained

    return load_trained(checkpoint).config
