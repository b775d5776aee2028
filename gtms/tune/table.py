"""The ablation table: rows (Table 2 modes) x splits, mean ± std over seeds, beside the paper.

``ablation.md`` (and the verdict) show percent, like the paper's Table 2 beside them;
``ablation.csv`` and ``ablation.json`` hold fractions in [0, 1], as ``metrics.jsonl`` and
``eval.json`` do.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gtms.modes import CLAIMED_ORDER, FULL_METHOD, SUPERVISED_BOUND
from gtms.tune import paired

# Table 2 of the paper (R50, RefCOCO, mean IoU %): val, testA, testB.
PAPER_TABLE2 = {
    "mask-bce": {"val": 69.52, "testA": 72.72, "testB": 64.70},
    "box-bce": {"val": 46.11, "testA": 45.70, "testB": 47.09},
    "box-lloc": {"val": 58.62, "testA": 61.17, "testB": 55.53},
    "tree": {"val": 61.72, "testA": 65.14, "testB": 57.94},
    "forest-gradcam": {"val": 64.33, "testA": 67.59, "testB": 60.39},
}


# Per split and trial: the share of sentences whose prediction peaks inside the referred box,
# and the mean IoU over those (see gtms.eval.metrics.grounding_summary).
GROUNDING_KEYS = ("grounded", "mean_iou_grounded")
# Per split and trial: where the errors lie (gtms.eval.metrics.error_shares), shares of union.
ERROR_COLUMNS = {"err_fp_in_box": "FP in box", "err_fp_near_box": "FP near box",
                 "err_fp_box_band": "FP box rows/cols", "err_fp_elsewhere": "FP elsewhere",
                 "err_fn": "FN"}
DIAGNOSTIC_KEYS = (*GROUNDING_KEYS, *ERROR_COLUMNS)


def collect(trials: list[dict[str, Any]], rows: list[str], splits: list[str]) -> dict:
    """Trial results (``mode``, ``seed``, ``metrics``) -> {row: {split: {metric: [per seed]}}}."""
    table: dict = {row: {split: {key: [] for key in ("mean_iou", "overall_iou", "seeds",
                                                       *DIAGNOSTIC_KEYS)}
                         for split in splits} for row in rows}
    for trial in sorted(trials, key=lambda t: (t["mode"], t["seed"])):
        for split in splits:
            cell = table[trial["mode"]][split]
            cell["mean_iou"].append(trial["metrics"][f"{split}_mean_iou"])
            cell["overall_iou"].append(trial["metrics"][f"{split}_overall_iou"])
            cell["seeds"].append(trial["seed"])
            for key in DIAGNOSTIC_KEYS:  # NaN for trials evaluated before it was scored
                value = trial["metrics"].get(f"{split}_{key}")
                cell[key].append(float("nan") if value is None else float(value))
    return table


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]  # NaN: not measured for that trial
    if not values:
        return "—"
    pct = 100 * np.asarray(values)
    return f"{pct.mean():.2f}" + (f" ± {pct.std(ddof=1):.2f}" if len(values) > 1 else "")


def markdown(table: dict, splits: list[str], *, dataset: str, title: str) -> str:
    """Paper-style table: one row per mode, mean IoU and overall IoU per split (%)."""
    with_paper = dataset == "refcoco"
    header = ["row"]
    for split in splits:
        header += [f"{split} mIoU %", f"{split} oIoU %"] + \
            ([f"{split} paper mIoU %"] if with_paper else [])
    lines = [f"# {title}", "",
             "mIoU = mean of per-sentence IoU (what the paper reports), oIoU = overall IoU "
             "(total intersection / total union), in percent, mean ± std over seeds"
             + ("; 'paper' = Table 2 (R50, RefCOCO, mIoU)." if with_paper else "."), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, cells in table.items():
        out = [row]
        for split in splits:
            out += [_fmt(cells[split]["mean_iou"]), _fmt(cells[split]["overall_iou"])]
            if with_paper:
                paper = PAPER_TABLE2.get(row, {}).get(split)
                out.append("—" if paper is None else f"{paper:.2f}")
        lines.append("| " + " | ".join(out) + " |")
    split = splits[0]
    lines += ["", f"Finding the object vs segmenting it ({split}): 'grounded' = sentences whose "
              "prediction peaks inside the referred object's box; 'mIoU grounded' = mean IoU "
              "over those (the shape quality a row reaches where it found the object). "
              "Then where the errors lie, as shares of each sentence's prediction-or-mask "
              "union at stride 4: false positives inside the box off the mask, within 2 cells "
              "outside the box, farther but in the box's rows or columns (L_loc sees these "
              "only through one projection's maxima), elsewhere, and missed mask cells.", "",
              "| row | grounded % | mIoU grounded % | "
              + " | ".join(f"{name} %" for name in ERROR_COLUMNS.values()) + " |",
              "|---|---|---|" + "---|" * len(ERROR_COLUMNS)]
    for row, cells in table.items():
        lines.append(f"| {row} | {_fmt(cells[split]['grounded'])} | "
                     f"{_fmt(cells[split]['mean_iou_grounded'])} | "
                     + " | ".join(_fmt(cells[split][key]) for key in ERROR_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# The paper's claim (Table 2) is gtms.modes.CLAIMED_ORDER, weakest first: each adjacent pair
# "<", except FULL_METHOD <= SUPERVISED_BOUND (the full method may match its fully supervised
# bound).
MIN_SHARE_OF_MASK = 0.90  # forest-gradcam / mask-bce (paper: 64.33 / 69.52 = 92.5 %)
POOLED = "pooled"         # the held-out splits' sentences together

VERDICT_RULE = (
    "Each comparison is paired by seed (every row of a seed starts from the same weights and "
    "sees the same data order): per seed, the higher row's mean IoU minus the lower row's, "
    "both over the held-out sentences of {splits} together (pooled: split means weighted by "
    "sentence count). **The verdict reads the 95 % t interval over seeds (Student t, df = "
    "seeds - 1) of that per-seed difference**: for '<' it holds when the whole interval is "
    "above 0, fails when it is below 0, and is undecided when it contains 0; for "
    "'{full} <= {bound}' it fails only when the interval is entirely below 0 "
    "({full} significantly above {bound}) and holds otherwise. Fewer than 2 paired "
    "seeds give no interval: undecided. The share of {bound} is the per-seed ratio "
    "{full} / {bound}, read the same way against {share:.0f} %. The bootstrap "
    "interval (2000 resamples of seeds and of held-out refs, from the per-sentence IoUs; "
    "'—' for trials evaluated before those were stored) is shown beside it and in "
    "ablation.json (`verdict_bootstrap`); with 3 seeds it sees little of the seed spread, so "
    "it is the narrower and the less trustworthy of the two.")


# Pairs checked beside the adjacent ones: full GTMS against L_loc alone, whatever the tree row
# does in between (the method's gain over its own box baseline).
EXTRA_CLAIMS = (("box-lloc", FULL_METHOD),)


def _claimed_pairs(rows: list[str]) -> list[tuple[str, str, str]]:
    """(lower, higher, claim) for adjacent rows of :data:`gtms.modes.CLAIMED_ORDER` present in
    ``rows``, then the :data:`EXTRA_CLAIMS` whose rows are present and not already adjacent."""
    present = [r for r in CLAIMED_ORDER if r in rows]
    pairs = [(low, high, "<=" if high == SUPERVISED_BOUND else "<")
             for low, high in zip(present, present[1:])]
    pairs += [(low, high, "<") for low, high in EXTRA_CLAIMS
              if low in present and high in present and (low, high, "<") not in pairs]
    return pairs


def _by_seed(trials: list[dict], row: str) -> dict[int, dict]:
    return {t["seed"]: t for t in trials if t["mode"] == row}


def _interval_fields(values: list[float], prefix: str = "") -> dict[str, float]:
    mean, low, high = paired.t_interval(values)
    return {f"{prefix}mean": mean, f"{prefix}t_low": low, f"{prefix}t_high": high}


def _bootstrap(low: list[dict], high: list[dict], splits: list[str],
               share: bool = False) -> tuple[float, float, int]:
    keyed = [[paired.sentence_keys(t["sentences"], splits) if t.get("sentences") else None
              for t in side] for side in (low, high)]
    if any(k is None for side in keyed for k in side):
        return paired.NAN, paired.NAN, 0
    return paired.paired_bootstrap(keyed[0], keyed[1], share=share)


def _pooled_by_seed(trials: list[dict], splits: list[str]) -> dict[str, dict[int, float]]:
    """{row: {seed: pooled mean IoU over ``splits``}} (:func:`gtms.tune.paired.pooled_mean_iou`)."""
    pooled: dict[str, dict[int, float]] = {t["mode"]: {} for t in trials}
    for t in trials:
        pooled[t["mode"]][t["seed"]] = paired.pooled_mean_iou(t["metrics"], splits)
    return pooled


def _split_differences(lows: dict[int, dict], highs: dict[int, dict],
                       splits: list[str]) -> dict[str, dict]:
    """Per split: the seeds both rows have, per seed the higher row's mean IoU minus the lower
    row's, and the t interval of that difference."""
    out = {}
    for split in splits:
        both = sorted(set(lows) & set(highs))
        diffs = [highs[s]["metrics"][f"{split}_mean_iou"] - lows[s]["metrics"][f"{split}_mean_iou"]
                 for s in both]
        out[split] = {"seeds": both, "differences": diffs, **_interval_fields(diffs)}
    return out


