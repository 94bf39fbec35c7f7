# SPDX-License-Identifier: Apache-2.0
"""Availability flags for optional dependencies, computed once at import time."""

from importlib.util import find_spec


def _available(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


FAISS_AVAILABLE = _available("faiss")
SKLEARN_AVAILABLE = _available("sklearn")
TENSORBOARD_AVAILABLE = _available("tensorboard")
MATPLOTLIB_AVAILABLE = _available("matplotlib")
WANDB_AVAILABLE = _available("wandb")


def require(flag: bool, package: str, extra: str, what: str) -> None:
    """Raise a `ModuleNotFoundError` naming both install commands when an optional package is missing.

    Args:
        flag: The availability flag of `package`.
        package: The pip name of the missing package.
        extra: The `diadm` extra that brings it in.
        what: The feature that needs it, for the message.

    Raises:
        ModuleNotFoundError: If `flag` is false.
    """
    if not flag:
        raise ModuleNotFoundError(
            f"{what} needs `{package}`, which is not installed."
            f" Install it with `pip install 'diadm[{extra}]'` or `pip install {package}`."
        )
