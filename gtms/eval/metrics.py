"""Referring-segmentation metrics, named plainly.

* **mean IoU** — the average of per-sentence IoU (what the CRIS and GTMS tables report);
* **overall IoU** — total intersection / total union over the split;
* **Prec@X** — the fraction of sentences whose IoU is above X, X in 0.5 ... 0.9.

A sentence whose prediction and ground truth are both empty has IoU 1 (nothing to find, nothing
found); CRIS adds 1e-6 to the union, which gives 0 for that case, but RefCOCO masks are never
empty so the two agree on real data.

Units: files (``metrics.jsonl``, ``summary.json``, ``eval.json``, ``ablation.csv/.json``,
TensorBoard) hold fractions in [0, 1]; everything printed for people (console, the eval table,
``ablation.md``, plots) shows percent, as the papers do, with the ``%`` sign
(:func:`percent`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gtms.data.transforms import Letterbox, rle_decode

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def percent(fraction: float) -> str:
    """A fraction in [0, 1] as people read IoU in the papers: ``0.2241`` -> ``"22.41 %"``."""
    return f"{100 * fraction:.2f} %"


def aligned_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells (the first is the header) -> right-aligned text lines, a rule of dashes
    under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_metric(key: str, value: float) -> str:
    """A per-epoch metric for the console: IoU and Prec@X keys in percent, others as is."""
    if key.endswith("_iou") or "prec@" in key:
        return percent(value)
    return f"{value:.4g}"


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Binary masks ``[H, W]`` -> (|pred ∩ target|, |pred ∪ target|)."""
    pred, target = pred.astype(bool), target.astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


def peak_in_box(probs_at_stride: np.ndarray, box_at_stride: np.ndarray) -> bool:
    """Grounding (the pointing game on the prediction): does the highest probability of the
    predicted map lie inside the referred object's box? ``[H4, W4]`` each; the first maximum
    in row-major order counts."""
    if probs_at_stride.shape != box_at_stride.shape:
        raise ValueError(f"prediction {probs_at_stride.shape} and box {box_at_stride.shape} "
                         "differ in shape")
    return bool(box_at_stride.reshape(-1)[int(np.argmax(probs_at_stride))] > 0.5)


def grounding_summary(hits: list[bool], ious: np.ndarray) -> dict[str, float]:
    """``grounded``: the share of sentences whose prediction peaks inside the box;
    ``mean_iou_grounded`` / ``mean_iou_missed``: mean IoU over each group (NaN when empty).
    Splits a row's mean IoU into finding the object and segmenting it."""
    hits_arr = np.asarray(hits, bool)
    ious = np.asarray(ious, np.float64)
    if hits_arr.shape != ious.shape:
        raise ValueError(f"{hits_arr.shape[0]} hits for {ious.shape[0]} IoUs")

    def mean(values):
        return float(values.mean()) if len(values) else float("nan")

    return {"grounded": mean(hits_arr.astype(np.float64)),
            "mean_iou_grounded": mean(ious[hits_arr]), "mean_iou_missed": mean(ious[~hits_arr])}


ERROR_KEYS = ("fp_in_box", "fp_near_box", "fp_box_band", "fp_elsewhere", "fn")


def error_shares(probs_at_stride: np.ndarray, box_at_stride: np.ndarray,
                 mask_at_stride: np.ndarray, threshold: float, *, near: int = 2) -> dict:
    """Where one prediction's errors lie, at the output stride, as shares of its union with the
    mask (so ``iou`` and the five error terms add up to 1):

    - ``fp_in_box``: predicted inside the box but off the mask (the box's background);
    - ``fp_near_box``: predicted outside the box within ``near`` cells of it;
    - ``fp_box_band``: predicted farther out but in the box's rows or columns, the band that
      ``L_loc`` (Dice of the row and column maxima) sees only through one of its two
      projections, and only where a pixel is its column's (or row's) maximum;
    - ``fp_elsewhere``: every other false positive;
    - ``fn``: mask cells not predicted.

    ``probs``, ``box`` and ``mask`` are ``[H4, W4]`` maps; ``box``/``mask`` in ``{0, 1}``.
    An empty union (nothing to find, nothing found) is a perfect ``iou`` of 1.
    """
    pred = probs_at_stride > threshold
    box, mask = box_at_stride > 0.5, mask_at_stride > 0.5
    if not (pred.shape == box.shape == mask.shape):
        raise ValueError(f"prediction {pred.shape}, box {box.shape} and mask {mask.shape} "
                         "differ in shape")
    union = int((pred | mask).sum())
    if union == 0:
        return {"iou": 1.0, **{k: 0.0 for k in ERROR_KEYS}}
    rows, cols = box.any(axis=1), box.any(axis=0)
    near_box = np.zeros_like(box)
    if box.any():
        r = np.flatnonzero(rows)
        c = np.flatnonzero(cols)
        near_box[max(r[0] - near, 0):r[-1] + near + 1, max(c[0] - near, 0):c[-1] + near + 1] = True
    band = rows[:, None] | cols[None, :]
    false_pos = pred & ~mask
    shares = {
        "iou": (pred & mask).sum(),
        "fp_in_box": (false_pos & box).sum(),
        "fp_near_box": (false_pos & near_box & ~box).sum(),
        "fp_box_band": (false_pos & band & ~near_box).sum(),
        "fp_elsewhere": (false_pos & ~band & ~near_box).sum(),
        "fn": (mask & ~pred).sum(),
    }
    return {k: float(v) / union for k, v in shares.items()}


