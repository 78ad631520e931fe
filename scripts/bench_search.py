"""Benchmarks of ``hisim search`` (BENCHMARKS.md, "Configuration search").

(a) Llama-3.1-8B on the whole Mooncake conversation trace within 16 GPUs: A100/H100/H200/B200,
    TP 1/2/4, every replica count in the budget, SGLang/vLLM, token budget, L2 size, router
    (scripts/spaces/mooncake_llama8b.yaml): wall time, points screened per second, points
    simulated, the fronts; then the check that ``--strategy grid`` over a 48-point sub-space
    (H200/B200 x TP 1/2 x engines x replicas within 8 GPUs, the first 2,000 requests) finds no
    point that dominates the default strategy's front on it.
(b) aiconfigurator's question side by side: Llama-3.1-8B on H100, ISL 4000, OSL 500, mean TTFT
    <= 1000 ms, mean TPOT <= 50 ms, 16 GPUs. Its picks (scripts/data/aiconfigurator_pick_
    llama8b_h100.json, from aiconfigurator 0.12.0's ``cli default``) at the request rate they
    claim; our search at that rate; our simulation of its pick.
(c) Qwen2.5-72B on H100/H200/B200, TP 2-8, within 16 GPUs, on the built-in chat workload.

Every part starts from an empty simulation cache (a fresh folder) so nothing is reused
between runs, and runs with ``--jobs`` workers (default: every core).

    python scripts/bench_search.py [--part a b c screen] [--jobs 2] [--out runs/bench-search]

``--part screen``: only the warm screen of space (a), every feasible point, median of 7.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "scripts" / "spaces"
MOONCAKE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
AIC = ROOT / "scripts" / "data" / "aiconfigurator_pick_llama8b_h100.json"


def _search(space, out: Path, cache: Path, jobs: int, **kw):
    from hisim_jax.search.run import SearchOptions, run_search, write_outputs

    t0 = time.perf_counter()
    res = run_search(space, SearchOptions(jobs=jobs, cache_dir=str(cache), **kw))
    wall = time.perf_counter() - t0
    write_outputs(res, out)
    return res, wall


def _front_rows(res, cols) -> list[dict]:
    keep = [c for c in cols if c in res.pareto]
    return [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        for r in res.pareto[["front", *keep]].to_dict("records")
    ]


def _summary(res, wall: float) -> dict:
    r = res.report
    return {
        "wall_s": round(wall, 1),
        "points": r["points"],
        "infeasible": r["infeasible"],
        "screened": r["screened"],
        "screen_s": round(r["screen_s"], 3),
        "screened_per_s": round(r["screened_per_s"]),
        "simulations": r["simulations"],
        "simulation_task_s": round(r["simulation_task_s"], 1),
        "simulated_full": r["simulated_full"],
        "simulated_halving": r["simulated_halving"],
        "rounds": r["rounds"],
        "meets_slo": r["meets_slo"],
        "screen_error": {k: round(v, 3) for k, v in r["screen_error"].items()},
        "evaluation_cost_ratio": round(r["evaluation_cost_ratio"] or 0),
        "best": {
            k: (
                None
                if b is None
                else {"id": b["id"], "value": round(b["value"], 4), "options": b["options"]}
            )
            for k, b in res.best.items()
        },  # fmt: skip
    }


FRONT_COLS = ["id", "hardware", "tp", "replicas", "engine", "router", "token_budget", "l2_gb",
              "gpus", "tokens_per_s_per_gpu", "tokens_per_s_per_user", "usd_per_mtok",
              "ttft_s_p99", "tpot_s_p99"]  # fmt: skip


def _screen_warm(res, repeats: int = 5) -> dict:
    """The screen of every feasible point again, in this process where its estimators are
    built and compiled: the vectorized pass alone (rows, estimator calls, steady state)."""
    from hisim_jax.search.screen import screen, workload_stats
    from hisim_jax.simulation import SimulationOptions, build_workload

    space = res.space
    stats = workload_stats(build_workload(SimulationOptions.checked(space.base)), samples=256)
    opts = [
        SimulationOptions.checked(res.options[i])
        for i in res.points.loc[res.points["feasible"], "id"]
    ]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        screen(opts, stats, dict(space.prices))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"points": len(opts), "median_s": round(med, 3), "points_per_s": round(len(opts) / med),
            "range_s": [round(min(times), 3), round(max(times), 3)]}  # fmt: skip


def part_screen(out: Path, jobs: int) -> dict:
    """The warm screen of space (a) alone, without its simulations."""
    from hisim_jax.search.run import _check
    from hisim_jax.search.screen import screen, workload_stats
    from hisim_jax.search.space import expand, read_space
    from hisim_jax.simulation import SimulationOptions, build_workload

    space = read_space(SPACES / "mooncake_llama8b.yaml")
    stats = workload_stats(build_workload(SimulationOptions.checked(space.base)), samples=256)
    opts = [p.extra["o"] for p in _check(expand(space), stats, {}) if not p.reason]
    t0 = time.perf_counter()
    screen(opts, stats)  # builds the estimators, loads or compiles their programs
    first = time.perf_counter() - t0
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        screen(opts, stats)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"points": len(opts), "first_s": round(first, 2), "median_s": round(med, 3),
            "points_per_s": round(len(opts) / med),
            "range_s": [round(min(times), 3), round(max(times), 3)]}  # fmt: skip


def part_a(out: Path, jobs: int) -> dict:
    from hisim_jax.search import pareto
    from hisim_jax.search.space import METRICS, read_space, space_from_dict

    with tempfile.TemporaryDirectory() as cache:
        res, wall = _search(read_space(SPACES / "mooncake_llama8b.yaml"), out / "a", Path(cache),
                            jobs)  # fmt: skip
    result = {"search": _summary(res, wall), "front": _front_rows(res, FRONT_COLS)}
    result["screen_warm"] = _screen_warm(res)
    # the grid check on a sub-space both strategies can afford
    sub = {
        "model": "llama-3.1-8b", "trace": str(MOONCAKE), "limit": 2000, "gpus": 8,
        "slo": {"ttft_p99_ms": 10000, "tpot_p99_ms": 150},
        "axes": {"hardware": ["h200-sxm", "b200"], "tp": [1, 2],
                 "engine": ["sglang", "vllm"]},
    }  # fmt: skip
    space = space_from_dict(sub, "sub-space")
    with tempfile.TemporaryDirectory() as cache:
        d, d_wall = _search(space, out / "a-sub-default", Path(cache), jobs)
        g, g_wall = _search(space, out / "a-sub-grid", Path(cache), jobs, strategy="grid")
    ok = g.points[g.points["feasible"] & g.points["meets_slo"]]
    beaten = {}
    for x, y in space.fronts:
        mx = [METRICS[x], METRICS[y]]
        f = d.pareto[d.pareto["front"] == f"{y} vs {x}"][[x, y]].to_numpy(float)
        grid_vals = ok[[x, y]].to_numpy(float)
        beaten[f"{y} vs {x}"] = (
            int(pareto.dominates_any(grid_vals, f, mx).sum()) if len(f) else None
        )
        # and the other way: grid front points the default front does not reach
        gf = grid_vals[pareto.pareto_mask(grid_vals, mx)] if len(grid_vals) else grid_vals
        beaten[f"grid front points missing ({y} vs {x})"] = int(
            sum(not any(np.allclose(p, q) for q in f) for p in gf)
        )
    result["grid_check"] = {
        "points": g.report["points"],
        "default": {"wall_s": round(d_wall, 1), "simulations": d.report["simulations"],
                    "simulated_full": d.report["simulated_full"]},
        "grid": {"wall_s": round(g_wall, 1), "simulations": g.report["simulations"],
                 "simulated_full": g.report["simulated_full"], "complete": g.report["complete"]},
        "default_front_points_dominated_by_a_grid_point": beaten,
    }  # fmt: skip
    return result


def _fixed_length_trace(path: Path, rate_per_s: float, n: int, isl: int, osl: int, seed=0):
    """Poisson arrivals at ``rate_per_s`` of prompts of ``isl`` tokens sharing nothing (as
    aiconfigurator's question: no prefix reuse) and ``osl`` output tokens."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate_per_s, n))
    with open(path, "w") as f:
        for a in t - t[0]:
            f.write(json.dumps({"arrival_s": float(a), "input_len": isl, "output_len": osl}) + "\n")


def part_b(out: Path, jobs: int) -> dict:
    from hisim_jax.search.run import metrics_of
    from hisim_jax.search.space import space_from_dict
    from hisim_jax.simulation import SimulationOptions, run

    picks = json.loads(AIC.read_text())
    result = {"aiconfigurator": [], "ours": {}}
    out_b = out / "b"
    out_b.mkdir(parents=True, exist_ok=True)
    for engine in ("sglang", "vllm"):
        agg = [p for p in picks if p["backend"] == engine and p["mode"] == "agg"]
        best = max(agg, key=lambda p: p["tokens_per_s_per_gpu"])
        rate = best["request_rate_per_s"]
        trace = out_b / f"isl4000_osl500_{engine}.jsonl"
        _fixed_length_trace(trace, rate, 3000, 4000, 500)
        # our simulation of its pick: same GPUs, TP and replica count, same engine and rate
        pick = {"model": "llama-3.1-8b", "hardware": "h100-sxm", "engine": engine,
                "trace": str(trace), "trace_format": "jsonl", "tp": best["tp"],
                "replicas": best["replicas"]}  # fmt: skip
        t0 = time.perf_counter()
        m = metrics_of(run(SimulationOptions.checked(pick)).summary)
        sim_wall = time.perf_counter() - t0
        result["aiconfigurator"].append({
            "engine": engine, "pick": f"{best['replicas']} x TP{best['tp']}, batch "
            f"{best['batch_size']}", "request_rate_per_s": rate,
            "its_prediction": {k: best[k] for k in ("ttft_ms", "tpot_ms",
                                                   "tokens_per_s_per_gpu",
                                                   "tokens_per_s_per_user")},
            "our_simulation": {"ttft_ms_mean": round(m["ttft_s_mean"] * 1e3, 1),
                               "ttft_ms_p99": round(m["ttft_s_p99"] * 1e3, 1),
                               "tpot_ms_mean": round(m["tpot_s_mean"] * 1e3, 2),
                               "tpot_ms_p99": round(m["tpot_s_p99"] * 1e3, 2),
                               "tokens_per_s_per_gpu": round(
                                   m["throughput_output_tok_s"] / (best["replicas"] * best["tp"]),
                                   1),
                               "tokens_per_s_per_user": round(1 / m["tpot_s_mean"], 2),
                               "wall_s": round(sim_wall, 1)},
        })  # fmt: skip
        space = space_from_dict(
            {"model": "llama-3.1-8b", "trace": str(trace), "trace_format": "jsonl",
             "hardware": "h100-sxm", "engine": engine, "gpus": 16,
             "slo": {"ttft_mean_ms": 1000, "tpot_mean_ms": 50},
             "objectives": ["gpus", "tokens_per_s_per_gpu", "usd_per_mtok"],
             "axes": {"tp": [1, 2, 4, 8]}},
            f"aiconfigurator question ({engine})",
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as cache:
            res, wall = _search(space, out_b / engine, Path(cache), jobs)
        g = res.best["gpus"]
        result["ours"][engine] = {
            "search": _summary(res, wall),
            "fewest_gpus": None if g is None else {
                "config": f"{g['options'].get('replicas', 1)} x TP{g['options'].get('tp', 1)}",
                **{k: round(g["metrics"][k], 4) for k in ("ttft_s_mean", "ttft_s_p99",
                                                          "tpot_s_mean", "tpot_s_p99",
                                                          "tokens_per_s_per_gpu")}},
        }  # fmt: skip
    return result


def part_c(out: Path, jobs: int) -> dict:
    from hisim_jax.search.space import space_from_dict

    space = space_from_dict(
        {"model": "qwen2.5-72b", "gpus": 16, "slo": {"ttft_p99_ms": 2000, "tpot_p99_ms": 50},
         "axes": {"hardware": ["h100-sxm", "h200-sxm", "b200"], "tp": [2, 4, 8],
                  "engine": ["sglang", "vllm"]}},
        "qwen2.5-72b",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        res, wall = _search(space, out / "c", Path(cache), jobs)
    return {"search": _summary(res, wall), "front": _front_rows(res, FRONT_COLS)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "screen"])
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"a": part_a, "b": part_b, "c": part_c, "screen": part_screen}
    for name in args.part:
        t0 = time.perf_counter()
        res = parts[name](args.out, args.jobs)
        res["part_wall_s"] = round(time.perf_counter() - t0, 1)
        (args.out / f"part_{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"== part {name}\n" + json.dumps(res, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
