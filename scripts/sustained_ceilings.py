"""Sustained ceilings of the GPUs in hardware_specs/, derived from aiconfigurator-core's kernel tables.

NVIDIA's aiconfigurator-core (Apache-2.0, ``pip install -e ".[aic]"``) ships single-kernel timings
measured on each of its systems; only those data files are read here. One rule per quantity,
the same on every card, so that two cards' sustained/datasheet fractions are comparable: the
estimator moves an efficiency fitted on one card to another by the ratio of the two fractions.

* ``bf16_gemm_flops_per_s``, ``fp8_gemm_flops_per_s``: the vLLM ``gemm_perf`` table (vLLM is the
  engine with a GEMM table on every system), its newest version; the rows of ``gemm_dtype``
  bfloat16, or fp8 (per-tensor scales), with m, n, k >= 4096; rate 2·m·n·k / latency; the
  ceiling is the 99th percentile of those rates (one timing should not set a card's ceiling: the
  B200's best bf16 row is 9% above the 99th percentile).
* ``hbm_bytes_per_s``: the vLLM ``scale_matrix_perf`` table, static per-tensor fp8 quantization of
  a bf16 m×k tensor (an elementwise stream: 2 bytes read and 1 written per element); rows with
  m·k >= 2^28 elements (768 MiB moved, six times the largest L2); rate 3·m·k / latency;
  99th percentile. The table's ``x-check`` column, not written anywhere, is the same statistic of
  weight-streaming bf16 GEMMs (m <= 16, n·k >= 2^27, bytes 2·k·n + 2·m·(k + n)).

Prints per GPU the datasheet peak, the sustained ceiling and their fraction. ``--yaml`` prints
the ``sustained:`` blocks; ``--write`` puts them at the end of the spec files (replacing an old
block, every other line left as it is); ``--check`` exits 1 where a file differs from the tables.

    python scripts/sustained_ceilings.py [--systems h100_sxm ...] [--yaml | --write | --check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import pandas as pd

from hisim_jax.estimator.aiconfigurator import SYSTEMS, data_root
from hisim_jax.paths import data_dir
from hisim_jax.specs import SUSTAINED_FIELDS, HardwareSpec, load_hardware

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "vllm"
QUANTILE = 0.99
GEMM_MIN_SIDE = 4096
STREAM_MIN_ELEMS = 2**28
GEMV_MAX_M, GEMV_MIN_KN = 16, 2**27
GEMM_DTYPES = {"bf16_gemm_flops_per_s": "bfloat16", "fp8_gemm_flops_per_s": "fp8"}
# our own measurements, quoted in the source as a cross-check (never used for the value)
OWN_PROFILES = {"h100-sxm": ROOT / "data" / "profiles" / "h100" / "device.json"}
SCRIPT = "scripts/sustained_ceilings.py"


@dataclass(frozen=True, slots=True)
class Ceiling:
    value: float | None  # rounded to 4 significant digits, as written; None: not measured
    source: str
    rows: int = 0


def _version_key(v: str):
    return tuple(int(x) for x in re.findall(r"\d+", v)), v


def newest_table(root: Path, system: str, family: str, stem: str) -> tuple[Path, str] | None:
    """The ENGINE table ``stem`` of ``system`` in its newest version, and that version."""
    base = root / "data" / system / family / ENGINE
    have = (
        [d.name for d in base.iterdir() if (d / f"{stem}.parquet").is_file()]
        if base.is_dir()
        else []
    )
    if not have:
        return None
    v = max(have, key=_version_key)
    return base / v / f"{stem}.parquet", v


@cache
def _gemm_table(path: Path) -> pd.DataFrame:
    cols = ["device", "kernel_source", "gemm_dtype", "m", "n", "k", "latency"]
    g = pd.read_parquet(path, columns=cols)
    return g[np.isfinite(g.latency) & (g.latency > 0)]


def rounded(x: float) -> float:
    return float(f"{x:.4g}")


def _where(root: Path, path: Path) -> str:
    return f"systems/{path.relative_to(root).as_posix()}"


def gemm_ceiling(root: Path, system: str, key: str, aic: str) -> Ceiling:
    dtype = GEMM_DTYPES[key]
    found = newest_table(root, system, "gemm", "gemm_perf")
    if found is None:
        return Ceiling(
            None, f"not measured: aiconfigurator-core {aic} has no {ENGINE} gemm table for {system}"
        )
    path, v = found
    g = _gemm_table(path)
    large = (g.m >= GEMM_MIN_SIDE) & (g.n >= GEMM_MIN_SIDE) & (g.k >= GEMM_MIN_SIDE)
    g = g[(g.gemm_dtype == dtype) & large]
    if g.empty:
        hw = load_hardware(SYSTEMS[system])
        no_fp8 = dtype == "fp8" and hw.fp8_flops_per_s == hw.bf16_flops_per_s
        why = "the part has no FP8 tensor cores, " if no_fp8 else ""
        return Ceiling(
            None,
            f"not measured: {why}no {dtype} rows in aiconfigurator-core {aic}'s {_where(root, path)}",
        )
    rate = 2.0 * g.m * g.n * g.k / (g.latency * 1e-3)  # latency in ms
    value = rounded(float(np.quantile(rate, QUANTILE)))
    best = g.loc[rate.idxmax()]
    kernels = ", ".join(sorted(g.kernel_source.unique()))
    source = (
        f"aiconfigurator-core {aic}, {_where(root, path)} ({ENGINE} {v} on {g.device.iloc[0]}): "
        f"the 99th percentile of 2mnk/latency over its {len(g)} gemm_dtype={dtype} rows with "
        f"m, n, k >= {GEMM_MIN_SIDE} (kernel {kernels}) = {value / 1e12:.1f} TFLOP/s; best row "
        f"{rate.max() / 1e12:.1f} at m={best.m} n={best.n} k={best.k}. Same rule on every card "
        f"({SCRIPT})"
    )
    return Ceiling(value, source, len(g))


def stream_ceiling(root: Path, system: str, aic: str) -> Ceiling:
    found = newest_table(root, system, "quantize", "scale_matrix_perf")
    if found is None:
        return Ceiling(
            None,
            f"not measured: aiconfigurator-core {aic} has no {ENGINE} scale_matrix_perf table "
            f"for {system} (an fp8 quantization kernel; the weight-streaming GEMMs of its gemm "
            "table are another kind of measurement, not used)",
        )
    path, v = found
    t = pd.read_parquet(path, columns=["device", "kernel_source", "m", "k", "latency"])
    t = t[(t.m * t.k >= STREAM_MIN_ELEMS) & np.isfinite(t.latency) & (t.latency > 0)]
    rate = 3.0 * t.m * t.k / (t.latency * 1e-3)
    value = rounded(float(np.quantile(rate, QUANTILE)))
    best = t.loc[rate.idxmax()]
    source = (
        f"aiconfigurator-core {aic}, {_where(root, path)} ({ENGINE} {v} on {t.device.iloc[0]}): "
        f"{t.kernel_source.iloc[0]} of a bf16 m x k tensor to fp8, bytes 3mk (2 read + 1 "
        f"written per element); the 99th percentile of bytes/latency over its {len(t)} rows "
        f"with m*k >= 2^28 = {value / 1e12:.3f} TB/s; best row {rate.max() / 1e12:.3f} at "
        f"m={best.m} k={best.k}. Same rule on every card ({SCRIPT})"
    )
    return Ceiling(value, source, len(t))


def gemv_check(root: Path, system: str) -> float | None:
    """The same statistic over weight-streaming bf16 GEMMs: a second view of HBM, not written."""
    found = newest_table(root, system, "gemm", "gemm_perf")
    if found is None:
        return None
    g = _gemm_table(found[0])
    g = g[(g.gemm_dtype == "bfloat16") & (g.m <= GEMV_MAX_M) & (g.n * g.k >= GEMV_MIN_KN)]
    if g.empty:
        return None
    rate = (2.0 * g.k * g.n + 2.0 * g.m * (g.k + g.n)) / (g.latency * 1e-3)
    return float(np.quantile(rate, QUANTILE))


def _own_check(gpu: str, key: str) -> str:
    path = OWN_PROFILES.get(gpu)
    if path is None or not path.is_file():
        return ""
    dev = json.loads(path.read_text())
    where = path.relative_to(ROOT).as_posix()
    if key == "hbm_bytes_per_s" and "d2d_copy_GBps_read_plus_write" in dev:
        rate = dev["d2d_copy_GBps_read_plus_write"] * 1e9
        return f". Cross-check, not used: our own device-to-device copy ({where}) moved {rate:.3g} B/s read + write"
    if key == "bf16_gemm_flops_per_s" and "bf16_gemm_8192_TFLOPs" in dev:
        return (
            f". Cross-check, not used: our own 8192^3 bf16 GEMM ({where}) ran at "
            f"{dev['bf16_gemm_8192_TFLOPs']:.0f} TFLOP/s (one shape, not a ceiling over shapes)"
        )
    return ""


def ceilings(system: str, root: Path, aic: str) -> dict[str, Ceiling]:
    gpu = SYSTEMS[system]
    out = {"hbm_bytes_per_s": stream_ceiling(root, system, aic)}
    for key in GEMM_DTYPES:
        out[key] = gemm_ceiling(root, system, key, aic)
    return {
        k: Ceiling(c.value, c.source + (_own_check(gpu, k) if c.value else ""), c.rows)
        for k, c in out.items()
    }


def yaml_block(found: dict[str, Ceiling]) -> str:
    lines = ["sustained:"]
    for key in SUSTAINED_FIELDS:
        c = found[key]
        assert '"' not in c.source and "\\" not in c.source, c.source
        value = "null" if c.value is None else f"{c.value:.4g}"
        lines.append(f'  {key}: {{value: {value}, source: "{c.source}"}}')
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` without its ``sustained:`` block (the line and the indented ones after it),
    with ``block`` at the end; every other line unchanged."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == "sustained:":
            skipping = True
            continue
        if skipping and line.startswith((" ", "\t")):
            continue
        skipping = False
        kept.append(line)
    body = "".join(kept)
    return body + ("" if body.endswith("\n") else "\n") + block


def peak(hw: HardwareSpec, key: str) -> float:
    return getattr(hw, SUSTAINED_FIELDS[key][1])


def table(results: dict[str, dict[str, Ceiling]], checks: dict[str, float | None]) -> str:
    units = {"hbm_bytes_per_s": ("TB/s", 1e12)} | dict.fromkeys(GEMM_DTYPES, ("TFLOP/s", 1e12))
    lines = [
        "| GPU | quantity | datasheet | sustained | fraction | rows | x-check (GEMV) |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, found in results.items():
        gpu = SYSTEMS[system]
        hw = load_hardware(gpu)
        for key, c in found.items():
            unit, scale = units[key]
            p = peak(hw, key)
            s = "—" if c.value is None else f"{c.value / scale:.4g} {unit}"
            frac = "—" if c.value is None else f"{c.value / p:.3f}"
            x = checks.get(system) if key == "hbm_bytes_per_s" else None
            xs = "" if x is None else f"{x / scale:.4g} ({x / p:.3f})"
            lines.append(
                f"| {gpu} | {key} | {p / scale:.4g} {unit} | {s} | {frac} | {c.rows} | {xs} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="+", default=None, help="aiconfigurator system names")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--yaml", action="store_true", help="print the sustained: blocks")
    mode.add_argument("--write", action="store_true", help="write them into hardware_specs/")
    mode.add_argument("--check", action="store_true", help="exit 1 where a spec file differs")
    args = ap.parse_args(argv)
    root, aic = data_root(), package_version("aiconfigurator-core")
    systems = args.systems or sorted(SYSTEMS)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {', '.join(unknown)} (choose from {', '.join(sorted(SYSTEMS))})")
    results = {s: ceilings(s, root, aic) for s in systems}
    if args.yaml:
        for system, found in results.items():
            print(f"# {SYSTEMS[system]}.yaml (aiconfigurator system {system})")
            print(yaml_block(found))
        return 0
    if args.write or args.check:
        stale = []
        for system, found in results.items():
            path = data_dir("hardware_specs") / f"{SYSTEMS[system]}.yaml"
            text = path.read_text()
            new = replace_block(text, yaml_block(found))
            if new != text:
                stale.append(path.name)
                if args.write:
                    path.write_text(new)
        verb = "rewrote" if args.write else "differ from the tables"
        print(f"{verb}: {', '.join(stale) or 'none'}")
        return 1 if args.check and stale else 0
    print(f"aiconfigurator-core {aic}, {ENGINE} tables, {QUANTILE:.0%} quantile\n")
    print(table(results, {s: gemv_check(root, s) for s in systems}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
