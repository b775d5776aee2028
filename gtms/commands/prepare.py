"""``run.py prepare``: generate SynthRef or read RefCOCO/+/g, then write Parquet shards.

    python run.py prepare                                   # SynthRef -> data/synthref/shards
    python run.py prepare --dataset refcoco --refer-root refer/data --images coco/train2014 \\
        --out data/refcoco
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gtms.data.records import NOTE_REASONS, SENTENCE_REASONS, DataError, is_ref_reason
from gtms.data.refer import SPLITS_BY, ReferSource, default_split_by
from gtms.data.shards import (
    DEFAULT_ROWS_PER_FILE,
    DEFAULT_ROWS_PER_ROW_GROUP,
    ShardReport,
    build_shards,
)
from gtms.data.synthref import (
    DEFAULT_DIFFICULTY,
    DEFAULT_DIR,
    DEFAULT_NUM_IMAGES,
    DEFAULT_SEED,
    SynthRefSettings,
    prepare_synthref,
)
from gtms.data.synthref.scene import DIFFICULTIES
from gtms.data.synthref.stats import format_statistics

SYNTHREF_ONLY = ("num_images", "seed", "difficulty")
REFER_ONLY = ("split_by", "refer_root", "images")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="generate SynthRef or read RefCOCO/+/g and write Parquet shards",
        description="Write the Parquet shards that train/eval stream: SynthRef is generated "
                    "(refer layout) and read back; RefCOCO/RefCOCO+/RefCOCOg are read from the "
                    "refer toolkit layout and COCO images. Shards go to <out>/shards with a "
                    "manifest.json; a rerun keeps finished shards.")
    parser.add_argument(
        "--dataset", choices=sorted(SPLITS_BY), default="synthref",
        help="which dataset to prepare (default: synthref, generated locally)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help=f"dataset folder; shards are written to DIR/shards (default: {DEFAULT_DIR} for "
             "synthref, data/<dataset>_<split-by> otherwise)")
    parser.add_argument(
        "--strict", action="store_true",
        help="stop at the first bad ref (missing/undecodable image, bad box, no sentences, "
             "missing annotation) instead of skipping and counting it")
    parser.add_argument(
        "--force", action="store_true",
        help="synthref: regenerate even if DIR already holds these settings")
    synth = parser.add_argument_group("synthref")
    synth.add_argument(
        "--num-images", type=int, default=DEFAULT_NUM_IMAGES, metavar="N",
        help=f"number of generated images (default {DEFAULT_NUM_IMAGES}; ~3.5 refs each)")
    synth.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help=f"generator seed, >= 0 (default {DEFAULT_SEED}); same seed, same bytes")
    synth.add_argument(
        "--difficulty", choices=list(DIFFICULTIES), default=DEFAULT_DIFFICULTY,
        help="objects per image, occlusion, background texture, contrast and JPEG quality "
             f"(default {DEFAULT_DIFFICULTY})")
    refer = parser.add_argument_group("refcoco, refcoco+, refcocog")
    refer.add_argument(
        "--split-by", choices=("unc", "umd", "google"), default=None,
        help="partition: unc for refcoco/refcoco+ (default), umd (default) or google for "
             "refcocog")
    refer.add_argument("--refer-root", type=Path, metavar="DIR",
                       help="refer toolkit data folder holding <dataset>/refs(<split-by>).p and "
                            "<dataset>/instances.json")
    refer.add_argument("--images", type=Path, metavar="DIR",
                       help="folder of the COCO train2014 images the refs point to")
    layout = parser.add_argument_group("shard layout")
    layout.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE, metavar="N",
                        help=f"refs per Parquet file (default {DEFAULT_ROWS_PER_FILE})")
    layout.add_argument("--rows-per-row-group", type=int, default=DEFAULT_ROWS_PER_ROW_GROUP,
                        metavar="N", help="refs per row group, Ray Data's smallest read unit "
                                          f"(default {DEFAULT_ROWS_PER_ROW_GROUP})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = _prepare(args)
    except DataError as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    _print_report(report)
    return 0


def _prepare(args: argparse.Namespace) -> ShardReport:
    layout = {"rows_per_file": args.rows_per_file, "rows_per_row_group": args.rows_per_row_group}
    if args.dataset == "synthref":
        _reject(args, REFER_ONLY, "synthref")
        settings = SynthRefSettings(num_images=args.num_images, seed=args.seed,
                                    difficulty=args.difficulty)
        out = args.out or DEFAULT_DIR
        return prepare_synthref(out, settings, strict=args.strict, force=args.force, **layout)
    _reject(args, SYNTHREF_ONLY, args.dataset)
    if args.refer_root is None or args.images is None:
        raise DataError(f"--dataset {args.dataset} needs --refer-root and --images")
    split_by = args.split_by or default_split_by(args.dataset)
    source = ReferSource(refer_root=args.refer_root, dataset=args.dataset, split_by=split_by,
                         images_dir=args.images)
    out = args.out or Path("data") / f"{args.dataset}_{split_by}"
    return build_shards(source, out, strict=args.strict, **layout)


def _reject(args: argparse.Namespace, names: tuple[str, ...], dataset: str) -> None:
    defaults = {"num_images": DEFAULT_NUM_IMAGES, "seed": DEFAULT_SEED,
                "difficulty": DEFAULT_DIFFICULTY}
    given = [n for n in names if getattr(args, n) not in (None, defaults.get(n))]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise DataError(f"{flags} do(es) not apply to --dataset {dataset}")


def _print_report(report: ShardReport) -> None:
    m = report.manifest
    print(f"{m['dataset']} ({m['split_by']}): {report.written} shard file(s) written, "
          f"{report.reused} kept from an earlier run")
    for split, count in m["counts"].items():
        print(f"  {split}: {count} refs, {m['sentences'][split]} sentences")
    refs = {r: n for r, n in m["skipped"].items() if is_ref_reason(r)}
    sentences = {r: n for r, n in m["skipped"].items() if r in SENTENCE_REASONS}
    notes = {r: n for r, n in m["skipped"].items() if r in NOTE_REASONS}
    _print_skips(m, refs, "skipped {} ref(s)", "skipped: none")
    _print_skips(m, sentences, "dropped {} sentence(s) of kept refs", "dropped sentences: none")
    if notes:  # truncated_sentence counts sentences, corrupt_jpeg_warning refs
        _print_skips(m, notes, "noted, kept as they are", "")
    if m.get("statistics"):
        print("  statistics of the referred objects:")
        for line in format_statistics(m["statistics"]):
            print(f"    {line}")
    print(f"manifest: {report.manifest_path}")


def _print_skips(manifest: dict, counts: dict[str, int], header: str, none: str) -> None:
    if not counts:
        print(f"  {none}")
        return
    print(f"  {header.format(sum(counts.values()))} (details in the manifest):")
    for reason, count in counts.items():
        example = manifest["skipped_examples"].get(reason, [{}])[0]
        print(f"    {reason}: {count}  e.g. ref {example.get('ref_id')} in "
              f"{example.get('file')}: {example.get('detail')}")
