"""FlashAttention-3 varlen forward on Hopper (hopper/flash_api.cpp, tile_size.h, heuristics.h
of Dao-AILab/flash-attention, the kernel vLLM's FLASH_ATTN backend runs on sm90 as
``vllm_flash_attn`` FA3), head dim 128, bf16, in the closed forms fa2.py uses:

* **PackGQA**: a varlen call always packs the query heads that share a KV head into the row
  axis, so a thread block is (request, KV head, tile of ``block_m`` packed rows) and reads its
  KV head's keys once; a decode row of a model with 8 query heads per KV head fills 8 rows.
* **Tiles**: ``block_m`` is 64 when the longest request's packed rows fit in 64 (one MMA
  warpgroup), else 128; ``block_n`` is 128 (causal, and paged KV without TMA).
* **Splits**: ``num_splits_heuristic``: none if the grid already fills 80% of the SMs or the
  longest request has at most 4 key tiles; else the smallest count reaching 85% of the best
  wave efficiency over one CTA per SM, at most ``max_splits``, the SMs and the key tiles.
* One persistent CTA per SM takes the blocks in turn (``ctas_per_sm`` = 1).

Every row and key column of a tile is computed, padded or not, so a tile's math is
``4 x block_m x d`` per key column; its bytes are the keys and values that exist (columns past
a request's last key are masked, not loaded). A mixed batch is one call: its decode rows
are blocks of the same grid, not a separate kernel.
"""

from __future__ import annotations

from hisim_jax.estimator.attention.fa2 import (
    AttentionBackend,
    _ceil_div,
    causal_keys,
    causal_tiles,
)

FA3 = AttentionBackend(
    name="fa3",
    block_m=128,
    block_n=128,
    split_block_m=64,
    split_block_n=128,
    ctas_per_sm=1,
    max_splits=128,
    decode_swaps_groups=False,
)
ONE_WG_ROWS = 64  # packed rows up to which one MMA warpgroup (a 64-row tile) runs
MIN_SPLIT_TILES = 4  # the heuristic never splits a KV axis of this many tiles or fewer


def features(cache_len, new_len, mask, q_heads, kv_heads, window, xp, be=FA3):
    """Grid quantities of one batch: summed ``fa3_work`` (key columns of tile math over all
    blocks, padding included), ``fa3_keys`` (keys read, one KV-head read per block) and
    ``fa3_blocks``; maxima ``fa3_chain_tiles`` (the heaviest block's
    key tiles), ``fa3_rows`` (packed rows of the longest request) and ``fa3_kv_tiles``."""
    groups = q_heads / kv_heads
    cap = xp.where(window > 0, window, 1.0e30)
    c = xp.minimum(cache_len, cap)
    n = new_len * mask
    rows = n * groups
    bn = float(be.block_n)
    max_rows = xp.max(rows)
    bm = xp.where(max_rows <= ONE_WG_ROWS, float(ONE_WG_ROWS), float(be.block_m))
    m_blocks = xp.ceil(rows / bm)
    # an m-block holds bm / groups query positions (fa2.causal_tiles, causal_keys)
    q_per_block = bm / groups
    last = _ceil_div(c + n, bn, xp)
    tiles = xp.where(m_blocks > 0, causal_tiles(c, m_blocks, q_per_block, last, bn, xp), 0.0)
    keys = causal_keys(c, n, m_blocks, q_per_block, xp)
    sums = xp.sum(xp.stack([tiles, m_blocks, keys]), axis=-1)
    return dict(
        fa3_work=kv_heads * sums[0] * bn,
        fa3_keys=kv_heads * sums[2],
        fa3_blocks=kv_heads * sums[1],
        fa3_chain_tiles=xp.max(last),
        fa3_rows=bm,
        fa3_mblocks_max=xp.max(m_blocks),
    )


def num_splits(total_mblocks, sm_count, n_blocks, xp, be=FA3):
    """``num_splits_heuristic`` vectorized over the candidate counts (leading axis)."""
    cand = xp.arange(1, be.max_splits + 1, dtype=xp.result_type(n_blocks))
    cap = xp.minimum(xp.minimum(float(be.max_splits), sm_count), n_blocks)
    ok = cand <= cap
    waves = total_mblocks * cand / sm_count
    eff = waves / xp.ceil(waves)
    best = xp.max(xp.where(ok, eff, 0.0))
    first = xp.min(xp.where(ok & (eff >= 0.85 * best), cand, 1.0 + be.max_splits))
    no_split = (total_mblocks >= 0.8 * sm_count) | (n_blocks <= MIN_SPLIT_TILES)
    return xp.where(no_split, 1.0, xp.maximum(first, 1.0))