def _compare_pair(trials: list[dict], pooled: dict[str, dict[int, float]], low: str, high: str,
                  claim: str, splits: list[str]) -> dict[str, Any]:
    """One claim ``low claim high``, paired by seed: see :func:`compare`."""
    lows, highs = _by_seed(trials, low), _by_seed(trials, high)
    seeds = sorted(s for s in set(lows) & set(highs)
                   if not math.isnan(pooled[low][s] + pooled[high][s]))
    diffs = [pooled[high][s] - pooled[low][s] for s in seeds]
    item = {"lower": low, "higher": high, "claim": claim, "seeds": seeds,
            "lower_values": [pooled[low][s] for s in seeds],
            "higher_values": [pooled[high][s] for s in seeds], "differences": diffs,
            **_interval_fields(diffs)}
    boot_low, boot_high, n = _bootstrap([lows[s] for s in seeds], [highs[s] for s in seeds],
                                        splits)
    item.update(bootstrap_low=boot_low, bootstrap_high=boot_high, bootstrap_sentences=n)
    at_most = claim == "<="
    item["verdict"] = paired.verdict(item["t_low"], item["t_high"], at_most=at_most)
    item["verdict_bootstrap"] = paired.verdict(boot_low, boot_high, at_most=at_most)
    item["splits"] = _split_differences(lows, highs, splits)
    return item


