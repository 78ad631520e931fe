"""Per-operator efficiencies fitted to aiconfigurator-core's measured kernel tables.

NVIDIA's aiconfigurator-core (Apache-2.0, ``pip install hisim-jax[aic]``) ships, for a dozen
systems and three engines, tables of single-kernel timings collected on the real GPUs:
``systems/data/<system>/<op>/<engine>/<version>/*.parquet``. Only those data files are read
here (with pandas/pyarrow); none of its code is imported or copied.

The tables are turned into our shapes and fitted with the machinery of ``calibrate.py``:

* ``gemm_perf``                    m, n, k, dtype → ``GemmRows`` (bf16 and per-tensor fp8);
* ``context_attention_perf``       batch × isl prompts, no cache → ``AttnRows``, one request
                                   repeated ``batch`` times (the tables time uniform batches);
* ``generation_attention_perf``    batch × one new token over isl + step - 1 cached keys;
* ``custom_allreduce_perf``        bf16 all-reduce of ``message_size`` elements over
                                   ``num_gpus`` ranks (CUDA-graph rows) → ``CommRows``;
* ``moe_perf``                     read and checked against the roofline's fused-MoE term with
                                   the fitted GEMM efficiencies (the roofline has no MoE
                                   parameters of its own to fit).

Single-kernel tables cannot show the costs of a whole step (``layer_s``, ``step_s``, the
elementwise pass counts ``elem_*``, ``gemv_saving_s``): those are kept from a base calibration
(the shipped H100 one by default) and the output says which parameter came from where.
Attention is fitted through the FA2 grid model (``attention/fa2.py``) whatever kernel the
engine ran (FA3 on Hopper, FlashInfer/TRT-LLM kernels on Blackwell): its parameters then absorb
the difference, which the per-operator MAPE shows.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.batch import Batch
from hisim_jax.estimator.roofline import (
    ATTENTION_BACKENDS,
    Params,
    _moe_s,
    as_float_params,
    load_calibration,
    ops,
    params_to_dict,
)
from hisim_jax.specs import HardwareSpec, SpecError, load_hardware, load_model

# aiconfigurator system name -> our hardware_specs stem
SYSTEMS = {
    "a100_sxm": "a100-sxm-80gb",
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200-sxm",
    "b200_sxm": "b200",
    "b300_sxm": "b300",
    "gb200": "gb200",
    "gb300": "gb300",
    "l40s": "l40s",
    "rtx_pro_6000_server": "rtx-pro-6000",
}
ENGINES = ("vllm", "sglang", "trtllm")

GEMM_NAMES = ("gemm_flops_eff", "gemm_fp8_flops_eff", "gemm_bytes_eff", "gemm_blend")
ATTN_NAMES = (
    "attn_flops_eff",
    "attn_bytes_eff",
    "attn_chain_flops_eff",
    "attn_chain_bytes_eff",
    "attn_blend",
    "attn_crowding",
    "attn_block_s",
    "attn_combine_s",
)
COMM_NAMES = ("comm_eff", "comm_latency_s")
TABLE_NAMES = GEMM_NAMES + ATTN_NAMES + COMM_NAMES

# GEMM precisions the roofline models: bf16, and W8A8 with per-tensor scales (block-scaled fp8
# is DeepGEMM-style, another kernel family)
GEMM_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
# GEMMs with a side below this are no projection of a served model even per TP rank (the
# tables sweep k, n down to 32): launch-bound shapes that would only teach the fit the floor.
GEMM_MIN_KN = 512
# The FA2 tile figures are those of head dim 128, the head dim of nearly every served LLM.
ATTN_HEAD_DIM = 128
# table file of each operator family, under systems/data/<system>/<family>/<engine>/<version>/
TABLES = {
    "gemm": ("gemm", "gemm_perf"),
    "context_attention": ("attention", "context_attention_perf"),
    "generation_attention": ("attention", "generation_attention_perf"),
    "moe": ("moe", "moe_perf"),
    "allreduce": ("comm", "custom_allreduce_perf"),
}
FITTED_OPS = ("gemm", "context_attention", "generation_attention", "allreduce")
STEPS_N = 1500
LEARNING_RATE = 0.03
MICRO_WEIGHT = 1.0  # no step table here: the kernel tables are the whole loss
# Pull towards the physics priors: at calibrate.py's 1e-3 the GEMM fit trades blend for an
# efficiency above the datasheet peak (1.07 on the H100 at blend 0.86); 3e-3 keeps it at ~0.97
# for the same GEMM error, 1e-2 would cost generation attention 5 points of MAPE.
PRIOR_WEIGHT = 3.0e-3
# Kernel tables of CUDA-graph replays start near a few microseconds: the launch floors start there
EAGER_INIT_S = {"eager_gemm_s": 3e-6, "eager_attn_s": 8e-6}


class AiconfiguratorError(SpecError):
    """aiconfigurator-core missing, or a system/engine/version its data does not cover."""


# ------------------------------------------------------------------------------------------------
# where the data is


def data_root() -> Path:
    """``systems/`` of the installed aiconfigurator-core (found without importing it)."""
    spec = importlib.util.find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations or _no_parquet():
        raise AiconfiguratorError(
            "aiconfigurator-core and pyarrow are needed to read its kernel tables: "
            "pip install hisim-jax[aic]"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "systems"
    if not (root / "data").is_dir():
        raise AiconfiguratorError(f"{root}: aiconfigurator-core without its systems/data folder")
    return root


def _no_parquet() -> bool:
    return importlib.util.find_spec("pyarrow") is None


def hardware_name(system: str) -> str:
    """Our hardware_specs stem of an aiconfigurator system name (``h100_sxm`` -> ``h100-sxm``)."""
    if system not in SYSTEMS:
        raise AiconfiguratorError(
            f"aiconfigurator system {system!r} has no hisim GPU spec (choose from "
            f"{', '.join(sorted(SYSTEMS))})"
        )
    return SYSTEMS[system]


def system_name(hardware: str) -> str:
    """The aiconfigurator system of one of our GPUs (``h100-sxm`` -> ``h100_sxm``)."""
    for system, stem in SYSTEMS.items():
        if stem == hardware:
            return system
    raise AiconfiguratorError(
        f"GPU {hardware!r} has no aiconfigurator system (choose from "
        f"{', '.join(sorted(SYSTEMS.values()))})"
    )


def _table_versions(root: Path, system: str, engine: str, op: str) -> list[str]:
    family, stem = TABLES[op]
    base = root / "data" / system / family / engine
    if not base.is_dir():
        return []
    return _sorted_versions(d.name for d in base.iterdir() if (d / f"{stem}.parquet").is_file())


def _version_key(v: str):
    try:
        from packaging.version import Version

        return (0, Version(v), v)
    except Exception:  # not PEP 440: after every release, by its numbers
        return (1, tuple(int(x) for x in re.findall(r"\d+", v)), v)


def _sorted_versions(names) -> list[str]:
    return sorted(set(names), key=_version_key)


def available_systems(engine: str | None = None) -> list[str]:
    """aiconfigurator systems with a hisim GPU spec and GEMM and attention tables (for
    ``engine``, or for any engine)."""
    root = data_root()
    return [
        s
        for s in sorted(SYSTEMS)
        if any(_core_versions(root, s, e) for e in ([engine] if engine else ENGINES))
    ]


def available_engines(system: str) -> list[str]:
    """Engines with GEMM and attention tables on ``system``."""
    root = data_root()
    hardware_name(system)
    return [e for e in ENGINES if _core_versions(root, system, e)]


def _core_versions(root: Path, system: str, engine: str) -> list[str]:
    """Versions with a GEMM table and both attention tables (what a calibration needs)."""
    sets = [set(_table_versions(root, system, engine, op)) for op in FITTED_OPS[:3]]
    return _sorted_versions(set.intersection(*sets)) if all(sets) else []


def versions(system: str, engine: str) -> list[str]:
    """Every version of ``engine`` with any table read here on ``system``, oldest first."""
    root = data_root()
    _check_system_engine(root, system, engine)
    return _sorted_versions(v for op in TABLES for v in _table_versions(root, system, engine, op))


def _check_system_engine(root: Path, system: str, engine: str) -> None:
    hardware_name(system)
    if engine not in ENGINES:
        raise AiconfiguratorError(f"engine {engine!r} unknown (choose from {', '.join(ENGINES)})")
    if not _core_versions(root, system, engine):
        have = ", ".join(e for e in ENGINES if _core_versions(root, system, e)) or "none"
        raise AiconfiguratorError(
            f"aiconfigurator has no {engine} GEMM and attention tables for {system} "
            f"(engines with them: {have})"
        )


def resolve_version(system: str, engine: str, version: str | None = None) -> str:
    """``version`` checked against the data, or the newest one with GEMM and attention tables."""
    root = data_root()
    _check_system_engine(root, system, engine)
    core = _core_versions(root, system, engine)
    if version is None:
        return core[-1]
    known = versions(system, engine)
    if version not in known:
        raise AiconfiguratorError(
            f"{engine} version {version!r} has no tables for {system} (choose from "
            f"{', '.join(known)})"
        )
    if not [v for v in core if _version_key(v) <= _version_key(version)]:
        raise AiconfiguratorError(
            f"{engine} {version} on {system}: no GEMM and attention tables at or before it "
            f"(versions with them: {', '.join(core)})"
        )
    return version


def table_file(system: str, engine: str, op: str, version: str) -> tuple[Path, str] | None:
    """The table of ``op`` for ``version``, or of the newest older version that has one (the
    backward fill aiconfigurator's own loader does: a release recollects only some tables)."""
    root = data_root()
    older = [
        v
        for v in _table_versions(root, system, engine, op)
        if _version_key(v) <= _version_key(version)
    ]
    if not older:
        return None
    family, stem = TABLES[op]
    return root / "data" / system / family / engine / older[-1] / f"{stem}.parquet", older[-1]


# ------------------------------------------------------------------------------------------------
# tables -> our shapes (one frame per operator, latency in seconds)


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise AiconfiguratorError(f"{path}: unreadable kernel table ({type(e).__name__})") from None


def _one_kernel_per_shape(frame: pd.DataFrame, shape: list[str]) -> pd.DataFrame:
    """Where several kernels timed one shape, the engine's usual one: the kernel with the most
    rows in the table (the others are alternatives collected on a subset)."""
    if "kernel_source" not in frame.columns:
        return frame
    rank = frame["kernel_source"].map(frame["kernel_source"].value_counts())
    frame = frame.assign(_rank=rank).sort_values("_rank", ascending=False, kind="stable")
    return frame.drop_duplicates(shape).drop(columns="_rank").sort_index()


def _finite_positive(frame: pd.DataFrame) -> pd.DataFrame:
    lat = pd.to_numeric(frame["latency"], errors="coerce")
    return frame[np.isfinite(lat) & (lat > 0)]


def gemm_frame(path: Path) -> pd.DataFrame:
    """``m, k, n, dtype, latency_s, kernel`` of bf16 and per-tensor fp8 GEMMs."""
    g = _read(path)
    g = g[g["gemm_dtype"].isin(list(GEMM_DTYPES)) & (g[["k", "n"]].min(axis=1) >= GEMM_MIN_KN)]
    g = _finite_positive(g)
    g = _one_kernel_per_shape(g, ["m", "n", "k", "gemm_dtype"])
    return pd.DataFrame(
        {
            "m": g["m"].astype(float),
            "k": g["k"].astype(float),
            "n": g["n"].astype(float),
            "dtype": g["gemm_dtype"].map(GEMM_DTYPES),
            "latency_s": g["latency"].astype(float) / 1e3,
            "kernel": g.get("kernel_source", ""),
        }
    ).reset_index(drop=True)


def attention_frame(path: Path, phase: str) -> pd.DataFrame:
    """``batch, cache_len, new_len, q_heads, kv_heads, head_dim, latency_s, kernel`` of bf16
    full-attention calls (head dim 128, no sliding window, bf16 KV cache)."""
    a = _read(path)
    for col, default in (("window_size", 0), ("beam_width", 1), ("attn_dtype", "bfloat16")):
        if col not in a.columns:
            a[col] = default
    a = a[
        (a["head_dim"] == ATTN_HEAD_DIM)
        & (a["window_size"] == 0)
        & (a["beam_width"] == 1)
        & (a["attn_dtype"] == "bfloat16")
        & (a["kv_cache_dtype"] == "bfloat16")
    ]
    a = _one_kernel_per_shape(
        _finite_positive(a),
        ["batch_size", "isl", "step", "num_heads", "num_key_value_heads", "head_dim"],
    )
    isl = a["isl"].astype(float)
    if phase == "context":  # isl new tokens each, nothing cached
        cache, new = 0.0 * isl, isl
    else:  # one new token after isl + step - 1 cached ones (step = 2^j - 1: 2^j keys in all)
        cache, new = isl + a["step"].astype(float) - 1.0, 1.0 + 0.0 * isl
    return pd.DataFrame(
        {
            "batch": a["batch_size"].astype(float),
            "cache_len": cache,
            "new_len": new,
            "q_heads": a["num_heads"].astype(float),
            "kv_heads": a["num_key_value_heads"].astype(float),
            "head_dim": a["head_dim"].astype(float),
            "latency_s": a["latency"].astype(float) / 1e3,
            "kernel": a.get("kernel_source", ""),
        }
    ).reset_index(drop=True)


def allreduce_frame(path: Path) -> pd.DataFrame:
    """``tp, elems, latency_s`` of bf16 all-reduces as replayed in a CUDA graph (where the table
    has eager and graph rows: the engines replay decode steps as graphs)."""
    c = _read(path)
    if "allreduce_dtype" in c.columns:
        c = c[c["allreduce_dtype"] == "bfloat16"]
    if "backend" in c.columns and c["backend"].astype(str).str.endswith("_graph").any():
        c = c[c["backend"].astype(str).str.endswith("_graph")]
    c = _one_kernel_per_shape(_finite_positive(c), ["num_gpus", "message_size"])
    return pd.DataFrame(
        {
            "tp": c["num_gpus"].astype(float),
            "elems": c["message_size"].astype(float),
            "latency_s": c["latency"].astype(float) / 1e3,
        }
    ).reset_index(drop=True)


def moe_frame(path: Path) -> pd.DataFrame:
    """Fused-MoE calls with balanced routing, no expert parallelism, bf16 or fp8 weights."""
    m = _read(path)
    m = m[
        m["moe_dtype"].isin(["bfloat16", "fp8"])
        & (m["moe_ep_size"] == 1)
        & (m["distribution"] == "balanced")
    ]
    m = _one_kernel_per_shape(
        _finite_positive(m),
        [
            "num_tokens",
            "hidden_size",
            "inter_size",
            "topk",
            "num_experts",
            "moe_tp_size",
            "moe_dtype",
        ],
    )
    return pd.DataFrame(
        {
            "tokens": m["num_tokens"].astype(float),
            "hidden": m["hidden_size"].astype(float),
            "moe_inter": m["inter_size"].astype(float) / m["moe_tp_size"].astype(float),
            "top_k": m["topk"].astype(float),
            "experts": m["num_experts"].astype(float),
            "dtype": m["moe_dtype"].map({"bfloat16": "bf16", "fp8": "fp8"}),
            "latency_s": m["latency"].astype(float) / 1e3,
        }
    ).reset_index(drop=True)


_FRAMES = {
    "gemm": gemm_frame,
    "context_attention": lambda p: attention_frame(p, "context"),
    "generation_attention": lambda p: attention_frame(p, "generation"),
    "moe": moe_frame,
    "allreduce": allreduce_frame,
}


def read_tables(
    system: str, engine: str, version: str | None = None
) -> tuple[str, dict[str, pd.DataFrame], dict[str, str]]:
    """(version, frame per operator, version each table came from) for one system and engine;
    operators without a table at or before the version are absent."""
    version = resolve_version(system, engine, version)
    frames, used = {}, {}
    for op, reader in _FRAMES.items():
        found = table_file(system, engine, op, version)
        if found is None:
            continue
        frame = reader(found[0])
        if len(frame):
            frames[op], used[op] = frame, found[1]
    return version, frames, used


# ------------------------------------------------------------------------------------------------
# frames -> calibrate.py's rows


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.result_type(float))


