"""One referring expression target (a *ref*) as the data layer passes it around.

:class:`RefRecord` is what the refer loader produces and what one Parquet shard row holds (minus
the image bytes). Bad input is reported through one :class:`SkipLog`: with ``strict`` the first
problem raises :class:`BadInputError` naming the file and the ref id; otherwise the row is skipped
and counted by reason, and the counts end up in the shard manifest. Nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gtms.data.transforms import rle_decode
from gtms.errors import UserError

# Reasons a ref is skipped (the keys of the manifest's "skipped" counts).
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than images.DEFAULT_MAX_IMAGE_PIXELS
BOX_OUTSIDE_IMAGE = "box_outside_image"
BOX_ZERO_AREA = "box_zero_area"
NO_SENTENCES = "no_sentences"
BAD_SEGMENTATION = "bad_segmentation"
MISSING_ANNOTATION = "missing_annotation"
MISSING_IMAGE_INFO = "missing_image_info"
MALFORMED_ANNOTATION = "malformed_annotation"  # no integer image_id, bbox not 4 numbers, ...
MALFORMED_IMAGE_INFO = "malformed_image_info"  # no positive integer height/width, no file_name
PATH_OUTSIDE_IMAGES = "path_outside_images"  # file_name absolute or with '..': never read
UNKNOWN_CATEGORY = "unknown_category"
MALFORMED_REF = "malformed_ref"
# Reasons that count dropped sentences, not refs (the ref stays if another sentence remains).
# EMPTY_SENTENCE is counted by training only: prepare keeps empty sentences for evaluation.
EMPTY_SENTENCE = "empty_sentence"
MALFORMED_SENTENCE = "malformed_sentence"
SENTENCE_REASONS = frozenset({EMPTY_SENTENCE, MALFORMED_SENTENCE})
# Reasons that count what was kept as it is but is worth knowing (never raise under strict).
TRUNCATED_SENTENCE = "truncated_sentence"  # more tokens than CLIP's context: the rest is cut
CORRUPT_JPEG_WARNING = "corrupt_jpeg_warning"  # libjpeg warned while decoding; it decoded
NOTE_REASONS = frozenset({TRUNCATED_SENTENCE, CORRUPT_JPEG_WARNING})

MAX_EXAMPLES_PER_REASON = 10


def is_ref_reason(reason: str) -> bool:
    """True for a reason that counts skipped refs (not dropped sentences, not notes)."""
    return reason not in SENTENCE_REASONS and reason not in NOTE_REASONS


class DataError(UserError):
    """Input data that cannot be prepared (base of the data layer's errors)."""


class BadInputError(DataError):
    """One bad ref under ``--strict``: the message names the file and the ref id."""

    def __init__(self, reason: str, *, file: str | Path, ref_id: int | None, detail: str):
        where = f"ref {ref_id}: " if ref_id is not None else ""
        super().__init__(f"{file}: {where}{reason}: {detail}")
        self.reason = reason
        self.file = str(file)
        self.ref_id = ref_id


class UnsafePickleError(DataError):
    """A refs pickle asked for a class; only builtin containers and scalars are admitted."""

    def __init__(self, file: str | Path, module: str, name: str):
        super().__init__(
            f"{file}: refused to unpickle: it names the class {module}.{name}; a refs pickle may"
            " hold only builtin containers and scalars (dict, list, tuple, str, int, float, bool,"
            " None), so nothing in it was executed")
        self.file = str(file)
        self.class_name = f"{module}.{name}"


@dataclass(frozen=True)
class RefRecord:
    """One ref: an annotated object of one image and all the sentences that refer to it.

    ``box_xywh`` is COCO's ``(x, y, w, h)`` in continuous pixel coordinates of the original image;
    ``mask_rle_counts`` is the compressed COCO RLE counts string of the ``(height, width)`` mask.
    """

    ref_id: int
    ann_id: int
    image_id: int
    file_name: str
    height: int
    width: int
    box_xywh: tuple[float, float, float, float]
    category_id: int
    category: str
    split: str
    sentences: tuple[str, ...]
    mask_rle_counts: str

    @property
    def mask_rle(self) -> dict:
        """COCO RLE dict (``size`` = ``[height, width]``, ``counts`` as bytes) for pycocotools."""
        return {"size": [self.height, self.width], "counts": self.mask_rle_counts.encode("ascii")}

    def decode_mask(self) -> np.ndarray:
        """The mask as ``[H, W]`` uint8 in {0, 1}."""
        return rle_decode(self.mask_rle_counts, self.height, self.width)


class RecordWithImage(NamedTuple):
    """A shard row: the record and the original encoded image bytes."""

    record: RefRecord
    image: bytes


class SkipLog:
    """Counts skipped refs by reason (keeping a few examples), or raises under ``strict``; also
    counts notes on what was kept (:data:`NOTE_REASONS`, see :meth:`note`)."""

    def __init__(self, *, strict: bool):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = {}

    def skip(self, reason: str, *, file: str | Path, ref_id: int | None, detail: str) -> None:
        """Record one skipped ref; raises :class:`BadInputError` when strict."""
        if self.strict:
            raise BadInputError(reason, file=file, ref_id=ref_id, detail=detail)
        self.note(reason, file=file, ref_id=ref_id, detail=detail)

    def note(self, reason: str, *, file: str | Path, ref_id: int | None, detail: str) -> None:
        """Count one thing that was kept as it is (never raises, strict or not)."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append({"ref_id": ref_id, "file": str(file), "detail": detail})

    @property
    def refs_skipped(self) -> int:
        return sum(n for reason, n in self.counts.items() if is_ref_reason(reason))

    @property
    def sentences_dropped(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason in SENTENCE_REASONS)

    @property
    def noted(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason in NOTE_REASONS)

    def merge(self, counts: dict[str, int], examples: dict[str, list[dict]]) -> None:
        """Add counts and examples recorded elsewhere (e.g. by an earlier, resumed run)."""
        self.counts.update(counts)
        for reason, items in examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(items[: MAX_EXAMPLES_PER_REASON - len(kept)])
