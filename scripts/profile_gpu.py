"""Profile your own GPU with PyTorch: writes a profiles folder in the format of
``data/profiles/h100`` (see ``data/profiles/README.md``) that ``hisim calibrate`` fits.

    pip install torch                 # a CUDA build; flash-attn optional (pip install flash-attn)
    python scripts/profile_gpu.py --model qwen2.5-1.5b --out profiles/my-gpu
    python scripts/profile_gpu.py --model llama-3.1-8b,qwen2.5-1.5b --out profiles/my-gpu --quick
    hisim calibrate --profiles profiles/my-gpu --hardware <gpu> --out my-gpu.json

What it measures (``--what``, default all four):

* ``gemm``       ``gemm.csv``: ``F.linear(x[m,k], w[n,k])`` in ``--dtype`` for the model's qkv,
                 o, gate_up, down and lm_head shapes over a grid of m (token counts), and fp8 e4m3
                 ``torch._scaled_mm`` (per-tensor scales, bf16 out, m rounded up to 16) for the
                 projections where the GPU has fp8 tensor cores (compute capability >= 8.9);
* ``attention``  ``attention.csv``: one varlen causal attention forward (bottom-right aligned, so
                 each new token sees its whole cached prefix) per batch ``[[cache_len, new_len],
                 ...]``: decode, prefill and prefix-cached prefill batches over grids of context
                 length and batch size, plus mixed batches. The kernel is ``flash_attn``
                 (flash-attn's varlen function) when installed, else ``aten_flash`` (PyTorch's
                 bundled FlashAttention-2, the kernel of the shipped H100 profiles), else
                 ``sdpa`` (one ``scaled_dot_product_attention`` call per request); the ``kernel``
                 column says which;
* ``steps``      ``steps.csv``: whole forward steps of heterogeneous batches of a Llama-style
                 decoder built from the model's config.json with random weights (nothing is
                 downloaded) over a packed KV cache, each step captured once as a CUDA graph and
                 replayed (median of ``--repeats`` after ``--warmup``, CUDA events), as serving
                 engines run decode; ``--eager`` adds eager timings of the same steps
                 (``eager_ms`` columns, which ``hisim calibrate`` ignores);
* ``device``     ``device.json`` and ``pcie.csv``: device-to-device copy ceiling (read + write
                 bytes), an 8192^3 GEMM, four large GEMMs (m, n, k >= 4096) in ``--dtype`` and
                 fp8, pinned host<->device copies 1 MiB to 1 GiB; and ``sustained.yaml``, the
                 ``sustained:`` block of the GPU's hardware spec built from those ceilings.

Eager single-kernel tables (gemm, attention) carry a launch floor; the calibration fits it.
``meta.json`` records the device, software, options and anything skipped (a batch that ran out
of memory is skipped, not fatal); ``plan.json`` lists every shape and batch timed.

``--dry-run`` needs no GPU: with torch installed it runs every measurement path on the CPU at a
tiny grid on a miniature of the model (CUDA graphs and events skipped, ``perf_counter``
timings, ``meta.json`` says ``device: cpu-dry-run``); without torch (or with ``--plan-only``) it
writes the plan of the GPU run these options ask for, and the CSVs with their timing columns
empty. Files are written to a temporary name and renamed; bad options end with one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from hisim_jax.specs import SpecError, load_model
except ImportError:  # run from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hisim_jax.specs import SpecError, load_model

SECTIONS = ("gemm", "attention", "steps", "device")
DTYPES = ("bf16", "fp16")
KERNELS = ("auto", "flash_attn", "aten_flash", "sdpa")
GEMM_COLUMNS = ("model", "op", "dtype", "m", "k", "n", "ms", "ms_min", "ms_max")
ATTN_COLUMNS = (
    "nq",
    "nkv",
    "d",
    "batch",
    "n_req",
    "new_tokens",
    "kv_tokens",
    "ms",
    "ms_min",
    "ms_max",
    "kind",
    "kernel",
)
STEPS_COLUMNS = (
    "model",
    "kind",
    "n_req",
    "new_tokens",
    "kv_tokens",
    "step_ms",
    "step_ms_min",
    "step_ms_max",
    "batch",
    "timing",
)
EAGER_COLUMNS = ("eager_ms", "eager_ms_min", "eager_ms_max")
PCIE_COLUMNS = ("MiB", "h2d_ms", "d2h_ms", "h2d_GBps", "d2h_GBps")
MiB = 1 << 20

Batch = list[tuple[int, int]]


class OptionError(ValueError):
    """A bad option or environment: one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# what is measured: grids, model shapes, the plan


@dataclass(frozen=True, slots=True)
class Grid:
    """Every size a run times; ``full`` mirrors the shipped H100 profiles."""

    gemm_m: tuple[int, ...]
    lm_head_m_max: int
    attn_decode_batch: tuple[int, ...]
    attn_decode_ctx: tuple[int, ...]
    attn_prefill_new: tuple[int, ...]
    attn_prefill_cache: tuple[int, ...]
    attn_mixed: int
    step_decode_batch: tuple[int, ...]
    step_decode_ctx: tuple[int, ...]
    step_decode_mixed: tuple[int, ...]  # request counts of the mixed-context decode batches
    step_prefill: tuple[int, ...]
    step_prefill_cached: tuple[tuple[int, int], ...]
    step_prefill_multi: int
    step_mixed: int
    ctx_range: tuple[int, int]  # log-uniform contexts of random decodes
    chunk_new: tuple[int, ...]  # prefill chunk sizes of mixed batches
    chunk_cache_max: int
    mixed_decodes: tuple[int, ...]
    multi_new_range: tuple[int, int]
    copy_mib: int
    device_gemm_n: int
    pcie_mib: tuple[int, ...]


