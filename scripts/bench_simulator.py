"""Speed of the single-replica simulator (wall clock, after JIT warm-up).

  (a) 10,000 synthetic multi-turn chat requests, Llama-3.1-8B on one H100, at about 70% load:
      request arrivals at 70% of the replica's saturation throughput, measured on a pilot in
      which sessions arrive far faster than they can be served;
  (b) the first 2,000 requests of the Mooncake conversation trace with a 256 GB host-DRAM tier.

Reports wall and simulated seconds, engine steps per wall second (fast-forwarded decode steps
counted), requests per wall second and simulated/wall. Each timed run is preceded by an untimed
run of the same workload, so the estimator's shapes are compiled and compile time (the first
warm-up, reported apart) is not counted.

    python scripts/bench_simulator.py [--requests 10000] [--engine sglang|vllm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hisim_jax import Estimator
from hisim_jax.cores import pin_to_one_core
from hisim_jax.estimator.roofline import calibration_path
from hisim_jax.serving import workload as wl
from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.frontend import FRONTENDS
from hisim_jax.serving.memory import cache_config, size_replica
from hisim_jax.simulation import SimulationOptions, memory_share, scheduler_config

ROOT = Path(__file__).resolve().parents[1]
MOONCAKE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


ENGINE = "sglang"  # set by --engine


def make_engine(est: Estimator, block_tokens: int, l2_gb: float = 0.0) -> Engine:
    """One replica with the engine's defaults, as ``hisim simulate --engine`` builds it."""
    o = SimulationOptions(engine=ENGINE)
    gpu = est.hardware[0]
    sched = scheduler_config(o, gpu)
    frac, reserved = memory_share(o, est.model, 1, sched)
    sizing = size_replica(est.model, gpu, 1, 2.0, 2.0, frac, reserved, l2_gb=l2_gb)
    page = 16 if ENGINE == "vllm" else 1
    cfg = EngineConfig(
        sched,
        cache_config(sizing, gpu, block_tokens, page),
        num_layers=est.model.num_layers,
        max_context=est.model.max_position_embeddings,
        policy=ENGINE,
        frontend=FRONTENDS[ENGINE],
    )
    return Engine(cfg, est)


def chat(n_requests: int, session_rate: float, seed: int) -> wl.Workload:
    # default_chat's shape (1-9 turns, ~5 requests per session) scaled to n_requests
    sessions = max(1, n_requests // 4)  # enough sessions that limit=n_requests is reached
    w = wl.chat_sessions(
        sessions,
        session_rate,
        turns=wl.LengthDist.uniform(1, 9),
        first_input=wl.LengthDist.lognormal(600, 0.8, clip_max=16384),
        turn_input=wl.LengthDist.lognormal(150, 0.8, clip_max=8192),
        output=wl.LengthDist.lognormal(250, 0.7, clip_max=4096),
        think_s_mean=10.0,
        system_prompt_len=256,
        block_tokens=64,
        seed=seed,
    )
    return wl.select(w, limit=n_requests)


def busy_fraction(result) -> float:
    return float(np.sum(result.steps.column("duration_s"))) / max(result.simulated_s, 1e-9)


def timed_run(est, work, l2_gb=0.0) -> dict:
    # an untimed pass over the same workload first compiles every estimator shape it needs
    make_engine(est, work.block_tokens, l2_gb).run(work.requests)
    eng = make_engine(est, work.block_tokens, l2_gb)
    t0 = time.perf_counter()
    res = eng.run(work.requests)
    wall = time.perf_counter() - t0
    steps = len(res.steps)
    done = sum(1 for s in res.states if not s.rejected)
    return {
        "requests": len(work.requests),
        "completed": done,
        "wall_s": round(wall, 3),
        "simulated_s": round(res.simulated_s, 1),
        "steps": steps,
        "steps_per_wall_s": round(steps / wall),
        "requests_per_wall_s": round(len(work.requests) / wall),
        "simulated_over_wall": round(res.simulated_s / wall),
        "offered_requests_per_s": round(
            len(work.requests) / max(r.arrival_s for r in work.requests), 2
        ),
        "gpu_busy_fraction": round(busy_fraction(res), 3),
        "cache_hit_rate": round(
            sum(res.cache.stats.hit_tokens)
            / max(1, sum(res.cache.stats.hit_tokens) + res.cache.stats.miss_tokens),
            3,
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--mooncake", type=Path, default=MOONCAKE)
    ap.add_argument("--mooncake-requests", type=int, default=2000)
    ap.add_argument("--target-load", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--engine", choices=("sglang", "vllm"), default="sglang")
    args = ap.parse_args(argv)
    global ENGINE
    ENGINE = args.engine

    core = pin_to_one_core()  # as `hisim simulate` does, before JAX starts
    calibration = calibration_path("h100-sxm", args.engine) if args.engine != "sglang" else None
    est = Estimator("llama-3.1-8b", "h100-sxm", calibration=calibration)
    t0 = time.perf_counter()
    make_engine(est, 64).run(chat(600, 2.0, args.seed + 1).requests)  # compile the shapes
    warmup_s = time.perf_counter() - t0

    # saturation: sessions arriving far faster than served; completions/s is the capacity
    pilot_work = chat(2000, 200.0, args.seed + 2)
    pilot = make_engine(est, 64).run(pilot_work.requests)
    capacity_rps = len(pilot_work.requests) / pilot.simulated_s
    per_session = len(pilot_work.requests) / len({r.session_id for r in pilot_work.requests})
    rate = args.target_load * capacity_rps / per_session
    for _ in range(3):  # correct for the think-time tail: offered rate = target x capacity
        work = chat(args.requests, rate, args.seed)
        offered = len(work.requests) / max(r.arrival_s for r in work.requests)
        rate *= args.target_load * capacity_rps / offered
    out = {
        "pinned_core": core,
        "warmup_compile_s": round(warmup_s, 2),
        "saturation_requests_per_s": round(capacity_rps, 2),
        "session_rate_per_s": round(rate, 3),
    }
    out["a_chat"] = timed_run(est, chat(args.requests, rate, args.seed))
    print(json.dumps(out["a_chat"]), file=sys.stderr)

    if args.mooncake.is_file():
        work = wl.load_trace(args.mooncake, "mooncake", limit=args.mooncake_requests)
        out["b_mooncake_l2"] = timed_run(est, work, l2_gb=256.0)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
