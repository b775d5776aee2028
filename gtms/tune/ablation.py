"""``run.py ablate``: Table 2 rows as Ray Tune trials with one budget, evaluated on every split."""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from gtms import storage
from gtms.backend import Backend
from gtms.config import Config, config_to_dict, replace
from gtms.modes import ABLATION_MODES
from gtms.tune.plot import plot_ablation, read_curves
from gtms.tune.table import collect, write_tables
from gtms.tune.tracked import parent_run
from gtms.tune.tuner import (
    TuneError,
    build_or_restore_tuner,
    experiment_dir,
    results_folder,
    trial_resources,
    trials_dir,
    tuner_dir,
)


def trials_with_runs(trials: list[dict], local: Path) -> list[dict]:
    """``mode`` and a local ``run_dir`` holding ``metrics.jsonl`` per trial: the run folder
    itself, or for a URI a copy of its metrics.jsonl under ``local``."""
    out = []
    for i, trial in enumerate(trials):
        run_dir = trial["metrics"]["run_dir"]
        if storage.is_uri(run_dir):
            copy = local / f"trial-{i}"
            copy.mkdir(parents=True, exist_ok=True)
            (copy / "metrics.jsonl").write_bytes(
                storage.read_bytes(storage.join(run_dir, "metrics.jsonl")))
            run_dir = str(copy)
        out.append({"mode": trial["mode"], "run_dir": run_dir})
    return out


