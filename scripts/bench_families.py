"""Every new model family on a deployment that holds it: the built-in chat workload simulated
end to end, with the wall time, the replica's sizing (KV tokens, running-request cap) and the
headline latencies. A smoke benchmark of coverage and speed, not of accuracy (no real runs of
these models are in ../shared).

    python scripts/bench_families.py [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from hisim_jax.simulation import SimulationOptions, run

DEPLOYMENTS = [
    dict(model="deepseek-v3", hardware="h200-sxm", tp=8),
    dict(model="deepseek-v3", hardware="h200-sxm", tp=8, ep=8, dp_attention=8),
    dict(model="deepseek-v3.2", hardware="h200-sxm", tp=8),
    dict(model="kimi-k2", hardware="b200", tp=8),
    dict(model="glm-5", hardware="b300", tp=8),
    dict(model="gpt-oss-120b", hardware="h100-sxm"),
    dict(model="gpt-oss-20b", hardware="h100-sxm", engine="vllm"),
    dict(model="llama-4-scout-17b-16e", hardware="h100-sxm", tp=4),
    dict(model="llama-4-maverick", hardware="h200-sxm", tp=8),
    dict(model="qwen3.5-27b", hardware="h100-sxm"),
    dict(model="qwen3.5-35b-a3b", hardware="h100-sxm", engine="vllm"),
    dict(model="qwen3.5-397b-a17b", hardware="h200-sxm", tp=8),
    dict(model="nemotron-h-56b", hardware="h100-sxm", tp=2),
    dict(model="nemotron-3-nano-30b-a3b", hardware="h100-sxm"),
    dict(model="gemma-4-26b-a4b", hardware="h100-sxm"),
    dict(model="deepseek-v3", hardware="h200-sxm", tp=8, speculative_num_steps=2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="requests [the whole workload]")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args()
    rows = []
    for d in DEPLOYMENTS:
        o = SimulationOptions(**d, limit=args.limit)
        run(o, frames=False)  # untimed: compiles this deployment's shapes
        t0 = time.perf_counter()
        s = run(o, frames=False).summary
        wall = time.perf_counter() - t0
        rep = s["replica"]
        label = " ".join(f"{k}={v}" for k, v in d.items() if k not in ("model", "hardware"))
        rows.append(
            {
                "model": d["model"],
                "deployment": f"{d['hardware']} {label}".strip(),
                "requests": s["requests_completed"],
                "wall_s": round(wall, 2),
                "simulated_s": round(s["simulated_s"], 1),
                "l1_tokens": rep["l1_tokens"],
                "max_running": rep["scheduler"]["max_running_requests"],
                "ttft_ms_p50": round(s["ttft_s"]["p50"] * 1e3, 1),
                "tpot_ms_p50": round(s["tpot_s"]["p50"] * 1e3, 2),
                "hit_rate": round(s["cache"]["hit_rate"], 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
