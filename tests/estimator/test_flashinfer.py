"""FlashInfer's plan (attention/flashinfer.py): the closed-form KV chunk against the binary
search of scheduler.cuh, its query tile rule, and what balanced chunks change in a step."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.estimator import Estimator
from hisim_jax.estimator.attention import flashinfer as fi


def binary_search_chunk(keys, slots, min_chunk=fi.MIN_CHUNK_KEYS):
    """PartitionPagedKVCacheBinarySearchMinNumPagePerBatch, in keys (page size 1)."""
    lo, hi = min_chunk, max(keys)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(math.ceil(k / mid) for k in keys) > slots:
            lo = mid + 1
        else:
            hi = mid
    return lo


@settings(max_examples=80, deadline=None)
@given(
    keys=st.lists(st.integers(1, 40000), min_size=1, max_size=40),
    slots=st.integers(8, 600),
)
def test_closed_form_chunk_fits_the_grid_and_bounds_the_search(keys, slots):
    k = np.array(keys, float)
    chunk = float(fi.chunk_keys(k.sum(), k.max(), float(len(keys)), float(slots), np))
    if len(keys) >= slots:
        assert chunk == max(keys)  # the requests alone fill the grid: no split
        return
    # the closed form always fits the grid, and never undercuts the search's minimum
    assert sum(math.ceil(x / chunk) for x in keys) <= slots or chunk >= max(keys)
    assert chunk >= min(binary_search_chunk(keys, slots), max(keys))


def test_query_tile_follows_the_mean_packed_length():
    assert [float(fi.query_tile(x, np)) for x in (1, 16, 17, 64, 65)] == [16, 16, 64, 64, 128]


def test_one_long_request_beside_short_ones_is_chunked_evenly():
    # FA2/FA3 choose one split count for the batch; FlashInfer cuts every request's KV into
    # chunks of one length, so the long request's chain shrinks to a chunk
    batch = [(30000, 1)] + [(500, 1)] * 3
    t = {be: Estimator("llama-3.1-8b", "l40s", backend=be).breakdown_s(batch)["attention"]
         for be in ("fa2", "flashinfer")}  # fmt: skip
    assert t["flashinfer"] < 0.7 * t["fa2"]
