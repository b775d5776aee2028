"""Crash-safe, exact resume and checkpoints that verify themselves.

The kill harness: a 2-epoch ``train --no-ray`` run is killed with SIGKILL at each moment of
:mod:`gtms.killpoints` (mid-epoch, after the epoch's metrics line, while its checkpoint is being
written), resumed with ``--resume``, and must end with the same ``metrics.jsonl`` (every value
but the timings) and no repeated TensorBoard step, as a run that never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from gtms.model.checkpoint import load_checkpoint, load_trained, read_metrics, save_checkpoint
from gtms.model.weights import ChecksumMismatchError

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("seconds", "samples_per_s", "data_wait", "startup_s")


def flip_byte(file: Path, at: float = 0.5) -> None:
    """Change one byte inside ``file`` (its size stays the same)."""
    data = bytearray(file.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    file.write_bytes(bytes(data))


# --- verified checkpoints ---------------------------------------------------------------------

def test_a_damaged_checkpoint_is_refused_naming_it(tmp_path):
    save_checkpoint(tmp_path / "ckpt", model={"w": torch.arange(50_000.0)}, epoch=1,
                    metrics={"epoch": 1})
    file = tmp_path / "ckpt" / "model.pt"
    assert (tmp_path / "ckpt" / "model.pt.sha256").read_text().split()[1] == "model.pt"
    assert load_checkpoint(file)["epoch"] == 1
    flip_byte(file)
    for load in (load_checkpoint, read_metrics):
        with pytest.raises(ChecksumMismatchError, match=str(file)):
            load(tmp_path / "ckpt")
    # a file without a checksum (OpenAI's, CRIS's, an older one of ours) loads as before: the
    # damage then goes unseen, which is what the checksum is for
    (tmp_path / "ckpt" / "model.pt.sha256").unlink()
    assert load_checkpoint(file)["model"]["w"].shape == (50_000,)


@pytest.fixture(scope="module")
def trained(synthref_small, tmp_path_factory) -> Path:
    """A checkpoint of a tiny 1-epoch run."""
    from gtms.backend import LocalBackend
    from gtms.config import load_config
    from gtms.train.fit import fit

    generator = json.loads((synthref_small / "shards" / "manifest.json").read_text())["generator"]
    cfg = load_config(REPO / "experiments" / "synthref.yaml", [
        f"data.root={synthref_small}", f"data.synthref_images={generator['num_images']}",
        f"data.synthref_seed={generator['seed']}", "data.input_size=64",
        "data.limit_train_refs=8", "data.limit_eval_refs=4", "train.epochs=1",
        f"train.run_dir={tmp_path_factory.mktemp('runs')}", "train.name=tiny",
        "pretrain.before_train=false"])
    return Path(fit(cfg, LocalBackend())["latest_checkpoint"])


def test_eval_predict_and_init_refuse_a_flipped_byte(trained, synthref_small, tmp_path, capsys):
    """One byte flipped inside a weight keeps the file's size: every loader stops, naming the
    file, with exit code 2 on the command line."""
    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    flip_byte(damaged / "model.pt", at=0.6)
    with pytest.raises(ChecksumMismatchError):
        load_trained(damaged)
    image = sorted((synthref_small / "images").glob("*.jpg"))[0]
    for argv in (["eval", "--checkpoint", str(damaged), "--no-ray", "--splits", "val"],
                 ["predict", "--checkpoint", str(damaged), "--image", str(image), "--text",
                  "the left one", "--out", str(tmp_path / "pred")],
                 ["visualize", "--checkpoint", str(damaged), "--n", "1",
                  "--out", str(tmp_path / "viz")]):
        assert run.main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "damaged" in err and str(damaged / "model.pt") in err, argv[0]
    from gtms.model.build import build_model

    with pytest.raises(ChecksumMismatchError):
        build_model("tiny", word_len=8, init_checkpoint=damaged / "model.pt")
    assert load_trained(trained).model is not None      # the original is fine


# --- the kill harness ---------------------------------------------------------------------------

def train_argv(small_data: list[str], run_dir: Path, name: str) -> list[str]:
    sets = [*small_data, "data.input_size=64", "data.limit_train_refs=24",
            "data.limit_eval_refs=8", f"train.run_dir={run_dir}", f"train.name={name}",
            "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=2",
            "train.image_grid_every=1", "loss.gamma_warmup_epochs=1",
            "loss.gamma_delay_epochs=0", "pretrain.before_train=false",
            "train.trackers=[tensorboard,mlflow]"]
    return [sys.executable, str(REPO / "run.py"), "train", "--no-ray",
            *(a for kv in sets for a in ("--set", kv))]


def train(argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GTMS_KILL_AT"}
    if kill_at:
        env["GTMS_KILL_AT"] = kill_at
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)


def numbers(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items()
             if isinstance(v, (int, float)) and not any(t in k for t in TIMING_KEYS)}
            for row in rows]


def tensorboard_steps(run_dir: Path, tag: str = "val/mean_iou") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("resume")
    done = train(train_argv(small_data, runs, "whole"))
    assert done.returncode == 0, done.stderr[-2000:]
    return runs / "whole"


@pytest.mark.integration
@pytest.mark.parametrize("point, left", [
    ("mid_epoch", "checkpoint_epoch_0001"),
    ("after_metrics", "checkpoint_epoch_0001"),
    ("checkpoint_write", ".checkpoint_epoch_0002.partial"),
])
def test_a_run_killed_anywhere_resumes_to_the_same_numbers(point, left, small_data,
                                                          uninterrupted, tmp_path):
    killed = train(train_argv(small_data, tmp_path, "killed"), kill_at=f"{point}:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "killed"
    assert (run_dir / left).exists(), sorted(p.name for p in run_dir.iterdir())
    assert not (run_dir / "checkpoint_epoch_0002").exists()
    resumed = train([*train_argv(small_data, tmp_path, "killed"), "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch 2" in resumed.stdout
    if point == "checkpoint_write":
        assert "interrupted" in resumed.stderr
    assert [row["epoch"] for row in numbers(run_dir)] == [1, 2]
    assert numbers(run_dir) == numbers(uninterrupted)
    assert tensorboard_steps(run_dir) == tensorboard_steps(uninterrupted)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    assert mlflow_epochs(run_dir) == mlflow_epochs(uninterrupted)   # one run, each epoch once


def mlflow_epochs(run_dir: Path) -> list[tuple[int, float]]:
    """The MLflow run of ``run_dir`` (SQLite store beside it): its (step, val mean IoU) history,
    after checking it is the only run and finished."""
    from test_tracking import mlflow_history, mlflow_runs

    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    runs = mlflow_runs(uri)
    assert list(runs["status"]) == ["FINISHED"]
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert list(runs["run_id"]) == [run_id]
    return mlflow_history(uri, run_id, "val_mean_iou")
