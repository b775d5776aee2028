"""``run.py eval``: CRIS-style evaluation of a checkpoint, its splits streamed through a
:class:`gtms.backend.Backend` (Ray Data's actors, or with ``--no-ray`` preprocessed in this
process).

Per sentence: sigmoid of the stride-4 logits, upsample to the letterbox, inverse affine back to
the original image, threshold (``train.threshold``, CRIS 0.35), IoU against the original mask.
Works for our checkpoints of every ablation mode and for CRIS-layout checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtms import storage
from gtms.backend import Backend, Worker
from gtms.config import Config, RayConfig, config_from_dict, config_to_dict
from gtms.console import Progress, phase
from gtms.data.pipeline import PoolSpec, SampleSpec, build_dataset, drop_skipped, spec_for
from gtms.data.reading import preprocessed_samples, stacked_batches
from gtms.data.shards import verify_shards
from gtms.data.tokenizer import ClipTokenizer
from gtms.errors import UserError
from gtms.eval.attention import attention_sources
from gtms.eval.metrics import (
    ERROR_KEYS,
    PREC_THRESHOLDS,
    SegmentationMeter,
    aligned_table,
    error_shares,
    error_summary,
    grounding_summary,
    iou_from_counts,
    peak_in_box,
    score_prediction,
)
from gtms.eval.pseudo_quality import PseudoLabelMeters, format_pseudo_table
from gtms.model.checkpoint import Trained, load_trained

# Per split of an evaluation report: every scored sentence's ``ref_id``, ``sent_index`` and
# ``iou`` (arrays). eval.json leaves them out; they go to the file beside it
# (:func:`sentences_path`), which the ablation's paired statistics read.
SENTENCES = "sentences"
REPORT_FILE = "eval.json"


def sentences_path(report_path: str) -> str:
    """``.../eval.json`` -> ``.../eval.sentences.npz``."""
    stem = str(report_path)
    return (stem[:-5] if stem.endswith(".json") else stem) + ".sentences.npz"


def sentence_ious_bytes(results: dict[str, dict[str, Any]]) -> bytes | None:
    """The per-sentence IoUs of a report's splits as a compressed ``.npz`` (arrays
    ``<split>.ref_id``, ``<split>.sent_index``, ``<split>.iou``); None when it has none."""
    import io

    arrays = {f"{split}.{key}": value for split, m in results.items()
              for key, value in (m.get(SENTENCES) or {}).items()}
    if not arrays:
        return None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_sentence_ious(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    """:func:`sentence_ious_bytes` back: {split: {"ref_id", "sent_index", "iou": arrays}}."""
    import io

    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(io.BytesIO(data)) as npz:
        for name in npz.files:
            split, key = name.rsplit(".", 1)
            out.setdefault(split, {})[key] = npz[name]
    return out


def without_sentences(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {split: {k: v for k, v in m.items() if k != SENTENCES} for split, m in results.items()}


class EvalError(UserError, ValueError):
    """Evaluation cannot run (empty split, config that does not fit the checkpoint)."""


class SplitScores:
    """What an evaluation of one split accumulates, sentence by sentence."""

    def __init__(self):
        self.meter = SegmentationMeter()
        self.ref_ids: list[int] = []
        self.sent_indices: list[int] = []
        self.hits: list[bool] = []
        self.errors: list[dict] = []
        self.skipped: Counter = Counter()

    def add(self, probs: np.ndarray, batch: dict[str, Any], cfg: Config) -> None:
        """Score each sentence of ``batch`` given its probabilities at stride 4."""
        for i in range(len(probs)):
            self.meter.add(*score_prediction(probs[i], batch["orig_hw"][i],
                                             batch["mask_rle"][i], cfg.data.input_size,
                                             cfg.train.threshold))
            self.ref_ids.append(int(batch["ref_id"][i]))
            self.sent_indices.append(int(batch["sent_index"][i]))
            self.hits.append(peak_in_box(probs[i], batch["box"][i]))
            self.errors.append(error_shares(probs[i], batch["box"][i], batch["mask"][i],
                                            cfg.train.threshold))

    def summary(self) -> dict[str, Any]:
        summary = self.meter.summary()
        ious = iou_from_counts(self.meter.inter, self.meter.union)
        summary.update(grounding_summary(self.hits, ious))
        summary.update(error_summary(self.errors))
        summary[SENTENCES] = {"ref_id": np.asarray(self.ref_ids, np.int64),
                              "sent_index": np.asarray(self.sent_indices, np.int32),
                              "iou": ious.astype(np.float32)}
        summary["skipped"] = dict(self.skipped)
        return summary


def eval_spec(cfg: Config, pseudo_labels: bool) -> SampleSpec:
    """What the pipeline makes of each sentence for evaluation (with trees and forests for
    ``--pseudo-labels``)."""
    return spec_for("eval", input_size=cfg.data.input_size, word_len=cfg.data.word_len,
                    mode=cfg.loss.mode, seed=cfg.train.seed, with_tree_in_eval=pseudo_labels)


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, cfg: Config, root: str, split: str, *,
                   device: torch.device, batches: Iterable[dict[str, Any]],
                   progress: bool = True, pseudo_labels: bool = False) -> dict[str, Any]:
    """Score every sentence of one split's preprocessed ``batches`` (:func:`eval_spec`; from
    Ray Data's actors or made in this process: the same samples). ``pseudo_labels``: also
    score the P-hat this model's P gives with each vertex weight of
    :mod:`gtms.eval.pseudo_quality` (the batches then carry trees and forests)."""
    pseudo = None
    if pseudo_labels:
        pseudo = PseudoLabelMeters(attention_sources(cfg, device, roles=("eval",))["eval"])
    scores, start = SplitScores(), time.perf_counter()
    model.eval()
    total = None if cfg.data.limit_eval_refs else split_sentence_count(root, split)
    bar = Progress(f"evaluating {split}", total, unit="sentence", enabled=progress)
    for batch in batches:
        batch, dropped = drop_skipped(batch)
        scores.skipped.update(dropped)
        if not len(batch["ref_id"]):
            continue
        out = model(torch.as_tensor(np.array(batch["image"]), device=device),
                    torch.as_tensor(np.array(batch["tokens"]), device=device))
        probs = torch.sigmoid(out.logits.float())[:, 0].cpu().numpy()
        if pseudo is not None:
            pseudo.add_batch(out, model, batch, sigma=cfg.pseudo.sigma,
                             binarize_at=cfg.pseudo.binarize_at, threshold=cfg.train.threshold)
        scores.add(probs, batch, cfg)
        bar.update(len(probs))
    bar.close()
    if not len(scores.meter):
        raise EvalError(f"split {split!r} under {root} has no usable samples")
    summary = scores.summary()
    if pseudo is not None:
        summary.update(pseudo.summary())
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["split_sentences"] = total
    _warn_if_short(split, summary)
    return summary


def _warn_if_short(split: str, summary: dict[str, Any]) -> None:
    if summary["split_sentences"] not in (None, summary["n"]):
        print(f"warning: {split}: scored {summary['n']} of the {summary['split_sentences']} "
              "sentences its manifest lists; the others belong to refs that could not be used "
              "(undecodable image, bad box or mask; --set data.strict=true stops at the first)",
              file=sys.stderr, flush=True)


def split_sentence_count(root: str, split: str) -> int | None:
    """The sentences a split holds according to its shard manifest (None when unknown: a URI
    root or no manifest). Evaluation scores every one, empty expressions included (CRIS)."""
    from gtms.data.shards import read_manifest, shards_dir

    if storage.is_uri(root):
        return None
    count = ((read_manifest(shards_dir(root)) or {}).get("sentences") or {}).get(split)
    return int(count) if isinstance(count, int) else None


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Splits x metrics, in percent (IoU and precision) like the paper's tables; the JSON
    report holds the same numbers as fractions. ``grounded``: the share of sentences whose
    prediction peaks inside the referred object's box; ``mIoU grounded``: mean IoU over those."""
    header = ["split", "mean IoU %", "overall IoU %",
              *(f"Prec@{x} %" for x in PREC_THRESHOLDS), "grounded %", "mIoU grounded %",
              "samples"]
    rows = [header]

    def pct(value):
        return "—" if value is None or value != value else f"{100 * value:.2f}"

    for split, m in results.items():
        rows.append([split, pct(m["mean_iou"]), pct(m["overall_iou"])]
                    + [pct(m[f"prec@{x}"]) for x in PREC_THRESHOLDS]
                    + [pct(m.get("grounded")), pct(m.get("mean_iou_grounded")), str(m["n"])])
    lines = aligned_table(rows)
    if any("err_iou" in m for m in results.values()):
        lines += ["", format_error_table(results)]
    if any("phat_box_mean_iou" in m for m in results.values()):
        lines += ["", format_pseudo_table(results)]
    return "\n".join(lines)