def _per_row_hw(hws: Sequence[HardwareSpec] | HardwareSpec, n_rows: Sequence[int]) -> ops.HwArrays:
    hws = [hws] if isinstance(hws, HardwareSpec) else list(hws)
    arrays = [ops.hw_arrays(h) for h in hws]
    return jax.tree.map(
        lambda *xs: _f(
            np.concatenate([np.full(n, float(x)) for x, n in zip(xs, n_rows, strict=True)])
        ),
        *arrays,
    )


def gemm_rows(frames: Sequence[pd.DataFrame], hws: Sequence[HardwareSpec]) -> cal.GemmRows:
    g = pd.concat(frames, ignore_index=True)
    return cal.GemmRows(
        _f(g["m"]),
        _f(g["k"]),
        _f(g["n"]),
        _f(g["dtype"].map(ops.DTYPE_BYTES)),
        _f(g["latency_s"]),
        _per_row_hw(hws, [len(f) for f in frames]),
    )


def _template_dims() -> ops.ModelDims:
    # any dense model: attention reads only heads, head dim, KV bytes and the window of it
    return ops.model_dims(load_model("llama-3.1-8b"))


def attention_model(frames: Sequence[pd.DataFrame]) -> str:
    """The attention kernel model of these tables: FA3's grid (attention/fa3.py) when every row
    was timed on an FA3 kernel (``vllm_flash_attn_fa3``, SGLang's ``fa3`` on Hopper),
    FlashInfer's (attention/flashinfer.py) when on FlashInfer, else FA2's."""
    kernels = {str(k) for f in frames for k in f.get("kernel", pd.Series(dtype=str)).unique()}
    for model in ("fa3", "flashinfer"):
        # FlashInfer's TRT-LLM-gen kernels (vLLM on Blackwell) have a grid of their own
        if kernels and all(model in k and "trtllm" not in k for k in kernels):
            return model
    return "fa2"


