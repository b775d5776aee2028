"""The SynthCLIP training loop: a worker function (:mod:`gtms.backend`) that runs in this
process or on Ray Train's workers.

``pretrain_loop(loop_config, worker)`` reads the pair arrays from an ``.npz`` file, takes its
rank's share of each epoch's shuffled order (every rank sees the same number of batches), trains
:class:`SynthCLIP` with AdamW and a cosine schedule, and reports one line of metrics per epoch;
after the last epoch rank 0 reports the backbone's weights and every epoch's metrics as a
checkpoint (:func:`gtms.model.checkpoint.save_backbone_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtms import console
from gtms.backend import Worker
from gtms.model.build import CRISArch, build_from_arch
from gtms.model.checkpoint import save_backbone_checkpoint
from gtms.pretrain.data import PairSet, ProbeSet, to_model_input
from gtms.pretrain.metrics import pointing, recall_at_k
from gtms.pretrain.objective import SynthCLIP, contrastive_loss
from gtms.pseudo.gradcam import gradcam_attention, gradcam_map

WEIGHTS_NAME = "clip.pt"
FINAL_CHECKPOINT = "checkpoint_final"   # the folder rank 0 reports after the last epoch
WARMUP_FRACTION = 0.05  # of all steps, linear warm-up before the cosine decay


def save_pairs(pairs: PairSet, path: Path) -> None:
    np.savez(path, **dataclasses.asdict(pairs))


def load_pairs(path: str | Path) -> PairSet:
    with np.load(path) as z:
        return PairSet(**{f.name: z[f.name] for f in dataclasses.fields(PairSet)})


def epoch_batches(pairs: PairSet, *, seed: int, epoch: int, batch_size: int, rank: int,
                  world: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's ``(expression ids, crop ids)`` per step of ``epoch``.

    Scenes (each with this epoch's expression) and crops are shuffled and spread evenly over
    the steps, so every batch mixes both; each step's share is cut to a multiple of ``world``
    and dealt out round-robin, so all ranks run the same number of equal-sized steps.
    """
    rng = np.random.default_rng([seed, epoch])
    expressions = rng.permutation(pairs.epoch_expressions(seed, epoch))
    crops = rng.permutation(len(pairs.crop_images))
    steps = max(1, len(pairs) // batch_size)
    out = []
    for scene_part, crop_part in zip(np.array_split(expressions, steps),
                                     np.array_split(crops, steps)):
        scene_part = scene_part[:len(scene_part) - len(scene_part) % world]
        crop_part = crop_part[:len(crop_part) - len(crop_part) % world]
        out.append((scene_part[rank::world], crop_part[rank::world]))
    return out


def build_synthclip(arch: CRISArch, seed: int) -> SynthCLIP:
    torch.manual_seed(seed)
    return SynthCLIP(build_from_arch(arch).backbone)


def pretrain_loop(loop_config: dict[str, Any], worker: Worker) -> None:
    """Train SynthCLIP on ``worker``; rank 0 reports the result in the final checkpoint."""
    rank, world = worker.rank, worker.world_size
    torch.set_num_threads(worker.threads)
    pairs = load_pairs(loop_config["pairs_path"])
    model = build_synthclip(CRISArch.from_dict(loop_config["arch"]), loop_config["seed"])
    trained = worker.prepare_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=loop_config["lr"], weight_decay=loop_config["weight_decay"])
    plan = [epoch_batches(pairs, seed=loop_config["seed"], epoch=e,
                          batch_size=loop_config["batch_size"], rank=rank, world=world)
            for e in range(loop_config["epochs"])]
    total = sum(len(steps) for steps in plan)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(i, total))
    history = []
    for epoch, steps in enumerate(plan):
        metrics = pretrain_epoch(trained, optimizer, schedule, pairs, steps, world=world,
                                 title=f"pretrain epoch {epoch + 1}/{len(plan)}",
                                 progress=rank == 0)
        history.append({"epoch": epoch + 1, **metrics})
        if rank == 0:
            console.say(_epoch_line(history[-1]))
        _report(worker, history, model, last=epoch + 1 == len(plan))