ERROR_HEADERS = {"fp_in_box": "FP in box", "fp_near_box": "FP near box",
                 "fp_box_band": "FP box rows/cols", "fp_elsewhere": "FP elsewhere", "fn": "FN"}


def format_error_table(results: dict[str, dict[str, Any]]) -> str:
    """Where the errors are (:func:`gtms.eval.metrics.error_shares`): per split, the mean share
    of each sentence's union, at the output stride; IoU + the five terms = 100."""
    header = ["split", "IoU %", *(f"{ERROR_HEADERS[k]} %" for k in ERROR_KEYS)]
    rows = [header]
    for split, m in results.items():
        if "err_iou" in m:
            rows.append([split] + [f"{100 * m[f'err_{k}']:.1f}" for k in ("iou", *ERROR_KEYS)])
    return "\n".join(["where the errors are (shares of each sentence's prediction-or-mask union "
                      "at stride 4; near = within 2 cells of the box, box rows/cols = farther "
                      "but in the box's rows or columns):", *aligned_table(rows)])


def evaluate(checkpoint: str | Path | Trained, cfg: Config | str | None = None,
             splits: list[str] | None = None, out: str | Path | None = None, *,
             backend: Backend, pseudo_labels: bool = False) -> dict[str, Any]:
    """Score ``checkpoint`` (a path, or what :func:`load_trained` returned) on ``splits``
    (default ``data.eval_splits``) with :func:`evaluation_worker` on ``backend``: in this
    process, or on one Ray Train worker holding the training workers' CPUs and a GPU
    (:func:`evaluation_resources`) with the splits streamed through Ray Data's actors; the same
    numbers either way.
    Write the report to ``out`` when given, and the per-sentence IoUs (:data:`SENTENCES`)
    beside it (:func:`sentences_path`). ``pseudo_labels``: see :func:`evaluate_split`."""
    from gtms.data.roots import prepare_data_root

    trained = checkpoint if isinstance(checkpoint, Trained) else load_trained(checkpoint, cfg)
    cfg = trained.config
    root = prepare_data_root(cfg)
    splits = splits or list(cfg.data.eval_splits)
    verify_shards(root, splits)
    backend.start(cfg.ray)
    job = {"checkpoint": str(trained.file), "config": config_to_dict(cfg), "root": root,
           "splits": splits, "pseudo_labels": pseudo_labels}
    results, where = run_evaluation(job, cfg, backend)
    report = {"checkpoint": str(trained.file), "dataset": cfg.data.dataset, "root": root,
              "threshold": cfg.train.threshold, "input_size": cfg.data.input_size,
              "evaluated_on": where, "splits": results}
    if out is not None:
        write_report(report, out)
    return report


