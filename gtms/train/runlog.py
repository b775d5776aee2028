"""What a run writes about itself while it trains (rank 0 only).

``<run>/metrics.jsonl`` (one JSON object per epoch: ``epoch`` counted from 1, ``step`` = optimizer
steps so far, IoU and Prec@X as fractions in [0, 1]), TensorBoard event files under ``<run>/tb``
(the same numbers, tagged ``train/…``, ``val/…``, ``skipped/…`` and ``lr``; loss terms every
``train.log_every`` steps under ``train_step/…``; image grids), and one progress line per epoch on
the console (IoU in percent). With MLflow or W&B in ``train.trackers`` the same numbers go to
their runs too (:mod:`gtms.tracking`), once the epoch's checkpoint is committed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gtms.config import Config
from gtms.console import say
from gtms.eval.metrics import percent

CONSOLE_KEYS = (("train_loss", "loss"), ("train_loc", "loc"), ("train_pix", "pix"),
                ("train_bce", "bce"), ("train_align", "align"), ("train_gamma", "gamma"),
                ("lr", "lr"),
                ("train_steps", "steps"),
                ("train_samples_per_s", "samples/s/worker"), ("train_data_wait", "data wait"),
                ("val_mean_iou", "val mIoU"),
                ("val_overall_iou", "val oIoU"), ("val_pseudo_label_mean_iou", "P^ mIoU"),
                ("train_attention_fallback", "A fallback"),
                ("val_attention_fallback", "val A fallback"),
                ("val_attention_pointing", "val A pointing"))
# GradCAM's health (gtms.eval.metrics.AttentionMeter): shares shown in percent.
PERCENT_KEYS = ("train_attention_fallback", "val_attention_fallback", "val_attention_pointing")
TENSORBOARD_GROUPS = ("train", "val", "skipped")


def _format(key: str, label: str, value: Any) -> str:
    if key == "lr":
        return f"{label} {value:.3g}"
    if key == "train_data_wait":
        return f"{label} {100 * value:.0f} %"
    if key in PERCENT_KEYS:
        return f"{label} {100 * value:.1f} %"
    if key.endswith("_iou"):
        return f"{label} {percent(value)}"
    if key == "train_samples_per_s":
        return f"{label} {value:.1f}"
    if not isinstance(value, float):
        return f"{label} {value}"
    return f"{label} {value:.4f}"


def tensorboard_tag(key: str) -> str:
    """A ``metrics.jsonl`` key -> its TensorBoard tag: ``val_mean_iou`` -> ``val/mean_iou``,
    ``best_val_mean_iou`` -> ``val/best_mean_iou``, ``lr`` -> ``lr``."""
    if key.startswith("best_"):
        group, _, name = key[len("best_"):].partition("_")
        return f"{group}/best_{name}"
    group, _, name = key.partition("_")
    return f"{group}/{name}" if group in TENSORBOARD_GROUPS and name else key


class RunLogger:
    """Rank 0's record of a run: ``metrics.jsonl``, TensorBoard and the console's epoch lines.

    The checkpoints are the one source of truth for progress: a run resumed after
    ``done_epochs`` (its latest checkpoint) first drops what an earlier session recorded past
    them (``metrics.jsonl`` lines of later epochs; TensorBoard events after ``done_steps``), so
    an epoch that was logged but not checkpointed before a kill is recorded once, when rerun.
    """

    def __init__(self, run_dir: str, *, done_epochs: int = 0, done_steps: int = 0,
                 tag: str = "", cfg: Config | None = None, tracking: dict | None = None):
        from gtms.storage import RunFolder

        self.folder = RunFolder(run_dir, fetch=True)   # local, or a mirror of a URI
        self.prefix = f"[{tag}] " if tag else ""      # which trial, in an ablation or sweep
        self.jsonl = self.folder.path / "metrics.jsonl"
        purge = None
        if self.jsonl.is_file():   # an earlier session of this run: keep what was checkpointed
            self._keep_epochs(done_epochs)
            purge = done_steps + 1
        self.writer = None
        if cfg is None or "tensorboard" in cfg.train.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder.path / "tb"), purge_step=purge)
        self.tracked = None
        if cfg is not None:
            self.tracked = self._start_tracking(cfg, run_dir, tracking or {})

    @staticmethod
    def _start_tracking(cfg: Config, run_dir: str, tracking: dict):
        """MLflow / W&B runs (:mod:`gtms.tracking`), with the driver's tracker environment (a
        Ray worker's own may lack it)."""
        import os

        from gtms.tracking import Labels, folder_name, start_tracking

        os.environ.update(tracking.get("env") or {})
        labels = Labels.from_dict(tracking.get("labels"), folder_name(run_dir))
        return start_tracking(cfg, run_dir, labels)

    def _keep_epochs(self, done: int) -> None:
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        by_epoch = {}   # the last line of each epoch (an older run may hold one twice)
        for line in lines:
            by_epoch[json.loads(line).get("epoch", 0)] = line
        kept = [line for epoch, line in sorted(by_epoch.items()) if epoch <= done]
        if len(kept) < len(lines):
            say(f"metrics.jsonl: dropped {len(lines) - len(kept)} line(s) of epochs not "
                f"checkpointed (after epoch {done}) or recorded twice; they are rerun")
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.jsonl)

    def console(self, text: str) -> None:
        say(self.prefix + text)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def epoch(self, metrics: dict[str, Any], epochs: int) -> None:
        self._tensorboard(metrics)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.folder.sync()
        parts = [f"epoch {metrics['epoch']}/{epochs}"]
        for key, label in CONSOLE_KEYS:
            if key in metrics:
                value = metrics[key]
                text = _format(key, label, value)
                if key == "val_attention_pointing" and "val_attention_pointing_chance" in metrics:
                    text += f" (chance {100 * metrics['val_attention_pointing_chance']:.1f} %)"
                parts.append(text)
        skipped = {k: v for k, v in metrics.items() if k.startswith("skipped_")}
        if skipped:
            parts.append("skipped " + ", ".join(f"{k[8:]}={v}" for k, v in skipped.items()))
        self.console(" | ".join(parts))

    def _tensorboard(self, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.writer.add_scalar(tensorboard_tag(key), value, metrics["step"])
        self.writer.flush()

    def committed(self, metrics: dict[str, Any]) -> None:
        """The epoch's checkpoint is committed: its metrics go to MLflow / W&B."""
        if self.tracked is not None:
            self.tracked.metrics(metrics)

    def image_grid(self, batch: dict[str, Any], result: dict[str, Any], step: int) -> None:
        from gtms.viz import sample_panels

        if self.writer is None:
            return
        grid = sample_panels(batch, result, max_samples=4)
        self.writer.add_image("val/samples", np.ascontiguousarray(grid), step, dataformats="HWC")
        self.writer.flush()
        self.folder.sync()

    def close(self, *, failed: bool = False) -> None:
        """End the run's record; the tracker runs stay open for the driver's summary unless
        the training ``failed``."""
        if self.writer is not None:
            self.writer.close()
        if self.tracked is not None:
            self.tracked.close(failed=failed, final=False)
        self.folder.sync()
