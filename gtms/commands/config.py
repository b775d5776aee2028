"""``run.py config``: print the resolved configuration."""

from __future__ import annotations

import argparse

from gtms.commands.common import add_config_flags, config_from_args
from gtms.config import dump_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "config", help="print the resolved experiment configuration",
        description="Resolve defaults <- extends chain <- --config file <- --set overrides and "
                    "print the result as YAML (the same text a run stores as config.yaml). "
                    "Unknown keys, wrong types and bad values are errors naming the key.")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(dump_config(config_from_args(args)), end="")
    return 0
