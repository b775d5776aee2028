"""Reader for the ``refer`` toolkit layout: ``<root>/<dataset>/refs(<split_by>).p`` + instances.

RefCOCO, RefCOCO+, RefCOCOg and SynthRef all come in this layout::

    <refer_root>/<dataset>/refs(<split_by>).p   pickle: list of ref dicts (ref_id, ann_id,
                                                image_id, split, category_id, sentences[{sent}])
    <refer_root>/<dataset>/instances.json       COCO: images, annotations (bbox, segmentation),
                                                categories
    <images_dir>/<file_name>                    the image named by instances.json

The pickle is read with :class:`RestrictedUnpickler`, which admits only builtin containers and
scalars: a pickle that names any class (the only way a pickle can run code) is refused with
:class:`~gtms.data.records.UnsafePickleError` before anything is called. The released pickles
were written by Python 2: its ``str`` values are read as bytes and decoded one by one (UTF-8,
else latin-1), so one accented byte cannot make the whole file unreadable.

Every ref is checked before use (integer ids, a split name, a list of sentences, an annotation
with an integer ``image_id`` and a 4-number ``bbox``, an image with a positive integer size and a
file name inside the images folder (absolute or with ``..``: ``path_outside_images``, never
read), a segmentation that rasterises to the image's size); bad refs go through a
:class:`~gtms.data.records.SkipLog` (skip and count by reason, or raise under ``strict``). Image
files are checked later, when the shard writer reads their bytes.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import NamedTuple

from pycocotools import mask as mask_utils

from gtms.data import records as R
from gtms.data.records import DataError, RefRecord, SkipLog, UnsafePickleError
from gtms.data.tokenizer import CONTEXT_LENGTH, ClipTokenizer, shortened
from gtms.data.transforms import BoxOutsideImageError, validate_box

# Partitions the refer toolkit ships per dataset; the first one is the default.
SPLITS_BY = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "synthref": ("unc",),
}
REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
# Caps on a refs pickle once its shared references are expanded (a pickle may store a list once
# and name it again with two bytes: a 1.7 KB file can expand to 40**20 values). RefCOCOg (umd),
# the largest, expands to about 2.6 million values (dicts, lists, strings, numbers: ~52 per ref)
# and 25 MB of text; the caps are ~8x and ~20x that. Checked before anything is built.
MAX_PICKLE_VALUES = 20_000_000
MAX_PICKLE_TEXT_BYTES = 512 * 1024 * 1024
# Wall time to read and decode a refs pickle (RefCOCOg: about 2 s).
MAX_PICKLE_SECONDS = 120.0


def default_split_by(dataset: str) -> str:
    """``unc`` for refcoco/refcoco+/synthref, ``umd`` for refcocog."""
    if dataset not in SPLITS_BY:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {sorted(SPLITS_BY)}")
    return SPLITS_BY[dataset][0]


@dataclass(frozen=True)
class ReferSource:
    """Where one dataset partition lives in the refer layout."""

    refer_root: Path
    dataset: str
    split_by: str
    images_dir: Path

    def __post_init__(self) -> None:
        allowed = SPLITS_BY.get(self.dataset)
        if allowed is None:
            raise DataError(f"unknown dataset {self.dataset!r}; expected one of "
                            f"{sorted(SPLITS_BY)}")
        if self.split_by not in allowed:
            raise DataError(f"{self.dataset} has no {self.split_by!r} partition; "
                            f"expected one of {list(allowed)}")

    @property
    def refs_path(self) -> Path:
        return Path(self.refer_root) / self.dataset / f"refs({self.split_by}).p"

    @property
    def instances_path(self) -> Path:
        return Path(self.refer_root) / self.dataset / "instances.json"

    def image_path(self, file_name: str) -> Path:
        """The file ``file_name`` names inside ``images_dir``; one that would lie outside it
        (see :func:`image_path_problem`) is a :class:`~gtms.data.records.DataError`."""
        if (problem := image_path_problem(file_name)) is not None:
            raise DataError(f"image file_name {file_name!r} {problem}")
        return Path(self.images_dir) / file_name


def image_path_problem(file_name: str) -> str | None:
    """Why ``file_name`` (from instances.json) would name a file outside the images folder, or
    None: an absolute path, a ``..`` part (the names are not resolved: a link inside the
    folder is followed as the user set it up), or a NUL byte."""
    if "\0" in file_name:
        return "holds a NUL byte"
    path = Path(file_name)
    if path.is_absolute() or path.drive:
        return "is an absolute path; file names are relative to --images"
    if ".." in path.parts:
        return "goes up with '..'; file names must stay inside --images"
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every class lookup.

    Pickled dicts, lists, tuples, str, bytes, int, float, bool and None are built by opcodes of
    their own; everything else (objects, functions such as ``os.system``, even ``set`` under old
    protocols) needs ``find_class``, which raises here, so no pickled callable is ever reached.
    Python 2 ``str`` values come back as ``bytes`` (``encoding="bytes"``), for
    :func:`decode_py2_text` to decode one by one.
    """

    def __init__(self, file, path: str | Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(self._path, module, name)

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refused to unpickle: it uses a persistent id ({pid!r})")


class PickleTooLargeError(DataError):
    """A refs pickle whose shared references expand past a cap, or that takes too long."""


class _Clock:
    """The time budget of reading one refs pickle: :meth:`check` raises once it is spent."""

    def __init__(self, path, seconds: float):
        self.path, self.seconds = path, seconds
        self.deadline = time.monotonic() + seconds
        self.calls = 0

    def check(self) -> None:
        self.calls += 1
        if self.calls % 4096 == 1 and time.monotonic() > self.deadline:
            raise PickleTooLargeError(
                f"{self.path}: refused: reading it took more than {self.seconds:.0f} s "
                "(RefCOCOg takes about 2 s); it is not a refs pickle the refer toolkit wrote")


def check_expansion(value, path, clock: _Clock | None = None) -> tuple[int, int]:
    """``(values, text bytes)`` of an unpickled ``value`` with every shared reference counted
    each time it is used (what walking it visits), computed once per container; raises
    :class:`PickleTooLargeError` past :data:`MAX_PICKLE_VALUES` / :data:`MAX_PICKLE_TEXT_BYTES`
    and :class:`~gtms.data.records.DataError` for a container that contains itself."""
    sizes: dict[int, tuple[int, int]] = {}
    open_ids: set[int] = set()

    def size(v) -> tuple[int, int]:  # v: a list, tuple or dict
        if id(v) in sizes:
            return sizes[id(v)]
        if id(v) in open_ids:
            raise DataError(f"{path}: not a refs pickle: a {type(v).__name__} contains itself")
        open_ids.add(id(v))
        values, text = 1, 0
        for item in chain.from_iterable(v.items()) if type(v) is dict else v:
            kind = type(item)
            if kind is list or kind is dict or kind is tuple:
                n, b = size(item)
                values, text = values + n, text + b
            else:
                values += 1
                text += len(item) if kind is bytes or kind is str else 0
        if values > MAX_PICKLE_VALUES or text > MAX_PICKLE_TEXT_BYTES:
            raise PickleTooLargeError(
                f"{path}: refused: its shared references expand to more than "
                f"{MAX_PICKLE_VALUES:,} values or {MAX_PICKLE_TEXT_BYTES >> 20} MB of text "
                "(RefCOCOg: about 2.6 million values, 25 MB); not a refs pickle the refer "
                "toolkit wrote")
        if clock is not None:
            clock.check()
        open_ids.discard(id(v))
        sizes[id(v)] = (values, text)
        return values, text

    if type(value) in (list, tuple, dict):
        return size(value)
    return 1, len(value) if type(value) in (bytes, str) else 0


def decode_py2_text(value, clock: _Clock | None = None):
    """``value`` with every ``bytes`` (a Python 2 ``str``) decoded, dict keys included: UTF-8
    where the bytes are valid UTF-8, else latin-1 (every byte is a latin-1 character).

    A refs pickle holds no binary data, so bytes are always text. Unpickled values have exact
    builtin types, which the walk dispatches on; repeated texts (keys, tokens) decode once.
    Shared references are walked each time they are used: check the size first
    (:func:`check_expansion`).
    """
    texts: dict[bytes, str] = {}

    def walk(v):
        kind = type(v)
        if kind is bytes:
            if v not in texts:
                texts[v] = _decode_text(v)
            return texts[v]
        if clock is not None and (kind is list or kind is dict or kind is tuple):
            clock.check()
        if kind is list:
            return [walk(x) for x in v]
        if kind is dict:
            decoded = {walk(k): walk(x) for k, x in v.items()}
            if len(decoded) != len(v):
                raise ValueError(f"two keys of one dict decode to the same text: {list(v)}")
            return decoded
        if kind is tuple:
            return tuple(walk(x) for x in v)
        return v

    return walk(value)


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_refs_pickle(path: str | Path) -> list[dict]:
    """A refs pickle (Python 2 or 3) -> its list of ref dicts, read with
    :class:`RestrictedUnpickler`, its expanded size checked (:func:`check_expansion`), text
    decoded by :func:`decode_py2_text`, all within :data:`MAX_PICKLE_SECONDS`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: refs pickle not found")
    clock = _Clock(path, MAX_PICKLE_SECONDS)
    with open(path, "rb") as f:
        try:
            raw = RestrictedUnpickler(f, path).load()
            check_expansion(raw, path, clock)
            refs = decode_py2_text(raw, clock)
        except DataError:
            raise
        except RecursionError as err:
            raise DataError(f"{path}: not a refs pickle: nested too deeply") from err
        except Exception as err:  # a damaged pickle raises many types; all mean "unreadable"
            raise DataError(
                f"{path}: not a readable refs pickle: {type(err).__name__}: {err}") from err
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    return refs


@dataclass(frozen=True)
class Instances:
    """``instances.json`` indexed by id (entries whose ``id`` is not an integer are left out:
    no ref can name them)."""

    images: dict[int, dict]
    anns: dict[int, dict]
    cats: dict[int, dict]


def load_instances(path: str | Path) -> Instances:
    """``instances.json`` -> :class:`Instances`; a file that is not COCO JSON is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: instances file not found")
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except RecursionError as err:
        raise DataError(f"{path}: not a COCO instances file: JSON nested too deeply") from err
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable as JSON: {err}") from err
    keys = ("images", "annotations", "categories")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), list) for k in keys):
        raise DataError(f"{path}: not a COCO instances file (needs lists of images, "
                        "annotations, categories)")
    images, anns, cats = (_by_id(dataset[k]) for k in keys)
    return Instances(images=images, anns=anns, cats=cats)


