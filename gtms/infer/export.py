"""A trained model as a file that runs without this project's training code: ONNX or TorchScript.

The exported model maps ``image`` (float32 ``[B, 3, S, S]``: letterboxed and standardised with
CLIP's mean/std, what :meth:`gtms.infer.predict.Predictor.prepare` makes) and ``tokens``
(int64 ``[B, L]``) to the mask logits at stride 4 (float32 ``[B, 1, S/4, S/4]``). ``S`` and
``L`` are fixed by the checkpoint's config; the batch is dynamic. Beside the file,
``<file>.json`` keeps what prediction needs (input size, word length, threshold, pixel limit),
so ``predict --model FILE`` runs it with the same pre- and post-processing as a checkpoint.

CRIS's projector applies its text-generated kernels as one grouped convolution with as many
groups as samples; ONNX needs the group count constant, so while exporting the projector
computes the same convolution as a sum over the kernel's offsets
(:class:`gtms.model.projector.Projector`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from gtms.config import Config
from gtms.errors import UserError
from gtms.model.checkpoint import load_trained

FORMATS = ("onnx", "torchscript")
ONNX_INSTALL = "pip install onnx onnxscript onnxruntime   (or: pip install -r requirements-dev.txt)"


class ExportError(UserError, RuntimeError):
    """A model cannot be exported or an exported file cannot be run."""


class MaskLogits(torch.nn.Module):
    """CRIS from (image, tokens) to the mask logits only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(image, tokens).logits


def example_inputs(input_size: int, word_len: int, batch: int = 2, seed: int = 0):
    """Standardised-looking images and token rows (SOT, a few words, EOT, padding)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, input_size, input_size, generator=generator)
    tokens = torch.zeros(batch, word_len, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:4] = torch.randint(1, 40000, (batch, 3), generator=generator)
    tokens[:, 4] = 49407
    return image, tokens


def export_model(checkpoint: str | Path, fmt: str, out: str | Path,
                 config: str | Path | Config | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``out`` (and ``out.json``); returns the sidecar's content."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    trained = load_trained(checkpoint, config, overrides)
    cfg, out = trained.config, Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = MaskLogits(trained.model.eval())
    inputs = example_inputs(cfg.data.input_size, cfg.data.word_len)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(wrapper, inputs, out)
        else:
            torch.jit.trace(wrapper, inputs, check_trace=False).save(str(out))
    meta = {"format": fmt, "checkpoint": str(trained.file), "input_size": cfg.data.input_size,
            "word_len": cfg.data.word_len, "threshold": cfg.train.threshold,
            "max_image_pixels": cfg.data.max_image_pixels,
            "inputs": {"image": "float32 [B, 3, S, S], letterboxed, CLIP mean/std",
                       "tokens": "int64 [B, L]"},
            "output": "logits float32 [B, 1, S/4, S/4]"}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=2))
    return meta


def _export_onnx(wrapper: torch.nn.Module, inputs, out: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ExportError(f"--format onnx needs the ONNX exporter: {ONNX_INSTALL}") from None
    batch = torch.export.Dim("batch")
    torch.onnx.export(wrapper, inputs, str(out), input_names=["image", "tokens"],
                      output_names=["logits"], dynamo=True, verbose=False,
                      dynamic_shapes={"image": {0: batch}, "tokens": {0: batch}})


class ExportedModel:
    """An exported file behind the model interface :class:`~gtms.infer.predict.Predictor`
    uses: ``model(images, tokens).logits``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        sidecar = Path(f"{self.path}.json")
        if not self.path.is_file() or not sidecar.is_file():
            raise ExportError(f"{self.path}: not an exported model of this project (it and "
                              f"{sidecar.name} must exist; write them with 'run.py export')")
        self.meta = json.loads(sidecar.read_text())
        if self.meta.get("format") == "onnx":
            self._session = _onnx_session(self.path)
            self._module = None
        else:
            self._session = None
            self._module = torch.jit.load(str(self.path), map_location="cpu").eval()

    def to(self, device) -> ExportedModel:
        if torch.device(device).type != "cpu":
            raise ExportError("an exported model runs on the CPU here (--device cpu)")
        return self

    def eval(self) -> ExportedModel:
        return self

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> SimpleNamespace:
        if self._module is not None:
            return SimpleNamespace(logits=self._module(images, tokens))
        (logits,) = self._session.run(None, {"image": images.numpy().astype(np.float32),
                                             "tokens": tokens.numpy().astype(np.int64)})
        return SimpleNamespace(logits=torch.from_numpy(logits))


def _onnx_session(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(f"running {path} needs ONNX Runtime: {ONNX_INSTALL}") from None
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
