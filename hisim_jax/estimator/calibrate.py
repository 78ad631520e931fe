"""Fit the estimator's scale factors to measured profiles with optax, and report the fit.

Inputs are tables in the formats of ``../shared/profiles`` (see ``data/profiles/README.md``):

* ``steps.csv``      whole forward steps replayed as CUDA graphs: the main target;
* ``gemm.csv``       single eager GEMMs: pin the GEMM efficiencies apart from the elementwise
                     coefficients, with which they are collinear on prefill steps;
* ``attention.csv``  single eager FlashAttention calls: pin the attention rates likewise.

Eager calls carry a launch floor the graph-replayed steps do not, so each micro table gets its
own additive floor (``eager_*_s``) that only exists during the fit. The loss is the mean squared
log error (a symmetric relative error), plus a weak pull of every parameter towards its physics
prior so that near-collinear pairs (a per-layer and a per-step constant) stay physical.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from hisim_jax import files
from hisim_jax.estimator.attention import fa2 as attn
from hisim_jax.estimator.batch import Batch, pack, parse_batch
from hisim_jax.estimator.roofline import (
    FIT_NAMES,
    PARAM_NAMES,
    Params,
    _attention_s,
    _roofline_s,
    as_float_params,
    features,
    ops,
    params_to_dict,
    step_s,
    step_seconds_rows,
)
from hisim_jax.specs import HardwareSpec, SpecError, load_model

STEPS_COLUMNS = ("model", "batch")
STEP_TIME_COLUMN = "step_ms"
PRIOR_WEIGHT = 1.0e-3
MICRO_WEIGHT = 0.1
# Micro rows this close to the eager launch floor say nothing about the kernel.
GEMM_MIN_MS = 0.08
ATTN_MIN_MS = 0.15


def _eager_ms(frame: pd.DataFrame) -> pd.Series:
    """An eager call's kernel time: the fastest of its timed runs when the table has it.

    Host-side jitter and interference only ever add to an eager call's time (the median of a
    handful of runs can sit 20-50% above the fastest), while the graph-replayed steps are
    steady; the fastest run is the best estimate of what the kernel itself takes."""
    col = frame["ms_min"] if "ms_min" in frame.columns else frame["ms"]
    return pd.to_numeric(col, errors="coerce")


class ProfileError(SpecError):
    """A bad profile table: one line naming the file, row and field."""


def _read_table(path: str | Path, **pandas_kw) -> pd.DataFrame:
    return files.read_csv(path, "profile table (CSV)", ProfileError, **pandas_kw)


def _check_positive(frame: pd.DataFrame, col: str, path, values=None) -> None:
    """Every value of column ``col`` a finite number > 0, else name the first bad line."""
    v = (
        pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        if values is None
        else values
    )
    bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
    if len(bad):
        i = int(bad[0])
        raise ProfileError(
            f"{path}: line {i + 2}: field '{col}' must be a finite number > 0, "
            f"got {files.plain(frame[col].iloc[i])!r}"
        )


@dataclass(frozen=True)
class StepRows:
    """Rows of a steps table as stacked arrays; each row has its own model."""

    frame: pd.DataFrame
    dims: ops.ModelDims  # leaves [N]
    batches: Batch  # leaves [N, R]
    measured_s: np.ndarray  # [N]


def _float_tree(tree):
    return jax.tree.map(ops._float, tree)


def read_steps(
    path: str | Path,
    require_time: bool = True,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    act_dtype: str | None = None,
) -> StepRows:
    """Read a steps table (``model``, ``batch`` and, for fitting, ``step_ms``); other columns
    are kept in ``frame`` and otherwise ignored."""
    path = Path(path)
    frame = _read_table(path)
    needed = STEPS_COLUMNS + ((STEP_TIME_COLUMN,) if require_time else ())
    for col in needed:
        if col not in frame.columns:
            raise ProfileError(f"{path}: missing column '{col}' (have: {', '.join(frame.columns)})")
    if frame.empty:
        raise ProfileError(f"{path}: no rows")
    batches, models = [], {}
    for i, row in enumerate(frame.itertuples(index=False)):
        line = i + 2  # header is line 1
        try:
            batches.append(parse_batch(str(row.batch), where=f"{path}: line {line}: field 'batch'"))
        except ValueError as e:
            raise ProfileError(str(e)) from None
        name = str(row.model)
        if name not in models:
            try:
                models[name] = load_model(name)
            except SpecError as e:
                raise ProfileError(f"{path}: line {line}: field 'model': {e}") from None
    measured = np.full(len(frame), np.nan)
    if STEP_TIME_COLUMN in frame.columns:
        measured = pd.to_numeric(frame[STEP_TIME_COLUMN], errors="coerce").to_numpy() / 1e3
        if require_time:
            _check_positive(frame, STEP_TIME_COLUMN, path, measured)
    try:
        dims_by_model = {
            n: ops.model_dims(m, tp, weight_dtype, kv_dtype, act_dtype) for n, m in models.items()
        }
    except ValueError as e:
        raise ProfileError(f"{path}: {e}") from None
    dims = ops.stack([dims_by_model[str(m)] for m in frame["model"]])
    return StepRows(frame, _float_tree(dims), _float_tree(pack(batches)), measured)


def subset(rows: StepRows, index) -> StepRows:
    """The rows at positions ``index`` (for cross-validation)."""
    idx = np.asarray(index)
    return StepRows(
        rows.frame.iloc[idx].reset_index(drop=True),
        jax.tree.map(lambda x: x[idx], rows.dims),
        jax.tree.map(lambda x: x[idx], rows.batches),
        rows.measured_s[idx],
    )


def predict_steps_s(
    params: Params, rows: StepRows, hw: HardwareSpec, chunk: int = 512, be=attn.FA2
) -> np.ndarray:
    """Predicted seconds for every row of a steps table, in chunks to bound memory, through
    the attention grid ``be`` (the calibration's ``attention_model``)."""
    hwa = ops.hw_arrays(hw)
    p = as_float_params(params)
    out = []
    n = len(rows.measured_s)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        d = jax.tree.map(lambda x, sl=sl: x[sl], rows.dims)
        b = jax.tree.map(lambda x, sl=sl: x[sl], rows.batches)
        out.append(np.asarray(step_seconds_rows(p, d, b, hwa, be)))
    return np.concatenate(out) if out else np.zeros(0)


# ------------------------------------------------------------------------------------------------
# micro tables


class GemmRows(eqx.Module):
    m: np.ndarray
    k: np.ndarray
    n: np.ndarray
    weight_bytes: np.ndarray
    measured_s: np.ndarray
    # per-row GPU (leaves [N]) when the rows come from several GPUs; None: the fit's GPU
    hw: ops.HwArrays | None = None


class AttnRows(eqx.Module):
    dims: ops.ModelDims
    batches: Batch
    measured_s: np.ndarray
    # requests per row when each row is ``repeat`` identical copies of its batch (kernel tables
    # time uniform batches: one request's features, summed ones scaled); None: the batch as is
    repeat: np.ndarray | None = None
    hw: ops.HwArrays | None = None  # per-row GPU, as in GemmRows
    backend: attn.AttentionBackend = eqx.field(static=True, default=attn.FA2)  # kernel timed


class CommRows(eqx.Module):
    """All-reduce timings: ``elems`` activation elements over ``tp`` ranks, per-row link."""

    elems: np.ndarray
    tp: np.ndarray
    interconnect_bytes_per_s: np.ndarray
    measured_s: np.ndarray


def read_gemm(path: Path, models: set[str] | None = None) -> GemmRows:
    """Eager GEMM timings (rows near the launch floor dropped); optionally only some models'."""
    g = _read_table(path)
    for col in ("dtype", "m", "k", "n", "ms"):
        if col not in g.columns:
            raise ProfileError(f"{path}: missing column '{col}'")
    for col in ("m", "k", "n", "ms", *(("ms_min",) if "ms_min" in g.columns else ())):
        _check_positive(g, col, path)
    g = g.assign(ms=_eager_ms(g))
    g = g[g["ms"] >= GEMM_MIN_MS]
    if models is not None and "model" in g.columns:
        g = g[g["model"].isin(models)]
    wb = g["dtype"].map(ops.DTYPE_BYTES)
    if wb.isna().any():
        bad = g["dtype"][wb.isna()].iloc[0]
        raise ProfileError(f"{path}: field 'dtype' has unknown value {bad!r}")
    f = ops._float
    return GemmRows(f(g.m.values), f(g.k.values), f(g.n.values), f(wb.values), f(g.ms.values / 1e3))


def read_attention(
    path: Path, template: ops.ModelDims, heads: set[tuple[int, int]] | None = None
) -> AttnRows:
    """Eager attention timings; optionally only the (q heads, kv heads) shapes in ``heads``."""
    a = _read_table(path)
    for col in ("nq", "nkv", "d", "batch", "ms"):
        if col not in a.columns:
            raise ProfileError(f"{path}: missing column '{col}'")
    for col in ("nq", "nkv", "d", "ms", *(("ms_min",) if "ms_min" in a.columns else ())):
        _check_positive(a, col, path)
    a = a.assign(ms=_eager_ms(a))
    a = a[a["ms"] >= ATTN_MIN_MS]
    if heads is not None:
        a = a[[(int(q), int(k)) in heads for q, k in zip(a["nq"], a["nkv"], strict=True)]]
    if a.empty:
        raise ProfileError(
            f"{path}: no row to fit: every 'ms' is below {ATTN_MIN_MS} ms (launch-bound) or of "
            "a head shape no profiled model has"
        )
    dims = []
    for row in a.itertuples(index=False):
        dims.append(
            eqx.tree_at(
                lambda d: (d.q_heads, d.kv_heads, d.head_dim),
                template,
                (ops._float(row.nq), ops._float(row.nkv), ops._float(row.d)),
            )
        )
    batches = [
        parse_batch(str(b), where=f"{path}: line {int(i) + 2}: field 'batch'")
        for i, b in zip(a.index, a["batch"], strict=True)
    ]
    return AttnRows(
        _float_tree(ops.stack(dims)), _float_tree(pack(batches)), ops._float(a.ms.values / 1e3)
    )


def _gemm_kernel_s(p: Params, g: GemmRows, hw: ops.HwArrays):
    hw = hw if g.hw is None else g.hw
    fp8 = g.weight_bytes < 1.5
    peak = jnp.where(
        fp8, hw.fp8_flops_per_s * p.gemm_fp8_flops_eff, hw.bf16_flops_per_s * p.gemm_flops_eff
    )
    flops = 2.0 * g.m * g.k * g.n
    bytes_ = g.k * g.n * g.weight_bytes + g.m * g.k * g.weight_bytes + g.m * g.n * 2.0
    return _roofline_s(
        flops,
        bytes_,
        peak,
        hw.hbm_bytes_per_s * p.gemm_bytes_eff,
        p.gemm_blend,
        jnp,
    )


# features that are sums over a batch's requests (the others are maxima or flags)
_SUMMED_FEATURES = (
    "tokens", "n_req", "pf_work", "pf_blocks", "dec_std_keys", "dec_split_keys", "fa3_work",
    "fa3_keys", "fa3_blocks", "fi_work", "fi_keys", "fi_mblocks", "fi_kv_total",
)  # fmt: skip


def _attn_kernel_s(p: Params, a: AttnRows, hw: ops.HwArrays):
    be = a.backend

    def one(d, b, repeat, h):
        f = features(d, b, be)
        if repeat is not None:
            f = {k: v * repeat if k in _SUMMED_FEATURES else v for k, v in f.items()}
        return _attention_s(p, d, f, h, be, jnp)

    rep_axis = None if a.repeat is None else 0
    hw_axis, hw = (None, hw) if a.hw is None else (0, a.hw)
    return jax.vmap(one, in_axes=(0, 0, rep_axis, hw_axis))(a.dims, a.batches, a.repeat, hw)


def _comm_kernel_s(p: Params, c: CommRows):
    """One all-reduce, as the roofline's communication term costs it."""
    ring = ops.allreduce_bytes_per_rank(c.elems, _RingDims(c.tp, ops._float(2.0)))
    return ring / (c.interconnect_bytes_per_s * p.comm_eff) + p.comm_latency_s


@dataclass(frozen=True)
class _RingDims:
    """The two fields of ModelDims that the all-reduce traffic formula reads."""

    tp: jnp.ndarray
    act_bytes: jnp.ndarray


# ------------------------------------------------------------------------------------------------
# the fit


def _eager_s(kernel_s, log_floor_s):
    """An eager call's time: the kernel or the host launch path, whichever is slower (smoothly)."""
    floor = jnp.exp(log_floor_s)
    return (kernel_s**4 + floor**4) ** 0.25


def _log_mse(pred, meas):
    return jnp.mean((jnp.log(pred) - jnp.log(meas)) ** 2)


@eqx.filter_jit
def _loss(
    log_fit,
    fixed: Params,
    prior_log,
    prior_weight,
    steps,
    gemm,
    attn_rows,
    hw,
    comm=None,
    micro_weight=MICRO_WEIGHT,
):
    p = _with_fitted(fixed, log_fit)
    loss = 0.0
    if steps is not None:
        step_pred = jax.vmap(lambda d, b: step_s(p, d, b, hw))(steps[0], steps[1])
        loss = _log_mse(step_pred, steps[2])
    if gemm is not None:
        pred = _eager_s(_gemm_kernel_s(p, gemm, hw), log_fit["eager_gemm_s"])
        loss = loss + micro_weight * _log_mse(pred, gemm.measured_s)
    if attn_rows is not None:
        kern = _attn_kernel_s(p, attn_rows, hw)
        if "eager_attn_scale" in log_fit:  # see fit()
            kern = kern * jnp.exp(log_fit["eager_attn_scale"])
        pred = _eager_s(kern, log_fit["eager_attn_s"])
        loss = loss + micro_weight * _log_mse(pred, attn_rows.measured_s)
    if comm is not None:
        loss = loss + micro_weight * _log_mse(_comm_kernel_s(p, comm), comm.measured_s)
    prior = sum((log_fit[k] - prior_log[k]) ** 2 for k in prior_log)
    return loss + prior_weight * prior


# module level, so fits of equal shapes (folds, GPUs) compile once
_loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))