def attention_rows(frames: Sequence[pd.DataFrame], hws: Sequence[HardwareSpec]) -> cal.AttnRows:
    a = pd.concat(frames, ignore_index=True)
    n = len(a)
    dims = jax.tree.map(lambda x: _f(np.full(n, float(x))), _template_dims())
    dims = eqx.tree_at(
        lambda d: (d.q_heads, d.kv_heads, d.head_dim, d.kv_bytes, d.window),
        dims,
        (
            _f(a["q_heads"]),
            _f(a["kv_heads"]),
            _f(a["head_dim"]),
            _f(np.full(n, 2.0)),
            _f(np.zeros(n)),
        ),
    )
    batches = Batch(_f(a["cache_len"])[:, None], _f(a["new_len"])[:, None], _f(np.ones((n, 1))))
    return cal.AttnRows(
        dims,
        batches,
        _f(a["latency_s"]),
        _f(a["batch"]),
        _per_row_hw(hws, [len(f) for f in frames]),
        ATTENTION_BACKENDS[attention_model(frames)],
    )


def comm_rows(frames: Sequence[pd.DataFrame], hws: Sequence[HardwareSpec]) -> cal.CommRows:
    c = pd.concat(frames, ignore_index=True)
    link = np.concatenate(
        [np.full(len(f), h.interconnect_bytes_per_s) for f, h in zip(frames, hws, strict=True)]
    )
    return cal.CommRows(_f(c["elems"]), _f(c["tp"]), _f(link), _f(c["latency_s"]))


