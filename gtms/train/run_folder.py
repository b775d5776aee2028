"""A training run's folder: its name, what it records about itself, and the folder a resume
continues.

A run lives in ``<train.run_dir>/<name>/``: ``config.yaml`` (resolved), ``run.json`` (git SHA,
package versions, seeds, command), ``metrics.jsonl``, ``tb/`` (TensorBoard), the
``checkpoint_epoch_0001/model.pt`` … folders, ``summary.json`` at the end (with the commands to
evaluate, predict and visualize, and the example image ``example_ref<id>.<ext>`` for the predict
command). Epochs are counted from 1 everywhere, as printed. The folder is made once everything
that can fail early (data, SynthCLIP, model weights) has been checked, and a new run that fails
before its first epoch finishes is removed again.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gtms import storage
from gtms.config import Config, config_from_dict, dump_config, parse_yaml_bytes
from gtms.console import say
from gtms.errors import UserError


class RunError(UserError, RuntimeError):
    """A run cannot start (missing data, existing run folder, bad resume target)."""


@dataclass(frozen=True)
class RunPaths:
    storage: str           # train.run_dir: an absolute local path or a URI
    name: str

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


def default_run_name(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{cfg.model.preset}-{cfg.loss.mode}-{stamp}"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "numpy", "pyarrow", "numba", "opencv-python-headless",
                 "instant-clip-tokenizer", "pycocotools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def write_run_metadata(run_dir: str, cfg: Config, *, world_size: int) -> None:
    folder = storage.RunFolder(run_dir)
    (folder.path / "config.yaml").write_text(dump_config(cfg))
    meta = {"git_sha": git_sha(), "versions": package_versions(), "command": sys.argv,
            "seeds": {"base": cfg.train.seed,
                      "per_rank": [cfg.train.seed + r for r in range(max(world_size, 1))],
                      "sentence_and_shuffle": cfg.train.seed},
            "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder.path / "run.json").write_text(json.dumps(meta, indent=2))
    folder.sync()


def choose_run_folder(cfg: Config, *, resume: str | None, set_overrides: tuple[str, ...] = (),
                      local_only: bool = False) -> tuple[Config, RunPaths]:
    """Pick the run folder and the config to run. ``resume`` = a run name, a run folder, or
    ``"latest"``; a resumed run uses its own ``config.yaml`` with ``set_overrides`` on top
    (e.g. ``--set train.epochs=20`` to train longer)."""
    base = storage.absolute(cfg.train.run_dir)
    if resume is None:
        name = cfg.train.name or default_run_name(cfg)
        if storage.exists(storage.join(base, name)):
            raise RunError(f"run folder {storage.join(base, name)} exists; pass --resume "
                           f"{shlex.quote(name)} to continue it or choose another train.name")
        paths = RunPaths(base, name)
    else:
        paths = _resumed_paths(base, resume)
        config_file = storage.join(paths.run_dir, "config.yaml")
        if not storage.exists(config_file):
            raise RunError(f"--resume: {paths.run_dir} is not a run folder (no config.yaml)")
        cfg = load_run_config(config_file, set_overrides)
    if local_only and storage.is_uri(paths.storage):
        raise RunError("--no-ray needs a local train.run_dir (Ray writes URIs)")
    return cfg, paths


def _resumed_paths(base: str, resume: str) -> RunPaths:
    if resume == "latest":
        if storage.is_uri(base):
            raise RunError("--resume latest needs a local train.run_dir; name the run instead")
        runs = sorted(Path(base).glob("*/config.yaml"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise RunError(f"--resume latest: no runs under {base}")
        return RunPaths(str(runs[-1].parent.parent), runs[-1].parent.name)
    if not storage.is_uri(resume) and Path(resume).is_dir():
        return RunPaths(str(Path(resume).resolve().parent), Path(resume).resolve().name)
    return RunPaths(base, resume)


def load_run_config(config_file: str, overrides: tuple[str, ...] = ()) -> Config:
    """A run folder's ``config.yaml`` (local or URI) with ``overrides`` on top."""
    return config_from_dict(parse_yaml_bytes(storage.read_bytes(config_file), config_file),
                            config_file, overrides)


def remove_unfinished_run(run_dir: str) -> None:
    """Remove the folder of a new run that failed before finishing an epoch (nothing in it to
    resume from), so that the same command can simply be run again."""
    if storage.exists(storage.join(run_dir, "metrics.jsonl")) or not storage.exists(run_dir):
        return
    storage.remove_dir(run_dir)
    say(f"removed the run folder {run_dir}: the run failed before its first epoch finished",
        stream=sys.stderr)
