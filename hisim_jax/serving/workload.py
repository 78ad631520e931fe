"""Requests for the simulator: trace readers and seeded synthetic generators.

A ``Workload`` is a tuple of frozen ``Request`` records sorted by arrival. Prefix identity is a
tuple of block ids, one per ``block_tokens``-token block of the prompt (the last block may be
partial): two prompts share the KV of their first k blocks iff their first k ids are equal.

Readers (every error is a ``WorkloadError`` whose message is one line:
``<file>: line <n>: field '<f>': <what>, got <value>``; with ``skip_bad_lines=True`` bad lines
are skipped and counted in ``Workload.skipped_lines``; blank lines are always skipped):

- ``read_mooncake``: Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids`` one per 512-token block). ``len(hash_ids) == ceil(input_length / 512)`` is
  enforced exactly: every line of the public conversation trace satisfies it.
- ``read_azure``: Azure LLM inference CSV (``TIMESTAMP`` wall clock, ``ContextTokens``,
  ``GeneratedTokens``). Timestamps keep their sub-second digits (to the nanosecond; an optional
  ``Z``/``+hh:mm`` offset is honoured) and arrivals count from the earliest row. No prefix
  information, so ``block_ids == ()``. A row with 0 generated tokens becomes ``output_len = 1``
  (a request produces at least one token; the 2023 code trace has no such rows).
- ``read_jsonl`` / ``read_csv``: the generic format, one request per line/row with fields
  ``arrival_s`` (seconds) or ``timestamp_ms`` (exactly one of the two), ``input_len``,
  ``output_len``, and optionally ``block_ids`` (a JSON list of integers, in CSV a quoted JSON
  list), ``session_id`` (default -1) and ``turn`` (default 0). Empty CSV cells and JSON nulls
  mean "absent" for the optional fields. The block size is the ``block_tokens`` argument, and
  non-empty ``block_ids`` must have ``ceil(input_len / block_tokens)`` entries. ``write_jsonl``
  and ``write_csv`` write this format back losslessly.
- ``read_sharegpt``: ShareGPT-style JSON (see its docstring for the token-count approximation,
  the arrival model and the block ids).

``load_trace`` reads any of these by name and applies ``select`` (time window, first N, rate
scaling, re-basing to 0). Generators (``synthetic``, ``chat_sessions``, ``agent_sessions``,
``default_chat``) draw everything from ``numpy.random.default_rng(seed)``: same seed, same
workload. Block ids are stable across runs and Python processes (blake2b, never ``hash()``).
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from hisim_jax import files

MOONCAKE_BLOCK_TOKENS = 512
# Stand-in generation time per output token when spacing the turns of a session: the next turn
# arrives after the previous one was generated (at this rate) plus the user's think time. The
# simulator's own timing is not known when the workload is built, so this is a fixed estimate.
GEN_S_PER_TOKEN = 0.02
_INT_LIMIT = 2**62  # lengths and ids beyond this would overflow int64 arithmetic downstream
# Arrivals (after windowing and rate scaling) span at most this many seconds, ~32 years: the
# simulator's clock is a float, and far beyond it a step no longer moves the clock (at 1e16 s
# one ulp is 2 s), so requests could never finish.
MAX_SPAN_S = 1e9
_ID_MIN, _ID_MAX = -(2**63), 2**63 - 1
_MISSING = object()

# ------------------------------------------------------------------------------------------------
# records


class WorkloadError(ValueError):
    """A bad trace or workload argument; the message is one line: file, line, field, value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True, slots=True)
class Request:
    """One request. ``block_ids`` has ``ceil(input_len / block_tokens)`` ids, or is empty."""

    request_id: int  # 0-based position in the workload after sorting by arrival
    arrival_s: float  # seconds from workload start (the first arrival need not be 0)
    input_len: int  # prompt tokens, >= 1
    output_len: int  # tokens to generate, >= 1
    block_ids: tuple[int, ...] = ()
    session_id: int = -1  # conversation/agent session, -1 if none
    turn: int = 0  # turn index within the session
    # the client's think (chat) or tool (agent) time between the previous turn's reply and
    # this turn, when a closed-loop replay releases it; -1: unknown (the recorded gap is used)
    think_s: float = -1.0


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests sorted by ``(arrival_s, original order)``; ``request_id`` equals the index."""

    requests: tuple[Request, ...]
    block_tokens: int  # tokens per prefix block
    source: str  # e.g. "mooncake:/path/file.jsonl" or "synthetic:chat"
    skipped_lines: int = 0  # malformed lines (ShareGPT: conversations) skipped

    def __len__(self) -> int:
        return len(self.requests)

    def summary(self) -> dict[str, Any]:
        """Counts, duration, rate, length statistics and the prefix reuse ratio (plain numbers).

        ``request_rate_per_s`` is ``(requests - 1) / duration_s`` (arrivals per second between
        the first and the last arrival). ``prefix_reuse_ratio`` is defined in
        ``prefix_reuse_ratio``.
        """
        reqs = self.requests
        n = len(reqs)
        out: dict[str, Any] = {"requests": n}
        if n == 0:
            zeros = dict.fromkeys(
                (
                    "duration_s",
                    "request_rate_per_s",
                    "input_len_mean",
                    "input_len_p50",
                    "input_len_p99",
                    "output_len_mean",
                    "output_len_p50",
                    "output_len_p99",
                    "prefix_reuse_ratio",
                ),
                0.0,
            )
            counts = {"input_tokens": 0, "output_tokens": 0, "prompt_blocks": 0, "sessions": 0}
            return out | zeros | counts
        arrivals = np.fromiter((r.arrival_s for r in reqs), np.float64, n)
        inp = np.fromiter((r.input_len for r in reqs), np.int64, n)
        outp = np.fromiter((r.output_len for r in reqs), np.int64, n)
        duration = float(arrivals.max() - arrivals.min())
        out["duration_s"] = duration
        out["request_rate_per_s"] = (n - 1) / duration if duration > 0 else 0.0
        for name, arr in (("input_len", inp), ("output_len", outp)):
            out[f"{name}_mean"] = float(arr.mean())
            out[f"{name}_p50"] = float(np.percentile(arr, 50))
            out[f"{name}_p99"] = float(np.percentile(arr, 99))
        out["input_tokens"] = int(inp.sum())
        out["output_tokens"] = int(outp.sum())
        out["prompt_blocks"] = sum(len(r.block_ids) for r in reqs)
        out["sessions"] = len({r.session_id for r in reqs if r.session_id >= 0})
        out["prefix_reuse_ratio"] = prefix_reuse_ratio(reqs)
        return out


def prefix_reuse_ratio(requests: Iterable[Request]) -> float:
    """Fraction of prompt blocks an infinite prefix cache would hit, counted in blocks.

    Block k of a request is a hit iff an earlier request (in arrival order) had the same first
    k+1 ids, i.e. the chain ``block_ids[:k+1]`` was seen before; within one request the hits are
    therefore a prefix. Requests without ``block_ids`` add nothing. On the Mooncake conversation
    trace this gives 0.3664, and so does the looser "this id appeared earlier anywhere" count:
    the trace's ids are content hashes of whole prefixes, so the two coincide there.
    """
    nodes, _ = prefix_node_stream(requests)
    # a node is numbered when first seen: every later access of it is a hit
    return (len(nodes) - len(np.unique(nodes))) / len(nodes) if len(nodes) else 0.0


def prefix_node_stream(requests: Iterable[Request]) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt block access in arrival order as a node of the prefix trie (its whole id
    chain: equal ids after different prefixes are different nodes, as in the KV cache), and
    the index of the request that made it. Nodes are numbered 1, 2, ... as first seen."""
    # A trie of (parent node, block id) -> node; one dict lookup per block, no tuple prefixes.
    trie: dict[tuple[int, int], int] = {}
    nodes: list[int] = []
    owner: list[int] = []
    for i, r in enumerate(requests):
        node = 0
        for b in r.block_ids:
            key = (node, b)
            nxt = trie.get(key)
            if nxt is None:
                nxt = len(trie) + 1
                trie[key] = nxt
            node = nxt
            nodes.append(node)
        owner.extend([i] * len(r.block_ids))
    return np.asarray(nodes, np.int64), np.asarray(owner, np.int64)


