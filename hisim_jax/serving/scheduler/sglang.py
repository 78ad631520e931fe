"""SGLang's scheduling rules (python/sglang/srt/managers/scheduler.py and schedule_policy.py,
v0.4-0.5): each iteration runs a prefill batch if one can be formed — a chunked prompt first,
then waiting requests in FCFS or longest-prefix-match order, admitted by ``PrefillAdder``
under ``max_prefill_tokens``/``chunked_prefill_size`` and the KV reservation — otherwise one
decode step over every running request.

The reservation: a running request is expected to need ``new_token_ratio`` x its remaining
output (clipped at ``CLIP_MAX_NEW_TOKENS``) more KV; the ratio decays towards
``min_new_token_ratio`` every decode step and is re-estimated after a retraction.
"""

from __future__ import annotations

import itertools

from hisim_jax.serving.scheduler.base import (
    CLIP_MAX_NEW_TOKENS,
    RETRACT_DECODE_STEPS,
    EngineView,
    ReqState,
    SchedulerConfig,
    cuda_graph_sizes,
)

LPM_QUEUE_PREFIX = 128  # SGLang computes prefix matches for a bounded head of the queue


class SGLangPolicy:
    """The batch-forming rules of one SGLang replica, with their one piece of state: the
    decode reservation's ``new_token_ratio``."""

    # a step is a prefill batch or a decode step, never both (no mixed batches)
    mixes_decodes = False
    # the overlap scheduler (on unless --disable-overlap-schedule; scheduler.py's
    # event_loop_overlap) forms batch N+1 right after launching batch N, so a request that
    # arrives while batch N runs first runs in batch N+2
    async_scheduling = True

    def __init__(self, cfg: SchedulerConfig, prefill_only: bool = False):
        self.cfg = cfg
        self.prefill_only = prefill_only  # a PD prefill replica reserves nothing for decode
        self.new_token_ratio = cfg.new_token_ratio

    @staticmethod
    def cuda_graph_sizes(max_bs: int) -> list[int]:
        return cuda_graph_sizes(max_bs)

    # ------------------------------------------------------------------------------------
    # the decode reservation

    def reserve_tokens(self, clipped_output_tokens: float) -> float:
        """KV tokens reserved for this much remaining (clipped) output."""
        return clipped_output_tokens * self.new_token_ratio

    def after_decode(self, steps: int) -> None:
        self.new_token_ratio = max(
            self.cfg.min_new_token_ratio,
            self.new_token_ratio - steps * self.cfg.new_token_ratio_decay,
        )

    # ------------------------------------------------------------------------------------
    # retraction (scheduler.py's retract_decode)

    @staticmethod
    def retract_order(running: list[ReqState]) -> list[ReqState]:
        """Victims first: fewest output tokens, then longest input."""
        return sorted(running, key=lambda s: (s.generated, -s.req.input_len, s.join_seq))

    def after_retract(self, running: list[ReqState]) -> None:
        """Admit more conservatively from now on, as SGLang does after a retraction."""
        if running:
            decoded = sum(s.generated for s in running)
            wanted = sum(s.req.output_len for s in running)
            self.new_token_ratio = min(
                1.0, (decoded + RETRACT_DECODE_STEPS * len(running)) / wanted
            )
        else:
            self.new_token_ratio = 1.0

    # ------------------------------------------------------------------------------------
    # the prefill batch (PrefillAdder)

    def _candidates(self, eng: EngineView) -> list[ReqState]:
        """The head of the waiting queue in admission order: no more than can still run, so an
        overloaded replica does not copy its whole queue every step."""
        room = self.cfg.max_running_requests - len(eng.running)
        head = list(itertools.islice(eng.waiting, 0, max(0, room)))
        if self.cfg.schedule_policy == "fcfs" or len(head) <= 1:
            return head
        lpm = sorted(head[:LPM_QUEUE_PREFIX], key=lambda s: -eng.cached_prefix_tokens(s))
        return lpm + head[LPM_QUEUE_PREFIX:]

    def _admit(self, eng: EngineView, st: ReqState, now: float, budget_tokens: float,
               chunk_budget: int) -> int:  # fmt: skip
        """Try to start a waiting request: its new tokens, the cached pages it will load or
        pin and its decode reservation must fit the budget. Returns its first chunk's tokens,
        0 if it cannot start now."""
        hit, prompt = eng.match_prefix(st, now)
        new = prompt - hit.total_tokens
        chunk = min(new, self.cfg.chunked_prefill_size, chunk_budget)
        decode_reserve = 0 if self.prefill_only else self.reserve_tokens(eng.clipped_left(st))
        # cached L1 pages nobody pins count as evictable in the budget; admitting pins them
        locked = hit.unpinned_l1_pages
        if eng.pages(new) + hit.lower_pages + locked + decode_reserve > budget_tokens:
            return 0
        return chunk if eng.start_prefill(st, hit, prompt, chunk, now) else 0

    def prefill_batch(self, eng: EngineView, now: float) -> list[tuple[ReqState, int]]:
        """(request, chunk tokens) of the next prefill batch; empty: run a decode step."""
        if not (eng.waiting or eng.chunked or eng.swapped):
            return []
        batch = []
        budget = self.cfg.max_prefill_tokens
        if eng.chunked is not None:
            st = eng.chunked
            chunk = min(st.prompt_left, self.cfg.chunked_prefill_size, budget)
            if not eng.continue_prefill(st, chunk, now):
                return []  # cannot continue the chunked prompt: let decodes free memory
            batch.append((st, chunk))
            budget -= chunk
        if eng.swapped:
            eng.swap_in(now)
        available = eng.l1_available() - eng.reserved_decode()
        for st in self._candidates(eng):
            if budget <= 0 or eng.chunked is not None:
                break  # the budget is spent, or a chunked prompt takes the rest of it
            if len(eng.running) + len(batch) >= self.cfg.max_running_requests:
                break
            chunk = self._admit(eng, st, now, available, budget)
            if not chunk:
                break  # FCFS: a request that does not fit blocks the ones behind it
            eng.waiting.remove(st)
            available -= eng.pages(st.prompt_left)
            if not self.prefill_only:
                available -= self.reserve_tokens(min(st.req.output_len, CLIP_MAX_NEW_TOKENS))
            batch.append((st, chunk))
            budget -= chunk
            if chunk < st.prompt_left:
                eng.chunked = st  # continued first in the next prefill batch
        return batch
