"""Files: where the shipped data lives (the repository's top-level folders, or a wheel's _data
copy), and writing outputs so that a failure never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(folder: str) -> Path:
    """``models``, ``hardware_specs`` or ``data``: the repo checkout's copy first, then the wheel's."""
    repo = _PKG.parent / folder
    if repo.is_dir():
        return repo
    return _PKG / "_data" / folder


def write_atomic(path: str | Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary sibling (same suffix, so writers that infer the format
    from it still work), then rename it over ``path``: the old file survives any failure."""
    path = Path(path)
    if not path.parent.exists():
        raise ValueError(f"{path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
