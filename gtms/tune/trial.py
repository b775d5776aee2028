"""One Tune trial: train a config with some keys changed, then evaluate it on every split."""

from __future__ import annotations

from typing import Any

from gtms import console, storage
from gtms.config import config_from_dict, replace, split_key


def apply_params(base: dict, params: dict[str, Any]):
    """``base`` (a config dict) with ``{"section.key": value}`` changes, validated."""
    changes: dict[str, dict] = {}
    for dotted, value in params.items():
        section, key = split_key(dotted, "a trial parameter")
        changes.setdefault(section, {})[key] = value
    return replace(config_from_dict(base, "<trial base config>"), **changes)


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. ``config``: ``base`` (config dict), ``params`` (dotted keys ->
    values), ``storage`` (folder or bucket URI for the trials' run folders), ``splits``
    (evaluated at the end). Per-epoch metrics reach Tune through ``TuneReportCallback``; the
    final report adds ``<split>_mean_iou`` / ``<split>_overall_iou`` of the best checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gtms.eval.evaluate import evaluate
    from gtms.train.trainer import fit

    console.forward_to_driver()  # this trial's lines reach a quiet driver console
    params = {k: v for k, v in config.items() if "." in k}
    cfg = apply_params(config["base"], {**config.get("params", {}), **params})
    name = f"trial-{tune.get_context().get_trial_id()}"
    trials = config["storage"]
    cfg = replace(cfg, train={"run_dir": trials, "name": name})
    resume = name if storage.exists(storage.join(trials, name, "config.yaml")) else None
    summary = fit(cfg, resume=resume, callbacks=(TuneReportCallback(),))
    splits = list(config.get("splits") or [])
    report = evaluate(summary["best_checkpoint"], cfg, splits) if splits else \
        {"splits": {}}
    tune.report(trial_metrics(summary, report,
                              sentence_ious=save_sentence_ious(report, summary["run_dir"])))


SENTENCE_FILE = "eval.sentences.npz"  # in the trial's run folder


def save_sentence_ious(report: dict[str, Any], run_dir: str) -> str | None:
    """Write the per-sentence IoUs of the evaluation ``report`` (if it has them) to
    ``<run_dir>/eval.sentences.npz`` (a folder or URI); returns that path, or None."""
    from gtms.eval.evaluate import sentence_ious_bytes

    data = sentence_ious_bytes(report["splits"])
    if data is None:
        return None
    path = storage.join(run_dir, SENTENCE_FILE)
    storage.write_bytes(path, data)
    return path


def trial_metrics(summary: dict[str, Any], report: dict[str, Any], *,
                  sentence_ious: str | None = None) -> dict[str, Any]:
    """A trial's final result: the training summary's last epoch, plus per split of the
    evaluation ``report`` ``<split>_mean_iou`` / ``_overall_iou`` / ``_n`` and the
    diagnostics of the table (:data:`gtms.tune.table.DIAGNOSTIC_KEYS`), and where its
    per-sentence IoUs are (``sentence_ious``, when saved)."""
    from gtms.tune.table import DIAGNOSTIC_KEYS

    final = dict(summary["final"] or {})
    if sentence_ious:
        final["sentence_ious"] = sentence_ious
    for split, metrics in report["splits"].items():
        final[f"{split}_mean_iou"] = metrics["mean_iou"]
        final[f"{split}_overall_iou"] = metrics["overall_iou"]
        final[f"{split}_n"] = metrics["n"]
        for key in DIAGNOSTIC_KEYS:
            if key in metrics:
                final[f"{split}_{key}"] = metrics[key]
    final["run_dir"] = summary["run_dir"]
    final["best_checkpoint"] = str(summary["best_checkpoint"])
    final["train_wall_time_s"] = summary.get("wall_time_s")
    final["evaluated"] = 1
    return final
