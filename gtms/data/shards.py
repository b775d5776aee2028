"""Parquet shards: one row per ref, the original image bytes embedded, written resumably.

Layout under ``<out>/shards/`` (``<out>`` is ``data/synthref`` for SynthRef)::

    manifest.json                     what was written (keys below)
    <split>/part-00000.parquet        splits: train, val, testA, testB (unc); train, val, test
    <split>/part-00001.parquet        (umd); train, val (google)

Columns (:data:`SHARD_SCHEMA`; Ray Data reads them with ``ray.data.read_parquet``):

=================  ==========================  ===============================================
column             Arrow type                  meaning
=================  ==========================  ===============================================
ref_id             int64                       the ref (unique within the dataset)
ann_id             int64                       its COCO annotation
image_id           int64                       its COCO image
file_name          string                      the image file, relative to the images folder
height, width      int32                       original image size (H, W) in pixels
box_xywh           fixed_size_list<float32>[4] COCO box (x, y, w, h), original pixels
category_id        int32                       COCO category id
category           string                      category name
split              string                      train / val / testA / testB / test
sentences          list<string>                every sentence of the ref (refer's ``sent``)
mask_rle_counts    string                      compressed COCO RLE counts of the (H, W) mask
image              binary                      the image file's bytes as stored (not re-encoded)
=================  ==========================  ===============================================

Row groups hold ``rows_per_row_group`` rows (Ray Data's smallest read unit), files hold up to
``rows_per_file`` rows. Each file is written to ``.tmp/`` and renamed into place, and the
manifest (rewritten after every file) records its sha256 and a *plan key* (hash of the source
files and the ref ids it holds): a rerun keeps every file whose key and checksum still match,
writes the rest and deletes files the plan no longer names.

Manifest keys: ``schema_version``, ``dataset``, ``split_by``, ``columns`` (name -> Arrow type),
``rows_per_file``, ``rows_per_row_group``, ``source`` (refs/instances/images paths, relative to
the manifest's folder when they lie beside it, and the sha256 of refs and instances),
``generator`` (SynthRef settings, else null), ``counts`` (refs per split), ``sentences``
(sentences per split), ``shards`` (per file: split, path, num_rows, num_row_groups, sha256,
plan_key, skipped), ``skipped`` (refs skipped per reason), ``skipped_examples`` (a few ref ids,
files and details per reason) and ``complete``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from gtms.data import records as R
from gtms.data.records import RecordWithImage, RefRecord, SkipLog
from gtms.data.refer import ReferSource, file_sha256, load_refer

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_ROWS_PER_FILE = 1024
# Ray Data hands whole row groups to one preprocessing actor: 64 refs keeps a pool of actors
# (and the streaming split to trainer workers) busy even on small splits.
DEFAULT_ROWS_PER_ROW_GROUP = 64
SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")

SHARD_SCHEMA = pa.schema([
    pa.field("ref_id", pa.int64(), nullable=False),
    pa.field("ann_id", pa.int64(), nullable=False),
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("box_xywh", pa.list_(pa.float32(), 4), nullable=False),
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("sentences", pa.list_(pa.string()), nullable=False),
    pa.field("mask_rle_counts", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
])
SHARD_COLUMNS = tuple(SHARD_SCHEMA.names)
# Compressing JPEG bytes gains nothing; statistics on them would copy image bytes into footers.
_COMPRESSION = {name: ("none" if name == "image" else "zstd") for name in SHARD_COLUMNS}
_STATISTICS = [n for n in SHARD_COLUMNS if n not in ("image", "mask_rle_counts", "sentences")]


def shards_dir(out_dir: str | Path) -> Path:
    """Where ``prepare`` writes the shards of a dataset folder: ``<out>/shards``."""
    return Path(out_dir) / "shards"


def read_manifest(shard_dir: str | Path) -> dict | None:
    """The manifest of a shards folder, or None if there is none (or it is unreadable)."""
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def split_files(shard_dir: str | Path, split: str) -> list[Path]:
    """The Parquet files of one split named by a complete manifest, in order."""
    manifest = read_manifest(shard_dir)
    if manifest is None or not manifest.get("complete"):
        raise R.DataError(f"{Path(shard_dir) / MANIFEST_NAME}: no complete manifest; run"
                          " `python run.py prepare` first")
    files = [Path(shard_dir) / s["path"] for s in manifest["shards"] if s["split"] == split]
    if not files:
        raise R.DataError(f"{shard_dir}: no shards for split {split!r}; the manifest has "
                          f"{sorted(manifest['counts'])}")
    return files


def check_layout(rows_per_file: int, rows_per_row_group: int) -> None:
    if rows_per_file < 1 or rows_per_row_group < 1:
        raise R.DataError(f"rows per file ({rows_per_file}) and per row group "
                          f"({rows_per_row_group}) must be >= 1")


@dataclass(frozen=True)
class ShardReport:
    """What :func:`write_shards` did: the final manifest and the files written vs kept."""

    manifest: dict
    manifest_path: Path
    written: int
    reused: int


def build_shards(source: ReferSource, out_dir: str | Path, *, strict: bool = False,
                 rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                 rows_per_row_group: int = DEFAULT_ROWS_PER_ROW_GROUP,
                 generator: dict | None = None, progress: bool = True) -> ShardReport:
    """Read a refer-layout dataset and write its shards to ``<out_dir>/shards``."""
    skips = SkipLog(strict=strict)
    records = load_refer(source, skips)
    return write_shards(records, source=source, shard_dir=shards_dir(out_dir), skips=skips,
                        rows_per_file=rows_per_file, rows_per_row_group=rows_per_row_group,
                        generator=generator, progress=progress)


@dataclass(frozen=True)
class _Part:
    split: str
    index: int
    records: tuple[RefRecord, ...]
    key: str

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"


def write_shards(records: Sequence[RefRecord], *, source: ReferSource, shard_dir: str | Path,
                 skips: SkipLog, rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                 rows_per_row_group: int = DEFAULT_ROWS_PER_ROW_GROUP,
                 generator: dict | None = None, progress: bool = True) -> ShardReport:
    """Write ``records`` (with their images) as Parquet shards; resumable and idempotent."""
    check_layout(rows_per_file, rows_per_row_group)
    shard_dir = Path(shard_dir)
    _clear_tmp(shard_dir)
    manifest = _manifest_head(source, shard_dir, rows_per_file, rows_per_row_group, generator)
    parts = _plan(records, manifest, rows_per_file)
    previous = {s["path"]: s for s in (read_manifest(shard_dir) or {}).get("shards", [])}
    entries: dict[str, dict] = {}
    images = _ImageReader(source)
    written = reused = 0
    bar = tqdm(total=len(records), desc=f"shards {source.dataset}", unit="ref",
               disable=not progress)
    for part in parts:
        entry = _reusable(previous.get(part.path), part, shard_dir, skips.strict)
        if entry is None:
            entry = _write_part(part, shard_dir, images, skips.strict, rows_per_row_group)
            written += 1
        else:
            reused += 1
        entries[part.path] = entry
        bar.update(len(part.records))
        _write_manifest(shard_dir, manifest, entries, skips, complete=False)
    bar.close()
    _remove_stale(shard_dir, set(entries))
    final = _write_manifest(shard_dir, manifest, entries, skips, complete=True)
    (shard_dir / ".tmp").rmdir()
    return ShardReport(final, shard_dir / MANIFEST_NAME, written=written, reused=reused)


def read_shard_records(path: str | Path) -> Iterator[RecordWithImage]:
    """Rows of one Parquet file, or of every ``part-*.parquet`` under a folder (sorted)."""
    path = Path(path)
    files = sorted(path.rglob("part-*.parquet")) if path.is_dir() else [path]
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=DEFAULT_ROWS_PER_ROW_GROUP):
            for row in batch.to_pylist():
                yield RecordWithImage(record_from_row(row), row["image"])


def record_from_row(row: dict) -> RefRecord:
    """A shard row (as a dict of Python values) -> :class:`RefRecord`."""
    return RefRecord(
        ref_id=int(row["ref_id"]), ann_id=int(row["ann_id"]), image_id=int(row["image_id"]),
        file_name=row["file_name"], height=int(row["height"]), width=int(row["width"]),
        box_xywh=tuple(float(v) for v in row["box_xywh"]), category_id=int(row["category_id"]),
        category=row["category"], split=row["split"], sentences=tuple(row["sentences"]),
        mask_rle_counts=row["mask_rle_counts"],
    )


def records_to_table(rows: Sequence[RecordWithImage]) -> pa.Table:
    """Rows -> an Arrow table with :data:`SHARD_SCHEMA`."""
    columns = {name: [] for name in SHARD_COLUMNS}
    for record, image in rows:
        for name in SHARD_COLUMNS[:-1]:
            value = getattr(record, name)
            columns[name].append(list(value) if isinstance(value, tuple) else value)
        columns["image"].append(image)
    return pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)


# ----------------------------------------------------------------------------------- internals


def _portable(path: Path, shard_dir: Path) -> str:
    """Path relative to the manifest's folder when it lies in the same dataset folder."""
    path, shard_dir = Path(path).resolve(), shard_dir.resolve()
    if path.is_relative_to(shard_dir.parent):
        return os.path.relpath(path, shard_dir)
    return str(path)


