"""Where the shipped data lives: the repository's top-level folders, or a wheel's _data copy."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(folder: str) -> Path:
    """``models``, ``hardware_specs`` or ``data``: the repo checkout's copy first, then the wheel's."""
    repo = _PKG.parent / folder
    if repo.is_dir():
        return repo
    return _PKG / "_data" / folder
