"""Every checkpoint format this project writes or reads, in one place, with one error
vocabulary (:class:`gtms.model.weights.CheckpointError` and its kinds).

* **Training checkpoints** (ours): ``checkpoint_epoch_NNNN/model.pt`` holding everything needed
  to resume or evaluate. Keys: ``model`` (CRIS-named state dict, no ``module.`` prefix),
  ``optimizer``, ``scheduler``, ``scaler`` (AMP, may be None), ``epoch`` (the last finished
  epoch, counted from 1 as printed and as in the folder name), ``step`` (optimizer steps so
  far), ``config`` (the resolved config as a plain dict), ``arch`` (the exact model shapes),
  ``metrics`` (that epoch's line of ``metrics.jsonl``), ``random_states`` (every rank's
  generators, :mod:`gtms.train.random_state`), ``best_val_mean_iou`` (the best so far, None
  before any validation), ``format`` = :data:`FORMAT`. Everything
  is plain tensors and containers, so loading uses ``torch.load(weights_only=True)``: loading
  is not executing. ``gtms-checkpoint-v1`` files counted epochs from 0; :func:`load_checkpoint`
  renumbers them, so they still evaluate and resume.
* **SynthCLIP pretraining's final checkpoint**: ``backbone.pt`` (the backbone's state dict) and
  ``epochs.json`` (every epoch's metrics) (:func:`save_backbone_checkpoint`).
* **CLIP weights in OpenAI's layout**, written from a backbone (:func:`save_clip_weights`:
  SynthCLIP's ``clip.pt``), so that ``model.clip_weights`` loads them as it loads OpenAI's.
* **OpenAI CLIP and CRIS files** (not ours): parsed by :mod:`gtms.model.weights`;
  :func:`load_trained` runs a CRIS-layout checkpoint as it runs ours.

Every file written here gets its SHA-256 beside it (``model.pt.sha256``), checked on every
load: a damaged file stops with :class:`gtms.model.weights.ChecksumMismatchError` naming it.

A checkpoint may be a local path or a URI (``s3://``, ``gs://``, ``file://``); a URI is read
into memory, or for a CRIS-layout file into a temporary folder removed after loading.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gtms import storage
from gtms.config import NO_CONFIG, Config, config_from_dict, load_config
from gtms.model.weights import (
    CLIP_METADATA_KEYS,
    CheckpointError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CheckpointShapeError,
    NotACheckpointError,
    UnsupportedCheckpointError,
    checksum_path,
    local_checksum,
    verify_checksum,
    write_checksum,
)

FORMAT = "gtms-checkpoint-v2"
FORMAT_EPOCHS_FROM_0 = "gtms-checkpoint-v1"
FILENAME = "model.pt"
DIR_PREFIX = "checkpoint_epoch_"
BACKBONE_WEIGHTS = "backbone.pt"   # SynthCLIP's final checkpoint: the backbone's state dict
BACKBONE_EPOCHS = "epochs.json"    # ... and every epoch's metrics
CRIS_ONLY_PREFIX = "visual.attnpool.connect."  # CRIS's branch: not part of OpenAI's layout

# Keys a given config must share with the checkpoint it runs (the input size may change).
ARCH_KEYS = (("model", "preset"), ("data", "word_len"))

__all__ = ["FILENAME", "FORMAT", "CheckpointError", "Trained", "checkpoint_dir_name",
           "checkpoint_dirs", "checkpoint_location", "is_gtms_checkpoint", "load_checkpoint",
           "load_trained", "read_backbone_checkpoint", "read_metrics", "save_backbone_checkpoint",
           "save_checkpoint"]


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


def checkpoint_location(path: str | Path) -> str:
    """A checkpoint folder (``checkpoint_*``) or ``.pt`` file, local or URI -> the location
    of its file, checked to exist."""
    path = str(path)
    if storage.is_uri(path):
        file = path if path.endswith(".pt") else storage.join(path, FILENAME)
        if not storage.exists(file):
            raise CheckpointNotFoundError(f"checkpoint not found: {file}")
        return file
    file = Path(path) / FILENAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {file}")
    return str(file)


@contextmanager
def local_file(location: str) -> Iterator[Path]:
    """A checkpoint file as a local path: itself, or a URI's copy in a temporary folder that
    is removed when the block ends."""
    if not storage.is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="gtms-ckpt-") as tmp:
        copy = Path(tmp) / Path(location).name
        copy.write_bytes(storage.read_bytes(location))
        yield copy


def _torch_load(location: str, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a local file or a URI (read into memory), after
    checking it against the SHA-256 written beside it (when there is one)."""
    if storage.is_uri(location):
        data = storage.read_bytes(location)
        stamp = checksum_path(location)
        verify_checksum(location, storage.read_bytes(stamp).decode()
                        if storage.exists(stamp) else None, data)
        source = io.BytesIO(data)
    else:
        verify_checksum(location, local_checksum(location))
        source = location
    try:
        return torch.load(source, map_location="cpu", weights_only=True,
                          mmap=mmap and not storage.is_uri(location))
    except Exception as err:  # unpickling errors come in many types
        raise NotACheckpointError(f"{location} is not a readable checkpoint "
                                  f"(refused or corrupt: {str(err).splitlines()[0]})") from None


