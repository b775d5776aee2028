"""Scale statistics of a refer-layout dataset: how big referred objects are, and how box-like.

SynthRef v2 is built to look like RefCOCO in the two numbers that decide whether box supervision
and a stride-32 GradCAM can work: the referred object's box relative to the image (RefCOCO's
referred objects are large) and the mask's share of its box (box != mask). ``prepare`` prints
these statistics and stores them in ``shards/manifest.json`` under ``statistics``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

# SynthRef v2's targets (tests check the generated default against them).
MIN_MEDIAN_BOX_FRACTION = 0.20   # median referred box / image area
MAX_MEAN_MASK_BOX_RATIO = 0.75   # mean referred mask area / box area


def reference_statistics(refs: Iterable[Mapping], annotations: Iterable[Mapping],
                         images: Iterable[Mapping]) -> dict:
    """Per-split and overall statistics of the referred objects.

    ``refs`` are refer records (``ann_id``, ``image_id``, ``split``, ``sentences``);
    ``annotations`` and ``images`` are COCO records (``bbox``, ``area``, ``category_id``,
    ``image_id``; ``height``, ``width``). Returns plain floats/ints (JSON-ready):
    ``box_fraction`` (median, quartiles), ``mask_box_ratio`` (mean), the share of refs with a
    same-category distractor, objects per image, and sentences per ref.
    """
    anns = {a["id"]: a for a in annotations}
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    per_image = defaultdict(Counter)
    for ann in anns.values():
        per_image[ann["image_id"]][ann["category_id"]] += 1
    rows = defaultdict(list)
    for ref in refs:
        ann = anns[ref["ann_id"]]
        height, width = sizes[ref["image_id"]]
        box_area = float(ann["bbox"][2]) * float(ann["bbox"][3])
        row = (box_area / (height * width), float(ann["area"]) / max(box_area, 1e-9),
               per_image[ref["image_id"]][ann["category_id"]] > 1, len(ref["sentences"]))
        rows[ref["split"]].append(row)
        rows["all"].append(row)
    objects = [sum(c.values()) for c in per_image.values()]
    out = {split: _summary(values) for split, values in sorted(rows.items())}
    out["all"]["objects_per_image"] = round(float(np.mean(objects)), 3) if objects else 0.0
    return out


def _summary(rows: list[tuple[float, float, bool, int]]) -> dict:
    box, ratio, distractor, sentences = (np.asarray(c, dtype=np.float64) for c in zip(*rows))
    q25, median, q75 = np.quantile(box, [0.25, 0.5, 0.75])
    return {
        "refs": len(rows),
        "box_fraction_median": round(float(median), 4),
        "box_fraction_q25": round(float(q25), 4),
        "box_fraction_q75": round(float(q75), 4),
        "mask_box_ratio_mean": round(float(ratio.mean()), 4),
        "same_category_distractor": round(float(distractor.mean()), 4),
        "sentences_per_ref": round(float(sentences.mean()), 3),
    }


def format_statistics(stats: Mapping[str, Mapping]) -> list[str]:
    """Readable lines for a console (one per split, ``all`` first)."""
    lines = []
    for split in ["all", *(s for s in stats if s != "all")]:
        s = stats[split]
        lines.append(
            f"{split:>6}: {s['refs']} refs; referred box / image median "
            f"{100 * s['box_fraction_median']:.1f} % (IQR {100 * s['box_fraction_q25']:.1f}-"
            f"{100 * s['box_fraction_q75']:.1f} %); mask / box {s['mask_box_ratio_mean']:.2f}; "
            f"same-category distractor {100 * s['same_category_distractor']:.0f} %")
    return lines
