"""Attention kernel backends: how a varlen attention call's thread blocks land on the SMs.

A roofline misses attention by 15–20% because step time is set by the kernel's grid: tile
padding (a decode row occupies a whole 128-row tile), the split-KV heuristic, and the longest
block chain. Each backend reproduces its kernel's grid in closed form:

* ``work``  – key-columns of tile work summed over every block (padding included),
* ``chain`` – key-columns of the heaviest single block (a lower bound on the makespan),
* ``blocks``– thread blocks launched that do work,

and the estimator turns them into seconds with fitted per-SM rates. ``exact_makespan`` is the
block-by-block list schedule the closed forms are checked against in the tests.

Backends are named; fa3.py and flashinfer.py are the others, each with its own rules.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    """Tile shapes and grid rules of one kernel family (head dim 128 figures by default)."""

    name: str
    block_m: int  # query rows per tile, standard kernel
    block_n: int  # keys per tile, standard kernel
    split_block_m: int  # split-KV kernel
    split_block_n: int
    ctas_per_sm: int  # co-resident thread blocks per SM
    max_splits: int
    # FA2 folds the GQA query heads of a decode batch into the row dimension
    # (seqlenq_ngroups_swapped) and only then considers splitting the KV axis.
    decode_swaps_groups: bool = True


# FlashAttention-2 varlen forward (aten._flash_attention_forward) on sm80/sm90, d = 128:
# Flash_fwd_kernel_traits<128, 128, 64, 4> and the split-KV kernel's 64 x 128 tiles.
FA2 = AttentionBackend(
    name="fa2",
    block_m=128,
    block_n=64,
    split_block_m=64,
    split_block_n=128,
    ctas_per_sm=2,
    max_splits=128,
)

BACKENDS = {b.name: b for b in (FA2,)}


def _ceil_div(a, b, xp):
    # tile sizes are powers of two, so multiplying by the reciprocal is exact (and cheaper)
    return xp.ceil(a * (1.0 / b))


def causal_tiles(c, m_blocks, q_per_block, last, bn, xp):
    """Key tiles a request's M m-blocks iterate in all under the bottom-right causal mask, each
    m-block holding ``q_per_block`` query positions: m-block i sees
    min(c + n, c + (i+1) q_per_block) keys, so the total is
    (q_per_block/BN) M(M-1)/2 + (M-1) ceil(c/BN) + ``last`` (= ceil((c+n)/BN)), factored. Every
    kernel here shares it: FA2 with q_per_block = BM, FA3 and FlashInfer with their packed
    rows per query position."""
    return (m_blocks - 1.0) * ((0.5 * q_per_block / bn) * m_blocks + _ceil_div(c, bn, xp)) + last


def causal_keys(c, n, m_blocks, q_per_block, xp):
    """Keys those m-blocks read in all (columns past a request's last key are not loaded):
    M c + q_per_block M(M-1)/2 + n; zero for a request without blocks."""
    keys = m_blocks * c + 0.5 * q_per_block * m_blocks * (m_blocks - 1.0) + n
    return xp.where(m_blocks > 0, keys, 0.0)


def request_tiles(cache_len, new_len, mask, window, be: AttentionBackend, xp):
    """Per-request tile counts ``[R]`` (zero for padding), for both kernels.

    Standard causal kernel, grid (ceil(max_q / BM), R, heads), bottom-right causal mask: with
    M = ceil(n / BM) m-blocks, m-block i (0-based) iterates min(ceil((c+n)/BN),
    (BM/BN)(i+1) + ceil(c/BN)) key tiles, so a request's total per head is
    (BM/BN) M(M-1)/2 + (M-1) ceil(c/BN) + ceil((c+n)/BN) tiles; its heaviest block (the last
    m-block) iterates ceil((c+n)/BN). A decode (n = 1) sees c + 1 keys: ceil((c+1)/BN) tiles in
    the standard kernel, ceil((c+1)/BN_split) in the split-KV kernel. A sliding window caps the
    visible prefix at ``window`` tokens.
    """
    # Padded slots have c = n = 0, so every count below is already zero there without the mask.
    cap = xp.where(window > 0, window, 1.0e30)
    c = xp.minimum(cache_len, cap)
    n = new_len * mask
    bm, bn = float(be.block_m), float(be.block_n)
    m_blocks = _ceil_div(n, bm, xp)
    last = _ceil_div(c + n, bn, xp)
    # zero for padding (M = 0, c = 0)
    tiles = causal_tiles(c, m_blocks, bm, last, bn, xp)
    # A decode's n is 1: it sees its c cached keys and itself, c + n keys, so its standard-kernel
    # tile count is ``last``; the split-KV kernel uses wider key tiles.
    return dict(
        m_blocks=m_blocks,
        tiles=tiles,
        last=last,
        dec_split=_ceil_div(c + n, float(be.split_block_n), xp),
    )


def prefill_features(cache_len, new_len, mask, heads, window, be: AttentionBackend, xp):
    """(work, chain, blocks) of the standard kernel: key-columns summed over all blocks, of the
    heaviest block, and the number of non-empty blocks."""
    t = request_tiles(cache_len, new_len, mask, window, be, xp)
    bn = float(be.block_n)
    return heads * xp.sum(t["tiles"]) * bn, xp.max(t["last"]) * bn, heads * xp.sum(t["m_blocks"])


def split_eligible(n_blocks, be: AttentionBackend, xp):
    """Which split counts 1..max_splits are eligible for ``n_blocks`` key tiles (shape
    ``[max_splits]``): a count is skipped when it gives each split as many tiles as one split
    fewer would. Independent of the GPU, so the estimator computes it once per batch."""
    cand = xp.arange(1, be.max_splits + 1, dtype=xp.result_type(n_blocks))
    per_split = xp.ceil(n_blocks / cand)
    per_split_prev = xp.ceil(n_blocks / xp.maximum(cand - 1.0, 1.0))
    return (cand <= n_blocks) & ((cand == 1.0) | (per_split != per_split_prev))


def num_splits(batch_heads_mblocks, sm_count, n_blocks, be: AttentionBackend, xp, eligible=None):
    """FA2's num_splits_heuristic, vectorized over the candidate split counts.

    Slots are 2 x SMs (two 128-thread CTAs per SM); no split if the grid already fills 80% of
    them; otherwise the smallest eligible split count reaching 85% of the best wave efficiency.
    The candidate axis is the leading one (``eligible`` has shape ``[max_splits, ...]``,
    broadcasting against the other arguments), so a grid of batches × GPUs reduces over
    contiguous rows.
    """
    if eligible is None:
        eligible = split_eligible(n_blocks, be, xp)
    extra = max(xp.ndim(batch_heads_mblocks), xp.ndim(sm_count), xp.ndim(n_blocks))
    cand = xp.arange(1, be.max_splits + 1, dtype=xp.result_type(n_blocks))
    cand = cand.reshape((be.max_splits,) + (1,) * extra)
    slots = sm_count * be.ctas_per_sm
    eligible = eligible & (cand <= slots)
    waves = batch_heads_mblocks * cand / slots  # a true division: ceil() must see exact integers
    eff = waves / xp.ceil(waves)
    best = xp.max(xp.where(eligible, eff, 0.0), axis=0)
    ok = eligible & (eff >= 0.85 * best)
    first = xp.min(xp.where(ok, cand, 1.0 + be.max_splits), axis=0)
    first = xp.minimum(first, xp.maximum(xp.minimum(n_blocks, float(be.max_splits)), 1.0))
    return xp.where(batch_heads_mblocks >= 0.8 * slots, 1.0, first)


def coresident_share(work, chain, blocks, launched, heavy_blocks, sm_count, slowdown, per_sm, xp):
    """Share of the heaviest block's life spent beside another block on its SM.

    What sets it is the launched grid, not how busy the GPU is: the dispatcher gives every SM
    one block before any SM a second, so with ``launched`` <= SMs (empty blocks counted: FA2
    launches them for the decodes of a mixed batch) every block has its SM to itself. Beyond
    that, a share q = (launched - SMs) / SMs of the SMs take a second block at launch, and the
    heaviest request has ``heavy_blocks`` equally long blocks (one per head), so one of them
    shares with probability 1 - (1 - q)^heavy_blocks. How long it shares: if the grid queues
    (launched >= all slots), the other slots are refilled while work remains, and the
    heaviest block's mate slot carries its share w = (work - chain) / (slots - 1) of the rest,
    run at 1 / slowdown while shared — s (1 + (slowdown - 1) s) = slowdown w / chain, solved;
    if it does not queue, its mate is one average block, which finishes after
    slowdown a of the heavy block's slowdown a + (chain - a). Checked against
    ``exact_coresident_makespan`` in the tests."""
    if per_sm < 2:  # one CTA per SM (FA3's persistent kernel): nothing shares
        return 0.0 * work
    slots = sm_count * per_sm
    k1 = slowdown - 1.0
    chain = xp.maximum(chain, 1e-30)
    q = xp.clip((launched - sm_count) / sm_count, 0.0, 1.0)
    p_shared = 1.0 - (1.0 - q) ** xp.maximum(heavy_blocks, 1.0)
    x = slowdown * xp.maximum(work - chain, 0.0) / (slots - 1.0) / chain
    queued = xp.minimum(1.0, (xp.sqrt(1.0 + 4.0 * k1 * x) - 1.0) / (2.0 * xp.maximum(k1, 1e-6)))
    avg = work / xp.maximum(blocks, 1.0)
    one_mate = slowdown * avg / (slowdown * avg + xp.maximum(chain - avg, 0.0))
    return p_shared * xp.where(launched >= slots, queued, one_mate)


def exact_makespan(block_costs: np.ndarray, slots: int) -> float:
    """Greedy list schedule of blocks in launch order onto ``slots`` identical workers."""
    free = [0.0] * slots
    heapq.heapify(free)
    for cost in block_costs:
        t = heapq.heappop(free)
        heapq.heappush(free, t + float(cost))
    return max(free)


def exact_coresident_makespan(
    block_costs: np.ndarray, sm_count: int, slowdown: float, per_sm: int = 2
) -> tuple[float, float]:
    """(makespan, shared share of the heaviest block's life) of blocks on SMs that host up to
    ``per_sm`` blocks each: a block alone on its SM runs at rate 1, two together each at
    ``1 / slowdown``. The dispatcher fills one slot of every SM before any second slot (blocks
    0..S-1 land on SMs 0..S-1, blocks S..2S-1 beside them), then hands each freed slot the next
    block in launch order; empty blocks (cost 0) occupy a slot only at launch. The reference
    the estimator's closed form for co-residency is checked against (tests)."""
    costs = np.asarray(block_costs, float)
    n = len(costs)
    if n == 0:
        return 0.0, 0.0
    heavy = int(np.argmax(costs))
    remaining = np.zeros((sm_count, per_sm))
    block = np.full((sm_count, per_sm), -1)
    nxt = 0
    for slot in range(per_sm):  # breadth first: one block per SM, then the second slots
        for sm in range(sm_count):
            if nxt < n:
                block[sm, slot], remaining[sm, slot] = nxt, costs[nxt]
                nxt += 1
    t = shared = 0.0
    heavy_start = 0.0 if heavy < min(n, sm_count * per_sm) else None
    heavy_end = None
    while True:
        live = block >= 0
        # empties leave at once; their slots take the next blocks in launch order
        done = live & (remaining <= 0.0)
        while done.any():
            for sm, slot in zip(*np.nonzero(done), strict=True):
                if block[sm, slot] == heavy and heavy_end is None:
                    heavy_end = t
                block[sm, slot] = -1
                if nxt < n:
                    block[sm, slot], remaining[sm, slot] = nxt, costs[nxt]
                    if nxt == heavy:
                        heavy_start = t
                    nxt += 1
            live = block >= 0
            done = live & (remaining <= 0.0)
        if not live.any():
            break
        busy = live.sum(axis=1, keepdims=True)
        rate = np.where(live, np.where(busy > 1, 1.0 / slowdown, 1.0), 0.0)
        step = np.min(np.where(live, remaining / np.maximum(rate, 1e-300), np.inf))
        h = np.argwhere(block == heavy)
        if len(h) and busy[h[0][0], 0] > 1:
            shared += step
        remaining = np.where(live, remaining - rate * step, 0.0)
        remaining[np.abs(remaining) < 1e-12 * max(1.0, costs.max())] = 0.0
        t += step
    life = (heavy_end or t) - (heavy_start or 0.0)
    return t, (shared / life if life > 0 else 0.0)


def exact_prefill_grid(batch, heads: int, be: AttentionBackend = FA2) -> np.ndarray:
    """Key-columns of every block the standard kernel launches, empty ones (zero) included, in
    launch order: grid (ceil(max n / BM), R, heads), m-block fastest. A decode inside a mixed
    batch launches as many m-blocks as the longest prompt, all but its first empty."""
    bm, bn = be.block_m, be.block_n
    m_max = max(-(-n // bm) for _c, n in batch)
    out = []
    for _h in range(heads):
        for c, n in batch:
            for i in range(m_max):
                if i * bm >= n:
                    out.append(0.0)
                    continue
                rows_end = min((i + 1) * bm, n)
                out.append(min(-(-(c + n) // bn), -(-(c + rows_end) // bn)) * bn)
    return np.asarray(out, float)


def exact_prefill_blocks(batch, heads: int, be: AttentionBackend = FA2) -> np.ndarray:
    """Key-columns of every non-empty block of the standard kernel, in launch order
    (m-block fastest, then request, then head): the launched grid without its empty blocks
    (every block with a query row sees at least one key)."""
    grid = exact_prefill_grid(batch, heads, be)
    return grid[grid > 0]