def _by_id(entries: list) -> dict[int, dict]:
    return {e["id"]: e for e in entries if isinstance(e, dict) and _is_int(e.get("id"))}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_refer(source: ReferSource, skips: SkipLog) -> list[RefRecord]:
    """All usable refs of one partition, in the pickle's order; bad ones go to ``skips``, and
    sentences longer than CLIP's context are noted there (:func:`note_truncated_sentences`)."""
    refs = load_refs_pickle(source.refs_path)
    instances = load_instances(source.instances_path)
    records = list(_records(refs, instances, source, skips))
    note_truncated_sentences(records, source.refs_path, skips)
    return records


def note_truncated_sentences(records: Iterable[RefRecord], file: str | Path,
                             skips: SkipLog) -> None:
    """Note (as ``truncated_sentence``; the sentence is kept) each sentence with more tokens
    than :data:`~gtms.data.tokenizer.CONTEXT_LENGTH`: every ``data.word_len`` cuts it. Shorter
    word lengths cut more, as CRIS does; those are not counted. RefCOCOg's 95k sentences
    tokenise in about 3 s."""
    tokenizer = ClipTokenizer()
    for record in records:
        for text in record.sentences:
            count = len(tokenizer.bpe_ids(text)) + 2
            if count > CONTEXT_LENGTH:
                skips.note(R.TRUNCATED_SENTENCE, file=file, ref_id=record.ref_id,
                           detail=f"a sentence of {count:,} tokens (SOT and EOT included) is cut "
                                  f"to at most {CONTEXT_LENGTH}: {shortened(text)!r}")