def _with_fitted(fixed: Params, log_fit) -> Params:
    names = [n for n in PARAM_NAMES if n in log_fit]
    return eqx.tree_at(
        lambda p: [getattr(p, n) for n in names], fixed, [jnp.exp(log_fit[n]) for n in names]
    )


@dataclass(frozen=True)
class FitResult:
    params: Params
    loss_history: list[float]
    eager_s: dict[str, float]


def fit(
    steps: StepRows | None,
    hw: HardwareSpec,
    gemm: GemmRows | None = None,
    attention_rows: AttnRows | None = None,
    init: Params | None = None,
    fit_names: tuple[str, ...] = FIT_NAMES,
    steps_n: int = 1500,
    learning_rate: float = 0.03,
    prior_weight: float = PRIOR_WEIGHT,
    progress=None,
    comm: CommRows | None = None,
    micro_weight: float = MICRO_WEIGHT,
    eager_init_s: dict[str, float] | None = None,
) -> FitResult:
    """Adam on log-parameters; deterministic for given inputs. ``steps`` may be None to fit on
    per-operator tables alone (``comm``: all-reduce timings); ``eager_init_s`` overrides the
    starting launch floors (``eager_gemm_s``, ``eager_attn_s``)."""
    init = as_float_params(init or Params())
    hwa = ops.hw_arrays(hw)
    log_fit = {n: jnp.log(getattr(init, n)) for n in fit_names}
    floors = {"eager_gemm_s": 20e-6, "eager_attn_s": 50e-6, **(eager_init_s or {})}
    if gemm is not None:
        log_fit["eager_gemm_s"] = ops._float(np.log(floors["eager_gemm_s"]))
    if attention_rows is not None:
        log_fit["eager_attn_s"] = ops._float(np.log(floors["eager_attn_s"]))
        if steps is not None:
            # An eager FlashAttention call runs slower than the same kernel inside a
            # graph-replayed step (fitted 1.11x on the H100 profiles): the micro-benchmarks
            # then shape the attention model (grids, splits, co-residency) while the steps set
            # its level. Alone, the scale would only trade with the efficiencies.
            log_fit["eager_attn_scale"] = ops._float(0.0)
    prior_log = {n: jnp.log(getattr(Params(), n) * 1.0) for n in fit_names}
    prior_log = jax.tree.map(ops._float, prior_log)
    step_data = None if steps is None else (steps.dims, steps.batches, ops._float(steps.measured_s))
    step_args = (step_data, gemm, attention_rows, hwa, comm, ops._float(micro_weight))
    log_fit, history = _adam(
        lambda lf: _loss_and_grad(lf, init, prior_log, ops._float(prior_weight), *step_args),
        log_fit,
        steps_n,
        learning_rate,
        progress,
    )
    params = _with_fitted(init, {n: log_fit[n] for n in fit_names})
    eager = {k: float(jnp.exp(v)) for k, v in log_fit.items() if k.startswith("eager_")}
    return FitResult(params, history, eager)


