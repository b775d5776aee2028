"""The training loop: the worker function's body, in this process (``--no-ray``) or on each Ray
Train worker.

Where it runs is behind a :class:`gtms.backend.Worker` (rank, device, DDP, reporting metrics
and checkpoints, the checkpoint to resume from, gathering across workers); where its batches
come from is behind a :class:`Feed` (:mod:`gtms.data.feeds`). :func:`train_loop` itself only
knows torch.

Epochs are counted from 1 in everything a run records or prints (``metrics.jsonl``, checkpoints,
their folder names, the console). The ``epoch`` arguments of a :class:`Feed` are the 0-based
index that seeds each epoch's data order.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gtms import killpoints
from gtms.backend import Worker
from gtms.config import Config, config_to_dict
from gtms.console import Progress
from gtms.eval.attention import attention_sources
from gtms.eval.metrics import AttentionMeter, SegmentationMeter
from gtms.eval.validation import add_attention, new_meters, to_device, unwrap, validation_step
from gtms.model.build import build_model
from gtms.model.checkpoint import checkpoint_dir_name, load_checkpoint, save_checkpoint
from gtms.modes import QUALITY_MODE, get_mode
from gtms.pseudo import gamma_at
from gtms.train import random_state
from gtms.train.optim import build_optimizer, build_scheduler
from gtms.train.runlog import RunLogger
from gtms.train.step import compute_losses


class Feed(Protocol):
    """Where a worker's batches come from (:mod:`gtms.data.feeds`)."""

    def set_epoch(self, epoch: int) -> None: ...
    def train_batches(self, epoch: int, batch_size: int) -> Iterable[dict[str, Any]]: ...
    def val_batches(self, batch_size: int) -> Iterable[dict[str, Any]]: ...
    def bad_rows(self, epoch: int) -> dict[str, dict[str, int]]: ...


@dataclass
class TrainingState:
    """What an epoch changes: the model as trained (DDP-wrapped on several workers), its
    optimizer, schedule and AMP scaler, and how far training got."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    done: int = 0     # epochs finished
    step: int = 0     # optimizer steps taken (the same on every worker)
    best: float = -math.inf   # best val mean IoU so far
    random_states: list | None = None   # each rank's generators when the checkpoint was saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initial_model(cfg: Config, rank: int = 0) -> torch.nn.Module:
    """The model before its first step: the global RNGs seeded with ``train.seed + rank``, then
    built. Nothing between the two depends on ``loss.mode``, so the Table 2 rows of one seed
    start from the same weights (the data order is the seed's too:
    :func:`gtms.data.reading.row_positions`)."""
    seed_everything(cfg.train.seed + rank)
    return build_model(cfg.model.preset, word_len=cfg.data.word_len,
                       clip_weights=cfg.model.clip_weights,
                       init_checkpoint=cfg.model.init_checkpoint,
                       freeze_backbone=cfg.model.freeze_backbone)


def _restore(ckpt_path: Path, state: TrainingState) -> None:
    """Load a checkpoint into the training state (the model not yet wrapped for DDP)."""
    payload = load_checkpoint(ckpt_path)
    unwrap(state.model).load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.scaler is not None and payload.get("scaler"):
        state.scaler.load_state_dict(payload["scaler"])
    state.done, state.step = int(payload["epoch"]), int(payload["step"])
    best = payload.get("best_val_mean_iou", payload["metrics"].get("best_val_mean_iou"))
    state.best = -math.inf if best is None else float(best)
    state.random_states = payload.get("random_states")


def _mean_terms(sums: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in sums.items()}


def gamma_for(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The weight of L_pix at global ``step`` under the config's schedule (Eq. 8)."""
    return gamma_at(step, steps_per_epoch, gamma_max=cfg.loss.gamma_max,
                    warmup_epochs=cfg.loss.gamma_warmup_epochs, shape=cfg.loss.gamma_schedule,
                    delay_epochs=cfg.loss.gamma_delay_epochs)


class TimedBatches:
    """Iterate ``batches`` and measure the time spent waiting for each one (``waited``, s) and
    the time from ``start`` to the first batch (``startup``, s)."""

    def __init__(self, batches: Iterable[dict[str, Any]], start: float):
        self._iter, self.start = iter(batches), start
        self.waited = 0.0
        self.startup: float | None = None

    def __iter__(self):
        while True:
            before = time.perf_counter()
            batch = next(self._iter, None)
            now = time.perf_counter()
            self.waited += now - before
            if batch is None:
                return
            if self.startup is None:
                self.startup = now - self.start
            yield batch