def _share_of_bound(trials: list[dict], pooled: dict[str, dict[int, float]],
                    splits: list[str]) -> dict[str, Any]:
    """The full method's pooled mean IoU as a share of the fully supervised bound's, per seed,
    against :data:`MIN_SHARE_OF_MASK`: see :func:`compare`."""
    full, bound = pooled[FULL_METHOD], pooled[SUPERVISED_BOUND]
    full_trials = _by_seed(trials, FULL_METHOD)
    bound_trials = _by_seed(trials, SUPERVISED_BOUND)
    seeds = sorted(s for s in set(full_trials) & set(bound_trials)
                   if bound[s] > 0 and full[s] == full[s])
    shares = [full[s] / bound[s] for s in seeds]
    share = {"seeds": seeds, "shares": shares, "claim": MIN_SHARE_OF_MASK,
             **_interval_fields(shares)}
    boot_low, boot_high, _ = _bootstrap([bound_trials[s] for s in seeds],
                                        [full_trials[s] for s in seeds], splits, share=True)
    share.update(bootstrap_low=boot_low, bootstrap_high=boot_high,
                 verdict=paired.verdict(share["t_low"], share["t_high"],
                                        threshold=MIN_SHARE_OF_MASK),
                 verdict_bootstrap=paired.verdict(boot_low, boot_high,
                                                  threshold=MIN_SHARE_OF_MASK))
    return share


def compare(trials: list[dict], rows: list[str], splits: list[str]) -> dict[str, Any]:
    """The paired comparisons of the claimed order and the share of mask-bce.

    ``trials``: ``mode``, ``seed``, ``metrics`` and optionally ``sentences`` (per-sentence
    IoUs, :func:`gtms.eval.evaluate.read_sentence_ious`). Per pair: the seeds both rows have,
    per seed the pooled value of each row and their difference (higher minus lower), its mean
    with the t interval and the bootstrap interval, the verdict (from the t interval) and,
    under ``splits``, the same per split (t interval only). The share of mask-bce (of
    :data:`gtms.modes.SUPERVISED_BOUND` reached by :data:`gtms.modes.FULL_METHOD`) is None
    unless both rows are in ``rows`` and ``trials``."""
    pooled = _pooled_by_seed(trials, splits)
    pairs = [_compare_pair(trials, pooled, low, high, claim, splits)
             for low, high, claim in _claimed_pairs([r for r in rows if r in pooled])]
    share = None
    if {FULL_METHOD, SUPERVISED_BOUND} <= set(pooled) & set(rows):
        share = _share_of_bound(trials, pooled, splits)
    return {"splits": splits, "pooled": {row: {"seeds": sorted(v), "mean_iou":
                                               [v[s] for s in sorted(v)]}
                                         for row, v in pooled.items()},
            "pairs": pairs, "share_of_mask": share}


