# SPDX-License-Identifier: Apache-2.0
"""Argument types shared by the subcommands."""

import argparse


def positive_int(text: str) -> int:
    """Parse an integer of at least 1, or fail with argparse's usage error (exit code 2).

    Raises:
        argparse.ArgumentTypeError: If `text` is not an integer or is below 1.

    Example:
        >>> positive_int("3")
        3
    """
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
