"""Validation against measurements: step-latency error of the estimator on a steps table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hisim_jax.calibrate import error_report, predict_steps_s, read_steps
from hisim_jax.estimator import Params
from hisim_jax.specs import HardwareSpec


@dataclass(frozen=True)
class StepValidation:
    frame: pd.DataFrame  # input rows + predicted_ms, measured_ms, error
    report: dict


def validate_steps(
    profile: str | Path,
    hw: HardwareSpec,
    params: Params,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
) -> StepValidation:
    rows = read_steps(
        profile, require_time=True, tp=tp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )
    pred_s = predict_steps_s(params, rows, hw)
    frame = rows.frame.copy()
    frame["predicted_ms"] = pred_s * 1e3
    frame["measured_ms"] = rows.measured_s * 1e3
    frame["error"] = pred_s / rows.measured_s - 1.0
    return StepValidation(frame, error_report(rows.frame, pred_s, rows.measured_s))


def report_rows(report: dict) -> list[tuple[str, str, float]]:
    """(scope, name, MAPE) rows for a table: overall, per model, per kind."""
    out = [("overall", "all", report["mape"])]
    for scope in ("model", "kind"):
        for name, v in report.get(f"per_{scope}", {}).items():
            out.append((scope, name, v))
    return out


def mape(pred: np.ndarray, meas: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred) / np.asarray(meas) - 1.0)))


# ------------------------------------------------------------------------------------------------
# KV cache alone: hits per tier for given capacities, no timing


def replay_cache(requests, cfg) -> dict:
    """Replay requests in arrival order through the KV cache manager alone: each looks up its
    prefix, loads its L2/L3 part into L1, computes the rest, inserts its blocks and leaves
    (one request at a time, so nothing stays pinned). Returns hit tokens per tier, the bytes
    each link moved, evictions per tier and the hit rate."""
    from hisim_jax.kvcache import L1, KVCache

    cache = KVCache(cfg)
    rejected = 0
    for i, r in enumerate(sorted(requests, key=lambda r: (r.arrival_s, r.request_id))):
        now = float(i)  # order is all that matters without timing
        if cache.pages(r.input_len) > cache.capacity[L1]:
            rejected += 1
            continue
        hit = cache.lookup(r.block_ids, r.input_len)
        if cache.acquire(hit, now) is None:
            rejected += 1
            continue
        cache.record_lookup(hit, r.input_len)
        new = cache.pages(r.input_len - hit.total_tokens)
        if not cache.make_room(L1, new, now):
            cache.release(hit.nodes, now)
            rejected += 1
            continue
        cache.alloc_private(new)
        _, moved = cache.insert(r.block_ids, r.input_len, now)
        cache.free_private(new)
        cache.release(hit.nodes, now)
    cache.check_invariants()
    s = cache.stats
    hits = [int(h) for h in s.hit_tokens]
    return {
        "requests": len(requests),
        "skipped_too_large": rejected,
        "l1_hit_tokens": hits[0],
        "l2_hit_tokens": hits[1],
        "l3_hit_tokens": hits[2],
        "miss_tokens": int(s.miss_tokens),
        "hit_rate": sum(hits) / max(1, sum(hits) + s.miss_tokens),
        "prefetch_bytes": {k: float(v) for k, v in s.bytes_moved.items()},
        "evicted_tokens": {
            "l1": s.evicted_tokens[0],
            "l2": s.evicted_tokens[1],
            "l3": s.evicted_tokens[2],
        },
    }
