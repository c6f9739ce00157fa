"""Optional dependencies: imported when asked for, with the install command when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingOptional(ImportError):
    """An optional package is not installed; the message says how to get it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingOptional naming the pip extra that brings it.

    Args:
        module: the module to import (e.g. ``matplotlib``).
        extra: megalong's extra that installs it (e.g. ``plot``).
        purpose: what needs it, for the message (e.g. "the passkey heat-map").
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingOptional(
            f"{purpose} needs {module}, which is not installed: pip install 'megalong[{extra}]' "
            f"(or pip install {module})"
        ) from None
