"""RaggedBatches: the array entry of the estimator, its packing and its errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax import Estimator, RaggedBatches
from hisim_jax.estimator import ops
from hisim_jax.estimator import roofline as est_mod
from hisim_jax.estimator.batch import bucket_size, bucket_sizes, pack, pack_ragged


def random_batches(n: int, most: int, seed: int) -> list[list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = int(rng.integers(1, most + 1))
        cache = rng.integers(0, 20000, r)
        new = np.ones(r, dtype=int)
        if rng.random() < 0.5:
            new[0] = int(rng.integers(2, 3000))
        out.append([(int(c), int(k)) for c, k in zip(cache, new, strict=True)])
    return out


@pytest.fixture(scope="module")
def llama():
    return Estimator("llama-3.1-8b", "h100-sxm")


@pytest.fixture(scope="module")
def batches():
    return random_batches(60, 40, 0)


def test_ragged_equals_list_path_exactly(llama, batches):
    rb = RaggedBatches.from_batches(batches)
    np.testing.assert_array_equal(llama.step_latency_s(rb), llama.step_latency_s(batches))
    flat = [r for b in batches for r in b]
    by_arrays = RaggedBatches(
        [c for c, _ in flat], np.array([n for _, n in flat], float), [len(b) for b in batches]
    )
    np.testing.assert_array_equal(llama.step_latency_s(by_arrays), llama.step_latency_s(rb))


def test_ragged_matches_the_reference_grid(llama, batches):
    """The baked, grouped path against step_seconds_grid with every value as an argument."""
    got = llama.step_latency_s(RaggedBatches.from_batches(batches))
    b = ops.stack([pack(batches)])  # one bucket for all: padding never changes a result
    b = type(b)(*(ops._float(x[0]) for x in (b.cache_len, b.new_len, b.mask)))
    ref = np.asarray(est_mod.step_seconds_grid(llama.params, llama.dims, b, llama.hws))[:, 0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_one_batch_takes_the_single_path(llama, batches):
    one = batches[3]
    rb = RaggedBatches.from_batches([one])
    assert llama.step_latency_s(rb)[0] == llama.step_latency_s([one])[0]
    assert llama.step_latency_s(rb)[0] == llama.step_latency_s(one)[0]


def test_batch_order_permutes_results_and_request_order_does_not_matter(llama, batches):
    lat = llama.step_latency_s(batches)
    perm = np.random.default_rng(1).permutation(len(batches))
    np.testing.assert_array_equal(llama.step_latency_s([batches[i] for i in perm]), lat[perm])
    shuffled = [b[::-1] for b in batches]
    np.testing.assert_allclose(llama.step_latency_s(shuffled), lat, rtol=1e-12)


def test_several_gpus_equal_one_estimator_each(batches):
    names = ["h100-sxm", "b200", "l40s"]
    rb = RaggedBatches.from_batches(batches)
    multi = Estimator("qwen3-8b", names).step_latency_s(rb)
    assert multi.shape == (len(batches), len(names))
    for j, name in enumerate(names):
        single = Estimator("qwen3-8b", name).step_latency_s(rb)
        np.testing.assert_allclose(multi[:, j], single, rtol=1e-12)


def test_from_frame_orders_batches_by_first_appearance(llama):
    frame = pd.DataFrame(
        {
            "batch_id": ["b", "a", "b", "c", "a"],
            "cache_len": [0, 100, 4096, 7, 5],
            "new_len": [2048, 1, 1, 300, 1],
            "other": [1, 2, 3, 4, 5],
        }
    )
    rb = RaggedBatches.from_frame(frame)
    assert rb.to_lists() == [[(0, 2048), (4096, 1)], [(100, 1), (5, 1)], [(7, 300)]]
    np.testing.assert_array_equal(llama.step_latency_s(rb), llama.step_latency_s(rb.to_lists()))
    renamed = frame.rename(columns={"batch_id": "step", "cache_len": "c", "new_len": "n"})
    again = RaggedBatches.from_frame(renamed, batch="step", cache_len="c", new_len="n")
    assert again.to_lists() == rb.to_lists()


def test_ragged_batches_are_frozen_read_only_copies():
    c = np.array([1, 2, 3])
    rb = RaggedBatches(c, [1, 1, 1], [2, 1])
    c[0] = 99
    assert rb.cache_len[0] == 1
    with pytest.raises(ValueError):
        rb.cache_len[0] = 5
    with pytest.raises(AttributeError):
        rb.sizes = np.array([3])  # type: ignore[misc]
    assert len(rb) == 2 and rb.offsets.tolist() == [0, 2]
    assert rb[1].to_lists() == [[(3, 1)]] and rb[-1].to_lists() == [[(3, 1)]]


def test_breakdown_takes_one_ragged_batch(llama):
    batch = [(0, 2048), (4096, 1)]
    parts = llama.breakdown_s(RaggedBatches.from_batches([batch]))
    assert parts == llama.breakdown_s(batch)
    assert sum(parts.values()) == pytest.approx(float(llama.step_latency_s([batch])[0]), rel=1e-6)
    with pytest.raises(ValueError, match="one batch, got 2"):
        llama.breakdown_s(RaggedBatches.from_batches([batch, batch]))


# ------------------------------------------------------------------------------------------------
# errors: a ValueError naming the batch (index) and the field, from lists and from arrays


BAD = [
    ([[(0, 1)], [(-1, 5)]], r"batch 1: request 0: field 'cache_len' must be >= 0"),
    ([[(0, 1), (3, 0)]], r"batch 0: request 1: field 'new_len' must be >= 1"),
    ([[(0, 1)], [(2, 1.5)]], r"batch 1: request 0: field 'new_len' must be a whole number"),
    ([[(0.5, 1)]], r"batch 0: request 0: field 'cache_len' must be a whole number"),
    ([[(float("nan"), 1)]], r"batch 0: request 0: field 'cache_len' must be a whole number"),
    ([[(0, float("inf"))]], r"batch 0: request 0: field 'new_len' must be a whole number"),
    ([[(0, 1)], [("7", 1)]], r"batch 1: request 0: field 'cache_len' must be an integer"),
    ([[(0, None)]], r"batch 0: request 0: field 'new_len' must be an integer"),
    ([[(0, 1)], []], r"batch 1: expected at least one request"),
    ([], r"expected at least one batch"),
    ([[(0, 1, 2)]], r"batch 0: request 0: expected \(cache_len, new_len\)"),
    ([[(0, 1)], [(1,), (1, 2, 3)]], r"batch 1: request 0: expected \(cache_len, new_len\)"),
    ([[5]], r"batch 0: request 0: expected \(cache_len, new_len\)"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_invalid_lists_name_batch_and_field(llama, bad, message):
    with pytest.raises(ValueError, match=message):
        RaggedBatches.from_batches(bad)
    with pytest.raises(ValueError, match=message):
        llama.step_latency_s(bad)


@pytest.mark.parametrize(
    "cache_len, new_len, sizes, message",
    [
        ([0, -3], [1, 1], [1, 1], r"batch 1: request 0: field 'cache_len' must be >= 0"),
        ([0, 3, 4], [1, 1, 0], [2, 1], r"batch 1: request 0: field 'new_len' must be >= 1"),
        ([0, 3.25], [1, 1], [2], r"batch 0: request 1: field 'cache_len' must be a whole"),
        ([0, 3], [1, np.nan], [1, 1], r"batch 1: request 0: field 'new_len' must be a whole"),
        ([0, 3], ["a", 1], [2], r"batch 0: request 0: field 'new_len' must be an integer"),
        ([0, 3], [1, 1], [2, 0], r"batch 1: expected at least one request"),
        ([], [], [], r"expected at least one batch"),
        ([0, 3], [1, 1], [3], r"sizes add up to 3"),
    ],
)
def test_invalid_arrays_name_batch_and_field(cache_len, new_len, sizes, message):
    with pytest.raises(ValueError, match=message):
        RaggedBatches(cache_len, new_len, sizes)


def test_invalid_frame_names_row_batch_and_field():
    frame = pd.DataFrame({"batch_id": [1, 1, 2], "cache_len": [0, 5, 9], "new_len": [1, 1, "x"]})
    with pytest.raises(ValueError, match=r"row 2 \(batch 2\): field 'new_len'"):
        RaggedBatches.from_frame(frame)
    frame["new_len"] = [1.0, np.nan, 1.0]
    with pytest.raises(ValueError, match=r"batch 0: request 1: field 'new_len'"):
        RaggedBatches.from_frame(frame)
    with pytest.raises(ValueError, match=r"no column 'n'"):
        RaggedBatches.from_frame(frame, new_len="n")


# ------------------------------------------------------------------------------------------------
# packing


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 12)), min_size=1, max_size=70
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(0, 3),
    st.sampled_from([64, 256, 1 << 18]),
)
def test_pack_ragged_places_every_request_once(batches, seed, cells):
    rb = RaggedBatches.from_batches(batches)
    groups = np.random.default_rng(seed).integers(0, 2, len(batches))
    seen = np.zeros(len(batches), int)
    for idx, planes in pack_ragged(rb, np.float64, groups, cells=cells):
        width = planes.shape[2]
        assert width == bucket_size(max(len(batches[i]) for i in idx))
        assert len(set(groups[idx].tolist())) == 1
        assert planes.shape[1] >= len(idx) and not planes[:, len(idx) :].any()
        for row, i in enumerate(idx):
            k = len(batches[i])
            assert bucket_size(k) == width
            np.testing.assert_array_equal(planes[0, row, :k], [c for c, _ in batches[i]])
            np.testing.assert_array_equal(planes[1, row, :k], [n for _, n in batches[i]])
            np.testing.assert_array_equal(planes[2, row], np.arange(width) < k)
            assert not planes[:2, row, k:].any()
            seen[i] += 1
    assert (seen == 1).all()


@given(st.lists(st.integers(1, 1 << 20), min_size=1, max_size=50))
def test_bucket_sizes_match_bucket_size(sizes):
    assert bucket_sizes(np.array(sizes)).tolist() == [bucket_size(s) for s in sizes]


# ------------------------------------------------------------------------------------------------
# the decode-stretch shape family


def test_decode_shape_family():
    assert est_mod.decode_shape(1) == (64, 64)
    assert est_mod.decode_shape(64) == (64, 64)
    assert est_mod.decode_shape(65) == (128, 64)
    assert est_mod.decode_shape(200) == (256, 32)
    assert est_mod.decode_shape(1000) == (1024, 16)


def test_long_decode_stretch_in_several_calls_equals_one_step_at_a_time(llama):
    ctx = np.array([9000, 4000, 900, 5])
    steps = 150  # three calls of 64 rows
    active = np.repeat([4, 3, 2], 50)
    got = llama.decode_steps_s(ctx, steps, padded=8, active=active)
    ref = llama.step_latency_s(
        [
            [(int(c) + j, 1) for c in ctx[: active[j]]] + [(0, 1)] * (8 - active[j])
            for j in range(steps)
        ]
    )
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # and the first steps do not depend on how long the stretch is
    np.testing.assert_array_equal(llama.decode_steps_s(ctx, 10, 8, active)[:10], got[:10])


def test_numpy_arrays_as_batches(llama, batches):
    arrays = [np.array(b) for b in batches[:5]]
    np.testing.assert_array_equal(llama.step_latency_s(arrays), llama.step_latency_s(batches[:5]))
    one = llama.step_latency_s(arrays[2])
    assert one.shape == (1,) and one[0] == llama.step_latency_s([batches[2]])[0]