def _manifest_head(source: ReferSource, shard_dir: Path, rows_per_file: int,
                   rows_per_row_group: int, generator: dict | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": source.dataset,
        "split_by": source.split_by,
        "columns": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "rows_per_file": rows_per_file,
        "rows_per_row_group": rows_per_row_group,
        "source": {
            "refs": _portable(source.refs_path, shard_dir),
            "instances": _portable(source.instances_path, shard_dir),
            "images": _portable(source.images_dir, shard_dir),
            "refs_sha256": file_sha256(source.refs_path),
            "instances_sha256": file_sha256(source.instances_path),
        },
        "generator": generator,
    }


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def _plan(records: Sequence[RefRecord], manifest: dict, rows_per_file: int) -> list[_Part]:
    by_split: dict[str, list[RefRecord]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    parts = []
    for split in sorted(by_split, key=_split_rank):
        rows = by_split[split]
        for index, start in enumerate(range(0, len(rows), rows_per_file)):
            chunk = tuple(rows[start:start + rows_per_file])
            key_doc = {"schema_version": SCHEMA_VERSION, "source": manifest["source"],
                       "rows_per_row_group": manifest["rows_per_row_group"], "split": split,
                       "index": index, "ref_ids": [r.ref_id for r in chunk]}
            key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()
            parts.append(_Part(split, index, chunk, key))
    return parts


def _reusable(entry: dict | None, part: _Part, shard_dir: Path, strict: bool) -> dict | None:
    """The previous entry of ``part`` if its file is intact and was planned the same way."""
    if entry is None or entry.get("plan_key") != part.key:
        return None
    if strict and entry.get("skipped"):
        return None  # rewrite, so that strict mode stops on the bad ref
    file = shard_dir / part.path
    if not file.is_file() or file_sha256(file) != entry.get("sha256"):
        return None
    return entry


class _ImageReader:
    """Reads image bytes, checking each file once (exists, decodes fully, has the stated size)."""

    def __init__(self, source: ReferSource):
        self.source = source
        self._problems: dict[str, tuple[str, str] | None] = {}
        self._last: tuple[str, bytes] = ("", b"")  # refs of one image are usually adjacent

    def read(self, record: RefRecord) -> tuple[bytes | None, tuple[str, str] | None]:
        key = record.file_name
        if self._last[0] == key:
            return self._last[1], self._problems[key]
        path = self.source.image_path(key)
        try:
            data = path.read_bytes()
        except OSError as err:
            return None, (R.MISSING_IMAGE, f"cannot read {path}: {err.strerror or err}")
        if key not in self._problems:
            self._problems[key] = _check_image(data, record.height, record.width)
        self._last = (key, data)
        return data, self._problems[key]


def _check_image(data: bytes, height: int, width: int) -> tuple[str, str] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except Exception as err:  # PIL raises many types for damaged files
        return R.UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}"
    if size != (width, height):
        return R.IMAGE_SIZE_MISMATCH, f"decoded {size[1]}x{size[0]}, instances.json says " \
                                      f"{height}x{width} (HxW)"
    return None