def _points(value: float, sign: bool = True) -> str:
    if value != value:
        return "—"
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def _interval(low: float, high: float, sign: bool = True) -> str:
    if low != low or high != high:
        return "—"
    return f"[{_points(low, sign)}, {_points(high, sign)}]"


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The paired comparisons as a markdown table (percentage points) with the rule."""
    splits = comparison["splits"]
    lines = ["", "## The paper's order, paired by seed", "",
             VERDICT_RULE.format(splits="+".join(splits), share=100 * MIN_SHARE_OF_MASK,
                                 full=FULL_METHOD, bound=SUPERVISED_BOUND), "",
             "| claim | seeds | mean difference (points) | 95 % t interval | "
             "95 % bootstrap interval | verdict (t interval) |", "|---|---|---|---|---|---|"]
    for item in comparison["pairs"]:
        lines.append(f"| {item['lower']} {item['claim']} {item['higher']} | "
                     f"{len(item['seeds'])} | {_points(item['mean'])} | "
                     f"{_interval(item['t_low'], item['t_high'])} | "
                     f"{_interval(item['bootstrap_low'], item['bootstrap_high'])} | "
                     f"{item['verdict']} |")
    share = comparison["share_of_mask"]
    if share is not None:
        lines.append(f"| {FULL_METHOD} >= {100 * MIN_SHARE_OF_MASK:.0f} % of "
                     f"{SUPERVISED_BOUND} | "
                     f"{len(share['seeds'])} | {_points(share['mean'], False)} % | "
                     f"{_interval(share['t_low'], share['t_high'], False)} | "
                     f"{_interval(share['bootstrap_low'], share['bootstrap_high'], False)} | "
                     f"{share['verdict']} |")
    lines += ["", "Per split (t interval of the per-seed difference of the split's mean IoU, "
              "points): " + "; ".join(
                  f"{item['lower']} {item['claim']} {item['higher']}: " + ", ".join(
                      f"{split} {_points(cell['mean'])} "
                      f"{_interval(cell['t_low'], cell['t_high'])}"
                      for split, cell in item["splits"].items())
                  for item in comparison["pairs"]) + "."]
    return "\n".join(lines) + "\n"


CONVERGED_WITHIN = 0.01   # val mean IoU range over the last fifth of the epochs (1 point)
LAST_FRACTION = 0.2
MIN_LAST_EPOCHS = 2       # below 10 epochs a fifth is one epoch: the last two then
# Pseudo-label health per epoch (tree / forest-gradcam rows), read at a trial's last epoch.
HEALTH_KEYS = ("train_attention_fallback", "val_attention_fallback", "val_attention_pointing",
               "val_attention_pointing_chance", "val_attention_contrast")


def convergence(records: list[dict]) -> dict[str, Any]:
    """Is val mean IoU flat over the last fifth of a trial's epochs (at least the last two;
    ``metrics.jsonl`` records)? ``range`` = max - min there; ``converged`` None when fewer
    than two of those epochs were validated."""
    epochs = [int(r["epoch"]) for r in records if "epoch" in r]
    if not epochs:
        return {"epochs": [], "range": paired.NAN, "converged": None}
    last = max(epochs)
    first = last - max(MIN_LAST_EPOCHS, math.ceil(LAST_FRACTION * last)) + 1
    tail = {int(r["epoch"]): float(r["val_mean_iou"]) for r in records
            if "val_mean_iou" in r and int(r["epoch"]) >= first}
    if len(tail) < 2:
        return {"epochs": sorted(tail), "range": paired.NAN, "converged": None}
    spread = max(tail.values()) - min(tail.values())
    return {"epochs": sorted(tail), "range": spread,
            "converged": bool(spread <= CONVERGED_WITHIN + 1e-12)}


def health(records: list[dict]) -> dict[str, float]:
    """:data:`HEALTH_KEYS` at the trial's last epoch (NaN where not recorded)."""
    last = max((r for r in records if "epoch" in r), key=lambda r: int(r["epoch"]),
               default={})
    return {key: float(last[key]) if last.get(key) is not None else paired.NAN
            for key in HEALTH_KEYS}


