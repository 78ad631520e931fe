"""The analytical screen: every point of a search costed at its workload's steady state, from a
few vectorized estimator calls per (model, GPU, TP, engine) and NumPy over all points.

Per point, per replica (arrival rate ``lam`` = the workload's rate x rate_scale / replicas):

- **Prefix reuse** from the trace itself: every reusable prompt block's LRU stack distance (the
  distinct blocks touched since its last use) is measured once per workload; a replica with
  ``C`` tokens of L1+L2+L3 (less the running requests' KV) hits the blocks whose distance is
  below ``R x C`` with a prefix-affine router (``cache_aware``), and ``1/R`` of those with a
  router blind to prefixes (each replica sees ``1/R`` of the stream; a reuse finds its block
  only on the replica that served it).
- **Prefill** of a sample of the workload's requests (their uncached tokens in chunks of the
  token budget, on their cached prefix) priced by the estimator with and without their
  reusable prefix, interpolated at the point's hit fraction: service times ``S``; prefill
  utilization ``rho = lam E[S]``; waits of an M/G/1 queue (mean ``lam E[S^2] / 2(1 - rho)``,
  an exponential tail).
- **Decode**: the step time ``d(N)`` of ``N`` running requests at the workload's mean context,
  from the estimator on a grid of ``N``; ``N`` from Little's law, ``N = lam (O - 1) d(N) /
  (1 - rho)``, capped by the engine's running limit and the KV cache. Per request TPOT varies
  by the prefill time that lands in its decode (compound Poisson).
- Beyond capacity the served rate is capped and the backlog grows over the trace: a request
  arriving at ``t`` waits ``(1 - served / lam) t`` more.

These are physics with no free factor; what they miss (the scheduler's details, bursts, the
router's balance) is learnt from the simulations of the search itself (``Correction``: per
metric, log(simulated / screened) linear in the utilizations, fitted by ridge regression), so
the screen that picks the next simulations is calibrated against the simulator on this
workload.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import pandas as pd

from hisim_jax.estimator.batch import bucket_size
from hisim_jax.estimator.ops import DTYPE_BYTES
from hisim_jax.serving import workload as wl
from hisim_jax.serving.frontend import FRONTENDS
from hisim_jax.serving.memory import size_replica, state_grid
from hisim_jax.serving.scheduler.vllm import VLLM_BLOCK_SIZE
from hisim_jax.simulation import (
    SimulationOptions,
    cap_running,
    memory_share,
    parse_fleet,
    parse_pd,
    scheduler_config,
    step_estimator,
)
from hisim_jax.specs import load_hardware, load_model

AFFINE_ROUTERS = ("cache_aware",)  # routers that send a prefix back where it is cached
RHO_MAX = 0.98  # a queue at a higher utilization is treated as overloaded
_N_GRID = np.array(
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640,
     768, 1024, 1536, 2048, 3072, 4096, 6144, 8192],
    np.float64,
)  # fmt: skip
_STAT_Q = {"p50": 50.0, "p90": 90.0, "p99": 99.0}


# ------------------------------------------------------------------------------------------------
# the workload's statistics (once per search)


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    requests: int
    duration_s: float  # first to last arrival (rate_scale 1)
    block_tokens: int
    input_tokens: int
    output_tokens: int
    longest: int  # input + output of the longest request
    reuse_tokens_inf: int  # prompt tokens an infinite cache would hit
    distances_tokens: np.ndarray  # sorted LRU stack distances of the reusable blocks, tokens
    input_len: np.ndarray  # [S] a sample of requests
    output_len: np.ndarray  # [S]
    reuse_len: np.ndarray  # [S] their prompt tokens an infinite cache would hit
    ranks: np.ndarray  # [3, S] fixed uniform ranks: queue wait, TPOT spread, arrival time
    arrival_s: np.ndarray  # every arrival, from the first (rate_scale 1)
    sample_index: np.ndarray  # [S] the sampled requests' positions among them
    # every prompt block as a prefix-trie node, its request, and every prompt's length: what
    # a hybrid model's state rule needs (``state_reuse_fraction``)
    prefix_nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prefix_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    all_input_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    state_reuse: dict = field(default_factory=dict)  # grid -> fraction, filled on first use

    @property
    def rate_per_s(self) -> float:
        return (self.requests - 1) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def context_tokens(self) -> float:
        """Mean context of a decoding request: its prompt and half its output."""
        return (self.input_tokens + 0.5 * self.output_tokens) / self.requests


def state_reuse_fraction(stats: WorkloadStats, grid: int) -> float:
    """The share of the reusable prompt tokens a hybrid model (recurrent states, see
    ``serving/kvcache.py``) can still reuse with an unbounded cache: a request's hit ends at
    the deepest matched block holding a state, and a state is saved where each prompt ends,
    rounded down to ``grid`` tokens. 1.0 for ``grid`` 0 (no states). Once per grid."""
    if grid <= 0 or not stats.reuse_tokens_inf:
        return 1.0
    got = stats.state_reuse.get(grid)
    if got is not None:
        return got
    bt = stats.block_tokens
    seen: set[int] = set()
    states: set[int] = set()
    hit = 0
    nodes, owner = stats.prefix_nodes.tolist(), stats.prefix_owner
    starts = np.searchsorted(owner, np.arange(len(stats.all_input_len) + 1))
    for i, n_in in enumerate(stats.all_input_len.tolist()):
        path = nodes[starts[i] : starts[i + 1]]
        best = 0
        for j, node in enumerate(path):
            if node not in seen:
                break
            if node in states:
                best = j + 1
        hit += min(best * bt, max(n_in - 1, 0))
        seen.update(path)
        k = min((n_in // grid) * grid // bt, len(path))
        if k > 0:
            states.add(path[k - 1])
    frac = min(1.0, hit / stats.reuse_tokens_inf)
    stats.state_reuse[grid] = frac
    return frac


def _stack_distances(requests, stream=None) -> tuple[np.ndarray, np.ndarray]:
    """(distance in blocks of every re-access of a prompt block, that request's index), in
    access order. Blocks are the prefix trie's nodes (``workload.prefix_node_stream``).
    Fenwick tree over access positions: the distinct blocks touched since the previous access
    are the last-access marks after it. ``stream``: the requests' ``prefix_node_stream``
    where the caller has it already."""
    nodes, owners = stream if stream is not None else wl.prefix_node_stream(requests)
    total = len(nodes)
    tree = [0] * (total + 1)
    last: dict[int, int] = {}
    dist, owner = [], []
    marks = 0  # marks currently set (= distinct blocks seen)
    for pos, (node, i) in enumerate(zip(nodes.tolist(), owners.tolist(), strict=True), 1):
        prev = last.get(node)
        if prev is not None:
            s, j = 0, prev  # marks at positions <= prev
            while j > 0:
                s += tree[j]
                j -= j & -j
            dist.append(marks - s)  # marks after prev: distinct blocks since
            owner.append(i)
            j = prev
            while j <= total:  # clear the old mark
                tree[j] -= 1
                j += j & -j
            marks -= 1
        last[node] = pos
        j = pos
        while j <= total:
            tree[j] += 1
            j += j & -j
        marks += 1
    return np.asarray(dist, np.int64), np.asarray(owner, np.int64)


def workload_stats(work: wl.Workload, samples: int = 512, seed: int = 0) -> WorkloadStats:
    reqs = work.requests
    n = len(reqs)
    inp = np.fromiter((r.input_len for r in reqs), np.int64, n)
    out = np.fromiter((r.output_len for r in reqs), np.int64, n)
    nodes, node_owner = wl.prefix_node_stream(reqs)
    dist, owner = _stack_distances(reqs, (nodes, node_owner))
    bt = work.block_tokens
    reuse = np.minimum(np.bincount(owner, minlength=n) * bt, np.maximum(inp - 1, 0))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(samples, n), replace=False))
    s = len(pick)
    ranks = np.stack([(rng.permutation(s) + 0.5) / s for _ in range(3)])
    arrivals = np.fromiter((r.arrival_s for r in reqs), np.float64, n)
    return WorkloadStats(
        requests=n,
        duration_s=float(arrivals.max() - arrivals.min()),
        block_tokens=bt,
        input_tokens=int(inp.sum()),
        output_tokens=int(out.sum()),
        longest=int((inp + out).max()),
        reuse_tokens_inf=int(reuse.sum()),
        distances_tokens=np.sort(dist) * bt,
        input_len=inp[pick],
        output_len=out[pick],
        reuse_len=reuse[pick],
        ranks=ranks,
        arrival_s=arrivals - arrivals.min(),
        sample_index=pick,
        prefix_nodes=nodes,
        prefix_owner=node_owner,
        all_input_len=inp,
    )


def hit_tokens(stats: WorkloadStats, capacity_tokens, replicas, affine) -> np.ndarray:
    """Prompt tokens the replicas' caches hit over the workload (per point arrays)."""
    cap = np.asarray(capacity_tokens, np.float64) * np.asarray(replicas, np.float64)
    hits = np.searchsorted(stats.distances_tokens, cap, side="left") * float(stats.block_tokens)
    hits = np.where(affine, hits, hits / np.asarray(replicas, np.float64))
    return np.minimum(hits, stats.reuse_tokens_inf)


# ------------------------------------------------------------------------------------------------
# per replica configuration (cheap, no estimator)


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """What the screen needs of one replica group of a point."""

    estimator_key: tuple  # (model, hardware, tp, weight_dtype, kv_dtype, calibration, engine, ...)
    engine: str
    tp: int
    count: int  # replicas of this group
    budget: int  # tokens per prefill chunk / step
    max_running: int
    l1_tokens: int
    cache_tokens: int  # L1 + L2 + L3
    kv_bytes_per_token: float  # per rank
    price_usd_per_hour: float  # per GPU
    step_overhead_s: float
    state_grid: int = 0  # tokens between a hybrid model's saved states (0: no states)


@lru_cache(maxsize=256)
def _model(name):
    return load_model(name)


@lru_cache(maxsize=256)
def _gpu(name):
    return load_hardware(name)


def replica_groups(o: SimulationOptions, prices: dict) -> list[ReplicaPlan]:
    """The point's replicas grouped by (GPU, TP). Raises ValueError when one cannot run."""
    model = _model(o.model)
    groups: dict[tuple[str, int], int] = {}
    for hw, tp in parse_fleet(o):
        groups[hw, tp] = groups.get((hw, tp), 0) + 1
    plans = []
    for (hw, tp), count in groups.items():
        gpu = _gpu(hw)
        if why := model.parallelism_error(tp, o.ep, o.dp_attention):
            raise ValueError(why)
        sched = scheduler_config(o, gpu)
        sizing = size_replica(
            model, gpu, tp, o.weight_dtype, DTYPE_BYTES[o.kv_dtype],
            *memory_share(o, model, tp, sched), o.l2_gb, o.l3_gb, kv_tokens=o.kv_cache_tokens,
            max_requests=sched.max_running_requests, dp=o.dp_attention,
        )  # fmt: skip
        sched = cap_running(sched, sizing)
        page = o.page_size or (VLLM_BLOCK_SIZE if o.engine == "vllm" else 1)
        key = (o.model, hw, tp, o.weight_dtype, o.kv_dtype, o.calibration, o.engine,
               o.estimator, o.estimator_table, o.extrapolate, o.ep, o.dp_attention)  # fmt: skip
        price = prices.get(gpu.name, prices.get(hw, o.gpu_price_usd_per_hour))
        plans.append(
            ReplicaPlan(
                key, o.engine, tp, count, sched.chunked_prefill_size, sched.max_running_requests,
                sizing.l1_tokens, sizing.l1_tokens + sizing.l2_tokens + sizing.l3_tokens,
                sizing.kv_bytes_per_token,
                gpu.price_usd_per_hour if price is None else float(price),
                sched.step_overhead_s,
                state_grid(model, o.engine, page, DTYPE_BYTES[o.kv_dtype], tp) or 0,
            )
        )  # fmt: skip
    return plans


# ------------------------------------------------------------------------------------------------
# estimator calls: a few per (model, GPU, TP, engine), all budgets at once


_ESTIMATORS: dict[tuple, object] = {}  # one per estimator key, for every search of a process


def _estimator(key: tuple, o: SimulationOptions):
    """The simulator's own estimator for this key (``simulation.step_estimator``), built once."""
    est = _ESTIMATORS.get(key)
    if est is None:
        est = _ESTIMATORS[key] = step_estimator(o, key[1], key[2])
    return est


@dataclass(frozen=True, slots=True)
class Curves:
    """Estimator results of one (estimator, budget): prefill service seconds of the sampled
    requests without and with their reusable prefix, their chunks, and the decode curve."""

    prefill0_s: np.ndarray  # [S]
    prefill1_s: np.ndarray  # [S]
    chunks: np.ndarray  # [S] prefill steps of each (no reuse)
    one_token_s: float  # a step of one decode token: the weight read a mixed step shares
    decode_s: np.ndarray  # [len(_N_GRID)] step seconds of N decodes at the mean context


def _chunk_batches(cached: np.ndarray, new: np.ndarray, budget: int):
    """(cache_len, new_len, owner) of every chunk of every request's prefill."""
    k = np.maximum(1, -(-new // budget))
    owner = np.repeat(np.arange(len(new)), k)
    first = np.repeat(np.cumsum(k) - k, k)
    j = np.arange(len(owner)) - first
    c = cached[owner] + j * budget
    n = np.minimum(budget, new[owner] - j * budget)
    return c, n, owner, k


def decode_contexts(stats: WorkloadStats, n: int) -> np.ndarray:
    """Contexts of ``n`` requests decoding at once, drawn as the running set is: a request is
    running in proportion to its output length, at a uniform point of its output. The mix
    matters: one long context among short ones sets a FlashAttention decode's time."""
    outl = stats.output_len.astype(np.float64)
    w = np.maximum(outl - 1, 0)
    if w.sum() <= 0:
        w = np.ones_like(outl)
    rng = np.random.default_rng(n)
    pick = rng.choice(len(outl), size=n, p=w / w.sum())
    at = rng.random(n)
    return (stats.input_len[pick] + np.floor(at * outl[pick])).astype(np.int64)


def compute_curves(
    stats: WorkloadStats, wanted: dict[tuple, set[tuple[int, int]]], sources: dict
) -> dict:
    """Curves for every (estimator key, budget) wanted, each ``(budget, largest running
    set)``: two estimator calls per estimator key (built from the options ``sources[key]``),
    each of one padded shape (every prefill chunk of every budget as a row; every decode-grid
    size as a row of the largest's width), so a search compiles two programs per (model, GPU,
    TP, engine), not one per bucket."""

    out = {}
    inp = stats.input_len
    reuse = stats.reuse_len
    contexts: dict[int, np.ndarray] = {}  # the same running sets for every estimator
    for key, budgets in wanted.items():
        est = _estimator(key, sources[key])
        top = max(1, max(m for _, m in budgets))
        grid = _N_GRID[_N_GRID <= top]
        if grid[-1] < top:
            grid = np.append(grid, float(top))
        cl, nl, spans, start = [], [], [], 0
        for budget in sorted({b for b, _ in budgets}):
            parts = []
            for cached in (np.zeros_like(inp), reuse):
                c, n, owner, k = _chunk_batches(cached, np.maximum(1, inp - cached), budget)
                cl.append(c)
                nl.append(n)
                parts.append((start, start + len(c), owner, k))
                start += len(c)
            spans.append((budget, parts))
        planes = np.zeros((3, bucket_size(start, 1), 8))  # one request per row
        planes[0, :start, 0] = np.concatenate(cl)
        planes[1, :start, 0] = np.concatenate(nl)
        planes[2, :start, 0] = 1.0
        prefill = est.padded_latency_s(planes, prompt=True)[:start, 0].astype(np.float64)
        width = bucket_size(int(top))
        dec = np.zeros((3, bucket_size(len(grid), 1), width))
        for row, n in enumerate(grid.astype(np.int64)):
            if n not in contexts:
                contexts[n] = decode_contexts(stats, int(n))
            dec[0, row, :n] = contexts[n]
            dec[1, row, :n] = 1.0
            dec[2, row, :n] = 1.0
        decode = est.padded_latency_s(dec, prompt=False)[: len(grid), 0].astype(np.float64)
        full = np.interp(_N_GRID, grid, decode)  # flat beyond the largest N wanted
        for budget, parts in spans:
            pre = [
                np.bincount(owner, weights=prefill[lo:hi], minlength=len(inp))
                for lo, hi, owner, _k in parts
            ]
            out[key, budget] = Curves(pre[0], pre[1], parts[0][3], float(decode[0]), full)
    return out


# ------------------------------------------------------------------------------------------------
# the steady state of every point


def _interp_rows(grid: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation: ``values[i]`` over ``grid`` at ``x[i]``."""
    x = np.clip(x, grid[0], grid[-1])
    j = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    lo, hi = grid[j], grid[j + 1]
    w = (x - lo) / (hi - lo)
    rows = np.arange(len(x))
    return values[rows, j] * (1 - w) + values[rows, j + 1] * w


def _poisson_ppf(mean: np.ndarray, u: np.ndarray, exact_below: float = 12.0) -> np.ndarray:
    """Poisson quantiles (elementwise, broadcast): the CDF summed term by term where the mean
    is small, the Wilson-Hilferty cube-root approximation where it is large (within a count
    or two there)."""
    mean, u = np.broadcast_arrays(np.asarray(mean, np.float64), np.asarray(u, np.float64))
    out = np.zeros(mean.shape)
    small = (mean < exact_below) & (mean > 0)  # a zero mean is a zero count
    m, uu = mean[small], u[small]
    p = np.exp(-m)
    cdf = p.copy()
    k = np.zeros_like(m)
    for j in range(1, int(4 * exact_below)):
        need = cdf < uu
        if not need.any():
            break
        p = p * m / j
        cdf = cdf + p
        k = k + need
    out[small] = k
    big = mean >= exact_below
    if big.any():
        m, z = mean[big], _normal_ppf(u[big])
        wh = m * (1 - 1 / (9 * m) + z / (3 * np.sqrt(m))) ** 3
        out[big] = np.maximum(0.0, np.ceil(wh - 0.5))
    return out


def _normal_ppf(u: np.ndarray) -> np.ndarray:
    """Standard normal quantiles (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
         1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
         6.680131188771972e01, -1.328068155288572e01)  # fmt: skip
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
         -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
         3.754408661907416e00)  # fmt: skip
    u = np.asarray(u, np.float64)
    out = np.empty_like(u)
    low, high = u < 0.02425, u > 1 - 0.02425
    mid = ~(low | high)
    q = u[mid] - 0.5
    r = q * q
    num = ((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]
    den = ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1
    out[mid] = num * q / den
    for mask, sign, v in ((low, 1.0, u), (high, -1.0, 1 - u)):
        qq = np.sqrt(-2 * np.log(v[mask]))
        num = ((((c[0] * qq + c[1]) * qq + c[2]) * qq + c[3]) * qq + c[4]) * qq + c[5]
        den = (((d[0] * qq + d[1]) * qq + d[2]) * qq + d[3]) * qq + 1
        out[mask] = sign * num / den
    return out


def steady_state(
    stats: WorkloadStats, rows: list[dict], curves: dict
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Metrics of every row (one replica group of a point, with its load), vectorized.

    Each row: estimator key, budget, engine, count/replicas, lam (arrivals per s to each
    replica of the group), pd ("unified", or prefill/decode counts), router affinity, caps.
    Returns the per-row frame of scalars and the [rows, S] TTFT and TPOT samples."""
    n_rows = len(rows)
    inp = stats.input_len.astype(np.float64)
    outl = stats.output_len.astype(np.float64)
    u_wait, u_tpot, u_arrive = stats.ranks

    def col(name, dtype=np.float64):
        return np.array([r[name] for r in rows], dtype)

    lam = col("lam")  # arrivals per s per routed replica
    lam_dec = col("lam_decode")  # per decode-serving replica
    replicas = col("routed")
    affine = col("affine", bool)
    cache_tokens = col("cache_tokens")
    reuse_fraction = col("reuse_fraction")  # hybrids: hits only where a state was saved
    l1_tokens = col("l1_tokens")
    max_running = col("max_running")
    overhead = col("step_overhead_s")
    mixed = col("mixed", bool)  # vLLM: prefill chunks ride in decode steps
    disagg = col("disagg", bool)
    transfer_per_token = col("transfer_s_per_token")
    transfer_latency = col("transfer_latency_s")
    frontend_s = col("frontend_request_s")
    frontend_tok = col("frontend_per_token_s")
    span = col("span_s")  # the trace's duration at this rate
    names = list(curves)  # each distinct curve once, then gathered per row
    at = {k: i for i, k in enumerate(names)}
    which = np.array([at[r["curve"]] for r in rows])
    pre0 = np.stack([curves[k].prefill0_s for k in names])[which]
    pre1 = np.stack([curves[k].prefill1_s for k in names])[which]
    chunks = np.stack([curves[k].chunks for k in names]).astype(np.float64)[which]
    one = np.array([curves[k].one_token_s for k in names])[which]
    dgrid = np.stack([curves[k].decode_s for k in names])[which]
    pre0 = pre0 + chunks * overhead[:, None]
    pre1 = pre1 + chunks * overhead[:, None]
    dgrid = dgrid + overhead[:, None]
    ctx = stats.context_tokens
    kv_cap = np.maximum(1.0, np.floor(l1_tokens / max(ctx, 1.0)))
    n_cap = np.minimum(max_running, kv_cap)
    o1 = max(float(outl.mean()) - 1.0, 0.0)

    # the loop needs only each row's first two moments of its prefill service time, a
    # quadratic in the hit fraction phi and in g (1: a mixed step's chunk shares the weight
    # read the decodes pay anyway): moments of the curves once, not [P, S] arrays per pass
    c1 = chunks * one[:, None]
    mom = {
        "p0": pre0.mean(axis=1), "p1": pre1.mean(axis=1), "c": c1.mean(axis=1),
        "p00": (pre0 * pre0).mean(axis=1), "p11": (pre1 * pre1).mean(axis=1),
        "p01": (pre0 * pre1).mean(axis=1), "p0c": (pre0 * c1).mean(axis=1),
        "p1c": (pre1 * c1).mean(axis=1), "cc": (c1 * c1).mean(axis=1),
    }  # fmt: skip
    n_run = np.zeros(n_rows)
    for _ in range(2):  # hits depend on the running requests' KV, which depends on the load
        free = np.maximum(cache_tokens - n_run * ctx, 0.0)
        hits = hit_tokens(stats, free, replicas, affine) * reuse_fraction
        phi = hits / stats.reuse_tokens_inf if stats.reuse_tokens_inf else np.zeros(n_rows)
        g = (mixed & (n_run >= 1)).astype(np.float64)
        a, b = 1 - phi, phi
        es = a * mom["p0"] + b * mom["p1"] - g * mom["c"]
        es2 = (
            a * a * mom["p00"] + b * b * mom["p11"] + 2 * a * b * mom["p01"]
            + g * g * mom["cc"] - 2 * g * (a * mom["p0c"] + b * mom["p1c"])
        )  # fmt: skip
        rho = np.minimum(lam * es, RHO_MAX)
        served_pre = np.minimum(lam, RHO_MAX / np.maximum(es, 1e-12))
        # decode: N = lam (O - 1) d(N) / (1 - rho_decode_share), bisection on [0, n_cap]
        share = np.where(disagg, 1.0, 1.0 - rho)
        lam_d = np.where(disagg, lam_dec, np.minimum(lam, served_pre))

        def excess(n, share=share, lam_d=lam_d):
            d = _interp_rows(_N_GRID, dgrid, np.maximum(n, 1.0))
            return lam_d * o1 * d / share - n

        lo = np.zeros(n_rows)
        hi = n_cap.copy()
        over = excess(hi) > 0
        for _ in range(30):  # to a millionth of the running cap
            mid = 0.5 * (lo + hi)
            pos = excess(mid) > 0
            lo = np.where(pos, mid, lo)
            hi = np.where(pos, hi, mid)
        n_run = np.where(over, n_cap, hi)
    serv = pre0 * (1 - phi[:, None]) + pre1 * phi[:, None]  # [P, S] prefill seconds
    serv = np.where(g[:, None] > 0, np.maximum(serv - c1, 0.0), serv)
    d = _interp_rows(_N_GRID, dgrid, np.maximum(n_run, 1.0))
    tpot_mean = d / share
    served_dec = np.where(
        over, n_cap * share / np.maximum(o1 * d, 1e-12), lam_d
    )  # requests per s through decode
    # unified: decode caps what prefill admits; PD: decode replicas (lam_dec each) serve
    # lam_dec / lam of a prefill replica's rate
    dec_limit = np.where(disagg, served_dec * lam / np.maximum(lam_dec, 1e-12), served_dec)
    served = np.minimum(served_pre, dec_limit)
    backlog = np.clip(1.0 - served / np.maximum(lam, 1e-12), 0.0, 1.0)

    # TTFT per sampled request: the queue's wait, its prefill, the step in progress (formed one
    # step ahead: 1.5 steps), the front end, the backlog of an overloaded replica, PD's transfer
    wq = lam * es2 / (2 * np.maximum(1 - rho, 1 - RHO_MAX))
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(
            u_wait[None, :] > 1 - rho[:, None],
            (wq / np.maximum(rho, 1e-12))[:, None] * np.log(rho[:, None] / (1 - u_wait[None, :])),
            0.0,
        )
    tail = np.nan_to_num(np.maximum(tail, 0.0))
    d_unified = np.where(disagg, 0.0, d)
    prefill_span = serv + np.where(mixed, 1.0, 0.0)[:, None] * chunks * d[:, None]
    ttft = (
        tail
        + prefill_span
        + 1.5 * d_unified[:, None]
        + frontend_s[:, None]
        + frontend_tok[:, None] * inp[None, :]
        + backlog[:, None] * span[:, None] * u_arrive[None, :]
        + np.where(disagg, 1.0, 0.0)[:, None]
        * (transfer_latency[:, None] + transfer_per_token[:, None] * inp[None, :])
    )
    # TPOT per request: its decode steps plus the prefills run during its decode, which
    # pause it (SGLang) or share its steps (vLLM), work-conserving either way: those queued
    # behind it when its first token came out (lam (W + S) of them) and those arriving while
    # it decodes (lam tau / (1 - rho)); a Poisson count at the request's rank, each of mean
    # service E[S]
    has_tpot = outl > 1
    # Counted in the trace itself, not as Poisson arrivals: real arrivals come in bursts (a
    # conversation's users, a batch job), and a burst is what queues behind a request
    tau = np.maximum(outl - 1, 1)[None, :] * d[:, None]
    window = (tail + serv + tau / share[:, None]) * col("rate_scale")[:, None]  # trace seconds
    t0 = stats.arrival_s[stats.sample_index]
    later = np.searchsorted(stats.arrival_s, t0[None, :] + window, side="right")
    others = np.maximum(later - stats.sample_index[None, :] - 1, 0)
    k_mean = np.where(disagg, 0.0, 1.0 / replicas)[:, None] * others
    # the count is already a draw of the real arrival process; spreading it to other replicas
    # thins it (Poisson at the request's rank); one replica takes it as it is
    k = np.where((replicas > 1)[:, None], _poisson_ppf(k_mean, u_tpot[None, :]), k_mean)
    tpot = d[:, None] + k * es[:, None] / np.maximum(outl - 1, 1)[None, :]
    tpot = np.where(has_tpot[None, :], tpot, np.nan)
    # ITL: a gap holds a prefill step with probability pi (its chunk's time added)
    steps_per_s = lam * chunks.mean(axis=1)
    pi = np.where(disagg, 0.0, np.clip(steps_per_s * d / share, 0.0, 1.0))
    # the gaps that hold a prefill step hold one chunk each: their times at the quantiles above
    # 1 - pi are the chunk-time distribution's (a request's chunks weighted by their number)
    per_chunk = serv / np.maximum(chunks, 1.0)
    order = np.argsort(per_chunk, axis=1)
    sorted_chunk = np.take_along_axis(per_chunk, order, axis=1)
    cum = np.cumsum(np.take_along_axis(chunks, order, axis=1), axis=1)
    cum /= cum[:, -1:]
    itl = {}
    for stat, q in _STAT_Q.items():
        inner = np.clip((q / 100 - (1 - pi)) / np.maximum(pi, 1e-12), 0.0, 1.0)
        j = np.argmax(cum >= inner[:, None] - 1e-12, axis=1)
        extra = np.where(q / 100 > 1 - pi, sorted_chunk[np.arange(n_rows), j], 0.0)
        itl[stat] = d + extra
    frame = pd.DataFrame(
        {
            "rho_prefill": rho,
            "backlog": backlog,
            "running": n_run,
            "running_share": n_run / np.maximum(n_cap, 1.0),
            "decode_step_s": d,
            "tpot_mean_s": tpot_mean,
            "served_per_s": served,
            "hit_tokens": hits,
            "itl_prefill_share": pi,
            **{f"itl_s_{stat}": v for stat, v in itl.items()},
        }
    )
    return frame, ttft, tpot


def _stats_columns(
    name: str, samples: np.ndarray, weights: np.ndarray, uniform: bool = False
) -> dict:
    """Weighted mean and p50/p90/p99 of each row's samples (NaNs ignored): one sort per
    metric, the three quantiles read off the cumulative weights."""
    w = np.where(np.isnan(samples), 0.0, weights)
    tot = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(tot > 0, np.nansum(samples * w, axis=1) / tot, np.nan)
    cols = {f"{name}_s_mean": mean}
    if uniform:  # equal weights: the sorted samples alone (the same quantiles, one pass less)
        s = np.sort(samples, axis=1)  # NaNs last
        n = (~np.isnan(samples)).sum(axis=1)
        rows = np.arange(len(s))
        for stat, q in _STAT_Q.items():
            j = np.maximum(np.ceil(q / 100.0 * n - 1e-9).astype(np.int64) - 1, 0)
            cols[f"{name}_s_{stat}"] = np.where(n > 0, s[rows, np.minimum(j, s.shape[1] - 1)],
                                                np.nan)  # fmt: skip
        return cols
    order = np.argsort(samples, axis=1)  # NaNs last, with no weight
    s = np.take_along_axis(samples, order, axis=1)
    cw = np.cumsum(np.take_along_axis(w, order, axis=1), axis=1)
    rows = np.arange(len(s))
    for stat, q in _STAT_Q.items():
        j = np.argmax(cw >= (q / 100.0) * tot[:, None] - 1e-12, axis=1)
        cols[f"{name}_s_{stat}"] = np.where(tot > 0, s[rows, j], np.nan)
    return cols


# ------------------------------------------------------------------------------------------------
# points -> rows -> metrics


# options that change a replica's sizing (memory, scheduler caps, estimator): points that
# share them share one sizing, whatever their replica count, router or load
_SIZING = (
    "model", "hardware", "tp", "weight_dtype", "kv_dtype", "calibration", "estimator",
    "estimator_table", "extrapolate", "engine", "l1_fraction", "gpu_memory_utilization",
    "kv_cache_tokens", "l2_gb", "l3_gb", "chunked_prefill_size", "max_prefill_tokens",
    "max_running_requests", "max_num_batched_tokens", "max_num_seqs", "cuda_graph_max_bs",
    "step_overhead_ms", "gpu_price_usd_per_hour", "ep", "dp_attention",
)  # fmt: skip
_GROUPS: dict[tuple, ReplicaPlan] = {}


_SIZING_OF = operator.attrgetter(*_SIZING)


def replica_plans(o: SimulationOptions, prices: dict) -> list[tuple[ReplicaPlan, int]]:
    """``replica_groups`` as (plan, replicas) pairs, computed once per distinct sizing: a
    homogeneous point's one group is that of one replica, with the point's count."""
    if o.fleet:
        return [(g, g.count) for g in replica_groups(o, prices)]
    key = (_SIZING_OF(o), tuple(sorted(prices.items())) if prices else ())
    g = _GROUPS.get(key)
    if g is None:
        (g,) = replica_groups(replace(o, replicas=1, pd=None), prices)
        _GROUPS[key] = g
    return [(g, o.replicas)]


def _rows_of(point_options, stats: WorkloadStats, prices: dict) -> list[tuple[dict, float]]:
    """The steady-state rows of one point (one per replica group) and their weights."""
    o = (
        point_options
        if isinstance(point_options, SimulationOptions)
        else SimulationOptions.checked(point_options)
    )
    groups = replica_plans(o, prices)
    total = sum(count for _, count in groups)
    n_prefill, n_decode = parse_pd(o.pd) if o.pd else (total, 0)
    lam_total = stats.rate_per_s * o.rate_scale
    fe = FRONTENDS[o.engine] if o.frontend == "on" else None
    out = []
    for g, count in groups:
        lam = lam_total / n_prefill
        out.append(
            (
                {
                    "curve": (g.estimator_key, g.budget),
                    "options": o,
                    "max_running": g.max_running,
                    "lam": lam,
                    "lam_decode": lam_total / n_decode if n_decode else lam,
                    "routed": n_prefill,
                    "affine": o.router in AFFINE_ROUTERS,
                    "cache_tokens": g.cache_tokens,
                    "l1_tokens": g.l1_tokens,
                    "reuse_fraction": state_reuse_fraction(stats, g.state_grid),
                    "step_overhead_s": g.step_overhead_s,
                    "mixed": g.engine == "vllm",
                    "disagg": bool(n_decode),
                    "transfer_s_per_token": g.kv_bytes_per_token / (o.kv_link_gb_s * 1e9),
                    "transfer_latency_s": o.kv_link_latency_us * 1e-6,
                    "frontend_request_s": fe.request_s if fe else 0.0,
                    "frontend_per_token_s": fe.per_input_token_s if fe else 0.0,
                    "span_s": stats.duration_s / o.rate_scale,
                    "rate_scale": o.rate_scale,
                    "served_replicas": n_prefill if n_decode else count,
                    "price_usd_per_hour": g.price_usd_per_hour * g.tp * count,
                },
                count / total if not n_decode else 1.0,
            )
        )
    return out


def screen(
    options: list,
    stats: WorkloadStats,
    prices: dict | None = None,
    request_slo: tuple[float | None, float | None] = (None, None),
) -> pd.DataFrame:
    """Steady-state metrics of every configuration (simulate options as dicts or
    ``SimulationOptions``, all feasible), one row
    each, in order: latency statistics (``ttft_s_p99``, ...), throughputs, hit rate, the
    cluster's price per hour, and the utilizations the correction is fitted on."""
    prices = prices or {}
    rows, owner, weight = [], [], []
    for i, opts in enumerate(options):
        for row, w in _rows_of(opts, stats, prices):
            rows.append(row)
            owner.append(i)
            weight.append(w)
    if not rows:
        return pd.DataFrame()
    wanted: dict[tuple, set] = {}
    sources: dict[tuple, SimulationOptions] = {}
    ctx = max(stats.context_tokens, 1.0)
    for r in rows:
        key, budget = r["curve"]
        n_cap = min(int(r["max_running"]), max(1, int(r["l1_tokens"] // ctx)))
        wanted.setdefault(key, set()).add((budget, n_cap))
        sources.setdefault(key, r["options"])
    curves = compute_curves(stats, wanted, sources)
    frame, ttft, tpot = steady_state(stats, rows, curves)
    owner = np.asarray(owner)
    weight = np.asarray(weight)
    P, S = len(options), ttft.shape[1]
    # each point's samples: its groups' samples side by side, weighted by their replicas
    n_groups = np.bincount(owner, minlength=P)
    G = int(n_groups.max())
    slot = np.arange(len(owner)) - np.repeat(np.cumsum(n_groups) - n_groups, n_groups)
    idx = np.full((P, G), -1)
    idx[owner, slot] = np.arange(len(owner))
    w = np.where(idx >= 0, weight[np.maximum(idx, 0)], 0.0)

    def gather(samples):
        out = samples[np.maximum(idx, 0)]  # [P, G, S]
        return out.reshape(P, G * S)

    sw = np.repeat(w, S, axis=1) / S
    outl = stats.output_len.astype(np.float64)
    t_ttft, t_tpot = gather(ttft), gather(tpot)
    t_e2e = t_ttft + np.nan_to_num(t_tpot) * np.tile(np.maximum(outl - 1, 0), G)[None, :]
    cols: dict = {}
    for name, samp in (("ttft", t_ttft), ("tpot", t_tpot), ("e2e", t_e2e)):
        cols.update(_stats_columns(name, samp, sw, uniform=G == 1))

    def per_point(values, how="mean"):
        v = np.asarray(values, np.float64)[np.maximum(idx, 0)]
        if how == "sum":
            return np.where(idx >= 0, v, 0.0).sum(axis=1)
        return (v * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)

    cols["itl_s_mean"] = cols["tpot_s_mean"]
    for stat in _STAT_Q:
        cols[f"itl_s_{stat}"] = per_point(frame[f"itl_s_{stat}"])
    ttft_ok, tpot_ok = request_slo
    ok = np.ones_like(t_ttft, bool)
    if ttft_ok is not None:
        ok &= t_ttft <= ttft_ok
    if tpot_ok is not None:
        ok &= ~(t_tpot > tpot_ok)
    cols["slo_attainment"] = (ok * sw).sum(axis=1) / np.maximum(sw.sum(axis=1), 1e-12)
    served = per_point(frame["served_per_s"].to_numpy() * np.array(
        [r["served_replicas"] for r in rows]), "sum")  # fmt: skip
    span = per_point([r["span_s"] for r in rows])
    # the simulator divides by first arrival to last finish: the trace plus its drain
    drain = span / np.maximum(span + cols["e2e_s_mean"], 1e-12)
    req_tput = served * np.where(per_point(frame["backlog"]) > 0, 1.0, drain)
    mean_out = stats.output_tokens / stats.requests
    mean_in = stats.input_tokens / stats.requests
    cols["request_throughput_per_s"] = req_tput
    cols["throughput_output_tok_s"] = req_tput * mean_out
    cols["throughput_input_tok_s"] = req_tput * mean_in
    cols["goodput_req_s"] = req_tput * cols["slo_attainment"]
    cols["hit_rate"] = per_point(frame["hit_tokens"]) / max(stats.input_tokens, 1)
    cols["usd_per_hour"] = per_point([r["price_usd_per_hour"] for r in rows], "sum")
    for name in ("rho_prefill", "backlog", "running_share"):
        cols[name] = per_point(frame[name])
    return pd.DataFrame(cols)


# ------------------------------------------------------------------------------------------------
# the screen calibrated against the simulator

CORRECTED = [
    f"{m}_s_{s}" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p90", "p99")
] + ["request_throughput_per_s"]
FEATURES = ("rho_prefill", "backlog", "running_share")


@dataclass(frozen=True, slots=True)
class Correction:
    """Per metric: log(simulated / screened) = coef . [1, rho_prefill, backlog, running_share],
    fitted by ridge regression (a prior of no correction), with the residuals' spread."""

    coef: dict  # metric -> np.ndarray [4]
    spread: dict  # metric -> residual standard deviation of log ratio (inf: not fitted)
    points: int = 0

    @classmethod
    def none(cls) -> Correction:
        return cls({}, {m: math.inf for m in CORRECTED}, 0)

    @classmethod
    def fit(cls, screened: pd.DataFrame, simulated: pd.DataFrame, ridge: float = 1.0):
        coef, spread = {}, {}
        X = np.column_stack([np.ones(len(screened))] + [screened[f].to_numpy() for f in FEATURES])
        for m in CORRECTED:
            a, b = screened[m].to_numpy(float), simulated[m].to_numpy(float)
            ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
            if ok.sum() < 3:
                spread[m] = math.inf
                continue
            y = np.log(b[ok] / a[ok])
            Xo = X[ok]
            reg = ridge * np.eye(X.shape[1])
            reg[0, 0] = 1e-6  # the mean ratio is free
            beta = np.linalg.solve(Xo.T @ Xo + reg, Xo.T @ y)
            coef[m] = beta
            res = y - Xo @ beta
            dof = max(1, int(ok.sum()) - 1)
            spread[m] = float(np.sqrt((res @ res) / dof))
        return cls(coef, spread, len(screened))

    def apply(self, screened: pd.DataFrame) -> pd.DataFrame:
        out = screened.copy()
        if not len(out):
            return out
        X = np.column_stack([np.ones(len(out))] + [out[f].to_numpy() for f in FEATURES])
        for m, beta in self.coef.items():
            factor = np.exp(np.clip(X @ beta, -5, 5))
            out[m] = out[m] * factor
        if "request_throughput_per_s" in self.coef:
            ratio = out["request_throughput_per_s"] / screened["request_throughput_per_s"]
            for m in ("throughput_output_tok_s", "throughput_input_tok_s", "goodput_req_s"):
                out[m] = screened[m] * ratio
        return out