def _write_part(part: _Part, shard_dir: Path, images: _ImageReader, strict: bool,
                rows_per_row_group: int) -> dict:
    skips = SkipLog(strict=strict)
    rows = []
    for record in part.records:
        data, problem = images.read(record)
        if problem is not None:
            skips.skip(problem[0], file=images.source.image_path(record.file_name),
                       ref_id=record.ref_id, detail=problem[1])
            continue
        rows.append(RecordWithImage(record, data))
    final = shard_dir / part.path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard_dir / ".tmp" / f"{part.split}-{final.name}.{os.getpid()}"
    pq.write_table(records_to_table(rows), tmp, row_group_size=rows_per_row_group,
                   compression=_COMPRESSION, use_dictionary=False,
                   write_statistics=_STATISTICS)
    digest = file_sha256(tmp)
    os.replace(tmp, final)
    return {
        "split": part.split, "path": part.path, "num_rows": len(rows),
        "num_sentences": sum(len(row.record.sentences) for row in rows),
        "num_row_groups": pq.ParquetFile(final).num_row_groups, "sha256": digest,
        "plan_key": part.key, "skipped": dict(sorted(skips.counts.items())),
        "skipped_examples": skips.examples,
    }


def _write_manifest(shard_dir: Path, head: dict, entries: dict[str, dict], skips: SkipLog,
                    *, complete: bool) -> dict:
    totals = SkipLog(strict=False)
    totals.merge(skips.counts, skips.examples)
    counts: dict[str, int] = {}
    sentences: dict[str, int] = {}
    for entry in entries.values():
        totals.merge(entry["skipped"], entry["skipped_examples"])
        counts[entry["split"]] = counts.get(entry["split"], 0) + entry["num_rows"]
    for split in counts:
        sentences[split] = sum(e.get("num_sentences", 0) for e in entries.values()
                               if e["split"] == split)
    manifest = dict(head)
    manifest.update({
        "counts": counts,
        "sentences": sentences,
        "shards": list(entries.values()),
        "skipped": dict(sorted(totals.counts.items())),
        "skipped_examples": dict(sorted(totals.examples.items())),
        "complete": complete,
    })
    tmp = shard_dir / ".tmp" / f"{MANIFEST_NAME}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, shard_dir / MANIFEST_NAME)
    return manifest


def _clear_tmp(shard_dir: Path) -> None:
    """Start with an empty ``.tmp`` (left-overs of an interrupted run are incomplete files)."""
    tmp = shard_dir / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for file in tmp.iterdir():
        file.unlink()


def _remove_stale(shard_dir: Path, keep: set[str]) -> None:
    """Delete part files that the current plan does not name (e.g. after fewer refs)."""
    for file in sorted(shard_dir.glob("*/part-*.parquet")):
        if file.relative_to(shard_dir).as_posix() not in keep:
            file.unlink()
    for folder in sorted(p for p in shard_dir.iterdir() if p.is_dir() and p.name != ".tmp"):
        if not any(folder.iterdir()):
            folder.rmdir()
