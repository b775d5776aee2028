"""Experiment tracking for real: MLflow with a SQLite store, read back with ``mlflow.search_runs``
and its client; W&B in offline mode, its run files (``run-<id>.wandb``) read back record by
record with W&B's own protobuf definitions. No mocks of either library."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml

import run
from gtms.backend import LocalBackend
from gtms.config import ConfigError, load_config
from gtms.tracking import (
    INSTALL,
    Labels,
    TrackingError,
    check_trackers,
    flat_params,
    mlflow_name,
    start_tracking,
)
from gtms.tune.tracked import trial_labels

REPO = Path(__file__).resolve().parents[1]


# --- reading the trackers back ------------------------------------------------------------------

def mlflow_runs(uri: str, experiment: str = "gtms"):
    """``mlflow.search_runs`` on the store ``uri``. ``mlflow.set_tracking_uri`` also sets
    ``$MLFLOW_TRACKING_URI``, which a later run (a subprocess) would follow: it is undone."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment])
    finally:
        mlflow.set_tracking_uri(before or "")
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def mlflow_artifacts(uri: str, run_id: str) -> set[str]:
    from mlflow import MlflowClient

    return {a.path for a in MlflowClient(uri).list_artifacts(run_id)}


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B files, in the order they were written. The file
    is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (CRC, length,
    type: 1 whole, 2 first, 3 middle, 4 last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:   # the rest of a block is padding
                pos += left
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(records) -> dict[int, dict]:
    """Each logged step's values."""
    steps = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                   for item in record.history.item}
            steps[row["_step"]] = row
    return steps


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


# --- unit tests ---------------------------------------------------------------------------------

