"""Pareto fronts against the O(N^2) definition, on small integer grids so ties and duplicates
are common, with NaN rows and both directions per column."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.search.pareto import dominates_any, front_order, pareto_mask


def brute_dominates(a: np.ndarray, b: np.ndarray, maximize) -> bool:
    """a dominates b, straight from the definition (a NaN anywhere: no)."""
    if np.isnan(a).any() or np.isnan(b).any():
        return False
    no_worse = all((x >= y) if mx else (x <= y) for x, y, mx in zip(a, b, maximize, strict=True))
    better = any((x > y) if mx else (x < y) for x, y, mx in zip(a, b, maximize, strict=True))
    return no_worse and better


def brute_mask(values: np.ndarray, maximize) -> np.ndarray:
    n = len(values)
    return np.array(
        [
            not np.isnan(values[i]).any()
            and not any(brute_dominates(values[j], values[i], maximize) for j in range(n))
            for i in range(n)
        ],
        dtype=bool,
    )


@st.composite
def point_sets(draw, k=None, max_rows=30):
    """[N, K] floats drawn from a few integers (ties, duplicates), some rows with a NaN, some
    values infinite, and a random direction per column."""
    k = draw(st.integers(2, 3)) if k is None else k
    n = draw(st.integers(0, max_rows))
    cell = st.one_of(
        st.integers(-3, 3).map(float),
        st.sampled_from([np.nan, np.inf, -np.inf]),
    )
    rows = draw(st.lists(st.lists(cell, min_size=k, max_size=k), min_size=n, max_size=n))
    values = np.array(rows, dtype=np.float64).reshape(n, k)
    maximize = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    return values, maximize


@settings(max_examples=400, deadline=None)
@given(point_sets())
def test_mask_matches_definition(case):
    values, maximize = case
    got = pareto_mask(values, maximize)
    assert got.dtype == bool and got.shape == (len(values),)
    np.testing.assert_array_equal(got, brute_mask(values, maximize))


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.integers(1, 4))
def test_duplicating_rows_duplicates_front(case, copies):
    """Every copy of a front row is on the front; copies of a dominated row stay off it."""
    values, maximize = case
    base = pareto_mask(values, maximize)
    np.testing.assert_array_equal(
        pareto_mask(np.tile(values, (copies, 1)), maximize), np.tile(base, copies)
    )


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.randoms(use_true_random=False))
def test_row_order_does_not_matter(case, rng):
    values, maximize = case
    perm = list(range(len(values)))
    rng.shuffle(perm)
    perm = np.array(perm, dtype=np.int64)
    np.testing.assert_array_equal(
        pareto_mask(values[perm], maximize), pareto_mask(values, maximize)[perm]
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_dominates_any_matches_definition(data):
    front, maximize = data.draw(point_sets())
    k = front.shape[1]
    cands, _ = data.draw(point_sets(k=k))
    got = dominates_any(front, cands, maximize)
    want = np.array(
        [any(brute_dominates(f, c, maximize) for f in front) for c in cands], dtype=bool
    ).reshape(len(cands))
    assert got.dtype == bool and got.shape == (len(cands),)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(point_sets())
def test_nothing_dominates_the_front(case):
    """The front of a set is never dominated by the set, and every valid row off it is."""
    values, maximize = case
    mask = pareto_mask(values, maximize)
    dominated = dominates_any(values, values, maximize)
    valid = ~np.isnan(values).any(axis=1)
    assert not dominated[mask].any()
    np.testing.assert_array_equal(dominated[valid], ~mask[valid])


def test_worked_example_both_directions():
    # columns: throughput (max), cost (min)
    v = np.array(
        [
            [10.0, 5.0],  # front
            [10.0, 5.0],  # duplicate of a front row: front
            [8.0, 5.0],  # same cost, less throughput: dominated
            [12.0, 9.0],  # front
            [12.0, 9.5],  # dominated by the row above
            [4.0, 1.0],  # front
            [np.nan, 0.0],  # NaN: off, dominates nothing
            [3.0, 1.0],  # dominated by [4, 1]
        ]
    )
    want = [True, True, False, True, False, True, False, False]
    np.testing.assert_array_equal(pareto_mask(v, [True, False]), want)
    # flipping both directions gives a different front
    np.testing.assert_array_equal(
        pareto_mask(v, [False, True]), [False, False, True, False, True, False, False, True]
    )
    np.testing.assert_array_equal(
        dominates_any(v, np.array([[11.0, 4.0], [10.0, 5.0], [9.0, 6.0], [0.0, -1.0]]), [1, 0]),
        [False, False, True, False],
    )


def test_empty_and_all_nan():
    for k in (2, 3):
        m = pareto_mask(np.empty((0, k)), [True] * k)
        assert m.dtype == bool and m.shape == (0,)
        assert dominates_any(np.empty((0, k)), np.ones((2, k)), [True] * k).tolist() == [
            False,
            False,
        ]
        assert dominates_any(np.ones((2, k)), np.empty((0, k)), [True] * k).shape == (0,)
        assert not pareto_mask(np.full((4, k), np.nan), [False] * k).any()


def test_one_column_and_bad_shapes():
    np.testing.assert_array_equal(
        pareto_mask(np.array([[3.0], [1.0], [np.nan], [1.0]]), [False]),
        [False, True, False, True],
    )
    with pytest.raises(ValueError, match="maximize"):
        pareto_mask(np.zeros((3, 2)), [True])
    with pytest.raises(ValueError, match="2-D"):
        pareto_mask(np.zeros(3), [True])
    with pytest.raises(ValueError, match="columns"):
        dominates_any(np.zeros((3, 2)), np.zeros((3, 3)), [True, True])


def test_large_two_column_front_is_fast_and_right(ends_within):
    """200,000 rows on a grid with many ties: the sweep agrees with the pairwise path run on the
    (small) set of rows that could matter, and finishes well within a second or two."""
    rng = np.random.default_rng(0)
    v = rng.integers(0, 2000, size=(200_000, 2)).astype(np.float64)
    v[rng.random(200_000) < 0.01, 1] = np.nan
    with ends_within(10.0):
        mask = pareto_mask(v, [True, False])
        dominated = dominates_any(v, v, [True, False])
    valid = ~np.isnan(v).any(axis=1)
    np.testing.assert_array_equal(dominated[valid], ~mask[valid])
    assert 0 < mask.sum() < 1000
    # the front itself, checked against the definition
    front = v[mask]
    np.testing.assert_array_equal(brute_mask(front, [True, False]), np.ones(len(front), bool))
    # pad with a third constant column: the pairwise path must find the same front
    sub = np.flatnonzero(valid)[:3000]
    v3 = np.c_[v[sub], np.zeros(len(sub))]
    np.testing.assert_array_equal(
        pareto_mask(v3, [True, False, True]), pareto_mask(v[sub], [True, False])
    )


def test_front_order_sorts_by_first_column():
    v = np.array([[3.0, 1.0], [1.0, 3.0], [9.0, 9.0], [2.0, 2.0], [1.0, 3.0]])
    mask = np.array([True, True, False, True, True])
    np.testing.assert_array_equal(front_order(v, mask), [1, 4, 3, 0])
    assert front_order(v, np.zeros(5, bool)).size == 0


@settings(max_examples=200, deadline=None)
@given(point_sets(k=3), st.integers(1, 5))
def test_blocked_sweep_matches_definition_across_blocks(case, block):
    """The K > 2 path walks rows in blocks; tiny blocks make fronts span many of them."""
    from hisim_jax.search.pareto import _as_minimized, _front_blocks

    values, maximize = case
    valid = ~np.isnan(values).any(axis=1)
    got = _front_blocks(_as_minimized(values[valid], maximize), block=block)
    np.testing.assert_array_equal(got, brute_mask(values[valid], maximize))
