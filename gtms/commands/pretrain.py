"""``run.py pretrain``: SynthCLIP, CLIP-style contrastive pretraining on the dataset's train split.

    python run.py pretrain                         # tiny preset on SynthRef -> the train cache
    python run.py pretrain --out runs/synthclip --set pretrain.epochs=20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gtms.commands.common import (
    add_backend_flags,
    add_config_flags,
    backend_from_args,
    config_from_args,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="SynthCLIP: contrastive pretraining of the image and text towers",
        description="CLIP-style contrastive pretraining (symmetric InfoNCE, trainable "
                    "temperature) of the preset's image and text towers on the train split: "
                    "scene images with their expressions and object-centred crops captioned "
                    "'colour category' (pretrain.scenes / pretrain.crops). Writes clip.pt, an "
                    "OpenAI-layout CLIP state dict that model.clip_weights loads like OpenAI's "
                    "files, and report.json with text->image R@1/R@5 and GradCAM pointing on the "
                    "val split before and after. Without --out the weights go to the cache that "
                    "'run.py train' uses when pretrain.before_train is set (the laptop default).")
    add_config_flags(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: <data.root>/synthclip/<preset>-<size>px-"
                             "<hash of the settings>/, the cache train reads)")
    parser.add_argument("--force", action="store_true",
                        help="pretrain again even if the cache already holds these weights")
    add_backend_flags(parser, no_ray="the loop in this one process")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms.data.roots import prepare_data_root
    from gtms.pretrain.run import REPORT_NAME, cache_dir, run_pretrain

    cfg = config_from_args(args)
    root = prepare_data_root(cfg)
    out = args.out if args.out is not None else cache_dir(cfg, root)
    if not args.force and (out / REPORT_NAME).is_file():
        print(f"pretrain: {out} already holds these weights (report.json); --force pretrains "
              "again")
        return 0
    run_pretrain(cfg, root, out, backend_from_args(args))
    return 0
