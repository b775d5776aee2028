"""What ``ablate`` and ``sweep`` share: the experiment folder's layout, Ray Tune's Tuner (new
or restored), the resources of a trial's own process, and their error."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback

from gtms import console, storage
from gtms.errors import UserError

TUNER = "tuner"  # the Tuner's own folder under --out


class TuneError(UserError, RuntimeError):
    """An ablation or sweep cannot run or finish."""


def experiment_dir(out: str | Path) -> str:
    """``--out`` of ablate/sweep: a local folder made absolute, or a bucket URI (``s3://``,
    ``gs://``, ``file://``) kept as it is. On a multi-node cluster it must be a URI (or a file
    system mounted at the same path on every node): the trials' Ray Train runs store their
    checkpoints below it, and Ray refuses a folder that only one node can see."""
    return storage.absolute(str(out))


def tuner_dir(out_dir: str) -> str:
    return storage.join(out_dir, TUNER)


def trials_dir(out_dir: str) -> str:
    """Where the trials' run folders go (``train.run_dir`` of every trial)."""
    return storage.join(out_dir, "trials")


@contextmanager
def results_folder(out_dir: str) -> Iterator[Path]:
    """A local folder to write result files into: ``out_dir`` itself, or for a URI a temporary
    folder whose files are copied to ``out_dir`` when the block ends without error."""
    if not storage.is_uri(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="gtms-results-") as tmp:
        yield Path(tmp)
        storage.upload_dir(Path(tmp), out_dir)


def trial_tag(params: dict[str, Any]) -> str:
    """How a trial is named on the console: ``tree s0`` for an ablation row and seed, else its
    swept values (``pseudo.sigma=0.01``)."""
    if set(params) == {"loss.mode", "train.seed"}:
        return f"{params['loss.mode']} s{params['train.seed']}"
    return ", ".join(f"{key}={format_value(value)}" for key, value in sorted(params.items()))


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def swept(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's swept values: the dotted keys of its Tune config."""
    return {k: v for k, v in config.items() if "." in k}


class TrialLines(Callback):
    """A Ray Tune callback that prints one compact line per finished (or failed) trial: its
    tag, wall time and ``metric``, in place of Tune's status tables (those only with
    ``--verbose``)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = "—" if value is None else \
            f"{100 * value:.2f} %" if "iou" in self.metric else format_value(value)
        self.finished += 1
        console.say(f"trial {trial_tag(swept(trial.config))} finished in "
                    f"{(result.get('time_total_s') or 0) / 60:.1f} min: {self.metric} {shown} "
                    f"({self.finished} finished)")

    def on_trial_error(self, iteration, trials, trial, **info):
        console.say(f"trial {trial_tag(swept(trial.config))} FAILED; its files: {trial.path}",
                    stream=sys.stderr)


def build_or_restore_tuner(trainable, param_space: dict, *, out_dir: str, resume: bool,
                           tune_config, metric: str = "val_mean_iou"):
    """A new Tuner in ``out_dir/tuner``, or the interrupted one restored from there. The
    console shows one line per trial epoch (tagged by the trial) and per finished trial;
    Tune's own status tables only with ``--verbose``."""
    from ray import tune

    if not console.verbose():   # Tune's classic reporter at verbosity 0 prints nothing at all;
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # the new one still draws its boxes
    path = tuner_dir(out_dir)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise TuneError(f"--resume: nothing to restore in {path}")
        print(f"restoring the interrupted experiment from {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                  param_space=param_space)
    if storage.exists(path):
        raise TuneError(f"{path} exists; pass --resume to continue it or choose another --out")
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(
                          name=TUNER, storage_path=out_dir, callbacks=[TrialLines(metric)],
                          verbose=None if console.verbose() else 0))


def trial_resources() -> dict[str, float]:
    """The trial's own process takes (almost) no CPU: its TorchTrainer requests the workers,
    and a whole CPU here would starve them on a small machine: Ray would wait for a CPU that
    the trial's own idle process holds (the local plan of :mod:`gtms.runtime`)."""
    return {"cpu": 0.01}