def error_summary(per_sentence: list[dict]) -> dict[str, float]:
    """The mean of :func:`error_shares` over sentences, keys prefixed ``err_`` (``err_iou`` is
    the mean IoU at the output stride, before the inverse letterbox)."""
    if not per_sentence:
        return {}
    return {f"err_{k}": float(np.mean([s[k] for s in per_sentence]))
            for k in ("iou", *ERROR_KEYS)}


def iou_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclass
class SegmentationMeter:
    """Accumulates per-sentence intersections and unions; mergeable across workers."""

    inter: list[int] = field(default_factory=list)
    union: list[int] = field(default_factory=list)

    def add(self, inter: int, union: int) -> None:
        self.inter.append(int(inter))
        self.union.append(int(union))

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        return SegmentationMeter(self.inter + other.inter, self.union + other.union)

    def __len__(self) -> int:
        return len(self.inter)

    def summary(self) -> dict[str, float]:
        """``mean_iou``, ``overall_iou``, ``prec@0.5`` ... ``prec@0.9`` (fractions) and ``n``."""
        if not self.inter:
            raise ValueError("no samples were evaluated")
        ious = iou_from_counts(self.inter, self.union)
        total_union = float(np.sum(self.union))
        out = {"mean_iou": float(ious.mean()),
               "overall_iou": float(np.sum(self.inter) / total_union) if total_union else 1.0}
        for x in PREC_THRESHOLDS:
            out[f"prec@{x}"] = float((ious > x).mean())
        out["n"] = len(self.inter)
        return out


def score_prediction(probs_at_stride: np.ndarray, orig_hw, mask_rle, input_size: int,
                     threshold: float) -> tuple[int, int]:
    """CRIS evaluation of one sentence: probabilities ``[S/4, S/4]`` -> upsample to the
    letterbox -> inverse affine to the original image -> threshold -> (inter, union) against
    the original-resolution ground truth."""
    height, width = int(orig_hw[0]), int(orig_hw[1])
    probs = Letterbox(height, width, input_size).invert_prediction(probs_at_stride)
    target = rle_decode(mask_rle, height, width)
    return intersection_union(probs > threshold, target)


@dataclass
class AttentionMeter:
    """The health of GradCAM's attention A over many samples (GTMS's semantic signal).

    * **fallback** — the share of samples whose raw map was zero in the box, so A fell back to
      the box (W = box, P-hat = the tree row's): GradCAM added nothing for them;
    * **pointing** — among the other samples with mask cells in the box, the share whose argmax
      of A inside the box lies on the mask; **pointing chance** — the mean share of the box's
      cells on the mask (a uniformly random in-box cell) over the same samples;
    * **contrast** — mean A on the mask minus mean A off the mask, both inside the box, over
      every sample with cells of both kinds (a fallback sample contributes 0).

    Counts and sums only, so meters of several workers merge exactly (:meth:`merge`).
    """

    samples: int = 0
    fallback: int = 0
    pointed: int = 0
    hits: int = 0
    chance_sum: float = 0.0
    contrasted: int = 0
    contrast_sum: float = 0.0

    def __len__(self) -> int:
        return self.samples

    def add(self, attention: np.ndarray, fallback: np.ndarray, box: np.ndarray,
            mask: np.ndarray | None = None) -> None:
        """``attention`` A ``[B, H4, W4]`` in [0, 1], ``fallback`` ``[B]`` bool, ``box`` and
        ``mask`` ``[B, H4, W4]`` {0, 1} at the same stride (no mask: fallback only)."""
        n = len(attention)
        fallback = np.asarray(fallback, bool).reshape(n)
        self.samples += n
        self.fallback += int(fallback.sum())
        if mask is None:
            return
        a = np.asarray(attention, np.float32).reshape(n, -1)
        box = np.asarray(box).reshape(n, -1) > 0.5
        mask = np.asarray(mask).reshape(n, -1) > 0.5
        on, off = mask & box, box & ~mask
        n_on, n_off = on.sum(1), off.sum(1)
        peak = np.where(box, a, -np.inf).argmax(1)
        point = (n_on > 0) & ~fallback
        self.pointed += int(point.sum())
        self.hits += int(mask[np.arange(n), peak][point].sum())
        self.chance_sum += float((n_on[point] / box.sum(1)[point]).sum())
        both = (n_on > 0) & (n_off > 0)
        a_on = (a * on).sum(1)[both] / n_on[both]
        a_off = (a * off).sum(1)[both] / n_off[both]
        self.contrasted += int(both.sum())
        self.contrast_sum += float((a_on - a_off).sum())

    def merge(self, other: AttentionMeter) -> AttentionMeter:
        return AttentionMeter(*(getattr(self, f) + getattr(other, f)
                                for f in self.__dataclass_fields__))

    def summary(self) -> dict[str, float]:
        """``attention_fallback`` and, when masks were given, ``attention_pointing``,
        ``attention_pointing_chance`` and ``attention_contrast`` (fractions; NaN when no
        sample qualified)."""
        out = {"attention_fallback": self.fallback / max(self.samples, 1)}
        if self.pointed or self.contrasted:
            nan = float("nan")
            out["attention_pointing"] = self.hits / self.pointed if self.pointed else nan
            out["attention_pointing_chance"] = (self.chance_sum / self.pointed
                                                if self.pointed else nan)
            out["attention_contrast"] = (self.contrast_sum / self.contrasted
                                         if self.contrasted else nan)
        return out
