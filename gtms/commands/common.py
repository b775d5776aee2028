"""Flags shared by the subcommands that read an experiment config."""

from __future__ import annotations

import argparse
from pathlib import Path

from gtms.config import NO_CONFIG, Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = str(REPO_ROOT / "experiments" / "synthref.yaml")


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


CHECKPOINT_HELP = ("checkpoint folder or .pt file: ours (its config travels with it) or "
                   "CRIS-layout (then --config names the preset); local or s3:// / gs://")


def add_checkpoint_flag(parser, *, required: bool = True) -> None:
    """``--checkpoint PATH`` of the commands that start from a trained model (``parser`` may
    be a mutually exclusive group)."""
    parser.add_argument("--checkpoint", required=required, metavar="PATH", help=CHECKPOINT_HELP)


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


def add_backend_flags(parser: argparse.ArgumentParser, *, no_ray: str | None) -> None:
    """``--address`` and, where the command can run without Ray, ``--no-ray`` (``no_ray``:
    what it means for this command; None: Ray only)."""
    if no_ray is not None:
        parser.add_argument("--no-ray", action="store_true",
                            help=f"run without Ray: {no_ray}")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="Ray cluster to join (default: ray.address, else $RAY_ADDRESS, "
                             "else a local Ray sized for the run)")


def backend_from_args(args: argparse.Namespace):
    """The :class:`gtms.backend.Backend` that ``--no-ray`` / ``--address`` ask for."""
    from gtms.backend import backend_for

    return backend_for(no_ray=getattr(args, "no_ray", False), address=args.address)
