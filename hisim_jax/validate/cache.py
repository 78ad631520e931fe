"""The KV cache alone: hits per tier for given capacities, no timing.

``replay_cache`` gives the totals. ``trace_cache`` replays the same way and also records, per
request, its hits and, per block, every placement in and eviction from each tier, in the shape
of an engine's KV event stream (``kv_events.py`` reads vLLM's and SGLang's and compares them
with this record). A block is named there by ``block_hash``: a stable hash of its whole prefix,
as vLLM's and SGLang's block hashes are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pandas as pd

from hisim_jax.serving.kvcache import L1, TIER_NAMES, KVCache, KVCacheConfig


def block_hash(parent_hash: int | None, block_id: int) -> int:
    """The name of a block in hisim's event record: a stable 63-bit hash of its parent's name
    (None at the root) and its own id, so it names the whole prefix (the same in every process,
    like the workload's ids: blake2b, never ``hash()``)."""
    digest = hashlib.blake2b(f"{parent_hash},{block_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prefix_hashes(block_ids: Iterable[int]) -> list[int]:
    """``block_hash`` of every block of a prompt, first to last."""
    out: list[int] = []
    h = None
    for b in block_ids:
        h = block_hash(h, b)
        out.append(h)
    return out


class _RecordingCache(KVCache):
    """A KVCache that notes each block a tier gains or loses, in order, as
    ``(kind, tier, block_hash, parent_hash, tokens)`` with kind ``stored`` or ``removed``.

    For validation only. Every change of a tree block's residency goes through
    ``_set_resident`` or ``_evict``, except ``insert``'s placement of new blocks in L1, which is
    inlined there: it is found by comparing the prompt's L1 blocks before and after."""

    def __init__(self, cfg: KVCacheConfig):
        super().__init__(cfg)
        self.log: list[tuple[str, int, int, int | None, int]] = []
        self._names: dict[int, int | None] = {0: None}  # node key (the root's is 0) -> hash

    def _name(self, node) -> int | None:
        names = self._names
        chain = []
        while node.key not in names:
            chain.append(node)
            node = node.parent
        h = names[node.key]
        for n in reversed(chain):
            h = block_hash(h, n.id)
            names[n.key] = h
        return h

    def _note(self, kind: str, tier: int, node) -> tuple:
        return (kind, tier, self._name(node), self._name(node.parent), node.tokens)

    def _set_resident(self, node, tier: int, now: float, push: bool = True) -> None:
        if node.tiers[tier]:
            return
        super()._set_resident(node, tier, now, push)
        self.log.append(self._note("stored", tier, node))

    def _evict(self, node, tier: int, now: float):
        out = super()._evict(node, tier, now)  # a write-back is logged first, as it happens
        self.log.append(self._note("removed", tier, node))
        return out

    def insert(self, block_ids, input_len: int, now: float, prefix=()) -> tuple[list, int]:
        before = set()
        node = self.root
        for bid in block_ids:
            node = node.children.get(bid)
            if node is None or not node.tiers[L1]:
                break  # L1 residency is prefix-closed: nothing below is in L1
            before.add(id(node))  # these nodes stay alive, so no new node takes their id
        mark = len(self.log)
        path, new_pages = super().insert(block_ids, input_len, now, prefix)
        # the L1 placements come before the write-through copies insert made after them
        self.log[mark:mark] = [self._note("stored", L1, n) for n in path if id(n) not in before]
        return path, new_pages


def _serve(cache: KVCache, requests) -> Iterator[tuple[object, list[int] | None, bool]]:
    """Serve requests in arrival order, one at a time: each looks up its prefix, loads its
    L2/L3 part into L1, computes the rest, inserts its blocks and leaves (so nothing stays
    pinned). Yields each request, its hit tokens per tier as counted in the cache's stats
    (None if it never got to its lookup: too large for L1, or its hit could not be loaded)
    and whether it was skipped (also when L1 could not make room for its computed part)."""
    for i, r in enumerate(sorted(requests, key=lambda r: (r.arrival_s, r.request_id))):
        now = float(i)  # order is all that matters without timing
        if cache.pages(r.input_len) > cache.capacity[L1]:
            yield r, None, True
            continue
        hit = cache.lookup(r.block_ids, r.input_len)
        if cache.acquire(hit, now) is None:
            yield r, None, True
            continue
        tokens = [int(t) for t in hit.tokens]
        cache.record_lookup(hit.tokens, r.input_len)
        new = cache.pages(r.input_len - hit.total_tokens)
        if not cache.make_room(L1, new, now):
            cache.release(hit.nodes, now)
            yield r, tokens, True
            continue
        cache.alloc_private(new)
        path, _ = cache.insert(r.block_ids, r.input_len, now)
        cache.free_private(new)
        cache.pin(path)  # as the engine does: the request holds its path, then leaves
        cache.release(hit.nodes, now, touch=False)
        cache.release(path, now)
        yield r, tokens, False


def _report(cache: KVCache, requests: int, rejected: int) -> dict:
    cache.check_invariants()
    s = cache.stats
    hits = [int(h) for h in s.hit_tokens]
    return {
        "requests": requests,
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


def replay_cache(requests, cfg) -> dict:
    """Replay requests in arrival order through the KV cache manager alone (``_serve``).
    Returns hit tokens per tier, the bytes each link moved, evictions per tier and the hit
    rate."""
    cache = KVCache(cfg)
    rejected = sum(skipped for _, _, skipped in _serve(cache, requests))
    return _report(cache, len(requests), rejected)


REQUEST_COLUMNS = (
    "request_id",
    "time_s",
    "input_len",
    "l1_hit_tokens",
    "l2_hit_tokens",
    "l3_hit_tokens",
    "miss_tokens",
    "skipped",
)
EVENT_COLUMNS = ("request_id", "time_s", "kind", "tier", "block_hash", "parent_hash", "tokens")


@dataclass(frozen=True)
class CacheTrace:
    """``replay_cache``'s report and what produced it.

    ``requests``: one row per request in serving order (``REQUEST_COLUMNS``; ``time_s`` is its
    arrival; its hits and misses are as the cache's stats count them: none for a request skipped
    before its lookup, counted for one skipped after it because L1 could not make room). ``events``: one row per block placed
    in (``stored``) or evicted from (``removed``) a tier ``l1``/``l2``/``l3``, in order, with the
    request whose serving caused it and its arrival as ``time_s`` (the replay has no timing),
    the block's ``block_hash``, its parent's (None at the root) and its tokens."""

    report: dict
    requests: pd.DataFrame
    events: pd.DataFrame


def trace_cache(requests, cfg: KVCacheConfig) -> CacheTrace:
    """``replay_cache`` with the per-request and per-block record (``CacheTrace``); the report
    is the same. Slower (a hash per block event), so the plain replay stays the default."""
    cache = _RecordingCache(cfg)
    rows, events = [], []
    mark = 0
    for r, hit, skipped in _serve(cache, requests):
        t = float(r.arrival_s)
        if hit is None:
            rows.append((r.request_id, t, r.input_len, 0, 0, 0, 0, True))
        else:
            rows.append((r.request_id, t, r.input_len, *hit, r.input_len - sum(hit), skipped))
        for kind, tier, h, parent, tokens in cache.log[mark:]:
            events.append((r.request_id, t, kind, TIER_NAMES[tier], h, parent, tokens))
        mark = len(cache.log)
    rejected = sum(row[-1] for row in rows)
    return CacheTrace(
        _report(cache, len(requests), rejected),
        pd.DataFrame(rows, columns=list(REQUEST_COLUMNS)),
        _events_frame(events),
    )


def _events_frame(events: list[tuple]) -> pd.DataFrame:
    cols = list(zip(*events, strict=True)) if events else [()] * len(EVENT_COLUMNS)
    data = dict(zip(EVENT_COLUMNS, (list(c) for c in cols), strict=True))
    # hashes stay Python ints (int64 holds 63 bits; with None pandas would make floats)
    for c in ("block_hash", "parent_hash"):
        data[c] = pd.Series(data[c], dtype=object)
    return pd.DataFrame(data, columns=list(EVENT_COLUMNS))