def _records(refs: Iterable, instances: Instances, source: ReferSource, skips: SkipLog):
    seen: set[int] = set()
    for index, ref in enumerate(refs):
        record = _record(index, ref, instances, source, skips)
        if record is None:
            continue
        if record.ref_id in seen:
            skips.skip(R.MALFORMED_REF, file=source.refs_path, ref_id=record.ref_id,
                       detail="duplicate ref_id")
            continue
        seen.add(record.ref_id)
        yield record


def _ref_problem(ref) -> str | None:
    """Why a pickle entry is not a well-formed ref, or None."""
    if not isinstance(ref, dict):
        return f"is a {type(ref).__name__}, not a dict"
    missing = [k for k in REQUIRED_REF_KEYS if k not in ref]
    if missing:
        return f"lacks {missing}"
    for key in ("ref_id", "ann_id", "image_id"):
        if not _is_int(ref[key]):
            return f"{key} {ref[key]!r} is not an integer"
    if "category_id" in ref and not _is_int(ref["category_id"]):
        return f"category_id {ref['category_id']!r} is not an integer"
    if not isinstance(ref["split"], str) or not ref["split"]:
        return f"split {ref['split']!r} is not a split name"
    if not isinstance(ref["sentences"], (list, tuple)):
        return f"sentences is a {type(ref['sentences']).__name__}, not a list"
    return None


