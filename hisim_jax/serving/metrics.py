"""Per-request records and the run summary, with SGLang bench_serving's metric names.

TTFT = first token − arrival; TPOT = (finish − first token) / (output tokens − 1), for requests
with more than one output token; ITL = every gap between consecutive tokens of a request; E2E =
finish − arrival. Throughputs divide by the simulated span from the first arrival to the last
finish. Goodput counts requests meeting every given SLO.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hisim_jax.serving.engine import EngineResult
from hisim_jax.serving.kvcache import TIER_NAMES

CPU_PRICE_USD_PER_HOUR = 0.05  # one cloud vCPU-hour, indicative (late 2025 on-demand)


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None


def request_frame(result: EngineResult) -> pd.DataFrame:
    """One row per request: times, latencies and where its prompt's KV came from."""
    rows = []
    for s in result.states:
        r = s.req
        done = s.finish_s >= 0 and not s.rejected
        ttft = s.first_token_s - r.arrival_s if done else np.nan
        tpot = (
            (s.finish_s - s.first_token_s) / (r.output_len - 1)
            if done and r.output_len > 1
            else np.nan
        )
        rows.append(
            (
                r.request_id,
                r.arrival_s,
                r.input_len,
                r.output_len,
                s.scheduled_s - r.arrival_s if s.scheduled_s >= 0 else np.nan,
                s.first_token_s if done else np.nan,
                s.finish_s if done else np.nan,
                ttft,
                tpot,
                s.finish_s - r.arrival_s if done else np.nan,
                s.hit_tokens[0],
                s.hit_tokens[1],
                s.hit_tokens[2],
                s.computed_prompt,
                s.recomputed,
                s.rehit,
                s.preemptions,
                s.rejected,
            )
        )
    return pd.DataFrame(
        rows,
        columns=[
            "request_id", "arrival_s", "input_len", "output_len", "queue_s", "first_token_s",
            "finish_s", "ttft_s", "tpot_s", "e2e_s", "l1_hit_tokens", "l2_hit_tokens",
            "l3_hit_tokens", "computed_prompt_tokens", "recomputed_tokens", "rehit_tokens",
            "preemptions", "rejected",
        ],
    )  # fmt: skip


def step_frame(result: EngineResult) -> pd.DataFrame:
    s = result.steps
    return pd.DataFrame({c: s.column(c) for c in s.COLUMNS})


