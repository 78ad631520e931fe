"""Prefix caching for hybrid models (recurrent-state layers): a prefix is reusable only up to a
saved state. Checked against a brute-force reference of the rule, against the cache as it was
before states existed, and on the cases that motivate it (multi-turn chat, offload to L2)."""

import functools
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.serving import kvcache
from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.kvcache import L1, KVCache, KVCacheConfig
from hisim_jax.serving.kvstore import KVStore, KVStoreConfig
from hisim_jax.serving.scheduler.base import SchedulerConfig
from hisim_jax.serving.workload import chat_sessions

BT = 4  # tokens per block in these tests
REPO = Path(__file__).resolve().parents[2]
# the last commit of kvcache.py before state checkpoints: the behaviour they must not change
BEFORE_STATES = "a5f3f2943db1dbf3d6a505ee800bd44915ba6516"


def cfg(**kw):
    base = dict(l1_tokens=40, bytes_per_token=1000.0, block_tokens=BT)
    base.update(kw)
    return KVCacheConfig(**base)


def serve(cache, ids, input_len, now):
    """One request's life, as the engine drives it: look up, acquire, compute the rest,
    insert, release. Returns the hit."""
    hit = cache.lookup(ids, input_len)
    cache.record_lookup(hit.tokens, input_len)
    assert cache.acquire(hit, now) is not None
    new = cache.pages(input_len - hit.total_tokens)
    assert cache.make_room(L1, new, now)
    cache.alloc_private(new)
    path, new_pages = cache.insert(ids, input_len, now, prefix=hit.nodes)
    cache.free_private(new)
    cache.pin(path[len(hit.nodes) :])
    cache.release(path, now)
    cache.check_invariants()
    return hit


def test_off_by_default_and_grid_must_be_non_negative():
    assert cfg().state_checkpoints is False and cfg().state_grid_tokens == 0
    with pytest.raises(ValueError, match="state_grid_tokens"):
        cfg(state_grid_tokens=-1)


# ------------------------------------------------------------------------------------------
# the rule on small cases


def test_a_hit_ends_at_the_deepest_saved_state_before_the_last_token():
    c = KVCache(cfg(state_checkpoints=True))
    serve(c, (1, 2), 8, 0.0)  # state at 8
    serve(c, (1, 2, 3, 4), 16, 1.0)  # state at 16; block 3 (at 12) holds KV only
    assert c.lookup((1, 2, 3, 4, 5), 20).tokens == [16, 0, 0]
    hit = c.lookup((1, 2, 3, 9), 16)  # the KV of 12 tokens is cached, the deepest state is at 8
    assert hit.tokens == [8, 0, 0] and len(hit.nodes) == 2
    assert hit.unpinned_l1_pages == 8
    # the same prompt again: its state is at its end, past the last token, so 8 (not 15)
    assert c.lookup((1, 2, 3, 4), 16).tokens == [8, 0, 0]
    assert c.lookup((1, 9), 8).total_tokens == 0  # no state on the path
    # without states the same cache contents give the KV prefix
    k = KVCache(cfg())
    for ids, n, t in (((1, 2), 8, 0.0), ((1, 2, 3, 4), 16, 1.0)):
        serve(k, ids, n, t)
    assert k.lookup((1, 2, 3, 9), 16).tokens == [12, 0, 0]
    assert k.lookup((1, 2, 3, 4), 16).tokens == [15, 0, 0]


def test_hits_and_misses_count_only_the_reusable_tokens():
    c = KVCache(cfg(state_checkpoints=True))
    serve(c, (1, 2), 8, 0.0)
    serve(c, (1, 2, 3, 4), 16, 1.0)
    before_hits, before_miss = sum(c.stats.hit_tokens), c.stats.miss_tokens
    hit = serve(c, (1, 2, 3, 9), 16, 2.0)
    assert sum(c.stats.hit_tokens) - before_hits == hit.total_tokens == 8
    assert c.stats.miss_tokens - before_miss == 8  # block 3's KV was held, but recomputed
    # the second prompt reused the first's 8 tokens, at their state
    assert c.stats.hit_tokens == [8 + 8, 0, 0] and c.stats.miss_tokens == 8 + 8 + 8


