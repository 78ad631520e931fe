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

The tables of the layer kinds beyond dense GQA (MLA kernels, BMMs and modules, DeepSeek-shaped
MoE at any EP, DeepEP all-to-all, Gated DeltaNet, Mamba-2's conv) are read by ``layer_frame``
and priced by roofline.py's own terms as ``calibrate.KernelSet`` families (``kernel_sets``);
``scripts/accuracy_kernels.py`` scores them (BENCHMARKS.md, "Kernel tables of the new layer
kinds"). What each of those tables times is written out above ``LAYER_TABLES``.

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
from functools import partial
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.attention import fa2 as attn
from hisim_jax.estimator.batch import Batch
from hisim_jax.estimator.roofline import (
    ATTENTION_BACKENDS,
    Needs,
    Params,
    _communication_s,
    _mla_s,
    _moe_s,
    _recurrent_s,
    as_float_params,
    costs,
    load_calibration,
    ops,
    params_to_dict,
    step_features,
)
from hisim_jax.specs import AICONFIGURATOR_SYSTEMS as SYSTEMS
from hisim_jax.specs import HardwareSpec, SpecError, load_hardware, load_model

ENGINES = ("vllm", "sglang", "trtllm")

GEMM_NAMES = ("gemm_flops_eff", "gemm_fp8_flops_eff", "gemm_bytes_eff", "gemm_blend")
ATTN_NAMES = (
    "attn_flops_eff",
    "attn_bytes_eff",
    "attn_chain_flops_eff",
    "attn_chain_bytes_eff",
    "attn_blend",
    "attn_shared_slowdown",
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


# ------------------------------------------------------------------------------------------------
# kernel tables of the new layer kinds: MLA, DeepSeek-shaped MoE, all-to-all, linear attention
#
# What each table times (read from the tables and aiconfigurator's collectors, not assumed):
#
# * ``mla/context_mla_perf``, ``generation_mla_perf``: one MLA attention call of DeepSeek-V3's
#   dims (q_lora 1536, kv_lora 512, nope 128, rope 64, v 128) over ``num_heads`` heads per rank
#   (``tp_size`` only says how 128 heads were split), a uniform batch, bf16 or fp8 KV cache.
#   Context: ``batch_size`` prompts of ``isl`` tokens, nothing cached; TRT-LLM and SGLang's
#   ``trtllm_mla`` (Blackwell) run it as multi-head attention over up-projected keys
#   (q·k 192, v 128, one KV head per head), SGLang's ``flash_attention`` (FA3, Hopper) and
#   ``triton`` (sm < 90) collectors run the absorbed kernel (q·k 576 over the one shared latent,
#   v 512): 3-6x the work. Generation: one token after ``step`` cached ones, absorbed.
#   The kernels write the new tokens' latent to the cache; no projection is timed.
# * ``mla_bmm/mla_bmm_perf``: the absorbed decode's two batched GEMMs per head (q_nope x W_UK
#   ``mla_gen_pre``, latent output x W_UV ``mla_gen_post``) for ``num_tokens`` tokens.
# * ``mla/mla_{context,generation}_module_perf`` (vLLM 0.24, TRT-LLM 1.3): DeepSeek-V3's whole
#   attention module on one rank: q_a/kv_a, their RMSNorms, q_b, kv_b (or the absorbed BMMs),
#   rotary, the attention kernel, o_proj, with bf16, block-fp8 or NVFP4 GEMMs. Generation
#   ``step`` counts the new token (``step - 1`` cached).
# * ``moe/moe_perf`` (DeepSeek-shaped rows), ``wideep_{context,generation}_moe_perf``: the
#   routed experts' grouped GEMMs (gate/up, SiLU·mul, down, the top-k weighted sum) on the
#   first of ``moe_ep_size`` ranks for ``num_tokens`` tokens of the whole EP group (each rank
#   holds experts / ep of them, inter / tp of their width); no router GEMM, no shared expert,
#   no dispatch. ``balanced`` (moe_perf) and ``uniform`` (wideep) routing spread tokens evenly.
# * ``comm/wideep_deepep_{ll,normal}_perf`` (SGLang 0.5.12), ``comm/moe_a2a_perf`` (vLLM
#   0.24, TRT-LLM 1.3): DeepEP's dispatch and combine of ``num_token(s)`` tokens per rank over
#   one NVLink node (ep 8; 4 on GB200/GB300), each timed on its own. Low-latency mode sends
#   every (token, expert) pair (dispatch fp8 with scales, combine bf16); normal mode (``ht``)
#   sends each token once per destination rank, here at DeepEP's default 20 SMs.
# * ``linear_attention/gdn_perf``: one Gated DeltaNet layer's token mixing per rank: the causal
#   conv1d over q/k/v and the chunked scan (context: ``batch_size`` x ``seq_len`` new tokens,
#   zero initial state) or the conv update and the recurrent step (generation, one token),
#   fp32 states, each kernel a row of its own (summed here); in/out projections not timed.
# * ``linear_attention/mamba2_perf``: only Mamba-2's causal conv1d (fn / update), not the scan.

# operator -> (family folder, table stem)
LAYER_TABLES = {
    "mla_context": ("mla", "context_mla_perf"),
    "mla_generation": ("mla", "generation_mla_perf"),
    "mla_bmm": ("mla_bmm", "mla_bmm_perf"),
    "mla_context_module": ("mla", "mla_context_module_perf"),
    "mla_generation_module": ("mla", "mla_generation_module_perf"),
    "moe_deepseek": ("moe", "moe_perf"),
    "moe_wideep_context": ("moe", "wideep_context_moe_perf"),
    "moe_wideep_generation": ("moe", "wideep_generation_moe_perf"),
    "a2a_ll": ("comm", "wideep_deepep_ll_perf"),
    "a2a_normal": ("comm", "wideep_deepep_normal_perf"),
    "a2a": ("comm", "moe_a2a_perf"),
    "gdn_context": ("linear_attention", "gdn_perf"),
    "gdn_generation": ("linear_attention", "gdn_perf"),
    "mamba2_conv": ("linear_attention", "mamba2_perf"),
}
# SGLang's collectors that run an MLA prefill with the latent as K and V (absorbed)
ABSORBED_CONTEXT_KERNELS = ("flash_attention", "triton")
KV_DTYPES = {"bfloat16": 2.0, "float16": 2.0, "fp8": 1.0}
# linear-layer formats of the tables -> (weight, GEMM input) bytes per element
GEMM_FORMATS = {
    "bfloat16": ("bf16", "bf16"),
    "fp8": ("fp8", "fp8"),
    "fp8_block": ("fp8", "fp8"),
    "nvfp4": ("fp4", "fp4"),
}
# routed-expert shapes (hidden, moe_inter, experts, top_k) of the models with MLA: DeepSeek-V3/R1
# and V3.2 (GLM-5 has the same), Kimi-K2
DEEPSEEK_MOE_SHAPES = {(7168, 2048, 256, 8): "deepseek-v3", (7168, 2048, 384, 8): "kimi-k2"}
MODULE_MODELS = {"deepseek-ai/DeepSeek-V3": "deepseek-v3"}
GPUS_PER_NODE = {"gb200": 4, "gb300": 4}  # NVLink ranks of one node as the a2a tables count
DEEPEP_SMS = 20  # DeepEP's default Buffer.num_sms: the normal-mode rows read
GDN_STATE_BYTES = 4.0  # the collectors' recurrent states are fp32 (Qwen3.5's mamba_ssm_dtype)


def layer_table_versions(system: str, engine: str, op: str) -> list[str]:
    """Versions of ``engine`` with the ``op`` table (``LAYER_TABLES``) on ``system``."""
    if op not in LAYER_TABLES:
        raise AiconfiguratorError(
            f"kernel table {op!r} unknown (choose from {', '.join(LAYER_TABLES)})"
        )
    if engine not in ENGINES:
        raise AiconfiguratorError(f"engine {engine!r} unknown (choose from {', '.join(ENGINES)})")
    hardware_name(system)
    family, stem = LAYER_TABLES[op]
    base = data_root() / "data" / system / family / engine
    if not base.is_dir():
        return []
    return _sorted_versions(d.name for d in base.iterdir() if (d / f"{stem}.parquet").is_file())


def layer_table_file(
    system: str, engine: str, op: str, version: str | None = None
) -> tuple[Path, str] | None:
    """(file, version) of the ``op`` table: of ``version``, or of the newest version holding
    that table (these tables were collected at other releases than the GEMM ones)."""
    have = layer_table_versions(system, engine, op)
    if version is not None:
        have = [v for v in have if _version_key(v) <= _version_key(version)]
    if not have:
        return None
    family, stem = LAYER_TABLES[op]
    return data_root() / "data" / system / family / engine / have[-1] / f"{stem}.parquet", have[-1]


def _columns(frame: pd.DataFrame, path: Path, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise AiconfiguratorError(
            f"{path}: missing column '{missing[0]}' (have: {', '.join(map(str, frame.columns))})"
        )


def _numbers(frame: pd.DataFrame, path: Path, cols: Sequence[str], low: float = 1.0) -> None:
    """Shape columns must be finite numbers >= ``low``: the first bad one is named."""
    for col in cols:
        v = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~(np.isfinite(v) & (v >= low)))
        if len(bad):
            i = int(bad[0])
            raise AiconfiguratorError(
                f"{path}: row {i + 1}: field '{col}' must be a number >= {low:g}, "
                f"got {frame[col].iloc[i]!r}"
            )


def _latency(frame: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Rows whose every timing column is a finite number > 0 (a collector logs a failed case
    as NaN or 0: that shape has no timing, it is not malformed)."""
    ok = np.ones(len(frame), dtype=bool)
    for col in cols:
        v = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        ok &= np.isfinite(v) & (v > 0)
    return frame[ok]


def _median_per_shape(frame: pd.DataFrame, shape: list[str], col: str = "latency_s"):
    """One row per shape: some tables hold two collections of the same sweep."""
    return frame.groupby(shape, as_index=False, sort=True)[col].median()


def mla_frame(path: Path, phase: str) -> pd.DataFrame:
    """``batch, cache_len, new_len, heads, kv_bytes, absorbed, kernel, latency_s`` of an MLA
    attention table (``context_mla_perf`` / ``generation_mla_perf``)."""
    m = _read(path)
    _columns(m, path, ["batch_size", "isl", "step", "num_heads", "kv_cache_dtype", "latency"])
    m = _latency(m, ["latency"])
    m = m[m["kv_cache_dtype"].isin(list(KV_DTYPES))]
    _numbers(m, path, ["batch_size", "isl", "num_heads"])
    _numbers(m, path, ["step"], low=0.0)
    kernel = m["kernel_source"].astype(str) if "kernel_source" in m.columns else "default"
    isl, step = m["isl"].astype(float), m["step"].astype(float)
    context = phase == "context"
    out = pd.DataFrame(
        {
            "batch": m["batch_size"].astype(float),
            # context: isl new tokens, nothing cached; generation: one token after step cached
            "cache_len": 0.0 * isl if context else isl + step - 1.0,
            "new_len": isl if context else 1.0 + 0.0 * isl,
            "heads": m["num_heads"].astype(float),
            "kv_bytes": m["kv_cache_dtype"].map(KV_DTYPES).astype(float),
            "absorbed": (
                pd.Series(kernel, index=m.index).isin(ABSORBED_CONTEXT_KERNELS) if context else True
            ),
            "kernel": kernel,
            "latency_s": m["latency"].astype(float) / 1e3,
        }
    )
    shape = ["batch", "cache_len", "new_len", "heads", "kv_bytes", "absorbed", "kernel"]
    return _median_per_shape(out, shape)


def mla_bmm_frame(path: Path) -> pd.DataFrame:
    """``tokens, heads, dtype, kernel, latency_s`` of the absorbed decode's two BMMs, summed
    (``mla_gen_pre`` + ``mla_gen_post``: the shapes timed both ways)."""
    b = _read(path)
    _columns(b, path, ["op_name", "bmm_dtype", "num_tokens", "num_heads", "latency"])
    b = _latency(b, ["latency"])
    b = b[b["bmm_dtype"].isin(["bfloat16", "fp8"])]
    _numbers(b, path, ["num_tokens", "num_heads"])
    out = pd.DataFrame(
        {
            "tokens": b["num_tokens"].astype(float),
            "heads": b["num_heads"].astype(float),
            "dtype": b["bmm_dtype"].map({"bfloat16": "bf16", "fp8": "fp8"}),
            "kernel": b.get("kernel_source", "default"),
            "part": b["op_name"].astype(str),
            "latency_s": b["latency"].astype(float) / 1e3,
        }
    )
    shape = ["tokens", "heads", "dtype", "kernel"]
    per = _median_per_shape(out, [*shape, "part"])
    both = per.pivot_table(index=shape, columns="part", values="latency_s")
    both = both.dropna(subset=[c for c in ("mla_gen_pre", "mla_gen_post") if c in both.columns])
    if not {"mla_gen_pre", "mla_gen_post"} <= set(both.columns):
        return pd.DataFrame(columns=[*shape, "latency_s"])
    both = both.assign(latency_s=both["mla_gen_pre"] + both["mla_gen_post"]).reset_index()
    return both[[*shape, "latency_s"]].reset_index(drop=True)


def mla_module_frame(path: Path, phase: str) -> pd.DataFrame:
    """``batch, cache_len, new_len, heads, kv_bytes, gemm, kernel, model, latency_s`` of a
    whole-MLA-module table (DeepSeek-V3 rows; bf16, block-fp8 or NVFP4 GEMMs)."""
    m = _read(path)
    cols = ["model", "gemm_type", "num_heads", "batch_size", "isl", "step", "kv_cache_dtype"]
    _columns(m, path, [*cols, "latency"])
    m = _latency(m, ["latency"])
    m = m[
        m["model"].isin(list(MODULE_MODELS))
        & m["gemm_type"].isin(list(GEMM_FORMATS))
        & m["kv_cache_dtype"].isin(list(KV_DTYPES))
        & (m.get("mla_dtype", "bfloat16") == "bfloat16")  # fp8 prefill queries: not modelled
    ]
    _numbers(m, path, ["batch_size", "isl", "num_heads"])
    _numbers(m, path, ["step"], low=0.0)
    isl, step = m["isl"].astype(float), m["step"].astype(float)
    context = phase == "context"
    out = pd.DataFrame(
        {
            "batch": m["batch_size"].astype(float),
            # generation: ``step`` is the sequence with its new token (step - 1 cached)
            "cache_len": 0.0 * isl if context else step - 1.0,
            "new_len": isl if context else 1.0 + 0.0 * isl,
            "heads": m["num_heads"].astype(float),
            "kv_bytes": m["kv_cache_dtype"].map(KV_DTYPES).astype(float),
            "gemm": m["gemm_type"].astype(str),
            "kernel": m.get("kernel_source", "default").astype(str),
            "model": m["model"].map(MODULE_MODELS),
            "latency_s": m["latency"].astype(float) / 1e3,
        }
    )
    out = out[out["cache_len"] >= 0.0]
    shape = ["batch", "cache_len", "new_len", "heads", "kv_bytes", "gemm", "kernel", "model"]
    return _median_per_shape(out, shape)


def moe_ep_frame(
    path: Path, distributions: Sequence[str] = ("balanced", "uniform")
) -> pd.DataFrame:
    """``tokens, hidden, moe_inter, top_k, experts, ep, dtype, kernel, model, latency_s`` of
    the DeepSeek-shaped rows (``DEEPSEEK_MOE_SHAPES``) of an MoE table with evenly spread
    routing, any TP and EP; ``moe_inter`` is per rank (inter / moe_tp)."""
    m = _read(path)
    cols = ["moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts"]
    cols += ["moe_tp_size", "moe_ep_size", "distribution"]
    _columns(m, path, [*cols, "latency"])
    m = _latency(m, ["latency"])
    m = m[m["moe_dtype"].isin(list(GEMM_FORMATS)) & m["distribution"].isin(list(distributions))]
    _numbers(m, path, cols[1:8])
    key = list(zip(m["hidden_size"], m["inter_size"], m["num_experts"], m["topk"], strict=True))
    model = pd.Series([DEEPSEEK_MOE_SHAPES.get(tuple(int(x) for x in k)) for k in key], m.index)
    m, model = m[model.notna()], model[model.notna()]
    out = pd.DataFrame(
        {
            "tokens": m["num_tokens"].astype(float),
            "hidden": m["hidden_size"].astype(float),
            "moe_inter": m["inter_size"].astype(float) / m["moe_tp_size"].astype(float),
            "top_k": m["topk"].astype(float),
            "experts": m["num_experts"].astype(float),
            "ep": m["moe_ep_size"].astype(float),
            "dtype": m["moe_dtype"].astype(str),
            "kernel": m.get("kernel_source", "default").astype(str),
            "model": model,
            "latency_s": m["latency"].astype(float) / 1e3,
        }
    )
    out = _one_kernel_per_shape(
        out.rename(columns={"kernel": "kernel_source"}),
        ["tokens", "hidden", "moe_inter", "top_k", "experts", "ep", "dtype"],
    ).rename(columns={"kernel_source": "kernel"})
    shape = ["tokens", "hidden", "moe_inter", "top_k", "experts", "ep", "dtype", "kernel", "model"]
    return _median_per_shape(out, shape)


def a2a_frame(path: Path, mode: str, system: str) -> pd.DataFrame:
    """``tokens, hidden, top_k, experts, ep, nodes, backend, latency_s`` (dispatch + combine of
    one MoE layer, ``tokens`` per rank) of an all-to-all table: ``mode`` ``"ll"`` or
    ``"normal"`` for SGLang's DeepEP tables (``wideep_deepep_*_perf``, ep = the node's GPUs x
    nodes), ``"a2a"`` for ``moe_a2a_perf`` (bf16 rows of DeepEP's normal and low-latency
    kernels; the ``backend`` column tells them apart)."""
    a = _read(path)
    if mode in ("ll", "normal"):
        times = (
            ["dispatch_avg_t_us", "combine_avg_t_us"]
            if mode == "ll"
            else [f"{p}_{t}_us" for p in ("dispatch", "combine") for t in ("transmit", "notify")]
        )
        shape = ["node_num", "hidden_size", "num_token", "num_topk", "num_experts"]
        extra = [] if mode == "ll" else ["dispatch_sms", "combine_sms"]
        _columns(a, path, [*shape, *extra, *times])
        _numbers(a, path, shape)
        if mode == "normal":
            a = a[(a["dispatch_sms"] == DEEPEP_SMS) & (a["combine_sms"] == DEEPEP_SMS)]
            a = _latency(a, [times[0], times[2]])
        else:
            a = _latency(a, times)
        us = sum(pd.to_numeric(a[c], errors="coerce").fillna(0.0) for c in times)
        nodes = a["node_num"].astype(float)
        out = pd.DataFrame(
            {
                "tokens": a["num_token"].astype(float),
                "hidden": a["hidden_size"].astype(float),
                "top_k": a["num_topk"].astype(float),
                "experts": a["num_experts"].astype(float),
                "ep": nodes * GPUS_PER_NODE.get(system, 8),
                "nodes": nodes,
                "backend": f"deepep_{mode}",
                "latency_s": us.astype(float) / 1e6,
            }
        )
    elif mode == "a2a":
        shape = ["ep_size", "node_num", "hidden_size", "topk", "num_experts", "num_tokens"]
        _columns(a, path, ["comm_backend", "phase", "comm_dtype", *shape, "latency"])
        a = _latency(a, ["latency"])
        a = a[
            a["comm_dtype"].isin(["bfloat16", "default"])
            & a["comm_backend"].astype(str).str.match(r"^(trtllm_)?deepep_(ht|ll)$")
        ]
        _numbers(a, path, shape)
        key = ["comm_backend", "sms", *shape] if "sms" in a.columns else ["comm_backend", *shape]
        per = a.groupby([*key, "phase"], as_index=False)["latency"].median()
        both = per.pivot_table(index=key, columns="phase", values="latency").dropna()
        if not {"dispatch", "combine"} <= set(both.columns):
            return pd.DataFrame(columns=["tokens", "latency_s"])
        both = both.reset_index()
        out = pd.DataFrame(
            {
                "tokens": both["num_tokens"].astype(float),
                "hidden": both["hidden_size"].astype(float),
                "top_k": both["topk"].astype(float),
                "experts": both["num_experts"].astype(float),
                "ep": both["ep_size"].astype(float),
                "nodes": both["node_num"].astype(float),
                "backend": both["comm_backend"].str.replace("trtllm_", "", regex=False),
                "latency_s": (both["dispatch"] + both["combine"]).astype(float) / 1e6,
            }
        )
        # vLLM times its high-throughput kernel at two SM counts: keep DeepEP's default
        if "sms" in both.columns:
            ht = (out["backend"] == "deepep_ht").to_numpy()
            sms = both["sms"].to_numpy()
            if (ht & (sms == DEEPEP_SMS)).any():
                out = out[~ht | (sms == DEEPEP_SMS)]
    else:
        raise AiconfiguratorError(f"all-to-all mode {mode!r} unknown (choose from ll, normal, a2a)")
    shape = ["tokens", "hidden", "top_k", "experts", "ep", "nodes", "backend"]
    return _median_per_shape(out, shape)


def gdn_frame(path: Path, phase: str) -> pd.DataFrame:
    """``batch, new_len, hidden, k_heads, v_heads, k_dim, v_dim, conv_kernel, model,
    latency_s`` of one Gated DeltaNet layer's conv + scan (context) or conv update +
    recurrent step (generation): the two kernels of a shape summed."""
    g = _read(path)
    shape = ["batch_size", "seq_len", "d_model", "d_conv"]
    shape += ["num_k_heads", "head_k_dim", "num_v_heads", "head_v_dim"]
    _columns(g, path, ["phase", "kernel_source", "model_name", *shape, "latency"])
    g = _latency(g[g["phase"] == phase], ["latency"])
    _numbers(g, path, shape)
    kernel = g["kernel_source"].astype(str)
    conv = kernel.str.startswith("causal_conv1d")
    # FlashInfer's bf16-state decode is SGLang's lane only for bf16 states: the fla kernel
    # runs the fp32 states these tables hold
    scan = ~conv & ~kernel.str.startswith("flashinfer_")
    keys = [*shape, "model_name"]
    per = g.assign(_conv=conv)[conv | scan].groupby([*keys, "_conv"], as_index=False)["latency"]
    per = per.median().pivot_table(index=keys, columns="_conv", values="latency").dropna()
    if not {True, False} <= set(per.columns):
        return pd.DataFrame(columns=["batch", "latency_s"])
    per = per.reset_index()
    out = pd.DataFrame(
        {
            "batch": per["batch_size"].astype(float),
            "new_len": per["seq_len"].astype(float) if phase == "context" else 1.0,
            "hidden": per["d_model"].astype(float),
            "k_heads": per["num_k_heads"].astype(float),
            "v_heads": per["num_v_heads"].astype(float),
            "k_dim": per["head_k_dim"].astype(float),
            "v_dim": per["head_v_dim"].astype(float),
            "conv_kernel": per["d_conv"].astype(float),
            "model": per["model_name"].astype(str),
            "latency_s": (per[True] + per[False]).astype(float) / 1e3,
        }
    )
    return out.reset_index(drop=True)


def mamba2_conv_frame(path: Path) -> pd.DataFrame:
    """``batch, new_len, heads, head_dim, state, groups, conv_kernel, phase, model, latency_s``
    of Mamba-2's causal conv1d (context: over ``seq_len`` new tokens; generation: one
    update), the only Mamba-2 kernel the table times."""
    m = _read(path)
    shape = ["batch_size", "seq_len", "nheads", "head_dim", "d_state", "n_groups", "d_conv"]
    _columns(m, path, ["phase", "model_name", *shape, "latency"])
    m = _latency(m, ["latency"])
    m = m[m["phase"].isin(["context", "generation"])]
    _numbers(m, path, shape)
    gen = (m["phase"] == "generation").to_numpy()
    out = pd.DataFrame(
        {
            "batch": m["batch_size"].astype(float),
            "new_len": np.where(gen, 1.0, m["seq_len"].astype(float)),
            "heads": m["nheads"].astype(float),
            "head_dim": m["head_dim"].astype(float),
            "state": m["d_state"].astype(float),
            "groups": m["n_groups"].astype(float),
            "conv_kernel": m["d_conv"].astype(float),
            "phase": m["phase"].astype(str),
            "model": m["model_name"].astype(str),
            "latency_s": m["latency"].astype(float) / 1e3,
        }
    )
    shape = ["batch", "new_len", "heads", "head_dim", "state", "groups", "conv_kernel", "phase"]
    return _median_per_shape(out, [*shape, "model"])


def layer_frame(system: str, engine: str, op: str, version: str | None = None):
    """(version, frame) of one ``LAYER_TABLES`` operator on ``system`` for ``engine``: the
    newest version (at or before ``version``) whose table has rows of the shapes read (a
    release may recollect a table for other models only), or None when there is none."""
    have = layer_table_versions(system, engine, op)
    if version is not None:
        have = [v for v in have if _version_key(v) <= _version_key(version)]
    for ver in reversed(have):
        frame = _layer_frame_at(system, engine, op, ver)
        if len(frame):
            return ver, frame
    return None


def _layer_frame_at(system: str, engine: str, op: str, version: str) -> pd.DataFrame:
    path, _ = layer_table_file(system, engine, op, version)
    readers = {
        "mla_context": lambda: mla_frame(path, "context"),
        "mla_generation": lambda: mla_frame(path, "generation"),
        "mla_bmm": lambda: mla_bmm_frame(path),
        "mla_context_module": lambda: mla_module_frame(path, "context"),
        "mla_generation_module": lambda: mla_module_frame(path, "generation"),
        "moe_deepseek": lambda: moe_ep_frame(path, ("balanced",)),
        "moe_wideep_context": lambda: moe_ep_frame(path, ("uniform",)),
        "moe_wideep_generation": lambda: moe_ep_frame(path, ("uniform",)),
        "a2a_ll": lambda: a2a_frame(path, "ll", system),
        "a2a_normal": lambda: a2a_frame(path, "normal", system),
        "a2a": lambda: a2a_frame(path, "a2a", system),
        "gdn_context": lambda: gdn_frame(path, "context"),
        "gdn_generation": lambda: gdn_frame(path, "generation"),
        "mamba2_conv": lambda: mamba2_conv_frame(path),
    }
    return readers[op]()


# ------------------------------------------------------------------------------------------------
# those rows through hisim's kernel terms (roofline.py), as calibrate.KernelSet families


_NEEDS_MLA = Needs(moe=False, comm=False, attention="any", kinds=("mla",))
_NEEDS_GDN = Needs(moe=False, comm=False, attention="any", kinds=("gdn",))
_NEEDS_MAMBA = Needs(moe=False, comm=False, attention="any", kinds=("mamba2",))


def _rows_dims(model: str, n: int, **fields) -> ops.ModelDims:
    """``n`` copies of a shipped model's dims (tp 1) with some fields set per row, one layer
    of the kind timed (the layer counts are the callers' to set)."""
    dims = jax.tree.map(lambda x: _f(np.full(n, float(x))), ops.model_dims(load_model(model)))
    names = tuple(fields)
    return eqx.tree_at(
        lambda d: tuple(getattr(d, k) for k in names),
        dims,
        tuple(_f(np.broadcast_to(np.asarray(v, dtype=float), n)) for v in fields.values()),
    )


def _one_layer(**kinds) -> dict:
    counts = {k: 0.0 for k in ("n_full", "n_sliding", "n_chunked", "n_mla", "n_gdn", "n_mamba")}
    return {**counts, "dense_layers": 0.0, "moe_layers": 0.0, "layers": 1.0, **kinds}


def _uniform_features(dims, cache, new, batch, be, needs):
    """``roofline.step_features`` of ``batch`` identical requests per row (one request's, the
    summed quantities scaled), rows ``[N]``: the tables time uniform batches."""

    def one(d, c, n, b):
        f = step_features(d, Batch(c[None], n[None], jnp.ones(1, c.dtype)), be, jnp, needs)

        def scale(k, v):
            if isinstance(v, dict):
                return {kk: scale(kk, vv) for kk, vv in v.items()}
            summed = k in cal._SUMMED_FEATURES or k in _STEP_SUMS
            return v * b if summed and v is not None else v

        return {k: scale(k, v) for k, v in f.items()}

    return jax.vmap(one)(dims, cache, new, batch)


_STEP_SUMS = (
    "n_dec", "n_pf", "pf_keys", "pf_tokens", "gdn_chunks", "mamba_chunks", "mla_abs_req",
    "mla_abs_tokens", "mla_mha_req", "mla_mha_keys",
)  # fmt: skip
_uniform_features_fn = jax.jit(_uniform_features, static_argnames=("be", "needs"))


def _uniform_features_jit(dims, cache, new, batch, be, needs):
    f = _uniform_features_fn(dims, _f(cache), _f(new), _f(batch), be, needs)
    return jax.tree.map(np.asarray, f)


def _gemm_rates(p: Params, dims: ops.ModelDims, hw: ops.HwArrays):
    """The GEMM peak and bandwidth exactly as ``roofline.costs`` sets them."""
    low = jnp.maximum(dims.weight_bytes, dims.gemm_in_bytes) < 1.5
    peak = ops.gemm_peak_flops(dims, hw) * jnp.where(low, p.gemm_fp8_flops_eff, p.gemm_flops_eff)
    return peak, hw.hbm_bytes_per_s * p.gemm_bytes_eff


def _no_gemm(*_):
    return 0.0


class _Rows(eqx.Module):
    """Per-row arrays of a family: dims, features or token counts, and the row's GPU."""

    dims: ops.ModelDims
    f: dict
    hw: ops.HwArrays


def _attn_rows_s(p: Params, rows: cal.AttnRows):
    return cal._attn_kernel_s(p, rows, rows.hw)


def _mla_attn_rows_s(p: Params, rows: cal.AttnRows):
    """An MLA kernel's rows at the MLA rates, as ``roofline._mla_s`` prices them."""
    p = eqx.tree_at(
        lambda q: (q.attn_flops_eff, q.attn_bytes_eff), p, (p.mla_flops_eff, p.mla_bytes_eff)
    )
    return cal._attn_kernel_s(p, rows, rows.hw)


def _bmm_rows_s(p: Params, rows: _Rows):
    """The absorbed decode's batched GEMMs: ``_mla_s``'s projections with every plain GEMM
    zeroed (q_a/kv_a, q_b, kv_b are other kernels), which leaves exactly its absorb term."""

    def one(d, f, h):
        peak, bw = _gemm_rates(p, d, h)
        return _mla_s(p, d, f, h, attn.FA2, jnp, _NEEDS_MLA, _no_gemm, peak, bw)[0]

    return jax.vmap(one)(rows.dims, rows.f, rows.hw)


def _module_s(p: Params, rows: _Rows, be):
    """One MLA layer as ``roofline.costs`` prices it: its projections, o_proj and attention."""

    def one(d, f, h):
        c = costs(p, d, f, h, be, jnp, _NEEDS_MLA)
        return c["qkv_proj"] + c["o_proj"] + c["attention"]

    return jax.vmap(one)(rows.dims, rows.f, rows.hw)


_MODULE_PREDICT = {b: partial(_module_s, be=ATTENTION_BACKENDS[b]) for b in ATTENTION_BACKENDS}


def _moe_rows_s(p: Params, rows: _Rows):
    """``roofline._moe_s`` of one MoE layer without its router GEMM and shared expert (other
    kernels): the routed experts' grouped GEMMs on one EP rank."""
    peak, bw = _gemm_rates(p, rows.dims, rows.hw)
    return _moe_s(p, rows.dims, rows.f["tokens"], peak, bw, _no_gemm, jnp, rows.hw)


def _a2a_rows_s(p: Params, rows: _Rows):
    """The all-to-alls of one MoE layer under attention DP and EP: ``_communication_s`` of a
    one-MoE-layer model minus the same model without it (the logits gather cancels)."""
    t, r = rows.f["tokens"], rows.f["requests"]
    with_moe = _communication_s(p, rows.dims, t, r, rows.hw, jnp)
    no_moe = eqx.tree_at(lambda d: d.moe_layers, rows.dims, 0.0 * t)
    return with_moe - _communication_s(p, no_moe, t, r, rows.hw, jnp)


def _gdn_rows_s(p: Params, rows: _Rows):
    return jax.vmap(lambda d, f, h: _recurrent_s(p, d, f, h, "gdn", jnp))(
        rows.dims, rows.f, rows.hw
    )


def _conv_rows_s(p: Params, rows: _Rows):
    """The conv share of ``_recurrent_s`` for Mamba-2 (the table times nothing else): the
    states' bytes zeroed (``state_bytes`` 0 in the rows) and the scan's math not binding."""
    p = eqx.tree_at(
        lambda q: (q.scan_flops_eff, q.scan_fixed_s), p, (ops._float(1e30), ops._float(0.0))
    )
    return jax.vmap(lambda d, f, h: _recurrent_s(p, d, f, h, "mamba2", jnp))(
        rows.dims, rows.f, rows.hw
    )


def _mla_dims(frame: pd.DataFrame) -> ops.ModelDims:
    """DeepSeek-V3's dims, one MLA layer, with each row's heads per rank, KV bytes and (where
    the frame has a ``gemm`` column) linear-layer format; bf16 otherwise."""
    gemm = frame["gemm"] if "gemm" in frame.columns else pd.Series("bfloat16", frame.index)
    return _rows_dims(
        "deepseek-v3",
        len(frame),
        **_one_layer(n_mla=1.0),
        mla_heads=frame["heads"],
        kv_bytes=frame["kv_bytes"] if "kv_bytes" in frame.columns else 2.0,
        weight_bytes=gemm.map(lambda g: ops.DTYPE_BYTES[GEMM_FORMATS[g][0]]),
        gemm_in_bytes=gemm.map(lambda g: ops.DTYPE_BYTES[GEMM_FORMATS[g][1]]),
        shared_inter=0.0,
    )


def mla_backend(system: str, kernels) -> str:
    """The attention grid MLA rows go through: FA3's (attention/fa3.py) for every MLA kernel.
    FlashMLA, FA3, TRT-LLM's and FlashInfer's MLA kernels all pack the query heads that share
    the one latent KV head into the rows of 64- or 128-row tiles and split the KV axis of a
    small batch, which FA3's grid models; FA2's (one 128-row tile per head group, its own
    split rule) overstates their work 2-3x (leave-one-GPU-out MAPE of TRT-LLM's generation
    table 58% through FA2's grid, 47% through FA3's, 54% through FlashInfer's)."""
    del system, kernels
    return "fa3"


def _grouped(op: str, parts: Sequence[tuple[str, pd.DataFrame]]):
    """``parts`` by the attention grid their rows go through: [(backend, [(system, frame)])]."""
    groups: dict[str, list] = {}
    for system, frame in parts:
        if op in _ATTENTION_OPS:
            for kernel, sub in frame.groupby("kernel", sort=True):
                groups.setdefault(mla_backend(system, [kernel]), []).append((system, sub))
        else:
            groups.setdefault("fa2", []).append((system, frame))
    return sorted(groups.items())


_ATTENTION_OPS = ("mla_context", "mla_generation", "mla_context_module", "mla_generation_module")


def kernel_set_parts(op: str, parts: Sequence[tuple[str, pd.DataFrame]]):
    """(system, frame) pieces of ``parts`` in the order ``kernel_sets`` lays out their rows."""
    return [item for _, items in _grouped(op, parts) for item in items]


def kernel_sets(
    op: str, parts: Sequence[tuple[str, pd.DataFrame]], pad_to: int | None = None
) -> list[cal.KernelSet]:
    """``calibrate.KernelSet`` families of operator ``op`` (``LAYER_TABLES``) over the frames of
    one or more systems (``parts``: (system, frame)); rows on different attention grids make
    different sets (``kernel_set_parts`` gives the rows' order)."""
    out = []
    for be, items in _grouped(op, parts):
        frame = pd.concat([f for _, f in items], ignore_index=True)
        hws = [load_hardware(hardware_name(s)) for s, _ in items]
        hw = _per_row_hw(hws, [len(f) for _, f in items])
        predict, data, floor = _family(op, frame, hw, be)
        out.append(cal.kernel_set(predict, data, frame["latency_s"], floor, pad_to))
    return out


def _family(op: str, frame: pd.DataFrame, hw: ops.HwArrays, be: str):
    """(predict, data, floor name) of one operator's rows."""
    n = len(frame)
    backend = ATTENTION_BACKENDS[be]
    if op in ("mla_context", "mla_generation"):
        dims = _mla_dims(frame)
        absorbed = ops.mla_decode_attention(dims)
        mha = ops.mla_prefill_attention(dims)
        sel = frame["absorbed"].to_numpy(dtype=bool)
        a = jax.tree.map(lambda x, y: _f(np.where(sel, x, y)), absorbed, mha)
        batches = Batch(
            _f(frame["cache_len"])[:, None], _f(frame["new_len"])[:, None], _f(np.ones((n, 1)))
        )
        rows = cal.AttnRows(a, batches, _f(frame["latency_s"]), _f(frame["batch"]), hw, backend)
        return _mla_attn_rows_s, rows, "floor_attn"
    if op == "mla_bmm":
        frame = frame.assign(gemm=frame["dtype"].map({"bf16": "bfloat16", "fp8": "fp8"}))
        dims = _mla_dims(frame)
        zeros = np.zeros(n)
        f = _uniform_features_jit(dims, zeros, zeros + 1.0, frame["tokens"], backend, _NEEDS_MLA)
        return _bmm_rows_s, _Rows(dims, f, hw), "floor_gemm"
    if op in ("mla_context_module", "mla_generation_module"):
        dims = _mla_dims(frame)
        f = _uniform_features_jit(
            dims, frame["cache_len"], frame["new_len"], frame["batch"], backend, _NEEDS_MLA
        )
        return _MODULE_PREDICT[be], _Rows(dims, f, hw), "floor_module"
    if op.startswith("moe_"):
        fmt = frame["dtype"].map(GEMM_FORMATS)
        wb = fmt.map(lambda x: ops.DTYPE_BYTES[x[0]])
        dims = _rows_dims(
            "deepseek-v3",
            n,
            **_one_layer(moe_layers=1.0),
            hidden=frame["hidden"],
            experts=frame["experts"],
            top_k=frame["top_k"],
            moe_inter=frame["moe_inter"],
            ep=frame["ep"],
            experts_local=frame["experts"] / frame["ep"],
            shared_inter=0.0,
            weight_bytes=wb,
            expert_weight_bytes=wb,
            gemm_in_bytes=fmt.map(lambda x: ops.DTYPE_BYTES[x[1]]),
        )
        return _moe_rows_s, _Rows(dims, {"tokens": _f(frame["tokens"])}, hw), "floor_moe"
    if op.startswith("a2a"):
        ep = frame["ep"]
        dims = _rows_dims(
            "deepseek-v3",
            n,
            **_one_layer(moe_layers=1.0),
            hidden=frame["hidden"],
            experts=frame["experts"],
            top_k=frame["top_k"],
            tp=ep,
            ep=ep,
            dp=ep,
            vocab=0.0,
        )
        # the layer's batch over every attention-DP rank: t / dp per rank is the table's
        tokens = _f(frame["tokens"] * ep)
        # DeepEP's low-latency kernels run decode steps (a token a request), its normal ones
        # prefills: one request per row's tokens, or one request in all
        ll = frame["backend"].isin(["deepep_ll"]).to_numpy()
        requests = _f(np.where(ll, frame["tokens"] * ep, 1.0))
        return _a2a_rows_s, _Rows(dims, {"tokens": tokens, "requests": requests}, hw), ""
    if op.startswith("gdn"):
        dims = _rows_dims(
            "qwen3.5-27b",
            n,
            **_one_layer(n_gdn=1.0),
            hidden=frame["hidden"],
            gdn_k_heads=frame["k_heads"],
            gdn_v_heads=frame["v_heads"],
            gdn_k_dim=frame["k_dim"],
            gdn_v_dim=frame["v_dim"],
            conv_kernel=frame["conv_kernel"],
            state_bytes=GDN_STATE_BYTES,
        )
        f = _uniform_features_jit(
            dims, np.zeros(n), frame["new_len"], frame["batch"], attn.FA2, _NEEDS_GDN
        )
        return _gdn_rows_s, _Rows(dims, f, hw), "floor_gdn"
    if op == "mamba2_conv":
        dims = _rows_dims(
            "nemotron-h-56b",
            n,
            **_one_layer(n_mamba=1.0),
            m_heads=frame["heads"],
            m_head_dim=frame["head_dim"],
            m_state=frame["state"],
            m_groups=frame["groups"],
            conv_kernel=frame["conv_kernel"],
            state_bytes=0.0,
        )
        f = _uniform_features_jit(
            dims, np.zeros(n), frame["new_len"], frame["batch"], attn.FA2, _NEEDS_MAMBA
        )
        return _conv_rows_s, _Rows(dims, f, hw), "floor_conv"
    raise AiconfiguratorError(
        f"kernel table {op!r} unknown (choose from {', '.join(LAYER_TABLES)})"
    )


# the parameters each family's timings can show
# MLA's own rates in place of the GQA kernels' (its tables also show the block-schedule terms)
MLA_NAMES = ("mla_flops_eff", "mla_bytes_eff") + tuple(
    n for n in ATTN_NAMES if n not in ("attn_flops_eff", "attn_bytes_eff")
)
MOE_NAMES = GEMM_NAMES + ("moe_tile_s", "moe_fp8_flops_eff")
A2A_NAMES = ("comm_eff", "a2a_sm_gb_s", "a2a_latency_s")
SCAN_NAMES = ("scan_flops_eff", "scan_bytes_eff", "scan_fixed_s", "gemm_blend")
LAYER_FIT_NAMES = {
    "mla_context": MLA_NAMES,
    "mla_generation": MLA_NAMES,
    "mla_bmm": GEMM_NAMES,
    "mla_context_module": GEMM_NAMES + MLA_NAMES,
    "mla_generation_module": GEMM_NAMES + MLA_NAMES,
    "moe_deepseek": MOE_NAMES,
    "moe_wideep_context": MOE_NAMES,
    "moe_wideep_generation": MOE_NAMES,
    "a2a_ll": A2A_NAMES,
    "a2a_normal": A2A_NAMES,
    "a2a": A2A_NAMES,
    "gdn_context": SCAN_NAMES,
    "gdn_generation": SCAN_NAMES,
    "mamba2_conv": ("scan_bytes_eff",),
}


def predict_sets(p: Params, sets: Sequence[cal.KernelSet], floors: dict | None = None):
    """(predicted, measured) seconds of the real (unpadded) rows of ``sets``, concatenated."""
    p = as_float_params(p)
    pred, meas = [], []
    for ks in sets:
        keep = np.asarray(ks.weight) > 0
        pred.append(np.asarray(_set_s(p, ks, floors))[keep])
        meas.append(np.asarray(ks.measured_s)[keep])
    return np.concatenate(pred), np.concatenate(meas)


_set_s = eqx.filter_jit(cal.kernel_set_s)


def error_stats(pred, meas) -> dict:
    """MAPE, p90 and max of |predicted / measured - 1|, the bias, and the row count."""
    out = _mape(pred, meas)
    out["bias"] = float(np.mean(np.asarray(pred) / np.asarray(meas) - 1.0))
    return out


__all__ = [
    "AiconfiguratorError",
    "LAYER_TABLES",
    "SYSTEMS",
    "calibrate_from_aiconfigurator",
    "data_root",
    "available_engines",
    "error_stats",
    "hardware_name",
    "kernel_set_parts",
    "kernel_sets",
    "layer_frame",
    "layer_table_file",
    "leave_one_gpu_out",
    "predict_sets",
    "read_tables",
    "resolve_version",
    "system_name",
    "available_systems",
    "versions",
]
