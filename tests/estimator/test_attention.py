"""The attention grid's closed forms against an exact block-by-block enumeration."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.estimator.attention import fa2 as attn

requests = st.lists(
    st.tuples(st.integers(0, 20_000), st.integers(1, 3000)), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(requests, st.sampled_from([1, 2, 8]))
def test_prefill_work_chain_blocks_match_enumeration(batch, heads):
    c = np.array([b[0] for b in batch], float)
    n = np.array([b[1] for b in batch], float)
    m = np.ones_like(c)
    work, chain, blocks = attn.prefill_features(c, n, m, float(heads), 0.0, attn.FA2, np)
    exact = attn.exact_prefill_blocks(batch, heads)
    assert work == pytest.approx(exact.sum())
    assert chain == pytest.approx(exact.max())
    assert blocks == len(exact)


@settings(max_examples=40, deadline=None)
@given(requests, st.sampled_from([4, 8, 32]), st.sampled_from([108, 132]))
def test_makespan_bounds_hold_for_exact_schedule(batch, heads, sms):
    """List scheduling lies between max(work/slots, chain) and work/slots + chain: the closed form
    the estimator uses is max(...) plus a fitted share of the smaller term."""
    blocks = attn.exact_prefill_blocks(batch, heads)
    exact = attn.exact_makespan(blocks, sms)
    lower = max(blocks.sum() / sms, blocks.max())
    assert lower - 1e-9 <= exact <= blocks.sum() / sms + blocks.max() + 1e-9


def _reference_num_splits(bnm, sms, n_blocks, max_splits=128):
    """FA2's num_splits_heuristic written as the straightforward loop."""
    slots = 2 * sms
    if bnm >= 0.8 * slots:
        return 1
    max_splits = min(max_splits, slots, n_blocks)
    effs = []
    for s in range(1, max_splits + 1):
        eligible = s == 1 or math.ceil(n_blocks / s) != math.ceil(n_blocks / (s - 1))
        w = bnm * s / slots
        effs.append(w / math.ceil(w) if eligible else 0.0)
    best = max(effs)
    for s in range(1, max_splits + 1):
        eligible = s == 1 or math.ceil(n_blocks / s) != math.ceil(n_blocks / (s - 1))
        if eligible and effs[s - 1] >= 0.85 * best:
            return s
    return 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.sampled_from([78, 108, 132, 148]), st.integers(1, 2000))
def test_num_splits_matches_reference_loop(bnm, sms, n_blocks):
    got = attn.num_splits(float(bnm), float(sms), float(n_blocks), attn.FA2, np)
    assert int(got) == _reference_num_splits(bnm, sms, n_blocks)


def test_long_single_decode_is_split():
    assert attn.num_splits(8.0, 132.0, 128.0, attn.FA2, np) > 1
    assert attn.num_splits(256.0, 132.0, 128.0, attn.FA2, np) == 1


def test_padded_requests_contribute_nothing():
    c = np.array([100.0, 0.0, 0.0])
    n = np.array([300.0, 0.0, 0.0])
    m = np.array([1.0, 0.0, 0.0])
    full = attn.prefill_features(c, n, m, 8.0, 0.0, attn.FA2, np)
    one = attn.prefill_features(c[:1], n[:1], m[:1], 8.0, 0.0, attn.FA2, np)
    assert full == pytest.approx(one)
