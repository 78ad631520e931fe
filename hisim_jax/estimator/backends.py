"""Swappable step-latency estimators behind the one interface the engine uses.

``BACKENDS`` maps a name to a class; ``make_estimator(kind, ...)`` builds one. Every backend
has ``step_latency_s(batches)`` (``[N]`` seconds, ``[N, H]`` for several GPUs),
``decode_steps_s(context, steps, padded, active)`` (the engine's decode stretches),
``breakdown_s(batch, hardware_index)`` (seconds per term), and ``.model``, ``.hardware``
(a list of ``HardwareSpec``) and ``.tp``, which is all ``serving/`` and ``simulation.py`` read.

* ``roofline``        ``roofline.Estimator``: operator roofline + FA2 grid + fitted efficiencies.
* ``aiconfigurator``  NVIDIA aiconfigurator-core's own way of predicting: every operator of a
  step looked up in its measured per-kernel tables (``pip install hisim-jax[aic]``) and summed.
  Per layer the GEMMs (qkv, o, gate_up, down at m = the step's tokens, per-rank k and n),
  MoE experts from its ``moe_perf`` table where it holds the model's expert shape (else the
  expert GEMMs from the GEMM table, over the experts a step touches), context attention of
  the prompt rows and generation attention of the decode rows (at the model's heads, KV
  heads and head dim per rank), two all-reduces for TP > 1; times the layers; plus the LM-head
  GEMM for the requests that emit a token and the embedding gather (bytes at the copy rate).
  Tables are interpolated linearly in log(latency) over log(coordinates) within their grid;
  beyond the grid's top a coordinate is clamped to it and the latency scaled by the ratio of
  the operator's roofline time (max of FLOPs and bytes over the datasheet peaks) at the point
  asked to that at the clamped point; below the grid's bottom it is only clamped (small
  kernels sit at their launch floor, which a roofline would scale towards zero). The
  tables time uniform batches, so a ragged batch is mapped onto one with the same work: its
  decode rows as ``b`` requests over their mean key count, its prompt rows as ``b`` prompts of
  the uncached length with the same causal attention work (a cached prefix counts as work).
  The same ratio carries a head layout, head dim or KV dtype the table lacks from its nearest
  entry. What per-kernel tables cannot show is absent: per-layer fixed costs, unfused
  elementwise passes, launch gaps between kernels (the roofline's fit has them).
* ``table``           a fit to the user's own measured steps (``steps.csv``: model, batch,
  step_ms), per model: step_ms = c0 + c1 tokens + c2 requests + c3 Σcontext
  + c4 Σ(context × new) + c5 max prompt keys + c6 [batch has a prompt], non-negative
  coefficients (weights and fixed costs, per-token GEMM work, per-request LM head, KV reads,
  attention FLOPs, the longest attention block chain, prefill launches), least squares on the
  relative error (context = cache_len + new_len of a request; sums over the batch). A batch whose feature lies outside the
  range the model's measured steps span is refused unless ``extrapolate=True``.

The numerical parts are NumPy functions of per-batch features; only construction reads files.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hisim_jax.estimator import ops
from hisim_jax.estimator.batch import RaggedBatches, parse_batch
from hisim_jax.estimator.roofline import COPY_BW_FRACTION, Estimator
from hisim_jax.specs import HardwareSpec, ModelSpec, SpecError, load_hardware, load_model

DEFAULT_AIC_ENGINE = "sglang"

# ------------------------------------------------------------------------------------------------
# per-batch features (shared by the lookup and the table backends)

FEATURE_NAMES = (
    "tokens",  # new tokens of the step (GEMM rows)
    "requests",  # requests in the batch (LM-head rows)
    "context",  # Σ (cache_len + new_len): keys read
    "context_x_new",  # Σ (cache_len + new_len) × new_len: attention work
    "dec_requests",  # requests computing one token
    "dec_keys",  # Σ over them of their keys (cache_len + 1)
    "pf_requests",  # requests computing more than one token
    "pf_work",  # Σ over them of causal attention pairs: new·cache + new·(new+1)/2
    "pf_max_keys",  # the longest of them in keys (cache_len + new_len): attention's chain
    "prefill",  # 1 if the batch has a prompt row, else 0
)


def _ragged(batches) -> RaggedBatches:
    """A RaggedBatches from what ``Estimator.step_latency_s`` accepts: a RaggedBatches, a list
    of batches, or one batch of pairs (or an ``[R, 2]`` array)."""
    if isinstance(batches, RaggedBatches):
        return batches
    if isinstance(batches, np.ndarray):
        return RaggedBatches.from_batches([batches] if batches.ndim == 2 else list(batches))
    one = (
        isinstance(batches, (list, tuple))
        and len(batches) > 0
        and isinstance(batches[0], (list, tuple))
        and len(batches[0]) > 0
        and isinstance(batches[0][0], (int, float, np.integer, np.floating))
    )
    return RaggedBatches.from_batches([batches] if one else batches)


def batch_features(rb: RaggedBatches) -> dict[str, np.ndarray]:
    """Features ``[N]`` of every batch (see ``FEATURE_NAMES``)."""
    c = rb.cache_len.astype(float)
    n = rb.new_len.astype(float)
    off = rb.offsets
    dec = n <= 1.0

    def seg(x):
        return np.add.reduceat(np.asarray(x, float), off)

    return {
        "tokens": seg(n),
        "requests": rb.sizes.astype(float),
        "context": seg(c + n),
        "context_x_new": seg((c + n) * n),
        "dec_requests": seg(dec),
        "dec_keys": seg(np.where(dec, c + 1.0, 0.0)),
        "pf_requests": seg(~dec),
        "pf_work": seg(np.where(dec, 0.0, n * c + n * (n + 1.0) / 2.0)),
        "pf_max_keys": np.maximum.reduceat(np.where(dec, 0.0, c + n), off),
        "prefill": (np.maximum.reduceat(n, off) > 1.0).astype(float),
    }


def decode_features(context, steps: int, padded=0, active=None) -> dict[str, np.ndarray]:
    """Features ``[steps]`` of a decode stretch, as ``Estimator.decode_steps_s`` defines it:
    request i holds ``context[i]`` cached tokens at step 0 and one more each step, the first
    ``active[j]`` requests decode at step j, and one-token dummies (nothing cached) pad the
    batch to ``padded[j]`` requests."""
    ctx = np.asarray(context, float)
    act = np.empty(steps)
    act[:] = len(ctx) if active is None else np.asarray(active, float)[:steps]
    pad = np.maximum(np.broadcast_to(np.asarray(padded, float), (steps,)), act)
    cum = np.concatenate([[0.0], np.cumsum(ctx)])
    j = np.arange(steps, dtype=float)
    keys = cum[act.astype(np.int64)] + act * (j + 1.0) + (pad - act)
    zero = np.zeros(steps)
    return {
        "tokens": pad,
        "requests": pad,
        "context": keys,
        "context_x_new": keys,
        "dec_requests": pad,
        "dec_keys": keys,
        "pf_requests": zero,
        "pf_work": zero,
        "pf_max_keys": zero,
        "prefill": zero,
    }


class FeatureEstimator:
    """The engine interface on top of ``_parts(features, hardware_index) -> {term: [N]}``."""

    model: ModelSpec
    hardware: list[HardwareSpec]
    tp: int

    def _parts(self, f: dict[str, np.ndarray], h: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _check(self, f: dict[str, np.ndarray]) -> None:
        """Raise if a batch is outside what the backend can predict (default: nothing)."""

    def _seconds(self, f: dict[str, np.ndarray]) -> np.ndarray:
        self._check(f)
        return np.stack(
            [sum(self._parts(f, h).values()) for h in range(len(self.hardware))], axis=-1
        )

    def step_latency_s(self, batches) -> np.ndarray:
        """Seconds per batch: ``[N]`` for one GPU, ``[N, H]`` for several."""
        out = self._seconds(batch_features(_ragged(batches)))
        return out[:, 0] if len(self.hardware) == 1 else out

    def decode_steps_s(self, context, steps: int, padded=0, active=None) -> np.ndarray:
        """Seconds of ``steps`` consecutive decode steps on the first GPU (see
        ``Estimator.decode_steps_s``)."""
        return self._seconds(decode_features(context, steps, padded, active))[:, 0]

    def breakdown_s(self, batch, hardware_index: int = 0) -> dict[str, float]:
        """Seconds per term of one batch on one of the GPUs."""
        rb = _ragged(batch)
        if len(rb) != 1:
            raise ValueError(f"breakdown_s: expected one batch, got {len(rb)}")
        f = batch_features(rb)
        self._check(f)
        return {k: float(v[0]) for k, v in self._parts(f, hardware_index).items()}


def _load(model, hardware) -> tuple[ModelSpec, list[HardwareSpec]]:
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    hw_list = [hardware] if isinstance(hardware, (str, Path, HardwareSpec)) else list(hardware)
    if not hw_list:
        raise ValueError("at least one hardware spec is needed")
    return spec, [h if isinstance(h, HardwareSpec) else load_hardware(h) for h in hw_list]


def _np_dims(spec: ModelSpec, tp, weight_dtype, kv_dtype, act_dtype) -> dict[str, float]:
    dims = ops.model_dims(spec, tp, weight_dtype, kv_dtype, act_dtype)
    return {k: float(getattr(dims, k)) for k in ops.ModelDims.__dataclass_fields__}


# ------------------------------------------------------------------------------------------------
# aiconfigurator: lookup and interpolation in the measured per-operator tables


@dataclass(frozen=True)
class LogGrid:
    """A table on a rectangular grid: ``log_axes[i]`` the log of the sorted coordinates of axis
    i, ``log_values`` the log latency at every grid point (holes filled from their neighbours
    along the axes). Interpolation is multilinear in log-log, coordinates clamped to the grid."""

    log_axes: tuple[np.ndarray, ...]
    log_values: np.ndarray

    @classmethod
    def from_frame(cls, frame, columns: Sequence[str], value: str = "latency_s") -> LogGrid:
        axes = [np.unique(frame[c].to_numpy(float)) for c in columns]
        idx = tuple(
            np.searchsorted(a, frame[c].to_numpy(float)) for a, c in zip(axes, columns, strict=True)
        )
        total = np.zeros([len(a) for a in axes])
        count = np.zeros_like(total)
        np.add.at(total, idx, np.log(frame[value].to_numpy(float)))
        np.add.at(count, idx, 1.0)
        with np.errstate(invalid="ignore"):
            values = total / count
        log_axes = tuple(np.log(a) for a in axes)
        return cls(log_axes, _fill_holes(values, log_axes))

    def bounds(self, i: int) -> tuple[float, float]:
        return float(np.exp(self.log_axes[i][0])), float(np.exp(self.log_axes[i][-1]))

    def __call__(self, *points) -> np.ndarray:
        """Latency at ``points`` (one array per axis, broadcast together), clamped to the grid."""
        pts = np.broadcast_arrays(*(np.asarray(p, float) for p in points))
        corners = []  # per axis: (lower index, upper index, upper weight)
        for ax, p in zip(self.log_axes, pts, strict=True):
            x = np.clip(np.log(np.maximum(p, 1e-300)), ax[0], ax[-1])
            if len(ax) == 1:
                i = np.zeros(x.shape, np.int64)
                corners.append((i, i, np.zeros(x.shape)))
                continue
            i = np.clip(np.searchsorted(ax, x, side="right") - 1, 0, len(ax) - 2)
            corners.append((i, i + 1, (x - ax[i]) / (ax[i + 1] - ax[i])))
        out = np.zeros(pts[0].shape)
        for pick in np.ndindex(*(2,) * len(corners)):
            w = np.ones(pts[0].shape)
            index = []
            for (lo, hi, t), k in zip(corners, pick, strict=True):
                w = w * (t if k else 1.0 - t)
                index.append(hi if k else lo)
            out = out + w * self.log_values[tuple(index)]
        return np.exp(out)


def _fill_holes(values: np.ndarray, log_axes) -> np.ndarray:
    """NaN cells filled by 1-D interpolation (clamped at the ends) along each axis in turn."""
    values = values.copy()
    while np.isnan(values).any():
        before = int(np.isnan(values).sum())
        for axis, ax in enumerate(log_axes):
            moved = np.moveaxis(values, axis, -1)  # a view: filling it fills ``values``
            flat = moved.reshape(-1, moved.shape[-1])
            for row in np.flatnonzero(np.isnan(flat).any(axis=1) & ~np.isnan(flat).all(axis=1)):
                line = flat[row]
                ok = ~np.isnan(line)
                line[~ok] = np.interp(ax[~ok], ax[ok], line[ok])
            values = np.moveaxis(flat.reshape(moved.shape), -1, axis)
        if int(np.isnan(values).sum()) == before:
            raise SpecError("aiconfigurator table: no measured point to fill the grid from")
    return values


def _scaled(grid: LogGrid, roof, points, own: dict, table: dict) -> np.ndarray:
    """``grid`` at ``points`` clamped to it, times ``roof(points above the grid, **own) /
    roof(clamped points, **table)``: beyond the grid's top (and for properties of the model
    the table lacks: ``own`` vs ``table``) latency follows the roofline time."""
    pts = np.broadcast_arrays(*(np.asarray(p, float) for p in points))
    clamped, above = [], []
    for i, p in enumerate(pts):
        lo, hi = grid.bounds(i)
        clamped.append(np.clip(p, lo, hi))
        above.append(np.maximum(p, lo))
    return grid(*clamped) * roof(*above, **own) / roof(*clamped, **table)


def _gemm_roof(m, k, n, *, peak, bw, wb, ib):
    return np.maximum(2.0 * m * k * n / peak, (k * n * wb + m * k * ib + m * n * 2.0) / bw)


def _ctx_attn_roof(b, s, *, q, kv, d, kvb, peak, bw):
    # causal: s(s+1)/2 query-key pairs per request, 4 d FLOPs each per query head
    flops = 4.0 * b * q * d * s * (s + 1.0) / 2.0
    bytes_ = b * s * d * (2.0 * q * 2.0 + 2.0 * kv * kvb)
    return np.maximum(flops / peak, bytes_ / bw)


def _gen_attn_roof(b, s, *, q, kv, d, kvb, peak, bw):
    return np.maximum(4.0 * b * q * d * s / peak, b * s * 2.0 * kv * d * kvb / bw)


def _allreduce_roof(elems, *, tp, bw):
    return 2.0 * (tp - 1.0) / tp * elems * 2.0 / bw


def _moe_roof(t, *, h, im, k, e, wb, peak, bw):
    touched = ops.moe_experts_touched(t, e, k, np)
    flops = 2.0 * t * k * 3.0 * h * im
    bytes_ = touched * 3.0 * h * im * wb + t * k * (h + 3.0 * im) * 2.0
    return np.maximum(flops / peak, bytes_ / bw)


@dataclass(frozen=True)
class _AttnTable:
    grid: LogGrid
    q: float
    kv: float


def _attention_table(frame, q: float, kv: float, axes) -> _AttnTable:
    """The grid of the (query heads, KV heads) layout of the model per rank, or of the nearest
    layout the table has (in log heads and log group size), whose latency ``_scaled`` then
    carries over by the roofline ratio."""
    layouts = frame[["q_heads", "kv_heads"]].drop_duplicates().to_numpy(float)
    dist = np.abs(np.log(layouts[:, 0] / q)) + np.abs(
        np.log(layouts[:, 0] / layouts[:, 1] / (q / kv))
    )
    tq, tkv = layouts[int(np.argmin(dist))]
    rows = frame[(frame["q_heads"] == tq) & (frame["kv_heads"] == tkv)]
    return _AttnTable(LogGrid.from_frame(rows, axes), float(tq), float(tkv))


@dataclass(frozen=True)
class _GpuTables:
    """The lookups of one GPU, built for one model at its TP degree and dtypes."""

    hw: HardwareSpec
    version: str
    gemm: LogGrid  # (m, k, n) of the GEMM precision the model runs
    gemm_dtype: str
    ctx: _AttnTable | None
    gen: _AttnTable | None
    allreduce: LogGrid | None
    allreduce_tp: float
    moe: LogGrid | None  # tokens, for the model's expert shape


@functools.lru_cache(maxsize=16)
def _read_tables(system: str, engine: str, version: str | None):
    from hisim_jax.estimator import aiconfigurator as aic

    return aic.read_tables(system, engine, version)


def _gpu_tables(hw: HardwareSpec, d: dict, engine: str, version: str | None) -> _GpuTables:
    from hisim_jax.estimator import aiconfigurator as aic

    system = aic.system_name(hw.name)
    version, frames, _ = _read_tables(system, engine, version)
    widest = max(d["weight_bytes"], d["gemm_in_bytes"])
    if widest < 0.75:
        raise aic.AiconfiguratorError(
            "estimator aiconfigurator: its GEMM tables hold bf16 and fp8 GEMMs, not fp4"
        )
    dtype = "fp8" if widest < 1.5 else "bf16"
    g = frames["gemm"]
    g = g[g["dtype"] == dtype]
    if g.empty:
        raise aic.AiconfiguratorError(
            f"estimator aiconfigurator: no {dtype} GEMM table for {system}/{engine} {version}"
        )
    gemm = LogGrid.from_frame(g, ("m", "k", "n"))
    ctx = gen = None
    if "context_attention" in frames:
        ctx = _attention_table(
            frames["context_attention"], d["q_heads"], d["kv_heads"], ("batch", "new_len")
        )
    if "generation_attention" in frames:
        frame = frames["generation_attention"]
        frame = frame.assign(keys=frame["cache_len"] + 1.0)
        gen = _attention_table(frame, d["q_heads"], d["kv_heads"], ("batch", "keys"))
    allreduce, ar_tp = None, d["tp"]
    if d["tp"] > 1:
        if "allreduce" not in frames:
            raise aic.AiconfiguratorError(
                f"estimator aiconfigurator: tp={d['tp']:g} needs an all-reduce table, which "
                f"{system}/{engine} {version} lacks"
            )
        c = frames["allreduce"]
        tps = np.unique(c["tp"].to_numpy(float))
        ar_tp = float(tps[np.argmin(np.abs(np.log(tps / d["tp"])))])
        allreduce = LogGrid.from_frame(c[c["tp"] == ar_tp], ("elems",))
    moe = None
    if d["moe_layers"] > 0 and "moe" in frames:
        m = frames["moe"]
        m = m[
            (m["hidden"] == d["hidden"])
            & (m["moe_inter"] == d["moe_inter"])
            & (m["top_k"] == d["top_k"])
            & (m["experts"] == d["experts"])
            & (m["dtype"] == dtype)
        ]
        if len(m):
            moe = LogGrid.from_frame(m, ("tokens",))
    return _GpuTables(hw, version, gemm, dtype, ctx, gen, allreduce, ar_tp, moe)


class AiconfiguratorEstimator(FeatureEstimator):
    """Step latency as the sum of aiconfigurator-core's measured per-operator latencies (see
    the module docstring). ``engine`` picks its tables (sglang, vllm or trtllm), ``version``
    the engine version (default: the newest with GEMM and attention tables)."""

    def __init__(
        self,
        model: str | Path | ModelSpec,
        hardware: str | Path | HardwareSpec | Sequence[str | Path | HardwareSpec],
        tp: int = 1,
        weight_dtype: str = "bf16",
        kv_dtype: str = "bf16",
        engine: str = DEFAULT_AIC_ENGINE,
        version: str | None = None,
        act_dtype: str | None = None,
    ):
        from hisim_jax.estimator import aiconfigurator as aic

        self.model, self.hardware = _load(model, hardware)
        # its lookups are of GQA attention and dense/MoE GEMMs; MLA, linear attention, Mamba
        # and per-layer windows or chunks are the roofline's (estimator/roofline.py)
        other = set(ops.attention_kinds(self.model)) - {"full", "sliding"}
        if other or (self.model.layers("full") and self.model.layers("sliding")):
            kinds = ", ".join(sorted(other)) or "sliding and full layers mixed"
            raise ValueError(
                f"estimator aiconfigurator: {self.model.name} has {kinds} layers, which its "
                "lookups do not cover (use --estimator roofline)"
            )
        aic.data_root()  # the one-line error without the extra, before reading any table
        self.tp = tp
        self.engine = engine
        self.dims = _np_dims(self.model, tp, weight_dtype, kv_dtype, act_dtype)
        self.tables = [_gpu_tables(h, self.dims, engine, version) for h in self.hardware]

    def _gemm_s(self, t: _GpuTables, m, k, n) -> np.ndarray:
        d, hw = self.dims, t.hw
        peak = hw.fp8_flops_per_s if t.gemm_dtype == "fp8" else hw.bf16_flops_per_s
        own = dict(peak=peak, bw=hw.hbm_bytes_per_s, wb=d["weight_bytes"], ib=d["gemm_in_bytes"])
        return _scaled(t.gemm, _gemm_roof, (m, k, n), own, own)

    def _attn_s(self, table: _AttnTable, roof, b, s, hw: HardwareSpec) -> np.ndarray:
        d = self.dims
        common = dict(peak=hw.bf16_flops_per_s, bw=hw.hbm_bytes_per_s)
        own = dict(q=d["q_heads"], kv=d["kv_heads"], d=d["head_dim"], kvb=d["kv_bytes"], **common)
        tab = dict(q=table.q, kv=table.kv, d=128.0, kvb=2.0, **common)
        some = b > 0
        safe_b = np.where(some, b, 1.0)
        return np.where(some, _scaled(table.grid, roof, (safe_b, s), own, tab), 0.0)

    def _parts(self, f, h):
        from hisim_jax.estimator import aiconfigurator as aic

        t, d, hw = self.tables[h], self.dims, self.hardware[h]
        tok, req = f["tokens"], f["requests"]
        (_, k_qkv, n_qkv), (_, k_o, n_o), (_, k_gu, n_gu), (_, k_dn, n_dn) = (
            (name, float(k), float(n)) for name, k, n in ops.layer_gemm_shapes(_Dims(d))
        )
        out = {
            "qkv_proj": d["layers"] * self._gemm_s(t, tok, k_qkv, n_qkv),
            "o_proj": d["layers"] * self._gemm_s(t, tok, k_o, n_o),
            "mlp": d["dense_layers"]
            * (self._gemm_s(t, tok, k_gu, n_gu) + self._gemm_s(t, tok, k_dn, n_dn))
            if d["dense_layers"] > 0
            else 0.0 * tok,
            "moe": self._moe_s(t, tok) if d["moe_layers"] > 0 else 0.0 * tok,
        }
        if t.ctx is None or t.gen is None:
            raise aic.AiconfiguratorError(
                f"estimator aiconfigurator: {hw.name} has no context and generation attention "
                "tables"
            )
        # prompt rows as b uncached prompts of the length s with the same causal work
        b_pf = f["pf_requests"]
        s_pf = (np.sqrt(1.0 + 8.0 * f["pf_work"] / np.maximum(b_pf, 1.0)) - 1.0) / 2.0
        b_dec = f["dec_requests"]
        s_dec = f["dec_keys"] / np.maximum(b_dec, 1.0)
        out["attention"] = d["layers"] * (
            self._attn_s(t.ctx, _ctx_attn_roof, b_pf, np.maximum(s_pf, 1.0), hw)
            + self._attn_s(t.gen, _gen_attn_roof, b_dec, np.maximum(s_dec, 1.0), hw)
        )
        out["lm_head"] = self._gemm_s(t, req, d["hidden"], d["vocab"])
        out["embedding"] = (
            2.0 * tok * d["hidden"] * d["act_bytes"] / (hw.hbm_bytes_per_s * COPY_BW_FRACTION)
        )
        if t.allreduce is not None:
            own = dict(tp=d["tp"], bw=hw.interconnect_bytes_per_s)
            tab = dict(tp=t.allreduce_tp, bw=hw.interconnect_bytes_per_s)
            ar = _scaled(t.allreduce, _allreduce_roof, (tok * d["hidden"],), own, tab)
            out["communication"] = 2.0 * d["layers"] * ar
        else:
            out["communication"] = 0.0 * tok
        return out

    def _moe_s(self, t: _GpuTables, tok) -> np.ndarray:
        d, hw = self.dims, t.hw
        h, im, k, e = d["hidden"], d["moe_inter"], d["top_k"], d["experts"]
        router = self._gemm_s(t, tok, h, e)
        if t.moe is not None:
            peak = hw.fp8_flops_per_s if t.gemm_dtype == "fp8" else hw.bf16_flops_per_s
            own = dict(h=h, im=im, k=k, e=e, wb=d["weight_bytes"], peak=peak,
                       bw=hw.hbm_bytes_per_s)  # fmt: skip
            experts = _scaled(t.moe, _moe_roof, (tok,), own, own)
        else:  # no measured fused-MoE kernel of this shape: the touched experts' GEMMs
            touched = np.maximum(ops.moe_experts_touched(tok, e, k, np), 1.0)
            rows = np.maximum(tok * k / touched, 1.0)
            experts = touched * (self._gemm_s(t, rows, h, 2.0 * im) + self._gemm_s(t, rows, im, h))
        return d["moe_layers"] * (router + experts)


class _Dims:
    """Attribute access to a dims dict (for ``ops.layer_gemm_shapes``)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