def save_checkpoint(directory: str | Path, **payload: Any) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILENAME
    torch.save({"format": FORMAT, **payload}, target)
    write_checksum(target)
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load any checkpoint file as plain data (``weights_only=True``); ours come back in the
    current format."""
    return _upgraded(_torch_load(checkpoint_location(path)))


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The ``metrics`` a checkpoint was saved with (its epoch's line of ``metrics.jsonl``),
    read without loading the weights into memory (memory-mapped)."""
    file = checkpoint_location(path)
    try:
        payload = _torch_load(file, mmap=True)
    except CheckpointError:  # not mappable (legacy serialization) or unreadable: the full
        payload = load_checkpoint(file)   # loader says which
    payload = _upgraded(payload)
    if not is_gtms_checkpoint(payload) or not isinstance(payload.get("metrics"), dict):
        raise UnsupportedCheckpointError(f"{file} is not a training checkpoint of this project")
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
    """A checkpoint ready to run: the model with its weights, its config, and where its file
    is (a local path or a URI)."""

    model: torch.nn.Module
    config: Config
    file: str


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
    file = checkpoint_location(checkpoint)
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
            raise UnsupportedCheckpointError(
                f"config does not match the checkpoint's architecture: {section}.{key} is "
                f"{have!r} but {file} was trained with {want!r}")
    from gtms.model.build import CRISArch, build_from_arch, build_model

    if payload.get("arch"):  # exact shapes, also for CLIP weights of non-standard sizes
        model = build_from_arch(CRISArch.from_dict(payload["arch"]))
    else:
        model = build_model(stored.model.preset, word_len=stored.data.word_len)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        kind = CheckpointKeyError if "key" in str(err).lower() else CheckpointShapeError
        raise kind(f"{file} does not fit preset {stored.model.preset!r}: "
                   f"{str(err)[:500]}") from None
    return Trained(model, cfg, file)


def _build_cris_layout(file: str, cfg: Config) -> torch.nn.Module:
    from gtms.model.build import build_model

    with local_file(file) as local:
        return build_model(cfg.model.preset, word_len=cfg.data.word_len,
                           init_checkpoint=str(local))


def save_backbone_checkpoint(directory: str | Path, state: dict[str, torch.Tensor],
                             epochs: list[dict]) -> None:
    """SynthCLIP pretraining's final checkpoint: the backbone and every epoch's metrics."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / BACKBONE_WEIGHTS)
    write_checksum(directory / BACKBONE_WEIGHTS)
    (directory / BACKBONE_EPOCHS).write_text(json.dumps(epochs))


def read_backbone_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor],
                                                             list[dict]]:
    """:func:`save_backbone_checkpoint` back: (the backbone's state dict, epochs' metrics)."""
    directory = str(directory)
    state = _torch_load(storage.join(directory, BACKBONE_WEIGHTS))
    try:
        epochs = json.loads(storage.read_bytes(storage.join(directory, BACKBONE_EPOCHS)))
    except (OSError, ValueError) as err:
        raise NotACheckpointError(f"{directory}: no readable {BACKBONE_EPOCHS} ({err})") \
            from None
    return state, epochs


def save_clip_weights(path: str | Path, backbone_state: dict[str, torch.Tensor], arch) -> None:
    """A backbone's state dict as a CLIP weights file in OpenAI's layout (CRIS's
    ``attnpool.connect`` dropped, OpenAI's scalar metadata entries added); ``arch``: the
    backbone's :class:`gtms.model.build.CRISArch`."""
    state = {k: v.detach().cpu().clone() for k, v in backbone_state.items()
             if not k.startswith(CRIS_ONLY_PREFIX)}
    metadata = {"input_resolution": arch.image_resolution, "context_length": arch.context_length,
                "vocab_size": arch.vocab_size}
    state.update({k: torch.tensor(metadata[k]) for k in CLIP_METADATA_KEYS})
    torch.save(state, path)
    write_checksum(path)