# arrival, in, out, ids, session, turn[, think_s]
_Row = (
    tuple[float, int, int, tuple[int, ...], int, int]
    | tuple[float, int, int, tuple[int, ...], int, int, float]
)


def _build(rows: list[_Row], block_tokens: int, source: str, skipped: int = 0) -> Workload:
    rows = sorted(rows, key=lambda r: r[0])  # stable: ties keep their original order
    reqs = tuple(Request(i, *row) for i, row in enumerate(rows))
    return Workload(reqs, block_tokens, source, skipped)


def build_workload(
    requests: Iterable[Request], block_tokens: int, source: str, skipped_lines: int = 0
) -> Workload:
    """A Workload from requests in any order: sorted by arrival (stably), ids renumbered."""
    _check_block_tokens(block_tokens)
    rows = [
        (r.arrival_s, r.input_len, r.output_len, r.block_ids, r.session_id, r.turn, r.think_s)
        for r in requests
    ]
    return _build(rows, block_tokens, source, skipped_lines)


def select(
    workload: Workload,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    limit: int | None = None,
    rate_scale: float = 1.0,
) -> Workload:
    """Window ``[start_s, end_s)`` (relative to the first arrival), then the first ``limit``
    requests, then inter-arrival times divided by ``rate_scale``; arrivals re-based to 0."""
    src = workload.source
    for name, v in (("start_s", start_s), ("end_s", end_s)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise WorkloadError(f"{src}: {name} must be a finite number of seconds, got {v!r}")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise WorkloadError(f"{src}: end_s must be > start_s={start_s!r}, got {end_s!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise WorkloadError(f"{src}: limit must be an integer >= 1, got {limit!r}")
    if (
        isinstance(rate_scale, bool)
        or not isinstance(rate_scale, (int, float))
        or not (math.isfinite(rate_scale) and rate_scale > 0)
    ):
        raise WorkloadError(f"{src}: rate_scale must be a finite number > 0, got {rate_scale!r}")
    reqs = workload.requests
    if not reqs:
        raise WorkloadError(f"{src}: the workload has no requests")
    t0 = reqs[0].arrival_s
    lo = -math.inf if start_s is None else start_s
    hi = math.inf if end_s is None else end_s
    keep = [r for r in reqs if lo <= r.arrival_s - t0 < hi]
    if limit is not None:
        keep = keep[:limit]
    if not keep:
        raise WorkloadError(
            f"{src}: the window [{start_s}, {end_s}) s selects no requests "
            f"(trace spans {reqs[-1].arrival_s - t0:.3f} s)"
        )
    base = keep[0].arrival_s
    check_span(src, [r.arrival_s - base for r in keep], rate_scale)
    out = tuple(
        Request(
            i,
            (r.arrival_s - base) / rate_scale,
            r.input_len,
            r.output_len,
            r.block_ids,
            r.session_id,
            r.turn,
            r.think_s,  # a person's think time does not scale with the arrival rate
        )
        for i, r in enumerate(keep)
    )
    return Workload(out, workload.block_tokens, workload.source, workload.skipped_lines)


def check_span(src: str, offsets_s: list[float], rate_scale: float) -> None:
    """Arrivals ``offsets_s`` (from the first) divided by ``rate_scale`` stay within
    ``MAX_SPAN_S``; else one line saying which option or request is to blame."""
    span = offsets_s[-1] / rate_scale
    if span <= MAX_SPAN_S:
        return
    if offsets_s[-1] <= MAX_SPAN_S:  # the trace is fine; the scaling stretches it too far
        raise WorkloadError(
            f"{src}: field 'rate_scale' must be >= {offsets_s[-1] / MAX_SPAN_S:.3g} for this "
            f"trace (its {offsets_s[-1]:.6g} s of arrivals would span {span:.6g} s, more than "
            f"the simulator's clock spans, {MAX_SPAN_S:g} s), got {rate_scale!r}"
        )
    i = next(i for i, x in enumerate(offsets_s) if not x <= MAX_SPAN_S)
    raise WorkloadError(
        f"{src}: request {i} (in arrival order) arrives {offsets_s[i]:.6g} s after the first, "
        f"more than the simulator's clock spans ({MAX_SPAN_S:g} s): a timestamp far from the others?"
    )


# ------------------------------------------------------------------------------------------------
# field validation (shared by the readers)


def _show(value: Any, width: int = 80) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _get(rec: dict, key: str, where: str) -> Any:
    v = rec.get(key, _MISSING)
    if v is _MISSING:
        raise WorkloadError(f"{where}: field '{key}': missing, got fields {_show(list(rec))}")
    return v


def _int_value(v: Any, key: str, where: str, minimum: int, text: bool) -> int:
    iv: int | None = None
    if text and isinstance(v, str):
        s = v.strip()
        try:
            iv = int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                iv = int(f)
    elif type(v) is int:
        iv = v
    elif type(v) is float and math.isfinite(v) and v.is_integer():
        iv = int(v)
    if iv is None:
        raise WorkloadError(f"{where}: field '{key}': must be an integer, got {_show(v)}")
    if iv < minimum:
        raise WorkloadError(f"{where}: field '{key}': must be >= {minimum}, got {_show(v)}")
    if iv >= _INT_LIMIT:
        raise WorkloadError(f"{where}: field '{key}': must be < 2**62, got {_show(v)}")
    return iv


def _float_value(v: Any, key: str, where: str, text: bool) -> float:
    fv: float | None = None
    if text and isinstance(v, str):
        try:
            fv = float(v.strip())
        except ValueError:
            fv = None
    elif type(v) in (int, float):
        try:
            fv = float(v)
        except OverflowError:  # an int too large for a float
            fv = math.inf
    if fv is None or not math.isfinite(fv):
        raise WorkloadError(f"{where}: field '{key}': must be a finite number, got {_show(v)}")
    if fv < 0:
        raise WorkloadError(f"{where}: field '{key}': must be >= 0, got {_show(v)}")
    return fv


def _id_list(v: Any, key: str, where: str) -> tuple[int, ...]:
    if type(v) is not list:
        raise WorkloadError(f"{where}: field '{key}': must be a list of integers, got {_show(v)}")
    if not all(type(x) is int for x in v):
        i, bad = next((i, x) for i, x in enumerate(v) if type(x) is not int)
        raise WorkloadError(
            f"{where}: field '{key}': element {i} must be an integer, got {_show(bad)}"
        )
    if v and (min(v) < _ID_MIN or max(v) > _ID_MAX):
        bad = next(x for x in v if not _ID_MIN <= x <= _ID_MAX)
        raise WorkloadError(f"{where}: field '{key}': ids must fit in int64, got {_show(bad)}")
    return tuple(v)


def _check_block_tokens(block_tokens: Any) -> int:
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise WorkloadError(f"block_tokens must be an integer >= 1, got {block_tokens!r}")
    return block_tokens


def _read_bytes(path: str | Path) -> tuple[Path, bytes]:
    p = Path(path)
    return p, files.read_bytes(p, "trace file", WorkloadError)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` hook: an object naming a key twice is ambiguous, so it is an error."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _nonempty(rows: list, path: Path, skipped: int) -> None:
    if not rows:
        why = f" ({skipped} bad lines skipped)" if skipped else ""
        raise WorkloadError(f"{path}: no requests{why}")


# ------------------------------------------------------------------------------------------------
# JSONL


def json_line(raw: bytes, where: str, error: type[ValueError] = WorkloadError) -> Any:
    """One line of a JSON-lines file, strictly: invalid JSON (bad UTF-8, nested too deeply
    included) or a key given twice is a one-line ``error`` naming ``where``."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, deep nesting
        what = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise error(f"{where}: invalid JSON ({what}), got {_show(raw)}") from None
    except _DuplicateKey as e:
        raise error(f"{where}: field '{e.key}': given twice") from None


def _read_jsonl_rows(
    path: Path, data: bytes, parse: Callable[[dict, str], Any], skip_bad_lines: bool
) -> tuple[list, int]:
    rows = []
    skipped = 0
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}: line {n}"
        try:
            obj = json_line(raw, where)
            if not isinstance(obj, dict):
                raise WorkloadError(f"{where}: expected a JSON object, got {_show(obj)}")
            rows.append(parse(obj, where))
        except WorkloadError:
            if not skip_bad_lines:
                raise
            skipped += 1
    return rows, skipped


def _mooncake_row(obj: dict, where: str) -> _Row:
    ts = _float_value(_get(obj, "timestamp", where), "timestamp", where, False)
    inp = _int_value(_get(obj, "input_length", where), "input_length", where, 1, False)
    out = _int_value(_get(obj, "output_length", where), "output_length", where, 1, False)
    ids = _id_list(_get(obj, "hash_ids", where), "hash_ids", where)
    need = -(-inp // MOONCAKE_BLOCK_TOKENS)
    if len(ids) != need:
        raise WorkloadError(
            f"{where}: field 'hash_ids': must have ceil(input_length/512) = {need} ids, "
            f"got {len(ids)}"
        )
    return (ts / 1000.0, inp, out, ids, -1, 0)


def read_mooncake(path: str | Path, skip_bad_lines: bool = False) -> Workload:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``.

    The public conversation trace arrives in bursts: its 12,031 requests share 1,180 distinct
    timestamps exactly 3 s apart (~10 per burst), and every prompt starts with block id 0.
    Use ``load_trace(..., rate_scale=...)`` to change the load; the bursts are kept.
    """
    p, data = _read_bytes(path)
    rows, skipped = _read_jsonl_rows(p, data, _mooncake_row, skip_bad_lines)
    _nonempty(rows, p, skipped)
    return _build(rows, MOONCAKE_BLOCK_TOKENS, f"mooncake:{p}", skipped)


def _generic_row(rec: dict, where: str, block_tokens: int, text: bool) -> _Row:
    a = rec.get("arrival_s", None)
    t = rec.get("timestamp_ms", None)
    if a is not None and t is not None:
        raise WorkloadError(
            f"{where}: field 'arrival_s': give arrival_s or timestamp_ms, not both, "
            f"got {_show(a)} and {_show(t)}"
        )
    if a is not None:
        arrival = _float_value(a, "arrival_s", where, text)
    elif t is not None:
        arrival = _float_value(t, "timestamp_ms", where, text) / 1000.0
    else:
        raise WorkloadError(
            f"{where}: field 'arrival_s': missing (nor timestamp_ms), got fields {_show(list(rec))}"
        )
    inp = _int_value(_get(rec, "input_len", where), "input_len", where, 1, text)
    out = _int_value(_get(rec, "output_len", where), "output_len", where, 1, text)
    ids: tuple[int, ...] = ()
    raw_ids = rec.get("block_ids", None)
    if raw_ids is not None:
        if text:
            try:
                raw_ids = json.loads(raw_ids)
            except (ValueError, RecursionError):
                raise WorkloadError(
                    f"{where}: field 'block_ids': must be a JSON list of integers, "
                    f"got {_show(raw_ids)}"
                ) from None
        ids = _id_list(raw_ids, "block_ids", where)
        need = -(-inp // block_tokens)
        if ids and len(ids) != need:
            raise WorkloadError(
                f"{where}: field 'block_ids': must have ceil(input_len/{block_tokens}) = {need} "
                f"ids, got {len(ids)}"
            )
    sess = rec.get("session_id", None)
    session_id = -1 if sess is None else _int_value(sess, "session_id", where, -1, text)
    tr = rec.get("turn", None)
    turn = 0 if tr is None else _int_value(tr, "turn", where, 0, text)
    return (arrival, inp, out, ids, session_id, turn)


def read_jsonl(path: str | Path, block_tokens: int = 512, skip_bad_lines: bool = False) -> Workload:
    """The generic JSONL format (module docstring): one JSON object per line."""
    bt = _check_block_tokens(block_tokens)
    p, data = _read_bytes(path)

    def parse(obj: dict, where: str) -> _Row:
        return _generic_row(obj, where, bt, text=False)

    rows, skipped = _read_jsonl_rows(p, data, parse, skip_bad_lines)
    _nonempty(rows, p, skipped)
    return _build(rows, bt, f"jsonl:{p}", skipped)


def write_jsonl(workload: Workload, path: str | Path) -> None:
    """Write the generic JSONL format; ``read_jsonl(path, workload.block_tokens)`` reads it back
    to the same requests (floats are written with ``repr`` precision)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in workload.requests:
            rec = {
                "arrival_s": r.arrival_s,
                "input_len": r.input_len,
                "output_len": r.output_len,
                "block_ids": list(r.block_ids),
                "session_id": r.session_id,
                "turn": r.turn,
            }
            f.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------------
# CSV


def _read_csv_rows(
    path: Path,
    data: bytes,
    check_header: Callable[[list[str], str], None],
    parse: Callable[[dict, str], Any],
    skip_bad_lines: bool,
) -> tuple[list, int]:
    """Rows of a CSV with a header line; line numbers are physical lines of the file."""
    text = data.decode("utf-8-sig", errors="replace")  # bad bytes become U+FFFD, then bad values
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list = []
    skipped = 0
    end = 0  # physical line where the previous record ended
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = max(reader.line_num, start)
            err = WorkloadError(f"{path}: line {start}: malformed CSV ({e})")
            if header is None or not skip_bad_lines:
                raise err from None
            skipped += 1
            continue
        end = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        where = f"{path}: line {start}"
        if header is None:
            header = [c.strip() for c in cells]
            dup = next((c for i, c in enumerate(header) if c and c in header[:i]), None)
            if dup is not None:
                raise WorkloadError(f"{where}: field '{dup}': column given twice")
            check_header(header, where)
            continue
        try:
            extra = cells[len(header) :]
            if any(c.strip() for c in extra):
                raise WorkloadError(
                    f"{where}: expected {len(header)} fields as in the header, "
                    f"got {len(cells)}: {_show(cells)}"
                )
            rec = {k: v for k, v in zip(header, cells, strict=False) if v.strip()}
            rows.append(parse(rec, where))
        except WorkloadError:
            if not skip_bad_lines:
                raise
            skipped += 1
    if header is None:
        raise WorkloadError(f"{path}: empty file, expected a CSV header")
    return rows, skipped


def _require_columns(*groups: tuple[str, ...]) -> Callable[[list[str], str], None]:
    def check(header: list[str], where: str) -> None:
        for group in groups:
            if not any(c in header for c in group):
                raise WorkloadError(
                    f"{where}: field '{group[0]}': missing column"
                    f"{' (or ' + ', '.join(group[1:]) + ')' if len(group) > 1 else ''}, "
                    f"got header {_show(header)}"
                )

    return check


_WALLCLOCK = re.compile(
    r"\s*(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*"
    r"(Z|[+-]\d{2}:?\d{2})?\s*$",
    re.ASCII,
)


def _wallclock_ns(v: str, key: str, where: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.fffffff][Z|+hh:mm]`` as integer ns (digits past 9 are dropped)."""
    m = _WALLCLOCK.match(v)
    bad = WorkloadError(
        f"{where}: field '{key}': must be a time like 2023-11-16 18:15:46.6805900, got {_show(v)}"
    )
    if m is None:
        raise bad
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    h, minute, s = int(hh), int(mi), int(ss)
    try:
        days = date(int(y), int(mo), int(d)).toordinal()
    except ValueError:
        raise bad from None
    if h > 23 or minute > 59 or s > 59:
        raise bad
    offset_s = 0
    if tz and tz != "Z":
        digits = tz[1:].replace(":", "")
        offset_s = (int(digits[:2]) * 3600 + int(digits[2:]) * 60) * (1 if tz[0] == "+" else -1)
    secs = days * 86400 + h * 3600 + minute * 60 + s - offset_s
    return secs * 1_000_000_000 + int((frac or "")[:9].ljust(9, "0"))


def _azure_row(rec: dict, where: str) -> tuple[int, int, int]:
    t_ns = _wallclock_ns(_get(rec, "TIMESTAMP", where), "TIMESTAMP", where)
    inp = _int_value(_get(rec, "ContextTokens", where), "ContextTokens", where, 1, True)
    out = _int_value(_get(rec, "GeneratedTokens", where), "GeneratedTokens", where, 0, True)
    return (t_ns, inp, max(1, out))


def read_azure(path: str | Path, skip_bad_lines: bool = False, block_tokens: int = 512) -> Workload:
    """Azure LLM inference trace CSV: ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``.

    Arrivals are seconds after the earliest timestamp; ``GeneratedTokens == 0`` becomes 1.
    """
    bt = _check_block_tokens(block_tokens)
    p, data = _read_bytes(path)
    check = _require_columns(("TIMESTAMP",), ("ContextTokens",), ("GeneratedTokens",))
    raw, skipped = _read_csv_rows(p, data, check, _azure_row, skip_bad_lines)
    _nonempty(raw, p, skipped)
    t0 = min(r[0] for r in raw)
    rows = [((t - t0) / 1e9, inp, out, (), -1, 0) for t, inp, out in raw]
    return _build(rows, bt, f"azure:{p}", skipped)


_GENERIC_FIELDS = ("arrival_s", "input_len", "output_len", "block_ids", "session_id", "turn")


def read_csv(path: str | Path, block_tokens: int = 512, skip_bad_lines: bool = False) -> Workload:
    """The generic CSV format (module docstring): a header line, then one request per row."""
    bt = _check_block_tokens(block_tokens)
    p, data = _read_bytes(path)
    check = _require_columns(("arrival_s", "timestamp_ms"), ("input_len",), ("output_len",))

    def parse(rec: dict, where: str) -> _Row:
        return _generic_row(rec, where, bt, text=True)

    rows, skipped = _read_csv_rows(p, data, check, parse, skip_bad_lines)
    _nonempty(rows, p, skipped)
    return _build(rows, bt, f"csv:{p}", skipped)


def write_csv(workload: Workload, path: str | Path) -> None:
    """Write the generic CSV format; ``read_csv`` reads it back to the same requests."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(_GENERIC_FIELDS)
        for r in workload.requests:
            ids = json.dumps(list(r.block_ids)) if r.block_ids else ""
            w.writerow((repr(r.arrival_s), r.input_len, r.output_len, ids, r.session_id, r.turn))


# ------------------------------------------------------------------------------------------------
# block ids


def _h63(*parts: object) -> int:
    """A stable 63-bit id from ints and strings (same value in every process and platform)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _prompt_ids(
    stream: list[int], length: int, block_tokens: int, fresh: Callable[[], int]
) -> tuple[int, ...]:
    """Ids of a prompt that is the first ``length`` tokens of a session's token stream.

    Full blocks take the stream's ids (extending the stream with fresh ids), so every later turn
    whose prompt covers the same block shares it; a partial last block has content no other
    prompt has, so it gets a fresh id of its own.
    """
    full, rem = divmod(length, block_tokens)
    while len(stream) < full:
        stream.append(fresh())
    ids = stream[:full]
    if rem:
        ids.append(fresh())
    return tuple(ids)


def _fresh_counter(*salt: object) -> Callable[[], int]:
    # Consecutive ids from a salted random start: unique within a workload, distinct per seed.
    return itertools.count(_h63(*salt) >> 1).__next__


# ------------------------------------------------------------------------------------------------
# ShareGPT

_HUMAN = frozenset({"human", "user"})
_GPT = frozenset({"gpt", "chatgpt", "bard", "assistant", "model"})
_SYSTEM = frozenset({"system"})


def _sharegpt_messages(conv: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(conv, dict):
        raise WorkloadError(f"{where}: expected an object with 'conversations', got {_show(conv)}")
    key = "conversations" if "conversations" in conv else "messages"
    msgs = conv.get(key, _MISSING)
    if msgs is _MISSING:
        raise WorkloadError(
            f"{where}: field 'conversations': missing, got fields {_show(list(conv))}"
        )
    if not isinstance(msgs, list):
        raise WorkloadError(
            f"{where}: field '{key}': must be a list of messages, got {_show(msgs)}"
        )
    out = []
    for j, m in enumerate(msgs):
        w = f"{where}: message {j}"
        if not isinstance(m, dict):
            raise WorkloadError(f"{w}: expected an object with 'from' and 'value', got {_show(m)}")
        rk, vk = ("from", "value") if "from" in m else ("role", "content")
        role, text = m.get(rk, _MISSING), m.get(vk, _MISSING)
        if role is _MISSING or text is _MISSING:
            missing = rk if role is _MISSING else vk
            raise WorkloadError(f"{w}: field '{missing}': missing, got fields {_show(list(m))}")
        if not isinstance(role, str) or role.lower() not in _HUMAN | _GPT | _SYSTEM:
            raise WorkloadError(
                f"{w}: field '{rk}': must be human, gpt or system, got {_show(role)}"
            )
        if not isinstance(text, str):
            raise WorkloadError(f"{w}: field '{vk}': must be text, got {_show(text)}")
        r = role.lower()
        out.append(("human" if r in _HUMAN else "gpt" if r in _GPT else "system", text))
    return out


def read_sharegpt(
    path: str | Path,
    block_tokens: int = 64,
    rate: float = 1.0,
    seed: int = 0,
    chars_per_token: float = 4.0,
    think_s_mean: float = 5.0,
    skip_bad_lines: bool = False,
) -> Workload:
    """ShareGPT-style JSON: ``[{"id": ..., "conversations": [{"from", "value"}, ...]}, ...]``.

    ``role``/``content`` messages (OpenAI style, under ``messages``) are accepted too; roles
    human/user, gpt/chatgpt/bard/assistant/model and system.

    - Each human message directly followed by a reply becomes a request: its prompt is the whole
      conversation so far (system, earlier turns, this message), its output the reply.
      Other messages only add to the context.
    - Tokens are approximated as ``ceil(len(text) / chars_per_token)`` per message (no tokenizer
      dependency); a turn's prompt is the previous prompt + previous output + new messages.
    - Conversations with at least one request start as a Poisson process at ``rate``
      conversations/s (seeded); a later turn arrives after the previous turn's arrival plus its
      output at ``GEN_S_PER_TOKEN`` s/token plus an exponential think time of mean
      ``think_s_mean``.
    - Block ids: the conversation is one token stream; a full block of a prompt gets the stable
      id ``blake2b(conversation index, block index)``, shared by every turn that contains it;
      a partial last block gets an id unique to that turn.
    - ``session_id`` is the conversation's position in the file, ``turn`` the request's index
      within it. With ``skip_bad_lines``, bad conversations are skipped and counted.
    """
    bt = _check_block_tokens(block_tokens)
    for name, v in (("rate", rate), ("chars_per_token", chars_per_token)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise WorkloadError(f"{path}: {name} must be a finite number > 0, got {v!r}")
    if not (isinstance(think_s_mean, (int, float)) and math.isfinite(think_s_mean)) or (
        think_s_mean < 0
    ):
        raise WorkloadError(f"{path}: think_s_mean must be >= 0, got {think_s_mean!r}")
    p, data = _read_bytes(path)
    try:
        convs = json.loads(files.decode(data, p, WorkloadError), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{p}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        if isinstance(e, WorkloadError):
            raise
        raise WorkloadError(f"{p}: invalid JSON ({type(e).__name__})") from None
    except _DuplicateKey as e:
        raise WorkloadError(f"{p}: field '{e.key}': given twice in one object") from None
    if not isinstance(convs, list):
        raise WorkloadError(f"{p}: expected a JSON list of conversations, got {_show(convs)}")

    def tokens(text: str) -> int:
        return math.ceil(len(text) / chars_per_token)

    # (conversation index, [(input_len, output_len)]) for conversations with requests
    turns_of: list[tuple[int, list[tuple[int, int]]]] = []
    skipped = 0
    for i, conv in enumerate(convs):
        try:
            msgs = _sharegpt_messages(conv, f"{p}: conversation {i}")
        except WorkloadError:
            if not skip_bad_lines:
                raise
            skipped += 1
            continue
        ctx = 0
        turns: list[tuple[int, int]] = []
        j = 0
        while j < len(msgs):
            role, text = msgs[j]
            if role == "human" and j + 1 < len(msgs) and msgs[j + 1][0] == "gpt":
                inp = max(1, ctx + tokens(text))
                out = max(1, tokens(msgs[j + 1][1]))
                turns.append((inp, out))
                ctx = inp + out
                j += 2
            else:
                ctx += tokens(text)
                j += 1
        if turns:
            turns_of.append((i, turns))
    if not turns_of:
        why = f" ({skipped} bad conversations skipped)" if skipped else ""
        raise WorkloadError(f"{p}: no human message followed by a reply{why}")

    rng = np.random.default_rng(seed)
    starts = arrival_times(len(turns_of), rate, "poisson", rng=rng).tolist()
    n_later = sum(len(t) - 1 for _, t in turns_of)
    thinks = rng.exponential(think_s_mean, n_later) if think_s_mean > 0 else np.zeros(n_later)
    think_iter = iter(thinks.tolist())
    rows: list[_Row] = []
    for (ci, turns), t in zip(turns_of, starts, strict=True):
        stream: list[int] = []
        for k, (inp, out) in enumerate(turns):
            think = next(think_iter) if k else 0.0
            if k:
                t += turns[k - 1][1] * GEN_S_PER_TOKEN + think
            full, rem = divmod(inp, bt)
            while len(stream) < full:
                stream.append(_h63("sharegpt", ci, len(stream)))
            ids = stream[:full]
            if rem:
                ids.append(_h63("sharegpt-partial", ci, k))
            # the drawn think time, which a closed-loop replay adds to the simulated reply
            rows.append((t, inp, out, tuple(ids), ci, k, think))
    return _build(rows, bt, f"sharegpt:{p}", skipped)


# ------------------------------------------------------------------------------------------------
# load by name

_READERS: dict[str, Callable[..., Workload]] = {
    "mooncake": read_mooncake,
    "azure": read_azure,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "sharegpt": read_sharegpt,
}
TRACE_FORMATS = tuple(sorted(_READERS))


def load_trace(
    path: str | Path,
    fmt: str,
    skip_bad_lines: bool = False,
    limit: int | None = None,
    rate_scale: float = 1.0,
    start_s: float | None = None,
    end_s: float | None = None,
    **reader_options: Any,
) -> Workload:
    """Read a trace of format ``fmt`` (one of ``TRACE_FORMATS``), then ``select`` it: window
    ``[start_s, end_s)`` relative to the first arrival, first ``limit`` requests, inter-arrival
    times divided by ``rate_scale``, first arrival at 0, ``request_id`` renumbered.

    ``reader_options`` go to the reader (e.g. ``block_tokens`` for jsonl/csv/sharegpt,
    ``rate`` and ``seed`` for sharegpt).
    """
    key = fmt.lower() if isinstance(fmt, str) else fmt
    reader = _READERS.get(key)
    if reader is None:
        raise WorkloadError(
            f"{path}: unknown trace format {fmt!r} (known: {', '.join(TRACE_FORMATS)})"
        )
    accepted = set(inspect.signature(reader).parameters) - {"path", "skip_bad_lines"}
    unknown = sorted(set(reader_options) - accepted)
    if unknown:
        raise WorkloadError(
            f"{path}: format '{key}' takes no option {unknown[0]!r} "
            f"(options: {', '.join(sorted(accepted)) or 'none'})"
        )
    w = reader(path, skip_bad_lines=skip_bad_lines, **reader_options)
    return select(w, start_s=start_s, end_s=end_s, limit=limit, rate_scale=rate_scale)


# ------------------------------------------------------------------------------------------------
# synthetic generators

_PROCESSES = ("poisson", "gamma", "constant")


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)


def arrival_times(
    n: int,
    rate: float,
    process: str = "poisson",
    cv: float = 1.0,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """``[n]`` float64 arrival times in seconds, the first at 0, mean gap ``1 / rate``.

    ``poisson``: exponential gaps; ``gamma``: gamma gaps of shape ``1 / cv**2`` (coefficient of
    variation ``cv``: > 1 bursty, < 1 regular, 1 = Poisson); ``constant``: equal gaps.
    ``rng`` is a Generator or a seed.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0 (per second), got {rate!r}")
    if process not in _PROCESSES:
        raise ValueError(f"arrival process must be one of {', '.join(_PROCESSES)}, got {process!r}")
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
    g = _as_rng(rng)
    m = max(int(n) - 1, 0)
    if process == "poisson":
        gaps = g.exponential(1.0 / rate, m)
    elif process == "gamma":
        shape = 1.0 / cv**2
        gaps = g.gamma(shape, 1.0 / (rate * shape), m)
    else:
        gaps = np.full(m, 1.0 / rate)
    return np.concatenate([np.zeros(min(int(n), 1)), np.cumsum(gaps)])


_KINDS = ("fixed", "uniform", "lognormal", "empirical")


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts, sampled as int64 and clipped to ``[clip_min, clip_max]``.

    - ``fixed``: always ``value``;
    - ``uniform``: integers in ``[low, high]`` inclusive;
    - ``lognormal``: ``mean`` is the mean length in tokens and ``sigma`` the standard deviation
      of its log (so ``mu = log(mean) - sigma**2 / 2``), rounded to integers;
    - ``empirical``: drawn with replacement from observed lengths ``values``.

    Clipping (and rounding) moves the realised mean a little away from ``mean``.
    """

    kind: str = "fixed"
    value: int = 1
    low: int = 1
    high: int = 1
    mean: float = 1.0
    sigma: float = 0.0
    values: tuple[int, ...] = ()
    clip_min: int = 1
    clip_max: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"LengthDist kind must be one of {', '.join(_KINDS)}, got {self.kind!r}"
            )
        object.__setattr__(self, "values", tuple(int(v) for v in self.values))
        if self.clip_min < 0 or (self.clip_max is not None and self.clip_max < self.clip_min):
            raise ValueError(
                f"LengthDist needs 0 <= clip_min <= clip_max, got {self.clip_min}, {self.clip_max}"
            )
        if self.kind == "fixed" and self.value < 0:
            raise ValueError(f"LengthDist fixed value must be >= 0, got {self.value}")
        if self.kind == "uniform" and not 0 <= self.low <= self.high:
            raise ValueError(
                f"LengthDist uniform needs 0 <= low <= high, got {self.low}, {self.high}"
            )
        if self.kind == "lognormal" and not (
            math.isfinite(self.mean)
            and self.mean > 0
            and math.isfinite(self.sigma)
            and self.sigma >= 0
        ):
            raise ValueError(
                f"LengthDist lognormal needs mean > 0 and sigma >= 0, got {self.mean}, {self.sigma}"
            )
        if self.kind == "empirical" and (not self.values or min(self.values) < 0):
            raise ValueError(
                f"LengthDist empirical needs non-negative values, got {self.values[:5]}"
            )

    @staticmethod
    def fixed(value: int, clip_min: int = 1, clip_max: int | None = None) -> LengthDist:
        return LengthDist("fixed", value=int(value), clip_min=clip_min, clip_max=clip_max)

    @staticmethod
    def uniform(low: int, high: int, clip_min: int = 1, clip_max: int | None = None) -> LengthDist:
        return LengthDist(
            "uniform", low=int(low), high=int(high), clip_min=clip_min, clip_max=clip_max
        )

    @staticmethod
    def lognormal(
        mean: float, sigma: float, clip_min: int = 1, clip_max: int | None = None
    ) -> LengthDist:
        return LengthDist(
            "lognormal", mean=float(mean), sigma=float(sigma), clip_min=clip_min, clip_max=clip_max
        )

    @staticmethod
    def empirical(
        values: Iterable[int], clip_min: int = 1, clip_max: int | None = None
    ) -> LengthDist:
        return LengthDist("empirical", values=tuple(values), clip_min=clip_min, clip_max=clip_max)

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``[n]`` int64 lengths."""
        g = _as_rng(rng)
        if self.kind == "fixed":
            x = np.full(n, self.value, np.int64)
        elif self.kind == "uniform":
            x = g.integers(self.low, self.high + 1, n, dtype=np.int64)
        elif self.kind == "lognormal":
            mu = math.log(self.mean) - self.sigma**2 / 2
            x = np.rint(g.lognormal(mu, self.sigma, n)).astype(np.int64)
        else:
            x = g.choice(np.asarray(self.values, np.int64), n)
        hi = self.clip_max if self.clip_max is not None else np.iinfo(np.int64).max
        return np.clip(x, self.clip_min, hi).astype(np.int64)


DEFAULT_INPUT = LengthDist.lognormal(1024, 1.0, clip_max=32768)
DEFAULT_OUTPUT = LengthDist.lognormal(256, 0.8, clip_max=4096)


THINK_KINDS = ("fixed", "exponential", "lognormal", "empirical")


@dataclass(frozen=True)
class ThinkTime:
    """Seconds a client waits between a reply and its next turn (a person thinking, a tool
    running): ``fixed`` at ``mean_s``, ``exponential`` of mean ``mean_s``, ``lognormal`` of
    mean ``mean_s`` and log-space ``sigma``, or ``empirical`` (drawn from ``values``, seconds).
    Seeded draws through ``sample``."""

    kind: str = "exponential"
    mean_s: float = 10.0
    sigma: float = 1.0
    values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in THINK_KINDS:
            raise WorkloadError(
                f"think time: unknown distribution {self.kind!r} (choose from "
                f"{', '.join(THINK_KINDS)})"
            )
        if self.kind == "empirical":
            vals = np.asarray(self.values, dtype=float)
            if vals.size == 0 or not np.all(np.isfinite(vals)) or vals.min() < 0:
                raise WorkloadError(
                    "think time: empirical values must be finite seconds >= 0, at least one"
                )
        elif not (math.isfinite(self.mean_s) and self.mean_s >= 0):
            raise WorkloadError(f"think time: mean must be >= 0 s, got {self.mean_s!r}")
        if self.kind == "lognormal" and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise WorkloadError(f"think time: lognormal sigma must be > 0, got {self.sigma!r}")

    @staticmethod
    def parse(text: str) -> ThinkTime:
        """``fixed:S``, ``exponential:MEAN``, ``lognormal:MEAN[:SIGMA]`` or ``empirical:FILE``
        (one number of seconds per line, or a CSV whose first column is)."""
        kind, _, rest = str(text).partition(":")
        kind = kind.strip().lower()
        if kind == "empirical":
            path = Path(rest)
            try:
                lines = path.read_text().split()
            except OSError as e:
                raise WorkloadError(f"{path}: cannot read think times ({e.strerror})") from None
            vals = []
            for i, tok in enumerate(lines, 1):
                cell = tok.split(",")[0]
                try:
                    vals.append(float(cell))
                except ValueError:
                    if i == 1:
                        continue  # a header
                    raise WorkloadError(
                        f"{path}: line {i}: think time must be a number of seconds, got {cell!r}"
                    ) from None
            return ThinkTime("empirical", values=tuple(vals))
        parts = [p for p in rest.split(":") if p != ""]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise WorkloadError(
                f"think time {text!r}: expected fixed:S, exponential:MEAN, "
                "lognormal:MEAN[:SIGMA] or empirical:FILE"
            ) from None
        if kind not in THINK_KINDS or not nums or len(nums) > (2 if kind == "lognormal" else 1):
            raise WorkloadError(
                f"think time {text!r}: expected fixed:S, exponential:MEAN, "
                "lognormal:MEAN[:SIGMA] or empirical:FILE"
            )
        return ThinkTime(kind, nums[0], nums[1] if len(nums) > 1 else 1.0)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n <= 0:
            return np.zeros(0)
        if self.kind == "fixed":
            return np.full(n, float(self.mean_s))
        if self.kind == "exponential":
            return rng.exponential(self.mean_s, n) if self.mean_s > 0 else np.zeros(n)
        if self.kind == "lognormal":
            # mean of a lognormal is exp(mu + sigma^2 / 2)
            if self.mean_s == 0:
                return np.zeros(n)
            mu = math.log(self.mean_s) - 0.5 * self.sigma**2
            return rng.lognormal(mu, self.sigma, n)
        return rng.choice(np.asarray(self.values, dtype=float), n)


def _check_gen(block_tokens: int, system_prompt_len: int) -> None:
    _check_block_tokens(block_tokens)
    if (
        isinstance(system_prompt_len, bool)
        or not isinstance(system_prompt_len, int)
        or (system_prompt_len < 0)
    ):
        raise ValueError(f"system_prompt_len must be an integer >= 0, got {system_prompt_len!r}")


def synthetic(
    n: int,
    rate: float,
    input: LengthDist = DEFAULT_INPUT,
    output: LengthDist = DEFAULT_OUTPUT,
    arrival: str = "poisson",
    cv: float = 1.0,
    system_prompt_len: int = 0,
    block_tokens: int = 64,
    seed: int = 0,
) -> Workload:
    """``n`` independent requests at ``rate``/s. A prompt is ``system_prompt_len`` tokens of a
    system prompt shared by every request (same block ids) followed by ``input`` tokens of its
    own, so ``input_len = system_prompt_len + sample``; all other blocks are unique."""
    _check_gen(block_tokens, system_prompt_len)
    rng = np.random.default_rng(seed)
    t = arrival_times(n, rate, arrival, cv, rng).tolist()
    user = input.sample(n, rng).tolist()
    outs = output.sample(n, rng).tolist()
    fresh = _fresh_counter("synthetic", seed)
    sys_ids = [fresh() for _ in range(system_prompt_len // block_tokens)]
    rows: list[_Row] = []
    for i in range(n):
        length = max(1, system_prompt_len + user[i])
        ids = _prompt_ids(list(sys_ids), length, block_tokens, fresh)
        rows.append((t[i], length, max(1, outs[i]), ids, -1, 0))
    return _build(rows, block_tokens, f"synthetic:{arrival}")


def _sessions(
    kind: str,
    n_sessions: int,
    session_rate: float,
    turns: LengthDist,
    first_input: LengthDist,
    turn_input: LengthDist,
    output: LengthDist,
    think: ThinkTime,
    system_prompt_len: int,
    block_tokens: int,
    seed: int,
    max_context: int | None,
    arrival: str,
    cv: float,
) -> Workload:
    _check_gen(block_tokens, system_prompt_len)
    if max_context is not None and max_context < 1:
        raise ValueError(f"max_context must be >= 1 token, got {max_context!r}")
    rng = np.random.default_rng(seed)
    starts = arrival_times(n_sessions, session_rate, arrival, cv, rng).tolist()
    n_turns = turns.sample(n_sessions, rng)
    total = int(n_turns.sum())
    first = first_input.sample(n_sessions, rng).tolist()
    step = turn_input.sample(total, rng).tolist()
    outs = output.sample(total, rng).tolist()
    thinks = think.sample(total, rng).tolist()
    offsets = (np.cumsum(n_turns) - n_turns).tolist()
    fresh = _fresh_counter(kind, seed)
    sys_ids = [fresh() for _ in range(system_prompt_len // block_tokens)]
    cap = math.inf if max_context is None else max_context
    rows: list[_Row] = []
    for s in range(n_sessions):
        stream = list(sys_ids)
        ctx = system_prompt_len
        t = starts[s]
        prev_out = 0
        for k in range(int(n_turns[s])):
            j = offsets[s] + k
            length = max(1, ctx + (first[s] if k == 0 else step[j]))
            out = max(1, outs[j])
            if length + out > cap:
                break
            gap = thinks[j] if k else 0.0
            if k:
                t += prev_out * GEN_S_PER_TOKEN + gap
            ids = _prompt_ids(stream, length, block_tokens, fresh)
            rows.append((t, length, out, ids, s, k, gap))
            ctx = length + out
            prev_out = out
    return _build(rows, block_tokens, f"synthetic:{kind}")


def _think_of(mean_s: float) -> ThinkTime:
    if not (isinstance(mean_s, (int, float)) and math.isfinite(mean_s) and mean_s >= 0):
        raise ValueError(f"think/gap time mean must be >= 0 s, got {mean_s!r}")
    return ThinkTime("exponential", float(mean_s))


def chat_sessions(
    n_sessions: int,
    session_rate: float,
    turns: LengthDist = LengthDist.uniform(1, 9),
    first_input: LengthDist = LengthDist.lognormal(600, 0.8, clip_max=16384),
    turn_input: LengthDist = LengthDist.lognormal(150, 0.8, clip_max=8192),
    output: LengthDist = LengthDist.lognormal(250, 0.7, clip_max=4096),
    think_s_mean: float = 10.0,
    system_prompt_len: int = 0,
    block_tokens: int = 64,
    seed: int = 0,
    max_context: int | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    think: ThinkTime | None = None,
) -> Workload:
    """Multi-turn conversations; sessions start at ``session_rate``/s (``arrival`` process).

    Turn 0's prompt is the shared system prompt + ``first_input`` tokens; turn k's prompt is
    turn k-1's prompt + its output + ``turn_input`` new tokens. Turn k arrives
    ``output_len(k-1) * GEN_S_PER_TOKEN`` (a stand-in for generation time) plus an exponential
    think time of mean ``think_s_mean`` (or drawn from ``think``) after turn k-1's arrival:
    the open-loop schedule; each turn's ``think_s`` keeps the think time, which a closed-loop
    replay adds to the previous turn's simulated reply instead. Full blocks keep their ids
    from turn to turn (turn k's ids start with turn k-1's full blocks); new blocks and partial
    last blocks get fresh ids. A session ends early at the first turn whose
    ``input_len + output_len`` would exceed ``max_context`` (so a session may have no requests).
    """
    return _sessions(
        "chat",
        n_sessions,
        session_rate,
        turns,
        first_input,
        turn_input,
        output,
        think or _think_of(think_s_mean),
        system_prompt_len,
        block_tokens,
        seed,
        max_context,
        arrival,
        cv,
    )


# Agent sessions' defaults, from TraceLab (Zhu et al., "TraceLab: Characterizing Coding Agent
# Workloads for LLM Serving", arXiv 2606.30560, University of Washington, 2026; tables
# tab:session_internal_counts, tab:token_length_distribution and tab:timing_distribution of
# github.com/uw-syfi/TraceLab, 4,265 Claude Code and Codex sessions, 357,161 LLM calls,
# 432,510 tool calls): ~84 LLM calls per session (heavy-tailed), 1.2 tool calls per call
# (p90 2, p99 4), tokens appended per call p50 ~860, output tokens p50 ~250 / mean ~520, tool
# latency p50 0.3 s / mean 18 s (heavy-tailed), one call in ~9 started by the user after a
# human gap of p50 ~1.4 min. The shared prefix (system prompt + tool schema) is one Claude Code
# example's ~21K tokens (callanjfox/agentic-coding-analysis, docs/EXAMPLE_CONVERSATION.md):
# TraceLab does not publish it.
AGENT_CALLS = LengthDist.lognormal(84, 1.5, clip_max=2000)  # median ~27
AGENT_SHARED_PREFIX = 20480
AGENT_APPEND = LengthDist.lognormal(1909, 1.3, clip_max=131072)  # median 820
AGENT_OUTPUT = LengthDist.lognormal(523, 1.35, clip_max=32768)  # median 210
AGENT_TOOL_CALLS_P = 0.72  # tool calls per call: geometric, mean 1.39, P(> 1) = 0.28
AGENT_TOOL_TIME = ThinkTime("lognormal", 20.0, 2.9)  # median 0.30 s
AGENT_USER_SHARE = 0.106  # 8.9 of 83.7 calls per session start with a user message
AGENT_HUMAN_GAP = ThinkTime("lognormal", 216.0, 1.5)  # median 70 s


def agent_sessions(
    n_sessions: int,
    session_rate: float,
    calls: LengthDist = AGENT_CALLS,
    shared_prefix_len: int = AGENT_SHARED_PREFIX,
    step_input: LengthDist = AGENT_APPEND,
    output: LengthDist = AGENT_OUTPUT,
    gap_s_mean: float | None = None,
    block_tokens: int = 64,
    seed: int = 0,
    max_context: int | None = None,
    tool_calls_p: float = AGENT_TOOL_CALLS_P,
    tool_time: ThinkTime = AGENT_TOOL_TIME,
    user_share: float = AGENT_USER_SHARE,
    human_gap: ThinkTime = AGENT_HUMAN_GAP,
) -> Workload:
    """Agent sessions: many short calls on a long, growing context (defaults: TraceLab's
    coding-agent statistics, see AGENT_* above).

    Every session starts from the same ``shared_prefix_len``-token prefix (system prompt and
    tool schema, the same block ids in every session) and the user's task (``step_input``
    tokens). Each call answers with ``output`` tokens; unless it is the session's last, the
    answer asks for ``tool_calls_p``-geometric many tool calls run in parallel, each returning
    ``step_input`` tokens after ``tool_time``, and the next call is sent when the slowest has
    returned, on the context so far + the answer + every tool result. A share ``user_share``
    of later calls is a user's next message instead, after a ``human_gap``. ``think_s`` of a
    call is that wait (tool or human), added to the previous reply's end in a closed-loop
    replay; the open-loop arrival adds it to the previous arrival plus ``GEN_S_PER_TOKEN`` per
    output token, like chat turns. ``gap_s_mean`` (older API): every wait exponential of that
    mean, one tool per call. A session ends early where its context would pass
    ``max_context``."""
    _check_gen(block_tokens, shared_prefix_len)
    if not (0.0 < tool_calls_p <= 1.0):
        raise ValueError(f"tool_calls_p must be in (0, 1], got {tool_calls_p!r}")
    if not (0.0 <= user_share <= 1.0):
        raise ValueError(f"user_share must be in [0, 1], got {user_share!r}")
    if gap_s_mean is not None:
        tool_time, tool_calls_p, user_share = _think_of(gap_s_mean), 1.0, 0.0
    if max_context is not None and max_context < 1:
        raise ValueError(f"max_context must be >= 1 token, got {max_context!r}")
    rng = np.random.default_rng(seed)
    starts = arrival_times(n_sessions, session_rate, "poisson", 1.0, rng).tolist()
    n_calls = calls.sample(n_sessions, rng)
    total = int(n_calls.sum())
    task = step_input.sample(n_sessions, rng).tolist()
    outs = output.sample(total, rng).tolist()
    tools = rng.geometric(tool_calls_p, total).tolist()
    n_tools = int(sum(tools))
    results = step_input.sample(n_tools, rng).tolist()
    latency = tool_time.sample(n_tools, rng).tolist()
    user = (rng.random(total) < user_share).tolist()
    user_msg = step_input.sample(total, rng).tolist()
    gaps = human_gap.sample(total, rng).tolist()
    offsets = (np.cumsum(n_calls) - n_calls).tolist()
    fresh = _fresh_counter("agent", seed)
    prefix_ids = [fresh() for _ in range(shared_prefix_len // block_tokens)]
    cap = math.inf if max_context is None else max_context
    rows: list[_Row] = []
    ti = 0  # next tool draw
    for s in range(n_sessions):
        stream = list(prefix_ids)
        ctx = shared_prefix_len
        t = starts[s]
        append, wait, prev_out = task[s], 0.0, 0
        for k in range(int(n_calls[s])):
            j = offsets[s] + k
            length = max(1, ctx + append)
            out = max(1, outs[j])
            if length + out > cap:
                break
            if k:
                t += prev_out * GEN_S_PER_TOKEN + wait
            ids = _prompt_ids(stream, length, block_tokens, fresh)
            rows.append((t, length, out, ids, s, k, wait))
            ctx, prev_out = length + out, out
            if user[j]:  # the user's next message, after a while
                append, wait = user_msg[j], gaps[j]
            else:  # parallel tool calls: all their results, once the slowest returns
                n = tools[j]
                append = int(sum(results[ti : ti + n]))
                wait = max(latency[ti : ti + n])
                ti += n
    return _build(rows, block_tokens, "synthetic:agent")


def default_agent(seed: int = 0, tool_time: ThinkTime | None = None) -> Workload:
    """The built-in agent workload: 20 coding-agent sessions starting at 0.1 sessions/s, with
    TraceLab's statistics (``agent_sessions`` defaults; ``tool_time`` replaces its tool
    latencies), 64-token blocks, contexts capped at 131,072 tokens (Llama 3.1's window):
    ~500 calls."""
    w = agent_sessions(
        20, 0.1, seed=seed, max_context=131072, tool_time=tool_time or AGENT_TOOL_TIME
    )
    return Workload(w.requests, w.block_tokens, "synthetic:default_agent", 0)


def default_chat(seed: int = 0, think: ThinkTime | None = None) -> Workload:
    """The simulator's built-in workload: ~1000 requests of multi-turn chat.

    200 sessions at 2 sessions/s, 1-9 turns, a 256-token shared system prompt, first user input
    lognormal mean 600 tokens, later inputs mean 150, outputs mean 250, 64-token blocks.
    """
    w = chat_sessions(
        200,
        2.0,
        turns=LengthDist.uniform(1, 9),
        first_input=LengthDist.lognormal(600, 0.8, clip_max=16384),
        turn_input=LengthDist.lognormal(150, 0.8, clip_max=8192),
        output=LengthDist.lognormal(250, 0.7, clip_max=4096),
        think_s_mean=10.0,
        system_prompt_len=256,
        block_tokens=64,
        seed=seed,
        think=think,
    )
    return Workload(w.requests, w.block_tokens, "synthetic:default_chat", 0)


# The built-in default, as a function (a fresh, seeded workload per call).
DEFAULT_WORKLOAD = default_chat
