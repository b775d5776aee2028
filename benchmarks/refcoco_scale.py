"""A full-size stand-in for RefCOCO (unc) or RefCOCOg (umd) in the refer toolkit's layout.

    python -m benchmarks.refcoco_scale --out /data/refcoco_scale                 # 19,994 images
    python -m benchmarks.refcoco_scale --out /data/refcocog_scale --dataset refcocog --workers 2
    python -m benchmarks.refcoco_scale --out /tmp/rc --scale 0.01                # 1 % of it

writes::

    <out>/refer/<dataset>/refs(unc).p      (refs(umd).p for refcocog) Python 2 pickle, protocol 2
    <out>/refer/<dataset>/instances.json   COCO: images, annotations, categories
    <out>/images/COCO_train2014_<id>.jpg   640 x 480 photo-like JPEGs, ~160 KB each
    <out>/refcoco_scale.json               the settings and the counts per split

with the published counts per split (images, refs, expressions; :data:`PUBLISHED`), so that
``python run.py prepare --dataset refcoco --refer-root <out>/refer --images <out>/images`` sees
a dataset of the real one's size. Splits partition the images (as unc and umd do); testA refers
to people only, testB to other objects only. Every image carries ~7 annotations (COCO's
instances file carries all of an image's objects, referred or not), each a polygon drawn into the
image. A ref has ``floor(E/R)`` or one more sentences: 2-3 for RefCOCO, 1-2 for RefCOCOg (whose
published 95,010 expressions for 49,822 refs leave no room for 2-3).

The same ``--seed`` and ``--scale`` give the same bytes (same numpy/OpenCV builds). A rerun
keeps the images already written (each is written to a temporary name and renamed, so a file
under its final name is complete); the pickle and the JSON are written last, atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

HEIGHT, WIDTH = 480, 640
JPEG_QUALITY = 95
# Per image, drawn uniformly: the amplitude of the 8 px texture and of the sensor noise (uniform
# in [-a, a]), in grey levels. They set the JPEG size: 110-200 KB, ~160 KB on average.
GRAIN = (12.0, 36.0)
NOISE = (6, 18)
ANNS_PER_IMAGE = 7.3  # COCO 2017 train: 860,001 annotations over 118,287 images
# Image and annotation ids are drawn sparse from about COCO's ranges, as the real ones are.
COCO_MAX_IMAGE_ID = 581_929
COCO_MAX_ANN_ID = 2_232_119
VERSION = 1
STAMP = "refcoco_scale.json"


class Split(NamedTuple):
    images: int
    refs: int
    sentences: int


# Published counts. RefCOCO unc (Yu et al. 2016, the refer toolkit's refs(unc).p): 19,994
# images, 50,000 refs, 142,210 expressions. RefCOCOg umd (Nagaraja et al. 2016, refs(umd).p):
# 25,799 images, 49,822 refs, 95,010 expressions. Both partition images between splits.
PUBLISHED: dict[str, tuple[str, dict[str, Split]]] = {
    "refcoco": ("unc", {"train": Split(16_994, 42_404, 120_624),
                        "val": Split(1_500, 3_811, 10_834),
                        "testA": Split(750, 1_975, 5_657),
                        "testB": Split(750, 1_810, 5_095)}),
    "refcocog": ("umd", {"train": Split(21_899, 42_226, 80_512),
                         "val": Split(1_300, 2_573, 4_896),
                         "test": Split(2_600, 5_023, 9_602)}),
}

# COCO's 80 categories: id and name; the supercategory follows from the id (_SUPER).
CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch",
    64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
_SUPER = ((1, "person"), (9, "vehicle"), (15, "outdoor"), (25, "animal"), (33, "accessory"),
          (43, "sports"), (51, "kitchen"), (61, "food"), (70, "furniture"), (77, "electronic"),
          (82, "appliance"), (90, "indoor"))
OTHER_CATEGORIES = tuple(c for c in CATEGORY_NAMES if c != 1)
PALETTE = {"red": (200, 40, 40), "green": (50, 150, 60), "blue": (40, 70, 190),
           "yellow": (230, 210, 50), "white": (235, 235, 235), "black": (25, 25, 25),
           "gray": (128, 128, 128), "brown": (120, 80, 40), "orange": (240, 140, 30),
           "pink": (240, 150, 190), "purple": (120, 50, 150)}
TEMPLATES = {
    "refcoco": ("{side} {name}", "{colour} {name}", "{name} on {side}", "{side} {colour} {name}",
                "{size} {name}", "{colour} {name} {side}", "the {size} {colour} one"),
    "refcocog": ("a {colour} {name} on the {side} side of the picture",
                 "the {size} {name} that is {colour}", "the {name} in {colour} at the {side}",
                 "a {size} {colour} {name} toward the {side}",
                 "the {colour} {name} which is the {size} one here"),
}
ACCENTED = " by the café"   # one ref in ~500 has it: the loader decodes UTF-8 Python 2 str


# ----------------------------------------------------------------------------- counts


def split_counts(dataset: str, scale: float = 1.0) -> dict[str, Split]:
    """The counts per split of ``dataset`` times ``scale`` (0 < scale <= 1), each rounded half
    up, at least 1 image per split, refs >= images and refs <= sentences <= 3 refs."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale {scale} is not in (0, 1]")
    counts = {}
    for split, full in PUBLISHED[dataset][1].items():
        images, refs, sentences = (max(1, math.floor(n * scale + 0.5)) for n in full)
        refs = max(refs, images)
        counts[split] = Split(images, refs, min(max(sentences, refs), 3 * refs))
    return counts


