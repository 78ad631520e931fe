"""Cluster simulation on the whole Mooncake conversation trace: every router policy on 8 and 16
H100 replicas of Llama-3.1-8B (plus, with --extras, prefill/decode disaggregation and a shared
L3 store), reporting prompt-token hit rate, TTFT/TPOT p50/p99, load imbalance and wall time.

Wall time is ``hisim_jax.simulation.run`` (reading the trace, building the cluster, simulating,
computing the metrics; not writing the CSVs), after an untimed warm-up run that compiles the
estimator's shapes (reported apart). Like ``hisim simulate``, it runs on one core (cores.py).

    python scripts/bench_cluster.py [--replicas 8 16] [--policies ...] [--extras] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hisim_jax.cores import pin_to_one_core
from hisim_jax.serving.router import POLICIES
from hisim_jax.simulation import SimulationOptions, run

ROOT = Path(__file__).resolve().parents[1]
MOONCAKE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def measure(opts: SimulationOptions) -> dict:
    t0 = time.perf_counter()
    res = run(opts)
    wall = time.perf_counter() - t0
    s = res.summary
    ms = lambda d, q: round(d[q] * 1e3, 1) if d[q] is not None else None  # noqa: E731
    return {
        "replicas": s["cluster"]["replicas"],
        "router": opts.router,
        "pd": opts.pd,
        "l2_gb": opts.l2_gb,
        "l3_shared_gb": opts.l3_shared_gb,
        "prefetch": opts.prefetch_policy,
        "requests": s["requests_total"],
        "completed": s["requests_completed"],
        "hit_rate": round(s["cache"]["hit_rate"], 4),
        "ttft_p50_ms": ms(s["ttft_s"], "p50"),
        "ttft_p99_ms": ms(s["ttft_s"], "p99"),
        "tpot_p50_ms": ms(s["tpot_s"], "p50"),
        "tpot_p99_ms": ms(s["tpot_s"], "p99"),
        "load_imbalance_busy": round(s["cluster"]["load_imbalance_busy"], 3),
        "simulated_s": round(s["simulated_s"], 1),
        "steps": s["steps"],
        "wall_s": round(wall, 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=MOONCAKE)
    ap.add_argument("--replicas", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--extras", action="store_true", help="also PD and shared-L3 runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.trace.is_file():
        print(f"{args.trace}: no such trace", file=sys.stderr)
        return 2
    core = pin_to_one_core()  # as `hisim simulate` does, before JAX starts
    base = SimulationOptions(trace=str(args.trace), trace_format="mooncake")
    t0 = time.perf_counter()
    run(SimulationOptions(trace=str(args.trace), limit=300, replicas=2))  # compile the shapes
    out = {"pinned_core": core, "warmup_compile_s": round(time.perf_counter() - t0, 2), "runs": []}
    configs = [{"replicas": n, "router": p} for n in args.replicas for p in args.policies]
    if args.extras:
        n = max(args.replicas)
        configs += [
            {"replicas": n, "router": "cache_aware", "l2_gb": 256.0},
            {"replicas": n, "router": "round_robin", "l2_gb": 256.0, "l3_shared_gb": 4000.0},
            # SGLang's default best_effort uses only what landed by scheduling time
            {
                "replicas": n,
                "router": "round_robin",
                "l2_gb": 256.0,
                "l3_shared_gb": 4000.0,
                "prefetch_policy": "wait_complete",
            },  # fmt: skip
            {"replicas": n, "router": "cache_aware", "pd": f"{n // 4}:{n - n // 4}"},
        ]
    for cfg in configs:
        opts = SimulationOptions(
            **{**{f: getattr(base, f) for f in ("trace", "trace_format")}, **cfg}
        )
        row = measure(opts)
        print(json.dumps(row), file=sys.stderr)
        out["runs"].append(row)
    cols = list(out["runs"][0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in out["runs"]:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
