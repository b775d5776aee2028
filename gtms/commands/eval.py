"""``run.py eval``: evaluate a checkpoint per split (mean IoU, overall IoU, Prec@X)."""

from __future__ import annotations

import argparse

from gtms.commands.common import (
    add_backend_flags,
    add_checkpoint_config_flags,
    add_checkpoint_flag,
    backend_from_args,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on val/testA/testB (CRIS protocol)",
        description="CRIS-style evaluation: sigmoid, upsample, inverse letterbox to the original "
                    "image, threshold (train.threshold, 0.35), IoU per sentence against the "
                    "original mask. Prints mean IoU (average of per-sentence IoU, what the "
                    "papers report), overall IoU (total intersection / total union) and "
                    "Prec@0.5..0.9 per split, and writes them as JSON. Accepts our checkpoints "
                    "(a checkpoint_epoch_* folder or its model.pt) and CRIS-layout ones.")
    add_checkpoint_flag(parser)
    parser.add_argument("--splits", default=None, metavar="A,B",
                        help="comma-separated splits (default: data.eval_splits of the config)")
    add_checkpoint_config_flags(
        parser, example="--set train.threshold=0.5 --set data.root=/data/refcoco")
    parser.add_argument("--out", default=None, metavar="JSON",
                        help="where to write the metrics (default: eval.json next to the "
                             "checkpoint)")
    parser.add_argument("--pseudo-labels", action="store_true",
                        help="also score the pseudo labels P-hat = TreeFilter(P x W) that this "
                             "model's prediction P gives with four vertex weights W: the box "
                             "(tree row), forest x GradCAM (GTMS), forest x the GT mask as "
                             "attention (a perfect GradCAM) and the GT mask itself; shows what "
                             "GradCAM adds and could add (gtms/eval/pseudo_quality.py)")
    add_backend_flags(parser, no_ray="preprocess the splits in this process instead of Ray "
                                     "Data's actors (same numbers; no Ray start-up, one core)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms import storage
    from gtms.eval.evaluate import evaluate, format_table
    from gtms.model.checkpoint import load_trained

    trained = load_trained(args.checkpoint, args.config, args.overrides)
    splits = args.splits.split(",") if args.splits else None
    out = args.out or storage.sibling(trained.file, "eval.json")
    report = evaluate(trained, splits=splits, out=out, backend=backend_from_args(args),
                      pseudo_labels=args.pseudo_labels)
    print(f"\n{report['dataset']} ({report['root']}), threshold {report['threshold']}")
    print(format_table(report["splits"]))
    print(f"\nmetrics written to {out}")
    return 0
