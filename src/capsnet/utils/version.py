"""The package's version, from its installed metadata (pyproject.toml is the one source)."""

from __future__ import annotations

import importlib.metadata


def package_version() -> str:
    """capsnet's version; ``"unknown"`` when it runs from a source tree it was not installed
    from (``PYTHONPATH=src``, as on the GPU machine)."""
    try:
        return importlib.metadata.version("capsnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
