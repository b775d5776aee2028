"""``run.py eval``: evaluate a checkpoint per split (mean IoU, overall IoU, Prec@X)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gtms.commands.common import NO_CONFIG, add_checkpoint_config_flags


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on val/testA/testB (CRIS protocol)",
        description="CRIS-style evaluation: sigmoid, upsample, inverse letterbox to the original "
                    "image, threshold (train.threshold, 0.35), IoU per sentence against the "
                    "original mask. Prints mean IoU (average of per-sentence IoU, what the "
                    "papers report), overall IoU (total intersection / total union) and "
                    "Prec@0.5..0.9 per split, and writes them as JSON. Accepts our checkpoints "
                    "(a checkpoint_epoch_* folder or its model.pt) and CRIS-layout ones.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint folder or .pt file")
    parser.add_argument("--splits", default=None, metavar="A,B",
                        help="comma-separated splits (default: data.eval_splits of the config)")
    add_checkpoint_config_flags(
        parser, example="--set train.threshold=0.5 --set data.root=/data/refcoco")
    parser.add_argument("--out", default=None, metavar="JSON",
                        help="where to write the metrics (default: eval.json next to the "
                             "checkpoint)")
    parser.add_argument("--address", default=None, help="Ray cluster to join")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms.config import config_from_dict, load_config
    from gtms.eval.evaluate import evaluate, format_table
    from gtms.train.checkpoint import (
        is_gtms_checkpoint,
        load_checkpoint,
        resolve_checkpoint_file,
    )

    file = resolve_checkpoint_file(args.checkpoint)
    cfg = None
    if args.config is not None and args.config.lower() not in NO_CONFIG:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:
        payload = load_checkpoint(file)
        stored = payload["config"] if is_gtms_checkpoint(payload) else {}
        cfg = config_from_dict(stored, f"{file} (stored config)", args.overrides)
    splits = args.splits.split(",") if args.splits else None
    out = Path(args.out) if args.out else file.parent / "eval.json"
    report = evaluate(file, cfg, splits, out, address=args.address)
    print(f"\n{report['dataset']} ({report['root']}), threshold {report['threshold']}")
    print(format_table(report["splits"]))
    print(f"\nmetrics written to {out}")
    return 0

