"""Reading input files and writing outputs, with one-line errors that name the path.

Every loader reads through this module, so a missing file, a directory, a file whose folder is
a file, an unreadable, empty or undecodable file is reported the same way whatever it was
meant to hold: ``<path>: <what is wrong>``, raised as the caller's error class (``SpecError``,
``WorkloadError``, ...; all ``ValueError``). JSON and YAML documents are read strictly:
a key given twice in one mapping and a non-finite number (``NaN``, ``Infinity``, ``.inf``)
are errors naming the field, not silently the last value or a poisoned number.

Outputs: ``check_output_file`` / ``check_output_dir`` say before any work whether a path can
be written (its folder exists, is a folder and takes a new file; the path is not a folder /
not a file); ``write_atomic`` writes one file through a temporary sibling and
``write_files_atomic`` a set of files through a temporary folder beside the destination, so
a failure leaves the previous files whole. ``strict_json`` is JSON without NaN or Infinity
(``null`` where a number is undefined).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml


class FileError(ValueError):
    """A path that cannot be read or written; the message is one line naming it."""


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _parent_problem(path: Path) -> str | None:
    """Why ``path`` cannot exist because of its folders (a folder on the way is a file)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a folder"
    return None


def read_bytes(path: str | Path, what: str = "file", error: type[ValueError] = FileError) -> bytes:
    """The bytes of an input file; every way of failing is one ``error`` naming the path."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        why = _parent_problem(p)
        raise error(f"{p}: no such file" + (f" ({why})" if why else "")) from None
    except IsADirectoryError:
        raise error(f"{p}: is a directory, not a {what}") from None
    except NotADirectoryError:
        raise error(
            f"{p}: no such file ({_parent_problem(p) or 'a folder on its path is a file'})"
        ) from None
    except OSError as e:
        raise error(f"{p}: cannot read ({_why(e)})") from None


def decode(data: bytes, path: str | Path, error: type[ValueError] = FileError) -> str:
    """UTF-8 text (a byte-order mark is dropped); bad bytes are one error naming their line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        byte = data[e.start : e.start + 1].hex()
        raise error(f"{path}: line {line}: not UTF-8 text (byte 0x{byte})") from None


def read_text(
    path: str | Path, what: str = "file", error: type[ValueError] = FileError, empty_ok=False
) -> str:
    """The UTF-8 text of an input file (an empty or blank file is an error unless allowed)."""
    text = decode(read_bytes(path, what, error), path, error)
    if not empty_ok and not text.strip():
        raise error(f"{path}: empty file, expected a {what}")
    return text


# ------------------------------------------------------------------------------------------------
# strict JSON and YAML


def _finite(key: Any, value: Any, where: str, error: type[ValueError], inf_ok=()) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        if key in inf_ok and value == math.inf:
            return
        raise error(f"{where}field '{key}' must be a finite number, got {value!r}")


def loads_json(
    text: str, path: str | Path, error: type[ValueError] = FileError, inf_ok: tuple = ()
) -> Any:
    """A JSON document; duplicate keys and non-finite numbers are errors naming the field
    (``Infinity`` is allowed in the fields ``inf_ok`` names)."""

    def pairs(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in items:
            if k in out:
                raise error(f"{path}: field '{k}' is given twice")
            _finite(k, v, f"{path}: ", error, inf_ok)
            for x in v if isinstance(v, list) else ():
                _finite(k, x, f"{path}: ", error, inf_ok)
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply)") from None


