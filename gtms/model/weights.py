"""Loading pretrained weights into CRIS: OpenAI CLIP checkpoints and CRIS-layout checkpoints.

Loading is not executing. ``torch.load`` always runs with ``weights_only=True``; a file that needs
more (arbitrary pickled objects) is refused. Only OpenAI's TorchScript archives go through
``torch.jit.load``, and only their state dict is kept.

- OpenAI CLIP (``load_clip_weights``): TorchScript archive or plain state dict with the backbone's
  names without the ``backbone.`` prefix, without ``visual.attnpool.connect.*`` (CRIS's addition),
  plus the scalar entries ``input_resolution``, ``context_length``, ``vocab_size`` (dropped).
  Everything CLIP lacks keeps its initialisation; a ``LoadReport`` names what was missing.
- CRIS (``load_cris_checkpoint``): a dict with ``state_dict`` (CRIS) or ``model`` (our training
  checkpoints), or a bare state dict; names with or without DataParallel's ``module.`` prefix;
  loaded strictly.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from gtms.errors import UserError
from gtms.model.cris import CRIS

log = logging.getLogger(__name__)

CLIP_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
CRIS_PARALLEL_PREFIX = "module."
BACKBONE_PREFIX = "backbone."
_VIT_MARKERS = ("visual.class_embedding", "visual.transformer.")
_CLIP_RESNET_MARKERS = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
# What the builder reads a CLIP checkpoint's shapes from (besides the stage counts).
CLIP_SHAPE_KEYS = (
    *_CLIP_RESNET_MARKERS,
    "text_projection",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
)
STATE_DICT_ENTRIES = ("state_dict", "model")  # CRIS's / our training checkpoints' weights entry
_MAX_LISTED = 12


class CheckpointError(UserError, ValueError):
    """A weights file cannot be used; the message names the file and the reason."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist or is not a file."""


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch checkpoint (random bytes, text, a corrupt archive, ...)."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects beyond tensors and containers (weights_only refuses it)."""


class UnsupportedCheckpointError(CheckpointError):
    """A checkpoint of the wrong kind (a CLIP ViT, a CLIP model where CRIS is expected, ...)."""


class CheckpointShapeError(CheckpointError):
    """Some tensors have a different shape in the checkpoint than in the model."""


class CheckpointKeyError(CheckpointError):
    """A strict load found names missing from, or unknown to, the model."""


class ChecksumMismatchError(CheckpointError):
    """The file's SHA-256 differs from the one written beside it: damaged after it was saved."""


# Our checkpoint files carry their SHA-256 in ``<file>.sha256`` (``sha256sum``'s format);
# OpenAI's and CRIS's files have none and load as before.
CHECKSUM_SUFFIX = ".sha256"


def checksum_path(file: str | Path) -> str:
    return f"{file}{CHECKSUM_SUFFIX}"


def sha256_hex(data_or_file: bytes | str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of bytes, or of a local file read in chunks."""
    digest = hashlib.sha256()
    if isinstance(data_or_file, bytes):
        digest.update(data_or_file)
        return digest.hexdigest()
    with open(data_or_file, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(file: str | Path) -> None:
    """Write ``<file>.sha256`` for a local file (after the file itself is complete)."""
    file = Path(file)
    Path(checksum_path(file)).write_text(f"{sha256_hex(file)}  {file.name}\n")


def verify_checksum(location: str | Path, expected: str | None, data: bytes | None = None) -> None:
    """Compare a file's SHA-256 (of ``data`` when given, else of the local file) with
    ``expected`` (the first word of its ``.sha256`` file; None: it has none, nothing to check)."""
    if expected is None:
        return
    actual = sha256_hex(data if data is not None else location)
    if actual != expected.split()[0]:
        raise ChecksumMismatchError(
            f"{location} is damaged: its SHA-256 is {actual[:16]}…, but "
            f"{Path(checksum_path(location)).name} written with it says {expected.split()[0][:16]}…"
            "; use another checkpoint (or train again)")


def local_checksum(file: str | Path) -> str | None:
    """The expected SHA-256 of a local file from ``<file>.sha256``, or None."""
    path = Path(checksum_path(file))
    return path.read_text() if path.is_file() else None


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load did; ``str()`` gives a readable summary."""

    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]  # model names the checkpoint lacks (they keep their initialisation)
    unexpected: tuple[str, ...]  # checkpoint names the model lacks (ignored)
    dropped: tuple[str, ...]  # metadata entries removed before loading

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.dropped:
            lines.append(f"dropped metadata: {', '.join(self.dropped)}")
        lines.append(f"missing (kept initialised): {_list_names(self.missing) or 'none'}")
        lines.append(f"unexpected (ignored): {_list_names(self.unexpected) or 'none'}")
        return "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading files


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """OpenAI CLIP ResNet checkpoint (TorchScript archive or plain state dict) -> state dict."""
    path = _existing_file(path)
    if _is_torchscript_archive(path):
        state_dict = _load_torchscript_state_dict(path)
    else:
        state_dict = _state_dict_of(_load_weights_only(path), path)
    if any(k.startswith(BACKBONE_PREFIX) or k.startswith(CRIS_PARALLEL_PREFIX) for k in state_dict):
        raise UnsupportedCheckpointError(
            f"{path} looks like a CRIS checkpoint (names start with 'backbone.'/'module.'), not "
            "an OpenAI CLIP one: load it with load_cris_checkpoint (init_checkpoint)"
        )
    _refuse_vit(state_dict, path)
    missing = [k for k in CLIP_SHAPE_KEYS if k not in state_dict]
    if missing:
        raise UnsupportedCheckpointError(
            f"{path} is not an OpenAI CLIP ResNet checkpoint: it has no {', '.join(missing)}"
        )
    return dict(state_dict)


