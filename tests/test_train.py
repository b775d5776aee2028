"""Training and evaluation end to end: the plain loop, resume, Ray Train, eval, recovery."""

from __future__ import annotations

import json
import shlex
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import run
from gtms.backend import LocalBackend, RayBackend
from gtms.config import load_config
from gtms.data.roots import DataRootError
from gtms.data.shards import ShardError, read_manifest, shards_dir
from gtms.eval.evaluate import evaluate
from gtms.eval.metrics import ERROR_KEYS
from gtms.model.checkpoint import CheckpointError, load_checkpoint
from gtms.train.fit import fit
from gtms.train.run_folder import RunError

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


def next_step_argv(summary: dict, command: str) -> list[str]:
    """The printed ``python run.py COMMAND ...`` next step, as run.main's argv."""
    (line,) = [s["command"] for s in summary["next_steps"] if f" {command} " in s["command"]]
    argv = shlex.split(line)
    assert argv[0] == "python" and (Path.cwd() / argv[1]).resolve() == REPO / "run.py"
    return argv[2:]


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run_dir / "tb").glob("events.out.tfevents.*"):
        tags.update(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    return tags


def test_plain_loop_trains_checkpoints_and_resumes(synthref_small, tmp_path, capsys):
    # 25 refs in batches of 8: 8, 8, 8 and a single sample that joins the last batch.
    cfg = small_config(synthref_small, tmp_path, "train.name=plain", "train.epochs=1",
                       "data.limit_train_refs=25")
    summary = fit(cfg, LocalBackend())
    printed = capsys.readouterr().out
    run_dir = Path(summary["run_dir"])
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["versions"]["torch"].startswith("2.13") and meta["seeds"]["base"] == 0
    # Epochs count from 1 everywhere, as printed; the planned steps are the steps taken.
    (first,) = read_jsonl(run_dir / "metrics.jsonl")
    assert first["epoch"] == 1 and "epoch 1/1 |" in printed
    assert "3 steps/epoch" in printed and first["train_steps"] == first["step"] == 3
    assert first["train_samples"] == 25 and first["val_n"] >= 8
    assert 0 <= first["val_mean_iou"] <= 1 and "val_pseudo_label_mean_iou" in first
    assert f"val mIoU {100 * first['val_mean_iou']:.2f} %" in printed
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["final"]["epoch"] == on_disk["best"]["epoch"] == 1
    assert on_disk["best_checkpoint"] == str(run_dir / "checkpoint_epoch_0001")
    payload = load_checkpoint(run_dir / "checkpoint_epoch_0001")
    assert payload["epoch"] == 1 and payload["config"]["data"]["input_size"] == 64
    tags = tensorboard_tags(run_dir)
    assert {"lr", "train/loss", "train/steps", "val/mean_iou", "val/best_mean_iou"} <= tags
    assert not any(tag.endswith("/") for tag in tags), tags
    # A SynthRef of other settings at data.root is never silently regenerated.
    with pytest.raises(DataRootError, match="synthref_images"):
        fit(load_config(None, [f"data.root={synthref_small}", "data.synthref_images=3"]),
            LocalBackend())
    # An existing run is never silently overwritten.
    with pytest.raises(RunError, match="--resume"):
        fit(cfg, LocalBackend())
    # --resume continues at the next epoch with the run's own config (+ overrides), also from
    # a checkpoint of the format that counted epochs from 0.
    old = torch.load(run_dir / "checkpoint_epoch_0001" / "model.pt", weights_only=True)
    torch.save({**old, "format": "gtms-checkpoint-v1", "epoch": 0,
                "metrics": {**old["metrics"], "epoch": 0}},
               run_dir / "checkpoint_epoch_0001" / "model.pt")
    (run_dir / "checkpoint_epoch_0001" / "model.pt.sha256").unlink()   # that format had none
    assert load_checkpoint(run_dir / "checkpoint_epoch_0001")["epoch"] == 1
    summary = fit(cfg, LocalBackend(), resume="plain", set_overrides=("train.epochs=2",))
    assert "resuming at epoch 2 (after 3 steps)" in capsys.readouterr().out
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[1]["step"] == 2 * 3
    assert summary["final"]["epoch"] == 2
    assert load_checkpoint(run_dir / "checkpoint_epoch_0002")["epoch"] == 2
    assert load_checkpoint(run_dir / "checkpoint_epoch_0002")["step"] == 2 * 3


def test_printed_commands_are_shell_quoted_word_for_word(synthref_small, tmp_path, capsys):
    """Every word of the next steps is quoted: pasted into a shell, a split list or a path
    holding ``$(...)``, spaces or quotes is passed on as written and runs nothing."""
    import subprocess

    from gtms.train.summary import next_steps, print_summary

    cfg = load_config(None, ["data.eval_splits=[val, '$(touch pwned1)', \"it's\"]"])
    checkpoint = str(tmp_path / "my run $(touch pwned2)" / "checkpoint_epoch_0001")
    steps = next_steps(cfg, str(synthref_small), checkpoint, tmp_path)
    assert [step["command"].split()[2] for step in steps] == ["eval", "predict", "visualize"]
    eval_argv = shlex.split(steps[0]["command"])
    assert eval_argv[2:] == ["eval", "--checkpoint", checkpoint, "--splits",
                             "val,$(touch pwned1),it's"]
    # pasted into bash (python stubbed out): the words arrive as written, nothing runs
    for step in steps:
        shell = subprocess.run(["bash", "-c", "python() { printf '%s\\n' \"$@\"; }; "
                                + step["command"]], cwd=tmp_path, capture_output=True,
                               text=True, check=True)
        assert shell.stdout.splitlines() == shlex.split(step["command"])[1:]
    assert not list(tmp_path.glob("pwned*"))
    from gtms.tracking import where_to_look

    run_dir = str(tmp_path / "a b;$(touch pwned3)")
    print_summary({"run_dir": run_dir, "next_steps": steps,
                   "trackers": where_to_look(cfg, run_dir)})
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "tensorboard" in x]
    assert shlex.split(line.split(":", 1)[1]) == [
        "tensorboard", "--logdir", str(tmp_path / "a b;$(touch pwned3)") + "/tb"]


