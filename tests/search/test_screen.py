"""The analytical screen: LRU stack distances against a brute-force LRU cache, Poisson
quantiles, the steady state's monotonicity, and the correction fit."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.search.screen import (
    Correction,
    _poisson_ppf,
    _stack_distances,
    hit_tokens,
    screen,
    workload_stats,
)
from hisim_jax.serving import workload as wl


def _workload(chains, block_tokens=4, gap_s=0.5, output_len=20):
    reqs = [
        wl.Request(i, i * gap_s, len(c) * block_tokens + 1, output_len, tuple(c))
        for i, c in enumerate(chains)
    ]
    return wl.Workload(tuple(reqs), block_tokens, "test")


def _lru_hits(chains, capacity_blocks):
    """Blocks a single LRU cache of ``capacity_blocks`` hits, block by block (brute force)."""
    cache: OrderedDict = OrderedDict()
    hits = 0
    for chain in chains:
        node = ()
        for b in chain:
            node = (*node, b)
            if node in cache:
                hits += 1
                cache.move_to_end(node)
            else:
                cache[node] = True
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return hits


chains_st = st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(chains=chains_st, capacity=st.integers(1, 40))
def test_stack_distances_give_the_hits_of_an_lru_cache(chains, capacity):
    dist, owner = _stack_distances(_workload(chains).requests)
    assert len(dist) == len(owner)
    assert int((dist < capacity).sum()) == _lru_hits(chains, capacity)


def test_hit_tokens_grow_with_capacity_and_stop_at_the_infinite_cache():
    rng = np.random.default_rng(1)
    chains = [[0, *rng.integers(1, 6, size=rng.integers(1, 5)).tolist()] for _ in range(200)]
    stats = workload_stats(_workload(chains), samples=64)
    caps = np.array([0, 4, 16, 64, 256, 10**9], float)
    for affine in (True, False):
        h = hit_tokens(stats, caps, np.ones(len(caps)), np.full(len(caps), affine))
        assert (np.diff(h) >= 0).all() and h[0] == 0
        assert h[-1] == stats.reuse_tokens_inf
    # prefix-blind routing over 4 replicas finds a reused block on its own replica 1/4 of times
    blind = hit_tokens(stats, [10**9], [4], [False])[0]
    assert math.isclose(blind, stats.reuse_tokens_inf / 4)


@settings(max_examples=40, deadline=None)
@given(mean=st.floats(0.0, 30.0), u=st.floats(0.001, 0.999))
def test_poisson_quantile(mean, u):
    k = int(_poisson_ppf(np.array([mean]), np.array([u]))[0])
    cdf = lambda n: sum(math.exp(-mean) * mean**j / math.factorial(j) for j in range(n + 1))  # noqa: E731
    exact = next(n for n in range(200) if cdf(n) >= u - 1e-12)
    if mean < 12:  # summed exactly
        assert k == exact
    else:  # Wilson-Hilferty
        assert abs(k - exact) <= 2


def _chat_stats(n=300, seed=0):
    work = wl.select(wl.default_chat(seed=seed), limit=n)
    return workload_stats(work, samples=128, seed=seed)


def test_more_replicas_never_wait_longer_and_overload_shows_a_backlog():
    stats = _chat_stats()
    opts = [{"replicas": r, "rate_scale": 4.0} for r in (1, 2, 4, 8)]
    f = screen(opts, stats)
    for col in ("ttft_s_p99", "tpot_s_mean", "rho_prefill"):
        v = f[col].to_numpy()
        assert (np.diff(v) <= 1e-12).all(), col
    heavy = screen([{"rate_scale": 400.0}], stats)
    assert heavy["backlog"].iloc[0] > 0.5
    assert heavy["request_throughput_per_s"].iloc[0] < stats.rate_per_s * 400 / 2


def test_screen_rows_follow_their_options_not_their_neighbours():
    stats = _chat_stats()
    a = screen([{"replicas": 2}], stats)
    b = screen([{"replicas": 1}, {"replicas": 2}, {"engine": "vllm"}], stats)
    pd.testing.assert_frame_equal(a, b.iloc[[1]].reset_index(drop=True))


def test_correction_learns_a_constant_factor_and_leaves_unfitted_metrics():
    rng = np.random.default_rng(0)
    n = 12
    screened = pd.DataFrame(
        {c: rng.uniform(0.1, 1.0, n) for c in ("ttft_s_p99", "tpot_s_mean")}
        | {
            "rho_prefill": rng.uniform(0, 0.9, n),
            "backlog": np.zeros(n),
            "running_share": rng.uniform(0, 1, n),
        }  # fmt: skip
    )
    for c in Correction.none().spread:
        if c not in screened:
            screened[c] = np.nan
    sim = screened.copy()
    sim["ttft_s_p99"] *= 2.0
    corr = Correction.fit(screened, sim)
    out = corr.apply(screened)
    np.testing.assert_allclose(out["ttft_s_p99"], sim["ttft_s_p99"], rtol=0.05)
    np.testing.assert_allclose(out["tpot_s_mean"], screened["tpot_s_mean"], rtol=1e-6)
    assert corr.spread["ttft_s_p99"] < 0.05 and math.isinf(corr.spread["e2e_s_p99"])


def test_mixed_fleets_and_disaggregation_are_screened():
    stats = _chat_stats()
    f = screen(
        [
            {"fleet": "h100-sxm:1x2,h200-sxm:2x1", "router": "least_loaded"},
            {"replicas": 3},
            {"pd": "1:1", "replicas": 2},
            {"replicas": 2},
        ],
        stats,
    )
    assert np.isfinite(f[["ttft_s_p99", "tpot_s_p99", "request_throughput_per_s"]]).all().all()
    # a fleet is priced GPU by GPU: two H100s and one TP-2 H200
    from hisim_jax.specs import load_hardware

    h100, h200 = (load_hardware(n).price_usd_per_hour for n in ("h100-sxm", "h200-sxm"))
    assert math.isclose(f["usd_per_hour"].iloc[0], 2 * h100 + 2 * h200)
    # a decode replica's steps carry no prefill: its TPOT spread is the decode step's alone
    assert f["tpot_s_p99"].iloc[2] <= f["tpot_s_p99"].iloc[3] + 1e-12


def test_equal_weight_quantiles_match_the_weighted_ones():
    from hisim_jax.search.screen import _stats_columns

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (50, 256))
    x[rng.uniform(size=x.shape) < 0.1] = np.nan
    x[3] = np.nan  # a row with no sample
    w = np.full(x.shape, 1 / 256)
    weighted, plain = _stats_columns("t", x, w), _stats_columns("t", x, w, uniform=True)
    for k in weighted:
        np.testing.assert_allclose(weighted[k], plain[k], equal_nan=True)
    assert np.isnan(plain["t_s_p99"][3]) and np.isfinite(plain["t_s_p99"][0])


def test_hybrid_models_reuse_only_up_to_a_saved_state():
    from hisim_jax.search.screen import state_reuse_fraction

    # turn 2 extends turn 1's 4 blocks (64 tokens each); a third request shares 2 of them
    reqs = (
        wl.Request(0, 0.0, 256, 8, (1, 2, 3, 4)),
        wl.Request(1, 1.0, 384, 8, (1, 2, 3, 4, 5, 6)),
        wl.Request(2, 2.0, 200, 8, (1, 2, 9, 10)),
    )
    stats = workload_stats(wl.Workload(reqs, 64, "test"))
    assert stats.reuse_tokens_inf == 256 + 128
    assert state_reuse_fraction(stats, 0) == 1.0
    # grid 64: turn 1 saved its state at 256 tokens (turn 2 reuses all 4 blocks); request 2
    # matches 2 blocks, but no state was saved after 128 tokens
    assert state_reuse_fraction(stats, 64) == 256 / 384
    # grid 512: no prompt reaches a saved state
    assert state_reuse_fraction(stats, 512) == 0.0