def read_cris_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """CRIS-layout checkpoint -> state dict with any ``module.`` prefix removed."""
    path = _existing_file(path)
    if _is_torchscript_archive(path):
        raise UnsupportedCheckpointError(
            f"{path} is a TorchScript archive (an OpenAI CLIP model?), not a CRIS checkpoint: "
            "pass it as clip_weights"
        )
    state_dict = _strip_prefix(_state_dict_of(_load_weights_only(path), path))
    _refuse_vit({k.removeprefix(BACKBONE_PREFIX): v for k, v in state_dict.items()}, path)
    if any(k in state_dict for k in _CLIP_RESNET_MARKERS):
        raise UnsupportedCheckpointError(
            f"{path} is an OpenAI CLIP state dict, not a CRIS checkpoint: pass it as clip_weights"
        )
    return state_dict


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    return path


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips carry compiled code (``<name>/code/``) and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.endswith("constants.pkl") for n in archive.namelist())


def _load_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive; the scripted module itself is discarded."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # TorchScript's own
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as err:
        raise NotACheckpointError(
            f"{path} is not a readable TorchScript archive: {type(err).__name__}: {err}"
        ) from err


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive holding ``data.pkl``, or (legacy) a pickle stream."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # pickle PROTO opcode


def _load_weights_only(path: Path) -> object:
    verify_checksum(path, local_checksum(path))
    if not _looks_like_torch_save(path):
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if refused:
            raise UnsafeCheckpointError(
                f"{path} needs more than weights_only loading (it pickles {refused.group(1)}); "
                "refusing to execute it. Re-save only its tensors (a state dict)."
            ) from err
        raise NotACheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    except Exception as err:  # corrupt zip, truncated stream, wrong magic number, ...
        raise NotACheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {type(err).__name__}: {err}"
        ) from err


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: its ``state_dict`` (CRIS) or ``model`` (GTMS training
    checkpoints) entry if present, else ``obj`` itself."""
    entry = next((k for k in STATE_DICT_ENTRIES if isinstance(obj, Mapping) and k in obj), None)
    if entry is not None:
        obj = obj[entry]
    if not isinstance(obj, Mapping) or not obj:
        raise NotACheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise NotACheckpointError(
            f"{path} is not a state dict: entries that are not named tensors: {_list_names(bad)}"
        )
    return dict(obj)


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(CRIS_PARALLEL_PREFIX): v for k, v in state_dict.items()}


def _refuse_vit(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    if any(k.startswith(_VIT_MARKERS) for k in state_dict):
        raise UnsupportedCheckpointError(
            f"{path}: ViT CLIP checkpoints are not supported, use RN50/RN101"
        )


# ---------------------------------------------------------------------------------------------
# Loading into a model


def load_clip_weights(model: CRIS, path: str | Path) -> LoadReport:
    """Load an OpenAI CLIP ResNet checkpoint into ``model.backbone`` (a ``CRIS``)."""
    return load_clip_state_dict(model, read_clip_state_dict(path), source=str(path))


def load_clip_state_dict(
    model: CRIS, state_dict: Mapping[str, torch.Tensor], *, source: str = "<state dict>"
) -> LoadReport:
    """Copy CLIP tensors into ``model.backbone``; everything else keeps its initialisation."""
    dropped = tuple(k for k in CLIP_METADATA_KEYS if k in state_dict)
    weights = {k: v for k, v in state_dict.items() if k not in CLIP_METADATA_KEYS}
    ours = model.backbone.state_dict()
    _check_shapes(ours, weights, source=source, model_prefix=BACKBONE_PREFIX)
    model.backbone.load_state_dict({k: v for k, v in weights.items() if k in ours}, strict=False)
    report = LoadReport(
        source=source,
        loaded=tuple(BACKBONE_PREFIX + k for k in ours if k in weights),
        missing=tuple(BACKBONE_PREFIX + k for k in ours if k not in weights),
        unexpected=tuple(k for k in weights if k not in ours),
        dropped=dropped,
    )
    expected_gap = all(".attnpool.connect." in k for k in report.missing)
    log.log(logging.INFO if expected_gap and not report.unexpected else logging.WARNING,
            "CLIP weights: %s", report)
    return report


def load_cris_checkpoint(model: CRIS, path: str | Path) -> LoadReport:
    """Load a CRIS-layout checkpoint strictly: every name and shape must match the model."""
    state_dict = read_cris_state_dict(path)
    ours = model.state_dict()
    _check_shapes(ours, state_dict, source=str(path))
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    if missing or unexpected:
        raise CheckpointKeyError(
            f"{path} does not match the model: missing {_list_names(missing) or 'none'}; "
            f"unexpected {_list_names(unexpected) or 'none'}"
        )
    model.load_state_dict(state_dict, strict=True)
    report = LoadReport(str(path), tuple(state_dict), missing=(), unexpected=(), dropped=())
    log.info("CRIS checkpoint: %s", report)
    return report


def _check_shapes(
    ours: Mapping[str, torch.Tensor],
    theirs: Mapping[str, torch.Tensor],
    *,
    source: str,
    model_prefix: str = "",
) -> None:
    wrong = [
        f"{model_prefix}{k}: model {list(ours[k].shape)}, checkpoint {list(v.shape)}"
        for k, v in theirs.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointShapeError(
            f"{source}: {len(wrong)} tensors have the wrong shape: " + _list_names(wrong, sep="; ")
        )


def _list_names(names, *, sep: str = ", ") -> str:
    names = list(names)
    shown = sep.join(names[:_MAX_LISTED])
    return shown + (f"{sep}... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")
