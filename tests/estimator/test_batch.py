"""Batch parsing, bucketing and padding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.estimator.batch import MIN_BUCKET, Batch, bucket_size, pack, parse_batch

# ------------------------------------------------------------------------------------------------
# bucket_size


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, 8),
        (1, 8),
        (7, 8),
        (8, 8),
        (9, 16),
        (16, 16),
        (17, 32),
        (100, 128),
        (1024, 1024),
        (1025, 2048),
    ],
)
def test_bucket_size_default_minimum(n, expected):
    assert bucket_size(n) == expected


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 4), (5, 8), (33, 64)])
def test_bucket_size_minimum_one(n, expected):
    assert bucket_size(n, minimum=1) == expected


def test_min_bucket_is_eight():
    assert MIN_BUCKET == 8
    assert bucket_size(1, minimum=32) == 32
    assert bucket_size(33, minimum=32) == 64


@given(n=st.integers(0, 1 << 20), log_min=st.integers(0, 10))
def test_bucket_size_is_smallest_power_of_two(n, log_min):
    minimum = 1 << log_min
    b = bucket_size(n, minimum)
    assert b & (b - 1) == 0  # a power of two
    assert b >= n and b >= minimum
    assert b == minimum or b // 2 < n  # and the smallest one


# ------------------------------------------------------------------------------------------------
# pack


def test_pack_pads_with_zeros_and_mask():
    b = pack([[(10, 1), (20, 3)], [(5, 7)]])
    assert isinstance(b, Batch)
    assert b.cache_len.shape == b.new_len.shape == b.mask.shape == (2, 8)
    assert b.cache_len.dtype == np.float64
    np.testing.assert_array_equal(b.cache_len[0], [10, 20, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.new_len[0], [1, 3, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.mask[0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.cache_len[1], [5, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.new_len[1], [7, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.mask[1], [1, 0, 0, 0, 0, 0, 0, 0])


def test_pack_bucket_grows_with_longest_batch():
    b = pack([[(0, 1)] * 9, [(0, 1)]])
    assert b.mask.shape == (2, 16)
    assert b.mask.sum(axis=1).tolist() == [9.0, 1.0]


def test_pack_explicit_bucket():
    b = pack([[(1, 1), (2, 2), (3, 3)]], bucket=4)
    assert b.mask.shape == (1, 4)
    np.testing.assert_array_equal(b.mask[0], [1, 1, 1, 0])


def test_pack_bucket_too_small():
    with pytest.raises(ValueError, match="bucket 2"):
        pack([[(1, 1), (2, 2), (3, 3)]], bucket=2)


batches_st = st.lists(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 15)), min_size=1, max_size=40),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(batches_st)
def test_pack_round_trips(batches):
    b = pack(batches)
    longest = max(len(x) for x in batches)
    assert b.mask.shape == (len(batches), bucket_size(longest))
    for i, reqs in enumerate(batches):
        k = len(reqs)
        assert b.cache_len[i, :k].tolist() == [float(c) for c, _ in reqs]
        assert b.new_len[i, :k].tolist() == [float(n) for _, n in reqs]
        assert (b.mask[i, :k] == 1).all()
        # padding is zero in every leaf
        assert not b.cache_len[i, k:].any()
        assert not b.new_len[i, k:].any()
        assert not b.mask[i, k:].any()


# ------------------------------------------------------------------------------------------------
# parse_batch


def test_parse_batch_json_text():
    assert parse_batch("[[0, 2048], [4096, 1]]") == [(0, 2048), (4096, 1)]


def test_parse_batch_list_and_tuples():
    assert parse_batch([[0, 5], (3, 1)]) == [(0, 5), (3, 1)]
    assert parse_batch(((7, 2),)) == [(7, 2)]


def test_parse_batch_numpy_integers():
    out = parse_batch([[np.int64(4), np.int32(2)]])
    assert out == [(4, 2)]
    assert all(type(v) is int for v in out[0])


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("[[0, 1],", "invalid JSON"),
        ("not json", "invalid JSON"),
        ("", "invalid JSON"),
        ("[[-1, 1]]", "cache_len >= 0"),
        ("[[0, 1], [5, -2]]", "request 1"),
        ("[[0, 0]]", "new_len >= 1"),
        ("[[0, 1.5]]", "integers"),
        ("[[0.0, 1]]", "integers"),
        ('[["0", 1]]', "integers"),
        ("[[true, 1]]", "integers"),
        ("[[null, 1]]", "integers"),
        ("[[0, NaN]]", "integers"),
        ("[[1]]", "[cache_len, new_len]"),
        ("[[1, 2, 3]]", "[cache_len, new_len]"),
        ("[1, 2]", "request 0"),
        ("[]", "non-empty"),
        ("{}", "non-empty"),
        ('{"a": 1}', "non-empty"),
        ("5", "non-empty"),
        ('"[[0, 1]]"', "non-empty"),
    ],
)
def test_parse_batch_rejects_text(bad, fragment):
    with pytest.raises(ValueError) as ei:
        parse_batch(bad, where="--my-label")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("--my-label: "), msg
    assert fragment in msg, msg


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [[0, 1], [1]],
        [[0, False]],
        [(0, 1, 2)],
        [[0, 1.0]],
        [[-3, 2]],
        [[2, 0]],
        "x\ny",
        None,
        3,
    ],
)
def test_parse_batch_rejects_objects(bad):
    with pytest.raises(ValueError) as ei:
        parse_batch(bad, where="somewhere")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("somewhere: ")


def test_parse_batch_default_label():
    with pytest.raises(ValueError, match=r"^batch: "):
        parse_batch("[]")


def test_parse_batch_long_bad_json_is_truncated_to_one_line():
    text = "[[0, 1],\n" + "[1, 1],\n" * 100 + "oops"
    with pytest.raises(ValueError) as ei:
        parse_batch(text, where="w")
    msg = str(ei.value)
    assert "\n" not in msg
    assert len(msg) < 300


valid_batch = st.lists(
    st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 40)), min_size=1, max_size=50
)


@given(valid_batch)
def test_parse_batch_round_trips_json(x):
    assert parse_batch(json.dumps(x)) == x
    assert parse_batch(x) == x
    assert parse_batch([list(r) for r in x]) == x


@given(
    valid_batch,
    st.integers(0, 49),
    st.sampled_from(["negative_cache", "zero_new", "float", "string", "arity"]),
)
def test_parse_batch_one_bad_request_names_its_index(x, idx, kind):
    idx = idx % len(x)
    bad = [list(r) for r in x]
    c, n = bad[idx]
    bad[idx] = {
        "negative_cache": [-1 - c, n],
        "zero_new": [c, 0],
        "float": [c + 0.5, n],
        "string": [str(c), n],
        "arity": [c],
    }[kind]
    with pytest.raises(ValueError) as ei:
        parse_batch(json.dumps(bad), where="L")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"L: request {idx} "), msg
