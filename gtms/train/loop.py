"""The training loop. It runs alone (one plain process, ``--no-ray``) or per Ray Train worker.

Everything Ray-specific sits behind a :class:`LoopContext`: where batches come from, how metrics
and checkpoints are reported, the last checkpoint to resume from, and gathering validation
results across workers. :func:`train_loop` itself only knows torch.

Epochs are counted from 1 in everything a run records or prints (``metrics.jsonl``, checkpoints,
their folder names, the console). The ``epoch`` arguments of a :class:`LoopContext` are the
0-based index that seeds each epoch's data order.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gtms.config import Config, config_from_dict, config_to_dict
from gtms.console import Progress
from gtms.eval.attention import attention_sources
from gtms.eval.metrics import AttentionMeter, SegmentationMeter
from gtms.model.build import build_model
from gtms.modes import QUALITY_MODE, get_mode
from gtms.pseudo import gamma_at
from gtms.train.checkpoint import load_checkpoint, save_checkpoint
from gtms.train.optim import build_optimizer, build_scheduler
from gtms.train.runlog import RunLogger
from gtms.train.step import (
    add_attention,
    compute_losses,
    new_meters,
    to_device,
    unwrap,
    validation_step,
)


class LoopContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def set_epoch(self, epoch: int) -> None: ...
    def train_batches(self, epoch: int, batch_size: int) -> Iterable[dict[str, Any]]: ...
    def val_batches(self, batch_size: int) -> Iterable[dict[str, Any]]: ...
    def bad_rows(self, epoch: int) -> dict[str, dict[str, int]]: ...
    def latest_checkpoint(self) -> Path | None: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...
    def gather(self, obj: Any) -> list[Any]: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initial_model(cfg: Config, rank: int = 0) -> torch.nn.Module:
    """The model before its first step: the global RNGs seeded with ``train.seed + rank``, then
    built. Nothing between the two depends on ``loss.mode``, so the Table 2 rows of one seed
    start from the same weights (the data order is the seed's too:
    :func:`gtms.train.contexts.row_positions`)."""
    seed_everything(cfg.train.seed + rank)
    return build_model(cfg.model.preset, word_len=cfg.data.word_len,
                       clip_weights=cfg.model.clip_weights,
                       init_checkpoint=cfg.model.init_checkpoint,
                       freeze_backbone=cfg.model.freeze_backbone)


def _restore(ckpt_path: Path, model, optimizer, scheduler, scaler) -> tuple[int, int]:
    """Load a checkpoint into the training state; returns (epochs finished, optimizer steps)."""
    payload = load_checkpoint(ckpt_path)
    unwrap(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    return int(payload["epoch"]), int(payload["step"])


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


def train_one_epoch(model, optimizer, scaler, ctx: LoopContext, cfg: Config, *, epoch: int,
                    step: int, steps_per_epoch: int, log,
                    epoch_start: float | None = None,
                    attention=None) -> tuple[int, dict[str, float], AttentionMeter]:
    """One pass over this worker's shard (``epoch``: the 0-based index). Returns (this worker's
    global step, mean loss terms + throughput + ``steps``, this worker's batches; GradCAM's
    health over this worker's samples).

    ``startup_s`` is the time from ``epoch_start`` (default: now) to the first batch;
    ``data_wait`` the share of the epoch spent waiting for batches. ``attention``: the
    GradCAM source (:mod:`gtms.pseudo.attention_source`; default the model's own towers).
    """
    model.train()
    sums: dict[str, float] = {}
    health = AttentionMeter()
    batches = samples = 0
    start = time.perf_counter()
    timed = TimedBatches(ctx.train_batches(epoch, cfg.train.batch_size),
                         start if epoch_start is None else epoch_start)
    # Uneven shards (every ref exactly once per epoch) are handled by DDP's join().
    joiner = model.join() if hasattr(model, "join") else contextlib.nullcontext()
    progress = Progress(f"epoch {epoch + 1}/{cfg.train.epochs}", steps_per_epoch, unit="step",
                        enabled=log is not None, final_line=False)
    with joiner, progress:
        for batch in timed:
            batch = to_device(batch, ctx.device)
            if cfg.optim.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            with training_autocast(ctx.device, cfg, scaler):
                result = compute_losses(model, batch, mode=cfg.loss.mode, sigma=cfg.pseudo.sigma,
                                        gamma=gamma_for(cfg, step, steps_per_epoch),
                                        binarize_at=cfg.pseudo.binarize_at,
                                        pixel=cfg.loss.pixel,
                                        pixel_region=cfg.loss.pixel_region,
                                        attention=attention,
                                        align_weight=cfg.loss.align_weight)
            add_attention(health, result.pseudo, batch)
            loss = result.terms["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} "
                                         f"step {step}")
            optimizer_step(model, optimizer, scaler, loss, cfg.optim.grad_clip)
            terms = {k: float(v.detach()) for k, v in result.terms.items()}
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            batches += 1
            samples += len(batch["image"])
            step += 1
            progress.update(samples=len(batch["image"]))
            if log and step % cfg.train.log_every == 0:
                log.scalars("train_step", terms, step)
    seconds = time.perf_counter() - start
    stats = _mean_terms(sums, batches)
    startup = timed.startup if timed.startup is not None else time.perf_counter() - timed.start
    stats.update(steps=batches, samples=samples, seconds=seconds,
                 samples_per_s=samples / max(seconds, 1e-9),
                 data_wait=timed.waited / max(seconds, 1e-9), startup_s=startup)
    return step, stats, health


def should_validate(epoch: int, epochs: int, val_every: int) -> bool:
    """Validate after epoch ``epoch`` (counted from 1) every ``val_every`` epochs and always
    after the last one."""
    return epoch % val_every == 0 or epoch == epochs


def gather_bad_rows(ctx: LoopContext, epoch: int) -> dict[str, dict[str, int]]:
    """Every worker's bad-row counts of ``epoch``, summed per role and reason (each row is
    counted by the one worker that received it)."""
    total: dict[str, Counter] = {}
    for part in ctx.gather(ctx.bad_rows(epoch)):
        for role, counts in part.items():
            total.setdefault(role, Counter()).update(counts)
    return {role: dict(counts) for role, counts in total.items()}


def _epoch_totals(ctx: LoopContext, stats: dict[str, float]) -> tuple[int, float]:
    """(optimizer steps of the epoch, samples per second of all workers together).

    Under DDP's ``join()`` a worker whose shard ran out shadows the others' steps, so the epoch
    takes as many optimizer steps as the worker with the most batches had; the rate is all
    samples over the slowest worker's time."""
    parts = ctx.gather((stats["steps"], stats["samples"], stats["seconds"]))
    return (max(b for b, _, _ in parts),
            sum(n for _, n, _ in parts) / max(max(s for _, _, s in parts), 1e-9))