# ------------------------------------------------------------------------------------------------
# table: a regression over the user's measured steps

TABLE_FEATURES = ("tokens", "requests", "context", "context_x_new", "pf_max_keys", "prefill")
# features a batch must lie within the data's range of (``prefill`` is checked as a kind)
RANGE_FEATURES = ("tokens", "requests", "context", "context_x_new", "pf_max_keys")


class OutOfRangeError(SpecError):
    """A batch outside the measured steps a table backend was fitted on."""


def _design(f: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.ones_like(f["tokens"])] + [f[k] for k in TABLE_FEATURES], axis=-1)


def fit_table(batches: RaggedBatches, measured_s: np.ndarray) -> np.ndarray:
    """Non-negative coefficients ``[1 + len(TABLE_FEATURES)]`` (seconds per unit of each
    feature, the first a constant) minimizing the squared relative error."""
    from scipy.optimize import nnls

    y = np.asarray(measured_s, float)
    a = _design(batch_features(batches)) / y[:, None]
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)  # conditioning: columns of equal size
    coef, _ = nnls(a / scale, np.ones(len(y)))
    return coef / scale


class TableEstimator(FeatureEstimator):
    """Step latency fitted to measured steps of the model (see the module docstring).

    ``table``: a steps.csv path or a DataFrame with columns model, batch, step_ms; the rows of
    this model are used. It predicts the GPU, TP degree and dtypes the steps were measured
    with: ``hardware`` names that GPU (one), ``tp`` is recorded, not modelled."""

    def __init__(
        self,
        model: str | Path | ModelSpec,
        hardware: str | Path | HardwareSpec | Sequence[str | Path | HardwareSpec],
        table,
        tp: int = 1,
        extrapolate: bool = False,
    ):
        self.model, self.hardware = _load(model, hardware)
        if len(self.hardware) != 1:
            raise ValueError(
                "estimator table predicts the one GPU its steps were measured on: give one "
                f"hardware, got {len(self.hardware)}"
            )
        self.tp = tp
        self.extrapolate = extrapolate
        frame, self.source = _steps_frame(table)
        rows = frame[frame["model"].astype(str) == self.model.name]
        if rows.empty:
            have = ", ".join(sorted(set(frame["model"].astype(str))))
            raise SpecError(f"{self.source}: no steps of model {self.model.name} (it has: {have})")
        batches = RaggedBatches.from_batches(
            [parse_batch(str(b), where=f"{self.source}: field 'batch'") for b in rows["batch"]]
        )
        measured = rows["step_ms"].to_numpy(float) / 1e3
        self.coef = fit_table(batches, measured)
        f = batch_features(batches)
        self.ranges = {k: (float(f[k].min()), float(f[k].max())) for k in RANGE_FEATURES}
        self.kinds = {bool(v) for v in f["prefill"]}
        self.rows = len(rows)

    def _check(self, f):
        if self.extrapolate:
            return
        where = f"estimator table ({self.source}, {self.model.name})"
        hint = "; pass extrapolate=True (--extrapolate) to extrapolate the fit"
        for k in RANGE_FEATURES:
            lo, hi = self.ranges[k]
            bad = np.flatnonzero((f[k] < lo) | (f[k] > hi))
            if len(bad):
                v = float(f[k][bad[0]])
                raise OutOfRangeError(
                    f"{where}: batch {int(bad[0])}: feature '{k}' = {v:g} is outside the data's "
                    f"range [{lo:g}, {hi:g}]{hint}"
                )
        for kind in (True, False):
            bad = np.flatnonzero((f["prefill"] > 0) == kind)
            if len(bad) and kind not in self.kinds:
                name = "a prompt" if kind else "decode rows only"
                raise OutOfRangeError(
                    f"{where}: batch {int(bad[0])}: feature 'prefill' = {int(kind)} (a batch "
                    f"with {name}) has no measured step of its kind{hint}"
                )

    def _parts(self, f, h):
        x = _design(f)
        names = ("fixed",) + TABLE_FEATURES
        return {n: self.coef[i] * x[:, i] for i, n in enumerate(names)}


