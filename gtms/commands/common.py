"""Flags shared by the subcommands that read an experiment config."""

from __future__ import annotations

import argparse
from pathlib import Path

from gtms.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = str(REPO_ROOT / "experiments" / "synthref.yaml")
NO_CONFIG = ("", "none")


def add_config_flags(parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_CONFIG):
    parser.add_argument(
        "--config", default=default, metavar="YAML",
        help="experiment YAML holding overrides of the built-in defaults (the paper's settings);"
             " it may 'extends:' another file; 'none' = no file; default: the laptop SynthRef "
             "experiment, experiments/synthref.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one key after the file, e.g. --set loss.mode=tree --set pseudo.sigma=0.05;"
             " repeatable; values are parsed as YAML (lists as [1,2] or 1,2)")


def add_checkpoint_config_flags(parser: argparse.ArgumentParser, *, example: str) -> None:
    """``--config`` / ``--set`` of the commands that start from a checkpoint, whose own stored
    config is the default."""
    parser.add_argument(
        "--config", default=None, metavar="YAML",
        help="experiment YAML; default: the config stored in the checkpoint "
             "(a CRIS-layout checkpoint needs one naming model.preset)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help=f"override a key, e.g. {example}")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def config_from_args(args: argparse.Namespace) -> Config:
    path = None if args.config is None or args.config.lower() in NO_CONFIG else args.config
    return load_config(path, args.overrides)