def test_a_partial_last_block_holds_its_prompts_state_but_no_longer_prompt_reaches_it():
    c = KVCache(cfg(state_checkpoints=True))
    serve(c, (1, 2, 7), 10, 0.0)  # blocks of 4, 4, 2: the state is on the partial block
    assert c.lookup((1, 2, 7), 10).total_tokens == 0  # identical prompt: past its last token
    assert c.lookup((1, 2, 7, 8), 12).total_tokens == 0  # 7 is a full block here: other KV
    c = KVCache(cfg(state_checkpoints=True, state_grid_tokens=BT))
    serve(c, (1, 2, 7), 10, 0.0)  # on a grid of one block: the state is kept at 8
    assert c.lookup((1, 2, 7), 10).tokens == [8, 0, 0]
    assert c.lookup((1, 2, 3, 8), 16).tokens == [8, 0, 0]


def test_a_state_is_kept_only_on_a_page_boundary():
    c = KVCache(cfg(state_checkpoints=True, page_size=8, l1_tokens=64))
    serve(c, (1, 2, 3), 12, 0.0)  # ends inside a page: no state
    assert c.lookup((1, 2, 3, 4), 16).total_tokens == 0
    serve(c, (1, 2, 3, 4), 16, 1.0)
    assert c.lookup((1, 2, 3, 4, 5), 20).tokens == [16, 0, 0]
    c.check_invariants()
    # on a grid of 12 tokens with pages of 8, the block below the grid point on a page: 8
    c = KVCache(cfg(state_checkpoints=True, page_size=8, l1_tokens=64, state_grid_tokens=12))
    serve(c, (1, 2, 3, 4, 5), 20, 0.0)
    assert c.lookup((1, 2, 3, 4, 5, 6), 24).tokens == [8, 0, 0]


def test_the_state_moves_down_the_tiers_with_its_block_and_is_served_from_there():
    c = KVCache(cfg(state_checkpoints=True, l1_tokens=16, l2_tokens=8, l3_tokens=64))
    serve(c, (1, 2), 8, 0.0)
    serve(c, (3, 4), 8, 1.0)
    serve(c, (5, 6), 8, 2.0)  # (1, 2) leaves L1, then L2: only L3 holds it
    assert c.lookup((1, 2, 9), 12).tokens == [0, 0, 8]
    hit = serve(c, (1, 2, 9), 12, 3.0)
    assert hit.tokens == [0, 0, 8] and hit.lower_nodes == 2
    assert c.lookup((1, 2, 9, 5), 16).tokens == [12, 0, 0]  # its own state, now in L1


def test_a_block_that_left_every_tier_comes_back_without_its_state():
    c = KVCache(cfg(state_checkpoints=True, l1_tokens=12))
    serve(c, (1, 2), 8, 0.0)  # state at 8
    serve(c, (1, 2, 3), 12, 1.0)  # block 2 is now inner: kept while its child is
    assert c.make_room(L1, 12, 2.0)  # everything leaves L1, the only tier
    assert c.lookup((1, 2, 9), 12).total_tokens == 0
    serve(c, (1, 2, 3), 12, 3.0)  # recomputed: blocks 1, 2 again, but the state is at 12 only
    assert c.lookup((1, 2, 9), 12).total_tokens == 0
    assert c.lookup((1, 2, 3, 9), 16).tokens == [12, 0, 0]


def test_a_shared_store_block_of_another_replica_carries_no_state():
    store = KVStore(KVStoreConfig(capacity_tokens=1000))
    a = KVCache(cfg(state_checkpoints=True), shared=store)
    b = KVCache(cfg(state_checkpoints=True), shared=store)
    serve(a, (1, 2), 8, 0.0)  # written through to the store, state held by a
    assert a.lookup((1, 2, 3), 12).tokens == [8, 0, 0]
    assert b.lookup((1, 2, 3), 12, whole=True).tokens == [0, 0, 8]  # the KV is there
    assert b.lookup((1, 2, 3), 12).total_tokens == 0  # but b knows of no state


