"""Checkpoint -> (model, config), in one place: our training checkpoints and CRIS-layout ones.

Our checkpoints are one ``model.pt`` holding everything needed to resume or evaluate.

Keys: ``model`` (CRIS-named state dict, no ``module.`` prefix), ``optimizer``, ``scheduler``,
``scaler`` (AMP, may be None), ``epoch`` (the last finished epoch, counted from 1 as printed and
as in the ``checkpoint_epoch_NNNN`` folder name), ``step`` (optimizer steps so far), ``config``
(the resolved config as a plain dict), ``arch`` (the exact model shapes), ``metrics`` (that
epoch's line of ``metrics.jsonl``), ``format`` = :data:`FORMAT`. Everything is plain tensors and
containers, so loading uses ``torch.load(weights_only=True)``: loading is not executing.

``gtms-checkpoint-v1`` files counted epochs from 0; :func:`load_checkpoint` renumbers them, so
they still evaluate and resume.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gtms.config import Config, config_from_dict, load_config
from gtms.model.weights import CheckpointError

FORMAT = "gtms-checkpoint-v2"
FORMAT_EPOCHS_FROM_0 = "gtms-checkpoint-v1"
FILENAME = "model.pt"
DIR_PREFIX = "checkpoint_epoch_"


NO_CONFIG = ("", "none")
# Keys a given config must share with the checkpoint it runs (the input size may change).
ARCH_KEYS = (("model", "preset"), ("data", "word_len"))

__all__ = ["FILENAME", "FORMAT", "CheckpointError", "Trained", "checkpoint_dir_name",
           "checkpoint_dirs", "is_gtms_checkpoint", "load_checkpoint", "load_trained",
           "read_metrics", "resolve_checkpoint_file", "save_checkpoint"]


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of the checkpoint written after ``epoch`` (counted from 1):
    ``checkpoint_epoch_0001``. Local and Ray runs, and the summary, all name it here."""
    return f"{DIR_PREFIX}{epoch:04d}"


def checkpoint_dirs(run_dir: str | Path) -> dict[int, Path]:
    """The checkpoint folders of a local run folder that hold a checkpoint file, by epoch."""
    found = {}
    for folder in Path(run_dir).glob(f"{DIR_PREFIX}*"):
        epoch = folder.name[len(DIR_PREFIX):]
        if epoch.isdigit() and (folder / FILENAME).is_file():
            found[int(epoch)] = folder
    return dict(sorted(found.items()))


def resolve_checkpoint_file(path: str | Path) -> Path:
    """A checkpoint directory (Ray's ``checkpoint_*``) or a ``.pt`` file -> the local file.

    URIs (``s3://``, ``gs://``, ``file://``) are downloaded to a temporary folder first.
    """
    from gtms import storage

    if storage.is_uri(str(path)):
        if not storage.exists(str(path)):
            raise CheckpointError(f"checkpoint not found: {path}")
        local = Path(tempfile.mkdtemp(prefix="gtms-ckpt-"))
        if str(path).endswith(".pt"):
            (local / FILENAME).write_bytes(storage.read_bytes(str(path)))
        else:
            storage.download_dir(str(path), local)
        path = local
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def save_checkpoint(directory: str | Path, **payload: Any) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILENAME
    torch.save({"format": FORMAT, **payload}, target)
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load any checkpoint file as plain data (``weights_only=True``); ours come back in the
    current format."""
    file = resolve_checkpoint_file(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{file} is not a readable checkpoint "
                              f"(refused or corrupt: {str(err).splitlines()[0]})") from None
    return _upgraded(payload)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The ``metrics`` a checkpoint was saved with (its epoch's line of ``metrics.jsonl``),
    read without loading the weights into memory (memory-mapped)."""
    file = resolve_checkpoint_file(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not mappable (legacy serialization) or unreadable: the full loader says
        payload = load_checkpoint(file)
    payload = _upgraded(payload)
    if not is_gtms_checkpoint(payload) or not isinstance(payload.get("metrics"), dict):
        raise CheckpointError(f"{file} is not a training checkpoint of this project")
    return dict(payload["metrics"])


def _upgraded(payload: Any) -> Any:
    """A v1 checkpoint (epochs counted from 0) renumbered from 1 like v2."""
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT_EPOCHS_FROM_0):
        return payload
    payload = {**payload, "format": FORMAT, "epoch": int(payload["epoch"]) + 1}
    if isinstance(payload.get("metrics"), dict) and "epoch" in payload["metrics"]:
        payload["metrics"] = {**payload["metrics"], "epoch": payload["metrics"]["epoch"] + 1}
    return payload


def is_gtms_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") in (FORMAT, FORMAT_EPOCHS_FROM_0)


class Trained(NamedTuple):
    """A checkpoint ready to run: the model with its weights, its config, the local file."""

    model: torch.nn.Module
    config: Config
    file: Path


def load_trained(checkpoint: str | Path, config: str | Path | Config | None = None,
                 overrides: Sequence[str] = ()) -> Trained:
    """The model a checkpoint needs, loaded, and the config to run it with.

    The config: ``config`` when it is a :class:`Config`, or a YAML path (plus ``overrides``);
    else the config stored in one of our checkpoints (the built-in defaults for a CRIS-layout
    one) with ``overrides`` applied. A config whose ``model.preset`` or ``data.word_len``
    differs from the checkpoint's is refused. Our checkpoints rebuild their exact architecture
    (``arch``); a CRIS-layout checkpoint (``state_dict``, optional ``module.`` prefix) is built
    from the config's preset and loaded strictly. Every refusal is a :class:`CheckpointError`.
    """
    file = resolve_checkpoint_file(checkpoint)
    payload = load_checkpoint(file)
    ours = is_gtms_checkpoint(payload)
    stored = config_from_dict(payload["config"], f"{file} (stored config)") if ours else None
    if isinstance(config, Config):
        cfg = config
    elif config is not None and str(config).lower() not in NO_CONFIG:
        cfg = load_config(config, list(overrides))
    elif overrides:
        cfg = config_from_dict(payload["config"] if ours else {}, f"{file} (stored config)",
                               list(overrides))
    else:
        cfg = stored or Config()
    if not ours:
        return Trained(_build_cris_layout(file, cfg), cfg, file)
    for section, key in ARCH_KEYS:
        want, have = (getattr(getattr(c, section), key) for c in (stored, cfg))
        if want != have:
            raise CheckpointError(f"config does not match the checkpoint's architecture: "
                                  f"{section}.{key} is {have!r} but {file} was trained with "
                                  f"{want!r}")
    from gtms.model.build import CRISArch, build_from_arch, build_model

    if payload.get("arch"):  # exact shapes, also for CLIP weights of non-standard sizes
        model = build_from_arch(CRISArch.from_dict(payload["arch"]))
    else:
        model = build_model(stored.model.preset, word_len=stored.data.word_len)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{file} does not fit preset {stored.model.preset!r}: "
                              f"{str(err)[:500]}") from None
    return Trained(model, cfg, file)


def _build_cris_layout(file: Path, cfg: Config) -> torch.nn.Module:
    from gtms.model.build import build_model

    return build_model(cfg.model.preset, word_len=cfg.data.word_len, init_checkpoint=str(file))
