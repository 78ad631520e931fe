"""Router policies: valid picks, each policy's rule, the cache-aware index, seeds, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.serving.router import POLICIES, Router, RouterConfig
from hisim_jax.serving.workload import Request

BT = 16  # block tokens in these tests


def req(i: int, input_len: int, output_len: int = 8, blocks: tuple[int, ...] | None = None):
    """A request; blocks=None gives it its own unique block ids (no prefix shared)."""
    if blocks is None:
        blocks = tuple(10_000 * (i + 1) + k for k in range(-(-input_len // BT)))
    return Request(
        request_id=i,
        arrival_s=0.01 * i,
        input_len=input_len,
        output_len=output_len,
        block_ids=blocks,
    )


def prefix_req(i: int, shared: tuple[int, ...], n_own: int = 0) -> Request:
    """A request whose first blocks are ``shared`` followed by ``n_own`` blocks of its own."""
    blocks = shared + tuple(10_000 * (i + 1) + k for k in range(n_own))
    return req(i, len(blocks) * BT, blocks=blocks)


def random_requests(seed: int, n: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        input_len = int(rng.integers(1, 20 * BT))
        n_blocks = -(-input_len // BT)
        # a few shared system prompts, so prefixes collide across requests
        head = int(rng.integers(0, 4))
        blocks = tuple((head, k) if k < n_blocks // 2 else (i, k) for k in range(n_blocks))
        blocks = tuple(hash(b) for b in blocks) if rng.random() < 0.9 else ()
        out.append(req(i, input_len, int(rng.integers(1, 64)), blocks))
    return out


# -- every policy --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    n=st.integers(3, 9),
    seed=st.integers(0, 2**31),
    finish_every=st.integers(1, 5),
)
def test_every_policy_picks_valid_replicas_and_counts(policy, n, seed, finish_every):
    router = Router(
        RouterConfig(policy=policy, seed=seed, balance_abs_threshold=3),
        n,
        BT,
        index_tokens=[5 * BT] * n,
    )
    inflight = []
    for i, r in enumerate(random_requests(seed, 200)):
        replica = router.route(r, r.arrival_s)
        assert isinstance(replica, int) and 0 <= replica < n
        inflight.append((r, replica))
        if i % finish_every == 0:
            done, where = inflight.pop(0)
            router.finish(done, where, r.arrival_s)
    assert router.routed.sum() == 200
    expect_tokens = np.zeros(n, dtype=np.int64)
    for r, where in inflight:
        expect_tokens[where] += r.input_len + r.output_len
    np.testing.assert_array_equal(router.outstanding_tokens, expect_tokens)
    assert router.outstanding_requests.sum() == len(inflight)
    for r, where in inflight:
        router.finish(r, where, 10.0)
    assert not router.outstanding_tokens.any() and not router.outstanding_requests.any()


def test_round_robin_cycles():
    router = Router(RouterConfig(policy="round_robin"), 3, BT)
    assert [router.route(req(i, 32), 0.0) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_picks_minimum_and_finish_lowers_load():
    router = Router(RouterConfig(policy="least_loaded"), 4, BT)
    rng = np.random.default_rng(1)
    routed = []
    for i in range(50):
        r = req(i, int(rng.integers(1, 500)))
        before = router.outstanding_tokens
        where = router.route(r, 0.0)
        assert where == int(np.argmin(before))  # argmin: lowest index among ties
        routed.append((r, where))
    r, where = max(routed, key=lambda rw: rw[0].input_len)
    load = router.outstanding_tokens[where]
    router.finish(r, where, 1.0)
    assert router.outstanding_tokens[where] == load - r.input_len - r.output_len
    router2 = Router(RouterConfig(policy="least_loaded"), 2, BT)
    big, small = req(0, 400), req(1, 10)
    assert router2.route(big, 0.0) == 0
    assert router2.route(small, 0.0) == 1
    assert router2.route(req(2, 10), 0.0) == 1  # 1 holds 36 tokens, 0 holds 408
    router2.finish(big, 0, 1.0)
    assert router2.route(req(3, 10), 0.0) == 0


def test_finish_rejects_unknown_replica_and_underflow():
    router = Router(RouterConfig(policy="round_robin"), 2, BT)
    with pytest.raises(ValueError, match="replica 5"):
        router.finish(req(0, 32), 5, 0.0)
    with pytest.raises(ValueError, match="replica 1"):
        router.finish(req(0, 32), 1, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_power_of_two_with_two_replicas_always_picks_the_less_loaded(seed):
    router = Router(RouterConfig(policy="power_of_two", seed=seed), 2, BT)
    rng = np.random.default_rng(seed)
    picks = set()
    for i in range(300):
        before = router.outstanding_tokens
        where = router.route(req(i, int(rng.integers(1, 300))), 0.0)
        assert before[where] <= before[1 - where]
        picks.add(where)
    assert picks == {0, 1}


def test_power_of_two_never_picks_the_unique_most_loaded():
    router = Router(RouterConfig(policy="power_of_two", seed=3), 5, BT)
    rng = np.random.default_rng(3)
    for i in range(500):
        before = router.outstanding_tokens
        where = router.route(req(i, int(rng.integers(1, 300))), 0.0)
        if (before == before.max()).sum() == 1:
            assert where != int(np.argmax(before))
    assert Router(RouterConfig(policy="power_of_two"), 1, BT).route(req(0, 5), 0.0) == 0


@pytest.mark.parametrize("policy", ["random", "power_of_two"])
def test_same_seed_same_routes(policy):
    reqs = random_requests(5, 300)

    def run(seed):
        router = Router(RouterConfig(policy=policy, seed=seed), 8, BT)
        return [router.route(r, r.arrival_s) for r in reqs]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_random_is_roughly_uniform():
    router = Router(RouterConfig(policy="random", seed=0), 4, BT)
    for i in range(4000):
        router.route(req(i, 16), 0.0)
    assert np.all(np.abs(router.routed - 1000) < 150)


# -- bucket --------------------------------------------------------------------------------------


def test_bucket_default_groups_respect_exclusive_upper_bounds():
    router = Router(RouterConfig(policy="bucket"), 6, BT)  # groups (0, 1), (2, 3), (4, 5)
    cases = [(1, {0, 1}), (2047, {0, 1}), (2048, {2, 3}), (8191, {2, 3}), (8192, {4, 5})]
    for i, (input_len, group) in enumerate(cases * 3):
        assert router.route(req(i, input_len), 0.0) in group


def test_bucket_explicit_groups_and_least_loaded_within_group():
    cfg = RouterConfig(policy="bucket", bucket_bounds=(100,), bucket_groups=((3,), (0, 1, 2)))
    router = Router(cfg, 4, BT)
    assert [router.route(req(i, 50), 0.0) for i in range(3)] == [3, 3, 3]
    big = req(10, 5000)
    assert router.route(big, 0.0) == 0
    assert router.route(req(11, 200), 0.0) == 1
    assert router.route(req(12, 300), 0.0) == 2
    assert router.route(req(13, 150), 0.0) == 1  # 1 holds 208 tokens, 2 holds 308, 0 holds 5008
    router.finish(big, 0, 1.0)
    assert router.route(req(14, 150), 0.0) == 0


def test_bucket_default_groups_are_contiguous_and_near_equal():
    router = Router(RouterConfig(policy="bucket", bucket_bounds=(10, 20)), 7, BT)
    seen = {0: set(), 1: set(), 2: set()}
    for i in range(60):
        input_len = (5, 15, 25)[i % 3]
        seen[i % 3].add(router.route(req(i, input_len), 0.0))
    assert seen == {0: {0, 1, 2}, 1: {3, 4}, 2: {5, 6}}


# -- cache_aware ---------------------------------------------------------------------------------

SHARED = tuple(range(100, 110))  # a 10-block prefix


def test_cache_aware_follows_a_shared_prefix_when_balanced():
    router = Router(RouterConfig(), 4, BT)
    assert router.route(req(0, 64), 0.0) == 0  # all indexes empty: lowest index
    first = router.route(prefix_req(1, SHARED), 0.0)
    assert first == 1  # smallest index (1, 2, 3 empty), then lowest index
    for i in range(2, 6):
        router.route(req(i, 64), 0.0)  # unrelated prompts fill the other replicas
    follower = prefix_req(6, SHARED[:8], n_own=2)
    assert router.matched_tokens(follower, 1) == 8 * BT
    assert router.matched_tokens(follower, 0) == 0
    assert router.route(follower, 0.0) == 1


def test_cache_aware_match_below_threshold_goes_to_the_smallest_index():
    router = Router(RouterConfig(cache_threshold=0.5), 3, BT)
    router.route(prefix_req(0, SHARED), 0.0)  # replica 0, 10 blocks
    router.route(req(1, 4 * BT), 0.0)  # replica 1, 4 blocks
    # 5 of 10 blocks shared: rate 0.5 is not above the threshold -> smallest index (2, empty)
    assert router.route(prefix_req(2, SHARED[:5], n_own=5), 0.0) == 2
    # 6 of 10 blocks: rate 0.6 > 0.5 -> back to replica 0
    assert router.route(prefix_req(3, SHARED[:6], n_own=4), 0.0) == 0


def test_cache_aware_goes_to_least_loaded_only_past_both_thresholds():
    def run(cfg):
        router = Router(cfg, 2, BT)
        router.route(req(0, 64), 0.0)  # replica 0
        return [router.route(prefix_req(i, SHARED, n_own=1), 0.0) for i in range(1, 6)]

    # loads (in-flight requests) stay within the defaults (64 and 1.5): the prefix wins
    assert run(RouterConfig()) == [1, 1, 1, 1, 1]
    # abs threshold 2: at 3 vs 1 in flight (3 - 1 = 2) the prefix still wins; at 4 vs 1
    # (4 - 1 > 2 and 4 > 1.5 * 1) the request spills to the least loaded replica 0
    assert run(RouterConfig(balance_abs_threshold=2)) == [1, 1, 1, 1, 0]
    # a relative threshold of 4 is not exceeded by 4 vs 1, so the prefix still wins
    assert run(RouterConfig(balance_abs_threshold=2, balance_rel_threshold=4.0)) == [1] * 5


def test_cache_aware_ties_prefer_fewer_in_flight_requests():
    router = Router(RouterConfig(), 3, BT)
    a = router.route(prefix_req(0, SHARED), 0.0)
    b = router.route(req(1, 4 * BT), 0.0)
    c = router.route(req(2, 4 * BT), 0.0)
    assert (a, b, c) == (0, 1, 2)
    router.finish(req(1, 4 * BT), 1, 0.0)
    # replicas 1 and 2 have equal index sizes; 1 has fewer in flight
    assert router.route(req(3, 2 * BT), 0.0) == 1


def test_cache_aware_equal_matches_prefer_fewer_in_flight_then_lowest_index():
    router = Router(RouterConfig(balance_abs_threshold=1), 3, BT)
    r0, r1, r2, r3, r4 = (prefix_req(i, SHARED, n_own=1) for i in range(5))
    assert router.route(r0, 0.0) == 0
    assert router.route(r1, 0.0) == 0  # loads 1, 0, 0: not imbalanced, the prefix wins
    assert router.route(r2, 0.0) == 1  # loads 2, 0, 0: imbalanced; replica 1 learns SHARED
    router.finish(r1, 0, 0.0)
    assert router.route(r3, 0.0) == 0  # 0 and 1 match alike, with 1 in flight each
    router.finish(r0, 0, 0.0)
    router.finish(r2, 1, 0.0)
    assert router.route(r4, 0.0) == 1  # 0 and 1 match alike; 1 has fewer in flight


def test_cache_aware_without_block_ids_matches_nothing_and_adds_nothing():
    router = Router(RouterConfig(), 3, BT)
    picks = [router.route(req(i, 100, blocks=()), 0.0) for i in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]  # equal (empty) indexes: fewest in flight
    assert not router.index_size_tokens.any()
    assert router.matched_tokens(req(9, 100, blocks=()), 0) == 0


def test_equal_ids_under_different_prefixes_do_not_match():
    router = Router(RouterConfig(), 2, BT)
    router.route(req(0, 3 * BT, blocks=(1, 2, 3)), 0.0)
    assert router.matched_tokens(req(1, 3 * BT, blocks=(9, 2, 3)), 0) == 0
    assert router.matched_tokens(req(1, 3 * BT, blocks=(1, 2, 4)), 0) == 2 * BT
    # the match is capped at the prompt: a partial last block counts its own tokens only
    assert router.matched_tokens(req(2, 2 * BT + 3, blocks=(1, 2, 3)), 0) == 2 * BT + 3


def test_index_eviction_is_bounded_and_takes_leaves_first():
    router = Router(RouterConfig(), 1, BT, index_tokens=[4 * BT])
    a = req(0, 4 * BT, blocks=(1, 2, 3, 4))
    router.route(a, 0.0)
    assert router.index_size_tokens[0] == 4 * BT
    router.route(req(1, BT, blocks=(9,)), 0.0)
    assert router.index_size_tokens[0] == 4 * BT
    assert router.matched_tokens(a, 0) == 3 * BT  # a's leaf went, its prefix stayed
    router.route(req(2, 2 * BT, blocks=(7, 8)), 0.0)
    assert router.matched_tokens(a, 0) == BT
    router.route(req(3, 2 * BT, blocks=(1, 5)), 0.0)  # refreshes block 1, so (9,) goes next
    assert router.matched_tokens(a, 0) == BT
    assert router.matched_tokens(req(4, BT, blocks=(9,)), 0) == 0
    assert router.index_size_tokens[0] <= 4 * BT


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), cap_blocks=st.integers(1, 40), n=st.integers(1, 4))
def test_index_stays_bounded_and_prefix_closed(seed, cap_blocks, n):
    router = Router(RouterConfig(), n, BT, index_tokens=[cap_blocks * BT] * n)
    seen = []
    for r in random_requests(seed, 80):
        router.route(r, 0.0)
        seen.append(r)
        assert np.all(router.index_size_tokens <= cap_blocks * BT)
    for replica in range(n):
        held = router._lru[replica]
        assert sum(held.values()) == router.index_size_tokens[replica]
        for r in seen:
            present = [k in held for k in router._chain(r)[0]]
            # prefix-closed: once a block is missing, no later block of that prompt is held
            assert present == sorted(present, reverse=True)
            assert router.matched_tokens(r, replica) == min(sum(present) * BT, r.input_len)


def test_cache_aware_route_is_fast_enough():
    # 16 replicas, ~30-block prompts: the budget is well under 50 us per call; allow slack
    import time

    rng = np.random.default_rng(0)
    heads = [tuple(int(x) for x in rng.integers(0, 2**40, 20)) for _ in range(32)]
    reqs = [prefix_req(i, heads[i % 32], n_own=int(rng.integers(5, 15))) for i in range(3000)]
    router = Router(RouterConfig(), 16, BT, index_tokens=[2000 * BT] * 16)
    t0 = time.perf_counter()
    for r in reqs:
        router.route(r, 0.0)
    per_call_s = (time.perf_counter() - t0) / len(reqs)
    assert per_call_s < 200e-6


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy", "foo"),
        ("seed", -1),
        ("cache_threshold", 1.5),
        ("cache_threshold", -0.1),
        ("balance_abs_threshold", -1),
        ("balance_abs_threshold", 2.5),
        ("balance_rel_threshold", 0.5),
        ("balance_rel_threshold", float("nan")),
        ("bucket_bounds", (8192, 2048)),
        ("bucket_bounds", (0, 10)),
        ("bucket_groups", ((0,), (1,))),
        ("bucket_groups", ((0,), (), (1,))),
        ("bucket_groups", ((0,), (1, 1), (2,))),
        ("bucket_groups", ((0,), (-1,), (2,))),
    ],
)
def test_invalid_config_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        RouterConfig(**{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and "\n" not in msg


def test_unknown_policy_lists_the_choices():
    with pytest.raises(ValueError, match=r"router policy 'foo' unknown \(choose from random, "):
        RouterConfig(policy="foo")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_replicas=0), "n_replicas"),
        (dict(block_tokens=0), "block_tokens"),
        (dict(index_tokens=[10, 10]), "index_tokens"),
        (dict(index_tokens=[10, -1, 10]), "index_tokens"),
        (
            dict(cfg=RouterConfig(policy="bucket", bucket_groups=((0,), (1,), (3,)))),
            "bucket_groups",
        ),
        (dict(cfg=RouterConfig(policy="bucket"), n_replicas=2), "n_replicas"),
    ],
)
def test_invalid_router_arguments(kwargs, field):
    args = dict(cfg=RouterConfig(), n_replicas=3, block_tokens=BT) | kwargs
    with pytest.raises(ValueError, match=f"router {field} "):
        Router(**args)