# ------------------------------------------------------------------------------------------------
# kernel families of any shape: a prediction function per family, fitted together


class KernelSet(eqx.Module):
    """Timings of one kernel family as a fit sees them: ``predict(p, data)`` gives the kernel
    seconds ``[N]`` of every row from Params and the rows' arrays (``data``, a pytree that
    carries the rows' GPUs too), ``weight`` masks padding rows (0), and ``floor`` names the
    family's launch floor (``""``: none), a smooth max with the kernel time fitted beside the
    parameters (the tables time single kernels, whose host launch or minimal duration no
    step-level term carries)."""

    data: Any
    measured_s: np.ndarray
    weight: np.ndarray
    predict: Callable = eqx.field(static=True)
    floor: str = eqx.field(static=True, default="")


def kernel_set(predict, data, measured_s, floor: str = "", pad_to: int | None = None) -> KernelSet:
    """A ``KernelSet`` whose rows are padded (copies of the first row, weight 0) to ``pad_to``
    rows, so that fits over sets of nearly equal sizes compile one program."""
    measured = np.asarray(measured_s, dtype=np.result_type(float))
    n = len(measured)
    if n == 0:
        raise ValueError("a kernel set needs at least one row")
    size = max(n, pad_to or n)
    idx = np.concatenate([np.arange(n), np.zeros(size - n, dtype=int)])
    weight = (np.arange(size) < n).astype(measured.dtype)
    data = jax.tree.map(lambda x: np.asarray(x)[idx], data)
    return KernelSet(data, measured[idx], weight, predict, floor)


