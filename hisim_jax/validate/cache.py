"""The KV cache alone: hits per tier for given capacities, no timing."""

from __future__ import annotations


def replay_cache(requests, cfg) -> dict:
    """Replay requests in arrival order through the KV cache manager alone: each looks up its
    prefix, loads its L2/L3 part into L1, computes the rest, inserts its blocks and leaves
    (one request at a time, so nothing stays pinned). Returns hit tokens per tier, the bytes
    each link moved, evictions per tier and the hit rate."""
    from hisim_jax.serving.kvcache import L1, KVCache

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
        cache.record_lookup(hit.tokens, r.input_len)
        new = cache.pages(r.input_len - hit.total_tokens)
        if not cache.make_room(L1, new, now):
            cache.release(hit.nodes, now)
            rejected += 1
            continue
        cache.alloc_private(new)
        path, _ = cache.insert(r.block_ids, r.input_len, now)
        cache.free_private(new)
        cache.pin(path)  # as the engine does: the request holds its path, then leaves
        cache.release(hit.nodes, now, touch=False)
        cache.release(path, now)
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
