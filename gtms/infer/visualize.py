"""``run.py visualize``: Fig. 5-style panels of a split, computed in this process (no Ray).

Rows of the prepared dataset are read with pyarrow (:func:`gtms.data.reading.iter_shard_rows`)
and preprocessed with the validation spec (trees, forest, ground truth, eval meta). The model
predicts and the GTMS pseudo labels are made in mode ``forest-gradcam`` whatever the checkpoint
was trained with, so every checkpoint shows what full GTMS would have trained it towards. Per
sample one PNG of seven panels (image + box + sentence, structural forest, GradCAM attention A,
vertex weights W, pseudo label P-hat, prediction, ground truth), plus a contact sheet of all
samples and ``samples.jsonl`` (IoU of the prediction and of P-hat).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtms.config import Config
from gtms.data.pipeline import (
    BadRowError,
    SampleSpec,
    preprocess_ref,
    spec_for,
    stack_samples,
)
from gtms.data.reading import iter_shard_rows
from gtms.data.shards import verify_shards
from gtms.data.tokenizer import ClipTokenizer
from gtms.errors import UserError
from gtms.eval.attention import attention_sources
from gtms.eval.metrics import iou_from_counts
from gtms.eval.validation import new_meters, pseudo_labels_for, to_device, validation_step
from gtms.pseudo.attention_source import AttentionSource
from gtms.viz import PANEL_TITLES, sample_row, write_png

PSEUDO_MODE = "forest-gradcam"
CONTACT_SHEET = "contact_sheet.png"
RECORDS_FILE = "samples.jsonl"


class VisualizeError(UserError, ValueError):
    """The split to draw is missing or has no usable sample."""


@dataclass
class SampleFigure:
    """What was drawn for one sample."""

    ref_id: int
    sent_index: int
    sentence: str
    iou: float                  # prediction vs mask, original resolution (CRIS protocol)
    pseudo_label_iou: float     # P-hat > threshold vs mask, at stride 4
    attention_fallback: bool    # GradCAM's map was zero in the box: A = W = box
    path: str = ""


def collect_samples(root: str, split: str, spec: SampleSpec, n: int, *,
                    all_sentences: bool = False,
                    seed: int | None = None) -> tuple[list[dict[str, Any]], Counter]:
    """The first ``n`` samples of a split (one sentence per ref unless ``all_sentences``; refs
    in shard order, or shuffled with ``seed``) and the bad rows skipped, by reason."""
    tokenizer = ClipTokenizer()
    samples: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for row in iter_shard_rows(root, split, shuffle_seed=seed):
        try:
            produced = preprocess_ref(row, spec, tokenizer)
        except BadRowError as err:
            skipped[err.reason] += 1
            continue
        samples.extend(produced if all_sentences else produced[:1])
        if len(samples) >= n:
            break
    return samples[:n], skipped


def draw_samples(model: torch.nn.Module, cfg: Config, samples: list[dict[str, Any]],
                 spec: SampleSpec, *, panel_size: int, batch_size: int = 8,
                 attention: AttentionSource | None = None,
                 ) -> list[tuple[SampleFigure, np.ndarray]]:
    """Predict, make the pseudo labels and draw one row of panels per sample. ``attention``:
    GradCAM's source (default: :func:`panel_attention` of ``cfg``)."""
    model.eval()
    out = []
    device = next(model.parameters()).device
    attention = attention or panel_attention(cfg, device)
    for start in range(0, len(samples), batch_size):
        batch = stack_samples(samples[start:start + batch_size], spec)
        meters = new_meters()
        result = validation_step(model, batch, meters, input_size=cfg.data.input_size,
                                 threshold=cfg.train.threshold, pseudo_mode=PSEUDO_MODE,
                                 sigma=cfg.pseudo.sigma, binarize_at=cfg.pseudo.binarize_at,
                                 attention=attention)
        fallback = result["pseudo"].fallback.cpu().numpy()
        ious = iou_from_counts(meters.prediction.inter, meters.prediction.union)
        pseudo_ious = iou_from_counts(meters.pseudo_label.inter, meters.pseudo_label.union)
        for i in range(len(batch["image"])):
            titles = list(PANEL_TITLES)
            titles[4] = f"{PANEL_TITLES[4]} (IoU {100 * pseudo_ious[i]:.0f} %)"
            titles[5] = f"{PANEL_TITLES[5]} (IoU {100 * ious[i]:.0f} %)"
            row = np.concatenate(sample_row(batch, result, i, panel_size=panel_size,
                                            titles=titles), axis=1)
            figure = SampleFigure(int(batch["ref_id"][i]), int(batch["sent_index"][i]),
                                  str(batch["sentence"][i]), round(float(ious[i]), 4),
                                  round(float(pseudo_ious[i]), 4), bool(fallback[i]))
            out.append((figure, row))
    return out


