"""The cache folder: where it is, how it turns off, JAX's own variables, and serialized
programs that a later process loads instead of tracing and compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hisim_jax import compile_cache


def test_cache_dir_follows_hisim_and_xdg_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_ENABLE_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("HISIM_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HISIM_CACHE_DIR", "")
    assert compile_cache.cache_dir() is None
    monkeypatch.delenv("HISIM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "hisim-jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.cache_dir() == Path.home() / ".cache" / "hisim-jax"
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
    assert compile_cache.cache_dir() is None


def _fresh_process(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a new interpreter (JAX's cache settings are process-wide); it prints
    one JSON line."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "HISIM_CACHE"))}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONFIG = """
import json, jax
from hisim_jax import compile_cache
folder = compile_cache.enable()
print(json.dumps({"folder": str(folder), "jax_dir": jax.config.jax_compilation_cache_dir,
    "min_s": jax.config.jax_persistent_cache_min_compile_time_secs}))
"""


def test_jax_cache_goes_in_the_folder_unless_jax_variables_say_otherwise(tmp_path):
    got = _fresh_process(CONFIG, {"HISIM_CACHE_DIR": str(tmp_path / "c")})
    assert got["jax_dir"] == str(tmp_path / "c" / "xla")
    assert got["min_s"] == compile_cache.MIN_COMPILE_TIME_S
    theirs = {
        "HISIM_CACHE_DIR": str(tmp_path / "c"),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "theirs"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "3",
    }
    got = _fresh_process(CONFIG, theirs)
    assert got["jax_dir"] == str(tmp_path / "theirs") and got["min_s"] == 3.0
    off = _fresh_process(CONFIG, {"HISIM_CACHE_DIR": ""})
    assert off["folder"] == "None" and off["jax_dir"] is None


RUN = """
import json, sys, numpy as np
from hisim_jax import compile_cache
if sys.argv[1] == "warm":  # must load, never compile
    def refuse(*a, **k):
        raise AssertionError("compiled although the cache folder holds the program")
    compile_cache._fresh_compile = refuse
from hisim_jax import Estimator
est = Estimator("qwen2.5-1.5b", "h100-sxm")
decode = est.decode_steps_s(np.array([900, 40, 7]), 70, padded=4)
prefill = est.step_latency_s([[(0, 300), (64, 1)]])
print(json.dumps({"decode": decode.tolist(), "prefill": prefill.tolist()}))
"""


def test_a_later_process_loads_the_programs_and_gets_the_same_numbers(tmp_path):
    env = {"HISIM_CACHE_DIR": str(tmp_path / "c")}
    cold = _fresh_process(RUN.replace("sys.argv[1]", "'cold'"), env)
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "c" / "executables").iterdir())
    assert stored == ["decode", "flat"]
    warm = _fresh_process(RUN.replace("sys.argv[1]", "'warm'"), env)
    assert warm == cold  # bit for bit
    off = _fresh_process(RUN.replace("sys.argv[1]", "'cold'"), {"HISIM_CACHE_DIR": ""})
    assert off == cold


def _square(x):
    return x * x + 1.0


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A cache folder for in-process calls, without pointing this process's JAX cache at it."""
    monkeypatch.setattr(compile_cache, "enable", lambda: tmp_path)
    return tmp_path


def test_executable_is_stored_then_loaded(folder):
    args = (np.arange(4.0, dtype=np.float32),)
    first = compile_cache.executable(jax.jit(_square), args, "sq", ("v1",))
    (path,) = (folder / "executables").iterdir()
    assert path.name.startswith("sq-")
    again = compile_cache.executable(jax.jit(_square), args, "sq", ("v1",))
    np.testing.assert_array_equal(np.asarray(again(*args)), np.asarray(first(*args)))
    assert len(list((folder / "executables").iterdir())) == 1
    compile_cache.executable(jax.jit(_square), args, "sq", ("v2",))  # other parts, other file
    assert len(list((folder / "executables").iterdir())) == 2


def test_damaged_file_is_compiled_afresh_and_replaced(folder):
    args = (np.arange(3.0, dtype=np.float32),)
    compile_cache.executable(jax.jit(_square), args, "sq", ())
    (path,) = (folder / "executables").iterdir()
    path.write_bytes(path.read_bytes()[:100])
    fn = compile_cache.executable(jax.jit(_square), args, "sq", ())
    np.testing.assert_array_equal(np.asarray(fn(*args)), [1.0, 2.0, 5.0])
    assert path.stat().st_size > 100


def test_a_program_served_by_jax_cache_is_not_stored(folder, monkeypatch):
    """JAX's persistent cache hands back executables that serialize without their functions."""
    real = compile_cache._fresh_compile
    monkeypatch.setattr(compile_cache, "_fresh_compile", lambda j, a: (real(j, a)[0], False))
    args = (np.arange(3.0, dtype=np.float32),)
    fn = compile_cache.executable(jax.jit(_square), args, "sq", ())
    np.testing.assert_array_equal(np.asarray(fn(*args)), [1.0, 2.0, 5.0])
    assert not (folder / "executables").exists()


def test_program_key_depends_on_parts_and_argument_shapes():
    a = (np.zeros(4, np.float32),)
    assert compile_cache.program_key("k", (b"x",), a) == compile_cache.program_key("k", (b"x",), a)
    assert compile_cache.program_key("k", (b"x",), a) != compile_cache.program_key("k", (b"y",), a)
    b = (np.zeros(8, np.float32),)
    assert compile_cache.program_key("k", (b"x",), a) != compile_cache.program_key("k", (b"x",), b)


def test_an_unwritable_folder_costs_the_cache_not_the_call(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(compile_cache, "enable", lambda: blocker / "cache")
    args = (np.arange(3.0, dtype=np.float32),)
    fn = compile_cache.executable(jax.jit(_square), args, "sq", ())
    np.testing.assert_array_equal(np.asarray(fn(*args)), [1.0, 2.0, 5.0])


def test_executables_are_pruned_least_recently_used_first(folder, monkeypatch):
    stored = folder / "executables"
    stored.mkdir()
    for i in range(5):
        (stored / f"old-{i}.bin").write_bytes(b"x" * 400_000)
        os.utime(stored / f"old-{i}.bin", (1000 + i, 1000 + i))
    monkeypatch.setenv(compile_cache.MAX_MB_VAR, "1")
    args = (np.arange(3.0, dtype=np.float32),)
    compile_cache.executable(jax.jit(_square), args, "sq", ())
    left = sorted(p.name for p in stored.iterdir())
    assert left[:2] == ["old-3.bin", "old-4.bin"] and len(left) == 3 and left[2].startswith("sq-")