def totals(counts: dict[str, Split]) -> Split:
    return Split(*(sum(c[k] for c in counts.values()) for k in range(3)))


# ----------------------------------------------------------------------------- plan


class Obj(NamedTuple):
    """One annotation: a polygon ``[x0, y0, x1, y1, ...]`` (pixels, float64, 2 decimals)
    filled with ``rgb``."""

    category_id: int
    polygon: np.ndarray
    rgb: tuple[int, int, int]
    colour: str
    referred: bool


class ImagePlan(NamedTuple):
    index: int
    image_id: int
    split: str
    objects: tuple[Obj, ...]

    @property
    def file_name(self) -> str:
        return f"COCO_train2014_{self.image_id:012d}.jpg"


def plan_images(counts: dict[str, Split], seed: int) -> list[ImagePlan]:
    """Every image: its id, split and objects (referred ones last, drawn on top)."""
    rng = np.random.default_rng([seed, 0])
    n = totals(counts).images
    ids = np.sort(rng.choice(COCO_MAX_IMAGE_ID, n, replace=False) + 1)
    splits = np.repeat(list(counts), [c.images for c in counts.values()])
    rng.shuffle(splits)
    refs_on = np.ones(n, dtype=np.int64)
    for split, c in counts.items():
        where = np.flatnonzero(splits == split)
        np.add.at(refs_on, rng.choice(where, c.refs - c.images), 1)
    spare = max(0, round(ANNS_PER_IMAGE - totals(counts).refs / n))
    return [_plan_image(i, int(ids[i]), str(splits[i]), int(refs_on[i]), spare, seed)
            for i in range(n)]


def _plan_image(index: int, image_id: int, split: str, referred: int, spare: int,
                seed: int) -> ImagePlan:
    """``referred`` objects of one category (people in testA, never in testB) and 0 to
    ``2 spare`` others of any category."""
    rng = np.random.default_rng([seed, 1, index])
    others = int(rng.integers(0, 2 * spare + 1))
    if split == "testA" or (split != "testB" and rng.random() < 0.5):
        target = 1
    else:
        target = int(rng.choice(OTHER_CATEGORIES))
    objects = [_object(rng, int(rng.choice(list(CATEGORY_NAMES))), (12, 110), False)
               for _ in range(others)]
    objects += [_object(rng, target, (40, 150), True) for _ in range(referred)]
    return ImagePlan(index, image_id, split, tuple(objects))


