"""``run.py train``: train GTMS (or any Table 2 row) with Ray Train."""

from __future__ import annotations

import argparse

from gtms.commands.common import (
    add_backend_flags,
    add_config_flags,
    backend_from_args,
    config_from_args,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (default: tiny GTMS on SynthRef, a few minutes on a CPU)",
        description="Train CRIS with the supervision of loss.mode (default forest-gradcam = full "
                    "GTMS) on Ray Train's TorchTrainer. With no arguments SynthRef is generated "
                    "if absent and the tiny preset trains on the CPU. Progress is printed per "
                    "epoch; the run folder gets config.yaml, run.json, metrics.jsonl, "
                    "TensorBoard files (tb/) and checkpoints.")
    add_config_flags(parser)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN",
                        help="continue an interrupted run at its next epoch: a run name under "
                             "train.run_dir, a run folder, or nothing for the latest run; the "
                             "run's own config.yaml is used (--set still applies on top)")
    add_backend_flags(parser, no_ray="the same loop in this one process, reading and "
                                     "preprocessing its batches itself (debugging)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms.train.fit import fit
    from gtms.train.summary import print_summary

    cfg = config_from_args(args)
    summary = fit(cfg, backend_from_args(args), resume=args.resume,
                  set_overrides=tuple(args.overrides))
    print_summary(summary)
    return 0
