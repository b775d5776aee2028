"""One trial of an ablation or a sweep: train a config with some keys changed, evaluate its best
checkpoint on every split, and record the result in the run folder's ``trial.json``.

:func:`run_trial` is the one trial runner. Ray Tune runs it through :func:`tune_trial` (Ray
backend, per-epoch metrics forwarded to Tune); ``ablate --no-ray`` runs it in a child process
per trial (:mod:`gtms.tune.local`, local backend). Both resume by the same rule:

* ``trial.json`` in the run folder: the trial finished; its result is returned as it is;
* ``summary.json``: training finished; it is not trained again, only evaluated;
* ``config.yaml``: training was interrupted; it resumes at its next epoch;
* ``eval.json`` beside the best checkpoint that scored every split at this config's threshold
  and input size: the evaluation finished too, and is reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gtms import console, storage
from gtms.backend import Backend
from gtms.config import Config, config_from_dict, replace, split_key
from gtms.tracking import Labels
from gtms.tune.tracked import apply_environment, trial_labels
from gtms.tune.tuner import trial_tag

TRIAL_FILE = "trial.json"
SENTENCE_FILE = "eval.sentences.npz"  # in the trial's run folder


def apply_params(base: dict, params: dict[str, Any]):
    """``base`` (a config dict) with ``{"section.key": value}`` changes, validated."""
    changes: dict[str, dict] = {}
    for dotted, value in params.items():
        section, key = split_key(dotted, "a trial parameter")
        changes.setdefault(section, {})[key] = value
    return replace(config_from_dict(base, "<trial base config>"), **changes)


def trial_name(mode: str, seed: int) -> str:
    """An ablation trial's run folder name: ``<row>-s<seed>``."""
    return f"{mode}-s{seed}"


def read_trial(run_dir: str) -> dict[str, Any] | None:
    """A finished trial's ``trial.json`` (``mode``, ``seed``, ``params``, ``metrics``,
    ``base``), or None."""
    path = storage.join(run_dir, TRIAL_FILE)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def run_trial(spec: dict[str, Any], backend: Backend, *, callbacks: tuple = ()) -> dict:
    """Train (or resume) and evaluate one trial; returns what ``trial.json`` holds.

    ``spec``: ``base`` (a config dict), ``params`` (dotted keys -> values), ``storage`` (the
    trials' folder or bucket URI), ``name`` (this trial's run folder in it), ``splits``
    (evaluated at the end; none for a sweep), ``tracking`` (the experiment's parent tracker
    run, :func:`gtms.tune.tracked.start_parent`). ``callbacks``: Ray Train callbacks."""
    run_dir = storage.join(spec["storage"], spec["name"])
    finished = read_trial(run_dir)
    if finished is not None:
        return finished
    cfg = replace(apply_params(spec["base"], spec["params"]),
                  train={"run_dir": spec["storage"], "name": spec["name"]})
    labels = trial_labels(spec["name"], spec["params"], spec.get("tracking"))
    apply_environment(spec.get("tracking"))
    summary = trained(cfg, run_dir, backend, callbacks, tag=trial_tag(spec["params"]),
                      labels=labels)
    report = evaluated(summary["best_checkpoint"], cfg, list(spec["splits"]), backend)
    params = spec["params"]
    trial = {"mode": params.get("loss.mode"), "seed": params.get("train.seed"),
             "params": params, "base": spec["base"],
             "metrics": trial_metrics(summary, report,
                                      sentence_ious=save_sentence_ious(report, run_dir))}
    write_atomically(storage.join(run_dir, TRIAL_FILE), json.dumps(trial, indent=2).encode())
    return trial


def trained(cfg: Config, run_dir: str, backend: Backend, callbacks: tuple, *,
            tag: str = "", labels: Labels | None = None) -> dict[str, Any]:
    """The training summary of a trial: read back when training finished before, else from
    training it (resumed at its next epoch when it was interrupted)."""
    from gtms.train.fit import fit

    summary_file = storage.join(run_dir, "summary.json")
    if storage.exists(summary_file):
        console.say(f"[{tag or cfg.train.name}] trained before, evaluating its best checkpoint")
        return json.loads(storage.read_bytes(summary_file))
    resume = cfg.train.name if storage.exists(storage.join(run_dir, "config.yaml")) else None
    return fit(cfg, backend, resume=resume, callbacks=callbacks, log_tag=tag, labels=labels)


def evaluated(best_checkpoint: str, cfg: Config, splits: list[str],
              backend: Backend) -> dict[str, Any]:
    """The evaluation report of the best checkpoint on ``splits``: the one beside it when it
    is :func:`reusable_eval`, else a new one written there."""
    from gtms.eval.evaluate import evaluate

    if not splits:
        return {"splits": {}}
    report = reusable_eval(best_checkpoint, cfg, splits)
    if report is None:
        report = evaluate(best_checkpoint, cfg, splits, backend=backend,
                          out=storage.join(str(best_checkpoint), "eval.json"))
    return report


def reusable_eval(best_checkpoint: str, cfg: Config, splits: list[str]) -> dict | None:
    """``eval.json`` beside the best checkpoint when it scored every split at this config's
    threshold and input size (a trial that was evaluated before being interrupted), with its
    per-sentence IoUs when they were stored."""
    from gtms.eval.evaluate import SENTENCES, read_sentence_ious, sentences_path

    path = storage.join(str(best_checkpoint), "eval.json")
    if not storage.exists(path):
        return None
    report = json.loads(storage.read_bytes(path))
    same = (report.get("threshold") == cfg.train.threshold
            and report.get("input_size") == cfg.data.input_size
            and all(split in report.get("splits", {}) for split in splits))
    if not same:
        return None
    sentences = sentences_path(path)
    if storage.exists(sentences):   # an evaluation from before they were stored has none
        for split, arrays in read_sentence_ious(storage.read_bytes(sentences)).items():
            if split in report["splits"]:
                report["splits"][split][SENTENCES] = arrays
    return report


def write_atomically(path: str, data: bytes) -> None:
    """Write ``path`` so that a reader never sees half of it (a local file is renamed into
    place; an object store's upload is atomic already)."""
    if storage.is_uri(path):
        storage.write_bytes(path, data)
        return
    tmp = f"{path}.tmp"
    storage.write_bytes(tmp, data)
    Path(tmp).replace(path)


def tune_trial(config: dict[str, Any]) -> None:
    """Ray Tune's function trainable: :func:`run_trial` on the Ray backend. ``config``:
    ``base``, ``params``, ``storage``, ``splits`` of :func:`run_trial`, and the swept keys
    (dotted) at its top level. Per-epoch metrics reach Tune through ``TuneReportCallback``;
    the final report adds the evaluation (:func:`trial_metrics`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gtms.backend.ray import RayBackend

    console.forward_to_driver()  # this trial's lines reach a quiet driver console
    params = {**config.get("params", {}), **{k: v for k, v in config.items() if "." in k}}
    spec = {"base": config["base"], "params": params, "storage": config["storage"],
            "splits": config.get("splits") or [], "tracking": config.get("tracking"),
            "name": f"trial-{tune.get_context().get_trial_id()}"}
    trial = run_trial(spec, RayBackend(), callbacks=(TuneReportCallback(),))
    tune.report(trial["metrics"])


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