def test_summary_ends_with_next_steps_that_run(synthref_small, tmp_path, capsys):
    """The eval, predict and visualize commands printed at the end parse with run.py's own
    parser and run as printed (eval, which starts Ray, runs in test_eval_...)."""
    from gtms.train.summary import print_summary

    cfg = small_config(synthref_small, tmp_path, "train.name=next", "train.epochs=1",
                       "data.limit_train_refs=8")
    summary = fit(cfg, LocalBackend())
    capsys.readouterr()
    print_summary(summary)
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].strip() == summary["next_steps"][-1]["command"]
    assert all(step["command"] in printed for step in summary["next_steps"])
    assert summary["next_steps"] == json.loads(
        (tmp_path / "next" / "summary.json").read_text())["next_steps"]
    checkpoint = summary["best_checkpoint"]
    for command in ("eval", "predict", "visualize"):
        args = run.build_parser().parse_args(next_step_argv(summary, command))
        assert args.command == command and args.checkpoint == checkpoint
    evaluate_args = run.build_parser().parse_args(next_step_argv(summary, "eval"))
    assert evaluate_args.splits == ",".join(cfg.data.eval_splits)
    assert run.main(next_step_argv(summary, "predict")) == 0
    (record,) = read_jsonl(Path(checkpoint) / "predictions" / "predictions.jsonl")
    assert record["error"] is None and Path(record["image"]).parent == tmp_path / "next"
    assert run.main(next_step_argv(summary, "visualize")) == 0
    assert (Path(checkpoint) / "visualize_val" / "contact_sheet.png").is_file()


