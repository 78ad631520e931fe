"""SGLang's scheduler log: its batch lines read into records, and compared with the simulator's
schedule of the same workload.

The format follows SGLang's source, 0.5.23 (``sglang/srt/managers/scheduler_components/
metrics_reporter.py``: ``report_prefill_stats`` / ``report_decode_stats``, the usage parts from
``pool_stats_observer.py``; the line prefix from ``configure_logger`` in ``srt/utils/common.py``
and the rank prefix built in ``run_scheduler_process``, ``srt/managers/scheduler.py``), and the
variants of earlier releases (``scheduler.py`` / ``scheduler_metrics_mixin.py``, v0.3-0.5)::

    [2025-06-10 09:15:30 TP0] Prefill batch, #new-seq: 2, #new-token: 2048, #cached-token: 256,
        token usage: 0.02, #running-req: 1, #queue-req: 3, #pending-token: 1500, cuda graph: False,
        input throughput (token/s): 30378.61
    [2025-06-10 09:15:31 TP0] Decode batch, #running-req: 4, #token: 4100, token usage: 0.01,
        cuda graph: True, gen throughput (token/s): 321.55, #queue-req: 0

(one line each in the log). Read:

- the prefix ``[%(asctime)s%(msecs)%(prefix)s]``: a date and a time to the second, to the
  millisecond with ``SGLANG_LOG_MS=1``, then the scheduler's ranks (``DP0``, ``PP1``, ``TP0``,
  ``EP0``, ... ; older releases always wrote ``TP<k>``, 0.5.23 only for TP > 1). Text before
  the bracket (``docker compose``'s ``sglang  | ``, Ray's ``(SchedulerActor pid=..)``, colour
  codes) is skipped; without a bracket an ISO-8601 time before the message is taken. A
  ``timestamp: <ISO time>`` field in the line (request time-stats logging) is finer and wins.
- ``Prefill batch`` then ``.`` (older releases) or ``,`` (0.5.x), ``[<forward iteration>]`` with
  ``SGLANG_LOG_FORWARD_ITERS``, or ``(mixed #running-req: N).`` (v0.3-0.4 ``--enable-mixed-chunk``:
  N running requests decoded in the same step); ``Decode batch`` likewise.
- fields ``name: value`` separated by commas: ``#new-seq`` (requests in the batch, a chunked
  prompt being continued included), ``#new-token`` (tokens computed), ``#cached-token`` (prefix
  hits of the requests admitted now), ``#running-req`` (prefill: the decoding batch beside it;
  decode: the batch), ``#queue-req`` (the waiting queue; v0.3-0.4 also counted a chunked prompt),
  ``#token`` / ``#full token`` (KV tokens in use), ``token usage`` / ``full token usage``
  (their share of the pool), ``gen throughput (token/s)``, ``input throughput (token/s)``,
  ``cuda graph`` (or ``npu``/``cpu``/``musa graph``), and the PD-disaggregation queues
  ``#pending-token``, ``#prealloc-req``, ``#inflight-req``, ``#transfer-req``,
  ``#retracted-req``, ``#bootstrap-req``/``#unbootstrapped-req``. Other fields (``cache hit
  rate``, ``accept len``, ``swa token usage``, ``est. ... TFLOPS/s``, ...) are skipped.

A decode record stands for an interval: SGLang logs a decode line every ``decode_log_interval``
decode steps (``--decode-log-interval``, default 40), with the state at the last of them and the
throughput since the previous decode line. Each decode record says so (``decode_steps``, and
``interval_start_s``: the previous decode record's time of the same rank, the rank's first
record's for its first one). Lines before ``The server is fired up and ready to roll!`` are the
server's warm-up request and are dropped (``skip_warmup``).

Comparison with a simulation (``compare_sglang_log``): both clocks start at their first step
(the log's first record is time 0, the simulation's first step ``offset_s``), and each log record
of one rank stands for a time *tick* ``[t, t + resolution)`` (1 s, or 1 ms with milliseconds):

- a prefill record is paired with a simulated prefill step: the k-th prefill record of a tick
  with the k-th simulated prefill step that starts in that tick, and failing that (the
  simulation had fewer there) with the last simulated prefill step starting before the tick ends
  ("at or just before"). Compared: ``new_seq`` (request ids of the step), ``new_tokens``,
  ``cached_tokens`` (prefix hits of the requests in their first step, from the simulation's
  request frame), ``running_req`` and ``queue_req``, as snapshots.
- decode records are grouped by tick; a group stands for the simulated decode steps that *end*
  from the tick after the previous group's through its own tick. Compared with the simulation's
  mean over those steps: ``running_req``, ``kv_tokens``, ``queue_req``, ``token_usage`` (KV
  tokens over ``kv_cache_tokens``); ``gen_throughput`` is the simulated decode tokens over the
  group's span; ``decode_steps`` the simulated steps per record against ``decode_log_interval``.
  SGLang's values are snapshots at the interval's end, the simulation's are interval means, and
  SGLang counts a shared prefix's KV once where the simulation sums every request's context.

0.5.23 logs a prefill line when the step's result is processed (about its end), older releases
when the batch is formed (its start); either falls in the step's tick unless the step crosses
a tick boundary, so with second stamps the difference does not show.

The summary gives mean, p50 and p90 of every quantity over the log's records and over their
simulated counterparts, and of the differences (simulation − log) and their absolute values,
beside counts and token totals over the log's span.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from hisim_jax import files

DECODE_LOG_INTERVAL = 40  # SGLang's --decode-log-interval default
READY_LINE = "The server is fired up and ready to roll"

# SGLang field -> column: integer counts (>= 0)
_COUNTS = {
    "#new-seq": "new_seq",
    "#new-token": "new_tokens",
    "#cached-token": "cached_tokens",
    "#running-req": "running_req",
    "#queue-req": "queue_req",
    "#token": "kv_tokens",
    "#full token": "kv_tokens",  # hybrid SWA / SSM models
    "#pending-token": "pending_tokens",
    "#prealloc-req": "prealloc_req",
    "#inflight-req": "inflight_req",
    "#transfer-req": "transfer_req",
    "#retracted-req": "retracted_req",
    "#bootstrap-req": "bootstrap_req",
    "#unbootstrapped-req": "bootstrap_req",
}
# ... and finite numbers (>= 0)
_NUMBERS = {
    "token usage": "token_usage",
    "full token usage": "token_usage",
    "gen throughput (token/s)": "gen_throughput",
    "input throughput (token/s)": "input_throughput",
}
_GRAPHS = ("cuda graph", "npu graph", "cpu graph", "musa graph")
_REQUIRED = {
    "prefill": ("#new-seq", "#new-token", "#cached-token", "#running-req", "#queue-req"),
    "decode": ("#running-req", "#queue-req"),
}
_INT_COLUMNS = (
    "new_seq", "new_tokens", "cached_tokens", "running_req", "queue_req", "kv_tokens",
    "decode_steps", "pending_tokens", "prealloc_req", "inflight_req", "transfer_req",
    "retracted_req", "bootstrap_req",
)  # fmt: skip
_FLOAT_COLUMNS = ("token_usage", "gen_throughput", "input_throughput")
COLUMNS = (
    "line", "time_s", "timestamp", "stamp_res_s", "rank", "kind", "new_seq", "new_tokens",
    "cached_tokens", "running_req", "queue_req", "kv_tokens", "token_usage", "gen_throughput",
    "input_throughput", "cuda_graph", "mixed", "decode_steps", "interval_start_s",
    "pending_tokens", "prealloc_req", "inflight_req", "transfer_req", "retracted_req",
    "bootstrap_req",
)  # fmt: skip

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_HEADER = re.compile(
    r"\b(?P<kind>Prefill|Decode) batch(?P<iter>\s*\[[^\]]*\])?(?P<mixed>\s*\([^)]*\))?\s*[.,]"
)
_BRACKET = re.compile(r"\[(?P<inner>[^\[\]]*)\]\s*$")
_ISO = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:[.,](\d{1,9}))?")
_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2})(?:[.,](\d{1,9}))?$")
_MIXED = re.compile(r"\(\s*mixed #running-req:\s*(?P<v>[^)]*)\)")
_EPOCH = datetime(1970, 1, 1)


def _error():
    from hisim_jax.estimator.calibrate import ProfileError

    return ProfileError


# ------------------------------------------------------------------------------------------------
# reading


def _clock_us(date: str, clock: str, frac: str | None, cache: dict) -> tuple[int, float]:
    """Microseconds since 1970 of a stamp, and its resolution in seconds; ValueError if bad."""
    key = f"{date} {clock}"
    whole = cache.get(key)
    if whole is None:
        dt = datetime.strptime(key, "%Y-%m-%d %H:%M:%S")
        whole = cache[key] = (dt - _EPOCH) // timedelta(microseconds=1)
    if not frac:
        return whole, 1.0
    digits = frac[:6]
    return whole + int(digits.ljust(6, "0")), 10.0 ** -len(digits)


def _stamp(head: str, cache: dict) -> tuple[int, float, str, str] | str:
    """(µs, resolution, rank, raw) of the text before the batch message, or why it has none."""
    m = _BRACKET.search(head)
    if m is not None:
        inner = m.group("inner").strip()
        parts = inner.split()
        s = _STAMP.match(" ".join(parts[:2]))
        if s is None:
            return f"field 'timestamp' must be 'YYYY-MM-DD HH:MM:SS[.mmm]', got {inner!r}"
        try:
            us, res = _clock_us(s.group(1), s.group(2), s.group(3), cache)
        except ValueError:
            return f"field 'timestamp' is not a date and time, got {inner!r}"
        return us, res, " ".join(parts[2:]), inner
    found = list(_ISO.finditer(head))
    if not found:
        return (
            "field 'timestamp' is missing (SGLang writes '[YYYY-MM-DD HH:MM:SS TP0]' before "
            "the message)"
        )
    s = found[-1]
    try:
        us, res = _clock_us(s.group(1), s.group(2), s.group(3), cache)
    except ValueError:
        return f"field 'timestamp' is not a date and time, got {s.group(0)!r}"
    return us, res, "", s.group(0)


def _fields(body: str) -> list[tuple[str, str | None]]:
    out = []
    for chunk in body.split(","):
        name, sep, value = chunk.partition(":")
        name = name.strip()
        if name:
            out.append((name, value.strip() if sep else None))
    return out


def _graph(v: str | None) -> bool | None:
    return {"True": True, "False": False}.get(v)


def _count(v: str | None) -> int | None:
    return int(v) if v is not None and v.isascii() and v.isdigit() else None


def _number(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) and x >= 0 else None


# every batch-line field with a value: (column, parser, what its value must be)
_FIELDS = {
    **{k: (c, _count, "an integer >= 0") for k, c in _COUNTS.items()},
    **{k: (c, _number, "a finite number >= 0") for k, c in _NUMBERS.items()},
    **{k: ("cuda_graph", _graph, "True or False") for k in _GRAPHS},
}


def _parse_line(text: str, m: re.Match, where: str, cache: dict) -> dict:
    """One batch line (``m``: its header) as a record; bad values raise ProfileError."""
    err = _error()
    kind = m.group("kind").lower()
    stamp = _stamp(text[: m.start()], cache)
    if isinstance(stamp, str):
        raise err(f"{where}: {stamp}")
    us, res, rank, _ = stamp
    rec: dict = {"kind": kind, "us": us, "stamp_res_s": res, "rank": rank, "mixed": False}
    if m.group("iter") is not None:
        it = m.group("iter").strip()[1:-1].strip()
        if not (it.isascii() and it.isdigit()):
            raise err(f"{where}: field 'forward iteration' must be an integer >= 0, got {it!r}")
    if m.group("mixed") is not None:
        mm = _MIXED.fullmatch(m.group("mixed").strip())
        v = mm.group("v").strip() if mm else m.group("mixed").strip()
        if mm is None or _count(v) is None:
            raise err(f"{where}: field '(mixed #running-req)' must be an integer >= 0, got {v!r}")
        rec["running_req"], rec["mixed"] = int(v), True
    seen = set()
    for name, value in _fields(text[m.end() :]):
        if name in seen:  # an early PD prefill line repeats #running-req / #queue-req
            continue
        seen.add(name)
        field = _FIELDS.get(name)
        if field is not None:
            col, parse, must = field
            got = parse(value)
            if got is None:
                shown = "no value" if value is None else repr(value)
                raise err(f"{where}: field '{name}' must be {must}, got {shown}")
            rec.setdefault(col, got)
        elif name == "timestamp":
            s = _STAMP.match((value or "").replace("T", " ", 1))
            try:
                if s is None:
                    raise ValueError
                rec["us"], rec["stamp_res_s"] = _clock_us(s.group(1), s.group(2), s.group(3), cache)
            except ValueError:
                raise err(
                    f"{where}: field 'timestamp' must be an ISO date and time, got {value!r}"
                ) from None
    for name in _REQUIRED[kind]:
        if name == "#running-req" and rec["mixed"]:
            continue
        if name not in seen:
            raise err(f"{where}: field '{name}' is missing from the {kind} batch line")
    return rec


def parse_sglang_log(
    lines: Iterable[str],
    source: str = "log",
    *,
    decode_log_interval: int = DECODE_LOG_INTERVAL,
    skip_warmup: bool = True,
) -> pd.DataFrame:
    """The batch records of an SGLang server log's lines (see the module docstring), one row
    per ``Prefill batch`` / ``Decode batch`` line in file order, columns ``COLUMNS``: ``line``
    (1-based), ``time_s`` (seconds after the first record), ``timestamp``, ``stamp_res_s``
    (the stamp's resolution), ``rank`` (the prefix's ranks, ``''`` if none; only if some line
    has one), ``kind`` (prefill or decode), the counts and rates (nullable where a kind or a
    version does not log them), ``decode_steps`` (``decode_log_interval`` for a decode record)
    and ``interval_start_s``. Other lines are ignored; a batch line that does not parse, a log
    without batch lines (after the warm-up) are a ``ProfileError`` naming ``source`` and the
    line."""
    err = _error()
    if isinstance(decode_log_interval, bool) or not isinstance(
        decode_log_interval, numbers.Integral
    ):
        raise ValueError(
            f"options: field 'decode_log_interval' must be an integer >= 1, "
            f"got {decode_log_interval!r}"
        )
    if decode_log_interval < 1:
        raise ValueError(
            f"options: field 'decode_log_interval' must be >= 1, got {decode_log_interval}"
        )
    if isinstance(lines, str):  # the whole text, not its lines
        lines = lines.splitlines()
    cache: dict = {}
    recs: list[dict] = []
    ready_at = None
    n_lines = 0
    for n, raw in enumerate(lines, start=1):
        n_lines = n
        if "batch" not in raw and READY_LINE not in raw:
            continue
        text = _ANSI.sub("", raw.rstrip("\r\n"))
        if READY_LINE in text and ready_at is None:
            ready_at = n
            continue
        m = _HEADER.search(text)
        if m is None:
            continue
        rec = _parse_line(text, m, f"{source}: line {n}", cache)
        rec["line"] = n
        recs.append(rec)
    if not n_lines:
        raise err(f"{source}: empty file, expected an SGLang server log")
    if not recs:
        raise err(
            f"{source}: no 'Prefill batch' or 'Decode batch' lines (an SGLang server log at "
            "log level info has them)"
        )
    if skip_warmup and ready_at is not None:
        kept = [r for r in recs if r["line"] > ready_at]
        if not kept:
            raise err(
                f"{source}: no batch lines after line {ready_at} ('{READY_LINE}'): only the "
                "server's warm-up request was logged"
            )
        recs = kept
    return _frame(recs, decode_log_interval)


def _frame(recs: list[dict], decode_log_interval: int) -> pd.DataFrame:
    us0 = min(r["us"] for r in recs)
    out: dict = {
        "line": np.array([r["line"] for r in recs], dtype=np.int64),
        "time_s": np.array([(r["us"] - us0) / 1e6 for r in recs]),
        "timestamp": pd.to_datetime([_EPOCH + timedelta(microseconds=r["us"]) for r in recs]),
        "stamp_res_s": np.array([r["stamp_res_s"] for r in recs]),
        "rank": [r["rank"] for r in recs],
        "kind": [r["kind"] for r in recs],
    }
    for col in _INT_COLUMNS:
        vals = [r.get(col) for r in recs]
        if col == "decode_steps":
            vals = [decode_log_interval if r["kind"] == "decode" else None for r in recs]
        out[col] = pd.array(vals, dtype="Int64")
    for col in _FLOAT_COLUMNS:
        out[col] = np.array([r.get(col, np.nan) for r in recs], dtype=float)
    out["cuda_graph"] = pd.array([r.get("cuda_graph") for r in recs], dtype="boolean")
    out["mixed"] = np.array([r["mixed"] for r in recs], dtype=bool)
    frame = pd.DataFrame(out)
    # a decode record's interval starts at its rank's previous decode record
    start = np.full(len(frame), np.nan)
    for _, idx in frame.groupby("rank", sort=False).groups.items():
        sub = frame.loc[idx].sort_values(["time_s", "line"], kind="stable")
        prev = float(sub["time_s"].iloc[0])
        for i, kind, t in zip(sub.index, sub["kind"], sub["time_s"], strict=True):
            if kind == "decode":
                start[i] = prev
                prev = float(t)
    frame["interval_start_s"] = start
    if not frame["rank"].astype(bool).any():
        frame = frame.drop(columns="rank")
    return frame[[c for c in COLUMNS if c in frame.columns]]


def read_sglang_log(
    path: str | Path,
    *,
    decode_log_interval: int = DECODE_LOG_INTERVAL,
    skip_warmup: bool = True,
) -> pd.DataFrame:
    """``parse_sglang_log`` of a log file (UTF-8; a missing, empty or undecodable file is a
    one-line ``ProfileError`` naming it)."""
    err = _error()
    text = files.read_text(path, "SGLang server log", err, empty_ok=True)
    if not text.strip():
        raise err(f"{path}: empty file, expected an SGLang server log")
    return parse_sglang_log(
        text.splitlines(),
        str(path),
        decode_log_interval=decode_log_interval,
        skip_warmup=skip_warmup,
    )


def looks_like_sglang_log(path: str | Path, max_bytes: int = 1 << 20) -> bool:
    """Whether a file's first ``max_bytes`` hold an SGLang batch line (to tell a server log
    from a ``steps.csv`` step log); unreadable files are False (the reader names the problem)."""
    try:
        with open(path, "rb") as f:
            head = f.read(max_bytes).decode("utf-8", errors="replace")
    except OSError:
        return False
    return any(_HEADER.search(line) for line in head.splitlines() if "batch" in line)


# ------------------------------------------------------------------------------------------------
# a simulation's steps as an SGLang log (the same format, for tests and side-by-side reading)


def _ids(v) -> list[int]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, (int, np.integer)):
        return [int(v)]
    if isinstance(v, (float, np.floating)):
        return [int(v)]
    return [int(float(t)) for t in str(v).split()]


def _hits(requests: pd.DataFrame | None) -> dict[int, int] | None:
    if requests is None:
        return None
    cols = [c for c in ("l1_hit_tokens", "l2_hit_tokens", "l3_hit_tokens") if c in requests]
    if "request_id" not in requests or not cols:
        raise ValueError(
            "simulation requests: need columns request_id and l1_hit_tokens (a requests.csv)"
        )
    total = requests[cols].fillna(0).sum(axis=1).to_numpy()
    rid = requests["request_id"].astype(int).tolist()
    return dict(zip(rid, total.astype(int).tolist(), strict=True))


SIM_COLUMNS = ("start_s", "duration_s", "kind", "n_requests", "new_tokens", "kv_tokens",
               "waiting", "running", "request_ids")  # fmt: skip


def _sim_steps(steps: pd.DataFrame, requests: pd.DataFrame | None, replica: int) -> pd.DataFrame:
    """The simulation's steps of one replica in time order, with ``new_seq``,
    ``prefill_tokens`` and ``cached_tokens`` (NaN without the request frame) per prefill."""
    missing = [c for c in SIM_COLUMNS if c not in steps.columns]
    if missing:
        raise ValueError(
            f"simulation steps: missing column(s) {', '.join(missing)} (a steps.csv has them)"
        )
    if "replica" in steps.columns:
        replicas = sorted(set(steps["replica"].astype(int)))
        if replica not in replicas:
            raise ValueError(
                f"options: replica {replica} is not in the simulation (replicas: "
                f"{', '.join(map(str, replicas))})"
            )
        steps = steps[steps["replica"].astype(int) == replica]
    s = steps.sort_values("start_s", kind="stable").reset_index(drop=True).copy()
    ids = [_ids(v) for v in s["request_ids"]]
    pre = s["kind"].isin(("prefill", "mixed")).to_numpy()
    new_seq = np.array([len(i) for i in ids], dtype=float)
    n_req = s["n_requests"].to_numpy(float)
    # a mixed step's tokens include one per decoding request beside the prompts
    s["new_seq"] = np.where(pre, new_seq, np.nan)
    s["prefill_tokens"] = np.where(
        pre,
        s["new_tokens"].to_numpy(float) - np.where(s["kind"] == "mixed", n_req - new_seq, 0),
        np.nan,
    )
    hits = _hits(requests)
    cached = np.full(len(s), np.nan)
    if hits is not None:
        seen: set[int] = set()
        for i in np.flatnonzero(pre):
            fresh = [r for r in ids[i] if r not in seen]
            seen.update(fresh)
            cached[i] = sum(hits.get(r, 0) for r in fresh)
    s["cached_tokens"] = cached
    return s


def sglang_log_lines(
    steps: pd.DataFrame,
    requests: pd.DataFrame | None = None,
    *,
    start: datetime = datetime(2025, 1, 1),
    ranks: str = "TP0",
    milliseconds: bool = True,
    decode_log_interval: int = DECODE_LOG_INTERVAL,
    kv_cache_tokens: int | None = None,
    replica: int = 0,
) -> list[str]:
    """A simulation's ``steps`` (and ``requests`` for ``#cached-token``) written as SGLang 0.5.23
    would log them: a ``Prefill batch`` line at each prefill step's start, a ``Decode batch``
    line at the end of every ``decode_log_interval``-th decode step with the state of that step
    and the decode throughput since the previous one; the clock starts at ``start`` at the
    first step, truncated to the millisecond (``SGLANG_LOG_MS``) or the second."""
    s = _sim_steps(steps, requests, replica)
    t0 = float(s["start_s"].iloc[0])
    prefix = f" {ranks}" if ranks else ""
    cap = float(kv_cache_tokens) if kv_cache_tokens else math.nan

    def stamp(t: float) -> str:
        ms = int(math.floor((t - t0) * 1e3 + 1e-9))
        if not milliseconds:
            ms -= ms % 1000
        dt = start + timedelta(milliseconds=ms)
        text = dt.strftime("%Y-%m-%d %H:%M:%S")
        return f"[{text}.{ms % 1000:03d}{prefix}]" if milliseconds else f"[{text}{prefix}]"

    def usage(kv: float) -> float:
        return kv / cap if math.isfinite(cap) else 0.0

    out = []
    n_dec, tokens, last_end, last_kv = 0, 0.0, t0, 0.0
    for r in s.itertuples(index=False):
        if r.kind in ("prefill", "mixed"):
            cached = 0 if math.isnan(r.cached_tokens) else int(r.cached_tokens)
            rate = r.prefill_tokens / r.duration_s if r.duration_s > 0 else 0.0
            out.append(
                f"{stamp(r.start_s)} Prefill batch, #new-seq: {int(r.new_seq)}, "
                f"#new-token: {int(r.prefill_tokens)}, #cached-token: {cached}, "
                f"token usage: {usage(last_kv):.2f}, #running-req: {int(r.running)}, "
                f"#queue-req: {int(r.waiting)}, #pending-token: 0, cuda graph: False, "
                f"input throughput (token/s): {rate:.2f}"
            )
            continue
        n_dec += 1
        tokens += float(r.new_tokens)
        last_kv = float(r.kv_tokens)
        end = float(r.start_s + r.duration_s)
        if n_dec % decode_log_interval:
            continue
        gen = tokens / (end - last_end) if end > last_end else 0.0
        out.append(
            f"{stamp(end)} Decode batch, #running-req: {int(r.running)}, "
            f"#token: {int(r.kv_tokens)}, token usage: {usage(r.kv_tokens):.2f}, "
            f"cuda graph: True, gen throughput (token/s): {gen:.2f}, "
            f"#queue-req: {int(r.waiting)}"
        )
        tokens, last_end = 0.0, end
    return out


# ------------------------------------------------------------------------------------------------
# comparison

PREFILL_QUANTITIES = ("new_seq", "new_tokens", "cached_tokens", "running_req", "queue_req")
DECODE_QUANTITIES = (
    "running_req", "kv_tokens", "queue_req", "token_usage", "gen_throughput", "decode_steps",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SGLangLogComparison:
    """``summary``: a flat / one-level-nested dict (counts, then ``prefill_<q>`` and
    ``decode_<q>`` each with log_/sim_/diff_ mean, p50, p90, abs_diff_mean and paired);
    ``records``: one row per log record of the compared rank, in time order: ``line``,
    ``kind``, ``time_s`` (log clock), ``rank`` (if the log has ranks), ``sim_start_s`` /
    ``sim_end_s`` (on the log's clock: a prefill's paired simulated step; a decode group's
    window of simulated step ends, NaN start for the first: from the beginning), ``sim_steps``
    (simulated steps paired: 0 or 1 for a prefill, the window's decode steps), then
    ``<q>_log``, ``<q>_sim`` and ``<q>_diff`` (simulation − log) for every quantity (NaN
    where a kind does not have it)."""

    summary: dict
    records: pd.DataFrame

    def to_csv(self) -> str:
        return self.records.to_csv(index=False, float_format="%.9g")


def _dist(x: np.ndarray, prefix: str) -> dict:
    x = x[np.isfinite(x)]
    if not len(x):
        return {f"{prefix}_mean": None, f"{prefix}_p50": None, f"{prefix}_p90": None}
    return {
        f"{prefix}_mean": float(x.mean()),
        f"{prefix}_p50": float(np.median(x)),
        f"{prefix}_p90": float(np.quantile(x, 0.9)),
    }


def _quantity(log: np.ndarray, sim: np.ndarray) -> dict:
    diff = sim - log
    ok = np.isfinite(diff)
    return {
        **_dist(log, "log"),
        **_dist(sim, "sim"),
        **_dist(diff, "diff"),
        "abs_diff_mean": float(np.abs(diff[ok]).mean()) if ok.any() else None,
        "paired": int(ok.sum()),
    }


def _pair_prefills(t: np.ndarray, res: np.ndarray, sim_t: np.ndarray) -> np.ndarray:
    """Index into ``sim_t`` (sorted starts) for each log time ``t`` (sorted), -1 if none: the
    k-th record of a tick takes the k-th simulated step starting in the tick, else the last
    one starting before the tick ends."""
    out = np.full(len(t), -1, dtype=np.int64)
    k, prev = 0, None
    for i, (ti, ri) in enumerate(zip(t, res, strict=True)):
        k = k + 1 if prev == ti else 0
        prev = ti
        lo = int(np.searchsorted(sim_t, ti - 1e-9, side="left"))
        hi = int(np.searchsorted(sim_t, ti + ri - 1e-9, side="left"))
        out[i] = lo + k if lo + k < hi else hi - 1
    return out


def compare_sglang_log(
    log: pd.DataFrame,
    sim_steps: pd.DataFrame,
    sim_requests: pd.DataFrame | None = None,
    *,
    kv_cache_tokens: int | None = None,
    offset_s: float | None = None,
    rank: str | None = None,
    replica: int = 0,
) -> SGLangLogComparison:
    """Per-record differences between an SGLang log (``read_sglang_log``) and a simulation of the
    same workload (``steps``/``requests`` frames as ``simulation.run`` returns or steps.csv /
    requests.csv hold), aligned as the module docstring says.

    ``sim_requests`` gives ``cached_tokens`` (else NaN); ``kv_cache_tokens`` the simulated pool
    for ``token_usage`` (else NaN); ``offset_s`` the simulated time of the log's time 0 [the
    simulation's first step]; ``rank`` the log's rank to compare [its first]; ``replica`` the
    simulated replica [0]."""
    log = log.copy()
    ranks = list(dict.fromkeys(log["rank"])) if "rank" in log.columns else []
    if rank is not None and rank not in ranks:
        shown = ", ".join(repr(r) for r in ranks) if ranks else "none"
        raise ValueError(f"options: rank {rank!r} is not in the log (its ranks: {shown})")
    chosen = rank if rank is not None else (ranks[0] if ranks else None)
    if chosen is not None:
        log = log[log["rank"] == chosen]
    log = log.sort_values(["time_s", "line"], kind="stable").reset_index(drop=True)
    sim = _sim_steps(sim_steps, sim_requests, replica)
    if sim.empty:
        raise ValueError("simulation steps: none to compare")
    offset = float(sim["start_s"].iloc[0]) if offset_s is None else float(offset_s)
    sim_t = sim["start_s"].to_numpy(float) - offset
    sim_end = sim_t + sim["duration_s"].to_numpy(float)
    cap = float(kv_cache_tokens) if kv_cache_tokens else math.nan
    t = log["time_s"].to_numpy(float)
    res = log["stamp_res_s"].to_numpy(float)
    span = float(np.max(t + res))

    rows = pd.DataFrame(
        {
            "line": log["line"].to_numpy(),
            "kind": log["kind"].to_numpy(),
            "time_s": t,
            **({"rank": log["rank"].to_numpy()} if chosen is not None else {}),
            "sim_start_s": np.nan,
            "sim_end_s": np.nan,
            "sim_steps": 0,
        }
    )
    cols: dict[str, np.ndarray] = {}

    def put(q: str, idx: np.ndarray, log_v, sim_v) -> None:
        for side, v in (("log", log_v), ("sim", sim_v)):
            col = cols.setdefault(f"{q}_{side}", np.full(len(log), np.nan))
            col[idx] = v

    def logged(q: str, idx: np.ndarray) -> np.ndarray:
        return log[q].iloc[idx].to_numpy(dtype=float, na_value=np.nan)

    # prefill records: snapshots of the paired simulated prefill step
    pi = np.flatnonzero(log["kind"].to_numpy() == "prefill")
    s_pre = np.flatnonzero(sim["kind"].isin(("prefill", "mixed")).to_numpy())
    match = _pair_prefills(t[pi], res[pi], sim_t[s_pre])
    ok = match >= 0
    j = np.where(ok, s_pre[np.maximum(match, 0)], 0)

    def at(col: str) -> np.ndarray:
        return np.where(ok, sim[col].to_numpy(float)[j], np.nan)

    rows.loc[pi, "sim_start_s"] = np.where(ok, sim_t[j], np.nan)
    rows.loc[pi, "sim_end_s"] = np.where(ok, sim_end[j], np.nan)
    rows.loc[pi, "sim_steps"] = ok.astype(int)
    for q, sim_col in (
        ("new_seq", "new_seq"),
        ("new_tokens", "prefill_tokens"),
        ("cached_tokens", "cached_tokens"),
        ("running_req", "running"),
        ("queue_req", "waiting"),
    ):
        put(q, pi, logged(q, pi), at(sim_col))

    # decode records: means over the simulated decode steps ending within their tick group
    di = np.flatnonzero(log["kind"].to_numpy() == "decode")
    s_dec = np.flatnonzero((sim["kind"] == "decode").to_numpy())
    dec_end = sim_end[s_dec]
    order = np.argsort(dec_end, kind="stable")
    s_dec, dec_end = s_dec[order], dec_end[order]
    vals = {c: sim[c].to_numpy(float)[s_dec] for c in ("running", "kv_tokens", "waiting")}
    vals["new_tokens"] = sim["new_tokens"].to_numpy(float)[s_dec]
    sim_dec = {q: np.full(len(di), np.nan) for q in DECODE_QUANTITIES}
    prev_hi, prev_t = -math.inf, 0.0
    g = 0
    while g < len(di):
        h = g
        while h + 1 < len(di) and t[di[h + 1]] == t[di[g]]:
            h += 1
        members = slice(g, h + 1)
        tick, hi = t[di[g]], t[di[g]] + res[di[g]]
        a = int(np.searchsorted(dec_end, prev_hi - 1e-9, side="left"))
        b = int(np.searchsorted(dec_end, hi - 1e-9, side="left"))
        n, m = b - a, h - g + 1
        rows.loc[di[members], "sim_start_s"] = prev_hi if math.isfinite(prev_hi) else np.nan
        rows.loc[di[members], "sim_end_s"] = hi
        rows.loc[di[members], "sim_steps"] = n
        sim_dec["decode_steps"][members] = n / m
        if n:
            sim_dec["running_req"][members] = vals["running"][a:b].mean()
            sim_dec["kv_tokens"][members] = vals["kv_tokens"][a:b].mean()
            sim_dec["queue_req"][members] = vals["waiting"][a:b].mean()
            sim_dec["token_usage"][members] = vals["kv_tokens"][a:b].mean() / cap
        gap = tick - prev_t
        if gap > 0:
            sim_dec["gen_throughput"][members] = vals["new_tokens"][a:b].sum() / gap
        prev_hi, prev_t = hi, tick
        g = h + 1
    for q in DECODE_QUANTITIES:
        put(q, di, logged(q, di), sim_dec[q])

    for q in dict.fromkeys(PREFILL_QUANTITIES + DECODE_QUANTITIES):
        rows[f"{q}_log"] = cols[f"{q}_log"]
        rows[f"{q}_sim"] = cols[f"{q}_sim"]
        rows[f"{q}_diff"] = cols[f"{q}_sim"] - cols[f"{q}_log"]

    in_span = sim_t < span
    pre_span = in_span & sim["kind"].isin(("prefill", "mixed")).to_numpy()
    dec_span = in_span & (sim["kind"] == "decode").to_numpy()
    interval = log["decode_steps"].dropna()
    summary: dict = {
        "log_records": len(log),
        "log_prefill_records": len(pi),
        "log_decode_records": len(di),
        "rank": chosen,
        "ranks_in_log": ", ".join(ranks) if ranks else None,
        "decode_log_interval": int(interval.iloc[0]) if len(interval) else None,
        "stamp_resolution_s": float(res.max()),
        "log_span_s": span,
        "sim_offset_s": offset,
        "sim_span_s": float(sim_end.max()),
        "sim_prefill_steps_in_span": int(pre_span.sum()),
        "sim_decode_steps_in_span": int(dec_span.sum()),
        "prefill_paired": int(ok.sum()),
        "decode_paired": int(np.isfinite(sim_dec["running_req"]).sum()),
        "prefill_tokens_log": int(log["new_tokens"].iloc[pi].fillna(0).sum()),
        "prefill_tokens_sim": int(sim["prefill_tokens"].to_numpy(float)[pre_span].sum()),
        "cached_tokens_log": int(log["cached_tokens"].iloc[pi].fillna(0).sum()),
        "cached_tokens_sim": (
            int(sim["cached_tokens"].to_numpy(float)[pre_span].sum())
            if sim_requests is not None
            else None
        ),
        "decode_steps_log": len(di) * (int(interval.iloc[0]) if len(interval) else 0),
        "decode_steps_sim": int(dec_span.sum()),
    }
    for kind, quantities, idx in (
        ("prefill", PREFILL_QUANTITIES, pi),
        ("decode", DECODE_QUANTITIES, di),
    ):
        for q in quantities:
            summary[f"{kind}_{q}"] = _quantity(cols[f"{q}_log"][idx], cols[f"{q}_sim"][idx])
    return SGLangLogComparison(files.finite_or_none(summary), rows)


def replay_sglang_log(
    path: str | Path,
    options,
    *,
    decode_log_interval: int = DECODE_LOG_INTERVAL,
    skip_warmup: bool = True,
    rank: str | None = None,
    offset_s: float | None = None,
    workload=None,
    progress=None,
) -> SGLangLogComparison:
    """Read the SGLang log at ``path`` (errors before any simulating), simulate ``options``
    (``SimulationOptions``, as ``hisim simulate`` takes them; ``workload`` replaces its trace as
    in ``simulation.run``) and compare (``compare_sglang_log``, the simulated KV pool for token
    usage). ``summary`` also names the log and the simulated replica's engine."""
    from hisim_jax.simulation import run

    log = read_sglang_log(path, decode_log_interval=decode_log_interval, skip_warmup=skip_warmup)
    result = run(options, progress=progress, workload=workload)
    replica = result.summary.get("replica", {})
    report = compare_sglang_log(
        log,
        result.steps,
        result.requests,
        kv_cache_tokens=replica.get("l1_tokens"),
        offset_s=offset_s,
        rank=rank,
    )
    summary = {"log": str(path), "engine": replica.get("engine"), **report.summary}
    return SGLangLogComparison(summary, report.records)