def _ann_problem(ann: dict) -> str | None:
    """Why an annotation cannot give a box and a mask, or None."""
    if not _is_int(ann.get("image_id")):
        return f"ann {ann['id']} image_id {ann.get('image_id')!r} is not an integer"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        return f"ann {ann['id']} bbox {bbox!r} is not 4 numbers (x, y, w, h)"
    if "category_id" in ann and not _is_int(ann["category_id"]):
        return f"ann {ann['id']} category_id {ann['category_id']!r} is not an integer"
    return None


def _image_problem(image: dict) -> str | None:
    """Why an image entry lacks a usable size or file name, or None."""
    for key in ("height", "width"):
        if not _is_int(image.get(key)) or image[key] <= 0:
            return f"image {image['id']} {key} {image.get(key)!r} is not a positive integer"
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        return f"image {image['id']} file_name {image.get('file_name')!r} is not a file name"
    return None


class _Problem(NamedTuple):
    """Why a ref is skipped: the counting reason, a detail, and whether the fault lies in
    instances.json (else in the refs pickle)."""

    reason: str
    detail: str
    in_instances: bool = False


def _record(index: int, ref, instances: Instances, source: ReferSource, skips: SkipLog):
    """One pickle entry -> a :class:`RefRecord`, or None after telling ``skips`` why not."""

    def skip(problem: _Problem, ref_id) -> None:
        file = source.instances_path if problem.in_instances else source.refs_path
        skips.skip(problem.reason, file=file, ref_id=ref_id, detail=problem.detail)

    if (problem := _ref_problem(ref)) is not None:
        ref_id = ref.get("ref_id") if isinstance(ref, dict) else None
        return skip(_Problem(R.MALFORMED_REF, f"entry {index} {problem}"),
                    ref_id if _is_int(ref_id) else None)
    found = _lookup(ref, instances)
    if isinstance(found, _Problem):
        return skip(found, ref["ref_id"])
    ann, image, category_id, category_name = found
    sentences, malformed = _sentences(ref["sentences"])
    if not sentences:
        return skip(_Problem(R.NO_SENTENCES, f"the ref has no sentence with text ({malformed} "
                             f"malformed)"), ref["ref_id"])
    shape = _box_and_mask(ann, image)
    if isinstance(shape, _Problem):
        return skip(shape, ref["ref_id"])
    for _ in range(malformed):
        skip(_Problem(R.MALFORMED_SENTENCE, "a sentence without text was dropped; the ref keeps "
                      "the others"), ref["ref_id"])
    return RefRecord(
        ref_id=ref["ref_id"], ann_id=ann["id"], image_id=image["id"],
        file_name=image["file_name"], height=image["height"], width=image["width"],
        box_xywh=shape[0], category_id=category_id, category=category_name,
        split=ref["split"], sentences=sentences, mask_rle_counts=shape[1],
    )