def test_no_run_folder_after_an_early_failure(synthref_small, small_data, tmp_path, monkeypatch,
                                              capsys):
    from gtms.config import dump_config
    from gtms.model.weights import CheckpointNotFoundError
    from gtms.train import fit as fit_module

    overrides = [*small_data, f"train.run_dir={tmp_path}", "train.name=early",
                 "pretrain.before_train=false", "model.clip_weights=/nonexistent.pt"]
    assert run.main(["train", "--no-ray", *(a for kv in overrides for a in ("--set", kv))]) == 2
    assert "/nonexistent.pt" in capsys.readouterr().err
    assert not (tmp_path / "early").exists()
    cfg = small_config(synthref_small, tmp_path, "train.name=early",
                       "model.clip_weights=/nonexistent.pt")
    with pytest.raises(CheckpointNotFoundError):
        fit(cfg, LocalBackend())
    assert not (tmp_path / "early").exists()

    # A new run that fails before its first epoch finishes is removed again ...
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fit_module, "run_training", fail)
    cfg = small_config(synthref_small, tmp_path, "train.name=late")
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(cfg, LocalBackend())
    assert not (tmp_path / "late").exists()
    # ... but a resumed run's folder is never touched.
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "config.yaml").write_text(dump_config(cfg))
    (tmp_path / "late" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(cfg, LocalBackend(), resume="late")
    assert (tmp_path / "late" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("budget, epochs", [(2048, 2), (0, 1)])
def test_bad_rows_counted_exactly_each_epoch(synthref_bad, tmp_path, budget, epochs):
    """Kept in memory or streamed, every epoch counts the same bad rows and empty sentences;
    validation runs every train.val_every epochs and after the last."""
    cfg = small_config(synthref_bad, tmp_path, f"train.name=bad{budget}", "data.limit_train_refs=0",
                       "data.limit_eval_refs=0", f"train.epochs={epochs}", "train.val_every=2",
                       f"data.memory_budget_mb={budget}", "train.image_grid_every=0")
    fit(cfg, LocalBackend())
    manifest = read_manifest(shards_dir(synthref_bad))
    counts = manifest["counts"]
    metrics = read_jsonl(tmp_path / f"bad{budget}" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    for m in metrics:
        assert m["train_samples"] == counts["train"] - 2
        assert (m["skipped_train_undecodable_image"], m["skipped_train_no_sentences"],
                m["skipped_train_empty_sentence"]) == (1, 1, 3)
    validated = [m for m in metrics if "val_mean_iou" in m]
    assert [m["epoch"] for m in validated] == [epochs]
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
        summary = fit(cfg, LocalBackend())
        final = summary["final"]
        assert final["train_samples"] == 8
        assert ("train_bce" in final) == (mode == "mask-bce")
        assert ("train_pix" in final) == (mode == "tree")


def test_eval_writes_metrics_json_and_bad_inputs(synthref_small, tmp_path, ray_cluster, capsys):
    cfg = small_config(synthref_small, tmp_path, "train.name=for-eval", "train.epochs=1",
                       "data.limit_train_refs=8")
    summary = fit(cfg, LocalBackend())
    ckpt = Path(summary["latest_checkpoint"])
    # The eval command the summary prints runs as printed (every split of data.eval_splits).
    assert run.main(next_step_argv(summary, "eval")) == 0
    printed = json.loads((Path(summary["best_checkpoint"]) / "eval.json").read_text())
    assert list(printed["splits"]) == list(cfg.data.eval_splits)
    out = tmp_path / "eval.json"
    assert run.main(["eval", "--checkpoint", str(ckpt), "--splits", "val,testA",
                     "--out", str(out), "--set", "data.limit_eval_refs=0",
                     "--pseudo-labels"]) == 0
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"val", "testA"}
    manifest = read_manifest(shards_dir(synthref_small))
    for split, metrics in report["splits"].items():
        assert metrics["n"] >= 8 and 0 <= metrics["mean_iou"] <= 1
        assert metrics["n"] == metrics["split_sentences"] == manifest["sentences"][split]
        assert {"overall_iou", "prec@0.5", "prec@0.9"} <= set(metrics)
        errors = [metrics[f"err_{k}"] for k in ("iou", *ERROR_KEYS)]
        assert sum(errors) == pytest.approx(1.0)
        # W = the GT mask is the perfect weight; the oracle forest cannot beat it.
        assert metrics["w_mask_mean_iou"] == pytest.approx(1.0)
        assert 0 <= metrics["w_oracle_mean_iou"] <= 1 and 0 <= metrics["phat_gradcam_mean_iou"] <= 1
    assert "where the errors are" in capsys.readouterr().out
    ray = RayBackend()
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(tmp_path / "missing", None, ["val"], None, backend=ray)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        evaluate(junk, None, ["val"], None, backend=ray)
    with pytest.raises(CheckpointError, match="architecture"):
        evaluate(ckpt, load_config(None, ["model.preset=rn50"]), ["val"], None, backend=ray)
    with pytest.raises(ShardError, match="no shards for split nosuchsplit"):
        evaluate(ckpt, None, ["nosuchsplit"], None, backend=ray)
    # A CRIS-layout checkpoint (state_dict with module. prefix) evaluates too.
    model = torch.load(ckpt / "model.pt", weights_only=True)["model"]
    cris = tmp_path / "cris.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.items()}}, cris)
    report = evaluate(cris, small_config(synthref_small, tmp_path, "data.limit_eval_refs=4"),
                      ["val"], None, backend=ray)
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
    assert [m["epoch"] for m in metrics] == [1, 2]
    # The step count is the optimizer's: the same on both workers, the busiest one's batches.
    assert [m["step"] for m in metrics] == [metrics[0]["train_steps"],
                                            metrics[0]["train_steps"] + metrics[1]["train_steps"]]
    assert all(m["val_n"] >= 5 for m in metrics)
    for m in metrics:
        assert m["train_samples_per_s_total"] > 0 and m["train_startup_s"] >= 0
        assert (m["skipped_train_undecodable_image"], m["skipped_train_no_sentences"],
                m["skipped_train_empty_sentence"]) == (1, 1, 3)
        assert m["skipped_val_undecodable_image"] == 1
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["latest_checkpoint"].startswith("file://")
    assert load_checkpoint(summary["latest_checkpoint"])["epoch"] == 2
    assert (run_dir / "checkpoint_epoch_0002" / "model.pt").is_file()


@pytest.mark.integration
def test_killed_worker_is_recovered(synthref_small, tmp_path, ray_cluster):
    from ray.util.state import list_actors

    cfg = small_config(synthref_small, tmp_path, "train.name=chaos", "train.epochs=2",
                       "ray.num_workers=2", "ray.max_failures=2", "train.batch_size=4",
                       "train.image_grid_every=0")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(fit(cfg, RayBackend())))
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
    assert result["final"]["epoch"] == 2
    epochs = [m["epoch"] for m in read_jsonl(jsonl)]
    assert epochs[-1] == 2 and set(epochs) == {1, 2}


def test_single_sample_batches_are_merged():
    from gtms.data.reading import without_single_samples

    def batch(*ids):
        return {"ref_id": np.array(ids), "image": np.zeros((len(ids), 3))}

    sizes = [[len(b["ref_id"]) for b in without_single_samples(map(lambda ids: batch(*ids), bs))]
             for bs in ([(1, 2), (3, 4), (5,)], [(1,), (2, 3), (4, 5)], [(1, 2), (3,), (4, 5)],
                        [(1,)])]
    assert sizes == [[2, 3], [3, 2], [3, 2], [1]]
    merged = list(without_single_samples([batch(1, 2), batch(3)]))
    assert merged[0]["ref_id"].tolist() == [1, 2, 3] and merged[0]["image"].shape == (3, 3)


def test_planned_steps_follow_the_loops_batching():
    from gtms.train.plan import steps_per_epoch

    # A lone last sample joins the batch before it; several workers share the refs.
    assert [steps_per_epoch(n, 8, 1) for n in (1, 8, 9, 16, 17, 18, 25)] == [1, 1, 1, 2, 2, 3, 3]
    assert steps_per_epoch(1813, 16, 1) == 114 and steps_per_epoch(1813, 16, 2) == 57


def test_tensorboard_tags_group_by_split():
    from gtms.train.runlog import tensorboard_tag

    assert [tensorboard_tag(k) for k in ("lr", "train_loss", "val_mean_iou", "best_val_mean_iou",
                                         "skipped_train_undecodable_image", "train_steps")] == [
        "lr", "train/loss", "val/mean_iou", "val/best_mean_iou",
        "skipped/train_undecodable_image", "train/steps"]


# Validation mean IoU per epoch (NaN: not validated) and the checkpoints kept after each epoch
# with train.keep_checkpoints=2, by Ray's rule: the 2 best plus the latest, ties to the later.
RETENTION_SCORES = [0.5, 0.7, float("nan"), 0.6, 0.6, 0.3]
RETENTION_KEPT = [{1}, {1, 2}, {1, 2, 3}, {2, 4}, {2, 5}, {2, 5, 6}]


def _kept_after_each_report(scores, keep):
    from gtms.backend import retention

    on_disk, kept = [], []
    for epoch, score in enumerate(scores, start=1):
        on_disk.append(retention.scored({"epoch": epoch} if score != score else
                                        {"epoch": epoch, "val_mean_iou": score}))
        survivors = retention.kept_epochs(on_disk, keep)
        on_disk = [m for m in on_disk if m["epoch"] in survivors]
        kept.append(survivors)
    return kept


def test_retention_keeps_the_best_and_the_latest():
    from gtms.backend import retention

    assert _kept_after_each_report(RETENTION_SCORES, 2) == RETENTION_KEPT
    assert _kept_after_each_report(RETENTION_SCORES, 1)[-2:] == [{2, 5}, {2, 6}]
    assert _kept_after_each_report(RETENTION_SCORES, 10)[-1] == {1, 2, 3, 4, 5, 6}
    with pytest.raises(ValueError, match="keep_checkpoints"):
        retention.kept_epochs([{"epoch": 1}], 0)
    # The best is one of the kept: the top score, the later epoch of a tie, never an
    # unvalidated one.
    reports = [{"epoch": 1, "val_mean_iou": 0.6}, {"epoch": 2, "val_mean_iou": float("nan")},
               {"epoch": 3, "val_mean_iou": 0.6}]
    assert retention.best(reports)["epoch"] == 3
    assert retention.best(reports[1:2]) is None
    config = retention.ray_checkpoint_config(3)
    assert (config.num_to_keep, config.checkpoint_score_attribute,
            config.checkpoint_score_order) == (3, "val_mean_iou", "max")


def test_retention_matches_rays_checkpoint_manager(tmp_path):
    """The same sequence through Ray's own bookkeeping (the class Ray Train's CheckpointManager
    builds on) deletes the same folders."""
    checkpoint_manager = pytest.importorskip("ray.train._internal.checkpoint_manager")
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult

    from gtms.backend import retention

    for keep in (1, 2, 3):
        manager = checkpoint_manager._CheckpointManager(retention.ray_checkpoint_config(keep))
        folders = []
        for epoch, score in enumerate(RETENTION_SCORES, start=1):
            folder = tmp_path / f"keep{keep}" / f"epoch{epoch}"
            folder.mkdir(parents=True)
            folders.append(folder)
            metrics = retention.scored({"epoch": epoch} if score != score else
                                       {"epoch": epoch, "val_mean_iou": score})
            manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(folder)),
                                                        metrics))
            on_disk = {e for e, f in enumerate(folders, start=1) if f.exists()}
            assert on_disk == _kept_after_each_report(RETENTION_SCORES[:epoch], keep)[-1], \
                (keep, epoch)


