"""``run.py`` subcommands. Each module has ``register(subparsers)`` and ``run(args) -> int``."""