def run_evaluation(job: dict, cfg: Config, backend: Backend) -> tuple[dict, dict]:
    """:func:`evaluation_worker` on one worker of ``backend``; returns the splits' results
    and where they were computed. The worker's run folder (a temporary one, or beside a
    checkpoint in a bucket, which every node of a cluster can reach) is removed after."""
    datasets = None
    if backend.uses_ray:
        spec, pool = eval_spec(cfg, job["pseudo_labels"]), PoolSpec.of(cfg.ray)
        datasets = {split: build_dataset(job["root"], split, spec, pool, strict=cfg.data.strict,
                                         limit=cfg.data.limit_eval_refs)
                    for split in job["splits"]}
    with evaluation_space(job["checkpoint"]) as (where, name):
        result = backend.run(evaluation_worker, job, storage=where, name=name,
                             ray=evaluation_resources(cfg.ray), workers=1, datasets=datasets)
        report = json.loads(storage.read_bytes(storage.join(result.latest, REPORT_FILE)))
        arrays = read_sentence_ious(storage.read_bytes(
            sentences_path(storage.join(result.latest, REPORT_FILE))))
    for split, split_arrays in arrays.items():
        report["splits"][split][SENTENCES] = split_arrays
    return report["splits"], report["evaluated_on"]


def evaluation_resources(ray: RayConfig) -> RayConfig:
    """The one evaluation worker holds what the training workers held together: their CPUs
    (its torch threads) and one GPU (a worker's share). A trial's evaluation then fits where its
    training ran, and on a laptop it computes with every core the training used."""
    return dataclasses.replace(ray, cpus_per_worker=ray.cpus_per_worker * max(ray.num_workers, 1))