def training_autocast(device: torch.device, cfg: Config, scaler) -> torch.autocast:
    """The training step's autocast: fp16 with a grad scaler on CUDA (``optim.amp``), bfloat16
    on CPU (``optim.cpu_bf16``), else off. Losses and pseudo labels are computed in float32."""
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.optim.cpu_bf16)
    return torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None)


def optimizer_step(model, optimizer, scaler, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, optional gradient clipping and the update; with AMP when ``scaler`` is set."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clipping sees true gradients
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_step(state: TrainingState, batch: dict[str, Any], cfg: Config, device, *, gamma: float,
               attention=None):
    """One optimizer step on ``batch`` (numpy columns); returns the step's result (loss terms,
    pseudo labels) and the batch as tensors on ``device``."""
    batch = to_device(batch, device)
    if cfg.optim.channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    with training_autocast(device, cfg, state.scaler):
        result = compute_losses(state.model, batch, mode=cfg.loss.mode, sigma=cfg.pseudo.sigma,
                                gamma=gamma, binarize_at=cfg.pseudo.binarize_at,
                                pixel=cfg.loss.pixel, pixel_region=cfg.loss.pixel_region,
                                attention=attention, align_weight=cfg.loss.align_weight)
    loss = result.terms["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {state.step}")
    optimizer_step(state.model, state.optimizer, state.scaler, loss, cfg.optim.grad_clip)
    return result, batch


def train_one_epoch(state: TrainingState, worker: Worker, feed: Feed, cfg: Config, *,
                    epoch: int, steps_per_epoch: int, log, epoch_start: float | None = None,
                    attention=None) -> tuple[dict[str, float], AttentionMeter]:
    """One pass over this worker's shard (``epoch``: the 0-based index). Returns (mean loss
    terms + throughput + ``steps``, this worker's batches; GradCAM's health over this worker's
    samples). ``state.step`` is left as it was: the loop adds the epoch's steps of all workers.

    ``startup_s`` is the time from ``epoch_start`` (default: now) to the first batch;
    ``data_wait`` the share of the epoch spent waiting for batches. ``attention``: the
    GradCAM source (:mod:`gtms.pseudo.attention_source`; default the model's own towers).
    """
    state.model.train()
    sums: dict[str, float] = {}
    health = AttentionMeter()
    batches = samples = 0
    step, start = state.step, time.perf_counter()
    timed = TimedBatches(feed.train_batches(epoch, cfg.train.batch_size),
                         start if epoch_start is None else epoch_start)
    # Uneven shards (every ref exactly once per epoch) are handled by DDP's join().
    joiner = state.model.join() if hasattr(state.model, "join") else contextlib.nullcontext()
    progress = Progress(f"epoch {epoch + 1}/{cfg.train.epochs}", steps_per_epoch, unit="step",
                        enabled=log is not None, final_line=False)
    with joiner, progress:
        for batch in timed:
            result, tensors = train_step(state, batch, cfg, worker.device, attention=attention,
                                         gamma=gamma_for(cfg, step, steps_per_epoch))
            add_attention(health, result.pseudo, tensors)
            terms = {k: float(v.detach()) for k, v in result.terms.items()}
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            batches, samples, step = batches + 1, samples + len(batch["image"]), step + 1
            if batches == 1:
                killpoints.reached("mid_epoch", epoch + 1)
            progress.update(samples=len(batch["image"]))
            if log and step % cfg.train.log_every == 0:
                log.scalars("train_step", terms, step)
    return _epoch_stats(sums, batches, samples, start, timed), health


def _epoch_stats(sums: dict[str, float], batches: int, samples: int, start: float,
                 timed: TimedBatches) -> dict[str, float]:
    seconds = time.perf_counter() - start
    stats = _mean_terms(sums, batches)
    startup = timed.startup if timed.startup is not None else time.perf_counter() - timed.start
    stats.update(steps=batches, samples=samples, seconds=seconds,
                 samples_per_s=samples / max(seconds, 1e-9),
                 data_wait=timed.waited / max(seconds, 1e-9), startup_s=startup)
    return stats


def should_validate(epoch: int, epochs: int, val_every: int) -> bool:
    """Validate after epoch ``epoch`` (counted from 1) every ``val_every`` epochs and always
    after the last one."""
    return epoch % val_every == 0 or epoch == epochs


def gather_bad_rows(worker: Worker, feed: Feed, epoch: int) -> dict[str, int]:
    """Every worker's bad-row counts of ``epoch``, summed, as ``skipped_<role>_<reason>``
    metrics (each row is counted by the one worker that received it)."""
    total: Counter = Counter()
    for part in worker.gather(feed.bad_rows(epoch)):
        for role, counts in part.items():
            total.update({f"skipped_{role}_{reason}": n for reason, n in counts.items()})
    return dict(total)


def _epoch_totals(worker: Worker, stats: dict[str, float]) -> tuple[int, float]:
    """(optimizer steps of the epoch, samples per second of all workers together).

    Under DDP's ``join()`` a worker whose shard ran out shadows the others' steps, so the epoch
    takes as many optimizer steps as the worker with the most batches had; the rate is all
    samples over the slowest worker's time."""
    parts = worker.gather((stats["steps"], stats["samples"], stats["seconds"]))
    return (max(b for b, _, _ in parts),
            sum(n for _, n, _ in parts) / max(max(s for _, _, s in parts), 1e-9))


def merged_attention(worker: Worker, meter: AttentionMeter) -> AttentionMeter:
    """Every worker's GradCAM health, summed (exact: counts and sums)."""
    total = AttentionMeter()
    for part in worker.gather(meter):
        total = total.merge(part)
    return total


def validate(model, worker: Worker, feed: Feed, cfg: Config,
             attention=None) -> tuple[dict[str, float], Any]:
    """Score this worker's part of the validation split, gather all workers' results."""
    model.eval()
    meters = new_meters()
    pseudo_mode = cfg.loss.mode if get_mode(cfg.loss.mode).pseudo_label else QUALITY_MODE
    first, startup, start = None, None, time.perf_counter()
    progress = Progress("validating", unit="batch", enabled=worker.rank == 0, final_line=False)
    for batch in feed.val_batches(cfg.train.eval_batch_size):
        if startup is None:
            startup = time.perf_counter() - start
        result = validation_step(model, batch, meters, input_size=cfg.data.input_size,
                                 threshold=cfg.train.threshold, pseudo_mode=pseudo_mode,
                                 sigma=cfg.pseudo.sigma, binarize_at=cfg.pseudo.binarize_at,
                                 attention=attention)
        progress.update(samples=len(batch["image"]))
        if first is None:
            first = (batch, result)
    progress.close()
    metrics = validation_metrics(worker.gather((meters.prediction, meters.pseudo_label,
                                                meters.weights, meters.attention)))
    metrics["val_startup_s"] = startup if startup is not None else time.perf_counter() - start
    metrics["val_seconds"] = time.perf_counter() - start
    return metrics, first


def validation_metrics(gathered: list[tuple]) -> dict[str, float]:
    """The ``val_*`` metrics of every worker's validation meters, merged."""
    merged = [SegmentationMeter() for _ in range(3)] + [AttentionMeter()]
    for part in gathered:
        merged = [m.merge(p) for m, p in zip(merged, part)]
    metrics = {f"val_{k}": v for k, v in merged[0].summary().items()}
    for name, meter in (("pseudo_label", merged[1]), ("weights", merged[2])):
        if len(meter):
            summary = meter.summary()
            metrics[f"val_{name}_mean_iou"] = summary["mean_iou"]
            metrics[f"val_{name}_overall_iou"] = summary["overall_iou"]
    if len(merged[3]):
        metrics.update({f"val_{k}": v for k, v in merged[3].summary().items()})
    return metrics


def start_training(cfg: Config, worker: Worker) -> tuple[TrainingState, Path | None]:
    """The model, optimizer and schedule, restored from the worker's latest checkpoint when
    there is one (a resumed run: returned too), the model prepared for the worker (DDP)."""
    model = initial_model(cfg, worker.rank).to(worker.device)
    optimizer = build_optimizer(model, cfg.optim)
    amp = cfg.optim.amp and worker.device.type == "cuda"
    state = TrainingState(model, optimizer, build_scheduler(optimizer, cfg.optim),
                          torch.amp.GradScaler("cuda") if amp else None)
    latest = worker.latest_checkpoint()
    if latest is not None:
        _restore(latest, state)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state.model = worker.prepare_model(model)
    return state, latest


def run_epoch(state: TrainingState, worker: Worker, feed: Feed, cfg: Config, index: int, *,
              steps_per_epoch: int, log, attention: dict) -> tuple[dict[str, Any], Any]:
    """Train epoch ``index`` (0-based) and validate when due; returns the epoch's metrics
    (every worker's, merged) and the first validation batch with its result (image grids)."""
    epoch_start = time.perf_counter()
    feed.set_epoch(index)
    lr = state.optimizer.param_groups[-1]["lr"]
    stats, health = train_one_epoch(state, worker, feed, cfg, epoch=index, log=log,
                                    steps_per_epoch=steps_per_epoch, epoch_start=epoch_start,
                                    attention=attention["train"])
    health = merged_attention(worker, health)
    if len(health):
        stats.update(health.summary())
    stats["steps"], stats["samples_per_s_total"] = _epoch_totals(worker, stats)
    state.step += stats["steps"]
    if get_mode(cfg.loss.mode).pseudo_label:  # gamma weighs L_pix, which only they have
        stats["gamma"] = gamma_for(cfg, state.step, steps_per_epoch)
    state.scheduler.step()
    val, first = {}, None
    if should_validate(index + 1, cfg.train.epochs, cfg.train.val_every):
        val, first = validate(state.model, worker, feed, cfg, attention["val"])
    metrics = {"epoch": index + 1, "step": state.step, "lr": lr,
               **{f"train_{k}": v for k, v in stats.items()}, **val}
    metrics.update(gather_bad_rows(worker, feed, index))
    return metrics, first


def report_epoch(state: TrainingState, worker: Worker, cfg: Config,
                 metrics: dict[str, Any]) -> None:
    """Report the epoch's metrics, with rank 0's checkpoint of the whole training state: the
    weights, optimizer, schedule, every rank's random generators and the best score so far."""
    random_states = worker.gather(random_state.capture())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = None
        if worker.rank == 0:
            checkpoint_dir = Path(tmp)
            model = unwrap(state.model)
            save_checkpoint(
                checkpoint_dir, model=model.state_dict(),
                optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                scaler=state.scaler.state_dict() if state.scaler else None,
                epoch=metrics["epoch"], step=state.step, config=config_to_dict(cfg),
                arch=model.arch.to_dict(), metrics=metrics, random_states=random_states,
                best_val_mean_iou=None if state.best == -math.inf else state.best)
        worker.report(metrics, checkpoint_dir,
                      checkpoint_name=checkpoint_dir_name(metrics["epoch"]))


def train_loop(cfg: Config, worker: Worker, feed: Feed, *, run_dir: str | None,
               steps_per_epoch: int, log_tag: str = "",
               tracking: dict | None = None) -> dict[str, Any]:
    """Train ``cfg`` on ``worker`` with batches from ``feed``; returns the last epoch's
    metrics. A resumed run continues from the worker's latest checkpoint exactly: its
    generators are restored last, just before the first epoch, and the run log keeps only the
    epochs that checkpoint finished. ``tracking``: the tracker runs' labels and environment
    (:mod:`gtms.tracking`)."""
    state, latest = start_training(cfg, worker)
    attention = attention_sources(cfg, worker.device)
    log = None
    if worker.rank == 0 and run_dir:
        log = RunLogger(run_dir, done_epochs=state.done, done_steps=state.step, tag=log_tag,
                        cfg=cfg, tracking=tracking)
    try:
        metrics = train_epochs(state, worker, feed, cfg, log=log, latest=latest,
                               steps_per_epoch=steps_per_epoch, attention=attention)
    except BaseException:
        if log:
            log.close(failed=True)
        raise
    if log:
        log.close()
    return metrics


def train_epochs(state: TrainingState, worker: Worker, feed: Feed, cfg: Config, *, log,
                 latest, steps_per_epoch: int, attention) -> dict[str, Any]:
    """The epochs left after ``state.done``, each reported with its checkpoint."""
    if state.done:
        resume_random_state(state, worker, log)
        if log:
            log.console(f"resuming at epoch {state.done + 1} (after {state.step} steps) from "
                        f"{latest}")
    metrics = {}
    for index in range(state.done, cfg.train.epochs):
        metrics, first = run_epoch(state, worker, feed, cfg, index, log=log,
                                   steps_per_epoch=steps_per_epoch, attention=attention)
        state.best = max(state.best, metrics.get("val_mean_iou", -math.inf))
        if state.best > -math.inf:
            metrics["best_val_mean_iou"] = state.best
        if log:
            log.epoch(metrics, cfg.train.epochs)
            every = cfg.train.image_grid_every
            if every and metrics["epoch"] % every == 0 and first is not None:
                log.image_grid(first[0], first[1], state.step)
        killpoints.reached("after_metrics", metrics["epoch"])
        report_epoch(state, worker, cfg, metrics)
        if log:
            log.committed(metrics)
    return metrics


def resume_random_state(state: TrainingState, worker: Worker, log) -> None:
    """This rank's generators as the checkpoint saved them; a checkpoint without them (older)
    or of another worker count resumes with fresh ones, and says so."""
    states = state.random_states
    if states and len(states) == worker.world_size:
        random_state.restore(states[worker.rank])
    elif log:
        log.console("note: the checkpoint has no random state for this worker count; the "
                    "resumed epochs draw different random numbers than an uninterrupted run")