def merged_attention(ctx: LoopContext, meter: AttentionMeter) -> AttentionMeter:
    """Every worker's GradCAM health, summed (exact: counts and sums)."""
    total = AttentionMeter()
    for part in ctx.gather(meter):
        total = total.merge(part)
    return total


def validate(model, ctx: LoopContext, cfg: Config,
             attention=None) -> tuple[dict[str, float], Any]:
    """Score this worker's part of the validation split, gather all workers' results."""
    model.eval()
    meters = new_meters()
    pseudo_mode = cfg.loss.mode if get_mode(cfg.loss.mode).pseudo_label else QUALITY_MODE
    first = None
    start = time.perf_counter()
    startup = None
    progress = Progress("validating", unit="batch", enabled=ctx.rank == 0, final_line=False)
    for batch in ctx.val_batches(cfg.train.eval_batch_size):
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
    gathered = ctx.gather((meters.prediction, meters.pseudo_label, meters.weights,
                           meters.attention))
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
    metrics["val_startup_s"] = startup if startup is not None else time.perf_counter() - start
    metrics["val_seconds"] = time.perf_counter() - start
    return metrics, first


def train_loop(config: dict, ctx: LoopContext, *, run_dir: str | None,
               steps_per_epoch: int) -> dict[str, Any]:
    """Train ``config`` (a plain dict of the resolved Config) under ``ctx``."""
    cfg = config_from_dict(config, "<run config>")
    model = initial_model(cfg, ctx.rank).to(ctx.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    amp = cfg.optim.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    done, step = 0, 0   # epochs finished, optimizer steps taken
    latest = ctx.latest_checkpoint()
    if latest is not None:
        done, step = _restore(latest, model, optimizer, scheduler, scaler)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ctx.prepare_model(model)
    attention = attention_sources(cfg, ctx.device)
    log = RunLogger(run_dir) if (ctx.rank == 0 and run_dir) else None
    if log and done:
        log.console(f"resuming at epoch {done + 1} (after {step} steps) from {latest}")
    best = -math.inf
    metrics: dict[str, Any] = {}
    for index in range(done, cfg.train.epochs):
        epoch = index + 1   # counted from 1, as printed and recorded
        epoch_start = time.perf_counter()
        ctx.set_epoch(index)
        lr = optimizer.param_groups[-1]["lr"]
        steps_before = step
        _, stats, health = train_one_epoch(model, optimizer, scaler, ctx, cfg, epoch=index,
                                           step=step, steps_per_epoch=steps_per_epoch, log=log,
                                           epoch_start=epoch_start, attention=attention["train"])
        health = merged_attention(ctx, health)
        if len(health):
            stats.update(health.summary())
        stats["steps"], stats["samples_per_s_total"] = _epoch_totals(ctx, stats)
        step = steps_before + stats["steps"]   # the same on every worker
        if get_mode(cfg.loss.mode).pseudo_label:  # gamma weighs L_pix, which only they have
            stats["gamma"] = gamma_for(cfg, step, steps_per_epoch)
        scheduler.step()
        val, first = {}, None
        if should_validate(epoch, cfg.train.epochs, cfg.train.val_every):
            val, first = validate(model, ctx, cfg, attention["val"])
        metrics = {"epoch": epoch, "step": step, "lr": lr,
                   **{f"train_{k}": v for k, v in stats.items()}, **val}
        for split, counts in gather_bad_rows(ctx, index).items():
            for reason, count in counts.items():
                metrics[f"skipped_{split}_{reason}"] = count
        best = max(best, metrics.get("val_mean_iou", -math.inf))
        if best > -math.inf:
            metrics["best_val_mean_iou"] = best
        if log:
            log.epoch(metrics, cfg.train.epochs)
            if cfg.train.image_grid_every and epoch % cfg.train.image_grid_every == 0 \
                    and first is not None:
                log.image_grid(first[0], first[1], step)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = None
            if ctx.rank == 0:
                checkpoint_dir = Path(tmp)
                save_checkpoint(
                    checkpoint_dir, model=unwrap(model).state_dict(),
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler else None, epoch=epoch, step=step,
                    config=config_to_dict(cfg), arch=unwrap(model).arch.to_dict(),
                    metrics=metrics)
            ctx.report(metrics, checkpoint_dir)
    if log:
        log.close()
    return metrics
