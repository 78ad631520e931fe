"""Closed- vs open-loop sessions: the built-in chat and agent workloads and a ShareGPT-style
conversation file, on 1, 8 and 16 H100 replicas of Llama-3.1-8B (cache_aware router), at 50%,
90% and 150% of capacity; prompt-token hit rate, TTFT/TPOT p50/p99, output throughput, and
how many turns the open-loop schedule sent before their previous reply had ended.

Capacity: the request throughput one replica sustains on the workload, measured once per
workload by an open-loop run with every gap divided by 20 (requests queue), times the
replicas. A load of x% divides every gap of the workload (session starts, the recorded gaps
within sessions and the think times alike) so that it offers x% of that. With N replicas the
workload is N copies of the base one (independent seeds). Closed and open loop are offered the
same schedule: they differ in when later turns are sent (open: the recorded schedule, previous
arrival + 20 ms per output token + think time; closed: the simulated reply's end + think
time, so an overloaded replica slows its own clients).

    python scripts/bench_sessions.py [--replicas 1 8 16] [--loads 0.5 0.9 1.5]
        [--workloads chat agent sharegpt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hisim_jax.cores import pin_to_one_core
from hisim_jax.serving import workload as wl
from hisim_jax.simulation import SimulationOptions, run


def sharegpt_file(path: Path, conversations: int = 200, seed: int = 0) -> Path:
    """A ShareGPT-style file (``conversations`` of ``from``/``value`` messages): 1-8 turns, user
    messages of log-normal length (mean ~150 tokens at 4 characters per token), replies mean
    ~250 tokens, a 400-character system message in every third conversation. Deterministic."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(conversations):
        conv = []
        if i % 3 == 0:
            conv.append({"from": "system", "value": "s" * 400})
        for _ in range(int(rng.integers(1, 9))):
            conv.append({"from": "human", "value": "h" * int(4 * rng.lognormal(np.log(110), 0.8))})
            conv.append({"from": "gpt", "value": "g" * int(4 * rng.lognormal(np.log(190), 0.7))})
        docs.append({"id": f"c{i}", "conversations": conv})
    path.write_text(json.dumps(docs))
    return path


def base_workload(kind: str, seed: int, tmp: Path) -> wl.Workload:
    if kind == "chat":
        return wl.default_chat(seed=seed)
    if kind == "agent":
        return wl.default_agent(seed=seed)
    f = sharegpt_file(tmp / f"sharegpt-{seed}.json", seed=seed)
    return wl.read_sharegpt(f, rate=2.0, seed=seed)


def copies(kind: str, n: int, tmp: Path) -> wl.Workload:
    """``n`` independent copies of the base workload, sessions renumbered apart."""
    reqs = []
    for c in range(n):
        w = base_workload(kind, c, tmp)
        off = c * (1 + max(r.session_id for r in w.requests))
        reqs += [
            wl.Request(0, r.arrival_s, r.input_len, r.output_len, r.block_ids,
                       r.session_id + off if r.session_id >= 0 else -1, r.turn, r.think_s)
            for r in w.requests
        ]  # fmt: skip
    return wl.build_workload(reqs, w.block_tokens, f"{kind} x{n}")


def scaled(w: wl.Workload, scale: float) -> wl.Workload:
    """Every gap divided by ``scale``: session starts, the recorded gaps within a session (open
    loop) and the think times (closed loop) alike, so both modes are offered the same load."""
    w = wl.select(w, rate_scale=scale)
    reqs = [
        wl.Request(r.request_id, r.arrival_s, r.input_len, r.output_len, r.block_ids,
                   r.session_id, r.turn, r.think_s / scale if r.think_s >= 0 else r.think_s)
        for r in w.requests
    ]  # fmt: skip
    return wl.Workload(tuple(reqs), w.block_tokens, w.source)


def offered_per_s(w: wl.Workload) -> float:
    """Requests per second the workload offers: requests over the span of its arrivals."""
    return len(w.requests) / (w.requests[-1].arrival_s - w.requests[0].arrival_s)


def measure(w: wl.Workload, sessions: str, replicas: int) -> dict:
    opts = SimulationOptions(sessions=sessions, replicas=replicas, router="cache_aware")
    t0 = time.perf_counter()
    res = run(opts, workload=w)
    wall = time.perf_counter() - t0
    s, req = res.summary, res.requests
    early = 0
    for _, g in (
        req[req["session_id"] >= 0].sort_values(["session_id", "turn"]).groupby("session_id")
    ):
        a, f = g["arrival_s"].to_numpy(), g["finish_s"].to_numpy()
        early += int(np.sum(a[1:] < f[:-1]))
    ms = lambda d, q: round(d[q] * 1e3, 1) if d[q] is not None else None  # noqa: E731
    return {
        "requests": s["requests_total"],
        "completed": s["requests_completed"],
        "hit_rate": round(s["cache"]["hit_rate"], 4),
        "ttft_p50_ms": ms(s["ttft_s"], "p50"),
        "ttft_p99_ms": ms(s["ttft_s"], "p99"),
        "tpot_p50_ms": ms(s["tpot_s"], "p50"),
        "tpot_p99_ms": ms(s["tpot_s"], "p99"),
        "output_tok_s": round(s["throughput_output_tok_s"], 1),
        "request_per_s": round(s["request_throughput_per_s"], 3),
        "turns_sent_before_reply": early,
        "simulated_s": round(s["simulated_s"], 1),
        "wall_s": round(wall, 2),
    }


def capacity_per_s(kind: str, tmp: Path) -> float:
    """Requests/s one replica sustains: every gap of the base workload divided by 20, open
    loop, so that requests queue."""
    w = base_workload(kind, 0, tmp)
    res = run(SimulationOptions(sessions="open"), workload=scaled(w, 20.0))
    return res.summary["request_throughput_per_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9, 1.5])
    ap.add_argument("--workloads", nargs="+", default=["chat", "agent", "sharegpt"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    pin_to_one_core()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for kind in args.workloads:
            cap = capacity_per_s(kind, tmp)
            print(f"{kind}: capacity {cap:.3f} req/s per replica", file=sys.stderr)
            for n in args.replicas:
                w = copies(kind, n, tmp)
                offered = offered_per_s(w)
                for load in args.loads:
                    # session starts scaled so that they offer load x N x capacity
                    w_load = scaled(w, load * n * cap / offered)
                    for mode in ("closed", "open"):
                        r = {"workload": kind, "replicas": n, "load": load, "sessions": mode}
                        r |= measure(w_load, mode, n)
                        rows.append(r)
                        print(json.dumps(r), file=sys.stderr)
    cols = ["workload", "replicas", "load", "sessions", "hit_rate", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s",
            "turns_sent_before_reply", "wall_s"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
