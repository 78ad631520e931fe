"""The three-tier prefix KV cache: hits, eviction order, pinning, transfers, invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.serving.kvcache import L1, L2, L3, KVCache, KVCacheConfig

BT = 4  # tokens per block in these tests


def cfg(**kw):
    base = dict(l1_tokens=40, bytes_per_token=1000.0, block_tokens=BT)
    base.update(kw)
    return KVCacheConfig(**base)


def serve(cache: KVCache, ids, input_len, now):
    """One request's life, as the engine drives it: look up, acquire, compute the rest,
    insert, release."""
    hit = cache.lookup(ids, input_len)
    cache.record_lookup(hit.tokens, input_len)
    done = cache.acquire(hit, now)
    assert done is not None
    new = input_len - hit.total_tokens
    assert cache.make_room(L1, cache.pages(new), now)
    cache.alloc_private(cache.pages(new))
    path, new_pages = cache.insert(ids, input_len, now)
    cache.free_private(min(new_pages, cache.pages(new)))
    cache.free_private(cache.pages(new) - min(new_pages, cache.pages(new)))
    cache.pin(path)
    cache.release(hit.nodes, now, touch=False)
    cache.release(path, now)
    cache.check_invariants()
    return hit, done


def test_prefix_hit_and_at_least_one_new_token():
    c = KVCache(cfg())
    serve(c, (1, 2, 3), 12, 0.0)
    hit = c.lookup((1, 2, 3), 12)
    # the whole prompt is cached, but its last token must still be computed
    assert hit.tokens == [11, 0, 0]
    hit = c.lookup((1, 2, 9, 9), 16)
    assert hit.tokens == [8, 0, 0]
    assert c.lookup((7, 2, 3), 12).total_tokens == 0


def test_partial_last_block_is_not_a_full_block():
    c = KVCache(cfg())
    serve(c, (1, 2), 6, 0.0)  # block 2 holds 2 tokens
    assert c.lookup((1, 2, 5), 12).tokens == [4, 0, 0]  # block 2 is full here: not the same KV
    assert c.lookup((1, 2), 6).tokens == [5, 0, 0]


def test_page_size_cuts_hits_to_whole_pages():
    # blocks of 4 tokens, pages of 8: SGLang matches whole pages of the prompt minus its
    # last token, so a hit is a multiple of 8 and a block past the cut leaves the hit
    c = KVCache(cfg(page_size=8, l1_tokens=64))
    serve(c, (1, 2, 3, 4, 5), 18, 0.0)  # blocks of 4, 4, 4, 4, 2 tokens
    hit = c.lookup((1, 2, 3, 4, 5), 18)
    assert hit.tokens == [16, 0, 0] and len(hit.nodes) == 4
    hit = c.lookup((1, 2, 3, 9), 16)  # 12 tokens cached: one whole page
    assert hit.tokens == [8, 0, 0] and len(hit.nodes) == 2
    hit = c.lookup((1, 2, 3, 4), 16)  # all 16 cached: the last token is computed, so 8
    assert hit.tokens == [8, 0, 0] and len(hit.nodes) == 2
    # pages of 6 cut inside a block: it stays in the hit (held), but counts 2 of its 4 tokens
    c = KVCache(cfg(page_size=6, l1_tokens=60))
    serve(c, (1, 2), 8, 0.0)
    hit = c.lookup((1, 2, 9), 12)
    assert hit.tokens == [6, 0, 0] and len(hit.nodes) == 2
    assert hit.unpinned_l1_pages == 12  # two 4-token blocks take two 6-token pages
    assert serve(c, (1, 2, 9), 12, 1.0)[0].total_tokens == 6


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 70),  # block tokens
    st.integers(1, 70),  # page size
    st.lists(st.integers(1, 400), min_size=1, max_size=4),  # prompt lengths
)
def test_pages_are_charged_once_whatever_the_block_and_page_sizes(block, page, lengths):
    # a path's blocks hold its tokens rounded up to whole pages, however blocks and pages
    # fall on each other (rounding each block up on its own charged 16-token blocks under
    # 64-token pages 4x their KV, so L1 overflowed and evicted for nothing)
    c = KVCache(KVCacheConfig(l1_tokens=10**6, bytes_per_token=1.0, block_tokens=block,
                              page_size=page))  # fmt: skip
    for i, n in enumerate(lengths):
        ids = tuple(range(100 * i, 100 * i + -(-n // block)))
        path, new_pages = c.insert(ids, n, float(i))
        assert sum(node.pages for node in path) == new_pages == c.pages(n)
        # a prompt sharing the first blocks charges only the pages it adds beyond them
        longer = ids[:-1] + (7_000 + i, 7_001 + i) if n > block else None
        if longer:
            m = (len(ids) - 1) * block + 2 * block
            p2, added = c.insert(longer, m, float(i))
            assert added == c.pages(m) - c.pages((len(ids) - 1) * block)
            assert sum(node.pages for node in p2) == c.pages(m)
        c.check_invariants()


def test_a_cache_of_16_token_blocks_holds_its_capacity_under_64_token_pages():
    c = KVCache(cfg(l1_tokens=1024, block_tokens=16, page_size=64))
    for i in range(16):  # 16 prompts of 64 tokens (4 blocks each) fill L1 exactly
        ids = tuple(range(10 * i, 10 * i + 4))
        assert c.make_room(L1, 64, float(i))
        c.insert(ids, 64, float(i))
    assert c.used[L1] == 1024 and c.stats.evicted_tokens[L1] == 0
    c.check_invariants()
    assert c.lookup(tuple(range(4)) + (99,), 80).tokens == [64, 0, 0]


def test_lru_evicts_least_recent_leaf_first():
    c = KVCache(cfg(l1_tokens=16))
    serve(c, (1, 2), 8, 0.0)
    serve(c, (3, 4), 8, 1.0)
    serve(c, (1, 2), 8, 2.0)  # refresh (1, 2)
    serve(c, (5, 6), 8, 3.0)  # must evict (3, 4): leaf 4 first, then 3
    assert c.lookup((3, 4), 9).total_tokens == 0
    assert c.lookup((1, 2), 9).total_tokens == 8
    assert c.stats.evicted_tokens[L1] == 8


def test_lfu_keeps_frequent_blocks():
    c = KVCache(cfg(l1_tokens=16, eviction="lfu"))
    for t in range(3):
        serve(c, (1, 2), 8, float(t))
    serve(c, (3, 4), 8, 5.0)
    serve(c, (5, 6), 8, 6.0)  # LRU would evict (1, 2); LFU evicts the once-used (3, 4)
    assert c.lookup((1, 2), 9).total_tokens == 8
    assert c.lookup((3, 4), 9).total_tokens == 0


def test_pinned_pages_are_never_evicted():
    c = KVCache(cfg(l1_tokens=16))
    serve(c, (1, 2), 8, 0.0)
    hit = c.lookup((1, 2, 3), 12)
    assert c.acquire(hit, 1.0) == 1.0
    assert not c.make_room(L1, 16, 2.0)  # 8 tokens pinned
    assert c.make_room(L1, 8, 2.0)
    assert c.lookup((1, 2), 9).total_tokens == 8
    c.release(hit.nodes, 3.0)
    assert c.make_room(L1, 16, 4.0)
    c.check_invariants()


def test_write_through_to_l2_then_reload_is_timed_by_bandwidth():
    c = KVCache(cfg(l1_tokens=8, l2_tokens=64, l2_read_bytes_per_s=1000.0 * 4 / 0.5))
    serve(c, (1, 2), 8, 0.0)
    assert c.stats.bytes_moved["l1_to_l2"] == 8 * 1000.0
    serve(c, (3, 4), 8, 1.0)  # evicts (1, 2) from L1; they stay in L2
    hit = c.lookup((1, 2, 7), 12)
    assert hit.tokens == [0, 8, 0]
    done = c.acquire(hit, 10.0)  # 8 tokens * 1000 B at 8000 B/s
    assert done == pytest.approx(10.0 + 1.0)
    assert c.lookup((1, 2, 7), 12).tokens == [8, 0, 0]
    c.release(hit.nodes, 11.0)
    c.check_invariants()


def test_write_back_moves_only_on_eviction_and_l3_below():
    c = KVCache(cfg(l1_tokens=12, l2_tokens=8, l3_tokens=64, write_policy="write_back"))
    serve(c, (1, 2), 8, 0.0)
    assert c.stats.bytes_moved["l1_to_l2"] == 0
    serve(c, (3, 4), 8, 1.0)  # leaf 2 leaves L1: written back with its prefix (1, 2)
    assert c.stats.bytes_moved["l1_to_l2"] == 8 * 1000.0
    assert c.lookup((1, 2, 0), 12).tokens == [4, 4, 0]
    serve(c, (5, 6), 8, 2.0)  # L1 drops 1 and 4; (3, 4) into L2 pushes (1, 2) down to L3
    assert c.lookup((1, 2, 0), 12).tokens == [0, 0, 8]
    hit, done = serve(c, (1, 2, 0), 12, 3.0)
    assert hit.tokens == [0, 0, 8] and done > 3.0
    assert c.stats.bytes_moved["l3_to_l2"] == 8 * 1000.0
    assert c.lookup((1, 2, 0), 12).tokens == [11, 0, 0]


class RefLRU:
    """Brute-force single-tier LRU over prefix paths, as a reference. Every block is full.
    Like the engine: the hit is pinned, room is made for the tokens to compute (evicting the
    least recently used unpinned leaves), then the prompt's blocks are inserted."""

    def __init__(self, capacity_tokens):
        self.cap = capacity_tokens
        self.last = {}  # path tuple -> last use
        self.l2 = None  # RefL1OverL2: every prefix ever written to L2

    def serve(self, ids, input_len, now):
        return sum(self.serve_tiers(ids, input_len, now))

    def serve_tiers(self, ids, input_len, now):
        """Hit tokens per tier ([L1, L2, 0]) of one prompt, then its blocks inserted."""
        l1 = 0
        while l1 < len(ids) and ids[: l1 + 1] in self.last:
            l1 += 1
        total = l1
        while self.l2 is not None and total < len(ids) and ids[: total + 1] in self.l2:
            total += 1
        hit = min(total * BT, input_len - 1)  # the last token is always computed
        l1_hit = min(l1 * BT, hit)
        pinned = {ids[:k] for k in range(1, l1 + 1)}
        loaded = (total - l1) * BT  # L2 blocks brought into L1
        while len(self.last) * BT + loaded + (input_len - hit) > self.cap:
            leaves = [
                p
                for p in self.last
                if p not in pinned
                and not any(len(q) > len(p) and q[: len(p)] == p for q in self.last)
            ]
            del self.last[min(leaves, key=lambda p: self.last[p])]
        for k in range(1, len(ids) + 1):
            self.last[ids[:k]] = now
            if self.l2 is not None:
                self.l2.add(ids[:k])
        return [l1_hit, hit - l1_hit, 0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 3), min_size=1, max_size=5).map(tuple), min_size=1, max_size=40
    ),
    st.integers(3, 10),
)
def test_single_tier_matches_brute_force_lru(prompts, capacity_blocks):
    c = KVCache(cfg(l1_tokens=capacity_blocks * BT + BT * 5))
    ref = RefLRU(capacity_blocks * BT + BT * 5)
    for t, ids in enumerate(prompts):
        n = len(ids) * BT
        hit, _ = serve(c, ids, n, float(t))
        assert hit.total_tokens == ref.serve(ids, n, float(t))