def _lookup(ref: dict, instances: Instances) -> tuple[dict, dict, int, str] | _Problem:
    """The annotation, image, category id and name a well-formed ref names."""
    ann = instances.anns.get(ref["ann_id"])
    if ann is None:
        return _Problem(R.MISSING_ANNOTATION, f"ann_id {ref['ann_id']} is not in "
                        "instances.json", True)
    image = instances.images.get(ref["image_id"])
    if image is None:
        return _Problem(R.MISSING_IMAGE_INFO, f"image_id {ref['image_id']} is not in "
                        "instances.json", True)
    if (problem := _ann_problem(ann)) is not None:
        return _Problem(R.MALFORMED_ANNOTATION, problem, True)
    if (problem := _image_problem(image)) is not None:
        return _Problem(R.MALFORMED_IMAGE_INFO, problem, True)
    if (problem := image_path_problem(image["file_name"])) is not None:
        return _Problem(R.PATH_OUTSIDE_IMAGES, f"image {image['id']} file_name "
                        f"{image['file_name']!r} {problem}", True)
    if ann["image_id"] != ref["image_id"]:
        return _Problem(R.MALFORMED_REF, f"ann {ref['ann_id']} belongs to image "
                        f"{ann['image_id']}, the ref says image {ref['image_id']}")
    category_id = ref.get("category_id", ann.get("category_id", -1))
    category = instances.cats.get(category_id)
    if category is None:
        return _Problem(R.UNKNOWN_CATEGORY, f"category_id {category_id} is not in "
                        "instances.json")
    return ann, image, category_id, str(category.get("name", ""))


def _box_and_mask(ann: dict, image: dict) -> tuple[tuple[float, ...], str] | _Problem:
    """The annotation's ``box_xywh`` and mask RLE counts on its ``(height, width)`` image."""
    height, width = image["height"], image["width"]
    box = tuple(float(v) for v in ann["bbox"])
    if not box[2] > 0 or not box[3] > 0:
        return _Problem(R.BOX_ZERO_AREA, f"box_xywh {box} has zero or negative width/height")
    try:
        validate_box(box, height, width)
    except BoxOutsideImageError as err:
        return _Problem(R.BOX_OUTSIDE_IMAGE, str(err))
    counts = _mask_counts(ann, height, width)
    if counts is None:
        return _Problem(R.BAD_SEGMENTATION, f"ann {ann['id']} segmentation does not rasterise "
                        f"to a non-empty {height}x{width} mask", True)
    return box, counts


def _sentences(items) -> tuple[tuple[str, ...], int]:
    """The ``sent`` texts of a ref (stripped) and how many were malformed (not a dict with a text
    ``sent``). Empty texts are kept: CRIS scores them in evaluation (``[SOT, EOT]``) and training
    skips and counts them (``empty_sentence``, see :mod:`gtms.data.pipeline`)."""
    texts, malformed = [], 0
    for sentence in items:
        text = sentence.get("sent") if isinstance(sentence, dict) else None
        if isinstance(text, str):
            texts.append(text.strip())
        else:
            malformed += 1
    return tuple(texts), malformed


def _mask_counts(ann: dict, height: int, width: int) -> str | None:
    """The annotation's mask as compressed COCO RLE counts, or None if it is unusable.

    COCO segmentations are polygons (a list of ``[x0, y0, x1, y1, ...]``, merged into one
    mask), uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string).
    """
    segm = ann.get("segmentation")
    try:
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(segm, dict):
            rle = {"size": segm.get("size"), "counts": segm.get("counts")}
        else:
            return None
        counts = rle["counts"]
        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        if not isinstance(counts, bytes) or list(rle["size"]) != [height, width]:
            return None
        if float(mask_utils.area({"size": [height, width], "counts": counts})) <= 0:
            return None
    except Exception:  # pycocotools raises assorted types on a malformed segmentation
        return None
    return counts.decode("ascii")
