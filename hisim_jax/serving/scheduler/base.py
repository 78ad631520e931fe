"""What every scheduler policy shares: its knobs (SGLang's defaults), the per-request state,
CUDA-graph sizes, and the narrow view of an engine a policy decides through.

The engine (engine.py) owns the clock, the queues and the KV cache; each iteration it asks its
policy (sglang.py) for the next prefill batch and runs it, or else one decode step over every
running request. The policy sees the queues and KV admission only through ``EngineView``.

Queues: ``waiting`` (arrived, not admitted), ``prefetch`` (waiting for an L3→L2 prefetch under
the ``wait_complete`` or ``timeout`` policies), ``running`` (admitted: prefilling or decoding)
and ``swapped`` (preempted to L2 with ``preemption="swap"``; on the way back its KV is
copied into L1 before it decodes again).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SCHEDULE_POLICIES = ("fcfs", "lpm")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
PREEMPTION_MODES = ("recompute", "swap")
CLIP_MAX_NEW_TOKENS = 4096  # SGLang caps the decode reservation of one request at this
RETRACT_DECODE_STEPS = 20  # SGLang's look-ahead when it re-estimates after a retraction


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """SGLang server defaults where they exist (server_args.py, H100-class GPU)."""

    chunked_prefill_size: int = 8192  # tokens of one request's prompt per prefill step
    max_prefill_tokens: int = 16384  # tokens of all prompts in one prefill batch
    max_running_requests: int = 1024
    schedule_policy: str = "fcfs"  # "lpm": longest cached prefix first
    new_token_ratio: float = 0.7  # share of max_new_tokens reserved when admitting
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001  # per decode step, back towards the minimum
    preemption: str = "recompute"  # or "swap" to L2
    prefetch_policy: str = "best_effort"
    prefetch_timeout_base_s: float = 1.0
    prefetch_timeout_per_ki_token_s: float = 0.25
    cuda_graph_max_bs: int = 160  # decode batches up to this size replay a captured graph
    step_overhead_s: float = 0.0  # CPU time per step not hidden by the overlap scheduler

    def __post_init__(self):
        for name, value, allowed in (
            ("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES),
            ("prefetch_policy", self.prefetch_policy, PREFETCH_POLICIES),
            ("preemption", self.preemption, PREEMPTION_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} unknown (choose from {', '.join(allowed)})")
        if self.chunked_prefill_size < 1 or self.max_prefill_tokens < 1:
            raise ValueError("chunked_prefill_size and max_prefill_tokens must be >= 1")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        if not self.step_overhead_s >= 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {self.step_overhead_s}")

    def prefetch_timeout_s(self, tokens: int) -> float:
        return self.prefetch_timeout_base_s + self.prefetch_timeout_per_ki_token_s * tokens / 1024


def cuda_graph_sizes(max_bs: int) -> list[int]:
    """SGLang's captured decode batch sizes: 1, 2, 4, 8, then every 8 up to max_bs."""
    sizes = [1, 2, 4] + list(range(8, max_bs + 1, 8))
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


def graph_padded_size(n, sizes):
    """The captured size a decode batch of ``n`` replays at (n itself above the largest);
    ``n`` may be an array of batch sizes, ``sizes`` ascending."""
    sizes = np.asarray(sizes)
    fit = np.minimum(np.searchsorted(sizes, n), len(sizes) - 1)
    return np.where(np.asarray(n) <= sizes[-1], sizes[fit], n)


@dataclass(slots=True)
class ReqState:
    """A request inside the engine: mutable bookkeeping, one per request."""

    req: object  # workload.Request
    # served from L1/L2/L3 at its first lookup: cross-request reuse, what the hit rate counts
    hit_tokens: list = field(default_factory=lambda: [0, 0, 0])
    hit_nodes: list = field(default_factory=list)  # pinned while running
    path: list = field(default_factory=list)  # pinned prompt blocks after prefill
    target: int = 0  # prompt tokens to have in the KV cache (input, plus output after a recompute)
    cached: int = 0  # prompt tokens whose KV was reused
    computed: int = 0  # prompt tokens done (cached + computed so far)
    generated: int = 0
    private: int = 0  # L1 tokens allocated outside the prefix tree
    ready_s: float = 0.0  # when its KV loads/prefetches have landed
    scheduled_s: float = -1.0
    first_token_s: float = -1.0
    last_token_s: float = -1.0
    finish_s: float = -1.0
    preemptions: int = 0
    computed_prompt: int = 0  # prompt tokens its first prefill computed (chunks run)
    recomputed: int = 0  # prompt tokens computed again after a preemption (chunks run)
    rehit: int = 0  # prefix-cache hits of its prefills after the first (its own KV, mostly)
    rejected: str = ""
    counted: bool = False  # its first prefix lookup is in a cache's hit counters
    swapped_blocks: int = 0  # prompt blocks it held when swapped out (to pin again on swap-in)
    join_seq: int = 0  # when it last joined the running batch (ties in preemption order)
    replica: int = 0  # where the router sent it (the prefill replica, disaggregated)
    decode_replica: int = -1  # disaggregated: where it decoded
    prefill_end_s: float = -1.0  # disaggregated: prompt done, KV transfer starts

    @property
    def prompt_left(self) -> int:
        return self.target - self.computed

    @property
    def context(self) -> int:
        """Tokens in the KV cache for this request now."""
        return self.computed + self.generated


class EngineView(Protocol):
    """What a scheduler policy sees of its engine: the queues, and KV admission."""

    waiting: deque[ReqState]  # arrived, not admitted; a policy removes what it admits
    running: list[ReqState]  # decoding
    swapped: deque[ReqState]  # preempted to L2
    chunked: ReqState | None  # the prompt being prefilled chunk by chunk; a policy sets it
    decode_slots: int  # KV slots (and tokens computed) per running request in a decode step

    def pages(self, tokens: int) -> int: ...  # KV pages (in tokens) that many tokens take

    def l1_available(self) -> int: ...  # free or evictable L1 tokens

    def reserved_decode(self) -> float: ...  # KV the running requests are expected to need

    def clipped_left(self, st: ReqState) -> int: ...  # its remaining output, clipped

    def cached_prefix_tokens(self, st: ReqState) -> int: ...  # its prompt's cached prefix

    def match_prefix(self, st: ReqState, now: float): ...  # (prefix hit, prompt tokens)

    def start_prefill(self, st: ReqState, hit, prompt: int, chunk: int, now: float) -> bool:
        """Pin and load its prefix, allocate its first chunk; False: KV does not allow it."""
        ...

    def continue_prefill(self, st: ReqState, chunk: int, now: float) -> bool:
        """Allocate the chunked prompt's next chunk; False: it does not fit now."""
        ...

    def swap_in(self, now: float) -> None: ...  # bring swapped requests back while they fit