@contextmanager
def evaluation_space(checkpoint: str) -> Iterator[tuple[str, str]]:
    """(storage, name) of an evaluation's run folder, removed when the block ends."""
    name = f"evaluation-{os.getpid()}-{int(time.time() * 1e3)}"
    if storage.is_uri(checkpoint):
        where = storage.sibling(checkpoint, "")
        try:
            yield where, name
        finally:
            storage.remove_dir(storage.join(where, name))
        return
    with tempfile.TemporaryDirectory(prefix="gtms-eval-") as tmp:
        yield tmp, name


def evaluation_worker(job: dict, worker: Worker) -> None:
    """The worker function of an evaluation: load the checkpoint on this worker's device,
    score every split of ``job`` and report the results as a checkpoint folder
    (``eval.json`` and the per-sentence IoUs beside it)."""
    cfg = config_from_dict(job["config"], "<evaluation config>")
    torch.set_num_threads(worker.threads)
    model = load_trained(job["checkpoint"], cfg).model.to(worker.device)
    spec, results = eval_spec(cfg, job["pseudo_labels"]), {}
    for split in job["splits"]:
        if worker.uses_ray:
            batches = worker.dataset_shard(split).iter_batches(
                batch_size=cfg.train.eval_batch_size, batch_format="numpy")
            how = "streamed through Ray Data's actors"
        else:
            batches = stacked_batches(preprocessed_samples(
                job["root"], split, spec, ClipTokenizer(), limit=cfg.data.limit_eval_refs,
                strict=cfg.data.strict), spec, cfg.train.eval_batch_size)
            how = "preprocessed in this process"
        phase(f"evaluating {split}: {how}, every sentence scored on {worker.device}")
        results[split] = evaluate_split(model, cfg, job["root"], split, device=worker.device,
                                        batches=batches, pseudo_labels=job["pseudo_labels"])
    with tempfile.TemporaryDirectory() as tmp:
        write_report({"evaluated_on": worker.describe(), "splits": results},
                     Path(tmp) / REPORT_FILE)
        worker.report({"epoch": 1}, Path(tmp), checkpoint_name="checkpoint_evaluation")


def write_report(report: dict[str, Any], out: str | Path) -> None:
    """``report`` as JSON at ``out`` (a local path or URI) without the per-sentence IoUs, which
    go to the file beside it (:func:`sentences_path`)."""
    results = report["splits"]
    storage.write_bytes(str(out), json.dumps(dict(report, splits=without_sentences(results)),
                                              indent=2).encode())
    storage.write_bytes(sentences_path(str(out)), sentence_ious_bytes(results))
