"""An engine's KV-cache event stream (vLLM, SGLang) read, replayed and compared with hisim's.

What the engines publish
------------------------
vLLM (0.34.0, ``vllm/distributed/kv_events.py``) publishes, once per scheduler step that changed
its prefix cache, a ``KVEventBatch(ts, events, data_parallel_rank)`` over ZMQ as msgpack
(``msgspec``). ``ts`` is ``time.time()`` (seconds since the epoch); ``events`` holds

- ``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys=None, group_idx=None, kv_cache_spec_kind=None, ...)``: blocks cached in
  ``medium``, a chain: the first block's parent is ``parent_block_hash`` (None at the root),
  each next block's parent the one before it. ``token_ids`` are the blocks' tokens, all blocks
  together; ``block_size`` tokens per block. vLLM's own block pool publishes ``"GPU"`` (and
  ``"CPU"`` for its CPU pool); offloading connectors ``"CPU"`` or ``"STORAGE"`` (disk).
- ``BlockRemoved(block_hashes, medium, group_idx=None, ...)``: blocks evicted from ``medium``.
- ``AllBlocksCleared()``: the prefix cache was reset (it names no medium).

A block hash is an int (with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) or the bytes of a sha256
digest, which msgspec's JSON encoder writes as a base64 string. ``EventBatch`` is declared
``array_like=True``, so a batch is a positional array ``[ts, events, data_parallel_rank]``.
``KVCacheEvent`` is ``tag=True`` (the tag field ``type`` holds the class name): since vLLM PR
#42892 the events are maps of named fields; before it ``KVCacheEvent`` was ``array_like`` too
and an event was ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
lora_id, medium, ...]`` (the earliest releases end at ``lora_id``). ``omit_defaults=True`` leaves
out optional fields at their defaults.

SGLang (0.5.23, ``sglang/srt/disaggregation/kv_events.py``, recorded by
``sglang/srt/mem_cache/events.py`` for the radix cache and HiCache) publishes the same shapes:
a batch ``[ts, events, attn_dp_rank]``, tagged-map events ``BlockStored(block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium=None, cache_salt, session_id,
lora_name)``, ``BlockRemoved(block_hashes, medium=None)`` and ``AllBlocksCleared``; int64 hashes
(possibly negative), one stored block per page (consecutive ones coalesced into one event),
media ``"GPU"`` (L1), ``"CPU_PINNED"`` (HiCache's host L2), ``"DISK"`` and ``"EXTERNAL"``
(L3, a storage backend). Its bigram pages publish token pairs.

The file this module reads
--------------------------
JSON lines, one event batch per line, as a subscriber that decodes each message and writes it
with ``msgspec.json.encode`` produces (blank lines are skipped). Each of these is accepted:

- as vLLM >= PR #42892 and SGLang 0.5.23 publish (a positional batch of tagged maps)::

    [1767225600.25, [{"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash":
    null, "token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "block_size": 4, "lora_id": null, "medium":
    "GPU", "lora_name": null}], 0]

- fully positional, as earlier vLLM published (``array_like`` events)::

    [1767225600.5, [["BlockRemoved", [12], "GPU"], ["AllBlocksCleared"]], 0]

- an object with named fields throughout (``data_parallel_rank`` or SGLang's ``attn_dp_rank``
  may be left out)::

    {"ts": 1767225601.0, "events": [{"type": "BlockStored", "block_hashes": [13],
    "parent_block_hash": 12, "token_ids": [9, 10, 11, 12], "block_size": 4, "lora_id": null,
    "medium": "CPU"}], "data_parallel_rank": 0}

Fields beyond those listed are ignored (newer engines add optional ones). In named form
``BlockStored`` needs ``block_hashes``, ``parent_block_hash``, ``token_ids`` and
``block_size``, and ``BlockRemoved`` needs ``block_hashes``; ``lora_id`` and ``medium`` may be
absent. A missing or null ``medium`` is the GPU (vLLM's block pool names it; the earliest
releases had no field). Media map to hisim's tiers by ``MEDIUM_TIERS`` (case-insensitive); pass
``media`` for others. Every bad line (invalid JSON, an unknown event type, a missing field, a
value of the wrong type) is one ``ProfileError``: ``<file>: line <n>: field '<f>': <what>,
got <value>``.

Replay and comparison
---------------------
``resident_timeline`` replays stored/removed/cleared and counts the blocks resident per tier
after each batch. A hash is resident in a tier while it has more stores than removals there:
vLLM can hold two physical blocks with one hash (two requests computed it at once) and
publishes each store and each removal. ``AllBlocksCleared`` empties every tier.

``compare_kv_events`` replays the workload through hisim's KV cache (``trace_cache``) and sets
its hits, stores and evictions per tier beside the log's, in totals and per time bucket. What an
event log cannot say by itself:

- Which request a block belongs to: events carry no request id. A request's hits in the log
  are found by looking its prompt's blocks up, by their hashes, in what the log holds just
  before the request arrives; so the workload must name its blocks as the log does
  (``request_hashes``). vLLM publishes nothing at all for a hit (unless a request asks for
  ``kv_cache_report_mode="full"``, when it re-publishes its reused blocks as a ``BlockStored``:
  see ``reuse_reports``).
- When a request arrived: the log's clock is the engine's wall clock; ``log_start_s`` is the
  engine's time of the workload's t = 0 (default: the first batch is taken to come at the
  first arrival, so the log reads early by the first prefill's time).
- Which stores are prompts: vLLM caches the full blocks of generated tokens too, hisim's cache
  replay inserts prompts only; with matched hashes, stores that are no prompt block are counted
  (``log_stores_outside_prompts``). vLLM stores full blocks only, hisim's trie holds a prompt's
  partial last block as well.
- Transfer times, queueing and concurrency: hisim's replay serves one request at a time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hisim_jax import files
from hisim_jax.serving.kvcache import L1, L2, L3, TIER_NAMES, KVCacheConfig
from hisim_jax.serving.workload import _show, json_line
from hisim_jax.validate.cache import CacheTrace, prefix_hashes, trace_cache

# medium name (upper case) -> hisim tier: vLLM's MEDIUM_GPU/CPU/STORAGE, SGLang's StorageMedium
MEDIUM_TIERS = {
    "GPU": L1,
    "CPU": L2,
    "CPU_PINNED": L2,
    "STORAGE": L3,
    "DISK": L3,
    "EXTERNAL": L3,
}
EVENT_TYPES = {"BlockStored": "stored", "BlockRemoved": "removed", "AllBlocksCleared": "cleared"}
# positional field order of the array-like events (vLLM and SGLang agree up to medium)
POSITIONAL_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}
_REQUIRED = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}
EVENT_COLUMNS = (
    "line",
    "batch",
    "ts",
    "time_s",
    "dp_rank",
    "kind",
    "medium",
    "tier",
    "block_hashes",
    "parent_block_hash",
    "blocks",
    "tokens",
    "block_size",
    "lora_id",
)
# names an event log of hisim's gives its tiers (vLLM's)
SIM_MEDIA = ("GPU", "CPU", "STORAGE")
ENCODINGS = ("msgspec", "array", "object")
MAX_BUCKETS = 1_000_000
_MISSING = object()


def _frame(rows: list[tuple], columns: Sequence[str], objects: Sequence[str]) -> pd.DataFrame:
    """A DataFrame whose ``objects`` columns keep Python values (hashes: pandas would turn
    ints mixed with None into floats and lose their low bits)."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    return pd.DataFrame(
        {
            c: pd.Series(list(v), dtype=object) if c in objects else list(v)
            for c, v in zip(columns, cols, strict=True)
        },
        columns=list(columns),
    )