def kernel_set_s(p: Params, ks: KernelSet, floors: dict | None = None):
    """Seconds of every row of ``ks`` (padding included): the kernel, behind the family's
    launch floor when ``floors`` (name -> seconds) has it."""
    kernel = ks.predict(p, ks.data)
    if ks.floor and floors is not None and ks.floor in floors:
        return _eager_s(kernel, jnp.log(ops._float(floors[ks.floor])))
    return kernel


@eqx.filter_jit
def _sets_loss(log_fit, fixed: Params, prior_log, prior_weight, sets):
    p = _with_fitted(fixed, log_fit)
    loss = 0.0
    for ks in sets:
        kernel = ks.predict(p, ks.data)
        pred = _eager_s(kernel, log_fit[ks.floor]) if ks.floor else kernel
        err = (jnp.log(pred) - jnp.log(ks.measured_s)) ** 2
        loss = loss + jnp.sum(ks.weight * err) / jnp.sum(ks.weight)
    prior = sum((log_fit[k] - prior_log[k]) ** 2 for k in prior_log)
    return loss / len(sets) + prior_weight * prior


_sets_loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_sets_loss))


def _adam(loss_and_grad, log_fit: dict, steps_n: int, learning_rate: float, progress=None):
    """Adam on the log-parameters ``log_fit``: ``loss_and_grad(log_fit) -> (loss, grads)``.
    Returns the fitted log-parameters and the loss every 50 steps (and at the last)."""
    opt = optax.adam(learning_rate)
    state = opt.init(log_fit)
    history = []
    for i in range(steps_n):
        loss, grads = loss_and_grad(log_fit)
        # optax's bias correction mixes an int32 step count with float decays, which strict
        # dtype promotion (used by the tests) rejects; the model itself stays strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, log_fit)
        log_fit = optax.apply_updates(log_fit, updates)
        if i % 50 == 0 or i == steps_n - 1:
            history.append(float(loss))
        if progress is not None:
            progress(i + 1, steps_n)
    return log_fit, history


