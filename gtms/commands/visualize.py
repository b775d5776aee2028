"""``run.py visualize``: Fig. 5-style panels (forest, GradCAM, W, P-hat, prediction, mask)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gtms.commands.common import add_checkpoint_config_flags, add_checkpoint_flag, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize", help="draw Fig. 5-style panels of a checkpoint on a split",
        description="For the first --n samples of a split of the checkpoint's dataset "
                    "(data.root; SynthRef is generated if absent): image with box and sentence,"
                    " structural forest (a colour per sub-tree), GradCAM attention A, vertex "
                    "weights W, pseudo label P^ (mode forest-gradcam), prediction, ground "
                    "truth. Writes one PNG per sample (ref<id>_s<sentence>.png), "
                    "contact_sheet.png (all samples) and samples.jsonl (prediction IoU, P^ "
                    "IoU). Runs in this process; no Ray.",
        epilog="example: python run.py visualize --checkpoint runs/<run>/checkpoint_epoch_0010 "
               "--split testA --n 12 --seed 3")
    add_checkpoint_flag(parser)
    parser.add_argument("--split", default=None,
                        help="split to draw (default: data.val_split of the config)")
    parser.add_argument("--n", type=positive_int, default=8, help="samples (default 8)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: visualize_<split> next to the checkpoint)")
    parser.add_argument("--panel-size", type=positive_int, default=256, metavar="PX",
                        help="panel width and height in pixels (default 256)")
    parser.add_argument("--all-sentences", action="store_true",
                        help="every sentence of a ref (default: its first sentence only)")
    parser.add_argument("--seed", type=int, default=None,
                        help="pick refs at random with this seed (default: shard order)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda, ...")
    add_checkpoint_config_flags(
        parser, example="--set data.root=/data/refcoco --set pseudo.sigma=0.05")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms import storage
    from gtms.data.roots import prepare_data_root
    from gtms.eval.metrics import percent
    from gtms.infer.predict import pick_device
    from gtms.infer.visualize import visualize
    from gtms.model.checkpoint import load_trained

    device = pick_device(args.device)
    model, cfg, file = load_trained(args.checkpoint, args.config, args.overrides)
    model.to(device)
    split = args.split or cfg.data.val_split
    root = prepare_data_root(cfg)
    # default: beside a local checkpoint; here for one in a bucket
    beside = Path.cwd() if storage.is_uri(file) else Path(file).parent
    out = Path(args.out) if args.out else beside / f"visualize_{split}"
    print(f"drawing {args.n} sample(s) of {cfg.data.dataset} {split} ({root}) on {device}",
          flush=True)

    def echo(figure) -> None:
        print(f"ref {figure.ref_id} sentence {figure.sent_index} {figure.sentence!r}: "
              f"IoU {percent(figure.iou)}, P^ IoU {percent(figure.pseudo_label_iou)} -> "
              f"{figure.path}",
              flush=True)

    summary = visualize(model, cfg, root, split, out, n=args.n, panel_size=args.panel_size,
                        all_sentences=args.all_sentences, seed=args.seed, echo=echo)
    if len(summary["samples"]) < args.n:
        print(f"({split} has only {len(summary['samples'])} usable sample(s))")
    if summary["skipped"]:
        print(f"skipped rows: {summary['skipped']}")
    print(f"{len(summary['samples'])} panel(s) and {summary['contact_sheet']} written")
    return 0