def _moe_pred_s(p: Params, m: pd.DataFrame, hw: HardwareSpec, gemm_floor_s: float) -> np.ndarray:
    """The roofline's fused-expert term (the router GEMM is a kernel of its own, not in the
    table) for each row, behind the GEMM table's launch floor."""
    n = len(m)
    dims = jax.tree.map(lambda x: _f(np.full(n, float(x))), _template_dims())
    wb = _f(m["dtype"].map(ops.DTYPE_BYTES))
    dims = eqx.tree_at(
        lambda d: (
            d.hidden,
            d.experts,
            d.top_k,
            d.moe_inter,
            d.moe_layers,
            d.weight_bytes,
            d.gemm_in_bytes,
        ),
        dims,
        (
            _f(m["hidden"]),
            _f(m["experts"]),
            _f(m["top_k"]),
            _f(m["moe_inter"]),
            _f(np.ones(n)),
            wb,
            wb,
        ),
    )
    floor = jnp.log(ops._float(gemm_floor_s))
    args = (as_float_params(p), dims, _f(m["tokens"]), ops.hw_arrays(hw), floor)
    return np.asarray(_moe_kernel_s(*args))


@eqx.filter_jit
def _moe_kernel_s(p: Params, dims: ops.ModelDims, tokens, hw: ops.HwArrays, log_floor_s):
    # the GEMM peak and bandwidth exactly as roofline.costs sets them
    peak = ops.gemm_peak_flops(dims, hw) * jnp.where(
        jnp.maximum(dims.weight_bytes, dims.gemm_in_bytes) < 1.5,
        p.gemm_fp8_flops_eff,
        p.gemm_flops_eff,
    )
    bw = hw.hbm_bytes_per_s * p.gemm_bytes_eff
    kernel = _moe_s(p, dims, tokens, peak, bw, lambda *_: 0.0, jnp)
    return cal._eager_s(kernel, log_floor_s)


