"""Training and evaluation end to end: the plain loop, resume, Ray Train, eval, recovery."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import run
from gtms.config import load_config
from gtms.data.roots import DataRootError
from gtms.data.shards import read_manifest, shards_dir
from gtms.eval.evaluate import EvalError, evaluate
from gtms.train.checkpoint import CheckpointError, load_checkpoint
from gtms.train.trainer import RunError, fit

REPO = Path(__file__).resolve().parents[1]


def small_config(root: Path, run_dir: Path, *extra: str):
    generator = json.loads((root / "shards" / "manifest.json").read_text())["generator"]
    return load_config(REPO / "experiments" / "synthref.yaml", [
        f"data.root={root}", f"data.synthref_images={generator['num_images']}",
        f"data.synthref_seed={generator['seed']}", "data.input_size=64", "data.limit_train_refs=24",
        "data.limit_eval_refs=8", f"train.run_dir={run_dir}", "train.batch_size=8",
        "train.eval_batch_size=16", "train.epochs=2", "train.image_grid_every=1",
        "loss.gamma_warmup_epochs=1", "loss.gamma_delay_epochs=0", "pretrain.before_train=false",
        *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_loop_trains_checkpoints_and_resumes(synthref_small, tmp_path):
    cfg = small_config(synthref_small, tmp_path, "train.name=plain", "train.epochs=1")
    summary = fit(cfg, no_ray=True)
    run_dir = Path(summary["run_dir"])
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["versions"]["torch"].startswith("2.13") and meta["seeds"]["base"] == 0
    (first,) = read_jsonl(run_dir / "metrics.jsonl")
    assert first["epoch"] == 0 and first["train_samples"] == 24 and first["val_n"] >= 8
    assert 0 <= first["val_mean_iou"] <= 1 and "val_pseudo_label_mean_iou" in first
    payload = load_checkpoint(run_dir / "checkpoint_epoch_0001")  # named 1-based, as printed
    assert payload["epoch"] == 0 and payload["config"]["data"]["input_size"] == 64
    # A SynthRef of other settings at data.root is never silently regenerated.
    with pytest.raises(DataRootError, match="synthref_images"):
        fit(load_config(None, [f"data.root={synthref_small}", "data.synthref_images=3"]),
            no_ray=True)
    # An existing run is never silently overwritten.
    with pytest.raises(RunError, match="--resume"):
        fit(cfg, no_ray=True)
    # --resume continues at the next epoch with the run's own config (+ overrides).
    summary = fit(cfg, no_ray=True, resume="plain", set_overrides=("train.epochs=2",))
    epochs = [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert epochs == [0, 1]
    assert load_checkpoint(run_dir / "checkpoint_epoch_0002")["step"] == 2 * 3


@pytest.mark.parametrize("budget, epochs", [(2048, 2), (0, 1)])
def test_bad_rows_counted_exactly_each_epoch(synthref_bad, tmp_path, budget, epochs):
    """Kept in memory or streamed, every epoch counts the same bad rows and empty sentences;
    validation runs every train.val_every epochs and after the last."""
    cfg = small_config(synthref_bad, tmp_path, f"train.name=bad{budget}", "data.limit_train_refs=0",
                       "data.limit_eval_refs=0", f"train.epochs={epochs}", "train.val_every=2",
                       f"data.memory_budget_mb={budget}", "train.image_grid_every=0")
    fit(cfg, no_ray=True)
    manifest = read_manifest(shards_dir(synthref_bad))
    counts = manifest["counts"]
    metrics = read_jsonl(tmp_path / f"bad{budget}" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(epochs))
    for m in metrics:
        assert m["train_samples"] == counts["train"] - 2
        assert (m["skipped_train_undecodable_image"], m["skipped_train_no_sentences"],
                m["skipped_train_empty_sentence"]) == (1, 1, 3)
    validated = [m for m in metrics if "val_mean_iou" in m]
    assert [m["epoch"] for m in validated] == [epochs - 1]
    # val_n counts sentences: all of the val split's but those of the undecodable row.
    bad_row = pq.read_table(shards_dir(synthref_bad) / "val" / "part-00000.parquet").slice(0, 1)
    dropped = len(bad_row.column("sentences").to_pylist()[0])
    assert validated[0]["val_n"] == manifest["sentences"]["val"] - dropped
    assert validated[0]["skipped_val_undecodable_image"] == 1
    assert all("skipped_val_undecodable_image" not in m for m in metrics if m not in validated)


def test_modes_and_gtms_step_cost(synthref_small, tmp_path):
    """Every ablation row trains a step; P-hat quality is logged for the pseudo-label rows."""
    for mode in ("mask-bce", "box-lloc", "tree"):
        cfg = small_config(synthref_small, tmp_path, f"loss.mode={mode}", f"train.name={mode}",
                           "train.epochs=1", "data.limit_train_refs=8")
        summary = fit(cfg, no_ray=True)
        final = summary["final"]
        assert final["train_samples"] == 8
        assert ("train_bce" in final) == (mode == "mask-bce")
        assert ("train_pix" in final) == (mode == "tree")


def test_eval_writes_metrics_json_and_bad_inputs(synthref_small, tmp_path, ray_cluster):
    cfg = small_config(synthref_small, tmp_path, "train.name=for-eval", "train.epochs=1",
                       "data.limit_train_refs=8")
    summary = fit(cfg, no_ray=True)
    ckpt = Path(summary["latest_checkpoint"])
    out = tmp_path / "eval.json"
    assert run.main(["eval", "--checkpoint", str(ckpt), "--splits", "val,testA",
                     "--out", str(out), "--set", "data.limit_eval_refs=0"]) == 0
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"val", "testA"}
    manifest = read_manifest(shards_dir(synthref_small))
    for split, metrics in report["splits"].items():
        assert metrics["n"] >= 8 and 0 <= metrics["mean_iou"] <= 1
        assert metrics["n"] == metrics["split_sentences"] == manifest["sentences"][split]
        assert {"overall_iou", "prec@0.5", "prec@0.9"} <= set(metrics)
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(tmp_path / "missing", None, ["val"], None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        evaluate(junk, None, ["val"], None)
    with pytest.raises(CheckpointError, match="architecture"):
        evaluate(ckpt, load_config(None, ["model.preset=rn50"]), ["val"], None)
    with pytest.raises(EvalError, match="no shards"):
        evaluate(ckpt, None, ["nosuchsplit"], None)
    # A CRIS-layout checkpoint (state_dict with module. prefix) evaluates too.
    model = torch.load(ckpt / "model.pt", weights_only=True)["model"]
    cris = tmp_path / "cris.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.items()}}, cris)
    report = evaluate(cris, small_config(synthref_small, tmp_path, "data.limit_eval_refs=4"),
                      ["val"], None)
    assert report["splits"]["val"]["n"] >= 4
    assert report["splits"]["val"]["split_sentences"] is None   # limited: no total to match


def test_split_sentence_count_comes_from_the_manifest(synthref_small, tmp_path):
    from gtms.eval.evaluate import split_sentence_count

    manifest = read_manifest(shards_dir(synthref_small))
    assert split_sentence_count(str(synthref_small), "val") == manifest["sentences"]["val"]
    assert split_sentence_count(str(synthref_small), "nosuchsplit") is None
    assert split_sentence_count(str(tmp_path), "val") is None          # no manifest
    assert split_sentence_count(f"file://{synthref_small}", "val") is None


@pytest.mark.integration
def test_ray_two_workers_end_to_end(synthref_bad, tmp_path, ray_cluster, capsys):
    """Two CPU workers (gloo DDP), shards and run storage both given as file:// URIs; the bad
    rows of the first shard are counted exactly once per epoch over both workers."""
    assert run.main(["train", "--set", f"data.root=file://{synthref_bad}", "--set",
                     "data.input_size=64", "--set", "data.limit_train_refs=0", "--set",
                     "data.limit_eval_refs=0", "--set", f"train.run_dir=file://{tmp_path}",
                     "--set",
                     "train.name=ray2", "--set", "train.batch_size=4", "--set",
                     "train.epochs=2", "--set", "ray.num_workers=2", "--set",
                     "pretrain.before_train=false"]) == 0
    printed = capsys.readouterr().out
    assert "training finished" in printed and "best checkpoint" in printed
    run_dir = tmp_path / "ray2"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert all(m["val_n"] >= 5 for m in metrics)
    for m in metrics:
        assert m["train_samples_per_s_total"] > 0 and m["train_startup_s"] >= 0
        assert (m["skipped_train_undecodable_image"], m["skipped_train_no_sentences"],
                m["skipped_train_empty_sentence"]) == (1, 1, 3)
        assert m["skipped_val_undecodable_image"] == 1
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["latest_checkpoint"].startswith("file://")
    assert load_checkpoint(summary["latest_checkpoint"])["epoch"] == 1
    assert (run_dir / "checkpoint_epoch_0002" / "model.pt").is_file()


@pytest.mark.integration
def test_killed_worker_is_recovered(synthref_small, tmp_path, ray_cluster):
    from ray.util.state import list_actors

    cfg = small_config(synthref_small, tmp_path, "train.name=chaos", "train.epochs=2",
                       "ray.num_workers=2", "ray.max_failures=2", "train.batch_size=4",
                       "train.image_grid_every=0")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(fit(cfg)))
    thread.start()
    jsonl = tmp_path / "chaos" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (jsonl.is_file() and jsonl.read_text().strip()):
        time.sleep(0.5)
    assert jsonl.is_file(), "first epoch never finished"
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                               ("state", "=", "ALIVE")])]
    assert workers
    import os
    import signal

    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["final"]["epoch"] == 1
    epochs = [m["epoch"] for m in read_jsonl(jsonl)]
    assert epochs[-1] == 1 and set(epochs) == {0, 1}


def test_single_sample_batches_are_merged():
    from gtms.train.contexts import without_single_samples

    def batch(*ids):
        return {"ref_id": np.array(ids), "image": np.zeros((len(ids), 3))}

    sizes = [[len(b["ref_id"]) for b in without_single_samples(map(lambda ids: batch(*ids), bs))]
             for bs in ([(1, 2), (3, 4), (5,)], [(1,), (2, 3), (4, 5)], [(1, 2), (3,), (4, 5)],
                        [(1,)])]
    assert sizes == [[2, 3], [3, 2], [3, 2], [1]]
    merged = list(without_single_samples([batch(1, 2), batch(3)]))
    assert merged[0]["ref_id"].tolist() == [1, 2, 3] and merged[0]["image"].shape == (3, 3)