def test_a_state_held_through_the_store_is_lost_with_the_stores_copy():
    store = KVStore(KVStoreConfig(capacity_tokens=12))
    a = KVCache(cfg(state_checkpoints=True), shared=store)
    b = KVCache(cfg(state_checkpoints=True), shared=store)
    serve(a, (1, 2), 8, 0.0)  # state at 8, the KV written through to the store
    serve(b, (1, 2, 3), 12, 1.0)  # the store now holds block 3 as well
    a.lookup((1, 2, 3, 4), 16)  # a learns of block 3 from the store (a node resident nowhere)
    assert a.make_room(L1, a.capacity[L1], 2.0)  # a's blocks leave its only tier
    assert a.lookup((1, 2, 9), 12).tokens == [0, 0, 8]  # the store keeps KV and a's state
    serve(b, (7, 8, 9), 12, 3.0)  # the store drops blocks 1, 2 and 3
    assert a.lookup((1, 2, 9), 12).total_tokens == 0
    serve(a, (1, 2, 3, 4), 16, 4.0)  # blocks 1, 2 computed again: the state at 8 is gone
    assert a.lookup((1, 2, 9), 12).total_tokens == 0
    assert a.lookup((1, 2, 3, 4, 9), 20).tokens == [16, 0, 0]


def test_whole_lookups_take_back_every_resident_block():
    # a swapped request takes back its own blocks (with its own running state)
    c = KVCache(cfg(state_checkpoints=True))
    serve(c, (1, 2, 3), 10, 0.0)
    assert c.lookup((1, 2, 3), 10, whole=True).tokens == [10, 0, 0]


# ------------------------------------------------------------------------------------------
# two-turn chat: turn 2's prompt is turn 1's prompt + its output + new tokens


def _turns(first_len, out_len, next_len):
    """Block ids of two turns of one session, as the workload builds them: full blocks take
    the session stream's ids, a partial last block a fresh id of its own."""
    stream = iter(range(100, 200))
    fresh = iter(range(900, 1000))
    full = [next(stream) for _ in range(50)]

    def ids(n):
        q, r = divmod(n, BT)
        return tuple(full[:q]) + ((next(fresh),) if r else ())

    n2 = first_len + out_len + next_len
    return (ids(first_len), first_len), (ids(n2), n2)


@pytest.mark.parametrize("first_len", [12, 14])
@pytest.mark.parametrize("grid", [0, BT])
def test_turn_two_reuses_turn_one_where_its_state_was_saved(first_len, grid):
    (ids1, n1), (ids2, n2) = _turns(first_len, out_len=5, next_len=3)
    c = KVCache(cfg(state_checkpoints=True, state_grid_tokens=grid))
    serve(c, ids1, n1, 0.0)
    plain = KVCache(cfg())
    serve(plain, ids1, n1, 0.0)
    kv = plain.lookup(ids2, n2).total_tokens
    assert kv == first_len // BT * BT  # turn 1's whole cached sequence (its full blocks)
    hit = serve(c, ids2, n2, 1.0).total_tokens
    if first_len % BT == 0 or grid:  # the state sits at the end of turn 1's full blocks
        assert hit == kv
    else:  # the state is on turn 1's partial block, which turn 2 does not share
        assert hit == 0


def test_turn_two_falls_back_to_an_earlier_state_and_reads_it_from_l2():
    (ids1, n1), (ids2, n2) = _turns(14, out_len=5, next_len=3)
    c = KVCache(cfg(state_checkpoints=True, l1_tokens=24, l2_tokens=200))
    serve(c, ids1[:1], BT, 0.0)  # a system prompt of one block: a state at 4
    serve(c, ids1, n1, 1.0)
    serve(c, (7, 8, 9, 10, 11, 12), 24, 2.0)  # pushes the session out of L1 into L2
    hit = c.lookup(ids2, n2)
    assert hit.tokens == [0, BT, 0]  # turn 1's full blocks are in L2, its state is not at 12
    assert serve(c, ids2, n2, 3.0).tokens == [0, BT, 0]


# ------------------------------------------------------------------------------------------
# a brute-force reference of the rule on random traffic


def _pairs(ids, n):
    """(id, tokens) of each block of a prompt."""
    return tuple((b, min(BT, n - k * BT)) for k, b in enumerate(ids) if n - k * BT > 0)


def _resident(cache, pairs) -> bool:
    """Whether every block of a path is held in some tier of this replica."""
    node = cache.root
    for bid, tokens in pairs:
        node = node.children.get(bid)
        if node is None or node.tokens != tokens or not any(node.tiers):
            return False
    return True