# ------------------------------------------------------------------------------------------------
# the fit


def _subsample(frame: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).sort_index().reset_index(drop=True)


def _mape(pred, meas) -> dict:
    err = np.abs(np.asarray(pred) / np.asarray(meas) - 1.0)
    return {
        "rows": int(len(err)),
        "mape": float(np.mean(err)),
        "p90": float(np.quantile(err, 0.9)),
        "max": float(np.max(err)),
    }


def _fit_tables(
    per_gpu: list[tuple[HardwareSpec, dict[str, pd.DataFrame]]],
    base: Params,
    steps_n: int,
    progress,
):
    """One fit of the table parameters over the tables of one or more GPUs (shared values)."""

    def stack(op, build):
        have = [(hw, t[op]) for hw, t in per_gpu if op in t]
        return build([f for _, f in have], [hw for hw, _ in have]) if have else None

    gemm = stack("gemm", gemm_rows)
    attn_frames = [
        (hw, pd.concat([t[o] for o in ("context_attention", "generation_attention") if o in t]))
        for hw, t in per_gpu
        if "context_attention" in t or "generation_attention" in t
    ]
    attn = (
        attention_rows([f for _, f in attn_frames], [h for h, _ in attn_frames])
        if attn_frames
        else None
    )
    comm = stack("allreduce", comm_rows)
    # a GPU without fp8 tensor cores (A100) has no fp8 rows: its fp8 efficiency stays as given
    has_fp8 = gemm is not None and bool(np.any(np.asarray(gemm.weight_bytes) < 1.5))
    gemm_names = tuple(n for n in GEMM_NAMES if has_fp8 or n != "gemm_fp8_flops_eff")
    names = (
        (gemm_names if gemm is not None else ())
        + (ATTN_NAMES if attn is not None else ())
        + (COMM_NAMES if comm is not None else ())
    )
    result = cal.fit(
        None,
        per_gpu[0][0],
        gemm,
        attn,
        init=base,
        fit_names=names,
        steps_n=steps_n,
        learning_rate=LEARNING_RATE,
        progress=progress,
        comm=comm,
        micro_weight=MICRO_WEIGHT,
        prior_weight=PRIOR_WEIGHT,
        eager_init_s=EAGER_INIT_S,
    )
    return result, names