def read_json(path: str | Path, what: str = "JSON file", error: type[ValueError] = FileError):
    """A JSON file, read strictly (``loads_json``)."""
    return loads_json(read_text(path, what, error), path, error)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping and non-finite numbers."""

    path = "<yaml>"
    error: type[ValueError] = FileError

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            if first is not None:
                raise self.error(
                    f"{self.path}: line {line}: field '{key}' is given twice (first on line {first})"
                )
            if value_node.tag == "tag:yaml.org,2002:float":
                at = f"{self.path}: line {value_node.start_mark.line + 1}: "
                _finite(key, self.construct_object(value_node), at, self.error)
        return super().construct_mapping(node, deep)


def loads_yaml(text: str, path: str | Path, error: type[ValueError] = FileError) -> Any:
    """A YAML document (safe subset); duplicate keys and ``.inf``/``.nan`` are errors."""
    loader = type("Loader", (_StrictLoader,), {"path": str(path), "error": error})
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}: invalid YAML{where}: {problem}") from None


def read_yaml(
    path: str | Path, what: str = "YAML file", error: type[ValueError] = FileError, empty_ok=False
):
    """A YAML file, read strictly (``loads_yaml``); a file of only comments gives None."""
    return loads_yaml(read_text(path, what, error, empty_ok), path, error)


def read_csv(
    path: str | Path, what: str = "CSV file", error: type[ValueError] = FileError, **pandas_kw
):
    """A CSV file with a header line as a pandas DataFrame; a column named twice is an error."""
    import pandas as pd

    text = read_text(path, what, error)
    try:
        header = next(csv.reader(io.StringIO(text)))
    except (csv.Error, StopIteration) as e:
        raise error(f"{path}: line 1: not a readable CSV header ({e})") from None
    names = [h.strip() for h in header]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise error(f"{path}: line 1: column '{dup}' is given twice")
    try:
        return pd.read_csv(io.StringIO(text), **pandas_kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise error(f"{path}: not a readable CSV ({msg})") from None


# ------------------------------------------------------------------------------------------------
# outputs


def _probe_writable(folder: Path, target: Path, error: type[ValueError]) -> None:
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".hisim-check-")
    except OSError as e:
        raise error(f"{target}: cannot write in {folder} ({_why(e)})") from None
    os.close(fd)
    os.unlink(name)


def _file_target_problem(p: Path) -> str | None:
    """Why ``p`` cannot be written as a file: it is a folder, or its folder is missing or a
    file (None if neither)."""
    if p.is_dir():
        return f"{p}: is a directory, not a file"
    if not p.parent.is_dir():
        why = _parent_problem(p)
        return f"{p}: {why}" if why else f"{p}: directory {p.parent} does not exist"
    return None


def check_output_file(path: str | Path, error: type[ValueError] = FileError) -> Path:
    """Fail now, before any work, if ``path`` cannot be written as a file: it is a folder, or
    its folder is missing, a file, or does not take new files."""
    p = Path(path)
    if why := _file_target_problem(p):
        raise error(why)
    _probe_writable(p.parent, p, error)
    return p


def check_output_dir(path: str | Path, error: type[ValueError] = FileError) -> Path:
    """Fail now, before any work, if ``path`` cannot be the output folder: it is a file, a
    folder above it is a file, or the nearest existing folder does not take new files.
    Nothing is created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise error(f"{p}: exists and is not a folder")
    if not p.exists():
        why = _parent_problem(p)
        if why:
            raise error(f"{p}: {why}")
    existing = next((q for q in (p, *p.parents) if q.is_dir()), Path("."))
    _probe_writable(existing, p, error)
    return p


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling (same suffix, so writers that infer the format
    from it still work), then rename it over ``path``: the old file survives any failure."""
    path = Path(path)
    if why := _file_target_problem(path):
        raise FileError(why)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as e:
        raise FileError(f"{path}: cannot write ({_why(e)})") from None
    finally:
        if tmp.exists() and not tmp.is_dir():
            tmp.unlink()
    return path


def write_files_atomic(
    out_dir: str | Path, writers: Mapping[str, Callable[[Path], Any]]
) -> list[Path]:
    """Write every ``name -> write(path)`` into a temporary folder beside ``out_dir``, then move
    them into ``out_dir`` (created if needed). If any write fails, ``out_dir`` is untouched;
    if a move fails, the files already moved are put back: the previous set stays whole."""
    out = Path(out_dir)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    try:  # beside the folder, on the same filesystem (so the moves are renames)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError:  # a parent that takes no new folder: stage inside the output folder
        try:
            stage = Path(tempfile.mkdtemp(dir=out, prefix=".hisim-tmp-"))
        except OSError as e:
            raise FileError(f"{out}: cannot write ({_why(e)})") from None
    try:
        try:
            for name, write in writers.items():
                write(stage / name)
        except OSError as e:
            raise FileError(
                f"{out}: cannot write {name} ({_why(e)}); nothing was replaced"
            ) from None
        old = stage / ".old"
        old.mkdir()
        moved: list[str] = []
        try:
            for name in writers:
                if (out / name).exists():
                    os.replace(out / name, old / name)
                os.replace(stage / name, out / name)
                moved.append(name)
        except OSError as e:
            for name in writers:  # put the previous files back
                if (old / name).exists():
                    os.replace(old / name, out / name)
                elif name in moved:
                    (out / name).unlink(missing_ok=True)
            raise FileError(
                f"{out}: cannot replace {name} ({_why(e)}); kept the previous files"
            ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [out / name for name in writers]


# ------------------------------------------------------------------------------------------------
# strict JSON out


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf, NumPy's too) replaced by None and NumPy
    scalars made plain numbers."""
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def plain(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds, for messages (``inf``, not
    ``np.float64(inf)``); anything else unchanged."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "ndim", None) == 0 else value


def strict_json(obj: Any, **dumps_kw) -> str:
    """JSON text of ``obj`` with no NaN or Infinity: undefined numbers are ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **dumps_kw)