def pretrain_epoch(trained, optimizer, schedule, pairs: PairSet, steps: list, *, world: int,
                   title: str, progress: bool) -> dict[str, float]:
    """One epoch of ``steps`` (:func:`epoch_batches`); returns its loss, temperature and
    rate."""
    trained.train()
    start, losses, seen = time.perf_counter(), [], 0
    bar = console.Progress(title, len(steps), unit="step", enabled=progress, final_line=False)
    for expressions, crops in steps:
        scenes = pairs.scene_of_text[expressions]
        image, text, scale = trained(
            to_model_input(pairs.scene_images[scenes]),
            torch.as_tensor(pairs.scene_tokens[expressions]),
            to_model_input(pairs.crop_images[crops]),
            torch.as_tensor(pairs.crop_tokens[crops]))
        text_ids = torch.as_tensor(np.concatenate([pairs.scene_text[expressions],
                                                   pairs.crop_text[crops]]))
        image, text, text_ids = _gather_batch(image, text, text_ids, world)
        loss = contrastive_loss(image, text, scale, text_ids)["loss"]
        optimizer.zero_grad(set_to_none=True)
        (loss * world).backward()  # DDP averages gradients over ranks; the loss is global
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        seen += len(text_ids)
        bar.update(samples=len(text_ids))
    bar.close()
    return {"loss": float(np.mean(losses)), "temperature": float(1 / scale.detach()),
            "pairs_per_s": seen / (time.perf_counter() - start)}


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _gather_batch(image, text, ids, world):
    """Every rank's embeddings, so each rank's loss sees the global batch's negatives; the
    local rows keep their gradient (the all-gathered copies carry none)."""
    if world == 1:
        return image, text, ids
    import torch.distributed as dist

    parts = [[torch.zeros_like(t) for _ in range(world)] for t in (image, text, ids)]
    for out, t in zip(parts, (image, text, ids)):
        dist.all_gather(out, t.detach().contiguous())
    rank = dist.get_rank()
    parts[0][rank], parts[1][rank] = image, text
    return torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2])


def _report(worker: Worker, history: list[dict], model: SynthCLIP, *, last: bool) -> None:
    """Report the epoch's metrics; after the last epoch, rank 0 adds the final checkpoint
    (the backbone's weights and every epoch's metrics)."""
    if not (last and worker.rank == 0):
        worker.report(history[-1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_backbone_checkpoint(tmp, model.backbone.state_dict(), history)
        worker.report(history[-1], Path(tmp), checkpoint_name=FINAL_CHECKPOINT)


def _epoch_line(m: dict) -> str:
    return (f"pretrain epoch {m['epoch']}: contrastive loss {m['loss']:.3f}, temperature "
            f"{m['temperature']:.3f}, {m['pairs_per_s']:.0f} pairs/s")


@torch.no_grad()
def probe_metrics(model: SynthCLIP, probe: ProbeSet, *, batch_size: int = 64) -> dict:
    """Retrieval and GradCAM pointing of ``model`` on ``probe`` (see :mod:`metrics`)."""
    model.eval()
    backbone = model.backbone
    scene_emb = torch.cat([
        torch.nn.functional.normalize(model.image_embedding(to_model_input(chunk)), dim=-1)
        for chunk in _chunks(probe.images, batch_size)])
    text_emb, raw, attention = [], [], []
    for lo in range(0, len(probe), batch_size):
        sl = slice(lo, lo + batch_size)
        sentence = backbone.encode_text(torch.as_tensor(probe.tokens[sl])).sentence
        text_emb.append(torch.nn.functional.normalize(sentence, dim=-1))
        layer4 = model.layer4(to_model_input(probe.images[probe.image_index[sl]]))
        box = torch.as_tensor(probe.box_at_stride4[sl])
        raw.append(gradcam_map(layer4, sentence, backbone.global_image_embedding,
                               box.shape[-2:]).numpy())
        attention.append(gradcam_attention(layer4, sentence, backbone.global_image_embedding,
                                           box).numpy())
    out = recall_at_k(torch.cat(text_emb), scene_emb, probe.image_index)
    out.update(pointing(np.concatenate(raw), np.concatenate(attention), probe.box_at_stride4,
                        probe.mask_at_stride4))
    return out


def _chunks(array: np.ndarray, size: int):
    for lo in range(0, len(array), size):
        yield array[lo:lo + size]