# the report's predictions, compiled once per shape
_gemm_pred_s = eqx.filter_jit(
    lambda p, rows, hw, floor: cal._eager_s(cal._gemm_kernel_s(p, rows, hw), floor)
)
_attn_pred_s = eqx.filter_jit(
    lambda p, rows, hw, floor: cal._eager_s(cal._attn_kernel_s(p, rows, hw), floor)
)
_comm_pred_s = eqx.filter_jit(cal._comm_kernel_s)


def _report(p: Params, eager_s: dict, hw: HardwareSpec, tables: dict[str, pd.DataFrame]) -> dict:
    """Per-operator error of the fitted model (kernel time behind the table's launch floor)."""
    p = as_float_params(p)
    hwa = ops.hw_arrays(hw)
    out = {}
    if "gemm" in tables:
        g = tables["gemm"]
        rows = gemm_rows([g], [hw])
        floor = jnp.log(ops._float(eager_s["eager_gemm_s"]))
        pred = np.asarray(_gemm_pred_s(p, rows, hwa, floor))
        out["gemm"] = _mape(pred, g["latency_s"])
        for dt in ("bf16", "fp8"):
            sel = (g["dtype"] == dt).to_numpy()
            if sel.any():
                out[f"gemm_{dt}"] = _mape(pred[sel], g["latency_s"][sel])
    for op in ("context_attention", "generation_attention"):
        if op in tables:
            rows = attention_rows([tables[op]], [hw])
            floor = jnp.log(ops._float(eager_s["eager_attn_s"]))
            pred = np.asarray(_attn_pred_s(p, rows, hwa, floor))
            out[op] = _mape(pred, tables[op]["latency_s"])
    if "allreduce" in tables:
        rows = comm_rows([tables["allreduce"]], [hw])
        out["allreduce"] = _mape(
            np.asarray(_comm_pred_s(p, rows)), tables["allreduce"]["latency_s"]
        )
    if "moe" in tables and "eager_gemm_s" in eager_s:
        m = tables["moe"]
        out["moe_not_fitted"] = _mape(
            _moe_pred_s(p, m, hw, eager_s["eager_gemm_s"]), m["latency_s"]
        )
    return out


