"""``run.py predict``: masks for image + sentence pairs, at each image's original resolution.

Per pair: read and decode the image -> letterbox to the input size -> CLIP-normalise; tokenise
the sentence -> CRIS (batched) -> sigmoid of the stride-4 logits -> inverse letterbox to the
original image -> threshold. The same steps and settings as the CRIS evaluation
(``gtms.eval.evaluate``), so a mask here is the mask that evaluation scores.

A pair that cannot be used (missing or undecodable image, empty sentence, malformed JSONL line)
is reported in its record and the others go on; a checkpoint or config that cannot be used stops
everything with a :class:`~gtms.errors.UserError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from gtms.config import Config
from gtms.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageHeaderError,
    ImageTooLargeError,
    check_image_pixels,
)
from gtms.data.tokenizer import ClipTokenizer, is_empty_expression
from gtms.data.transforms import ImageDecodeError, Letterbox, decode_image, normalize
from gtms.errors import UserError
from gtms.model.checkpoint import load_trained
from gtms.viz import overlay_mask, write_png

RECORDS_FILE = "predictions.jsonl"


class InferenceError(UserError, ValueError):
    """Inference cannot start: bad device, pairs that do not pair up, missing JSONL file."""


class PairError(ValueError):
    """One image + sentence pair cannot be used; the message says why."""


# --------------------------------------------------------------------------- device


def pick_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise the named device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InferenceError(f"--device {name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {name}: CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------- the predictor


@dataclass(frozen=True)
class PreparedPair:
    """One pair ready for the model."""

    image: np.ndarray        # [3, S, S] float32, letterboxed, CLIP-normalised
    tokens: np.ndarray       # [L] int64
    letterbox: Letterbox     # maps the prediction back to the original (H, W)
    token_count: int = 0     # the sentence's tokens before the cut to L (SOT, EOT included)


class Predictor:
    """A CRIS model ready for arbitrary images: :meth:`prepare`, then :meth:`probabilities` or
    :meth:`masks` for a batch of prepared pairs. ``config``: the resolved config of a
    checkpoint's model (None for an exported model), for what needs more than the masks (the
    GTMS panels of ``run.py demo``)."""

    def __init__(self, model: torch.nn.Module, *, input_size: int, word_len: int,
                 threshold: float, device: torch.device,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 config: Config | None = None):
        self.model = model.to(device).eval()
        self.config = config
        self.input_size = input_size
        self.word_len = word_len
        self.threshold = threshold
        self.device = device
        self.max_image_pixels = max_image_pixels
        self.tokenizer = ClipTokenizer()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, config: str | Path | Config | None = None,
                        overrides: Sequence[str] = (), *,
                        device: torch.device | None = None) -> Predictor:
        """Input size, word length, threshold and image pixel limit come from the config that
        :func:`~gtms.model.checkpoint.load_trained` resolves (``data.input_size``,
        ``data.word_len``, ``train.threshold``, ``data.max_image_pixels``)."""
        model, cfg, _ = load_trained(checkpoint, config, overrides)
        return cls(model, input_size=cfg.data.input_size, word_len=cfg.data.word_len,
                   threshold=cfg.train.threshold, device=device or pick_device(),
                   max_image_pixels=cfg.data.max_image_pixels, config=cfg)

    @classmethod
    def from_exported(cls, path: str | Path, *, threshold: float | None = None,
                      max_image_pixels: int | None = None) -> Predictor:
        """A model written by ``run.py export`` (ONNX or TorchScript), run on the CPU with the
        input size, word length, threshold and pixel limit it was exported with."""
        from gtms.infer.export import ExportedModel

        model = ExportedModel(path)
        meta = model.meta
        return cls(model, input_size=meta["input_size"], word_len=meta["word_len"],
                   threshold=meta["threshold"] if threshold is None else threshold,
                   device=torch.device("cpu"),
                   max_image_pixels=meta["max_image_pixels"] if max_image_pixels is None
                   else max_image_pixels)

    def prepare(self, image_rgb: np.ndarray, text: str) -> PreparedPair:
        """RGB uint8 ``[H, W, 3]`` + sentence -> model inputs. ``PairError`` for a sentence
        that is empty after CLIP's text cleaning: evaluation scores such a sentence (as CRIS),
        but a mask asked for with no words is a mistake worth reporting."""
        try:
            tokens, count = self.tokenizer.encode_counted(text, self.word_len)
            if is_empty_expression(text):
                raise ValueError(f"empty referring expression {text!r}: no words left after "
                                 "CLIP's text cleaning")
        except (TypeError, ValueError) as err:
            raise PairError(str(err)) from None
        letterbox = Letterbox(image_rgb.shape[0], image_rgb.shape[1], self.input_size)
        return PreparedPair(normalize(letterbox.apply_image(image_rgb)), tokens, letterbox,
                            count)

    def truncation_warning(self, pair: PreparedPair) -> str | None:
        """What to tell the user when the model reads only the start of the sentence."""
        if pair.token_count <= self.word_len:
            return None
        return (f"the sentence has {pair.token_count:,} tokens (SOT and EOT included); the "
                f"model reads its first {self.word_len - 2} and ignores the rest "
                f"(data.word_len {self.word_len} holds SOT, {self.word_len - 2} tokens, EOT)")

    @torch.inference_mode()
    def probabilities(self, pairs: Sequence[PreparedPair]) -> list[np.ndarray]:
        """Prepared pairs (one batch) -> float32 ``[H, W]`` probabilities on each original."""
        if not pairs:
            return []
        images = torch.from_numpy(np.stack([p.image for p in pairs])).to(self.device)
        tokens = torch.from_numpy(np.stack([p.tokens for p in pairs])).to(self.device)
        logits = self.model(images, tokens).logits  # [B, 1, S/4, S/4]
        probs = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        return [pair.letterbox.invert_prediction(p) for pair, p in zip(pairs, probs)]

    def masks(self, pairs: Sequence[PreparedPair]) -> list[np.ndarray]:
        """Prepared pairs -> bool ``[H, W]`` masks (probability > threshold)."""
        return [probs > self.threshold for probs in self.probabilities(pairs)]


def read_image(path: str | Path, *, apply_orientation: bool = True,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file -> RGB uint8 ``[H, W, 3]``; ``PairError`` naming the file otherwise.

    With ``apply_orientation`` the EXIF orientation is applied, so the array (and the mask) is
    the image as viewers show it and as the sentence's writer saw it ("left" stays left);
    without, the stored pixels are used, as the datasets' annotations are. An image whose
    header says it has more than ``max_pixels`` pixels (0: no limit) is refused undecoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PairError(f"image not found: {path}") from None
    except OSError as err:
        raise PairError(f"cannot read image {path}: {err.strerror or err}") from None
    _check_pixels(data, max_pixels, path)
    try:
        if not apply_orientation:
            return decode_image(data)
        buf = np.frombuffer(data, dtype=np.uint8)
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if bgr is None:
            raise ImageDecodeError(f"cannot decode image from {buf.size} bytes")
    except (ImageDecodeError, cv2.error) as err:
        raise PairError(f"{path} is not an image OpenCV can decode ({err})") from None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_pixels(data: bytes, max_pixels: int, path: Path) -> None:
    try:
        check_image_pixels(data, max_pixels, name=str(path))
    except ImageTooLargeError as err:
        raise PairError(f"{err}; if you trust the file, raise the limit: --max-image-pixels "
                        f"{err.pixels} (i.e. --set data.max_image_pixels={err.pixels}; 0 = no "
                        "limit)") from None
    except ImageHeaderError as err:
        raise PairError(f"{path} is not an image whose size Pillow can read from its header "
                        f"({err}); convert it to PNG or JPEG, or use --max-image-pixels 0 to "
                        "decode it unchecked") from None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class PredictRequest:
    """One pair to predict. ``problem`` marks a request that was malformed where it was read
    (a bad JSONL line): it is reported as that pair's failure."""

    image: str
    text: str
    problem: str | None = None