def _object(rng: np.random.Generator, category_id: int, radius: tuple[int, int],
            referred: bool) -> Obj:
    """A star-shaped polygon of 12-40 vertices around a centre inside the image."""
    vertices = int(rng.integers(12, 41))
    cx, cy = rng.uniform(0.08, 0.92) * WIDTH, rng.uniform(0.08, 0.92) * HEIGHT
    r = rng.uniform(*radius)
    aspect = rng.uniform(0.5, 2.0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    reach = r * rng.uniform(0.7, 1.0, vertices)
    xs = np.clip(cx + reach * np.cos(angles) * np.sqrt(aspect), 0, WIDTH).round(2)
    ys = np.clip(cy + reach * np.sin(angles) / np.sqrt(aspect), 0, HEIGHT).round(2)
    colour = str(rng.choice(list(PALETTE)))
    rgb = np.clip(np.array(PALETTE[colour]) + rng.integers(-20, 21, 3), 0, 255)
    polygon = np.stack([xs, ys], 1).ravel()
    return Obj(category_id, polygon, tuple(int(v) for v in rgb), colour, referred)


def ann_ids(images: Sequence[ImagePlan], seed: int) -> list[list[int]]:
    """COCO-like annotation ids (sparse, increasing) for each image's objects."""
    rng = np.random.default_rng([seed, 2])
    total = sum(len(p.objects) for p in images)
    ids = iter(np.sort(rng.choice(COCO_MAX_ANN_ID, total, replace=False) + 1).tolist())
    return [[next(ids) for _ in p.objects] for p in images]


def box_and_area(polygon: np.ndarray) -> tuple[list[float], float]:
    """``box_xywh`` and shoelace area of a polygon, rounded to 2 decimals."""
    xs, ys = polygon[0::2], polygon[1::2]
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
    x0, y0 = float(xs.min()), float(ys.min())
    box = [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)]
    return box, round(area, 2)


# ----------------------------------------------------------------------------- metadata


def instances_chunks(images: Sequence[ImagePlan],
                    ids: Sequence[Sequence[int]]) -> Iterator[str]:
    """instances.json in pieces (the bytes of ``json.dumps(doc, separators=(",", ":"))``):
    every image, every object as a polygon annotation, COCO's categories. Annotations are
    serialised one at a time, so the file never stands whole in memory."""
    compact = {"separators": (",", ":")}
    info = {"description": "benchmarks.refcoco_scale: a synthetic stand-in", "version": "1"}
    image_entries = [{"file_name": p.file_name, "height": HEIGHT, "width": WIDTH,
                      "id": p.image_id} for p in sorted(images, key=lambda p: p.image_id)]
    yield (f'{{"info":{json.dumps(info, **compact)},"images":'
           f'{json.dumps(image_entries, **compact)},"licenses":[],"annotations":[')
    first = True
    for plan, plan_ids in zip(images, ids):
        for obj, ann_id in zip(plan.objects, plan_ids):
            box, area = box_and_area(obj.polygon)
            ann = {"segmentation": [obj.polygon.tolist()], "area": area, "iscrowd": 0,
                   "image_id": plan.image_id, "bbox": box, "category_id": obj.category_id,
                   "id": ann_id}
            yield ("" if first else ",") + json.dumps(ann, **compact)
            first = False
    categories = [{"supercategory": _supercategory(c), "id": c, "name": name}
                  for c, name in CATEGORY_NAMES.items()]
    yield f'],"categories":{json.dumps(categories, **compact)}}}'


def _supercategory(category_id: int) -> str:
    return next(name for last, name in _SUPER if category_id <= last)


