"""Compiled estimator programs kept across runs, so a repeated ``hisim`` command or script
neither traces, lowers nor compiles what an earlier run already built.

Two caches share one folder (``HISIM_CACHE_DIR``, default ``$XDG_CACHE_HOME/hisim-jax`` or
``~/.cache/hisim-jax``; an empty value turns both off):

* ``executables/``: the simulator's jitted programs (single-batch and decode-stretch calls with
  an Estimator's parameters, model and GPU baked in), serialized after their first compile and
  loaded on a later run without tracing or lowering. A program's file is named by a hash of
  everything that sets it: the estimator's source, the baked values, the argument shapes and
  dtypes, JAX/jaxlib versions, ``XLA_FLAGS``, x64 and the CPU's features.
  The folder is kept under ``HISIM_CACHE_MAX_MB`` (default 1024), least recently used first.
* ``xla/``: JAX's persistent compilation cache, for every other jitted call — unless the user
  set JAX's own ``JAX_COMPILATION_CACHE_DIR`` (or ``jax_compilation_cache_dir``), which is then
  used as it is. ``JAX_ENABLE_COMPILATION_CACHE=false`` turns off both caches.

The executables are pickles (``jax.experimental.serialize_executable``): loading one can run
code, so the folder must be the user's own (it is created with mode 0700).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from pathlib import Path

ENV_VAR = "HISIM_CACHE_DIR"
# The executables folder is pruned to this many MB, least recently used first.
MAX_MB_VAR = "HISIM_CACHE_MAX_MB"
DEFAULT_MAX_MB = 1024
# compiles faster than this stay out of JAX's own cache (unless the user set JAX's variable)
MIN_COMPILE_TIME_S = 0.2
_FORMAT = b"hisim-executable-1\n"


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off (``HISIM_CACHE_DIR=""``, or JAX's
    compilation cache turned off by ``JAX_ENABLE_COMPILATION_CACHE=false``)."""
    if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false", "no"):
        return None
    if ENV_VAR in os.environ:
        value = os.environ[ENV_VAR]
        return Path(value).expanduser() if value else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hisim-jax"


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at ``<cache>/xla`` unless the user configured
    JAX's own; returns the cache folder (None when off). Cheap and idempotent: when JAX is not
    imported yet nothing is loaded here, and the Estimator calls this again before compiling."""
    folder = cache_dir()
    if folder is None or "jax" not in sys.modules:
        return folder
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    if (
        "JAX_COMPILATION_CACHE_DIR" not in os.environ
        and jax.config.jax_compilation_cache_dir is None
    ):
        jax.config.update("jax_compilation_cache_dir", str(folder / "xla"))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return folder


@functools.cache
def _source_digest() -> str:
    """Hash of the estimator's source files: the code a baked program is traced from."""
    root = Path(__file__).resolve().parent / "estimator"
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _cpu_features() -> str:
    """XLA compiles for the host CPU's instruction set: a cache folder shared by machines of
    different CPUs must not hand one machine's code to another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def program_key(name: str, parts: tuple, args) -> str:
    """A file name for the program ``name`` set by ``parts`` (hashable values whose ``repr``
    is stable) and called on ``args`` (arrays: shapes and dtypes count)."""
    import jax
    import jaxlib

    h = hashlib.sha256()
    for item in (
        name,
        _source_digest(),
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        os.environ.get("XLA_FLAGS", ""),
        bool(jax.config.jax_enable_x64),
        _cpu_features(),
        *(f"{a.shape}{a.dtype}" for a in args),
    ):
        h.update(repr(item).encode() + b"\0")
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return f"{name}-{h.hexdigest()[:32]}"


def _write(path: Path, data: bytes) -> None:
    """Write through a temporary name and rename: a concurrent reader sees all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk costs the cache, never the run
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return
    _prune(path.parent)


def _prune(folder: Path) -> None:
    """Keep the executables under ``HISIM_CACHE_MAX_MB`` (default 1024): a search over many
    models, GPUs and calibrations stores a program of ~50-130 kB for each. Least recently used
    go first (a load touches its file's mtime); the cost is one stat per file per write."""
    try:
        limit = float(os.environ.get(MAX_MB_VAR, DEFAULT_MAX_MB)) * 1e6
    except ValueError:
        limit = DEFAULT_MAX_MB * 1e6
    try:
        files = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(folder)]
    except OSError:
        return
    total = sum(size for _, size, _ in files)
    for _, size, name in sorted(files):
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            os.unlink(name)
            total -= size


def executable(jitted, args, name: str, parts: tuple):
    """``jitted`` compiled for ``args``: loaded from the cache folder when an earlier run
    stored it, else traced, lowered, compiled and stored. The result is called like
    ``jitted`` on arrays of the same shapes and dtypes."""
    folder = enable()
    path = None
    if folder is not None:
        path = folder / "executables" / (program_key(name, parts, args) + ".bin")
        loaded = _load(path, args)
        if loaded is not None:
            return loaded
    compiled, fresh = _fresh_compile(jitted, args)
    # An executable JAX loaded from its own persistent cache serializes without its compiled
    # functions (a later run's call fails with "Function ... not found"): store fresh ones only.
    if path is not None and fresh:
        from jax.experimental import serialize_executable

        try:
            blob, _, _ = serialize_executable.serialize(compiled)
        except (ValueError, NotImplementedError):  # a backend without serialization
            return compiled
        _write(path, _FORMAT + blob)
    return compiled


_HITS = [0]  # JAX persistent-cache hits seen by this process


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _HITS[0] += 1


@functools.cache
def _listen() -> None:
    import jax.monitoring

    jax.monitoring.register_event_listener(_count_hit)


def _fresh_compile(jitted, args):
    """Compile ``jitted`` for ``args``, keeping JAX's persistent cache out of it: JAX is told
    not to store this program (its minimum compile time raised for the call), so it cannot
    hand back a cached copy on a later run either. Returns (compiled, whether no cache hit
    served it) — a hit is still possible from an entry stored by other means."""
    _listen()
    lowered = jitted.lower(*args)
    hits = _HITS[0]
    try:
        from jax._src import config as jax_config

        no_store = jax_config.persistent_cache_min_compile_time_secs(float("inf"))
    except (ImportError, AttributeError, TypeError):  # a JAX without that state
        no_store = contextlib.nullcontext()
    with no_store:
        compiled = lowered.compile()
    return compiled, _HITS[0] == hits


def _load(path: Path, args):
    try:
        data = path.read_bytes()
    except OSError:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: pruned last
    if not data.startswith(_FORMAT):
        return None
    import jax
    from jax.experimental import serialize_executable

    try:
        return serialize_executable.deserialize_and_load(
            data[len(_FORMAT) :],
            jax.tree.structure((tuple(args), {})),
            jax.tree.structure(0),
        )
    except Exception:  # noqa: BLE001 - a stale or damaged file: compile afresh and replace it
        return None