def _error():
    from hisim_jax.estimator.calibrate import ProfileError

    return ProfileError


@dataclass(frozen=True)
class KVEventLog:
    """A parsed event stream. ``events``: one row per event (``EVENT_COLUMNS``) in file order:
    its ``line``, ``batch`` (0-based), the batch's ``ts`` and ``time_s`` (``ts`` minus the first
    batch's), ``dp_rank`` (-1 if the batch names none), ``kind`` stored/removed/cleared, the
    ``medium`` as written (None if absent), the hisim ``tier`` l1/l2/l3 ("" for cleared),
    ``block_hashes`` (a tuple of ints or strings), ``parent_block_hash``, ``blocks``,
    ``tokens`` (``len(token_ids)``, or ``blocks * block_size`` when the engine sent none),
    ``block_size`` and ``lora_id`` (0 and None where the event has none)."""

    path: str
    events: pd.DataFrame
    batches: int
    first_ts: float
    skipped_lines: int = 0


class _Line:
    """Checks of one line's values; every failure is one error naming line and field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, what: str, value: Any = _MISSING):
        got = "" if value is _MISSING else f", got {_show(value)}"
        raise _error()(f"{self.where}: field '{field}': {what}{got}")

    def get(self, rec: dict, key: str, field: str) -> Any:
        v = rec.get(key, _MISSING)
        if v is _MISSING:
            self.fail(field, f"missing, got fields {_show(list(rec))}")
        return v

    def number(self, v: Any, field: str) -> float:
        if type(v) not in (int, float) or not math.isfinite(float(v)):
            self.fail(field, "must be a finite number", v)
        return float(v)

    def integer(self, v: Any, field: str, minimum: int | None = None, null: bool = False):
        if v is None and null:
            return None
        if type(v) is not int:
            self.fail(field, "must be an integer" + (" or null" if null else ""), v)
        if minimum is not None and v < minimum:
            self.fail(field, f"must be >= {minimum}", v)
        return v

    def block_hash(self, v: Any, field: str, null: bool = False):
        if v is None and null:
            return None
        if type(v) not in (int, str):
            self.fail(field, "must be a block hash (an integer or a string)", v)
        return v

    def hashes(self, v: Any, field: str) -> tuple:
        if type(v) is not list:
            self.fail(field, "must be a list of block hashes", v)
        return tuple(self.block_hash(x, f"{field}[{i}]") for i, x in enumerate(v))

    def tokens(self, v: Any, field: str) -> int:
        if type(v) is not list:
            self.fail(field, "must be a list of token ids", v)
        for i, x in enumerate(v):
            # SGLang's bigram pages publish token pairs
            if type(x) is not int and not (type(x) is list and all(type(t) is int for t in x)):
                self.fail(f"{field}[{i}]", "must be a token id (an integer)", x)
        return len(v)

    def medium(self, v: Any, field: str, media: Mapping[str, int]) -> tuple[str | None, int]:
        if v is None:
            return None, L1
        if type(v) is not str:
            self.fail(field, "must be a string or null", v)
        tier = media.get(v.upper())
        if tier is None:
            known = ", ".join(sorted(media))
            self.fail(field, f"unknown medium (known: {known}; pass media= for others)", v)
        return v, tier


def _event(ev: Any, field: str, line: _Line, media: Mapping[str, int]) -> tuple:
    """(kind, medium, tier, hashes, parent, tokens, block_size, lora_id) of one event."""
    if type(ev) is list:
        if not ev or type(ev[0]) is not str:
            line.fail(field, "must start with the event type (a string)", ev)
        tag = ev[0]
        if tag not in EVENT_TYPES:
            line.fail(f"{field}.type", f"must be one of {', '.join(EVENT_TYPES)}", tag)
        names = POSITIONAL_FIELDS[tag]
        values = ev[1:]
        if len(values) < len(names):
            line.fail(f"{field}.{names[len(values)]}", f"missing, got {len(values)} values", ev)
        rec = dict(zip(names, values, strict=False))
        if tag != "AllBlocksCleared":
            rec["medium"] = values[len(names)] if len(values) > len(names) else None
    elif type(ev) is dict:
        tag = line.get(ev, "type", f"{field}.type")
        if tag not in EVENT_TYPES:
            line.fail(f"{field}.type", f"must be one of {', '.join(EVENT_TYPES)}", tag)
        for key in _REQUIRED[tag]:
            line.get(ev, key, f"{field}.{key}")
        rec = ev
    else:
        line.fail(field, "must be an event (a JSON object or array)", ev)
        raise AssertionError  # unreachable: fail raises
    kind = EVENT_TYPES[tag]
    if kind == "cleared":
        return kind, None, "", (), None, 0, 0, None
    hashes = line.hashes(rec["block_hashes"], f"{field}.block_hashes")
    medium, tier = line.medium(rec.get("medium"), f"{field}.medium", media)
    if kind == "removed":
        return kind, medium, TIER_NAMES[tier], hashes, None, 0, 0, None
    parent = line.block_hash(rec["parent_block_hash"], f"{field}.parent_block_hash", null=True)
    n_tokens = line.tokens(rec["token_ids"], f"{field}.token_ids")
    block_size = line.integer(rec["block_size"], f"{field}.block_size", minimum=1)
    lora = line.integer(rec.get("lora_id"), f"{field}.lora_id", null=True)
    tokens = n_tokens if n_tokens else block_size * len(hashes)
    return kind, medium, TIER_NAMES[tier], hashes, parent, tokens, block_size, lora


def _batch(obj: Any, line: _Line) -> tuple[float, int, list]:
    if type(obj) is list:
        if not 2 <= len(obj) <= 3:
            line.fail(
                "batch",
                "an event batch is [ts, events] or [ts, events, data_parallel_rank], "
                f"got {len(obj)} values",
                obj,
            )
        ts, events = obj[0], obj[1]
        rank = obj[2] if len(obj) == 3 else None
    elif type(obj) is dict:
        ts = line.get(obj, "ts", "ts")
        events = line.get(obj, "events", "events")
        rank = obj.get("data_parallel_rank", obj.get("attn_dp_rank"))
    else:
        line.fail(
            "batch",
            "must be an event batch (a JSON array [ts, events, data_parallel_rank] or an "
            "object with fields ts and events)",
            obj,
        )
        raise AssertionError  # unreachable
    ts = line.number(ts, "ts")
    if type(events) is not list:
        line.fail("events", "must be a list of events", events)
    rank = line.integer(rank, "data_parallel_rank", minimum=0, null=True)
    return ts, -1 if rank is None else rank, events


def _media(media: Mapping[str, str] | None) -> dict[str, int]:
    out = dict(MEDIUM_TIERS)
    for name, tier in (media or {}).items():
        if tier not in TIER_NAMES:
            raise ValueError(f"media: tier of {name!r} must be one of l1, l2, l3, got {tier!r}")
        out[str(name).upper()] = TIER_NAMES.index(tier)
    return out


def read_kv_events(
    path: str | Path, media: Mapping[str, str] | None = None, skip_bad_lines: bool = False
) -> KVEventLog:
    """Read a JSON-lines dump of vLLM's or SGLang's KV event stream (see the module's
    docstring for the accepted forms). ``media``: more medium names and their tier (``{"cpu_dram":
    "l2"}``). ``skip_bad_lines``: skip and count bad lines instead of failing on the first.
    A file with no batch is an error."""
    err = _error()
    path = Path(path)
    data = files.read_bytes(path, "KV event log (JSON lines)", err)
    tiers = _media(media)
    rows: list[tuple] = []
    batches = skipped = 0
    first_ts: float | None = None
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        line = _Line(f"{path}: line {n}")
        try:
            obj = json_line(raw, line.where, err)
            ts, rank, events = _batch(obj, line)
            parsed = [_event(ev, f"events[{j}]", line, tiers) for j, ev in enumerate(events)]
        except err:
            if not skip_bad_lines:
                raise
            skipped += 1
            continue
        if first_ts is None:
            first_ts = ts
        for kind, medium, tier, hashes, parent, tokens, bs, lora in parsed:
            rows.append(
                (n, batches, ts, ts - first_ts, rank, kind, medium, tier, hashes, parent,
                 len(hashes), tokens, bs, lora)
            )  # fmt: skip
        batches += 1
    if first_ts is None:
        why = f" ({skipped} bad lines skipped)" if skipped else ""
        raise err(f"{path}: no event batches{why}")
    frame = _frame(rows, EVENT_COLUMNS, ("medium", "block_hashes", "parent_block_hash", "lora_id"))
    if frame.empty:
        frame = frame.astype({"line": int, "batch": int, "ts": float, "time_s": float})
    return KVEventLog(str(path), frame, batches, first_ts, skipped)


# ------------------------------------------------------------------------------------------
# replay


def _split_tokens(tokens: int, block_size: int, blocks: int) -> list[int]:
    """Tokens per block of a stored chain: full blocks, the last holding the rest."""
    if blocks == 0:
        return []
    out = [block_size] * (blocks - 1)
    return out + [max(0, tokens - block_size * (blocks - 1))]


class _LogCache:
    """What an event log holds: copies of each hash per tier, and the counts the comparison
    needs. ``apply`` returns the blocks each tier gained and lost (a hash entering or leaving
    a tier; a second copy of a resident hash is counted as a duplicate, not a new block)."""

    def __init__(self, reuse_reports: bool = False):
        self.reuse_reports = reuse_reports
        self.copies: list[dict[Any, int]] = [{}, {}, {}]
        self.size: list[dict[Any, int]] = [{}, {}, {}]  # tokens of a resident hash
        self.blocks = [0, 0, 0]
        self.tokens = [0, 0, 0]
        self.placed_tokens = [0, 0, 0]
        self.duplicates = self.unknown_removals = self.clears = 0
        self.reuse_tokens = self.reuse_blocks = 0

    def apply(self, kind: str, tier: int, hashes, tokens: int, block_size: int):
        placed, dropped = [0, 0, 0], [0, 0, 0]
        if kind == "cleared":
            dropped = list(self.blocks)
            self.copies, self.size = [{}, {}, {}], [{}, {}, {}]
            self.blocks, self.tokens = [0, 0, 0], [0, 0, 0]
            self.clears += 1
            return placed, dropped
        copies, size = self.copies[tier], self.size[tier]
        if kind == "stored":
            if self.reuse_reports and hashes and all(copies.get(h, 0) for h in hashes):
                self.reuse_blocks += len(hashes)
                self.reuse_tokens += tokens
                return placed, dropped
            for h, t in zip(hashes, _split_tokens(tokens, block_size, len(hashes)), strict=True):
                c = copies.get(h, 0)
                copies[h] = c + 1
                if c:
                    self.duplicates += 1
                    continue
                size[h] = t
                self.blocks[tier] += 1
                self.tokens[tier] += t
                self.placed_tokens[tier] += t
                placed[tier] += 1
        else:
            for h in hashes:
                c = copies.get(h, 0)
                if not c:
                    self.unknown_removals += 1  # stored before the log began
                    continue
                if c > 1:
                    copies[h] = c - 1
                    continue
                del copies[h]
                self.blocks[tier] -= 1
                self.tokens[tier] -= size.pop(h)
                dropped[tier] += 1
        return placed, dropped

    def hit(self, hashes, input_len: int, block_tokens: int, page: int) -> list[int]:
        """Hit tokens per tier of a prompt whose blocks have these hashes, by hisim's rule
        (``KVCache.lookup``): the longest prefix resident in some tier, each block counted
        where it is fastest, cut to whole pages of the prompt minus its last token."""
        blocks: list[tuple[int, int]] = []
        covered = 0
        for h in hashes:
            block_len = min(block_tokens, input_len - covered)
            if block_len <= 0:
                break
            tier = next((t for t in (L1, L2, L3) if self.copies[t].get(h)), None)
            if tier is None or self.size[tier][h] != block_len:
                break
            blocks.append((tier, block_len))
            covered += block_len
        usable = min(covered, input_len - 1)
        usable -= usable % page
        while blocks and covered - blocks[-1][1] >= usable:
            covered -= blocks.pop()[1]
        out = [0, 0, 0]
        for tier, n in blocks:
            out[tier] += n
        if blocks:
            out[blocks[-1][0]] -= covered - usable
        return out


def _events_of(log: KVEventLog | str | Path, media) -> KVEventLog:
    return log if isinstance(log, KVEventLog) else read_kv_events(log, media)


def _one_rank(log: KVEventLog, dp_rank: int | None) -> tuple[pd.DataFrame, int]:
    ev = log.events
    ranks = sorted(set(ev["dp_rank"].tolist()))
    if dp_rank is None:
        if len(ranks) > 1:
            raise _error()(
                f"{log.path}: events of data-parallel ranks {', '.join(map(str, ranks))}: "
                "each has its own cache, choose one (dp_rank)"
            )
        return ev, ranks[0] if ranks else -1
    if dp_rank not in ranks:
        raise _error()(
            f"{log.path}: no events of data-parallel rank {dp_rank} "
            f"(ranks: {', '.join(map(str, ranks)) or 'none'})"
        )
    return ev[ev["dp_rank"] == dp_rank], dp_rank


def resident_timeline(
    log: KVEventLog | str | Path,
    dp_rank: int | None = None,
    reuse_reports: bool = False,
    media: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Blocks and tokens resident per tier after each batch that holds events: columns
    ``line, batch, ts, time_s, l1_blocks, l2_blocks, l3_blocks, l1_tokens, l2_tokens,
    l3_tokens, stored_blocks, removed_blocks`` (the last two: the batch's, over all tiers).
    Logs of several data-parallel ranks need ``dp_rank`` (each rank has its own cache)."""
    log = _events_of(log, media)
    ev, _ = _one_rank(log, dp_rank)
    state = _LogCache(reuse_reports)
    rows = []
    last = None
    stored = removed = 0
    for line, batch, ts, time_s, kind, tier, hashes, tokens, bs in zip(
        ev["line"], ev["batch"], ev["ts"], ev["time_s"], ev["kind"], ev["tier"],
        ev["block_hashes"], ev["tokens"], ev["block_size"], strict=True,
    ):  # fmt: skip
        if last is not None and batch != last[1]:
            rows.append((*last, *state.blocks, *state.tokens, stored, removed))
            stored = removed = 0
        t = TIER_NAMES.index(tier) if tier else 0
        placed, dropped = state.apply(kind, t, hashes, tokens, bs)
        stored += sum(placed)
        removed += sum(dropped)
        last = (line, batch, ts, time_s)
    if last is not None:
        rows.append((*last, *state.blocks, *state.tokens, stored, removed))
    cols = ["line", "batch", "ts", "time_s"]
    cols += [f"{t}_blocks" for t in TIER_NAMES] + [f"{t}_tokens" for t in TIER_NAMES]
    return pd.DataFrame(rows, columns=cols + ["stored_blocks", "removed_blocks"])