def _steps_frame(table):
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        frame, source = table, "table"
    elif table is None:
        raise ValueError("estimator table needs a steps.csv (estimator_table, --estimator-table)")
    else:
        from hisim_jax.estimator.calibrate import read_steps

        frame, source = read_steps(table, require_time=True).frame, str(table)
    for col in ("model", "batch", "step_ms"):
        if col not in frame.columns:
            raise SpecError(f"{source}: missing column '{col}'")
    return frame, source


# ------------------------------------------------------------------------------------------------
# by name

BACKENDS = {
    "roofline": Estimator,
    "aiconfigurator": AiconfiguratorEstimator,
    "table": TableEstimator,
}


def make_estimator(
    kind: str,
    model: str | Path | ModelSpec,
    hardware,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    *,
    calibration=None,
    table=None,
    extrapolate: bool = False,
    engine: str | None = None,
    version: str | None = None,
    act_dtype: str | None = None,
):
    """The step-latency estimator ``kind`` (a key of ``BACKENDS``) of a model on GPUs.

    ``calibration`` is the roofline's; ``table`` (a steps.csv) and ``extrapolate`` the table
    backend's; ``engine`` (sglang, vllm, trtllm) and ``version`` pick aiconfigurator's tables.
    An option of another backend is refused (one line), so a typo does not go unnoticed."""
    if kind not in BACKENDS:
        raise ValueError(f"estimator {kind!r} unknown (choose from {', '.join(BACKENDS)})")
    if table is not None and kind != "table":
        raise ValueError(f"an estimator table goes with estimator table, not {kind}")
    if calibration is not None and kind != "roofline":
        raise ValueError(f"a calibration goes with estimator roofline, not {kind}")
    if kind == "roofline":
        return Estimator(
            model, hardware, tp, weight_dtype, kv_dtype, calibration, act_dtype=act_dtype
        )
    if kind == "aiconfigurator":
        return AiconfiguratorEstimator(
            model, hardware, tp, weight_dtype, kv_dtype, engine or DEFAULT_AIC_ENGINE, version,
            act_dtype,
        )  # fmt: skip
    return TableEstimator(model, hardware, table, tp, extrapolate)


def predict_rows(
    kind: str, frame, hardware, tp: int = 1, weight_dtype="bf16", kv_dtype="bf16", **options
) -> np.ndarray:
    """Seconds ``[N]`` for every row of a steps frame (columns model, batch), each row with its
    own model, on one GPU: one estimator per model."""
    out = np.empty(len(frame))
    models = frame["model"].astype(str).to_numpy()
    for name in dict.fromkeys(models):
        idx = np.flatnonzero(models == name)
        est = make_estimator(kind, name, hardware, tp, weight_dtype, kv_dtype, **options)
        batches = [parse_batch(str(b), where="field 'batch'") for b in frame["batch"].iloc[idx]]
        out[idx] = np.asarray(est.step_latency_s(RaggedBatches.from_batches(batches))).reshape(
            len(idx), -1
        )[:, 0]
    return out


__all__ = [
    "BACKENDS",
    "AiconfiguratorEstimator",
    "FeatureEstimator",
    "LogGrid",
    "OutOfRangeError",
    "TableEstimator",
    "batch_features",
    "decode_features",
    "fit_table",
    "make_estimator",
    "predict_rows",
]