def test_local_worker_keeps_checkpoints_like_ray(tmp_path):
    """The local backend's worker removes what train.keep_checkpoints does not keep, also
    across a resume, counting the checkpoints an earlier session left in the run folder."""
    from gtms.backend.local import LocalWorker
    from gtms.model.checkpoint import checkpoint_dir_name, read_metrics, save_checkpoint

    def worker():
        return LocalWorker(tmp_path / "run", keep=2, checkpoint_metrics=read_metrics)

    def report(worker, epoch, score):
        metrics = {"epoch": epoch} if score != score else {"epoch": epoch, "val_mean_iou": score}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, model={}, epoch=epoch, metrics=metrics)
            worker.report(metrics, Path(tmp), checkpoint_name=checkpoint_dir_name(epoch))
        return {int(p.name.rsplit("_", 1)[1]) for p in (tmp_path / "run").iterdir()}

    first = worker()
    assert [report(first, e, s) for e, s in enumerate(RETENTION_SCORES[:4], start=1)] == \
        RETENTION_KEPT[:4]
    assert first.latest_checkpoint() == tmp_path / "run" / checkpoint_dir_name(4)
    resumed = worker()  # a second session: epochs 2 and 4 are on disk, 2 still the best
    assert sorted(resumed.checkpoints) == [checkpoint_dir_name(2), checkpoint_dir_name(4)]
    assert [report(resumed, e, s) for e, s in enumerate(RETENTION_SCORES[4:], start=5)] == \
        RETENTION_KEPT[4:]
    assert resumed.result().latest == str(tmp_path / "run" / checkpoint_dir_name(6))


