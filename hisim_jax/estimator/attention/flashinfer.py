"""FlashInfer's batch attention (include/flashinfer/attention/scheduler.cuh, decode.cuh,
prefill.cuh of flashinfer-ai/flashinfer), the kernels SGLang runs by default off Hopper, in the
closed forms fa2.py uses:

* **Rows**: like FA3's varlen call it packs a KV head's query heads into the rows of a tile
  (``packed_qo_len = qo_len x group``); the prefill kernel's query tile is 128 rows when the
  batch's mean packed length exceeds 64, 64 when it exceeds 16, else 16. A pure decode batch
  runs the decode kernel: one CTA per (request chunk, KV head) holding the head's ``group``
  query rows.
* **KV chunks**: the plan first sizes the grid, ``max_grid`` = CTAs per SM x SMs. A batch whose
  requests x KV heads already fill it is not split; otherwise the KV axis of every request is
  cut into chunks of the smallest length (at least 128 keys,
  ``PartitionPagedKVCacheBinarySearchMinNumPagePerBatch``) that keeps the chunks x KV heads
  within the grid. Chunks are balanced across requests, unlike FA2/FA3's one split count for
  the batch, so a long request next to short ones does not set the makespan; the partial
  outputs are merged by a second kernel.

``chunk_keys`` below is the closed form of that binary search (the smallest chunk the bound
``sum(ceil(k / c)) <= sum(k) / c + requests`` guarantees), checked against the search in the
tests.
"""

from __future__ import annotations

from hisim_jax.estimator.attention.fa2 import (
    AttentionBackend,
    _ceil_div,
    causal_keys,
    causal_tiles,
)

FLASHINFER = AttentionBackend(
    name="flashinfer",
    block_m=128,
    block_n=64,
    split_block_m=16,
    split_block_n=64,
    ctas_per_sm=2,
    max_splits=128,
    decode_swaps_groups=False,
)
MIN_CHUNK_KEYS = 128  # the plan's lower bound on a chunk (128 / page_size pages)


def query_tile(mean_packed_rows, xp):
    """The prefill kernel's CTA_TILE_Q for a batch's mean packed query length."""
    return xp.where(mean_packed_rows > 64.0, 128.0, xp.where(mean_packed_rows > 16.0, 64.0, 16.0))


def chunk_keys(total_keys, max_keys, n_req, slots_per_head, xp):
    """Keys per chunk: the whole longest request if the requests alone fill the grid, else
    the smallest chunk (>= MIN_CHUNK_KEYS) whose chunk count fits ``slots_per_head``."""
    room = xp.maximum(slots_per_head - n_req, 1.0)
    chunk = xp.maximum(xp.ceil(total_keys / room), float(MIN_CHUNK_KEYS))
    return xp.where(n_req >= slots_per_head, max_keys, xp.minimum(chunk, max_keys))


def features(cache_len, new_len, mask, q_heads, kv_heads, window, xp, be=FLASHINFER):
    """Grid quantities of one batch (summed ``fi_work``, ``fi_keys``, ``fi_rows_sum``; maxima
    ``fi_max_keys``; ``fi_tile``, the query tile rows; ``fi_decode``, a pure decode batch)."""
    groups = q_heads / kv_heads
    cap = xp.where(window > 0, window, 1.0e30)
    c = xp.minimum(cache_len, cap)
    n = new_len * mask
    rows = n * groups
    n_req = xp.sum(mask)
    is_decode = xp.max(n) <= 1.0
    tile = xp.where(is_decode, groups, query_tile(xp.sum(rows) / xp.maximum(n_req, 1.0), xp))
    m_blocks = xp.ceil(rows / tile)
    q_per_block = tile / groups
    keys_seen = c + n  # the KV axis the request's blocks walk (its last block sees all of it)
    bn = float(be.block_n)
    last = _ceil_div(keys_seen, bn, xp)
    tiles = xp.where(m_blocks > 0, causal_tiles(c, m_blocks, q_per_block, last, bn, xp), 0.0)
    keys = causal_keys(c, n, m_blocks, q_per_block, xp)
    sums = xp.sum(xp.stack([tiles, keys, m_blocks, keys_seen * mask]), axis=-1)
    return dict(
        fi_work=kv_heads * sums[0] * bn,
        fi_keys=kv_heads * sums[1],
        fi_mblocks=sums[2],
        fi_kv_total=sums[3],
        fi_max_keys=xp.max(keys_seen * mask),
        fi_tile=tile,
        fi_decode=is_decode,
    )