# ------------------------------------------------------------------------------------------
# comparison

RequestHashes = str | Callable[[Any], Sequence]


def _hashes_of(request_hashes: RequestHashes) -> Callable[[Any], Sequence]:
    if callable(request_hashes):
        return request_hashes
    if request_hashes == "block_ids":
        return lambda r: r.block_ids
    if request_hashes == "chain":
        return lambda r: prefix_hashes(r.block_ids)
    raise ValueError(
        f"request_hashes must be 'block_ids', 'chain' or a function, got {request_hashes!r}"
    )


@dataclass(frozen=True)
class KVEventComparison:
    """``report``: totals, log beside simulation (plain values, one level of nesting).
    ``buckets``: one row per time bucket (``BUCKET_COLUMNS``)."""

    report: dict
    buckets: pd.DataFrame


def _bucket_columns() -> list[str]:
    cols = ["start_s", "end_s", "requests", "prompt_tokens"]
    for src in ("log", "sim"):
        cols.append(f"hit_tokens_{src}")
    for t in TIER_NAMES:
        cols += [f"{t}_hit_tokens_log", f"{t}_hit_tokens_sim"]
    for what in ("stored_blocks", "removed_blocks", "resident_blocks"):
        for t in TIER_NAMES:
            cols += [f"{t}_{what}_log", f"{t}_{what}_sim"]
    return cols