def run_checks(trials: list[dict], rows: list[str]) -> dict[str, dict]:
    """Per row, per seed (from each trial's ``records``): :func:`convergence` and
    :func:`health`, and the row's ``converged`` (all seeds yes -> True, any no -> False,
    else None)."""
    out = {}
    for row in rows:
        mine = sorted((t for t in trials if t["mode"] == row), key=lambda t: t["seed"])
        checks = [convergence(t.get("records") or []) for t in mine]
        flags = [c["converged"] for c in checks]
        converged = False if False in flags else (True if flags and None not in flags
                                                  else None)
        out[row] = {"seeds": [t["seed"] for t in mine], "convergence": checks,
                    "converged": converged,
                    "health": [health(t.get("records") or []) for t in mine]}
    return out


def _yes_no(value: bool | None, unknown: str = "—") -> str:
    return unknown if value is None else ("yes" if value else "no")


def _mean(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if v == v]
    return "—" if not values else f"{scale * float(np.mean(values)):.{digits}f}"


def checks_markdown(checks: dict[str, dict]) -> str:
    """Convergence of each row and the pseudo-label health table."""
    lines = ["", "## Convergence", "",
             f"A trial has converged when its val mean IoU over the last fifth of its epochs "
             f"(at least the last {MIN_LAST_EPOCHS}) stays within "
             f"{100 * CONVERGED_WITHIN:.0f} point (max - min); '—' when fewer than two of "
             "those epochs were validated.", "",
             "| row | converged | val mIoU range over the last fifth, per seed (points) |",
             "|---|---|---|"]
    for row, c in checks.items():
        ranges = ", ".join(f"s{seed} {_points(x['range'], False)}"
                           for seed, x in zip(c["seeds"], c["convergence"])) or "—"
        lines.append(f"| {row} | {_yes_no(c['converged'])} | {ranges} |")
    if SUPERVISED_BOUND in checks:
        converged = checks[SUPERVISED_BOUND]["converged"]
        lines += ["", f"{SUPERVISED_BOUND} converged: {_yes_no(converged, 'unknown')}"
                  + ("" if converged else
                     " (the ceiling may still be rising: the gaps to it are lower bounds)"
                     if converged is False else
                     " (not enough validated epochs to tell)")]
    lines += ["", "## Pseudo-label health (last epoch, mean over seeds)", "",
              "GradCAM attention of the pseudo-label rows: the share of samples that fell "
              "back to the box (train, val), how often the attention peak points inside the "
              "referred mask against the chance of a random point in the box, and the "
              "attention contrast inside vs outside the mask. '—': not recorded.", "",
              "| row | fallback train % | fallback val % | pointing % | pointing chance % | "
              "contrast |", "|---|---|---|---|---|---|"]
    for row, c in checks.items():
        values = {key: [h[key] for h in c["health"]] for key in HEALTH_KEYS}
        lines.append(f"| {row} | {_mean(values['train_attention_fallback'])} | "
                     f"{_mean(values['val_attention_fallback'])} | "
                     f"{_mean(values['val_attention_pointing'])} | "
                     f"{_mean(values['val_attention_pointing_chance'])} | "
                     f"{_mean(values['val_attention_contrast'], 1.0, 3)} |")
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """NaN -> None, recursively (ablation.json stays valid JSON)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _number(value: float) -> str:
    return "" if value != value else f"{value:.6f}"


def write_paired_csv(path: Path, comparison: dict[str, Any]) -> None:
    """``ablation_paired.csv``: per comparison and split (``pooled`` first), one line per seed
    (both rows' values and the difference, fractions) and a ``mean`` line with the intervals
    and the verdicts."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["comparison", "split", "seed", "lower", "higher", "difference",
                         "t_low", "t_high", "bootstrap_low", "bootstrap_high", "verdict",
                         "verdict_bootstrap"])
        for item in comparison["pairs"]:
            name = f"{item['lower']} {item['claim']} {item['higher']}"
            for seed, low, high, diff in zip(item["seeds"], item["lower_values"],
                                             item["higher_values"], item["differences"]):
                writer.writerow([name, POOLED, seed, _number(low), _number(high),
                                 _number(diff)] + [""] * 6)
            writer.writerow([name, POOLED, "mean", "", "", _number(item["mean"]),
                             _number(item["t_low"]), _number(item["t_high"]),
                             _number(item["bootstrap_low"]), _number(item["bootstrap_high"]),
                             item["verdict"], item["verdict_bootstrap"]])
            for split, cell in item["splits"].items():
                for seed, diff in zip(cell["seeds"], cell["differences"]):
                    writer.writerow([name, split, seed, "", "", _number(diff)] + [""] * 6)
                writer.writerow([name, split, "mean", "", "", _number(cell["mean"]),
                                 _number(cell["t_low"]), _number(cell["t_high"])] + [""] * 4)
        share = comparison["share_of_mask"]
        if share is not None:
            name = f"{FULL_METHOD} / {SUPERVISED_BOUND} >= {MIN_SHARE_OF_MASK}"
            for seed, value in zip(share["seeds"], share["shares"]):
                writer.writerow([name, POOLED, seed, "", "", _number(value)] + [""] * 6)
            writer.writerow([name, POOLED, "mean", "", "", _number(share["mean"]),
                             _number(share["t_low"]), _number(share["t_high"]),
                             _number(share["bootstrap_low"]), _number(share["bootstrap_high"]),
                             share["verdict"], share["verdict_bootstrap"]])