def pair_requests(images: Sequence[str], texts: Sequence[str]) -> list[PredictRequest]:
    """``--image`` / ``--text`` given in pairs -> requests (the k-th image with the k-th text)."""
    if len(images) != len(texts):
        raise InferenceError(f"--image and --text come in pairs: got {len(images)} image(s) "
                             f"and {len(texts)} text(s)")
    return [PredictRequest(str(image), text) for image, text in zip(images, texts)]


def read_jsonl_requests(path: str | Path) -> list[PredictRequest]:
    """Lines ``{"image": path, "text": "..."}``; relative paths are resolved against the
    file's folder. A malformed line becomes a failed request naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InferenceError(f"cannot read --jsonl {path}: {err}") from None
    requests = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            requests.append(_jsonl_request(line, f"{path}:{number}", path.parent))
    return requests


def _jsonl_request(line: str, where: str, folder: Path) -> PredictRequest:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        return PredictRequest("", "", problem=f"{where}: not valid JSON ({err.msg})")
    if not isinstance(entry, dict):
        return PredictRequest("", "", problem=f"{where}: expected an object "
                                              '{"image": ..., "text": ...}')
    image, text = entry.get("image"), entry.get("text")
    bad = [key for key, value in (("image", image), ("text", text))
           if not isinstance(value, str)]
    if bad:
        return PredictRequest(str(image or ""), str(text or ""),
                              problem=f"{where}: {' and '.join(bad)} missing or not a string")
    resolved = Path(image).expanduser()
    if not resolved.is_absolute():
        resolved = folder / resolved
    return PredictRequest(str(resolved), text)


# --------------------------------------------------------------------------- running pairs


@dataclass
class PredictionRecord:
    """One line of ``predictions.jsonl``."""

    image: str
    text: str
    mask: str | None = None
    overlay: str | None = None
    mask_area_fraction: float | None = None
    height: int | None = None
    width: int | None = None
    error: str | None = None
    warning: str | None = None   # e.g. a sentence cut to the model's word length

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def output_stem(index: int, image: str) -> str:
    """``0007_<image stem>``: unique per pair (an image may come with several sentences)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image).stem)[:48] or "image"
    return f"{index:04d}_{stem}"