class RefStates:
    """The rule by brute force: a set of saved state points (block paths). An insert saves one
    where the rule puts it; a point is forgotten once its blocks are not all cached. A match is
    the longest saved point that is a prefix of the prompt, ends on a page boundary before its
    last token and whose blocks are all cached."""

    def __init__(self, page, grid):
        self.page, self.grid = page, grid
        self.points: set = set()

    def saved(self, pairs, input_len, reached):
        """The point an insert of ``pairs`` saves, of which the first ``reached`` went in."""
        ends = np.cumsum([t for _, t in pairs]).tolist()
        if not self.grid:
            ok = reached == len(pairs) and ends[-1] == input_len and ends[-1] % self.page == 0
            return pairs if ok else None
        target = input_len // self.grid * self.grid
        for k in range(reached, 0, -1):
            if ends[k - 1] <= target and ends[k - 1] % self.page == 0:
                return pairs[:k]
        return None

    def forget_uncached(self, cache):
        self.points = {p for p in self.points if _resident(cache, p)}

    def match(self, cache, pairs, input_len) -> int:
        best = 0
        for p in self.points:
            end = sum(t for _, t in p)
            if pairs[: len(p)] == p and end <= input_len - 1 and _resident(cache, p):
                best = max(best, end)
        return best


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["serve", "serve", "match", "evict"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=6).map(tuple),
            st.integers(0, BT - 1),  # tokens short of full blocks
            st.integers(0, 2),  # evict: the tier; serve: how many requests stay pinned
        ),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([1, 2, 4, 8]),  # page size
    st.sampled_from([0, 0, BT, 8, 6]),  # state grid
    st.sampled_from(["write_through", "write_back"]),
    st.booleans(),  # lower tiers
)
def test_random_traffic_matches_the_brute_force_rule(ops, page, grid, write_policy, tiers):
    c = KVCache(
        cfg(state_checkpoints=True, state_grid_tokens=grid, page_size=page, l1_tokens=48,
            l2_tokens=32 if tiers else 0, l3_tokens=40 if tiers else 0, write_policy=write_policy)
    )  # fmt: skip
    ref = RefStates(page, grid)
    running = []
    for t, (op, ids, short, arg) in enumerate(ops):
        now = float(t)
        n = max(1, len(ids) * BT - short)
        pairs = _pairs(ids, n)
        hit = c.lookup(ids, n)
        assert hit.total_tokens == ref.match(c, pairs, n)
        assert sum(node.tokens for node in hit.nodes) == hit.total_tokens  # whole blocks
        if op == "evict":
            c.make_room(arg, c.capacity[arg], now)
            ref.forget_uncached(c)
        elif op == "serve":
            if c.acquire(hit, now) is None:
                ref.forget_uncached(c)
                continue
            new = c.pages(n - hit.total_tokens)
            if not c.make_room(L1, new, now):
                c.release(hit.nodes, now)
                ref.forget_uncached(c)
                continue
            ref.forget_uncached(c)  # what left every tier before the insert places it again
            c.alloc_private(new)
            path, _ = c.insert(ids, n, now, prefix=hit.nodes)
            c.free_private(new)
            c.pin(path[len(hit.nodes) :])
            point = ref.saved(pairs, n, len(path))
            if point is not None:
                ref.points.add(point)
            running.append(path)
            while len(running) > arg:
                c.release(running.pop(0), now)
            ref.forget_uncached(c)
        c.check_invariants()
    for path in running:
        c.release(path, 99.0)
    c.check_invariants()


# ------------------------------------------------------------------------------------------
# off: exactly the cache as it was before states


@functools.cache
def _module_before_states():
    try:
        src = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BEFORE_STATES}:hisim_jax/serving/kvcache.py"],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("kvcache_before_states")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up while it runs
    exec(compile(src, "kvcache_before_states.py", "exec"), mod.__dict__)
    return mod