BUCKET_COLUMNS = tuple(_bucket_columns())


def _per_tier(values) -> dict:
    return {t: int(v) for t, v in zip(TIER_NAMES, values, strict=True)}


def compare_kv_events(
    events: KVEventLog | str | Path,
    requests: Sequence,
    cfg: KVCacheConfig,
    *,
    bucket_s: float | None = None,
    dp_rank: int | None = None,
    request_hashes: RequestHashes = "block_ids",
    reuse_reports: bool = False,
    log_start_s: float | None = None,
    media: Mapping[str, str] | None = None,
) -> KVEventComparison:
    """An engine's KV event log beside hisim's KV cache on the same workload and capacities.

    ``events``: the log's path (read by ``read_kv_events``) or a ``KVEventLog``.
    ``requests``: the workload the engine served. ``cfg``: hisim's cache with the engine's
    capacities (vLLM: ``block_tokens`` and ``page_size`` its block size, ``l1_tokens`` its
    GPU blocks times the block size, ``l2_tokens``/``l3_tokens`` its CPU/disk offload).
    ``request_hashes``: how the log names a request's prompt blocks: ``"block_ids"`` (the
    workload's ids are the engine's hashes), ``"chain"`` (``prefix_hashes``: the names in a
    log of hisim's own, ``sim_kv_event_lines``) or a function of a request.
    ``reuse_reports``: the engine ran with ``kv_cache_report_mode="full"``, so a store of
    blocks all resident already is a hit report, not a store. ``log_start_s``: the log's
    ``ts`` at the workload's time 0 (default: the first batch's ts minus the first arrival).
    ``bucket_s``: bucket width (default: a twentieth of the span). ``dp_rank``: the rank to
    compare in a log of several.

    Log-side hits are derived when the workload's hashes are found in the log (any request
    block hash stored anywhere in it: ``requests_matched_log``); otherwise they are None.
    They count every request, also one hisim skipped (``requests_skipped_sim``: its prompt
    does not fit in ``l1_tokens``). With the default ``log_start_s``, a log whose first
    batch is not the first request's stores is read too early: pass the engine's start.
    Hit rates are hit tokens over all prompt tokens, on both sides.
    Stores and removals are blocks entering and leaving a tier (a second copy of a resident
    hash is a duplicate, counted apart); hisim's are placements and evictions (its write-
    through copies to L2/L3 and write-backs on eviction are stores there)."""
    if cfg.state_checkpoints:
        raise ValueError(
            "compare_kv_events: hybrid models (state_checkpoints) are not supported: the log "
            "does not say where recurrent states were saved"
        )
    if bucket_s is not None and not (math.isfinite(bucket_s) and bucket_s > 0):
        raise ValueError(f"bucket_s must be a positive number, got {bucket_s!r}")
    log = _events_of(events, media)
    ev, rank = _one_rank(log, dp_rank)
    hashes_of = _hashes_of(request_hashes)
    order = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    first_arrival = float(order[0].arrival_s) if order else 0.0
    start = log.first_ts - first_arrival if log_start_s is None else float(log_start_s)

    trace: CacheTrace = trace_cache(requests, cfg)
    sim_req, sim_ev = trace.requests, trace.events

    # --- the log, replayed in file order; each request looks up what came before it
    req_hashes = [list(hashes_of(r)) for r in order]
    prompt_blocks = {h for hs in req_hashes for h in hs}
    seen: set = set()
    for hs in ev["block_hashes"]:
        seen.update(hs)
    matched = sum(1 for hs in req_hashes if any(h in seen for h in hs))
    derivable = matched > 0
    state = _LogCache(reuse_reports)
    times = ev["ts"].to_numpy(float) - start
    n_ev = len(ev)
    placed_at = np.zeros((n_ev, 3), np.int64)
    dropped_at = np.zeros((n_ev, 3), np.int64)
    resident_at = np.zeros((n_ev, 3), np.int64)
    log_hits = np.zeros((len(order), 3), np.int64)
    outside = 0
    cols = zip(ev["kind"], ev["tier"], ev["block_hashes"], ev["tokens"], ev["block_size"],
               strict=True)  # fmt: skip
    k = 0
    for i, r in enumerate(order + [None]):
        arrival = math.inf if r is None else float(r.arrival_s)
        while k < n_ev and times[k] < arrival:
            kind, tier, hs, tokens, bs = next(cols)
            t = TIER_NAMES.index(tier) if tier else 0
            placed, dropped = state.apply(kind, t, hs, tokens, bs)
            placed_at[k], dropped_at[k], resident_at[k] = placed, dropped, state.blocks
            if kind == "stored" and derivable:
                outside += sum(1 for h in hs if h not in prompt_blocks)
            k += 1
        if r is not None and derivable:
            log_hits[i] = state.hit(req_hashes[i], r.input_len, cfg.block_tokens, cfg.page_size)

    # --- buckets over the span of both
    arrivals = np.array([float(r.arrival_s) for r in order])
    ends = [a for a in (arrivals, times) if len(a)]
    t0 = min(float(a.min()) for a in ends) if ends else 0.0
    t1 = max(float(a.max()) for a in ends) if ends else 0.0
    if bucket_s:  # buckets [start, end): the span's end opens one more
        width = float(bucket_s)
        n_b = math.floor((t1 - t0) / width) + 1
        if n_b > MAX_BUCKETS:
            raise ValueError(
                f"bucket_s {bucket_s:g} cuts the {t1 - t0:g} s span into {n_b} buckets, "
                f"more than {MAX_BUCKETS}"
            )
    else:  # twenty, the last one closed at the span's end
        width = (t1 - t0) / 20 if t1 > t0 else 1.0
        n_b = 20 if t1 > t0 else 1

    def bucket(t):
        return np.clip(np.floor((np.asarray(t, float) - t0) / width), 0, n_b - 1).astype(int)

    sim_time = sim_ev["time_s"].to_numpy(float)
    sim_tier = np.array([TIER_NAMES.index(t) for t in sim_ev["tier"]], int)
    sim_sign = np.where(sim_ev["kind"].to_numpy() == "stored", 1, -1)
    sim_res = np.zeros((len(sim_ev), 3), np.int64)
    if len(sim_ev):
        np.add.at(sim_res, (np.arange(len(sim_ev)), sim_tier), sim_sign)
        sim_res = np.cumsum(sim_res, axis=0)

    # trace_cache serves in the same order (arrival, then request id)
    sim_hits = sim_req[[f"{t}_hit_tokens" for t in TIER_NAMES]].to_numpy(np.int64)
    out = {c: np.zeros(n_b, np.int64) for c in BUCKET_COLUMNS[2:]}
    edges = t0 + width * np.arange(n_b + 1)
    rb = bucket(arrivals) if len(arrivals) else np.zeros(0, int)
    np.add.at(out["requests"], rb, 1)
    np.add.at(out["prompt_tokens"], rb, [r.input_len for r in order])
    for j, t in enumerate(TIER_NAMES):
        np.add.at(out[f"{t}_hit_tokens_log"], rb, log_hits[:, j])
        np.add.at(out[f"{t}_hit_tokens_sim"], rb, sim_hits[:, j])
        eb = bucket(times)
        np.add.at(out[f"{t}_stored_blocks_log"], eb, placed_at[:, j])
        np.add.at(out[f"{t}_removed_blocks_log"], eb, dropped_at[:, j])
        sb = bucket(sim_time)
        np.add.at(out[f"{t}_stored_blocks_sim"], sb, (sim_tier == j) & (sim_sign > 0))
        np.add.at(out[f"{t}_removed_blocks_sim"], sb, (sim_tier == j) & (sim_sign < 0))
        # resident at each bucket's end: after the last event before it
        # (the log's clock, made non-decreasing: batches of one rank may be off by a little)
        log_clock = np.maximum.accumulate(times) if n_ev else times
        for src, tt, res in (("log", log_clock, resident_at), ("sim", sim_time, sim_res)):
            upto = np.searchsorted(tt, edges[1:], side="left") if len(tt) else np.zeros(n_b, int)
            upto[-1] = len(tt)  # the last bucket holds the end
            col = np.where(upto > 0, res[np.maximum(upto - 1, 0), j] if len(tt) else 0, 0)
            out[f"{t}_resident_blocks_{src}"] = col.astype(np.int64)
    for src in ("log", "sim"):
        out[f"hit_tokens_{src}"] = sum(out[f"{t}_hit_tokens_{src}"] for t in TIER_NAMES)
    buckets = pd.DataFrame({"start_s": edges[:-1], "end_s": edges[1:], **out})
    buckets = buckets[list(BUCKET_COLUMNS)]
    if not derivable:
        for c in buckets.columns:
            if "hit_tokens_log" in c:
                buckets[c] = None

    # --- totals
    prompt_tokens = int(sum(r.input_len for r in order))
    lh = log_hits.sum(axis=0) if derivable else None
    sh = sim_hits.sum(axis=0)
    sim_stored = [int(((sim_tier == j) & (sim_sign > 0)).sum()) for j in range(3)]
    sim_removed = [int(((sim_tier == j) & (sim_sign < 0)).sum()) for j in range(3)]
    block_sizes = Counter(ev.loc[ev["kind"] == "stored", "block_size"].tolist())
    sim_tokens = sim_ev.groupby(["kind", "tier"])["tokens"].sum()
    media_seen = sorted({m for m in ev["medium"] if m is not None})
    notes = []
    if not derivable:
        notes.append(
            "no prompt block of the workload is named in the log (request_hashes), so the "
            "log's hits cannot be derived; stores, removals and residency still compare"
        )
    if block_sizes and cfg.block_tokens not in block_sizes:
        notes.append(
            f"the log's block size ({block_sizes.most_common(1)[0][0]}) is not hisim's "
            f"block_tokens ({cfg.block_tokens})"
        )
    if state.unknown_removals:
        notes.append("the log removes blocks it never stored: it began mid-run")
    report = {
        "events_file": log.path,
        "log_batches": int(ev["batch"].nunique()),
        "log_events": int(n_ev),
        "log_lines_skipped": log.skipped_lines,
        "dp_rank": int(rank),
        "log_start_s": float(start),
        "log_span_s": float(times.max() - times.min()) if n_ev else 0.0,
        "log_block_size": int(block_sizes.most_common(1)[0][0]) if block_sizes else None,
        "media": {m: TIER_NAMES[_media(media)[m.upper()]] for m in media_seen},
        "requests": len(order),
        "requests_skipped_sim": int(sim_req["skipped"].sum()),
        "requests_matched_log": int(matched),
        "prompt_tokens": prompt_tokens,
        "hit_tokens_log": (
            {**_per_tier(lh), "total": int(lh.sum())}
            if lh is not None
            else dict.fromkeys((*TIER_NAMES, "total"))
        ),  # fmt: skip
        "hit_tokens_sim": {**_per_tier(sh), "total": int(sh.sum())},
        "hit_rate_log": float(lh.sum()) / prompt_tokens
        if lh is not None and prompt_tokens
        else None,
        "hit_rate_sim": float(sh.sum()) / prompt_tokens if prompt_tokens else 0.0,
        "stored_blocks_log": _per_tier(placed_at.sum(axis=0)),
        "stored_blocks_sim": _per_tier(sim_stored),
        "removed_blocks_log": _per_tier(dropped_at.sum(axis=0)),
        "removed_blocks_sim": _per_tier(sim_removed),
        "stored_tokens_log": _per_tier(state.placed_tokens),
        "stored_tokens_sim": _per_tier([sim_tokens.get(("stored", t), 0) for t in TIER_NAMES]),
        "peak_resident_blocks_log": _per_tier(resident_at.max(axis=0) if n_ev else [0] * 3),
        "peak_resident_blocks_sim": _per_tier(sim_res.max(axis=0) if len(sim_ev) else [0] * 3),
        "final_resident_blocks_log": _per_tier(state.blocks),
        "final_resident_blocks_sim": _per_tier(sim_res[-1] if len(sim_ev) else [0] * 3),
        "duplicate_stores_log": state.duplicates,
        "unknown_removals_log": state.unknown_removals,
        "clears_log": int((ev["kind"] == "cleared").sum()),
        "reuse_report_tokens_log": state.reuse_tokens,
        "log_stores_outside_prompts": int(outside) if derivable else None,
        "note": "; ".join(notes),
    }
    return KVEventComparison(report, buckets)


