"""The base of errors that mean "the input is wrong": the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (file, config, checkpoint, dataset, address): say what and where."""