def verdict_lines(comparison: dict[str, Any]) -> list[str]:
    """One line per claim, starting with its verdict (the t interval's)."""
    lines = [f"{item['verdict']}: {item['lower']} {item['claim']} {item['higher']} "
             f"(mean paired difference {_points(item['mean'])} points, 95 % t interval "
             f"{_interval(item['t_low'], item['t_high'])}, {len(item['seeds'])} seed(s))"
             for item in comparison["pairs"]]
    share = comparison["share_of_mask"]
    if share is not None:
        lines.append(f"{share['verdict']}: {FULL_METHOD} reaches "
                     f"{_points(share['mean'], False)} % of {SUPERVISED_BOUND} (95 % t interval "
                     f"{_interval(share['t_low'], share['t_high'], False)}; claim >= "
                     f"{100 * MIN_SHARE_OF_MASK:.0f} %, paper 92.5 %)")
    return lines


def write_tables(out_dir: Path, table: dict, splits: list[str], *, dataset: str, title: str,
                 extra: dict[str, Any], trials: list[dict] | None = None) -> str:
    """Write ablation.md / .csv / .json (and ablation_paired.csv) into ``out_dir``; returns
    the markdown. ``trials`` (``mode``, ``seed``, ``metrics``, optionally ``sentences`` and
    ``records``, the trial's metrics.jsonl) add the paired comparisons, the convergence
    check and the pseudo-label health."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(table, splits, dataset=dataset, title=title)
    comparison, checks, verdict = None, None, []
    if trials is not None:
        rows = list(table)
        comparison = compare(trials, rows, splits)
        checks = run_checks(trials, rows)
        verdict = verdict_lines(comparison)
        text += comparison_markdown(comparison) + checks_markdown(checks)
        write_paired_csv(out_dir / "ablation_paired.csv", comparison)
    (out_dir / "ablation.md").write_text(text)
    with (out_dir / "ablation.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "split", "seed", "mean_iou", "overall_iou", *DIAGNOSTIC_KEYS])
        for row, cells in table.items():
            for split in splits:
                cell = cells[split]
                for seed, miou, oiou, *grounding in zip(
                        cell["seeds"], cell["mean_iou"], cell["overall_iou"],
                        *(cell[key] for key in DIAGNOSTIC_KEYS)):
                    writer.writerow([row, split, seed, f"{miou:.6f}", f"{oiou:.6f}",
                                     *(f"{v:.6f}" if v == v else "" for v in grounding)])
    summary = {row: {split: {"mean_iou_mean": float(np.mean(c["mean_iou"])) if c["mean_iou"]
                             else None,
                             "mean_iou_std": float(np.std(c["mean_iou"], ddof=1))
                             if len(c["mean_iou"]) > 1 else 0.0,
                             "overall_iou_mean": float(np.mean(c["overall_iou"]))
                             if c["overall_iou"] else None,
                             **c}
                     for split, c in cells.items()} for row, cells in table.items()}
    payload = {"title": title, "dataset": dataset, "splits": splits, "rows": summary,
               "ordering": verdict, "comparison": json_safe(comparison),
               "checks": json_safe(checks),
               "paper_table2_refcoco_r50": PAPER_TABLE2 if dataset == "refcoco" else None,
               **extra}
    (out_dir / "ablation.json").write_text(json.dumps(payload, indent=2))
    return text