class RefL1OverL2(RefLRU):
    """Brute-force L1 LRU over an L2 that keeps every block ever written (write-through): the
    hit is the L1 prefix, then the L2 prefix beyond it, which is loaded into L1."""

    def __init__(self, capacity_tokens):
        super().__init__(capacity_tokens)
        self.l2 = set()

    serve = RefLRU.serve_tiers


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 3), min_size=1, max_size=5).map(tuple), min_size=1, max_size=40
    ),
    st.integers(3, 10),
)
def test_l1_over_l2_matches_brute_force_reference(prompts, capacity_blocks):
    cap = capacity_blocks * BT + BT * 5
    c = KVCache(cfg(l1_tokens=cap, l2_tokens=10_000))
    ref = RefL1OverL2(cap)
    for t, ids in enumerate(prompts):
        n = len(ids) * BT
        hit, _ = serve(c, ids, n, float(t))
        assert hit.tokens == ref.serve(ids, n, float(t))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 4), min_size=1, max_size=6).map(tuple),
            st.integers(0, 3),  # how many requests stay running (pinned)
        ),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(["write_through", "write_back"]),
    st.sampled_from(["lru", "lfu"]),
    st.sampled_from([1, 3, 4, 8, 16]),
)
def test_random_traffic_keeps_invariants(ops, write_policy, eviction, page_size):
    c = KVCache(
        cfg(l1_tokens=48, l2_tokens=32, l3_tokens=40, write_policy=write_policy, eviction=eviction,
            page_size=page_size)
    )  # fmt: skip
    running = []
    for t, (ids, keep) in enumerate(ops):
        now = float(t)
        n = len(ids) * BT - 1
        hit = c.lookup(ids, n)
        assert 0 <= hit.total_tokens <= n - 1
        done = c.acquire(hit, now)
        if done is None:
            continue
        assert done >= now
        new = c.pages(n - hit.total_tokens)
        if not c.make_room(L1, new, now):
            c.release(hit.nodes, now)
            continue
        c.alloc_private(new)
        path, new_pages = c.insert(ids, n, now)
        assert new_pages <= new  # the blocks computed fit in the KV allocated for them
        c.free_private(new)
        c.pin(path)
        c.release(hit.nodes, now)
        running.append(path)
        while len(running) > keep:
            c.release(running.pop(0), now)
        c.check_invariants()
    for path in running:
        c.release(path, 99.0)
    c.check_invariants()
    assert c.pinned_nodes() == 0
    for t in (L1, L2, L3):
        assert c.used[t] <= c.capacity[t]


def test_prefetch_reports_the_landing_of_its_own_read_not_a_stale_copy():
    # a block evicted from L2 while its write-through copy was still in flight, then read back
    # from L3: the prefetch lands when the new read does, not when the old copy would have
    c = KVCache(
        cfg(l1_tokens=1000, l2_tokens=2 * BT, l3_tokens=10_000, l2_write_bytes_per_s=1e3,
            l3_read_bytes_per_s=1e6)
    )  # fmt: skip
    (a,), _ = c.insert([1], BT, 0.0)
    assert a.l2_ready_s == pytest.approx(4.0)  # 4 tokens x 1 kB at 1 kB/s
    c.insert([2, 3], 2 * BT, 0.1)  # L2 is full: block 1 leaves it, its copy never lands
    assert c.make_room(L1, 1000, 0.2) and a.tiers == [False, False, True]
    done = c.prefetch_to_l2([a], 0.3)
    assert done == pytest.approx(0.3 + 4e3 / 1e6) == a.l2_ready_s
    c.check_invariants()
