"""``run.py ablate``: Table 2 rows as Ray Tune trials with one budget, evaluated on every split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gtms.config import Config, config_to_dict, replace
from gtms.errors import UserError
from gtms.modes import ABLATION_MODES
from gtms.tune.plot import plot_ablation, read_curves
from gtms.tune.table import collect, write_tables


class TuneError(UserError, RuntimeError):
    """An ablation or sweep cannot run or finish."""


def tuner_dir(out_dir: Path) -> Path:
    return out_dir / "tuner"


def build_or_restore_tuner(trainable, param_space: dict, *, out_dir: Path, resume: bool,
                           tune_config):
    """A new Tuner in ``out_dir/tuner``, or the interrupted one restored from there."""
    from ray import tune

    path = tuner_dir(out_dir)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise TuneError(f"--resume: nothing to restore in {path}")
        print(f"restoring the interrupted experiment from {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True,
                                  param_space=param_space)
    if path.exists():
        raise TuneError(f"{path} exists; pass --resume to continue it or choose another --out")
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=path.name, storage_path=str(out_dir)))


def trial_resources() -> dict[str, float]:
    """The trial's own process takes (almost) no CPU: its TorchTrainer requests the workers,
    and a whole CPU here would starve them on a small machine (see RAY.md)."""
    return {"cpu": 0.01}


def trials_with_runs(trials: list[dict]) -> list[dict]:
    return [{"mode": t["mode"], "run_dir": t["metrics"]["run_dir"]} for t in trials]


def run_ablation(cfg: Config, *, rows: list[str], seeds: int, out_dir: Path, resume: bool,
                 max_concurrent: int, address: str | None = None) -> dict[str, Any]:
    from ray import tune

    from gtms.data.roots import prepare_data_root
    from gtms.pretrain.run import with_synthclip
    from gtms.runtime import init_ray
    from gtms.tune.trial import run_trial

    unknown = [r for r in rows if r not in ABLATION_MODES]
    if unknown:
        raise TuneError(f"unknown ablation rows {unknown}; allowed: {', '.join(ABLATION_MODES)}")
    if seeds < 1:
        raise TuneError("--seeds must be >= 1")
    out_dir = out_dir.resolve()
    root = prepare_data_root(cfg)
    cfg = replace(cfg, data={"root": root})
    splits = list(cfg.data.eval_splits)
    init_ray(cfg.ray, cli_address=address, concurrent_trials=max_concurrent,
             trial_cpus=trial_resources()["cpu"])
    # Every row starts from the same SynthCLIP weights, pretrained once here (a cache hit when
    # resuming) rather than by the first trials at once.
    cfg = with_synthclip(cfg, root, address=address)
    seed_values = [cfg.train.seed + i for i in range(seeds)]
    param_space = {"base": config_to_dict(cfg), "storage": str(out_dir / "trials"),
                   "splits": splits, "loss.mode": tune.grid_search(rows),
                   "train.seed": tune.grid_search(seed_values)}
    trainable = tune.with_resources(run_trial, trial_resources())
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
                        f"--resume --out {out_dir}")
    wall = round(time.time() - start, 1)
    title = (f"GTMS ablation on {cfg.data.dataset} ({cfg.model.preset}, {cfg.train.epochs} "
             f"epochs, {seeds} seed(s))")
    return write_report(trials, rows, splits, cfg, out_dir, title=title, wall_time_s=wall)


def write_report(trials: list[dict], rows: list[str], splits: list[str], cfg: Config,
                 out_dir: Path, *, title: str, wall_time_s: float | None) -> dict[str, Any]:
    """ablation.md / .csv / .json and ablation.png from finished ``trials``."""
    table = collect(trials, rows, splits)
    text = write_tables(out_dir, table, splits, dataset=cfg.data.dataset, title=title,
                        extra={"wall_time_s": wall_time_s,
                               "trials": [{"mode": t["mode"], "seed": t["seed"],
                                           "run_dir": t["metrics"].get("run_dir"),
                                           "best_checkpoint": t["metrics"].get(
                                               "best_checkpoint")} for t in trials]})
    plot = plot_ablation(read_curves(trials_with_runs(trials)), out_dir / "ablation.png",
                         title=title)
    print(f"ablation: per-epoch curves in {plot}", flush=True)
    return {"markdown": text, "out_dir": str(out_dir), "table": table,
            "wall_time_s": wall_time_s}


def finished_trials(out_dir: Path) -> tuple[list[dict], dict]:
    """The trials of ``out_dir`` that trained and were evaluated, read from the Tuner's
    ``result.json`` files (their last record), and the trials' base config dict."""
    import json

    trials, base = [], None
    for result in sorted(tuner_dir(out_dir).glob("*/result.json")):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        config = last.get("config") or {}
        if not last.get("evaluated") or "loss.mode" not in config:
            continue
        trials.append({"mode": config["loss.mode"], "seed": config["train.seed"],
                       "metrics": last})
        base = base or config.get("base")
    return trials, base or {}


def report_ablation(out_dir: Path, rows: list[str]) -> dict[str, Any]:
    """Tables and curves of what has finished in ``out_dir`` (an ablation that was interrupted
    or is still running): each row shows the seeds that finished; nothing is trained."""
    from gtms.config import config_from_dict

    out_dir = out_dir.resolve()
    trials, base = finished_trials(out_dir)
    if not trials:
        raise TuneError(f"no finished trial under {tuner_dir(out_dir)}")
    cfg = config_from_dict(base, f"{tuner_dir(out_dir)} (trial base config)")
    done = {t["mode"] for t in trials}
    rows = [r for r in rows if r in done] + [r for r in rows if r not in done]
    seeds = {r: sorted(t["seed"] for t in trials if t["mode"] == r) for r in rows}
    title = (f"GTMS ablation on {cfg.data.dataset} ({cfg.model.preset}, {cfg.train.epochs} "
             f"epochs; finished seeds: "
             + ", ".join(f"{r} {len(s)}" for r, s in seeds.items()) + ")")
    return write_report(trials, rows, list(cfg.data.eval_splits), cfg, out_dir, title=title,
                        wall_time_s=None)