def fit_kernel_sets(
    sets: Sequence[KernelSet],
    init: Params | None = None,
    fit_names: tuple[str, ...] = (),
    steps_n: int = 600,
    learning_rate: float = 0.03,
    prior_weight: float = PRIOR_WEIGHT,
    floor_init_s: float = 5e-6,
    progress=None,
) -> FitResult:
    """Adam on log-parameters over kernel families (each family's mean squared log error
    counts once, whatever its rows), with the pull towards Params' physics priors of ``fit``
    and each family's launch floor fitted beside. Deterministic for given inputs."""
    sets = tuple(sets)
    if not sets:
        raise ValueError("fit_kernel_sets: no kernel set to fit")
    unknown = set(fit_names) - set(PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    init = as_float_params(init or Params())
    log_fit = {n: jnp.log(getattr(init, n)) for n in fit_names}
    for ks in sets:
        if ks.floor:
            log_fit[ks.floor] = ops._float(np.log(floor_init_s))
    prior_log = {n: ops._float(np.log(float(getattr(Params(), n)))) for n in fit_names}
    log_fit, history = _adam(
        lambda lf: _sets_loss_and_grad(lf, init, prior_log, ops._float(prior_weight), sets),
        log_fit,
        steps_n,
        learning_rate,
        progress,
    )
    params = _with_fitted(init, {n: log_fit[n] for n in fit_names})
    floors = {k: float(jnp.exp(v)) for k, v in log_fit.items() if k not in fit_names}
    return FitResult(params, history, floors)


# ------------------------------------------------------------------------------------------------
# reporting


def error_report(frame: pd.DataFrame, predicted_s: np.ndarray, measured_s: np.ndarray) -> dict:
    """MAPE overall, per model and per kind (where the column exists), p90 and max error."""
    err = np.abs(predicted_s / measured_s - 1.0)
    out = {
        "rows": int(len(err)),
        "mape": float(np.mean(err)),
        "p90": float(np.quantile(err, 0.9)),
        "max": float(np.max(err)),
        "bias": float(np.mean(predicted_s / measured_s - 1.0)),
    }
    for col in ("model", "kind"):
        if col in frame.columns:
            out[f"per_{col}"] = {
                str(k): float(np.mean(err[idx]))
                for k, idx in frame.groupby(col, sort=True).indices.items()
            }
    return out


def calibration_document(
    params: Params, hw: HardwareSpec, report: dict, profiles: str, eager_s: dict[str, float]
) -> dict:
    return {
        "hardware": hw.name,
        "backend": "fa2",
        "profiles": profiles,
        "params": {k: float(f"{v:.6g}") for k, v in params_to_dict(params).items()},
        "eager_launch_floor_s": {k: float(f"{v:.6g}") for k, v in sorted(eager_s.items())},
        "fit": json.loads(json.dumps(report)),
    }


def calibrate_dir(profiles_dir: str | Path, hw: HardwareSpec, steps_n: int = 1500, progress=None):
    """Fit on ``DIR/steps.csv`` (+ ``gemm.csv``, ``attention.csv`` when present)."""
    d = Path(profiles_dir)
    if not d.is_dir():
        raise ProfileError(f"{d}: not a directory of profiles")
    steps = read_steps(d / "steps.csv")
    gemm = read_gemm(d / "gemm.csv") if (d / "gemm.csv").is_file() else None
    attn_rows = None
    if (d / "attention.csv").is_file():
        attn_rows = read_attention(d / "attention.csv", jax.tree.map(lambda x: x[0], steps.dims))
    result = fit(steps, hw, gemm, attn_rows, steps_n=steps_n, progress=progress)
    pred = predict_steps_s(result.params, steps, hw)
    report = error_report(steps.frame, pred, steps.measured_s)
    return result, report
