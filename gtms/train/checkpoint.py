"""Our training checkpoints: one ``model.pt`` holding everything needed to resume or evaluate.

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
from pathlib import Path
from typing import Any

import torch

from gtms.errors import UserError

FORMAT = "gtms-checkpoint-v2"
FORMAT_EPOCHS_FROM_0 = "gtms-checkpoint-v1"
FILENAME = "model.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable or does not fit."""


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