def read_records(run_dir: str) -> list[dict]:
    """The records of a local run folder's ``metrics.jsonl`` (none when it has none)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_trial_sentences(metrics: dict) -> dict | None:
    """A trial's per-sentence IoUs (:func:`gtms.tune.trial.save_sentence_ious`), or None for
    a trial evaluated before they were stored."""
    from gtms.eval.evaluate import read_sentence_ious

    path = metrics.get("sentence_ious")
    if not path or not storage.exists(path):
        return None
    return read_sentence_ious(storage.read_bytes(path))


def run_ablation(cfg: Config, *, rows: list[str], seeds: int, out_dir: str | Path, resume: bool,
                 max_concurrent: int, backend: Backend) -> dict[str, Any]:
    """Train and evaluate every (row, seed) trial on ``backend`` (Ray Tune trials, or child
    processes without Ray) and write the tables and curves into ``out_dir``."""
    from gtms.data.roots import prepare_data_root

    unknown = [r for r in rows if r not in ABLATION_MODES]
    if unknown:
        raise TuneError(f"unknown ablation rows {unknown}; allowed: {', '.join(ABLATION_MODES)}")
    if seeds < 1:
        raise TuneError("--seeds must be >= 1")
    if max_concurrent < 1:
        raise TuneError("--max-concurrent must be >= 1")
    out_dir = experiment_dir(out_dir)
    if not backend.uses_ray:
        if storage.is_uri(out_dir):
            raise TuneError("--no-ray runs the trials on this machine: it takes a local --out")
        if storage.exists(trials_dir(out_dir)) and not resume:
            raise TuneError(f"{trials_dir(out_dir)} exists; pass --resume to continue it or "
                            "choose another --out")
        if resume and not storage.exists(trials_dir(out_dir)):
            raise TuneError(f"--resume: nothing to continue in {trials_dir(out_dir)}")
    root = prepare_data_root(cfg)
    runner = _run_tuner if backend.uses_ray else _run_local
    with parent_run(replace(cfg, data={"root": root}), out_dir, "ablation") as parent:
        report = runner(parent.cfg, rows=rows, seeds=seeds, out_dir=out_dir, resume=resume,
                        max_concurrent=max_concurrent, backend=backend, tracking=parent.spec)
        parent.finish([f"ablation.{ext}" for ext in ("md", "csv", "json", "png")],
                      notes={"trials": len(rows) * seeds})
    return report


def _title(cfg: Config, seeds: int) -> str:
    return (f"GTMS ablation on {cfg.data.dataset} ({cfg.model.preset}, {cfg.train.epochs} "
            f"epochs, {seeds} seed(s))")


def _run_local(cfg: Config, *, rows: list[str], seeds: int, out_dir: str, resume: bool,
               max_concurrent: int, backend: Backend, tracking: dict | None) -> dict[str, Any]:
    """The trials as processes on this machine (:mod:`gtms.tune.local`)."""
    from gtms.pretrain.run import with_synthclip
    from gtms.tune.local import run_local_trials

    splits = list(cfg.data.eval_splits)
    cfg = with_synthclip(cfg, cfg.data.root, backend)   # once, before the trials start
    seed_values = [cfg.train.seed + i for i in range(seeds)]
    print(f"ablation: {len(rows)} rows x {seeds} seed(s) = {len(rows) * seeds} trials, "
          f"{cfg.train.epochs} epochs each, splits {', '.join(splits)}; results in {out_dir}",
          flush=True)
    start = time.time()
    trials, failed = run_local_trials(cfg, rows=rows, seed_values=seed_values, splits=splits,
                                      trials_dir=Path(trials_dir(out_dir)),
                                      max_concurrent=max_concurrent, tracking=tracking)
    if failed:
        raise TuneError(f"{len(failed)} trial(s) failed: {'; '.join(failed)}; fix and rerun "
                        f"with --resume --out {shlex.quote(str(out_dir))}")
    wanted = {(r, s) for r in rows for s in seed_values}
    trials = [t for t in trials if (t["mode"], t["seed"]) in wanted]
    wall = round(time.time() - start, 1)
    return write_report(trials, rows, splits, cfg, out_dir, title=_title(cfg, seeds),
                        wall_time_s=wall)


def _run_tuner(cfg: Config, *, rows: list[str], seeds: int, out_dir: str, resume: bool,
               max_concurrent: int, backend: Backend, tracking: dict | None) -> dict[str, Any]:
    """The trials as Ray Tune trials (each a Ray Train run)."""
    from ray import tune

    from gtms.pretrain.run import with_synthclip
    from gtms.tune.trial import tune_trial

    root = cfg.data.root
    splits = list(cfg.data.eval_splits)
    backend.start(cfg.ray, concurrent_trials=max_concurrent,
                  trial_cpus=trial_resources()["cpu"])
    # Every row starts from the same SynthCLIP weights, pretrained once here (a cache hit when
    # resuming) rather than by the first trials at once.
    cfg = with_synthclip(cfg, root, backend)
    seed_values = [cfg.train.seed + i for i in range(seeds)]
    param_space = {"base": config_to_dict(cfg), "storage": trials_dir(out_dir),
                   "splits": splits, "tracking": tracking, "loss.mode": tune.grid_search(rows),
                   "train.seed": tune.grid_search(seed_values)}
    trainable = tune.with_resources(tune_trial, trial_resources())
    tuner = build_or_restore_tuner(
        trainable, param_space, out_dir=out_dir, resume=resume,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent))
    print(f"ablation: {len(rows)} rows x {seeds} seed(s) = {len(rows) * seeds} trials, "
          f"{cfg.train.epochs} epochs each, splits {', '.join(splits)}; results in {out_dir}",
          flush=True)
    start = time.time()
    grid = tuner.fit()
    trials, failed = [], []
    for result in grid:
        config, metrics = result.config, result.metrics or {}
        if result.error is not None or not metrics.get("evaluated"):
            failed.append((config.get("loss.mode"), config.get("train.seed"), result.error))
            continue
        trials.append({"mode": config["loss.mode"], "seed": config["train.seed"],
                       "metrics": metrics})
    if failed:
        details = "; ".join(f"{m} seed {s}: {str(e).splitlines()[0] if e else 'no result'}"
                            for m, s, e in failed)
        raise TuneError(f"{len(failed)} trial(s) failed ({details}); fix and rerun with "
                        f"--resume --out {shlex.quote(str(out_dir))}")
    wall = round(time.time() - start, 1)
    return write_report(trials, rows, splits, cfg, out_dir, title=_title(cfg, seeds),
                        wall_time_s=wall)


def write_report(trials: list[dict], rows: list[str], splits: list[str], cfg: Config,
                 out_dir: str, *, title: str, wall_time_s: float | None) -> dict[str, Any]:
    """ablation.md / .csv / .json and ablation.png from finished ``trials`` into ``out_dir``
    (a folder or a bucket URI)."""
    table = collect(trials, rows, splits)
    with results_folder(out_dir) as folder, tempfile.TemporaryDirectory() as curves:
        runs = trials_with_runs(trials, Path(curves))
        detailed = [dict(t, records=read_records(run["run_dir"]),
                         sentences=read_trial_sentences(t["metrics"]))
                    for t, run in zip(trials, runs)]
        text = write_tables(folder, table, splits, dataset=cfg.data.dataset, title=title,
                            trials=detailed,
                            extra={"wall_time_s": wall_time_s,
                                   "trials": [{"mode": t["mode"], "seed": t["seed"],
                                               "run_dir": t["metrics"].get("run_dir"),
                                               "best_checkpoint": t["metrics"].get(
                                                   "best_checkpoint"),
                                               "sentence_ious": t["metrics"].get(
                                                   "sentence_ious")} for t in trials]})
        plot_ablation(read_curves(runs), folder / "ablation.png", title=title)
    print(f"ablation: per-epoch curves in {storage.join(out_dir, 'ablation.png')}", flush=True)
    return {"markdown": text, "out_dir": out_dir, "table": table, "wall_time_s": wall_time_s}


def finished_trials(out_dir: str) -> tuple[list[dict], dict]:
    """The trials of a local ``out_dir`` that trained and were evaluated, read from the
    Tuner's ``result.json`` files (their last record) or, for an ablation run with
    ``--no-ray``, the trials' ``trial.json`` files; and the trials' base config dict."""
    import json

    from gtms.tune.local import finished_local_trials

    if not Path(tuner_dir(out_dir)).exists():
        local = finished_local_trials(Path(trials_dir(out_dir)))
        return local, (local[0]["base"] if local else {})
    trials, base = [], None
    for result in sorted(Path(tuner_dir(out_dir)).glob("*/result.json")):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        config = last.get("config") or {}
        if not last.get("evaluated") or "loss.mode" not in config:
            continue
        trials.append({"mode": config["loss.mode"], "seed": config["train.seed"],
                       "metrics": last})
        base = base or config.get("base")
    return trials, base or {}


def report_ablation(out_dir: str | Path, rows: list[str]) -> dict[str, Any]:
    """Tables and curves of what has finished in a local ``out_dir`` (an ablation that was
    interrupted or is still running): each row shows the seeds that finished; nothing is
    trained."""
    from gtms.config import config_from_dict

    if storage.is_uri(str(out_dir)):
        raise TuneError(f"--report reads a local folder: copy {out_dir} here first")
    out_dir = experiment_dir(out_dir)
    trials, base = finished_trials(out_dir)
    if not trials:
        raise TuneError(f"no finished trial under {tuner_dir(out_dir)} or "
                        f"{trials_dir(out_dir)}")
    cfg = config_from_dict(base, f"{tuner_dir(out_dir)} (trial base config)")
    done = {t["mode"] for t in trials}
    rows = [r for r in rows if r in done] + [r for r in rows if r not in done]
    seeds = {r: sorted(t["seed"] for t in trials if t["mode"] == r) for r in rows}
    title = (f"GTMS ablation on {cfg.data.dataset} ({cfg.model.preset}, {cfg.train.epochs} "
             f"epochs; finished seeds: "
             + ", ".join(f"{r} {len(s)}" for r, s in seeds.items()) + ")")
    return write_report(trials, rows, list(cfg.data.eval_splits), cfg, out_dir, title=title,
                        wall_time_s=None)
