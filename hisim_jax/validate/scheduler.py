"""The scheduler: a recorded per-step log against the simulator's schedule of the same workload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hisim_jax import files

LOG_COLUMNS = ("start_s", "kind", "request_ids")
LOG_KINDS = ("prefill", "decode", "mixed")
# steps whose request_ids are prompts being prefilled (a mixed step: beside the decodes)
PREFILL_KINDS = ("prefill", "mixed")


def read_step_log(path: str | Path) -> pd.DataFrame:
    """A per-step log in the columns of ``steps.csv`` (at least start_s, kind, request_ids).

    Checked line by line: ``start_s`` a finite number, ``kind`` prefill, decode or mixed (vLLM),
    ``request_ids`` space-separated integers >= 0; a log with no steps, or no prefill step
    (nothing to compare), is an error. Whether the ids belong to the workload is checked by
    ``check_request_ids`` once the workload is known."""
    from hisim_jax.estimator.calibrate import ProfileError

    path = Path(path)
    frame = files.read_csv(
        path, "step log (CSV)", ProfileError, dtype={"request_ids": str}, keep_default_na=False
    )
    for col in LOG_COLUMNS:
        if col not in frame.columns:
            raise ProfileError(f"{path}: missing column '{col}' (have: {', '.join(frame.columns)})")
    if frame.empty:
        raise ProfileError(f"{path}: no steps (only a header)")
    start = pd.to_numeric(frame["start_s"], errors="coerce")
    bad = np.flatnonzero(~np.isfinite(start.to_numpy(dtype=float)))
    if len(bad):
        i = int(bad[0])
        raise ProfileError(
            f"{path}: line {i + 2}: field 'start_s' must be a finite number, "
            f"got {files.plain(frame['start_s'].iloc[i])!r}"
        )
    frame["start_s"] = start
    kinds = frame["kind"].astype(str)
    bad = np.flatnonzero(~kinds.isin(LOG_KINDS).to_numpy())
    if len(bad):
        i = int(bad[0])
        raise ProfileError(
            f"{path}: line {i + 2}: field 'kind' must be one of {', '.join(LOG_KINDS)}, "
            f"got {frame['kind'].iloc[i]!r}"
        )
    for i, ids in enumerate(frame["request_ids"]):
        for tok in str(ids).split():
            if not (tok.isascii() and tok.isdigit()):
                raise ProfileError(
                    f"{path}: line {i + 2}: field 'request_ids' must be integers >= 0 "
                    f"separated by spaces, got {tok!r}"
                )
    if not kinds.isin(PREFILL_KINDS).any():
        raise ProfileError(f"{path}: no prefill step, so no request's scheduling to compare")
    return frame


def check_request_ids(frame: pd.DataFrame, n_requests: int, where: str) -> None:
    """Every id of a step log names a request of the workload (ids ``0 .. n_requests - 1``)."""
    from hisim_jax.estimator.calibrate import ProfileError

    for i, ids in enumerate(frame["request_ids"]):
        for tok in str(ids).split():
            if int(tok) >= n_requests:
                raise ProfileError(
                    f"{where}: line {i + 2}: field 'request_ids': request {tok} is not in the "
                    f"workload (its {n_requests} requests have ids 0 to {n_requests - 1})"
                )


def first_scheduled(frame: pd.DataFrame) -> dict[int, float]:
    """Request id → start of the first prefill step that contains it."""
    out: dict[int, float] = {}
    for start, kind, ids in zip(frame["start_s"], frame["kind"], frame["request_ids"], strict=True):
        if kind not in PREFILL_KINDS or not isinstance(ids, str) or not ids.strip():
            continue
        for tok in ids.split():
            try:
                rid = int(tok)
            except ValueError:
                raise ValueError(
                    f"step log: field 'request_ids' has a non-integer id {tok!r}"
                ) from None
            out.setdefault(rid, float(start))
    return out


def _inversions(seq: list[int]) -> int:
    """Number of out-of-order pairs (merge sort)."""
    if len(seq) < 2:
        return 0
    mid = len(seq) // 2
    left, right = seq[:mid], seq[mid:]
    count = _inversions(left) + _inversions(right)
    i = j = 0
    merged = []
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            count += len(left) - i
            j += 1
    merged += left[i:] + right[j:]
    seq[:] = merged
    return count


def compare_schedules(log: pd.DataFrame, sim: pd.DataFrame, arrivals: dict[int, float]) -> dict:
    """Queue residency (first scheduling − arrival) and scheduling order, log vs simulation,
    over the requests both scheduled."""
    a, b = first_scheduled(log), first_scheduled(sim)
    common = sorted(set(a) & set(b))
    if not common:
        return {"requests_compared": 0}
    qa = np.array([a[r] - arrivals[r] for r in common])
    qb = np.array([b[r] - arrivals[r] for r in common])
    diff = np.abs(qb - qa)
    order_log = sorted(common, key=lambda r: (a[r], r))
    rank_sim = {r: k for k, r in enumerate(sorted(common, key=lambda r: (b[r], r)))}
    seq = [rank_sim[r] for r in order_log]
    pairs = len(seq) * (len(seq) - 1) // 2
    inv = _inversions(list(seq))
    return {
        "requests_compared": len(common),
        "only_in_log": len(set(a) - set(b)),
        "only_in_simulation": len(set(b) - set(a)),
        "queue_s_log": {
            "mean": float(qa.mean()),
            "p50": float(np.median(qa)),
            "p90": float(np.quantile(qa, 0.9)),
        },
        "queue_s_sim": {
            "mean": float(qb.mean()),
            "p50": float(np.median(qb)),
            "p90": float(np.quantile(qb, 0.9)),
        },
        "queue_abs_diff_s": {
            "mean": float(diff.mean()),
            "p50": float(np.median(diff)),
            "p90": float(np.quantile(diff, 0.9)),
            "max": float(diff.max()),
        },
        "order_pairs_agreeing": 1.0 - inv / pairs if pairs else 1.0,
        "same_position": float(np.mean([rank_sim[r] == k for k, r in enumerate(order_log)])),
        "prefill_steps_log": int(log["kind"].isin(PREFILL_KINDS).sum()),
        "prefill_steps_sim": int(sim["kind"].isin(PREFILL_KINDS).sum()),
    }