# Keys of metrics.jsonl that measure time (they differ between two runs of the same command).
TIMING_KEYS = ("seconds", "samples_per_s", "data_wait", "startup_s")


def metric_numbers(path: Path) -> list[dict[str, float]]:
    """Every numeric value of a run's metrics.jsonl, per epoch, except the timings."""
    return [{key: value for key, value in row.items()
             if isinstance(value, (int, float)) and not any(t in key for t in TIMING_KEYS)}
            for row in read_jsonl(path)]


def train_twice(root: Path, run_dir: Path, *extra: str, backend) -> list[list[dict]]:
    """The same small 2-epoch training run twice; the numbers of each run's metrics.jsonl."""
    numbers = []
    for name in ("first", "second"):
        cfg = small_config(root, run_dir, f"train.name={name}", "train.batch_size=4",
                           "train.image_grid_every=0", *extra)
        fit(cfg, backend)
        numbers.append(metric_numbers(run_dir / name / "metrics.jsonl"))
    return numbers


@pytest.mark.integration
def test_ray_training_gives_the_same_numbers_twice(synthref_small, tmp_path, ray_cluster):
    """Same config, seed and worker count: two Ray Train runs (2 workers) give identical
    metrics; which refs each worker gets, and in what order, does not depend on timing."""
    first, second = train_twice(synthref_small, tmp_path, "ray.num_workers=2", backend=RayBackend())
    assert [m["epoch"] for m in first] == [1, 2]
    assert first[0]["train_loss"] != first[1]["train_loss"]   # it trained
    assert first == second


def test_plain_training_gives_the_same_numbers_twice(synthref_small, tmp_path):
    first, second = train_twice(synthref_small, tmp_path, backend=LocalBackend())
    assert [m["epoch"] for m in first] == [1, 2]
    assert first == second