GRIDS = {
    "full": Grid(
        gemm_m=(1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
        + (3072, 4096, 6144, 8192, 12288, 16384),
        lm_head_m_max=1024,
        attn_decode_batch=(1, 4, 16, 64, 256),
        attn_decode_ctx=(128, 1024, 4096, 16384),
        attn_prefill_new=(128, 512, 2048, 8192),
        attn_prefill_cache=(0, 2048, 16384),
        attn_mixed=12,
        step_decode_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        step_decode_ctx=(256, 2048, 8192),
        step_decode_mixed=(1, 6, 11, 25, 29, 39, 43, 52, 60, 82, 97, 118),
        step_prefill=(32, 128, 512, 1024, 2048, 4096, 8192),
        step_prefill_cached=(
            (256, 128),
            (2048, 128),
            (16384, 32),
            (1024, 512),
            (8192, 512),
            (2048, 2048),
            (8192, 2048),
            (1536, 4096),
            (16384, 4096),
        ),
        step_prefill_multi=10,
        step_mixed=20,
        ctx_range=(16, 16384),
        chunk_new=(256, 512, 1024, 2048, 4096),
        chunk_cache_max=8192,
        mixed_decodes=(1, 2, 8, 16, 32, 64, 128),
        multi_new_range=(32, 2048),
        copy_mib=1024,
        device_gemm_n=8192,
        pcie_mib=(1, 4, 16, 64, 256, 1024),
    ),
    "quick": Grid(
        gemm_m=(1, 8, 64, 256, 1024, 4096, 16384),
        lm_head_m_max=1024,
        attn_decode_batch=(1, 16, 128),
        attn_decode_ctx=(1024, 8192),
        attn_prefill_new=(512, 4096),
        attn_prefill_cache=(0, 4096),
        attn_mixed=3,
        step_decode_batch=(1, 8, 64),
        step_decode_ctx=(256, 4096),
        step_decode_mixed=(8, 32, 96),
        step_prefill=(128, 1024, 4096),
        step_prefill_cached=((2048, 128), (4096, 512), (8192, 2048)),
        step_prefill_multi=2,
        step_mixed=4,
        ctx_range=(16, 16384),
        chunk_new=(256, 1024, 4096),
        chunk_cache_max=8192,
        mixed_decodes=(8, 32, 128),
        multi_new_range=(32, 2048),
        copy_mib=256,
        device_gemm_n=8192,
        pcie_mib=(1, 16, 256),
    ),
    # --dry-run on a CPU: every path once, in well under a second of compute
    "tiny": Grid(
        gemm_m=(1, 8, 32),
        lm_head_m_max=8,
        attn_decode_batch=(1, 3),
        attn_decode_ctx=(8,),
        attn_prefill_new=(8, 1024),  # 1024: above read_attention's eager floor on a CPU
        attn_prefill_cache=(0, 8),
        attn_mixed=1,
        step_decode_batch=(1, 3),
        step_decode_ctx=(8,),
        step_decode_mixed=(3,),
        step_prefill=(8,),
        step_prefill_cached=((8, 4),),
        step_prefill_multi=1,
        step_mixed=1,
        ctx_range=(4, 32),
        chunk_new=(8,),
        chunk_cache_max=16,
        mixed_decodes=(2,),
        multi_new_range=(2, 8),
        copy_mib=4,
        device_gemm_n=128,
        pcie_mib=(1, 4),
    ),
}


@dataclass(frozen=True, slots=True)
class Arch:
    """The shapes of one Llama-style decoder (what the profiler builds and times)."""

    name: str  # the ``model`` column: a models/ stem, or the config's path
    layers: int
    hidden: int
    nq: int
    nkv: int
    d: int
    inter: int
    vocab: int
    qkv_bias: bool = False
    qk_norm: bool = False
    tie: bool = False
    window: int = 0  # sliding window in tokens, 0 = full attention

    def gemm_shapes(self) -> dict[str, tuple[int, int]]:
        """op -> (k, n) of ``x[m,k] @ w[n,k].T``."""
        h, d = self.hidden, self.d
        return {
            "qkv": (h, (self.nq + 2 * self.nkv) * d),
            "o": (self.nq * d, h),
            "gate_up": (h, 2 * self.inter),
            "down": (self.inter, h),
            "lm_head": (h, self.vocab),
        }

    def kv_bytes_per_token(self, elem_bytes: int = 2) -> int:
        return 2 * self.layers * self.nkv * self.d * elem_bytes


def arch_of(model: str) -> Arch:
    """The dense Llama-style shapes of a models/ stem or config.json path; OptionError if not."""
    try:
        spec = load_model(model)
    except SpecError as e:
        raise OptionError(f"options: field '--model': {e}") from None
    if spec.is_moe:
        raise OptionError(
            f"options: field '--model': {model!r} is a mixture-of-experts model; "
            "the step profiler builds dense Llama-style decoders only"
        )
    p = Path(model)
    name = model if not (p.suffix == ".json" and p.exists()) else str(p.resolve())
    return Arch(
        name=name,
        layers=spec.num_layers,
        hidden=spec.hidden_size,
        nq=spec.num_heads,
        nkv=spec.num_kv_heads,
        d=spec.head_dim,
        inter=spec.intermediate_size,
        vocab=spec.vocab_size,
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        tie=spec.tie_word_embeddings,
        window=spec.sliding_window or 0,
    )


def miniature(a: Arch) -> Arch:
    """A CPU-sized copy of ``a`` for --dry-run: same layer structure (GQA, bias, QK-norm), tiny
    widths, two layers; the ``model`` column keeps the real name so the readers load it."""
    nkv = min(a.nkv, 2)
    nq = nkv * max(1, min(a.nq // a.nkv, 8))
    return dataclasses.replace(
        a, layers=min(a.layers, 2), hidden=64, nq=nq, nkv=nkv, d=16, inter=128, vocab=512
    )


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _cap_kv(batch: Batch, max_kv: int, keep_first: int = 0) -> Batch:
    """Drop the longest decodes (never the first ``keep_first`` rows) until the KV fits."""
    batch = list(batch)
    while sum(c + n for c, n in batch) > max_kv and len(batch) > max(1, keep_first):
        i = max(range(keep_first, len(batch)), key=lambda j: batch[j][0])
        batch.pop(i)
    return batch


def attention_batches(g: Grid, rng: random.Random) -> list[tuple[str, Batch]]:
    out: list[tuple[str, Batch]] = []
    for b in g.attn_decode_batch:
        for c in g.attn_decode_ctx:
            out.append(("decode_uniform", [(c, 1)] * b))
    for n in g.attn_prefill_new:
        for c in g.attn_prefill_cache:
            out.append(("prefill" if c == 0 else "prefill_cached", [(c, n)]))
    for _ in range(g.attn_mixed):
        dec = [(_log_uniform(rng, *g.ctx_range), 1) for _ in range(rng.choice(g.mixed_decodes))]
        chunk = (rng.randint(1, g.chunk_cache_max), rng.choice(g.chunk_new))
        out.append(("mixed", dec + [chunk]))
    return out


def step_batches(g: Grid, max_kv: int, rng: random.Random) -> list[tuple[str, Batch]]:
    out: list[tuple[str, Batch]] = []
    for b in g.step_decode_batch:
        for c in g.step_decode_ctx:
            if b * (c + 1) <= max_kv:
                out.append(("decode_uniform", [(c, 1)] * b))
    for b in g.step_decode_mixed:
        dec = [(_log_uniform(rng, *g.ctx_range), 1) for _ in range(b)]
        out.append(("decode_mixed", _cap_kv(dec, max_kv)))
    for n in g.step_prefill:
        out.append(("prefill", [(0, n)]))
    for c, n in g.step_prefill_cached:
        if c + n <= max_kv:
            out.append(("prefill_cached", [(c, n)]))
    for _ in range(g.step_prefill_multi):
        reqs = []
        for _ in range(rng.randint(2, 8)):
            cached = _log_uniform(rng, 2 * g.multi_new_range[0], 2 * g.multi_new_range[1])
            reqs.append(
                (cached if rng.random() < 0.3 else 0, _log_uniform(rng, *g.multi_new_range))
            )
        out.append(("prefill_multi", _cap_kv(reqs, max_kv)))
    for _ in range(g.step_mixed):
        chunk_cache = 0 if rng.random() < 0.3 else _log_uniform(rng, 4, g.chunk_cache_max)
        chunk = (chunk_cache, rng.choice(g.chunk_new))
        dec = [(_log_uniform(rng, *g.ctx_range), 1) for _ in range(rng.choice(g.mixed_decodes))]
        out.append(("mixed", _cap_kv([chunk] + dec, max_kv, keep_first=1)))
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    gemm: list[dict]
    attention: list[dict]
    steps: list[dict]
    device: dict

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def make_plan(archs: list[Arch], grid: Grid, dtype: str, fp8: bool, max_kv: int, seed: int):
    gemm = []
    for a in archs:
        for op, (k, n) in a.gemm_shapes().items():
            ms = [m for m in grid.gemm_m if op != "lm_head" or m <= grid.lm_head_m_max]
            gemm += [
                {"model": a.name, "op": op, "dtype": dtype, "m": m, "k": k, "n": n} for m in ms
            ]
            if fp8 and op != "lm_head":
                for m in sorted({-(-m // 16) * 16 for m in ms}):  # _scaled_mm: m % 16 == 0
                    gemm.append({"model": a.name, "op": op, "dtype": "fp8", "m": m, "k": k, "n": n})
    rng = random.Random(seed)
    attention, seen = [], set()
    for a in archs:
        if (a.nq, a.nkv, a.d) in seen:
            continue
        seen.add((a.nq, a.nkv, a.d))
        for kind, b in attention_batches(grid, rng):
            attention.append({"nq": a.nq, "nkv": a.nkv, "d": a.d, "kind": kind, "batch": b})
    steps = []
    for a in archs:
        for kind, b in step_batches(grid, max_kv, rng):
            steps.append({"model": a.name, "kind": kind, "batch": b})
    device = {
        "copy_MiB": grid.copy_mib,
        "gemm_n": grid.device_gemm_n,
        "sustained_gemm_mnk": sustained_shapes(grid.device_gemm_n),
        "pcie_MiB": grid.pcie_mib,
    }
    return Plan(gemm, attention, steps, device)


def sustained_shapes(n: int) -> list[list[int]]:
    """The large GEMMs whose best rate is the ``sustained:`` GEMM ceiling: at the full grid's
    n = 8192 every m, n, k >= 4096, the rows ``scripts/sustained_ceilings.py`` takes from the
    aiconfigurator tables, so a measured card and a table card get the same rule."""
    h = max(n // 2, 1)
    return [[h, h, h], [n, n, n], [n, 2 * n, h], [2 * n, n, n]]


def run_sustained_gemm(torch, dev, timer: Timer, plan: Plan, dtype, dtype_name: str) -> list:
    """``{dtype, m, n, k, ms, TFLOPs}`` for each large shape, in ``--dtype`` and, where the GPU
    has fp8 tensor cores, per-tensor fp8 ``_scaled_mm`` (the kernel of the gemm section)."""
    dtypes = [dtype_name] + (["fp8"] if fp8_supported(torch, dev) else [])
    rows = []
    for m, n, k in plan.device["sustained_gemm_mnk"]:
        for name in dtypes:
            a = torch.randn(m, k, device=dev, dtype=dtype)
            b = torch.randn(n, k, device=dev, dtype=dtype)
            if name == "fp8":
                a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
            ms, _, _ = timer.eager(gemm_call(torch, a, b, name == "fp8"))
            tflops = 2 * m * n * k / (max(ms, 1e-9) * 1e-3) / 1e12
            rows.append({"dtype": name, "m": m, "n": n, "k": k, "ms": _num(ms), "TFLOPs": tflops})
            a = b = None
    return rows


def sustained_yaml(device: dict, when: str) -> str:
    """The ``sustained:`` block of a hardware spec (each key a
    ``{value, source}``) from ``device.json``: the copy ceiling as ``hbm_bytes_per_s`` (read +
    write bytes, as the spec defines it) and the best of the large GEMMs per dtype. Keys this run
    did not measure (fp16 instead of bf16, no fp8 tensor cores) are left out; paste the block
    into the GPU's spec, where hisim checks each value against its datasheet peak."""
    where = (
        f"scripts/profile_gpu.py on {device.get('device')} ({when}, torch {device.get('torch')})"
    )
    entries = [
        (
            "hbm_bytes_per_s",
            device["d2d_copy_GBps_read_plus_write"] * 1e9,
            f"{where}: device-to-device copy of {device['copy_MiB']} MiB, read + write "
            "bytes over the median time",
        )
    ]
    for name in ("bf16", "fp8"):
        rows = [r for r in device.get("sustained_gemm", []) if r["dtype"] == name]
        if rows:
            best = max(rows, key=lambda r: r["TFLOPs"])
            shapes = ", ".join("{m}x{n}x{k}".format(**r) for r in rows)
            entries.append(
                (
                    f"{name}_gemm_flops_per_s",
                    best["TFLOPs"] * 1e12,
                    f"{where}: the best 2mnk/time of {len(rows)} {name} GEMMs "
                    f"(m x n x k {shapes}), best at {best['m']}x{best['n']}x{best['k']}",
                )
            )
    lines = ["sustained:"]
    for key, value, source in entries:
        # a JSON string is a YAML double-quoted scalar
        lines.append(f"  {key}: {{value: {value:.4g}, source: {json.dumps(source)}}}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# files


def batch_text(batch: Batch) -> str:
    return json.dumps([[int(c), int(n)] for c, n in batch], separators=(",", ":"))


def batch_counts(batch: Batch) -> dict:
    return {
        "n_req": len(batch),
        "new_tokens": sum(n for _, n in batch),
        "kv_tokens": sum(c + n for c, n in batch),
    }


def _num(v):
    """Six significant digits (a CPU dry-run's microsecond timings must not round to 0)."""
    return "" if v is None else float(f"{v:.6g}")


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the profiles from others
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r.get(c, "") for c in columns])
    write_atomic(path, buf.getvalue())


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# options


def _int(text: str, field: str, lo: int) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < lo:
        raise OptionError(f"options: field '{field}' must be an integer >= {lo}, got {text!r}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise OptionError(f"options: {message}")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="profile_gpu.py",
        description="Profile a GPU into a hisim profiles folder (gemm/attention/steps/device).",
    )
    p.add_argument(
        "--model",
        default="qwen2.5-1.5b",
        help="models/ stem(s) or config.json path(s), comma-separated",
    )
    p.add_argument("--out", required=True, help="output folder (created; files in it replaced)")
    p.add_argument("--repeats", default="7", help="timed runs per measurement (median, min, max)")
    p.add_argument("--warmup", default="2", help="untimed runs before timing")
    p.add_argument(
        "--quick", action="store_true", help="a small grid (minutes, not tens of minutes)"
    )
    p.add_argument("--dtype", default="bf16", help="activation/weight dtype: bf16 or fp16")
    p.add_argument(
        "--what", default=",".join(SECTIONS), help="comma list of gemm,attention,steps,device"
    )
    p.add_argument("--attention", default="auto", help="kernel: auto, flash_attn, aten_flash, sdpa")
    p.add_argument("--no-fp8", action="store_true", help="skip the fp8 GEMMs")
    p.add_argument("--eager", action="store_true", help="also time every step eagerly")
    p.add_argument(
        "--max-kv-tokens", default="262144", help="cap on KV tokens of one step (memory)"
    )
    p.add_argument("--seed", default="0", help="seed of the random batches")
    p.add_argument(
        "--dry-run", action="store_true", help="no GPU: tiny CPU run, or the plan without torch"
    )
    p.add_argument(
        "--plan-only", action="store_true", help="write the plan and empty tables, time nothing"
    )
    a = p.parse_args(argv)
    a.repeats = _int(a.repeats, "--repeats", 1)
    a.warmup = _int(a.warmup, "--warmup", 0)
    a.max_kv_tokens = _int(a.max_kv_tokens, "--max-kv-tokens", 1)
    a.seed = _int(a.seed, "--seed", 0)
    if a.dtype not in DTYPES:
        raise OptionError(
            f"options: field '--dtype' must be one of {', '.join(DTYPES)}, got {a.dtype!r}"
        )
    if a.attention not in KERNELS:
        raise OptionError(
            f"options: field '--attention' must be one of {', '.join(KERNELS)}, got {a.attention!r}"
        )
    what = [w.strip() for w in a.what.split(",") if w.strip()]
    bad = [w for w in what if w not in SECTIONS]
    if bad or not what:
        raise OptionError(
            f"options: field '--what' takes a comma list of {', '.join(SECTIONS)}, got {a.what!r}"
        )
    a.what = [s for s in SECTIONS if s in what]
    models = [m.strip() for m in a.model.split(",") if m.strip()]
    if not models:
        raise OptionError(f"options: field '--model' names no model, got {a.model!r}")
    a.archs = [arch_of(m) for m in dict.fromkeys(models)]
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"options: field '--out' exists and is not a directory: {a.out!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(
            f"options: field '--out' cannot be created: {a.out!r} ({e.strerror})"
        ) from None
    if not os.access(out, os.W_OK):
        raise OptionError(f"options: field '--out' is not writable: {a.out!r}")
    a.out = out
    return a


# ------------------------------------------------------------------------------------------------
# timing (torch imported lazily: the repository does not depend on it)


class Timer:
    """Median/min/max milliseconds of ``repeats`` runs after ``warmup``: CUDA events on a GPU,
    ``perf_counter`` on a CPU (dry run)."""

    def __init__(self, torch, cuda: bool, repeats: int, warmup: int):
        self.torch, self.cuda, self.repeats, self.warmup = torch, cuda, repeats, warmup

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def eager(self, fn) -> tuple[float, float, float]:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), max(times)

    def graph(self, fn) -> tuple[float, float, float]:
        """Capture ``fn`` once as a CUDA graph (after eager warm-up on a side stream, which
        lets cuBLAS and the attention kernel allocate their workspaces), time its replays."""
        if not self.cuda:
            return self.eager(fn)
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        try:
            return self.eager(graph.replay)
        finally:
            del graph


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _dtype(torch, name: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def fp8_supported(torch, dev) -> bool:
    """fp8 e4m3 ``_scaled_mm`` works here (capability >= 8.9 on a GPU; a probe on a CPU)."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        return False
    try:
        a = torch.zeros(16, 32, device=dev).to(torch.float8_e4m3fn)
        b = torch.zeros(16, 32, device=dev).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=dev)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except Exception:  # noqa: BLE001 - any failure means: no fp8 here
        return False
    return True


# ------------------------------------------------------------------------------------------------
# attention: one varlen causal forward over a packed KV, three kernels


@dataclass
class Varlen:
    """A batch laid out for varlen attention: queries packed ``[T, nq, d]``, keys and values
    packed ``[K, nkv, d]`` with request i's ``c_i + n_i`` keys at ``cu_k[i]``."""

    batch: Batch
    cu_q: object  # int32 [R + 1]
    cu_k: object  # int32 [R + 1]
    max_q: int
    max_k: int
    q_off: list[int]
    k_off: list[int]
    masks: list  # per request: None (plain causal or no mask) or a bottom-right bool mask


def varlen_layout(torch, batch: Batch, dev) -> Varlen:
    q_off, k_off = [0], [0]
    for c, n in batch:
        q_off.append(q_off[-1] + n)
        k_off.append(k_off[-1] + c + n)
    masks = []
    for c, n in batch:
        if n == 1 or c == 0:
            masks.append(None)  # decode: no mask; no prefix: top-left == bottom-right causal
        else:
            i = torch.arange(n, device=dev)[:, None]
            j = torch.arange(c + n, device=dev)[None, :]
            masks.append(j <= i + c)
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return Varlen(
        batch,
        as_t(q_off),
        as_t(k_off),
        max(n for _, n in batch),
        max(c + n for c, n in batch),
        q_off,
        k_off,
        masks,
    )


def attention_fn(torch, kernel: str, window: int = 0):
    """``fn(q, k, v, layout) -> out [T, nq, d]``: the kernel's own output, no extra copy."""
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        ws = (window - 1, 0) if window else (-1, -1)

        def fa(q, k, v, lay):
            return flash_attn_varlen_func(
                q, k, v, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, causal=True, window_size=ws
            )

        return fa
    if kernel == "aten_flash":
        win = {"window_size_left": window - 1, "window_size_right": 0} if window else {}

        def aten(q, k, v, lay):
            return torch.ops.aten._flash_attention_forward(
                q, k, v, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, 0.0, True, False, **win
            )[0]

        return aten
    import torch.nn.functional as F

    try:  # native GQA (torch >= 2.5); else K/V heads repeated
        one = torch.zeros(1, 2, 1, 8)
        F.scaled_dot_product_attention(one, one[:, :1], one[:, :1], enable_gqa=True)
        gqa = {"enable_gqa": True}
    except (TypeError, RuntimeError):
        gqa = None

    def sdpa(q, k, v, lay):
        group = q.shape[1] // k.shape[1]
        out = q.new_empty(q.shape) if len(lay.batch) > 1 else None
        for i, (_, n) in enumerate(lay.batch):
            qs = q[lay.q_off[i] : lay.q_off[i + 1]].transpose(0, 1).unsqueeze(0)
            ks = k[lay.k_off[i] : lay.k_off[i + 1]].transpose(0, 1).unsqueeze(0)
            vs = v[lay.k_off[i] : lay.k_off[i + 1]].transpose(0, 1).unsqueeze(0)
            if group > 1 and gqa is None:
                ks = ks.repeat_interleave(group, dim=1)
                vs = vs.repeat_interleave(group, dim=1)
            mask = lay.masks[i]
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=mask is None and n > 1, **(gqa or {})
            )[0].transpose(0, 1)
            if out is None:
                return o
            out[lay.q_off[i] : lay.q_off[i + 1]] = o
        return out

    return sdpa


def pick_kernel(torch, dev, want: str, dtype) -> str:
    """The attention kernel: the one asked for, or flash_attn > aten_flash > sdpa (probed)."""
    order = [want] if want != "auto" else ["flash_attn", "aten_flash", "sdpa"]
    for kernel in order:
        if kernel != "sdpa" and dev.type != "cuda":
            continue
        try:
            lay = varlen_layout(torch, [(3, 2), (0, 4)], dev)
            q = torch.randn(6, 4, 64, device=dev, dtype=dtype)
            k = torch.randn(9, 2, 64, device=dev, dtype=dtype)
            attention_fn(torch, kernel)(q, k, k, lay)
        except Exception as e:  # noqa: BLE001 - not usable here: try the next one
            if want != "auto":
                raise OptionError(
                    f"options: field '--attention': kernel {want!r} is not usable here "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from None
            continue
        return kernel
    raise OptionError("options: field '--attention': no attention kernel works here")


# ------------------------------------------------------------------------------------------------
# the decoder whose whole steps are timed


class Decoder:
    """A Llama-style decoder with random per-layer weights (std 0.02; nothing shared, nothing
    downloaded) and a packed KV cache; ``step`` runs one forward of a batch as set by
    ``prepare`` (static buffers, so the step can be captured as a CUDA graph)."""

    def __init__(self, torch, arch: Arch, dev, dtype, kernel: str):
        self.torch, self.a, self.dev, self.dtype = torch, arch, dev, dtype
        # sdpa runs full causal attention: a sliding window is applied by the flash kernels only
        self.attn = attention_fn(torch, kernel, arch.window if kernel != "sdpa" else 0)
        a = arch
        w = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype) * 0.02  # noqa: E731
        ones = lambda n: torch.ones(n, device=dev, dtype=dtype)  # noqa: E731
        qkv_n = (a.nq + 2 * a.nkv) * a.d
        self.embed = w(a.vocab, a.hidden)
        self.layers = []
        for _ in range(a.layers):
            self.layers.append(
                {
                    "ln1": ones(a.hidden),
                    "qkv": w(qkv_n, a.hidden),
                    "qkv_b": w(qkv_n) if a.qkv_bias else None,
                    "q_norm": ones(a.d) if a.qk_norm else None,
                    "k_norm": ones(a.d) if a.qk_norm else None,
                    "o": w(a.hidden, a.nq * a.d),
                    "ln2": ones(a.hidden),
                    "gate_up": w(2 * a.inter, a.hidden),
                    "down": w(a.hidden, a.inter),
                }
            )
        self.final_ln = ones(a.hidden)
        self.lm_head = self.embed if a.tie else w(a.vocab, a.hidden)
        self.cache = None

    def _rms(self, x, weight):
        F = self.torch.nn.functional
        if hasattr(F, "rms_norm"):
            return F.rms_norm(x, (x.shape[-1],), weight, 1e-6)
        xf = x.float()
        xf = xf * self.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf.to(x.dtype) * weight

    def prepare(self, batch: Batch) -> None:
        """Static inputs of one step: token ids, positions, where the new K/V go, which rows
        feed the LM head, and a KV cache holding each request's ``cache_len`` tokens."""
        torch, a, dev = self.torch, self.a, self.dev
        self.cache = None  # free the previous batch's cache first
        self.lay = varlen_layout(torch, batch, dev)
        n_tok = self.lay.q_off[-1]
        pos, write = [], []
        for i, (c, n) in enumerate(batch):
            pos += range(c, c + n)
            write += range(self.lay.k_off[i] + c, self.lay.k_off[i] + c + n)
        self.tokens = torch.randint(0, a.vocab, (n_tok,), device=dev)
        self.write = torch.tensor(write, dtype=torch.long, device=dev)
        self.last = torch.tensor([q - 1 for q in self.lay.q_off[1:]], dtype=torch.long, device=dev)
        inv = 1.0 / (10000.0 ** (torch.arange(0, a.d, 2, device=dev, dtype=torch.float32) / a.d))
        ang = torch.tensor(pos, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)[:, None, :]  # [T, 1, d]
        self.cos, self.sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        k_tok = self.lay.k_off[-1]
        self.cache = [
            (
                torch.zeros(k_tok, a.nkv, a.d, device=dev, dtype=self.dtype),
                torch.zeros(k_tok, a.nkv, a.d, device=dev, dtype=self.dtype),
            )
            for _ in range(a.layers)
        ]

    def _rotary(self, x):
        half = x.shape[-1] // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rot * self.sin

    def step(self):
        torch, a = self.torch, self.a
        F = torch.nn.functional
        x = F.embedding(self.tokens, self.embed)
        n_tok = x.shape[0]
        q_w, kv_w = a.nq * a.d, a.nkv * a.d
        for layer, (k_cache, v_cache) in zip(self.layers, self.cache, strict=True):
            y = self._rms(x, layer["ln1"])
            qkv = F.linear(y, layer["qkv"], layer["qkv_b"])
            q = qkv[:, :q_w].view(n_tok, a.nq, a.d)
            k = qkv[:, q_w : q_w + kv_w].view(n_tok, a.nkv, a.d)
            v = qkv[:, q_w + kv_w :].view(n_tok, a.nkv, a.d)
            if layer["q_norm"] is not None:
                q, k = self._rms(q, layer["q_norm"]), self._rms(k, layer["k_norm"])
            q, k = self._rotary(q), self._rotary(k)
            k_cache.index_copy_(0, self.write, k)
            v_cache.index_copy_(0, self.write, v)
            o = self.attn(q, k_cache, v_cache, self.lay)
            x = x + F.linear(o.reshape(n_tok, q_w), layer["o"])
            y = self._rms(x, layer["ln2"])
            gate, up = F.linear(y, layer["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["down"])
        h = self._rms(x.index_select(0, self.last), self.final_ln)
        return F.linear(h, self.lm_head).argmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# sections


def _oom(torch, e: BaseException) -> bool:
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e)


def gemm_call(torch, x, w, fp8: bool):
    """The timed GEMM ``x[m, k] @ w[n, k]^T``: ``F.linear``, or with ``fp8`` (x in e4m3, w in
    e4m3 already transposed to ``[k, n]``) per-tensor-scaled ``torch._scaled_mm``, bf16 out."""
    if not fp8:
        return lambda: torch.nn.functional.linear(x, w)
    one = torch.ones((), device=x.device)
    return lambda: torch._scaled_mm(x, w, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def run_gemm(torch, dev, timer: Timer, plan: Plan, dtype) -> list[dict]:
    rows = []
    weights: dict = {}
    for case in plan.gemm:
        m, k, n = case["m"], case["k"], case["n"]
        key = (case["model"], case["op"], case["dtype"])
        if key not in weights:
            weights.clear()  # one weight at a time: the lm_head of a big vocabulary is ~1 GB
            w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
            weights[key] = w.to(torch.float8_e4m3fn).t() if case["dtype"] == "fp8" else w
        x = torch.randn(m, k, device=dev, dtype=dtype)
        if case["dtype"] == "fp8":
            x = x.to(torch.float8_e4m3fn)
        ms, lo, hi = timer.eager(gemm_call(torch, x, weights[key], case["dtype"] == "fp8"))
        rows.append({**case, "ms": _num(ms), "ms_min": _num(lo), "ms_max": _num(hi)})
    return rows


def run_attention(torch, dev, timer: Timer, plan: Plan, dtype, kernel: str, skipped) -> list[dict]:
    fn_attn = attention_fn(torch, kernel)
    rows = []
    for case in plan.attention:
        batch = case["batch"]
        try:
            lay = varlen_layout(torch, batch, dev)
            q = torch.randn(lay.q_off[-1], case["nq"], case["d"], device=dev, dtype=dtype)
            k = torch.randn(lay.k_off[-1], case["nkv"], case["d"], device=dev, dtype=dtype)
            v = torch.randn_like(k)
            ms, lo, hi = timer.eager(lambda q=q, k=k, v=v, lay=lay: fn_attn(q, k, v, lay))
        except Exception as e:
            if not _oom(torch, e):
                raise
            skipped.append(
                {"section": "attention", "batch": batch_text(batch), "why": "out of memory"}
            )
            log(f"attention: skipped {batch_text(batch)[:60]} (out of memory)")
            continue
        finally:
            q = k = v = None
        rows.append(
            {
                **{c: case[c] for c in ("nq", "nkv", "d", "kind")},
                "batch": batch_text(batch),
                **batch_counts(batch),
                "ms": _num(ms),
                "ms_min": _num(lo),
                "ms_max": _num(hi),
                "kernel": kernel,
            }
        )
    return rows


def run_steps(torch, dev, timer: Timer, plan: Plan, archs, dtype, kernel, eager, skipped):
    rows = []
    timing = "cuda_graph" if timer.cuda else "cpu_perf_counter"
    for arch in archs:
        cases = [c for c in plan.steps if c["model"] == arch.name]
        if not cases:
            continue
        model = Decoder(torch, arch, dev, dtype, kernel)
        for case in cases:
            batch = case["batch"]
            try:
                model.prepare(batch)
                ms, lo, hi = timer.graph(model.step)
                extra = {}
                if eager:
                    e_ms, e_lo, e_hi = timer.eager(model.step)
                    extra = {
                        "eager_ms": _num(e_ms),
                        "eager_ms_min": _num(e_lo),
                        "eager_ms_max": _num(e_hi),
                    }
            except Exception as e:
                if not _oom(torch, e):
                    raise
                model.cache = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                skipped.append(
                    {
                        "section": "steps",
                        "model": arch.name,
                        "batch": batch_text(batch),
                        "why": "out of memory",
                    }
                )
                log(f"steps: skipped {arch.name} {batch_text(batch)[:60]} (out of memory)")
                continue
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # give the replayed graph's private pool back
            rows.append(
                {
                    "model": arch.name,
                    "kind": case["kind"],
                    **batch_counts(batch),
                    "step_ms": _num(ms),
                    "step_ms_min": _num(lo),
                    "step_ms_max": _num(hi),
                    "batch": batch_text(batch),
                    "timing": timing,
                    **extra,
                }
            )
        model.cache = None
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _nvidia_smi(query: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (
        res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    )


def device_info(torch, dev, kernel: str | None) -> dict:
    if dev.type != "cuda":
        return {
            "device": "cpu-dry-run",
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        }
    p = torch.cuda.get_device_properties(dev)
    return {
        "device": p.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capability": list(torch.cuda.get_device_capability(dev)),
        "sms": p.multi_processor_count,
        "mem_GiB": p.total_memory / 2**30,
        "nvidia_smi": _nvidia_smi("name,clocks.max.sm,clocks.max.mem,power.limit,driver_version"),
        "attention_backend": kernel,
    }


def run_device(
    torch, dev, timer: Timer, plan: Plan, dtype, dtype_name: str, info: dict
) -> tuple[dict, list[dict]]:
    cuda = dev.type == "cuda"
    n_bytes = plan.device["copy_MiB"] * MiB
    src = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms, _, _ = timer.eager(lambda src=src, dst=dst: dst.copy_(src))
    copy_gbps = 2 * n_bytes / (max(ms, 1e-9) * 1e-3) / 1e9
    del src, dst
    n = plan.device["gemm_n"]
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms, _, _ = timer.eager(lambda a=a, b=b: a @ b)
    tflops = 2 * n**3 / (max(ms, 1e-9) * 1e-3) / 1e12
    del a, b
    pcie = []
    for mib in plan.device["pcie_MiB"]:
        host = torch.empty(mib * MiB, dtype=torch.uint8, pin_memory=cuda)
        devb = torch.empty(mib * MiB, dtype=torch.uint8, device=dev)
        h2d, _, _ = timer.eager(lambda host=host, devb=devb: devb.copy_(host, non_blocking=cuda))
        d2h, _, _ = timer.eager(lambda host=host, devb=devb: host.copy_(devb, non_blocking=cuda))
        gbps = lambda t, mib=mib: round(mib * MiB / (max(t, 1e-9) * 1e-3) / 1e9, 2)  # noqa: E731
        pcie.append(
            {
                "MiB": mib,
                "h2d_ms": _num(h2d),
                "d2h_ms": _num(d2h),
                "h2d_GBps": gbps(h2d),
                "d2h_GBps": gbps(d2h),
            }
        )
        del host, devb
    doc = dict(info)
    doc["copy_MiB"] = plan.device["copy_MiB"]
    doc["d2d_copy_GBps_read_plus_write"] = copy_gbps
    doc[f"{dtype_name}_gemm_{n}_TFLOPs"] = tflops
    doc["sustained_gemm"] = run_sustained_gemm(torch, dev, timer, plan, dtype, dtype_name)
    doc["pcie"] = pcie[-1] if pcie else None
    if cuda:
        doc["nvidia_smi_end"] = _nvidia_smi("clocks.sm,clocks.mem,temperature.gpu,power.draw")
    return doc, pcie


# ------------------------------------------------------------------------------------------------
# main


def _plan_rows(plan: Plan, kernel: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The tables of a plan-only run: every shape and batch, timing columns empty."""
    attn = [
        {
            **{c: r[c] for c in ("nq", "nkv", "d", "kind")},
            "batch": batch_text(r["batch"]),
            **batch_counts(r["batch"]),
            "kernel": kernel,
        }
        for r in plan.attention
    ]
    steps = [
        {
            "model": r["model"],
            "kind": r["kind"],
            **batch_counts(r["batch"]),
            "batch": batch_text(r["batch"]),
            "timing": "planned",
        }
        for r in plan.steps
    ]
    return list(plan.gemm), attn, steps


def run(opts: argparse.Namespace) -> int:
    t_start = time.time()
    torch = None if opts.plan_only else import_torch()
    if opts.plan_only or (opts.dry_run and torch is None):
        mode = "plan-only"
        if not opts.plan_only:
            log("dry-run: torch is not installed; writing the measurement plan only")
    elif opts.dry_run:
        mode = "cpu-dry-run"
    else:
        if torch is None:
            raise OptionError(
                "environment: torch is not installed (pip install torch, a CUDA build); "
                "--dry-run writes the measurement plan without it"
            )
        if not torch.cuda.is_available():
            raise OptionError(
                "environment: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
                "--dry-run runs every path on the CPU"
            )
        mode = "gpu"
    grid = GRIDS["tiny" if mode == "cpu-dry-run" else ("quick" if opts.quick else "full")]
    archs = [miniature(a) for a in opts.archs] if mode == "cpu-dry-run" else list(opts.archs)
    out: Path = opts.out
    meta = {
        "device": "plan-only" if mode == "plan-only" else "cpu-dry-run",
        "mode": mode,
        "script": "scripts/profile_gpu.py",
        "argv": sys.argv[1:],
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "models": [dataclasses.asdict(a) for a in archs],
        "dtype": opts.dtype,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "what": opts.what,
        "grid": "tiny" if mode == "cpu-dry-run" else ("quick" if opts.quick else "full"),
        "max_kv_tokens": opts.max_kv_tokens,
        "seed": opts.seed,
        "timing": {"gpu": "cuda_events", "cpu-dry-run": "perf_counter"}.get(mode),
        "cuda_graphs": mode == "gpu",
        "python": platform.python_version(),
        "skipped": [],
    }
    if mode == "plan-only":
        fp8 = not opts.no_fp8  # what a GPU with fp8 tensor cores would time
        plan = make_plan(archs, grid, opts.dtype, fp8, opts.max_kv_tokens, opts.seed)
        meta["fp8"] = fp8
        write_json(out / "plan.json", plan.as_json())
        gemm, attn, steps = _plan_rows(plan, opts.attention)
        tables = {
            "gemm": ("gemm.csv", GEMM_COLUMNS, gemm),
            "attention": ("attention.csv", ATTN_COLUMNS, attn),
            "steps": ("steps.csv", STEPS_COLUMNS + (EAGER_COLUMNS if opts.eager else ()), steps),
        }
        for section in opts.what:
            if section in tables:
                name, cols, rows = tables[section]
                write_csv(out / name, cols, rows)
                log(f"{section}: planned {len(rows)} rows -> {out / name}")
            else:
                log(f"device: planned {plan.device}")
        meta["seconds"] = round(time.time() - t_start, 3)
        write_json(out / "meta.json", meta)
        return 0

    dev = torch.device("cuda" if mode == "gpu" else "cpu")
    if mode == "cpu-dry-run":
        torch.set_num_threads(1)  # tiny ops: intra-op threads only spin and wait on each other
    dtype = _dtype(torch, opts.dtype)
    if mode == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = False
    fp8 = not opts.no_fp8 and fp8_supported(torch, dev)
    needs_attn = "attention" in opts.what or "steps" in opts.what
    kernel = pick_kernel(torch, dev, opts.attention, dtype) if needs_attn else None
    plan = make_plan(archs, grid, opts.dtype, fp8, opts.max_kv_tokens, opts.seed)
    write_json(out / "plan.json", plan.as_json())
    info = device_info(torch, dev, kernel)
    meta.update(
        device=info["device"], torch=torch.__version__, fp8=fp8, attention_kernel=kernel, gpu=info
    )
    timer = Timer(torch, mode == "gpu", opts.repeats, opts.warmup)
    log(f"profiling {info['device']}: {', '.join(opts.what)}; attention kernel {kernel}; fp8 {fp8}")
    torch.manual_seed(opts.seed)
    for section in opts.what:
        t0 = time.time()
        if section == "gemm":
            log(f"gemm: timing {len(plan.gemm)} shapes")
            rows = run_gemm(torch, dev, timer, plan, dtype)
            write_csv(out / "gemm.csv", GEMM_COLUMNS, rows)
            target = out / "gemm.csv"
        elif section == "attention":
            log(f"attention: timing {len(plan.attention)} batches ({kernel})")
            rows = run_attention(torch, dev, timer, plan, dtype, kernel, meta["skipped"])
            write_csv(out / "attention.csv", ATTN_COLUMNS, rows)
            target = out / "attention.csv"
        elif section == "steps":
            how = "CUDA graphs" if mode == "gpu" else "eager, CPU"
            log(
                f"steps: timing {len(plan.steps)} batches ({how}{', + eager' if opts.eager else ''})"
            )
            rows = run_steps(
                torch, dev, timer, plan, archs, dtype, kernel, opts.eager, meta["skipped"]
            )
            cols = STEPS_COLUMNS + (EAGER_COLUMNS if opts.eager else ())
            write_csv(out / "steps.csv", cols, rows)
            target = out / "steps.csv"
        else:
            log("device: copy ceiling, GEMM ceiling, host<->device copies")
            doc, pcie = run_device(torch, dev, timer, plan, dtype, opts.dtype, info)
            write_json(out / "device.json", doc)
            write_atomic(out / "sustained.yaml", sustained_yaml(doc, time.strftime("%Y-%m-%d")))
            write_csv(out / "pcie.csv", PCIE_COLUMNS, pcie)
            rows, target = pcie, out / "device.json"
        log(f"{section}: {len(rows)} rows -> {target} ({time.time() - t0:.1f} s)")
    meta["seconds"] = round(time.time() - t_start, 3)
    write_json(out / "meta.json", meta)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
        return run(opts)
    except OptionError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("error: interrupted (files of finished sections are complete)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
