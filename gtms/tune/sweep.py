"""``run.py sweep``: hyper-parameter search spaces from YAML on Ray Tune.

A sweep file is an experiment file with a ``sweep:`` section (ignored by every other command)::

    extends: synthref.yaml
    sweep:
      metric: val_mean_iou        # any per-epoch metric; default val_mean_iou
      mode: max                   # max | min
      num_samples: 1              # repeats of the grid / number of random samples
      max_concurrent_trials: 1    # 1 on a laptop; more on a cluster
      scheduler: none             # none | asha (early stopping of weak trials)
      grace_period: 1             # asha: epochs before a trial may be stopped
      reduction_factor: 2         # asha
      space:
        pseudo.sigma: {grid: [0.01, 0.02, 0.05]}
        optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
        loss.gamma_schedule: {choice: [linear, cosine]}

Distributions: ``grid`` (every value), ``choice``, ``uniform``, ``loguniform``, ``randint``.
"""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gtms import storage
from gtms.backend import Backend
from gtms.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    replace,
    split_key,
    sweep_section,
)
from gtms.eval.metrics import format_metric
from gtms.tune.tracked import parent_run
from gtms.tune.tuner import (
    TuneError,
    build_or_restore_tuner,
    experiment_dir,
    results_folder,
    trial_resources,
    trials_dir,
)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = ("metric", "mode", "num_samples", "max_concurrent_trials", "scheduler",
              "grace_period", "reduction_factor", "space")


@dataclass(frozen=True)
class SweepSpec:
    space: dict[str, tuple[str, list]]
    metric: str = "val_mean_iou"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    scheduler: str = "none"
    grace_period: int = 1
    reduction_factor: int = 2
    source: str = field(default="", compare=False)


# Scalar keys of the sweep section: type and the check each value must pass.
SWEEP_SCALARS: dict[str, tuple[type, Any, str]] = {
    "metric": (str, bool, "a metric name"),
    "mode": (str, lambda v: v in ("max", "min"), "max or min"),
    "num_samples": (int, lambda v: v >= 1, "an integer >= 1"),
    "max_concurrent_trials": (int, lambda v: v >= 1, "an integer >= 1"),
    "scheduler": (str, lambda v: v in ("none", "asha"), "none or asha"),
    "grace_period": (int, lambda v: v >= 1, "an integer >= 1"),
    "reduction_factor": (int, lambda v: v >= 2, "an integer >= 2"),
}


def _check_scalar(key: str, value: Any, path: Path) -> Any:
    kind, ok, expected = SWEEP_SCALARS[key]
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise ConfigError(f"bad value for 'sweep.{key}' in {path}: {value!r}; expected "
                          f"{expected}")
    return value


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def load_sweep(path: str | Path) -> tuple[Config, SweepSpec]:
    """The base config and the validated search space of a sweep file."""
    path = Path(path).resolve()
    cfg = load_config(path)
    found = sweep_section(path)
    if found is None:
        raise ConfigError(f"{path} has no 'sweep:' section (see gtms/tune/sweep.py for the "
                          "format)")
    section, path = found
    where = f"'sweep' in {path}"
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping")
    for key in section:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"unknown key 'sweep.{key}' in {path}; allowed: "
                              f"{', '.join(SWEEP_KEYS)}")
    space = {}
    for dotted, dist in (section.get("space") or {}).items():
        sec, key = split_key(dotted, f"sweep.space of {path}")
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
            raise ConfigError(f"sweep.space.{dotted} in {path} must be one of "
                              f"{{{' | '.join(d + ': [...]' for d in DISTRIBUTIONS)}}}")
        kind, values = next(iter(dist.items()))
        ranged = kind in ("uniform", "loguniform", "randint")
        if not isinstance(values, list) or not values or (ranged and len(values) != 2):
            need = "[low, high]" if ranged else "a non-empty list"
            raise ConfigError(f"sweep.space.{dotted} in {path}: {kind} needs {need}")
        if ranged and not all(_finite_number(v) for v in values):
            raise ConfigError(f"sweep.space.{dotted} in {path}: {kind} bounds must be finite "
                              f"numbers, got {values!r}")
        for value in values if kind in ("grid", "choice") else []:
            replace(cfg, **{sec: {key: value}})  # each value must be valid for the key
        space[str(dotted)] = (kind, values)
    if not space:
        raise ConfigError(f"{where} has an empty 'space'")
    scalars = {k: _check_scalar(k, v, path) for k, v in section.items() if k != "space"}
    return cfg, SweepSpec(space=space, source=str(path), **scalars)


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    makers = {"grid": tune.grid_search, "choice": tune.choice,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(*v)}
    return {key: makers[kind](values) for key, (kind, values) in spec.space.items()}


