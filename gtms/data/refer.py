"""Reader for the ``refer`` toolkit layout: ``<root>/<dataset>/refs(<split_by>).p`` + instances.

RefCOCO, RefCOCO+, RefCOCOg and SynthRef all come in this layout::

    <refer_root>/<dataset>/refs(<split_by>).p   pickle: list of ref dicts (ref_id, ann_id,
                                                image_id, split, category_id, sentences[{sent}])
    <refer_root>/<dataset>/instances.json       COCO: images, annotations (bbox, segmentation),
                                                categories
    <images_dir>/<file_name>                    the image named by instances.json

The pickle is read with :class:`RestrictedUnpickler`, which admits only builtin containers and
scalars: a pickle that names any class (the only way a pickle can run code) is refused with
:class:`~gtms.data.records.UnsafePickleError` before anything is called. Bad refs go through a
:class:`~gtms.data.records.SkipLog` (skip and count, or raise under ``strict``). Image files are
checked later, when the shard writer reads their bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gtms.data import records as R
from gtms.data.records import DataError, RefRecord, SkipLog, UnsafePickleError
from gtms.data.transforms import BoxOutsideImageError, validate_box

# Partitions the refer toolkit ships per dataset; the first one is the default.
SPLITS_BY = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "synthref": ("unc",),
}
REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


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
        return Path(self.images_dir) / file_name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every class lookup.

    Pickled dicts, lists, tuples, str, bytes, int, float, bool and None are built by opcodes of
    their own; everything else (objects, functions such as ``os.system``, even ``set`` under old
    protocols) needs ``find_class``, which raises here, so no pickled callable is ever reached.
    """

    def __init__(self, file, path: str | Path):
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(self._path, module, name)

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refused to unpickle: it uses a persistent id ({pid!r})")


def load_refs_pickle(path: str | Path) -> list[dict]:
    """A refs pickle -> its list of ref dicts, read with :class:`RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: refs pickle not found")
    with open(path, "rb") as f:
        try:
            refs = RestrictedUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as err:  # a damaged pickle raises many types; all mean "unreadable"
            raise DataError(
                f"{path}: not a readable refs pickle: {type(err).__name__}: {err}") from err
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    return refs


def load_instances(path: str | Path) -> COCO:
    """``instances.json`` -> an indexed pycocotools ``COCO`` (its console chatter silenced)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: instances file not found")
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable as JSON: {err}") from err
    if not isinstance(dataset, dict) or not {"images", "annotations", "categories"} <= set(dataset):
        raise DataError(f"{path}: not a COCO instances file (needs images, annotations,"
                        " categories)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_refer(source: ReferSource, skips: SkipLog) -> list[RefRecord]:
    """All usable refs of one partition, in the pickle's order; bad ones go to ``skips``."""
    refs = load_refs_pickle(source.refs_path)
    coco = load_instances(source.instances_path)
    return list(_records(refs, coco, source, skips))


def _records(refs: Iterable, coco: COCO, source: ReferSource, skips: SkipLog):
    seen: set[int] = set()
    for index, ref in enumerate(refs):
        record = _record(index, ref, coco, source, skips)
        if record is None:
            continue
        if record.ref_id in seen:
            skips.skip(R.MALFORMED_REF, file=source.refs_path, ref_id=record.ref_id,
                       detail="duplicate ref_id")
            continue
        seen.add(record.ref_id)
        yield record


def _record(index: int, ref, coco: COCO, source: ReferSource, skips: SkipLog):
    refs_file = source.refs_path
    if not isinstance(ref, dict) or any(k not in ref for k in REQUIRED_REF_KEYS):
        ref_id = ref.get("ref_id") if isinstance(ref, dict) else None
        skips.skip(R.MALFORMED_REF, file=refs_file, ref_id=ref_id,
                   detail=f"entry {index} lacks some of {REQUIRED_REF_KEYS}")
        return None
    ref_id = int(ref["ref_id"])

    def bad(reason: str, detail: str, file: Path = refs_file) -> None:
        skips.skip(reason, file=file, ref_id=ref_id, detail=detail)

    ann = coco.anns.get(ref["ann_id"])
    if ann is None:
        return bad(R.MISSING_ANNOTATION, f"ann_id {ref['ann_id']} is not in instances.json",
                   source.instances_path)
    image = coco.imgs.get(ref["image_id"])
    if image is None:
        return bad(R.MISSING_IMAGE_INFO, f"image_id {ref['image_id']} is not in instances.json",
                   source.instances_path)
    if ann.get("image_id") != ref["image_id"]:
        return bad(R.MALFORMED_REF, f"ann {ref['ann_id']} belongs to image {ann.get('image_id')}"
                   f", the ref says image {ref['image_id']}")
    category_id = int(ref.get("category_id", ann.get("category_id", -1)))
    category = coco.cats.get(category_id)
    if category is None:
        return bad(R.UNKNOWN_CATEGORY, f"category_id {category_id} is not in instances.json")
    sentences, empty = _sentences(ref)
    if not sentences:
        return bad(R.NO_SENTENCES, f"the ref has no non-empty sentence ({empty} empty)")
    for _ in range(empty):
        bad(R.EMPTY_SENTENCE, "an empty sentence was dropped; the ref keeps the others")
    height, width = int(image["height"]), int(image["width"])
    box = tuple(float(v) for v in ann.get("bbox", ()))
    if len(box) != 4:
        return bad(R.MALFORMED_REF, f"ann {ann['id']} bbox {ann.get('bbox')} is not xywh")
    if not box[2] > 0 or not box[3] > 0:
        return bad(R.BOX_ZERO_AREA, f"box_xywh {box} has zero or negative width/height")
    try:
        validate_box(box, height, width)
    except BoxOutsideImageError as err:
        return bad(R.BOX_OUTSIDE_IMAGE, str(err))
    counts = _mask_counts(ann, coco)
    if counts is None:
        return bad(R.BAD_SEGMENTATION, f"ann {ann['id']} segmentation does not rasterise to a"
                   " non-empty mask", source.instances_path)
    return RefRecord(
        ref_id=ref_id, ann_id=int(ann["id"]), image_id=int(image["id"]),
        file_name=str(image["file_name"]), height=height, width=width,
        box_xywh=box, category_id=category_id, category=str(category["name"]),
        split=str(ref["split"]), sentences=sentences, mask_rle_counts=counts,
    )


def _sentences(ref: dict) -> tuple[tuple[str, ...], int]:
    """The non-empty ``sent`` texts of a ref and how many sentences were empty."""
    texts = []
    for sentence in ref["sentences"] or ():
        text = sentence.get("sent", "") if isinstance(sentence, dict) else ""
        text = text.strip() if isinstance(text, str) else ""
        if text:
            texts.append(text)
    return tuple(texts), len(ref["sentences"] or ()) - len(texts)


def _mask_counts(ann: dict, coco: COCO) -> str | None:
    """The annotation's mask as compressed COCO RLE counts, or None if it is unusable."""
    try:
        rle = coco.annToRLE(ann)
    except Exception:  # pycocotools raises assorted types on a malformed segmentation
        return None
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        return None
    if float(mask_utils.area({"size": rle["size"], "counts": counts})) <= 0:
        return None
    return counts.decode("ascii")
