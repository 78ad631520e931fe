"""The search: expand the space, set aside what cannot run, screen the rest in one vectorized
pass, simulate the points that can still reach the fronts (successive halving over trace
length), refit the screen on those simulations and repeat until no unsimulated point can reach
a front; then the Pareto fronts and the best point per objective under the SLOs.

Simulations are cached on disk by a hash of their options, the workload file's content and the
code (package sources, specs, models, calibrations), so a rerun simulates only what changed; a
search interrupted midway resumes from the cache. They run in this process (``jobs=1``), in a
local process pool, or as Ray tasks (``ray_address``); each worker keeps its compiled estimator
programs across all the simulations it runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from hisim_jax import files
from hisim_jax.search import pareto
from hisim_jax.search.screen import Correction, replica_plans, screen, workload_stats
from hisim_jax.search.space import (
    LATENCIES,
    METRICS,
    STATS,
    Point,
    SearchSpace,
    expand,
    read_space,
)
from hisim_jax.serving.metrics import CPU_PRICE_USD_PER_HOUR
from hisim_jax.simulation import SimulationOptions, build_workload
from hisim_jax.specs import SpecError

STRATEGIES = ("halving", "grid", "random")
LATENCY_COLUMNS = [f"{m}_s_{s}" for m in LATENCIES for s in STATS]
BASE_COLUMNS = [
    *LATENCY_COLUMNS,
    "request_throughput_per_s",
    "throughput_output_tok_s",
    "throughput_input_tok_s",
    "goodput_req_s",
    "slo_attainment",
    "hit_rate",
]


@dataclass(frozen=True, slots=True)
class SearchOptions:
    strategy: str = "halving"  # halving (screen + simulate the front), grid, random
    max_simulations: int = 64  # full-workload simulations at most (halving, random)
    eta: int = 3  # successive halving keeps 1/eta of a rung's points
    rungs: int = 2  # shorter-trace rungs before the full workload
    rounds: int = 4  # screen refits (each followed by simulations of its new candidates)
    min_requests: int = 200  # the shortest rung's requests
    margin: float = 1.5  # a point is kept if this factor better would reach a front
    jobs: int = 0  # worker processes (0: the CPU cores this process may use)
    ray_address: str | None = None  # run simulations as tasks of this Ray cluster ("auto")
    cache_dir: str | None = None  # None: $HISIM_CACHE_DIR/search; "": no cache
    seed: int = 0
    samples: int = 256  # requests sampled for the screen's latency distributions
    cpu_price_usd_per_hour: float = CPU_PRICE_USD_PER_HOUR

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"field 'strategy' must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        for name, lo in (("max_simulations", 1), ("eta", 2), ("rungs", 0), ("rounds", 1),
                         ("min_requests", 1),
                         ("jobs", 0), ("seed", 0), ("samples", 16)):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"field '{name}' must be an integer >= {lo}, got {v!r}")
        price = self.cpu_price_usd_per_hour
        if not (isinstance(price, (int, float)) and math.isfinite(price) and 0 < price <= 1e6):
            raise ValueError(f"field 'cpu_price' must be USD per core-hour > 0, got {price!r}")
        if not (isinstance(self.margin, (int, float)) and 1 <= self.margin <= 100):
            raise ValueError(f"field 'margin' must be a factor in [1, 100], got {self.margin!r}")


@dataclass(frozen=True, slots=True)
class SearchResult:
    points: pd.DataFrame  # every point: axes, feasibility, stage, metrics
    pareto: pd.DataFrame  # the front points of each front (column ``front``)
    best: dict  # objective -> the best SLO-meeting point's id, value and options
    report: dict  # wall time, counts, evaluation cost
    space: SearchSpace
    options: dict = field(default_factory=dict)  # point id -> its simulate options


# ------------------------------------------------------------------------------------------------
# derived metrics and SLOs (screened and simulated points alike)


def derive(frame: pd.DataFrame, gpus: np.ndarray) -> pd.DataFrame:
    """Per-GPU, per-user and cost metrics from throughputs, TPOT and the price per hour."""
    f = frame.copy()
    f["gpus"] = gpus
    out_tok = f["throughput_output_tok_s"].to_numpy(float)
    all_tok = out_tok + f["throughput_input_tok_s"].to_numpy(float)
    usd_s = f["usd_per_hour"].to_numpy(float) / 3600
    with np.errstate(divide="ignore", invalid="ignore"):
        f["tokens_per_s_per_gpu"] = out_tok / gpus
        f["tokens_per_s_per_user"] = 1.0 / f["tpot_s_mean"].to_numpy(float)
        f["usd_per_mtok"] = np.where(out_tok > 0, usd_s / out_tok * 1e6, np.inf)
        f["usd_per_mtok_total"] = np.where(all_tok > 0, usd_s / all_tok * 1e6, np.inf)
        f["tokens_per_usd"] = np.where(usd_s > 0, out_tok / usd_s, np.inf)
        f["goodput_req_s_per_gpu"] = f["goodput_req_s"].to_numpy(float) / gpus
    return f


def slo_mask(frame: pd.DataFrame, space: SearchSpace, factor: float = 1.0) -> np.ndarray:
    """Rows meeting every SLO; ``factor`` > 1 loosens each limit by it (could still meet)."""
    ok = np.ones(len(frame), bool)
    for col, limit in space.slo.limits:
        v = frame[col].to_numpy(float)
        ok &= np.isfinite(v) & (v <= limit * factor)
    if space.slo.attainment is not None:
        a = frame["slo_attainment"].to_numpy(float)
        ok &= np.isfinite(a) & (a >= 1 - (1 - space.slo.attainment) * factor)
    return ok


def _front_values(frame: pd.DataFrame, front: tuple[str, str]) -> tuple[np.ndarray, list[bool]]:
    return frame[list(front)].to_numpy(float), [METRICS[front[0]], METRICS[front[1]]]


def _improved(values: np.ndarray, maximize: list[bool], factor: float) -> np.ndarray:
    """Values ``factor`` times better in every column (the optimistic end of their error)."""
    out = values.copy()
    for j, mx in enumerate(maximize):
        out[:, j] = values[:, j] * factor if mx else values[:, j] / factor
    return out


def could_reach(frame: pd.DataFrame, space: SearchSpace, factor: float) -> np.ndarray:
    """Points that, ``factor`` better than predicted, would meet the SLOs and sit on a front
    or be the best in an objective."""
    feasible_slo = slo_mask(frame, space, factor)
    sure = slo_mask(frame, space, 1.0)
    keep = np.zeros(len(frame), bool)
    for front in space.fronts:
        vals, mx = _front_values(frame, front)
        ref = vals[sure] if sure.any() else vals[feasible_slo]
        if not len(ref):
            continue
        front_vals = ref[pareto.pareto_mask(ref, mx)]
        beaten = pareto.dominates_any(front_vals, _improved(vals, mx, factor), mx)
        keep |= feasible_slo & ~beaten & np.isfinite(vals).all(axis=1)
    for obj in space.objectives:
        v = frame[obj].to_numpy(float)
        pool = sure if sure.any() else feasible_slo
        if not pool.any():
            continue
        best = np.nanmax(v[pool]) if METRICS[obj] else np.nanmin(v[pool])
        better = v * factor >= best if METRICS[obj] else v / factor <= best
        keep |= feasible_slo & better
    return keep


def _rank(frame: pd.DataFrame, space: SearchSpace) -> np.ndarray:
    """A priority per row (lower first): SLO-meeting rows by their Pareto layer over all
    fronts, then the others by how far they miss the SLOs."""
    n = len(frame)
    layer = np.full(n, np.inf)
    remaining = np.ones(n, bool)
    depth = 0
    while remaining.any() and depth < 64:
        on = np.zeros(n, bool)
        idx = np.flatnonzero(remaining)
        for front in space.fronts:
            vals, mx = _front_values(frame.iloc[idx], front)
            on[idx[pareto.pareto_mask(vals, mx)]] = True
        if not on.any():
            break
        layer[on] = depth
        remaining &= ~on
        depth += 1
    miss = np.zeros(n)
    for col, limit in space.slo.limits:
        v = frame[col].to_numpy(float)
        miss = np.maximum(miss, np.nan_to_num(v / limit, nan=1e9))
    meets = slo_mask(frame, space)
    return np.where(meets, layer, 1e3 + miss)


# ------------------------------------------------------------------------------------------------
# the cache of simulations


@lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the package's sources and the specs, models and calibrations beside it."""
    import hisim_jax

    root = Path(hisim_jax.__file__).parent
    h = hashlib.sha256(hisim_jax.__version__.encode())
    for folder, pattern in (
        (root, "**/*.py"), (root.parent / "hardware_specs", "**/*"), (root.parent / "models", "*"),
    ):  # fmt: skip
        for p in sorted(folder.glob(pattern)):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(folder)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(files.read_bytes(path)).hexdigest()


