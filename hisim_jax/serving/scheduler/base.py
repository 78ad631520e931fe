"""Scheduler configuration and per-request state, with SGLang's defaults.

The engine (engine.py) runs SGLang's loop: each iteration either runs a prefill batch formed
from the waiting queue (continuing a chunked request first) or, if none can be formed, one
decode step over every running request. This module holds the knobs and the batch-formation
policy; the engine owns the clock.

Queues: ``waiting`` (arrived, not admitted), ``prefetch`` (waiting for an L3→L2 prefetch under
the ``wait_complete`` or ``timeout`` policies), ``running`` (admitted: prefilling or decoding)
and ``swapped`` (preempted to L2 with ``preemption="swap"``; on the way back its KV is
copied into L1 before it decodes again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEDULE_POLICIES = ("fcfs", "lpm")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
PREEMPTION_MODES = ("recompute", "swap")


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
    hit_tokens: list = field(default_factory=lambda: [0, 0, 0])  # served from L1/L2/L3
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
    recomputed: int = 0  # prompt tokens computed again after a preemption
    rejected: str = ""
    counted: bool = False  # its prefix lookup is in the cache's hit counters
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
