"""Three-tier prefix KV cache: L1 GPU HBM, L2 host DRAM, L3 SSD or remote store.

Prefix identity comes from the workload: a prompt is a chain of block ids (one per
``block_tokens`` tokens, the last block possibly partial) and two prompts share the KV of their
first k blocks iff their first k ids are equal. The cache keeps those blocks in a trie; each
node can be resident in any subset of the tiers. Residency in every tier is prefix-closed (a
node is only resident where its parent is, or was loaded together with it), because eviction
only ever takes a tier's leaves: nodes with no child resident in that tier and, in L1, no
running request pinning them. So pages in use are never evicted.

Transfers between tiers go over FIFO links (L2→L1 and L1→L2 over PCIe, L3→L2 and L2→L3 over
the SSD or network), each with a ``busy_until`` time on the global clock: a transfer starts when
its link is free and lasts bytes / bandwidth. The cache only books the time; the scheduler
decides whether a request waits for its transfers (prefetch policies) and the engine overlaps
L2→L1 loads with the forward pass layer by layer.

Capacities are in tokens (per TP rank: every rank holds its heads' share of each token), in
whole pages of ``page_size`` tokens: each page is charged to the block it starts in, so a prompt's
blocks hold its tokens rounded up to whole pages, whatever the block and page sizes (a block that
starts inside a page its parent opened costs only the pages it adds). Two prompts that part
inside a page share that page's charge here, where SGLang's paged radix cache, which matches
whole pages, would hold the page twice. Everything here is plain Python: it runs once per
request event, never per decode step.

Hybrid models (``KVCacheConfig.state_checkpoints``: Qwen3.5's Gated DeltaNet layers, Nemotron-H's
Mamba-2 layers) keep a fixed recurrent state per request for their linear layers instead of a
growing KV, and the attention layers' KV of a cached prefix cannot resume those layers: a prefix
is reusable only up to a point where the state was saved. The rule is SGLang's (read in
``srt/mem_cache/mamba_radix_cache.py``, ``cache_unfinished_req``/``cache_finished_req`` and
``_match_prefix_helper``, and in sglang 0.5.23's ``srt/mem_cache/unified_cache/components/
mamba.py``, the Mamba component of the ``UnifiedRadixCache`` that replaced it): caching a
request's tokens saves its state on the node where the insert ends, and a prefix match returns
only the deepest matched node that holds a state. The engine inserts a prompt once its
prefill is done, so a state is saved where that insert ends: by default (``state_grid_tokens``
0, SGLang's ``no_buffer`` mode) at the prompt's end, its last block, partial or not; with a grid
of N tokens (SGLang's ``extra_buffer`` mode, its default under overlap scheduling, tracks states
on lcm(64, page) and truncates the insert there) at the last block ending at or before the last
multiple of N. Either way only at a page boundary (a paged tree names only whole pages). A match
is the longest resident prefix that ends at a saved state before the prompt's last token (always
computed, as without states): cached KV past the last saved state is computed again and its
tokens count as misses, not hits.

vLLM (0.33.0: ``MambaManager`` in ``vllm/v1/core/single_type_kv_cache_manager.py`` under
``mamba_cache_mode="align"``, ``_mamba_block_aligned_split`` in ``v1/core/sched/scheduler.py``)
differs: it keeps a state only where a scheduler step ends on a multiple of its hybrid block
size (raised so one attention page weighs one state: hundreds of tokens; prefill chunks are cut
to end there) and never at a partial tail, and finds its hit by searching blocks right to left
for the last one with a state, so its hits are whole hybrid blocks. SGLang keeps the state at
the exact end of what it caches. ``state_grid_tokens`` set to vLLM's block size approximates
vLLM's rule to the block below; SGLang's ``extra_buffer`` also saves a state at the branching
point of a KV hit longer than its state hit, which is not modelled.

A state mark lives on its node and goes wherever the node's KV goes: an L1 eviction that writes
the node down to L2 or L3 keeps it (SGLang HiCache backs a node's state up to the host with its
KV), and a block placed again after its KV left every tier (and the shared store) comes back
without it. States take no tier capacity here and are never evicted on their own (SGLang's
separate Mamba pool can drop a state while its KV stays); pins need no change (a request holds
its own running state). Nodes never split (a node is a block; a prompt that extends a partial
block gets a node of its own, without the partial block's state). The shared store
(kvstore.py) records KV only: a block found there without a node of this replica's that
still holds a state is no state point, so hybrids reuse little from the store.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from hisim_jax.serving.kvstore import KVStore

L1, L2, L3 = 0, 1, 2
TIER_NAMES = ("l1", "l2", "l3")
# Eviction policies: the key a tier's leaves are evicted in ascending order of. Add one here.
EVICTION_KEYS = {
    "lru": lambda node: node.last_use,
    "lfu": lambda node: (node.uses, node.last_use),
}
EVICTION_POLICIES = tuple(EVICTION_KEYS)
WRITE_POLICIES = ("write_through", "write_back")


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """Tier capacities (tokens) and link bandwidths (bytes/s); SGLang's defaults where it has
    them (page size 1, LRU, HiCache write-through)."""

    l1_tokens: int
    bytes_per_token: float  # KV bytes of one token on one TP rank
    block_tokens: int = 64  # tokens per prefix block of the workload
    page_size: int = 1
    l2_tokens: int = 0
    l3_tokens: int = 0
    l2_read_bytes_per_s: float = 55e9  # L2 -> L1 (host to device)
    l2_write_bytes_per_s: float = 55e9  # L1 -> L2
    l3_read_bytes_per_s: float = 7e9  # L3 -> L2
    l3_write_bytes_per_s: float = 4e9  # L2 -> L3
    eviction: str = "lru"
    write_policy: str = "write_through"
    ranks: int = 1  # TP ranks: a shared store moves every rank's share of a token
    # the model has recurrent-state layers: a prefix is reusable only where a state was saved
    state_checkpoints: bool = False
    # where an insert saves its state: 0 at the prompt's end, N at the last multiple of N
    state_grid_tokens: int = 0

    def __post_init__(self):
        if self.l1_tokens <= 0:
            raise ValueError(f"l1_tokens must be positive, got {self.l1_tokens}")
        if self.page_size < 1 or self.block_tokens < 1:
            raise ValueError("page_size and block_tokens must be >= 1")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction {self.eviction!r} unknown (choose from {', '.join(EVICTION_POLICIES)})"
            )
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(
                f"write policy {self.write_policy!r} unknown (choose from {', '.join(WRITE_POLICIES)})"
            )
        if min(self.l2_tokens, self.l3_tokens) < 0:
            raise ValueError("tier capacities must be >= 0")
        if self.state_grid_tokens < 0:
            raise ValueError(f"state_grid_tokens must be >= 0, got {self.state_grid_tokens}")


class _Node:
    """A prefix block. Mutable internal bookkeeping; never leaves this module."""

    __slots__ = (
        "id",
        "parent",
        "tokens",
        "pages",
        "children",
        "tiers",
        "child_res",
        "pins",
        "last_use",
        "uses",
        "key",
        "l2_ready_s",
        "via_l3",
        "state",
    )

    def __init__(self, node_id: int, parent: _Node | None, tokens: int, pages: int):
        self.id = node_id
        self.parent = parent
        # the block's identity across replicas (the shared store's key): its whole prefix
        self.key = hash((parent.key, node_id)) if parent is not None else 0
        self.tokens = tokens
        self.pages = pages  # the pages it is charged (KVCache.span_pages)
        self.children: dict[int, _Node] = {}
        self.tiers = [False, False, False]
        self.child_res = [0, 0, 0]  # children resident per tier
        self.pins = 0
        self.last_use = 0.0
        self.uses = 0
        self.l2_ready_s = 0.0  # when its L2 copy has landed (reads before then wait or miss)
        self.via_l3 = False  # in L2 because it was prefetched from L3: its hits count as L3
        self.state = False  # a recurrent state saved at its end is held (state_checkpoints)


def _served_from(node: _Node, tier: int) -> int:
    """The tier a hit on ``node`` (fastest in ``tier``) counts for: an L2 copy prefetched from
    L3 was served from L3."""
    return L3 if tier == L2 and node.via_l3 else tier


@dataclass(slots=True)
class PrefixHit:
    """The longest cached prefix of a prompt: its nodes and where each is fastest to get."""

    nodes: list = field(default_factory=list)
    tier_of: list = field(default_factory=list)  # per node: L1, L2 or L3
    tokens: list = field(default_factory=lambda: [0, 0, 0])  # hit tokens per tier
    lower_pages: int = 0  # pages to bring into L1 from L2/L3
    lower_nodes: int = 0  # blocks to bring (one inside a page its parent holds adds no page)
    unpinned_l1_pages: int = 0  # L1 pages nobody pins yet (evictable until acquired)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


@dataclass(slots=True)
class CacheStats:
    hit_tokens: list = field(default_factory=lambda: [0, 0, 0])
    miss_tokens: int = 0
    evicted_tokens: list = field(default_factory=lambda: [0, 0, 0])
    bytes_moved: dict = field(
        default_factory=lambda: {"l2_to_l1": 0.0, "l1_to_l2": 0.0, "l3_to_l2": 0.0, "l2_to_l3": 0.0}
    )


class KVCache:
    """The prefix trie over three tiers, with capacity accounting and timed transfers."""

    def __init__(self, cfg: KVCacheConfig, shared: KVStore | None = None):
        self.cfg = cfg
        # a cluster's shared store serves as this replica's L3 (instead of a local L3)
        self.shared = shared
        if shared is not None and cfg.l3_tokens:
            raise ValueError("a replica has either a local L3 tier or the shared store, not both")
        self.capacity = [cfg.l1_tokens, cfg.l2_tokens, cfg.l3_tokens]
        # whether blocks can live below L1 at all (else release skips the L2/L3 checks)
        self._lower_tiers = bool(cfg.l2_tokens or cfg.l3_tokens or shared is not None)
        self.used = [0, 0, 0]  # tree pages resident per tier
        self.resident_nodes = [0, 0, 0]
        self.private = 0  # L1 tokens of running requests outside the tree
        self.l2_private = 0  # L2 tokens of requests swapped out of L1
        self.pinned_pages = 0  # L1 tree pages some running request holds
        self.root = _Node(-1, None, 0, 0)
        self.root.tiers = [True, True, True]
        self._heaps: list[list] = [[], [], []]
        self._seq = 0
        self.link_busy_until = {"l2_to_l1": 0.0, "l1_to_l2": 0.0, "l3_to_l2": 0.0, "l2_to_l3": 0.0}
        self.stats = CacheStats()
        self._eviction_key = EVICTION_KEYS[cfg.eviction]
        self._lru = cfg.eviction == "lru"  # the common case, without a call per key
        self._states = cfg.state_checkpoints
        # Nodes an operation in progress relies on: no tier may evict them meanwhile (an L1
        # eviction can cascade into L2 and L3 evictions through write-back).
        self._guard: set[int] = set()

    # --------------------------------------------------------------------------------------
    # capacity

    def pages(self, tokens: int) -> int:
        p = self.cfg.page_size
        return -(-int(tokens) // p) * p

    def span_pages(self, start: int, tokens: int) -> int:
        """Pages charged to a block of ``tokens`` starting ``start`` tokens into its prompt: the
        pages its end reaches beyond those its start had (a page is charged to the block it
        starts in). A path's blocks then sum to its tokens rounded up to whole pages, whatever
        the block and page sizes; rounding each block up on its own would charge a page per
        16-token block under 64-token pages, four times the KV."""
        p = self.cfg.page_size
        return -(-(start + tokens) // p) * p - -(-start // p) * p

    def l1_free(self) -> int:
        return self.capacity[L1] - self.used[L1] - self.private

    def alloc_private(self, tokens: int) -> None:
        self.private += tokens

    def free_private(self, tokens: int) -> None:
        self.private -= tokens
        if self.private < 0:
            raise AssertionError("private KV tokens went negative")

    def free(self, tier: int) -> int:
        if tier == L1:
            return self.l1_free()
        return self.capacity[tier] - self.used[tier] - (self.l2_private if tier == L2 else 0)

    def l1_available(self) -> int:
        """Free L1 tokens plus what eviction of unpinned tree pages could free."""
        return self.l1_free() + self.used[L1] - self.pinned_pages

    def swap_out(self, tokens: int, now: float) -> float | None:
        """Move a preempted request's private KV to L2; returns when the copy is done."""
        if self.capacity[L2] <= 0 or not self.make_room(L2, tokens, now):
            return None
        self.l2_private += tokens
        self.free_private(tokens)
        return self._book(
            "l1_to_l2", tokens * self.cfg.bytes_per_token, self.cfg.l2_write_bytes_per_s, now
        )

    def drop_swapped(self, tokens: int) -> None:
        """Forget a swapped-out request's KV in L2 (it will be recomputed instead)."""
        self.l2_private -= tokens
        if self.l2_private < 0:
            raise AssertionError("swapped KV tokens went negative")

    def swap_in(self, tokens: int, now: float) -> float | None:
        """Bring a swapped request's KV back to L1; returns when it has landed."""
        if not self.make_room(L1, tokens, now):
            return None
        self.l2_private -= tokens
        self.alloc_private(tokens)
        return self._book(
            "l2_to_l1", tokens * self.cfg.bytes_per_token, self.cfg.l2_read_bytes_per_s, now
        )

    def make_room(self, tier: int, tokens: int, now: float, protect=()) -> bool:
        """Evict leaves of ``tier`` until ``tokens`` fit; False if pinned or protected pages
        prevent it (what was evicted stays evicted)."""
        if tokens > self.capacity[tier]:
            return False
        if self.free(tier) >= tokens:
            return True  # the common case: nothing to evict, nothing to guard
        added = {id(n) for n in protect} - self._guard
        self._guard |= added
        try:
            while self.free(tier) < tokens:
                node = self._pop_victim(tier)
                if node is None:
                    return False
                while node is not None:
                    parent = self._evict(node, tier, now)  # a new leaf of this tier, or None
                    node = None
                    if parent is None:
                        pass
                    elif self.free(tier) < tokens and self._next_victim(parent, tier):
                        node = parent  # a prefix chain leaves leaf by leaf without the heap
                    else:
                        self._push(parent, tier)
            return True
        finally:
            self._guard -= added

    def _next_victim(self, leaf: _Node, tier: int) -> bool:
        """Whether a leaf just made by an eviction would be the heap's next victim: evictable
        and older (strictly: ties go to entries already queued) than anything queued."""
        if (tier == L1 and leaf.pins) or id(leaf) in self._guard:
            return False
        heap = self._heaps[tier]
        return not heap or self._key(leaf) < heap[0][0]

    # --------------------------------------------------------------------------------------
    # lookup and insertion

    def lookup(
        self, block_ids, input_len: int, now: float = math.inf, whole: bool = False
    ) -> PrefixHit:
        """Longest prefix of the prompt resident in any tier. A fully cached prompt still
        computes its last token (the step must produce logits), as SGLang's radix cache does.

        At time ``now`` a block whose L2 copy is still in flight (an L3 prefetch, a write-back)
        ends the prefix: a request scheduled before its prefetch completes recomputes the rest,
        as SGLang's ``best_effort`` and ``timeout`` prefetch policies do. Blocks in L2 because
        they were prefetched from L3 count as L3 hits: that is where they were served from.

        With ``state_checkpoints`` (a hybrid model) the hit ends at the deepest block of that
        prefix holding a saved state and ending before the prompt's last token (``_state_cut``).

        ``whole``: every resident block counts, with no page cut, last-token or state rule (a
        swapped request taking back the blocks it already held, with its own running state)."""
        hit = PrefixHit()
        nodes, tier_of, tokens = hit.nodes, hit.tier_of, hit.tokens
        node = self.root
        bt = self.cfg.block_tokens
        covered = lower = lower_nodes = unpinned = 0
        src = L1
        shared = self.shared
        for bid in block_ids:  # hot path: kept flat
            child = node.children.get(bid)
            block_len = input_len - covered
            if block_len > bt:
                block_len = bt
            if child is None:
                # unknown here; another replica may have put it in the shared store
                if shared is None or block_len <= 0:
                    break
                if shared.tokens(hash((node.key, bid))) != block_len:
                    break
                child = _Node(bid, node, block_len, self.span_pages(covered, block_len))
                # resident nowhere yet
                node.children[bid] = child
                tier = L3
            else:
                tiers = child.tiers
                tier = L1 if tiers[0] else L2 if tiers[1] else L3 if tiers[2] else -1
                if tier < 0 and shared is not None and child.key in shared:
                    tier = L3
                if tier < 0 or block_len <= 0 or child.tokens != block_len:
                    break
                if tier == 1 and child.l2_ready_s > now:
                    break  # still landing in L2
            nodes.append(child)
            tier_of.append(tier)
            src = L3 if tier == 1 and child.via_l3 else tier  # _served_from, inlined
            tokens[src] += block_len
            if tier:
                lower += child.pages
                lower_nodes += 1
            elif not child.pins:
                unpinned += child.pages
            covered += block_len
            node = child
        hit.lower_pages, hit.lower_nodes, hit.unpinned_l1_pages = lower, lower_nodes, unpinned
        if whole:
            return hit
        if self._states:
            self._state_cut(hit, covered, input_len)
        elif self.cfg.page_size > 1:
            self._page_align(hit, covered, input_len)
        elif covered >= input_len and hit.nodes:
            hit.tokens[src] -= covered - input_len + 1
        return hit

    def _page_align(self, hit: PrefixHit, covered: int, input_len: int) -> None:
        """SGLang matches whole pages of the prompt minus its last token: cut the hit there.
        Blocks that start at or after the cut leave the hit; the one it falls in stays (its KV
        is held) but only its tokens before the cut count, the rest are computed again."""
        page = self.cfg.page_size
        usable = min(covered, input_len - 1)
        usable -= usable % page
        nodes = hit.nodes
        while nodes and covered - nodes[-1].tokens >= usable:
            covered -= self._drop_last(hit)
        if nodes:
            hit.tokens[_served_from(nodes[-1], hit.tier_of[-1])] -= covered - usable

    def _state_cut(self, hit: PrefixHit, covered: int, input_len: int) -> None:
        """Hybrid models: the linear layers resume only from a saved state, so the hit ends at
        the deepest of its blocks that holds one and ends before the prompt's last token. Its
        blocks past that are computed again (their KV stays held); their tokens are misses. A
        state is saved only at a page boundary (``insert``), so the cut needs no page rule."""
        nodes = hit.nodes
        last = input_len - 1
        while nodes and (covered > last or not nodes[-1].state):
            covered -= self._drop_last(hit)

    @staticmethod
    def _drop_last(hit: PrefixHit) -> int:
        """Take a hit's last block out of it; returns its tokens."""
        n, t = hit.nodes.pop(), hit.tier_of.pop()
        hit.tokens[_served_from(n, t)] -= n.tokens
        if t != L1:
            hit.lower_pages -= n.pages
            hit.lower_nodes -= 1
        elif not n.pins:
            hit.unpinned_l1_pages -= n.pages
        return n.tokens

    def record_lookup(self, hit_tokens, input_len: int, sign: int = 1) -> None:
        """Count a prompt's hit tokens per tier and its misses (``sign`` -1 takes back a count:
        a request preempted by recompute is counted at its last admission only)."""
        for t in range(3):
            self.stats.hit_tokens[t] += sign * hit_tokens[t]
        self.stats.miss_tokens += sign * (input_len - sum(hit_tokens))

    def insert(self, block_ids, input_len: int, now: float, prefix=()) -> tuple[list, int]:
        """Put a computed prompt's blocks into L1: the request's private tokens become tree
        pages. Returns the path of nodes, which the caller pins and later releases (that
        release is the use counted for LRU/LFU), and the pages newly placed in L1, which the
        caller frees from its private allocation. With write-through, new blocks are copied to
        L2 and L3 as well (as far as they fit).

        With ``state_checkpoints``, the request's recurrent state is saved on a block of the
        path (``_save_state``). A block placed again after its KV had left every tier and the
        shared store loses the state it may have held."""
        bt = self.cfg.block_tokens
        # ``prefix``: the request's matched blocks, still pinned in L1, need no second walk
        path = list(prefix)
        node = path[-1] if path else self.root
        new_l1_pages = new_nodes = 0
        fresh = False  # whether the path's last block was just placed in L1
        for k, bid in enumerate(block_ids[len(path) :], start=len(path)):
            block_len = min(bt, input_len - k * bt)
            if block_len <= 0:
                break
            child = node.children.get(bid)
            if child is None:
                child = _Node(bid, node, block_len, self.span_pages(k * bt, block_len))
                node.children[bid] = child
            elif child.tokens != block_len:
                break  # a partial block that another prompt extends: not the same KV
            fresh = not child.tiers[L1]
            if fresh:
                if child.state and not (
                    any(child.tiers) or (self.shared is not None and child.key in self.shared)
                ):
                    child.state = False  # its KV (and the state with it) was gone everywhere
                child.last_use = now  # before it is queued for eviction with this key
                # only the path's last block can be an L1 leaf (the heap's candidates); the
                # others are queued when their child leaves L1 (_set_resident, inlined: the
                # parent is the previous block of the path, resident in L1)
                if not node.tiers[L1]:
                    raise AssertionError(f"prefix broken: parent of block {bid} not in l1")
                child.tiers[L1] = True
                child.via_l3 = False
                node.child_res[L1] += 1
                new_l1_pages += child.pages
                new_nodes += 1
            # blocks already in L1 are touched when the request releases its path
            path.append(child)
            node = child
        self.used[L1] += new_l1_pages
        self.resident_nodes[L1] += new_nodes
        if self._states and path:
            self._save_state(path, input_len)
        if fresh:
            self._push(node, L1)  # a new leaf (old ones are queued already or at release)
        if self.cfg.write_policy == "write_through":
            for tier in (L2, L3):
                if self.capacity[tier] > 0:
                    self._copy_down(path, tier, now, protect=path)
            if self.shared is not None:
                self._write_shared(path, now)
        return path, new_l1_pages

    def _save_state(self, path: list, input_len: int) -> None:
        """Mark the block where an inserted prompt's state is kept. Without a grid: its last
        block, if the insert reached the prompt's end (a partial block another prompt extends
        stops it). With a grid of N: the deepest block ending at or before the last multiple of
        N in the prompt. Only a block ending on a page boundary can hold one."""
        bt, page, grid = self.cfg.block_tokens, self.cfg.page_size, self.cfg.state_grid_tokens
        if not grid:
            end = (len(path) - 1) * bt + path[-1].tokens  # only the last block can be partial
            if end == input_len and end % page == 0:
                path[-1].state = True
            return
        target = input_len // grid * grid
        for k in range(min(len(path), target // bt + 1) - 1, -1, -1):
            end = k * bt + path[k].tokens
            if end <= target and end % page == 0:
                path[k].state = True
                return

    def pin(self, nodes) -> None:
        for n in nodes:
            if not n.tiers[L1]:
                raise AssertionError(f"pinning block {n.id}, which is not in L1")
            if n.pins == 0:
                self.pinned_pages += n.pages
            n.pins += 1

    def release(self, nodes, now: float, touch: bool = True) -> None:
        """A request is done with these nodes: unpin them (they stay cached) and count the use,
        unless ``touch`` is False (the same request still holds them through another pin)."""
        push = self._push
        if not touch:
            for n in nodes:
                n.pins -= 1
                if n.pins <= 0:
                    if n.pins < 0:
                        raise AssertionError("KV node unpinned more often than pinned")
                    self.pinned_pages -= n.pages
                    if n.tiers[0] and not n.child_res[0]:
                        push(n, 0)  # evictable again: L1's heap drops pinned entries
            return
        unpinned = 0
        lower = self._lower_tiers
        for n in nodes:  # hot path: the touch is inlined
            n.pins -= 1
            if n.pins <= 0:
                if n.pins < 0:
                    raise AssertionError("KV node unpinned more often than pinned")
                unpinned += n.pages
            n.last_use = now
            n.uses += 1
            below = n.child_res
            if not below[0]:  # a pinned node is in L1: pins keep it from eviction
                push(n, 0)
            if lower:
                tiers = n.tiers
                if tiers[1] and not below[1]:
                    push(n, 1)
                if tiers[2] and not below[2]:
                    push(n, 2)
        self.pinned_pages -= unpinned

    def acquire(self, hit: PrefixHit, now: float) -> float | None:
        """Pin a hit's nodes in L1 for a request, loading its L2/L3 part into L1 first.
        Returns when the loaded bytes have landed (``now`` if all were in L1), or None, with
        nothing pinned, if L1 cannot make room."""
        if not hit.lower_nodes:  # all in L1 (the common case): nothing to load
            self.pin(hit.nodes)
            return now
        l1_nodes = [n for n, t in zip(hit.nodes, hit.tier_of, strict=True) if t == L1]
        self.pin(l1_nodes)
        done = self._load_to_l1(hit, now)
        if done is None:
            self.release(l1_nodes, now)
            return None
        self.pin([n for n, t in zip(hit.nodes, hit.tier_of, strict=True) if t != L1])
        return done

    # --------------------------------------------------------------------------------------
    # transfers

    @property
    def has_l3(self) -> bool:
        return self.capacity[L3] > 0 or self.shared is not None

    def _write_shared(self, nodes, now: float) -> None:
        """Copy a path's blocks the shared store lacks into it (all TP ranks' shares)."""
        shared = self.shared
        fresh = sum(n.tokens for n in nodes if n.key not in shared)
        if not fresh:
            shared.touch([n.key for n in nodes])
            return
        shared.write(
            [(n.key, n.tokens) for n in nodes], self.cfg.bytes_per_token * self.cfg.ranks, now
        )
        self.stats.bytes_moved["l2_to_l3"] += fresh * self.cfg.bytes_per_token

    def _book(self, link: str, nbytes: float, bandwidth: float, now: float) -> float:
        return self._book_span(link, nbytes, bandwidth, now)[1]

    def _book_span(self, link: str, nbytes: float, bandwidth: float, now: float):
        """Book a transfer on a FIFO link: (start, end) seconds."""
        self.stats.bytes_moved[link] += nbytes
        if link == "l3_to_l2" and self.shared is not None:
            # every TP rank reads its share from the store, over the store's shared link
            nbytes *= self.cfg.ranks
            end = self.shared.read(nbytes, now)
            return end - nbytes / self.shared.cfg.read_bytes_per_s, end
        start = max(now, self.link_busy_until[link])
        end = start + nbytes / bandwidth
        self.link_busy_until[link] = end
        return start, end

    def _load_to_l1(self, hit: PrefixHit, now: float) -> float | None:
        """Copy the hit's L2 (and, through L2, L3) nodes into L1; returns when the last byte
        lands, or None if L1 cannot make room. L3 nodes first travel L3→L2."""
        lower = [n for n, t in zip(hit.nodes, hit.tier_of, strict=True) if t != L1]
        if not lower:
            return now
        need = sum(n.pages for n in lower)
        if not self.make_room(L1, need, now, protect=hit.nodes):
            return None
        # L2 copies still in flight (callers that looked up at ``now`` see none) are waited for
        ready = max([now] + [n.l2_ready_s for n in lower if n.tiers[L2]])
        if any(not n.tiers[L2] for n in lower):
            ready = self.prefetch_to_l2(hit.nodes, ready, protect=hit.nodes)
            if ready is None:  # L2 cannot take them: read L3 straight into L1, as slowly
                if self.shared is not None:
                    self.shared.touch([n.key for n in lower if not n.tiers[L2]])
                nbytes = sum(n.tokens for n in lower if not n.tiers[L2]) * self.cfg.bytes_per_token
                ready = self._book("l3_to_l2", nbytes, self.cfg.l3_read_bytes_per_s, now)
        nbytes = sum(n.tokens for n in lower) * self.cfg.bytes_per_token
        done = self._book("l2_to_l1", nbytes, self.cfg.l2_read_bytes_per_s, ready)
        for n in lower:
            self._set_resident(n, L1, now)
            n.via_l3 = False  # served; from now on a hit on it is an L1 (or L2) hit
            self._touch(n, now)
        return done

    def prefetch_to_l2(self, path, now: float, protect=()) -> float | None:
        """Bring a prefix path into L2 ahead of scheduling: blocks only in L3 are read from it,
        blocks only in L1 are copied down (so L2 holds the whole prefix). Returns when the
        path's L2 copies have all landed (including reads other requests started), or None if
        L2 cannot make room."""
        # copies already landing in L2 (the blocks still to fetch get fresh times below)
        landed = max([now] + [n.l2_ready_s for n in path if n.tiers[L2] and not n.tiers[L1]])
        todo = [n for n in path if not n.tiers[L2]]
        if not todo:
            return landed
        keep = list(protect) + list(path)
        if not self.make_room(L2, sum(n.pages for n in todo), now, protect=keep):
            return None
        from_l3 = [n for n in todo if not n.tiers[L1]]
        from_l1 = [n for n in todo if n.tiers[L1]]
        if from_l3 and self.shared is not None:
            self.shared.touch([n.key for n in from_l3])
        for n in todo:  # path order: parents first
            self._set_resident(n, L2, now)
        if from_l1:
            end = self._book(
                "l1_to_l2",
                sum(n.tokens for n in from_l1) * self.cfg.bytes_per_token,
                self.cfg.l2_write_bytes_per_s,
                now,
            )
            for n in from_l1:
                n.l2_ready_s = end
        if not from_l3:
            return landed
        # the read streams the blocks in path order: each lands when its bytes are through
        total = sum(n.tokens for n in from_l3)
        start, end = self._book_span(
            "l3_to_l2", total * self.cfg.bytes_per_token, self.cfg.l3_read_bytes_per_s, now
        )
        done = 0
        for n in from_l3:
            done += n.tokens
            n.l2_ready_s = start + (end - start) * done / total
            n.via_l3 = True
        return max(landed, end)

    def _copy_down(self, nodes, tier: int, now: float, protect=()) -> None:
        """Write nodes that are not yet in ``tier`` (L2 or L3), evicting there as needed; stops
        where the path would lose its prefix (a node may only be where its parent is)."""
        todo = [n for n in nodes if not n.tiers[tier]]
        if not todo:
            return
        guard = list(protect) + list(nodes)
        kept = []
        for n in todo:
            if not self.make_room(tier, n.pages, now, protect=guard) or not n.parent.tiers[tier]:
                break
            kept.append(n)
            self._set_resident(n, tier, now)
        if kept:
            link, bw = (
                ("l1_to_l2", self.cfg.l2_write_bytes_per_s)
                if tier == L2
                else ("l2_to_l3", self.cfg.l3_write_bytes_per_s)
            )
            end = self._book(link, sum(n.tokens for n in kept) * self.cfg.bytes_per_token, bw, now)
            if tier == L2:
                for n in kept:
                    n.l2_ready_s = end

    # --------------------------------------------------------------------------------------
    # residency and eviction

    def _set_resident(self, node: _Node, tier: int, now: float, push: bool = True) -> None:
        if node.tiers[tier]:
            return
        parent = node.parent
        if parent is not None and not parent.tiers[tier]:
            raise AssertionError(
                f"prefix broken: parent of block {node.id} not in {TIER_NAMES[tier]}"
            )
        node.tiers[tier] = True
        self.used[tier] += node.pages
        self.resident_nodes[tier] += 1
        parent.child_res[tier] += 1
        if push:
            self._push(node, tier)

    def _touch(self, node: _Node, now: float) -> None:
        node.last_use = now
        node.uses += 1
        tiers, below = node.tiers, node.child_res
        # only a tier's leaves are eviction candidates; inner nodes are queued when they
        # become leaves (hot path: unrolled)
        if tiers[0] and not below[0]:
            self._push(node, 0)
        if tiers[1] and not below[1]:
            self._push(node, 1)
        if tiers[2] and not below[2]:
            self._push(node, 2)

    def _key(self, node: _Node):
        return node.last_use if self._lru else self._eviction_key(node)

    def _push(self, node: _Node, tier: int) -> None:
        self._seq += 1
        heap = self._heaps[tier]
        key = node.last_use if self._lru else self._eviction_key(node)
        heapq.heappush(heap, (key, self._seq, node))
        if len(heap) > 64 + 4 * self.resident_nodes[tier]:
            self._compact(tier)

    def _compact(self, tier: int) -> None:
        """Drop stale heap entries (lazy deletion keeps one per touch)."""
        live = {}
        for key, seq, node in self._heaps[tier]:
            if node.tiers[tier] and node.child_res[tier] == 0 and key == self._key(node):
                live[id(node)] = (key, seq, node)
        self._heaps[tier] = list(live.values())
        heapq.heapify(self._heaps[tier])

    def _evictable(self, node: _Node, tier: int) -> bool:
        return (
            node.tiers[tier]
            and node.child_res[tier] == 0
            and (tier != L1 or node.pins == 0)
            and node is not self.root
        )

    def _pop_victim(self, tier: int) -> _Node | None:
        heap = self._heaps[tier]
        guard = self._guard
        skipped = []
        victim = None
        lru, key_of, root, l1 = self._lru, self._eviction_key, self.root, tier == L1
        pop = heapq.heappop
        while heap:  # hot path: _evictable and _key inlined
            key, seq, node = pop(heap)
            if l1 and node.pins:
                continue  # pinned: dropped here, pushed again when its last pin is released
            leaf = node.tiers[tier] and not node.child_res[tier]
            current = node.last_use if lru else key_of(node)
            if not leaf or node is root or (guard and id(node) in guard):
                if leaf and key == current:
                    skipped.append((key, seq, node))  # pinned or protected now, evictable later
                continue
            if key != current:
                continue  # stale entry; a fresher one is in the heap
            victim = node
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return victim

    def _evict(self, node: _Node, tier: int, now: float) -> _Node | None:
        # write back on evict: a block leaving L1 (L2) goes down to L2 (L3) unless already
        # there (always, under write-through, when it fitted at insert time)
        # (with the ancestors it lacks there, which stay where they are too: the lower tier
        # must hold the whole prefix for the block to be usable)
        lower = tier + 1
        if lower <= L3 and self.capacity[lower] > 0 and not node.tiers[lower]:
            chain, a = [], node
            while a is not self.root and not a.tiers[lower]:
                chain.append(a)
                a = a.parent
            self._copy_down(chain[::-1], lower, now)
        elif (
            self.shared is not None
            and (tier == L2 or self.capacity[L2] == 0)
            and node.key not in self.shared
        ):
            # leaving this replica's last tier: write it back to the shared store (under
            # write-through it went there at insert, unless the store evicted it since)
            chain, a = [], node
            while a is not self.root and a.key not in self.shared:
                chain.append(a)
                a = a.parent
            self._write_shared(chain[::-1], now)
        node.tiers[tier] = False
        if tier == L2:
            node.via_l3 = False
        self.used[tier] -= node.pages
        self.resident_nodes[tier] -= 1
        node.parent.child_res[tier] -= 1
        self.stats.evicted_tokens[tier] += node.tokens
        parent = node.parent
        if not any(node.tiers) and not node.children:
            del parent.children[node.id]  # forget blocks held nowhere
        if parent is not self.root and parent.child_res[tier] == 0 and parent.tiers[tier]:
            return parent  # a new leaf: the caller queues it or evicts it next
        return None

    # --------------------------------------------------------------------------------------
    # checks

    def check_invariants(self) -> None:
        """Capacities respected, counts consistent, residency prefix-closed, states only where
        they can be saved (for tests)."""
        used = [0, 0, 0]
        stack = [(self.root, 0)]
        while stack:
            n, start = stack.pop()
            counts = [0, 0, 0]
            for c in n.children.values():
                if c.state and (not self._states or (start + c.tokens) % self.cfg.page_size):
                    raise AssertionError(f"block {c.id} holds a state it cannot have")
                for t in range(3):
                    if c.tiers[t]:
                        counts[t] += 1
                        used[t] += c.pages
                        if not n.tiers[t]:
                            raise AssertionError(
                                f"block {c.id} in {TIER_NAMES[t]} without its parent"
                            )
                if c.pins < 0:
                    raise AssertionError("negative pin count")
                if c.pins > 0 and not c.tiers[L1]:
                    raise AssertionError(f"pinned block {c.id} not in L1")
                stack.append((c, start + c.tokens))
            if counts != n.child_res:
                raise AssertionError(f"child residency counts of block {n.id} out of date")
        if used != self.used:
            raise AssertionError(f"tier usage {self.used} != recount {used}")
        private = [self.private, self.l2_private, 0]
        for t in range(3):
            if self.used[t] + private[t] > self.capacity[t]:
                raise AssertionError(f"{TIER_NAMES[t]} over capacity")
        pinned, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            for c in n.children.values():
                pinned += c.pages if c.pins > 0 else 0
                stack.append(c)
        if pinned != self.pinned_pages:
            raise AssertionError(f"pinned pages {self.pinned_pages} != recount {pinned}")

    def pinned_nodes(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            for c in n.children.values():
                count += c.pins > 0
                stack.append(c)
        return count