def overrides_yaml(cfg: Config, *, command_path: Path, metric: str, value: float) -> str:
    """A ready-to-run experiment file holding only what differs from the built-in defaults."""
    defaults, mine = config_to_dict(Config()), config_to_dict(cfg)
    diff = {s: {k: v for k, v in keys.items() if defaults[s][k] != v}
            for s, keys in mine.items()}
    diff = {s: keys for s, keys in diff.items() if keys}
    header = (f"# {shlex.join(['python', 'run.py', 'train', '--config', str(command_path)])}\n"
              f"# Best configuration of a sweep ({metric} = {format_metric(metric, value)}).\n"
              "# Example override: --set train.epochs=20\n")
    return header + yaml.safe_dump(diff, sort_keys=False)


# Swept keys that change the SynthCLIP weights: then each trial pretrains (or reuses) its own.
PRETRAIN_DEPENDS_ON = ("pretrain.", "model.", "data.")


def run_sweep(cfg: Config, spec: SweepSpec, *, out_dir: str | Path, resume: bool,
              backend: Backend) -> dict[str, Any]:
    """Run the sweep's trials on Ray Tune; returns every trial's row, the best one and
    ``best.yaml``'s location."""
    from gtms.data.roots import prepare_data_root

    if not backend.uses_ray:
        raise TuneError("a sweep runs its trials on Ray Tune (no --no-ray)")
    out_dir = experiment_dir(out_dir)
    cfg = replace(cfg, data={"root": prepare_data_root(cfg)})
    given_uri = cfg.train.tracking_uri   # best.yaml keeps it as given, not the sweep's store
    with parent_run(cfg, out_dir, "sweep") as parent:
        result = _sweep(parent.cfg, spec, out_dir=out_dir, resume=resume, backend=backend,
                        tracking=parent.spec, given_uri=given_uri)
        parent.finish(["best.yaml"], notes={
            spec.metric: result["best"][spec.metric],
            **{f"best {k}": v for k, v in result["best"]["params"].items()}})
    return result


def _sweep(cfg: Config, spec: SweepSpec, *, out_dir: str, resume: bool, backend: Backend,
           tracking: dict | None, given_uri: str) -> dict[str, Any]:
    """The trials on Ray Tune (:func:`run_sweep`)."""
    backend.start(cfg.ray, concurrent_trials=spec.max_concurrent_trials,
                  trial_cpus=trial_resources()["cpu"])
    if not any(key.startswith(PRETRAIN_DEPENDS_ON) for key in spec.space):
        # All trials share one SynthCLIP start: pretrain it once here, not in the first trials.
        from gtms.pretrain.run import with_synthclip

        cfg = with_synthclip(cfg, cfg.data.root, backend)
    start = time.time()
    grid = sweep_tuner(cfg, spec, out_dir=out_dir, resume=resume, tracking=tracking).fit()
    rows = [{"params": {k: result.config[k] for k in spec.space},
             spec.metric: (result.metrics or {}).get(spec.metric),
             "epochs": (result.metrics or {}).get("epoch", 0),
             "error": str(result.error) if result.error else None} for result in grid]
    ok = [r for r in rows if r[spec.metric] is not None and r["error"] is None]
    if not ok:
        raise TuneError(f"no trial of the sweep finished; see {out_dir}")
    best = sorted(ok, key=lambda r: r[spec.metric], reverse=spec.mode == "max")[0]
    best_path = write_best_yaml(replace(cfg, train={"tracking_uri": given_uri}), spec, best,
                                out_dir)
    return {"rows": sorted(rows, key=lambda r: (r[spec.metric] is None,
                                                -(r[spec.metric] or 0) if spec.mode == "max"
                                                else (r[spec.metric] or 0))),
            "best": best, "best_yaml": best_path,
            "wall_time_s": round(time.time() - start, 1)}


def sweep_tuner(cfg: Config, spec: SweepSpec, *, out_dir: str, resume: bool,
                tracking: dict | None = None):
    """The sweep's Tuner (new, or restored with ``resume``), each trial a
    :func:`gtms.tune.trial.tune_trial` without evaluation splits."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from gtms.tune.trial import tune_trial

    scheduler = None
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1,
                                  grace_period=spec.grace_period,
                                  reduction_factor=spec.reduction_factor)
    param_space = {"base": config_to_dict(cfg), "storage": trials_dir(out_dir),
                   "splits": [], "tracking": tracking, **tune_space(spec)}
    return build_or_restore_tuner(
        tune.with_resources(tune_trial, trial_resources()), param_space, out_dir=out_dir,
        resume=resume, tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials, scheduler=scheduler))


def write_best_yaml(cfg: Config, spec: SweepSpec, best: dict, out_dir: str) -> str:
    """``<out>/best.yaml``: the base config with the best trial's values; returns its path."""
    from gtms.tune.trial import apply_params

    best_cfg = apply_params(config_to_dict(cfg), best["params"])
    best_path = storage.join(out_dir, "best.yaml")
    # In a bucket the file is read after a download: its header then names the local copy.
    command_path = Path("best.yaml") if storage.is_uri(out_dir) else Path(best_path)
    with results_folder(out_dir) as folder:
        (folder / "best.yaml").write_text(overrides_yaml(
            best_cfg, command_path=command_path, metric=spec.metric, value=best[spec.metric]))
    return best_path