def _dist(x) -> dict:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    q = np.quantile(x, [0.5, 0.9, 0.99])
    return {"mean": float(x.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def _cache_summary(stats) -> dict:
    """Hit rate and tokens per tier, misses and evictions of a cache's counters."""
    hit = [int(h) for h in stats.hit_tokens]
    return {
        "hit_rate": sum(hit) / max(1, sum(hit) + stats.miss_tokens),
        "l1_hit_tokens": hit[0],
        "l2_hit_tokens": hit[1],
        "l3_hit_tokens": hit[2],
        "miss_tokens": int(stats.miss_tokens),
        "evicted_tokens": int(sum(stats.evicted_tokens)),
    }


def _rejection_counts(reasons: pd.Series) -> dict:
    """Rejected requests per reason, the request's own numbers left out ("longer than the
    context window (140000 > 131072)" counts as "longer than the context window")."""
    kinds = reasons[reasons != ""].str.replace(r"\s*\([^)]*\)", "", regex=True)
    kinds = kinds.str.replace(r"\b\d+\b", "N", regex=True)
    return {k: int(v) for k, v in sorted(kinds.value_counts().items())}


def summary(
    result: EngineResult,
    wall_s: float,
    gpu_price_usd_per_hour: float,
    gpus: int = 1,
    slo: SLO | None = None,
    cpu_price_usd_per_hour: float = CPU_PRICE_USD_PER_HOUR,
) -> dict:
    req = request_frame(result)
    done = req[req["rejected"] == ""]
    span = float(done["finish_s"].max() - req["arrival_s"].min()) if len(done) else 0.0
    stats = result.cache.stats
    prompt_tokens = int(done["input_len"].sum())
    out = {
        "requests_total": int(len(req)),
        "requests_completed": int(len(done)),
        "requests_rejected": int((req["rejected"] != "").sum()),
        "rejections": _rejection_counts(req["rejected"]),
        "simulated_s": float(result.simulated_s),
        "wall_s": float(wall_s),
        "steps": len(result.steps),
        "ttft_s": _dist(done["ttft_s"]),
        "tpot_s": _dist(done["tpot_s"]),
        "itl_s": _dist(result.itl_s),
        "e2e_s": _dist(done["e2e_s"]),
        "queue_s": _dist(done["queue_s"]),
        "request_throughput_per_s": len(done) / span if span > 0 else 0.0,
        "throughput_input_tok_s": prompt_tokens / span if span > 0 else 0.0,
        "throughput_output_tok_s": float(done["output_len"].sum()) / span if span > 0 else 0.0,
        "cache": {
            **_cache_summary(stats),
            # prefix hits of re-prefills after a recompute preemption (kept out of hit_rate)
            "rehit_tokens": int(req["rehit_tokens"].sum()),
            "evicted_tokens_per_tier": dict(
                zip(TIER_NAMES, map(int, stats.evicted_tokens), strict=True)
            ),
            "bytes_moved": {k: float(v) for k, v in stats.bytes_moved.items()},
        },
        "preemptions": int(result.preemptions),
        # speculative decoding: tokens a request took per verify step, bonus token included
        # (SGLang's spec_accept_length, less the prefill's token it counts in)
        "spec_accept_length": (
            result.spec_tokens / result.spec_verify_steps if result.spec_verify_steps else None
        ),
    }
    if slo is not None:
        ok = np.ones(len(done), bool)
        if slo.ttft_s is not None:
            ok &= done["ttft_s"].to_numpy() <= slo.ttft_s
        if slo.tpot_s is not None:
            ok &= ~(done["tpot_s"].to_numpy() > slo.tpot_s)  # single-token outputs pass
        if slo.e2e_s is not None:
            ok &= done["e2e_s"].to_numpy() <= slo.e2e_s
        out["goodput_req_s"] = float(ok.sum()) / span if span > 0 else 0.0
        out["slo_attainment"] = float(ok.mean()) if len(ok) else 0.0
        out["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "e2e_s": slo.e2e_s}
    gpu_hours = result.simulated_s / 3600 * gpus
    cpu_hours = wall_s / 3600
    out["cost"] = {
        "gpu_price_usd_per_hour": gpu_price_usd_per_hour,
        "cpu_price_usd_per_hour": cpu_price_usd_per_hour,
        "simulated_gpu_usd": gpu_hours * gpu_price_usd_per_hour,
        "evaluation_cost_ratio": (
            gpu_hours * gpu_price_usd_per_hour / (cpu_hours * cpu_price_usd_per_hour)
            if cpu_hours > 0 and cpu_price_usd_per_hour > 0
            else None
        ),
    }
    return out


# ----------------------------------------------------------------------------------------
# clusters


def cluster_request_frame(result) -> pd.DataFrame:
    """``request_frame`` of the whole cluster plus where each request ran; disaggregated runs
    add the decode replica and the time from prompt done to first token (the KV transfer and
    any wait for room on the decode replica)."""
    frame = request_frame(result.merged())
    states = result.states
    frame.insert(1, "replica", [s.replica for s in states])
    # the client session and turn (-1 / 0 without one): a closed-loop replay's arrival_s is
    # when the client sent the turn, its previous reply's end plus the think time
    frame["session_id"] = [s.req.session_id for s in states]
    frame["turn"] = [s.req.turn for s in states]
    if any(role == "decode" for role in result.roles):
        frame.insert(2, "decode_replica", [s.decode_replica for s in states])
        ok = frame["rejected"] == ""
        pre = np.array([s.prefill_end_s for s in states], float)
        frame["kv_transfer_s"] = np.where(ok, frame["first_token_s"].to_numpy() - pre, np.nan)
    return frame


def cluster_step_frame(result) -> pd.DataFrame:
    """Every replica's steps, with a ``replica`` column (decode replicas numbered after the
    routed ones), in time order."""
    frames = []
    for i, r in enumerate(result.results):
        f = step_frame(r)
        f.insert(0, "replica", i)
        frames.append(f)
    steps = pd.concat(frames, ignore_index=True)
    return steps.sort_values(["start_s", "replica"], kind="stable").reset_index(drop=True)


def _ratio_max_mean(x) -> float:
    x = np.asarray(x, float)
    return float(x.max() / x.mean()) if len(x) and x.mean() > 0 else 1.0


def cluster_summary(result) -> dict:
    """``replicas``: one record per replica; ``cluster``: its shape and how evenly it was used
    (max/mean of requests, prompt tokens and busy seconds over the routed replicas)."""
    n_routed = sum(1 for role in result.roles if role != "decode")
    sim = max(result.simulated_s, 1e-12)
    records, busy, routed_req, routed_tok = [], [], [], []
    for i, (rep, res, role) in enumerate(
        zip(result.replicas, result.results, result.roles, strict=True)
    ):
        mine = res.states
        done = [s for s in mine if s.finish_s >= 0 and not s.rejected]
        stats = res.cache.stats
        busy_s = float(np.sum(res.steps.column("duration_s"))) if len(res.steps) else 0.0
        ttft = [s.first_token_s - s.req.arrival_s for s in done]
        tpot = [
            (s.finish_s - s.first_token_s) / (s.req.output_len - 1)
            for s in done
            if s.req.output_len > 1
        ]
        records.append(
            {
                "replica": i,
                "name": rep.name,
                "role": role,
                "gpus": rep.gpus,
                "requests": len(mine),
                "requests_completed": len(done),
                "prompt_tokens": int(sum(s.req.input_len for s in mine)),
                "steps": len(res.steps),
                "busy_s": busy_s,
                "busy_fraction": busy_s / sim,
                "preemptions": int(res.preemptions),
                "ttft_s": _dist(ttft),
                "tpot_s": _dist(tpot),
                "cache": _cache_summary(stats),
            }
        )
        if i < n_routed:
            busy.append(busy_s)
            routed_req.append(len(mine))
            routed_tok.append(records[-1]["prompt_tokens"])
    rates = [r["cache"]["hit_rate"] for r in records[:n_routed]]
    cluster = {
        "replicas": len(records),
        "prefill_replicas": n_routed if n_routed < len(records) else 0,
        "decode_replicas": len(records) - n_routed,
        "gpus": int(sum(r.gpus for r in result.replicas)),
        "load_imbalance_requests": _ratio_max_mean(routed_req),
        "load_imbalance_prompt_tokens": _ratio_max_mean(routed_tok),
        "load_imbalance_busy": _ratio_max_mean(busy),
        "hit_rate_min": float(min(rates)),
        "hit_rate_max": float(max(rates)),
    }
    store = result.replicas[0].engine.cache.shared
    if store is not None:
        cluster["shared_l3"] = store.stats()
    return {"cluster": cluster, "replicas": records}