def workload_digest(options: dict) -> str:
    trace = options.get("trace")
    if trace is None:
        return "builtin-chat"
    st = os.stat(trace)
    return _file_digest(str(Path(trace).resolve()), st.st_size, st.st_mtime_ns)


def cache_key(options: dict, workload: str) -> str:
    text = json.dumps(
        {"options": options, "workload": workload, "code": code_version()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_dir() -> Path | None:
    from hisim_jax import compile_cache

    folder = compile_cache.cache_dir()
    return None if folder is None else folder / "search"


class SimulationCache:
    """One JSON file per simulation, named by its key; written atomically as it completes."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise SpecError(
                    f"{folder}: cannot create the search cache ({e.strerror})"
                ) from None

    def get(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        p = self.folder / f"{key[:2]}" / f"{key}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> None:
        if self.folder is None:
            return
        p = self.folder / f"{key[:2]}" / f"{key}.json"
        try:
            p.parent.mkdir(exist_ok=True)
            files.write_atomic(p, lambda t: Path(t).write_text(files.strict_json(record)))
        except (OSError, files.FileError):
            pass  # a cache that cannot be written only costs a rerun


# ------------------------------------------------------------------------------------------------
# one simulation (runs in a worker)


def metrics_of(summary: dict) -> dict:
    """The search's base metrics from a simulate summary."""
    out = {}
    for m in LATENCIES:
        for s in STATS:
            v = summary[f"{m}_s"][s]
            out[f"{m}_s_{s}"] = math.nan if v is None else float(v)
    out["request_throughput_per_s"] = summary["request_throughput_per_s"]
    out["throughput_output_tok_s"] = summary["throughput_output_tok_s"]
    out["throughput_input_tok_s"] = summary["throughput_input_tok_s"]
    out["slo_attainment"] = summary.get("slo_attainment", 1.0)
    out["goodput_req_s"] = summary.get("goodput_req_s", summary["request_throughput_per_s"])
    out["hit_rate"] = summary["cache"]["hit_rate"]
    out["requests_completed"] = summary["requests_completed"]
    out["requests_total"] = summary["requests_total"]
    out["simulated_s"] = summary["simulated_s"]
    out["wall_s"] = summary["wall_s"]
    return out


def simulate_point(options: dict) -> dict:
    """Simulate one configuration; ``{"metrics": ...}`` or ``{"error": message}``."""
    from hisim_jax.serving.workload import WorkloadError
    from hisim_jax.simulation import run

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        o = SimulationOptions.checked(options)
        result = run(o, workload=_workload(o), frames=False)
    except (SpecError, WorkloadError, ValueError, OSError) as e:
        return {"error": str(e)}
    m = metrics_of(result.summary)
    m["task_s"] = time.perf_counter() - t0  # the whole task: options to summary
    m["task_cpu_s"] = time.process_time() - c0
    return {"metrics": files.finite_or_none(m)}


_WORKLOADS: dict = {}  # a worker's parsed workloads: every point of a rung shares one


def _workload(o: SimulationOptions):
    """``build_workload(o)``, parsed once per worker for each (file, selection): a Workload is
    frozen, so the points of a search share it."""
    from hisim_jax.simulation import build_workload

    stat = os.stat(o.trace) if o.trace else None
    key = (o.trace, stat and (stat.st_size, stat.st_mtime_ns), o.trace_format, o.limit,
           o.rate_scale, o.start_s, o.end_s, o.skip_bad_lines, o.block_tokens, o.seed)  # fmt: skip
    work = _WORKLOADS.get(key)
    if work is None:
        if len(_WORKLOADS) >= 8:
            _WORKLOADS.clear()
        work = _WORKLOADS[key] = build_workload(o)
    return work


def _init_worker(counter) -> None:
    """A pool worker takes the next core (its simulations are serial; see cores.py)."""
    from hisim_jax.cores import pin_to_one_core

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    pin_to_one_core(index)


# ------------------------------------------------------------------------------------------------
# executors: in process, a local pool, Ray


class _Serial:
    def map(self, tasks, done):
        for key, opts in tasks:
            done(key, simulate_point(opts))

    def close(self):
        pass


class _Pool:
    def __init__(self, jobs: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked JAX runtime (threads) can deadlock
        ctx = mp.get_context("spawn")
        self.pool = ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_init_worker, initargs=(ctx.Value("i", 0),)
        )

    def map(self, tasks, done):
        from concurrent.futures import as_completed

        futures = {self.pool.submit(simulate_point, opts): key for key, opts in tasks}
        for fut in as_completed(futures):
            done(futures[fut], fut.result())

    def close(self):
        self.pool.shutdown(cancel_futures=True)


class _Ray:
    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise SpecError(
                "--ray needs Ray: pip install 'hisim-jax[ray]' (here and on the cluster)"
            ) from None
        self.ray = ray
        try:
            ray.init(
                address=None if address == "local" else address,
                ignore_reinit_error=True,
                log_to_driver=False,
                include_dashboard=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SpecError(f"--ray {address}: cannot connect ({e})") from None
        self.task = ray.remote(num_cpus=1)(simulate_point)

    def map(self, tasks, done):
        ray = self.ray
        refs = {self.task.remote(opts): key for key, opts in tasks}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                done(refs[r], ray.get(r))

    def close(self):
        pass


def _executor(opts: SearchOptions):
    if opts.ray_address:
        return _Ray(opts.ray_address)
    jobs = _cores_used(opts)
    return _Serial() if jobs <= 1 else _Pool(jobs)


# ------------------------------------------------------------------------------------------------
# the search


def _point_frame(points: list[Point]) -> pd.DataFrame:
    rows = []
    for p in points:
        rows.append({"id": p.id, **p.axes, "feasible": not p.reason, "reason": p.reason,
                     "gpus": p.gpus})  # fmt: skip
    return pd.DataFrame(rows)


def _check(points: list[Point], stats, prices: dict) -> list[Point]:
    """Each point with the reason it cannot run ("" if it can): options the simulator refuses,
    TP that does not divide the heads, weights that do not fit, KV too small for the longest
    request."""
    out = []
    for p in points:
        reason = p.reason
        if not reason:
            try:  # (parse_fleet refuses a pd split without prefill or decode replicas)
                o = SimulationOptions.checked(p.options)
                for g, _count in replica_plans(o, prices):
                    if g.l1_tokens < stats.longest:
                        reason = (
                            f"KV cache of {g.l1_tokens} tokens per replica is smaller than the "
                            f"longest request ({stats.longest} tokens)"
                        )
                        break
            except (SpecError, ValueError) as e:
                reason = str(e).removeprefix("options: ")
        out.append(Point(p.id, p.options, p.axes, p.gpus, reason, {} if reason else {"o": o}))
    return out


def _request_slo(space: SearchSpace) -> dict:
    extra = {}
    if space.slo.request_ttft_s is not None:
        extra["slo_ttft_ms"] = space.slo.request_ttft_s * 1e3
    if space.slo.request_tpot_s is not None:
        extra["slo_tpot_ms"] = space.slo.request_tpot_s * 1e3
    return extra


def run_search(
    space: SearchSpace | str | Path,
    options: SearchOptions | None = None,
    progress=None,
) -> SearchResult:
    """Search ``space``; ``progress(stage, done, total)`` is called as work completes."""
    t0 = time.perf_counter()
    if not isinstance(space, SearchSpace):
        space = read_space(space)
    opts = options or SearchOptions()
    say = progress or (lambda *a: None)
    slo_opts = _request_slo(space)
    base = {**space.base, **slo_opts}
    space_b = replace(space, base=base)
    points = expand(space_b)
    work = build_workload(SimulationOptions.checked(base, where=space.where))
    n_full = len(work.requests)
    stats = workload_stats(work, samples=opts.samples, seed=opts.seed)
    prices = dict(space.prices)
    points = _check(points, stats, prices)
    frame = _point_frame(points)
    feasible = [i for i, p in enumerate(points) if not p.reason]
    say("screen", 0, len(feasible))
    t_screen = time.perf_counter()
    screened = screen([points[i].extra["o"] for i in feasible], stats, prices,
                      (space.slo.request_ttft_s, space.slo.request_tpot_s))  # fmt: skip
    screen_s = time.perf_counter() - t_screen
    say("screen", len(feasible), len(feasible))
    gpus_all = frame["gpus"].to_numpy(float)
    if len(feasible):
        screened = derive(screened, gpus_all[feasible])
    raw_screen = screened.copy()

    cache = SimulationCache(
        default_cache_dir() if opts.cache_dir is None else (Path(opts.cache_dir) if opts.cache_dir else None)
    )  # fmt: skip
    wdig = workload_digest(base)
    sims: dict[tuple[int, int], dict] = {}  # (feasible index, requests) -> metrics or error
    counts = {"simulations": 0, "cached": 0, "simulated_gpu_s": 0.0, "sim_wall_s": 0.0,
              "usd_gpu": 0.0}  # fmt: skip
    executor = None
    done_total = [0, 0]
    cached_keys: set = set()
    rounds: list = []

    def simulate(indices: list[int], n_requests: int, stage: str) -> None:
        nonlocal executor
        tasks, keys = [], {}
        for i in indices:
            if (i, n_requests) in sims:
                continue
            o = dict(points[feasible[i]].options)
            if n_requests < n_full:
                o["limit"] = n_requests
            key = cache_key(o, wdig)
            rec = cache.get(key)
            if rec is not None:
                sims[i, n_requests] = rec
                cached_keys.add((i, n_requests))
                counts["cached"] += 1
                continue
            keys[key] = i
            tasks.append((key, o))
        if not tasks:
            return
        done_total[1] += len(tasks)
        say(stage, done_total[0], done_total[1])
        if executor is None:
            executor = _executor(opts)

        def done(key, rec):
            i = keys[key]
            sims[i, n_requests] = rec
            cache.put(key, rec)
            counts["simulations"] += 1
            done_total[0] += 1
            say(stage, done_total[0], done_total[1])

        executor.map(tasks, done)

    def sim_frame(indices: list[int], n_requests: int) -> pd.DataFrame:
        rows = []
        for i in indices:
            rec = sims.get((i, n_requests), {})
            m = rec.get("metrics")
            rows.append({c: (m or {}).get(c, math.nan) for c in BASE_COLUMNS})
        f = pd.DataFrame(rows, columns=BASE_COLUMNS).astype(float)
        # priced as the screen prices it (the space's prices over the specs', GPU by GPU), not
        # at the single price per GPU a simulate summary carries
        f["usd_per_hour"] = raw_screen["usd_per_hour"].to_numpy()[indices]
        return derive(f, gpus_all[[feasible[i] for i in indices]])

    rungs = _rung_sizes(n_full, opts)
    full_done: list[int] = []
    correction = Correction.none()
    try:
        if opts.strategy == "grid":
            simulate(list(range(len(feasible))), n_full, "simulate")
            full_done = list(range(len(feasible)))
        elif opts.strategy == "random":
            rng = np.random.default_rng(opts.seed)
            k = min(opts.max_simulations, len(feasible))
            full_done = sorted(rng.choice(len(feasible), size=k, replace=False).tolist())
            simulate(full_done, n_full, "simulate")
        elif len(feasible):
            full_done, correction = _halving(
                space_b, opts, screened, raw_screen, rungs, simulate, sim_frame, rounds
            )
    finally:
        if executor is not None:
            executor.close()

    # the table of every point: simulated metrics where the full workload ran, else the
    # deepest rung's, else the (corrected) screen's
    shown = [*METRICS, "throughput_output_tok_s", "throughput_input_tok_s", "goodput_req_s",
             "usd_per_hour"]  # fmt: skip
    metrics = pd.DataFrame(index=range(len(points)), columns=shown, dtype=float)
    stage = np.array(["infeasible"] * len(points), dtype=object)
    requests_sim = np.zeros(len(points), np.int64)
    reason = frame["reason"].to_numpy(object).copy()
    if len(feasible):
        corrected = correction.apply(raw_screen)
        corrected = derive(corrected, gpus_all[feasible])
        cols = [c for c in shown if c in corrected]
        metrics.loc[feasible, cols] = corrected[cols].to_numpy(float)
        stage[feasible] = "screen"
        for n_req in sorted({n for _, n in sims}):
            idx = sorted(i for (i, n) in sims if n == n_req)
            sf = sim_frame(idx, n_req)
            for j, i in enumerate(idx):
                rec = sims[i, n_req]
                row = feasible[i]
                if "error" in rec:
                    stage[row], reason[row] = "failed", f"simulation failed: {rec['error']}"
                    metrics.loc[row] = math.nan
                    continue
                metrics.loc[row, cols] = sf.iloc[j][cols].to_numpy(float)
                stage[row] = "full" if n_req == n_full else "halving"
                requests_sim[row] = n_req
    metrics["gpus"] = gpus_all
    out = frame.copy()
    out["reason"] = reason
    out["feasible"] = [s not in ("infeasible", "failed") for s in stage]
    out["stage"] = stage
    out["requests_simulated"] = requests_sim
    out["source"] = np.where(
        requests_sim > 0, "simulation", np.where(out["feasible"], "screen", "")
    )
    for c in metrics.columns:
        out[c] = metrics[c].to_numpy(float)
    out["meets_slo"] = out["feasible"].to_numpy() & slo_mask(out, space)
    if space.slo.attainment is not None:
        out["attainment_target"] = space.slo.attainment
    if len(feasible):
        out.loc[feasible, "screen_ttft_s_p99"] = raw_screen["ttft_s_p99"].to_numpy()
        out.loc[feasible, "screen_tpot_s_p99"] = raw_screen["tpot_s_p99"].to_numpy()
        out.loc[feasible, "screen_tokens_per_s_per_gpu"] = raw_screen[
            "tokens_per_s_per_gpu"
        ].to_numpy()
    final = out["stage"].to_numpy() == "full"
    fronts, best = _fronts_and_best(out, final, space, points)
    # what the evaluations would cost on GPUs: every simulation used, cached ones included
    # (their CPU time was spent when they ran, and is counted too)
    for (i, _n), rec in sims.items():
        m = rec.get("metrics")
        if m:
            counts["simulated_gpu_s"] += m["simulated_s"] * gpus_all[feasible[i]]
            counts["usd_gpu"] += m["simulated_s"] / 3600 * raw_screen["usd_per_hour"].iloc[i]
            counts["sim_wall_s"] += m["task_s"]
    wall = time.perf_counter() - t0
    cores = _cores_used(opts)
    cached_wall = sum(
        sims[key]["metrics"]["task_s"] for key in cached_keys if "metrics" in sims[key]
    )
    report = {
        "wall_s": wall,
        "screen_s": screen_s,
        "points": len(points),
        "infeasible": int((stage == "infeasible").sum()),
        "screened": len(feasible),
        "screened_per_s": len(feasible) / screen_s if screen_s > 0 else math.inf,
        "simulations": counts["simulations"],
        "simulations_cached": counts["cached"],
        "simulated_full": int(final.sum()),
        "simulated_halving": int((out["stage"] == "halving").sum()),
        "failed": int((stage == "failed").sum()),
        "strategy": opts.strategy,
        "complete": opts.strategy == "grid",
        "rungs_requests": rungs,
        "rounds": rounds,
        "workload_requests": n_full,
        "meets_slo": int((out["meets_slo"] & final).sum()),
        "slo": space.slo.describe(),
        "correction_points": correction.points,
        "correction_spread": {k: v for k, v in correction.spread.items() if math.isfinite(v)},
        "simulation_task_s": counts["sim_wall_s"],
        "simulated_gpu_hours": counts["simulated_gpu_s"] / 3600,
        "simulated_gpu_usd": counts["usd_gpu"],
        "cpu_cores": cores,
        # this run's cores for its wall time, plus the CPU time of the cached simulations
        "cpu_hours": (wall * cores + cached_wall) / 3600,
        "cpu_price_usd_per_hour": opts.cpu_price_usd_per_hour,
    }
    cpu_usd = report["cpu_hours"] * opts.cpu_price_usd_per_hour
    report["cpu_usd"] = cpu_usd
    report["evaluation_cost_ratio"] = counts["usd_gpu"] / cpu_usd if cpu_usd > 0 else None
    report["screen_error"] = _screen_error(out, raw_screen, feasible, final)
    return SearchResult(out, fronts, best, report, space_b, {p.id: p.options for p in points})


def _cores_used(opts: SearchOptions) -> int:
    if opts.ray_address:
        return max(1, opts.jobs or 1)
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, opts.jobs or avail)


def _rung_sizes(n_full: int, opts: SearchOptions) -> list[int]:
    """Requests per rung, shortest first, ending with the whole workload."""
    sizes = [n_full]
    for _ in range(opts.rungs):
        n = sizes[0] // opts.eta
        if n < opts.min_requests:
            break
        sizes.insert(0, n)
    return sizes


def _halving(space, opts, screened, raw_screen, rungs, simulate, sim_frame, rounds):
    """Simulate what can reach a front: rung by rung on longer prefixes of the trace, keeping
    the best 1/eta (never a rung's front), then the whole workload; refit the screen on the
    full simulations and go again while it names new candidates."""
    done: set[int] = set()
    correction = Correction.none()
    factor = opts.margin
    current = screened
    budget = opts.max_simulations
    for _round in range(opts.rounds):
        cand = np.flatnonzero(could_reach(current, space, factor))
        cand = [int(i) for i in cand if int(i) not in done]
        if not cand and not done:  # nothing can meet the SLOs: simulate the closest anyway
            cand = np.argsort(_rank(current, space), kind="stable")[: opts.eta].tolist()
        if not cand:
            break
        order = np.argsort(_rank(current.iloc[cand], space), kind="stable")
        cand = [cand[j] for j in order][: max(0, budget - len(done))]
        if not cand:
            break
        alive = cand
        log = {"candidates": len(cand), "margin": factor, "rungs": []}
        rounds.append(log)
        for n_req in rungs[:-1]:
            if len(alive) <= 2 * opts.eta:  # too few to halve: straight to the whole workload
                break
            simulate(alive, n_req, f"simulate {n_req} requests")
            f = sim_frame(alive, n_req)
            keep_n = max(opts.eta, math.ceil(len(alive) / opts.eta))
            ranks = _rank(f, space)
            order = np.argsort(ranks, kind="stable")
            front = set(np.flatnonzero(ranks == 0).tolist())
            keep = set(order[:keep_n].tolist()) | front
            log["rungs"].append((n_req, len(alive), len(keep)))
            alive = [alive[j] for j in sorted(keep)]
        log["rungs"].append((rungs[-1], len(alive), len(alive)))
        simulate(alive, rungs[-1], "simulate full workload")
        done.update(alive)
        idx = sorted(done)
        sim = sim_frame(idx, rungs[-1])
        ok = np.isfinite(sim["ttft_s_mean"].to_numpy())
        if ok.sum() >= 3:
            correction = Correction.fit(
                raw_screen.iloc[np.array(idx)[ok]].reset_index(drop=True),
                sim[ok].reset_index(drop=True),
            )
            relevant = _relevant_metrics(space)
            spreads = [
                v for k, v in correction.spread.items() if math.isfinite(v) and k in relevant
            ]
            if spreads:  # one-sided 90%: how much better than screened a point may turn out
                factor = float(np.clip(math.exp(1.28 * max(spreads)), 1.1, opts.margin))
            current = derive(correction.apply(raw_screen), screened["gpus"].to_numpy())
    return sorted(done), correction


# the simulated metric each derived one follows
_FOLLOWS = {
    "tokens_per_s_per_user": "tpot_s_mean",
    "tokens_per_s_per_gpu": "request_throughput_per_s",
    "usd_per_mtok": "request_throughput_per_s",
    "usd_per_mtok_total": "request_throughput_per_s",
    "tokens_per_usd": "request_throughput_per_s",
    "goodput_req_s_per_gpu": "request_throughput_per_s",
}


def _relevant_metrics(space: SearchSpace) -> set[str]:
    """The corrected metrics the SLOs, fronts and objectives depend on: their errors set how
    far from a front a point may be and still reach it."""
    names = {c for c, _ in space.slo.limits} | set(space.objectives)
    names |= {m for front in space.fronts for m in front}
    if space.slo.per_request:
        names |= {"ttft_s_p90", "tpot_s_p90"}
    return {_FOLLOWS.get(n, n) for n in names}


def _fronts_and_best(out: pd.DataFrame, final: np.ndarray, space: SearchSpace, points):
    ok = final & out["meets_slo"].to_numpy()
    rows = []
    for x, y in space.fronts:
        idx = np.flatnonzero(ok)
        if not len(idx):
            continue
        vals = out.iloc[idx][[x, y]].to_numpy(float)
        mask = pareto.pareto_mask(vals, [METRICS[x], METRICS[y]])
        sel = idx[mask]
        sel = sel[np.argsort(out.iloc[sel][x].to_numpy(float), kind="stable")]
        for i in sel:
            rows.append({"front": f"{y} vs {x}", **out.iloc[i].to_dict()})
    fronts = pd.DataFrame(rows)
    best = {}
    for obj in space.objectives:
        idx = np.flatnonzero(ok)
        if not len(idx):
            best[obj] = None
            continue
        v = out.iloc[idx][obj].to_numpy(float)
        if not np.isfinite(v).any():
            best[obj] = None
            continue
        j = idx[int(np.nanargmax(v) if METRICS[obj] else np.nanargmin(v))]
        row = out.iloc[j]
        best[obj] = {
            "id": row["id"],
            "value": float(row[obj]),
            "maximize": METRICS[obj],
            "options": points[j].options,
            "metrics": {c: float(row[c]) for c in METRICS if c in row},
        }
    return fronts, best


def _screen_error(out, raw_screen, feasible, final) -> dict:
    """Median |screened / simulated - 1| of the main metrics over the fully simulated points,
    before the correction."""
    if not len(feasible) or not final.any():
        return {}
    rows = np.flatnonzero(final)
    pos = {r: j for j, r in enumerate(feasible)}
    res = {}
    for c in ("ttft_s_p99", "tpot_s_p99", "ttft_s_mean", "tpot_s_mean", "tokens_per_s_per_gpu"):
        s = np.array([raw_screen[c].iloc[pos[r]] for r in rows], float)
        t = out[c].to_numpy(float)[rows]
        ok = np.isfinite(s) & np.isfinite(t) & (t > 0)
        if ok.any():
            res[c] = float(np.median(np.abs(s[ok] / t[ok] - 1)))
    return res


# ------------------------------------------------------------------------------------------------
# outputs


def _yaml_text(options: dict) -> str:
    import yaml

    return yaml.safe_dump(dict(sorted(options.items())), sort_keys=False)


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def report_markdown(result: SearchResult) -> str:
    r, space = result.report, result.space
    base = space.base
    lines = [
        "# hisim search",
        "",
        f"- model: {base.get('model', 'llama-3.1-8b')}; workload: "
        f"{base.get('trace') or 'built-in chat'} ({r['workload_requests']} requests)",
        f"- SLOs: {r['slo']}",
        f"- strategy: {r['strategy']}" + (" (exhaustive: complete)" if r["complete"] else ""),
        f"- wall time: {r['wall_s']:.1f} s on {r['cpu_cores']} CPU core(s)",
        f"- points: {r['points']} ({r['infeasible']} infeasible, never simulated); screened "
        f"{r['screened']} in {r['screen_s']:.2f} s ({r['screened_per_s']:.0f} points/s)",
        f"- simulations: {r['simulations']} run, {r['simulations_cached']} from the cache; "
        f"{r['simulated_full']} points on the whole workload, {r['simulated_halving']} stopped "
        f"at a shorter rung (rungs of {', '.join(map(str, r['rungs_requests']))} requests); "
        f"{r['failed']} failed",
        f"- SLO-meeting points simulated on the whole workload: {r['meets_slo']}",
    ]
    for k, rd in enumerate(r.get("rounds") or []):
        path = " -> ".join(f"{n} on {req} requests" for req, n, _ in rd["rungs"])
        lines.append(
            f"- round {k + 1}: {rd['candidates']} candidates within a factor "
            f"{rd['margin']:.2f} of a front; simulated {path}"
        )
    lines += [
        "",
        "## Evaluation cost",
        "",
        f"The simulated deployments ran {r['simulated_gpu_hours']:.2f} GPU-hours of serving "
        f"(USD {r['simulated_gpu_usd']:.2f} at the specs' GPU prices); the search took "
        f"{r['cpu_hours']:.4f} CPU-hours (USD {r['cpu_usd']:.4f} at "
        f"{r['cpu_price_usd_per_hour']:g} USD per core-hour): an evaluation cost ratio of "
        + (f"{r['evaluation_cost_ratio']:,.0f}x." if r["evaluation_cost_ratio"] else "n/a."),
        "",
    ]
    if r["screen_error"]:
        lines += ["## Screen vs simulation (before the correction)", "",
                  "| metric | median abs. error |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.1%} |" for k, v in r["screen_error"].items()]
        lines.append("")
    lines += ["## Best configuration per objective (under the SLOs)", "",
              "| objective | id | value | configuration |", "|---|---|---|---|"]  # fmt: skip
    axes = [n for n, _ in space.axes]
    for obj, b in result.best.items():
        if b is None:
            lines.append(f"| {obj} | - | no simulated point meets the SLOs | |")
            continue
        desc = ", ".join(f"{k}={b['options'].get(k)}" for k in [*axes, "replicas"]
                         if k in b["options"])  # fmt: skip
        lines.append(f"| {obj} | {b['id']} | {b['value']:.4g} | {desc} |")
    lines.append("")
    if len(result.pareto):
        lines += ["## Pareto fronts", ""]
        cols = ["id", *[a for a in axes if a in result.pareto], "gpus",
                "tokens_per_s_per_gpu", "tokens_per_s_per_user", "usd_per_mtok", "ttft_s_p99",
                "tpot_s_p99"]  # fmt: skip
        if "replicas" not in cols and "replicas" in result.pareto:
            cols.insert(1 + len(axes), "replicas")
        for name, group in result.pareto.groupby("front", sort=False):
            lines += [f"### {name}", "", "| " + " | ".join(cols) + " |",
                      "|" + "---|" * len(cols)]  # fmt: skip
            for _, row in group.iterrows():
                vals = [_cell(row[c]) for c in cols]
                lines.append("| " + " | ".join(vals) + " |")
            lines.append("")
    reasons = result.points.loc[~result.points["feasible"], "reason"]
    if len(reasons):
        lines += ["## Infeasible points", "", "| reason | points |", "|---|---|"]
        for why, n in reasons.value_counts().items():
            lines.append(f"| {why} | {n} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: SearchResult, out_dir: str | Path) -> list[Path]:
    """points.csv, pareto.csv, best.json, report.md, fronts.png, slo_attainment.png and
    configs/<id>.yaml of every front and best point (replayable with hisim simulate
    --config), written into a temporary folder first and then moved in."""
    from hisim_jax import plots

    front_ids = list(dict.fromkeys(
        [*result.pareto.get("id", pd.Series(dtype=str)).tolist(),
         *[b["id"] for b in result.best.values() if b]]
    ))  # fmt: skip
    fronts = [(x, y, METRICS[x], METRICS[y]) for x, y in result.space.fronts]

    def configs(p: Path) -> None:
        p.mkdir()
        for pid in front_ids:
            (p / f"{pid}.yaml").write_text(_yaml_text(result.options[pid]))

    fmt = "%.9g"
    return files.write_files_atomic(
        out_dir,
        {
            "points.csv": lambda p: result.points.to_csv(p, index=False, float_format=fmt),
            "pareto.csv": lambda p: result.pareto.to_csv(p, index=False, float_format=fmt),
            "best.json": lambda p: Path(p).write_text(
                files.strict_json(result.best, indent=2, sort_keys=True) + "\n"
            ),
            "report.md": lambda p: Path(p).write_text(report_markdown(result) + "\n"),
            # the fronts as pareto.csv has them: of the points simulated on the whole workload
            "fronts.png": lambda p: plots.plot_search_fronts(
                result.points.assign(
                    meets_slo=result.points["meets_slo"] & (result.points["stage"] == "full")
                ),
                fronts,
                p,
            ),
            "slo_attainment.png": lambda p: plots.plot_slo_attainment(result.points, p),
            "configs": configs,
        },
    )
