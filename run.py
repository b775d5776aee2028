#!/usr/bin/env python
"""GTMS: box-supervised referring image segmentation on Ray. ``python run.py --help``."""

from __future__ import annotations

import argparse
import importlib
import sys

from gtms.config import ConfigError
from gtms.console import STDERR_FILTER, set_verbose
from gtms.errors import UserError

# Subcommands in the order --help lists them; each module registers its own parser.
COMMANDS = ("config", "prepare", "pretrain", "train", "eval", "ablate", "sweep", "predict",
            "visualize", "export", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Train and evaluate GTMS (mask-free referring image segmentation on CRIS/"
                    "CLIP) with Ray. Every subcommand has its own --help.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"gtms.commands.{name}").register(subparsers)
        add_verbose_flag(subparsers.choices[name])
    return parser


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show Ray's own log lines (worker prefixes, INFO messages, warnings); by "
             "default the console shows only this program's lines and Ray's stay in its log "
             "folder (/tmp/ray/session_latest/logs)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    if not args.verbose:  # Ray's C++ lines reach fd 2 directly; see gtms/console.py
        STDERR_FILTER.install()
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        STDERR_FILTER.uninstall()


if __name__ == "__main__":
    sys.exit(main())