def test_tracker_names_are_checked():
    cfg = load_config(None, ["train.trackers=[tensorboard,mlflow]"])
    assert cfg.train.trackers == ("tensorboard", "mlflow")
    with pytest.raises(ConfigError, match="'tensorboard', 'mlflow', 'wandb'"):
        load_config(None, ["train.trackers=[neptune]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["train.trackers=[mlflow,mlflow]"])


def test_a_missing_tracker_stops_before_anything_with_the_install_command(
        small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if it were not installed
    with pytest.raises(TrackingError, match="requirements-tracking.txt"):
        check_trackers(load_config(None, ["train.trackers=[wandb]"]))
    sets = [*small_data, f"train.run_dir={tmp_path / 'runs'}", "train.trackers=[wandb]"]
    for command in (["train", "--no-ray"], ["ablate", "--no-ray", "--rows", "tree",
                                            "--out", str(tmp_path / "ablation")]):
        assert run.main([*command, *(a for kv in sets for a in ("--set", kv))]) == 2
        assert INSTALL in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ablation" / "trials").exists()
    # the extra names what the tests and gtms.tracking import
    extra = (REPO / "requirements-tracking.txt").read_text()
    for package in ("mlflow-skinny==", "sqlalchemy==", "alembic==", "wandb=="):
        assert package in extra.lower()


def test_names_params_and_trial_labels():
    assert mlflow_name("val_prec@0.5") == "val_prec_at_0.5"
    assert flat_params({"train": {"seed": 3, "trackers": ["mlflow"]}}) == {
        "train.seed": "3", "train.trackers": '["mlflow"]'}
    labels = trial_labels("tree-s1", {"loss.mode": "tree", "train.seed": 1},
                          {"group": "ablation x", "parent": {"mlflow": "abc"}})
    assert labels.tags == {"loss.mode": "tree", "train.seed": "1", "row": "tree", "seed": "1"}
    assert (labels.group, labels.parent, labels.kind) == ("ablation x", {"mlflow": "abc"},
                                                          "trial")
    assert trial_labels("t", {"pseudo.sigma": 0.0123456}, None).tags == {"pseudo.sigma": "0.01235"}


def test_a_tracker_that_fails_while_logging_is_dropped_and_training_goes_on(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    cfg = load_config(None, ["train.trackers=[mlflow]", f"train.tracking_uri=sqlite:///{db}"])
    tracked = start_tracking(cfg, str(tmp_path / "run"), Labels(name="run"))
    tracked.metrics({"epoch": 1, "step": 1, "train_loss": 0.5})
    assert mlflow_history(f"sqlite:///{db}", tracked.ids["mlflow"], "train_loss") == [(1, 0.5)]
    db.unlink()   # the store is gone (a server down, a disk lost)
    tracked.metrics({"epoch": 2, "step": 2, "train_loss": 0.4})
    assert "mlflow: metrics failed" in capsys.readouterr().err
    assert tracked.trackers == []
    tracked.close()


# --- a training run, end to end -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tracked_run(synthref_small, tmp_path_factory):
    """A 2-epoch tiny run (no Ray) with TensorBoard, MLflow (its default SQLite store beside
    the runs) and W&B offline, the best checkpoint's weights uploaded."""
    from gtms.train.fit import fit
    from tests.test_predict import synthref_overrides

    runs = tmp_path_factory.mktemp("tracked")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        cfg = load_config(REPO / "experiments" / "synthref.yaml", [
            *synthref_overrides(synthref_small), "data.input_size=64", "data.limit_train_refs=8",
            "data.limit_eval_refs=4", f"train.run_dir={runs}", "train.name=tiny",
            "train.batch_size=8", "train.eval_batch_size=8", "train.epochs=2",
            "train.image_grid_every=0", "pretrain.before_train=false",
            "train.trackers=[tensorboard,mlflow,wandb]", "train.track_checkpoints=true"])
        summary = fit(cfg, LocalBackend())
    finally:
        patch.undo()
    return runs / "tiny", summary, f"sqlite:///{runs / 'mlflow.db'}"


def test_mlflow_holds_the_config_every_epoch_and_the_files(tracked_run):
    run_dir, summary, uri = tracked_run
    runs = mlflow_runs(uri)
    assert len(runs) == 1
    found = runs.iloc[0]
    assert (found["tags.mlflow.runName"], found["status"]) == ("tiny", "FINISHED")
    assert found["run_id"] == json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["tracking_uri"] == uri
    for key, value in flat_params(config).items():
        assert found[f"params.{key}"] == value, key
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for key in lines[-1]:
        if isinstance(lines[-1][key], (int, float)):
            assert mlflow_history(uri, found["run_id"], mlflow_name(key)) == [
                (line["step"], float(line[key])) for line in lines], key
    assert found["tags.best_checkpoint"] == summary["best_checkpoint"]
    assert mlflow_artifacts(uri, found["run_id"]) == {"config.yaml", "summary.json", "model.pt",
                                                      "model.pt.sha256"}
    from mlflow import MlflowClient

    copy = MlflowClient(uri).download_artifacts(found["run_id"], "summary.json")
    assert Path(copy).read_bytes() == (run_dir / "summary.json").read_bytes()


def test_wandb_offline_files_hold_the_config_every_epoch_and_the_files(tracked_run):
    run_dir, summary, _ = tracked_run
    wandb_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]
    records = wandb_records(run_dir)
    assert records, sorted(p.name for p in run_dir.iterdir())
    started = of_kind(records, "run")[0]
    assert (started.run_id, started.display_name, started.project) == (wandb_id, "tiny", "gtms")
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    config.update({item.key: json.loads(item.value_json) for r in of_kind(records, "config")
                   for item in r.update})
    assert config["train"] == yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = wandb_history(records)
    assert sorted(history) == [line["step"] for line in lines]
    for line in lines:
        for key, value in line.items():
            if isinstance(value, (int, float)):
                assert history[line["step"]][key] == pytest.approx(value, rel=1e-12), key
    summaries = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                 for r in of_kind(records, "summary") for item in r.update}
    assert summaries["best_checkpoint"] == summary["best_checkpoint"]
    files = {entry.path for artifact in of_kind(records, "artifact")
             for entry in artifact.manifest.contents}
    assert files == {"config.yaml", "summary.json", "model.pt", "model.pt.sha256"}
    assert [e.exit_code for e in of_kind(records, "exit")] == [0, 0]   # training, then summary


def test_the_summary_says_where_the_trackers_are(tracked_run):
    run_dir, summary, uri = tracked_run
    assert set(summary["trackers"]) == {"TensorBoard", "MLflow", "W&B"}
    assert uri in summary["trackers"]["MLflow"]
    assert "wandb sync" in summary["trackers"]["W&B"]
    assert json.loads((run_dir / "summary.json").read_text())["trackers"] == summary["trackers"]