def refs_list(dataset: str, counts: dict[str, Split], images: Sequence[ImagePlan],
              ids: Sequence[Sequence[int]], seed: int) -> list[dict]:
    """The refs, in image order: one per referred object, with its split's share of sentences."""
    rng = np.random.default_rng([seed, 3])
    per_split = {split: _sentence_counts(rng, c) for split, c in counts.items()}
    refs: list[dict] = []
    sent_id = 0
    for plan, plan_ids in zip(images, ids):
        for obj, ann_id in zip(plan.objects, plan_ids):
            if not obj.referred:
                continue
            n = next(per_split[plan.split])
            texts = _sentences(rng, dataset, obj, n)
            refs.append(_ref(len(refs), ann_id, plan, obj, texts, sent_id))
            sent_id += n
    return refs


def _sentence_counts(rng: np.random.Generator, c: Split) -> Iterator[int]:
    base = c.sentences // c.refs
    more = np.zeros(c.refs, dtype=np.int64)
    more[rng.choice(c.refs, c.sentences - base * c.refs, replace=False)] = 1
    return iter((base + more).tolist())


def _sentences(rng: np.random.Generator, dataset: str, obj: Obj, n: int) -> list[str]:
    box, area = box_and_area(obj.polygon)
    centre = (box[0] + box[2] / 2) / WIDTH
    words = {"name": CATEGORY_NAMES[obj.category_id], "colour": obj.colour,
             "side": "left" if centre < 1 / 3 else "right" if centre > 2 / 3 else "middle",
             "size": "big" if area > 0.04 * WIDTH * HEIGHT else "small"}
    templates = TEMPLATES[dataset]
    texts = [templates[k].format(**words)
             for k in rng.choice(len(templates), n, replace=False)]
    if rng.random() < 0.002:
        texts[0] += ACCENTED
    return texts


def _ref(ref_id: int, ann_id: int, plan: ImagePlan, obj: Obj, texts: list[str],
         first_sent_id: int) -> dict:
    sentences = []
    for k, text in enumerate(texts):
        raw = text.upper() if (ref_id + k) % 5 == 0 else text[0].upper() + text[1:]
        sentences.append({"tokens": text.split(), "raw": raw, "sent_id": first_sent_id + k,
                          "sent": text})
    return {"image_id": plan.image_id, "split": plan.split, "sentences": sentences,
            "file_name": f"{plan.file_name[:-4]}_{ann_id}.jpg", "category_id": obj.category_id,
            "ann_id": ann_id, "sent_ids": [s["sent_id"] for s in sentences], "ref_id": ref_id}


# ----------------------------------------------------------------------------- Python 2 pickle


def py2_pickle(value) -> bytes:
    """``value`` pickled as Python 2's cPickle does at protocol 2, every ``str`` written as a
    Python 2 ``str`` (UTF-8 bytes: SHORT_BINSTRING / BINSTRING) as in the refer toolkit's files.

    Containers and strings are memoised (BINPUT) and a repeated string is fetched (BINGET);
    lists and dicts are filled in batches of 1000 (APPENDS / SETITEMS). Holds dict, list,
    str, int, bool and None."""
    out = bytearray(b"\x80\x02")
    memo: dict[bytes, int] = {}
    count = [0]

    def put() -> int:
        index = count[0]
        count[0] += 1
        out.extend(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))
        return index

    def save(v) -> None:
        if v is None or isinstance(v, bool):
            out.extend({None: b"N", True: b"\x88", False: b"\x89"}[v])
        elif isinstance(v, int):
            out.extend(_py2_int(v))
        elif isinstance(v, str):
            data = v.encode("utf-8")
            if data in memo:
                i = memo[data]
                out.extend(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))
                return
            out.extend(b"U" + bytes([len(data)]) + data if len(data) < 256 else
                       b"T" + struct.pack("<i", len(data)) + data)
            memo[data] = put()
        elif isinstance(v, list):
            out.extend(b"]")
            put()
            _batched(out, v, save, b"a", b"e")
        elif isinstance(v, dict):
            out.extend(b"}")
            put()
            _batched(out, list(v.items()), lambda kv: (save(kv[0]), save(kv[1])), b"s", b"u")
        else:
            raise TypeError(f"py2_pickle: {type(v).__name__} is not supported")

    save(value)
    out.extend(b".")
    return bytes(out)