# ------------------------------------------------------------------------------------------
# hisim's own cache behaviour as an event log


def sim_kv_event_lines(
    trace: CacheTrace,
    encoding: str = "msgspec",
    start_ts: float = 0.0,
    dp_rank: int = 0,
    media: Sequence[str] = SIM_MEDIA,
) -> list[str]:
    """hisim's cache record (``trace_cache``) as the JSON lines an engine would publish: one
    batch per request that changed the cache, at ``start_ts`` plus its arrival, with one
    ``BlockStored`` (no token ids; ``block_size`` its tokens) or ``BlockRemoved`` per block,
    named by ``block_hash`` and placed in ``media`` (the names of L1, L2, L3). ``encoding``:
    ``msgspec`` (vLLM >= PR #42892, SGLang), ``array`` (earlier vLLM) or ``object``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    lines = []
    ev = trace.events
    for (_, t), group in ev.groupby(["request_id", "time_s"], sort=False):
        out = []
        for kind, tier, h, parent, tokens in zip(
            group["kind"], group["tier"], group["block_hash"], group["parent_hash"],
            group["tokens"], strict=True,
        ):  # fmt: skip
            medium = media[TIER_NAMES.index(tier)]
            parent = None if parent is None or pd.isna(parent) else int(parent)
            if kind == "stored":
                fields = {"block_hashes": [int(h)], "parent_block_hash": parent, "token_ids": [],
                          "block_size": int(tokens), "lora_id": None, "medium": medium,
                          "lora_name": None}  # fmt: skip
                tag = "BlockStored"
            else:
                fields = {"block_hashes": [int(h)], "medium": medium}
                tag = "BlockRemoved"
            out.append([tag, *fields.values()] if encoding == "array" else {"type": tag, **fields})
        ts = start_ts + float(t)
        if encoding == "object":
            batch: Any = {"ts": ts, "events": out, "data_parallel_rank": dp_rank}
        else:
            batch = [ts, out, dp_rank]
        lines.append(json.dumps(batch))
    return lines