def _base_params(base) -> tuple[Params, str]:
    if isinstance(base, Params):
        return base, "given Params"
    if base is None:
        return load_calibration(), "hardware_specs/calibration/h100-sxm.json"
    return load_calibration(base), str(base)


def calibrate_from_aiconfigurator(
    system: str,
    backend: str,
    version: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    base: str | Path | Params | None = None,
    steps_n: int = STEPS_N,
    max_rows: int | None = None,
    seed: int = 0,
) -> dict:
    """A calibration document (the schema of ``hardware_specs/calibration/h100-sxm.json`` plus
    ``source``, ``backend`` (the engine), ``version``, ``tables``, ``fitted_on`` and per-operator
    MAPE in ``fit``) with the table parameters fitted to aiconfigurator's kernel timings of
    ``backend`` (vllm, sglang or trtllm) on ``system`` (e.g. ``h100_sxm``); ``version`` None
    takes the newest with GEMM and attention tables. Parameters the tables cannot show come
    from ``base`` (a calibration file or Params; default the shipped H100 calibration).
    ``max_rows`` samples at most that many rows per table (tests); ``progress(i, n)`` is called
    after each optimizer step."""
    hw = load_hardware(hardware_name(system))
    version, frames, used = read_tables(system, backend, version)
    frames = {op: _subsample(f, max_rows, seed) for op, f in frames.items()}
    base_p, base_src = _base_params(base)
    result, names = _fit_tables([(hw, frames)], base_p, steps_n, progress)
    report = _report(result.params, result.eager_s, hw, frames)
    return _document(
        result.params,
        result.eager_s,
        hw,
        system,
        backend,
        version,
        used,
        frames,
        names,
        base_src,
        report,
    )