def _py2_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raise ValueError(f"py2_pickle: int {v} is outside 32 bits")


def _batched(out: bytearray, items: list, save, one: bytes, many: bytes) -> None:
    for start in range(0, len(items), 1000):
        batch = items[start:start + 1000]
        if len(batch) == 1:
            save(batch[0])
            out.extend(one)
            continue
        out.extend(b"(")
        for item in batch:
            save(item)
        out.extend(many)


# ----------------------------------------------------------------------------- images


def render_image(plan: ImagePlan, seed: int) -> bytes:
    """The JPEG of one image: a smooth colour field, the objects' polygons in their colours,
    8 px texture and sensor noise over everything (so a flat object is not flat)."""
    rng = np.random.default_rng([seed, 4, plan.index])
    coarse = cv2.resize(rng.random((4, 5, 3), dtype=np.float32), (80, 60),
                        interpolation=cv2.INTER_CUBIC)
    image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR) * 180 + 40
    for obj in plan.objects:
        points = np.round(obj.polygon.reshape(-1, 2) * 16).astype(np.int32)
        cv2.fillPoly(image, [points], obj.rgb[::-1], lineType=cv2.LINE_8, shift=4)
    texture = rng.standard_normal((HEIGHT // 8, WIDTH // 8, 3), dtype=np.float32)
    grain, noise = rng.uniform(*GRAIN), int(rng.integers(NOISE[0], NOISE[1] + 1))
    image += cv2.resize(texture, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR) * grain
    image += rng.integers(-noise, noise + 1, (HEIGHT, WIDTH, 3), dtype=np.int16)
    bgr = np.clip(image, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return jpeg.tobytes()


def _write_image(task: tuple[ImagePlan, int, str]) -> int:
    """Render one image and write it under its final name through a temporary one."""
    plan, seed, folder = task
    final = Path(folder) / plan.file_name
    tmp = final.with_name(f".{plan.file_name}.{os.getpid()}.tmp")
    data = render_image(plan, seed)
    tmp.write_bytes(data)
    os.replace(tmp, final)
    return len(data)


def _init_worker() -> None:
    cv2.setNumThreads(1)


def write_images(todo: Sequence[ImagePlan], folder: Path, seed: int, workers: int,
                 progress: bool = True) -> int:
    """Write the images of ``todo`` (``workers`` processes), printing images/s; bytes written."""
    tasks = [(plan, seed, str(folder)) for plan in todo]
    _init_worker()
    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
            return _count(pool.imap_unordered(_write_image, tasks, chunksize=4), len(tasks),
                          progress)
    return _count(map(_write_image, tasks), len(tasks), progress)


def _count(sizes: Iterable[int], total: int, progress: bool) -> int:
    start = last = time.monotonic()
    written = done = 0
    for size in sizes:
        written, done = written + size, done + 1
        now = time.monotonic()
        if progress and (now - last >= 5 or done == total):
            rate = done / max(now - start, 1e-9)
            print(f"  images {done:,}/{total:,} ({100 * done / total:.0f} %), {rate:.1f} "
                  f"images/s, {written / done / 1e3:.0f} KB each, ~{(total - done) / rate:.0f} s "
                  "left", flush=True)
            last = now
    return written


# ----------------------------------------------------------------------------- files


def atomic_write(path: Path, data: bytes | Iterable[str]) -> None:
    """Write ``data`` (bytes, or text in pieces) to a temporary name, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(data)
    os.replace(tmp, path)


def check_stamp(out: Path, settings: dict) -> None:
    """Refuse to resume into a folder generated with other settings (its images would be
    another dataset's); write the stamp otherwise."""
    stamp = out / STAMP
    if stamp.is_file():
        before = json.loads(stamp.read_text(encoding="utf-8")).get("settings")
        if before != settings:
            raise ValueError(f"{out} holds a stand-in made with {before}; these settings are "
                             f"{settings}: use another --out")
    counts = split_counts(settings["dataset"], settings["scale"])
    doc = {"settings": settings, "split_by": PUBLISHED[settings["dataset"]][0],
           "counts": {split: c._asdict() for split, c in counts.items()}}
    atomic_write(stamp, (json.dumps(doc, indent=1) + "\n").encode())


def clear_tmp(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink()


def disk_use(folder: Path) -> tuple[int, int]:
    """Bytes of the files under ``folder`` and the bytes they occupy on disk (blocks)."""
    size = blocks = 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            size, blocks = size + st.st_size, blocks + st.st_blocks * 512
    return size, blocks


# ----------------------------------------------------------------------------- main


def generate(out: Path, dataset: str = "refcoco", *, seed: int = 0, scale: float = 1.0,
             workers: int = 1, progress: bool = True) -> dict[str, Split]:
    """Write the stand-in under ``out`` (see the module doc); returns the counts per split."""
    out.mkdir(parents=True, exist_ok=True)
    check_stamp(out, {"dataset": dataset, "seed": seed, "scale": scale, "version": VERSION})
    counts = split_counts(dataset, scale)
    images = plan_images(counts, seed)
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    clear_tmp(folder)
    todo = [p for p in images if not (folder / p.file_name).is_file()]
    if progress:
        print(f"{dataset}: {len(images):,} images ({len(images) - len(todo):,} already "
              f"written), {totals(counts).refs:,} refs, {totals(counts).sentences:,} "
              f"sentences; {workers} worker(s)", flush=True)
    write_images(todo, folder, seed, workers, progress)
    ids = ann_ids(images, seed)
    refer = out / "refer" / dataset
    clear_tmp(refer)
    refs = refs_list(dataset, counts, images, ids, seed)
    atomic_write(refer / "instances.json", instances_chunks(images, ids))
    atomic_write(refer / f"refs({PUBLISHED[dataset][0]}).p", py2_pickle(refs))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--dataset", choices=sorted(PUBLISHED), default="refcoco")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink every count by this factor, 0 < F <= 1 (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="image-writing processes")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1 or args.workers < 1:
        parser.error("--scale must be in (0, 1] and --workers at least 1")
    start = time.monotonic()
    try:
        counts = generate(args.out, args.dataset, seed=args.seed, scale=args.scale,
                          workers=args.workers)
    except ValueError as err:
        print(f"refcoco_scale: error: {err}", file=sys.stderr)
        return 2
    _report(args.out, args.dataset, counts, time.monotonic() - start)
    return 0


def _report(out: Path, dataset: str, counts: dict[str, Split], seconds: float) -> None:
    for split, c in counts.items():
        print(f"  {split}: {c.images:,} images, {c.refs:,} refs, {c.sentences:,} sentences")
    n = totals(counts).images
    images_bytes, _ = disk_use(out / "images")
    size, blocks = disk_use(out)
    refer = out / "refer" / dataset
    meta = {p.name: p.stat().st_size for p in sorted(refer.iterdir()) if p.is_file()}
    print(f"done in {seconds:.1f} s; disk: {_human(size)} ({_human(blocks)} in blocks), "
          f"{size / n / 1e3:.0f} KB per image all included; JPEGs "
          f"{images_bytes / n / 1e3:.0f} KB each; "
          + ", ".join(f"{k} {_human(v)}" for k, v in meta.items()))
    print(f"next: python run.py prepare --dataset {dataset} --refer-root {out / 'refer'} "
          f"--images {out / 'images'} --out {out / 'prepared'}")


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size:.0f} B"
        size /= 1000
    raise AssertionError


if __name__ == "__main__":
    sys.exit(main())