def panel_attention(cfg: Config, device: torch.device) -> AttentionSource:
    """Where the panels' GradCAM map comes from (``pseudo.attention_source`` of ``cfg``)."""
    return attention_sources(cfg, device, roles=("val",))["val"]


@torch.no_grad()
def draw_without_truth(model: torch.nn.Module, cfg: Config, samples: list[dict[str, Any]],
                       spec: SampleSpec, *, panel_size: int,
                       attention: AttentionSource | None = None) -> list[np.ndarray]:
    """The panels of samples that have a box but no ground-truth mask (an image of your own in
    ``run.py demo``): the same prediction and pseudo labels as :func:`draw_samples`, unscored,
    the ground-truth panel left blank. ``samples`` come from :func:`preprocess_ref` with
    ``spec`` (evaluation rows, tree and forest, no mask), each given its ``sentence``."""
    model.eval()
    device = next(model.parameters()).device
    batch = stack_samples(samples, spec)
    tensors = to_device({k: v for k, v in batch.items() if k != "sentence"}, device)
    out = model(tensors["image"], tensors["tokens"])
    result = {"probs": torch.sigmoid(out.logits.float())[:, 0].cpu().numpy(),
              "pseudo": pseudo_labels_for(model, out, tensors, mode=PSEUDO_MODE,
                                          sigma=cfg.pseudo.sigma,
                                          binarize_at=cfg.pseudo.binarize_at,
                                          attention=attention or panel_attention(cfg, device))}
    titles = list(PANEL_TITLES)
    titles[6] = f"{PANEL_TITLES[6]}: none for this image"
    return [np.concatenate(sample_row(batch, result, i, panel_size=panel_size, titles=titles),
                           axis=1) for i in range(len(samples))]


def visualize(model: torch.nn.Module, cfg: Config, root: str, split: str, out_dir: str | Path,
              *, n: int = 8, panel_size: int = 256, all_sentences: bool = False,
              seed: int | None = None,
              echo: Callable[[SampleFigure], None] | None = None) -> dict[str, Any]:
    """Write ``ref<id>_s<sentence>.png`` per sample, the contact sheet and ``samples.jsonl``
    into ``out_dir``; returns a summary (paths, per-sample IoU, skipped rows)."""
    verify_shards(root, [split])
    spec = spec_for("val", input_size=cfg.data.input_size, word_len=cfg.data.word_len,
                    mode=PSEUDO_MODE, seed=cfg.train.seed)
    samples, skipped = collect_samples(root, split, spec, n, all_sentences=all_sentences,
                                       seed=seed)
    if not samples:
        raise VisualizeError(f"split {split!r} under {root} has no usable samples "
                             f"(skipped: {dict(skipped) or 'none'})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = draw_samples(model, cfg, samples, spec, panel_size=panel_size)
    with (out_dir / RECORDS_FILE).open("w", encoding="utf-8") as log:
        for figure, row in drawn:
            path = out_dir / f"ref{figure.ref_id}_s{figure.sent_index}.png"
            write_png(path, row)
            figure.path = str(path)
            log.write(json.dumps(asdict(figure)) + "\n")
            if echo is not None:
                echo(figure)
    sheet = out_dir / CONTACT_SHEET
    write_png(sheet, np.concatenate([row for _, row in drawn], axis=0))
    return {"samples": [asdict(f) for f, _ in drawn], "contact_sheet": str(sheet),
            "skipped": dict(skipped), "out_dir": str(out_dir)}
