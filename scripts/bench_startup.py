"""Start-up time of ``hisim simulate`` on its built-in default, end to end from the shell.

Each timed run is a new process in a fresh temporary folder (``--out`` inside it), timed from
spawn to exit as ``time hisim simulate --out X`` would. Cold runs get their own empty cache
folder (``HISIM_CACHE_DIR``): everything is traced and compiled. Warm runs share one cache
folder filled by an untimed run first. Cold and warm runs alternate, so a slow phase of the
machine hits both; the medians are reported with the range. JAX's own cache variables are
removed from the environment, so only hisim's cache folder is in play. So is
``PYTHONDONTWRITEBYTECODE`` (some sandboxes set it): with it, every run recompiles hisim's own
~35 modules from source (~0.2 s on a 2-core VM), a cost a normal install never pays;
``--no-bytecode`` keeps it set to measure that case.

``--api`` times the same run through the Python API as well
(``hisim_jax.simulation.run`` + ``write_outputs`` in ``python -c``).

    python scripts/bench_startup.py [--runs 5] [--api] [--no-bytecode] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

API = (
    "import sys; from hisim_jax.simulation import SimulationOptions, run, write_outputs; "
    "write_outputs(run(SimulationOptions.checked({})), sys.argv[1])"
)


def _env(cache: Path, bytecode: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # Python's default: .pyc files cached
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HISIM_CACHE_DIR"] = str(cache)
    return env


def _command(mode: str, out: Path) -> list[str]:
    if mode == "cli":
        hisim = shutil.which("hisim")
        if hisim is None:
            raise SystemExit("bench_startup: no `hisim` on PATH (pip install -e .)")
        return [hisim, "simulate", "--out", str(out)]
    return [sys.executable, "-c", API, str(out)]


def one_run(mode: str, cache: Path, root: Path, bytecode: bool = True) -> dict:
    """Spawn one run in a fresh folder under ``root``; returns wall seconds and the run's
    own ``wall_s`` (the simulation, from summary.json)."""
    work = Path(tempfile.mkdtemp(dir=root))
    out = work / "out"
    t0 = time.perf_counter()
    proc = subprocess.run(
        _command(mode, out), cwd=work, env=_env(cache, bytecode), capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"bench_startup: {mode} run failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": wall, "simulation_s": summary.get("wall_s")}


def _stats(values: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
        "runs_s": [round(v, 2) for v in values],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="cold and warm runs each [5]")
    ap.add_argument("--api", action="store_true", help="also time the Python API")
    ap.add_argument(
        "--no-bytecode",
        action="store_true",
        help="run with PYTHONDONTWRITEBYTECODE=1 (hisim's modules compiled from source each run)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    bytecode = not args.no_bytecode

    modes = ["cli", "api"] if args.api else ["cli"]
    result: dict = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "bytecode_cache": bytecode,
    }
    with tempfile.TemporaryDirectory(prefix="hisim-startup-") as tmp:
        root = Path(tmp)
        warm_cache = root / "warm-cache"
        for mode in modes:
            one_run(mode, warm_cache, root, bytecode)  # fills the shared cache (untimed)
        times: dict = {(m, k): [] for m in modes for k in ("cold", "warm")}
        sims: dict = {m: [] for m in modes}
        for i in range(args.runs):
            for mode in modes:
                cold_cache = root / f"cold-cache-{mode}-{i}"
                cold = one_run(mode, cold_cache, root, bytecode)
                shutil.rmtree(cold_cache, ignore_errors=True)
                warm = one_run(mode, warm_cache, root, bytecode)
                times[mode, "cold"].append(cold["wall_s"])
                times[mode, "warm"].append(warm["wall_s"])
                sims[mode].append(warm["simulation_s"])
                print(
                    f"{mode} run {i + 1}/{args.runs}: cold {cold['wall_s']:.2f} s, "
                    f"warm {warm['wall_s']:.2f} s",
                    file=sys.stderr,
                )
        for mode in modes:
            result[mode] = {
                "cold": _stats(times[mode, "cold"]),
                "warm": _stats(times[mode, "warm"]),
                "warm_simulation_s_median": round(statistics.median(sims[mode]), 2),
            }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