def _document(
    p, eager_s, hw, system, engine, version, used, frames, names, base_src, report
) -> dict:
    values = params_to_dict(p)
    table_src = f"aiconfigurator-core {_package_version()} {system}/{engine}"
    fitted_on = {
        n: (
            f"{table_src}: "
            + (
                "gemm"
                if n in GEMM_NAMES
                else "allreduce"
                if n in COMM_NAMES
                else "context+generation attention"
            )
            if n in names
            else f"kept from {base_src} (not visible in per-operator tables)"
        )
        for n in values
    }
    return {
        "hardware": hw.name,
        "backend": engine,
        "attention_model": attention_model(
            [frames[o] for o in ("context_attention", "generation_attention") if o in frames]
        ),
        "source": "aiconfigurator",
        "system": system,
        "version": version,
        "aiconfigurator_core": _package_version(),
        "tables": {
            op: {"version": used[op], "rows": int(len(frames[op])), **_kernels(frames[op])}
            for op in sorted(used)
        },
        "params": {k: float(f"{v:.6g}") for k, v in values.items()},
        "fitted_on": fitted_on,
        "eager_launch_floor_s": {k: float(f"{v:.6g}") for k, v in sorted(eager_s.items())},
        "fit": json.loads(json.dumps(report)),
    }


def _kernels(frame: pd.DataFrame) -> dict:
    if "kernel" not in frame.columns:
        return {}
    return {"kernels": sorted(str(k) for k in frame["kernel"].unique())}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("aiconfigurator-core")
    except Exception:
        return "unknown"


def leave_one_gpu_out(
    backend: str,
    systems: Sequence[str] | None = None,
    *,
    base: str | Path | Params | None = None,
    steps_n: int = STEPS_N,
    max_rows: int | None = 4000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Fit the table parameters (efficiencies relative to each GPU's datasheet peaks, fixed
    costs, launch floors) jointly on every GPU but one, predict the held-out GPU's tables, and
    report per-GPU per-operator MAPE: how well the fitted values transfer to a GPU never seen.
    ``systems`` defaults to every system with ``backend`` tables; ``max_rows`` samples rows per
    table and GPU (the joint fits are several GPUs large)."""
    chosen = list(systems) if systems is not None else available_systems(backend)
    if len(chosen) < 2:
        raise AiconfiguratorError(
            f"leave-one-GPU-out needs at least two systems with {backend} tables, got {chosen}"
        )
    base_p, _ = _base_params(base)
    data = []
    for s in chosen:
        hw = load_hardware(hardware_name(s))
        _, frames, _ = read_tables(s, backend)
        data.append((s, hw, {op: _subsample(f, max_rows, seed) for op, f in frames.items()}))
    out = {
        "backend": backend,
        "systems": chosen,
        "steps_n": steps_n,
        "max_rows": max_rows,
        "held_out": {},
    }
    for i, (s, hw, frames) in enumerate(data):
        if progress is not None:
            progress(s)
        train = [(h, f) for j, (_, h, f) in enumerate(data) if j != i]
        result, _ = _fit_tables(train, base_p, steps_n, None)
        out["held_out"][s] = _report(result.params, result.eager_s, hw, frames)
    return out


__all__ = [
    "AiconfiguratorError",
    "SYSTEMS",
    "calibrate_from_aiconfigurator",
    "data_root",
    "available_engines",
    "hardware_name",
    "leave_one_gpu_out",
    "read_tables",
    "resolve_version",
    "system_name",
    "available_systems",
    "versions",
]