def predict_pairs(predictor: Predictor, requests: Sequence[PredictRequest], out_dir: str | Path,
                  *, batch_size: int = 8, apply_orientation: bool = True,
                  echo: Callable[[PredictionRecord, int, int], None] | None = None,
                  ) -> list[PredictionRecord]:
    """Predict every request, ``batch_size`` pairs per forward pass; write the mask (PNG, 0/255,
    original size) and the overlay of each good pair and one record per pair to
    ``<out_dir>/predictions.jsonl``. ``echo(record, number, total)`` is called in input order;
    ``apply_orientation``: see :func:`read_image`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[PredictionRecord] = []
    with (out_dir / RECORDS_FILE).open("w", encoding="utf-8") as log:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            for record in _predict_chunk(predictor, chunk, start + 1, out_dir,
                                         apply_orientation):
                records.append(record)
                log.write(json.dumps(record.to_json()) + "\n")
                log.flush()
                if echo is not None:
                    echo(record, len(records), len(requests))
    return records


def _predict_chunk(predictor: Predictor, chunk: Sequence[PredictRequest], first: int,
                   out_dir: Path, apply_orientation: bool) -> Iterator[PredictionRecord]:
    records = [PredictionRecord(r.image, r.text) for r in chunk]
    ready: list[tuple[int, np.ndarray, PreparedPair]] = []
    for k, request in enumerate(chunk):
        try:
            if request.problem:
                raise PairError(request.problem)
            image = read_image(request.image, apply_orientation=apply_orientation,
                               max_pixels=predictor.max_image_pixels)
            ready.append((k, image, predictor.prepare(image, request.text)))
            records[k].warning = predictor.truncation_warning(ready[-1][2])
        except PairError as err:
            records[k].error = str(err)
    masks = predictor.masks([pair for _, _, pair in ready])
    for (k, image, _), mask in zip(ready, masks):
        record = records[k]
        stem = output_stem(first + k, record.image)
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        try:
            write_png(mask_path, mask.astype(np.uint8) * 255)
            write_png(overlay_path, overlay_mask(image, mask, record.text))
        except OSError as err:
            record.error = str(err)
            continue
        record.mask, record.overlay = str(mask_path), str(overlay_path)
        record.mask_area_fraction = round(float(mask.mean()), 6)
        record.height, record.width = int(mask.shape[0]), int(mask.shape[1])
    yield from records