def _snapshot(cache):
    s = cache.stats
    return (
        list(cache.used), list(cache.resident_nodes), cache.pinned_pages, cache.private,
        list(s.hit_tokens), s.miss_tokens, list(s.evicted_tokens), dict(s.bytes_moved),
        dict(cache.link_busy_until),
    )  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 4), min_size=1, max_size=6).map(tuple),
            st.integers(0, BT - 1),
            st.integers(0, 3),  # how many requests stay running (pinned)
            st.booleans(),  # prefetch to L2 first
        ),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(["write_through", "write_back"]),
    st.sampled_from(["lru", "lfu"]),
    st.sampled_from([1, 3, 4, 8]),
    st.booleans(),  # shared store instead of a local L3
)
def test_off_behaves_exactly_as_before(ops, write_policy, eviction, page, shared):
    old = _module_before_states()
    if old is None:
        pytest.skip("the repository's history is not available")
    kw = dict(l1_tokens=48, bytes_per_token=1000.0, block_tokens=BT, l2_tokens=32,
              l3_tokens=0 if shared else 40, write_policy=write_policy, eviction=eviction,
              page_size=page)  # fmt: skip
    caches = []
    for mod in (old, kvcache):
        store = KVStore(KVStoreConfig(capacity_tokens=60)) if shared else None
        caches.append(mod.KVCache(mod.KVCacheConfig(**kw), shared=store))
    runs = [[], []]
    for t, (ids, short, keep, prefetch) in enumerate(ops):
        now = float(t)
        n = max(2, len(ids) * BT - short)
        out = []
        for c, running in zip(caches, runs, strict=True):
            row = []
            if prefetch:
                h = c.lookup(ids, n)
                row.append(c.prefetch_to_l2(h.nodes, now))
            hit = c.lookup(ids, n, now)
            row += [list(hit.tokens), [x.id for x in hit.nodes], list(hit.tier_of),
                    hit.lower_pages, hit.lower_nodes, hit.unpinned_l1_pages]  # fmt: skip
            c.record_lookup(hit.tokens, n)
            done = c.acquire(hit, now)
            row.append(done)
            if done is not None:
                new = c.pages(n - hit.total_tokens)
                room = c.make_room(L1, new, now)
                row.append(room)
                if room:
                    c.alloc_private(new)
                    path, new_pages = c.insert(ids, n, now, prefix=hit.nodes)
                    c.free_private(new)
                    c.pin(path[len(hit.nodes) :])
                    running.append(path)
                    row.append(([x.id for x in path], new_pages))
                else:
                    c.release(hit.nodes, now)
            while len(running) > keep:
                c.release(running.pop(0), now)
            row.append(c.lookup(ids, n, whole=True).tokens)
            row.append(_snapshot(c))
            out.append(row)
        assert out[0] == out[1]
    for c, running in zip(caches, runs, strict=True):
        for path in running:
            c.release(path, 99.0)
        c.check_invariants()
    assert _snapshot(caches[0]) == _snapshot(caches[1])


# ------------------------------------------------------------------------------------------
# in the engine


class FakeCost:
    def step_latency_s(self, batches):
        return np.array([2e-3 + 2e-5 * sum(n for _, n in b) for b in batches])

    def decode_steps_s(self, ctx, k, padded=0, active=None):
        active = np.full(k, len(ctx)) if active is None else np.asarray(active)
        return np.array([5e-3 + 2e-5 * active[j] for j in range(k)])


@pytest.mark.parametrize("grid", [0, 64])
def test_an_engine_run_of_a_hybrid_model_reuses_less_and_accounts_for_it(grid):
    reqs = chat_sessions(40, 3.0, think_s_mean=2.0, block_tokens=64, seed=1).requests
    results = []
    for states in (False, True):
        cache = KVCacheConfig(
            l1_tokens=60_000, bytes_per_token=1e5, block_tokens=64, state_checkpoints=states,
            state_grid_tokens=grid,
        )  # fmt: skip
        eng = Engine(
            EngineConfig(SchedulerConfig(), cache, num_layers=32, max_context=32768), FakeCost()
        )
        res = eng.run(reqs)
        assert all(s.finish_s >= 0 and not s.rejected for s in res.states)
        res.cache.check_invariants()
        c = res.cache
        assert c.private == 0 and c.pinned_pages == 0
        hits = [sum(s.hit_tokens) for s in res.states]
        assert sum(hits) == sum(c.stats.hit_tokens)  # per request and per cache agree
        assert c.stats.miss_tokens == sum(r.input_len for r in reqs) - sum(hits)
        results.append(hits)
    plain, hybrid = results
    assert all(h <= p for h, p in zip(hybrid, plain, strict=True))  # states only take away
    if grid:  # turn k's state is kept on turn k-1's last full block: most of the reuse stays
        assert sum(hybrid) > 0.8 * sum(plain)
    else:  # states on partial last blocks: only the block-aligned prompts are reusable
        assert sum(hybrid) < 0.2 * sum(plain)
