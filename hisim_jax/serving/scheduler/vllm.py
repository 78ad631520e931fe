"""vLLM V1's scheduling rules (vllm/v1/core/sched/scheduler.py, ``Scheduler.schedule``,
v0.15): every step spends one token budget, ``max_num_batched_tokens``, running requests
first — each decode one token, then the prompt being chunked its next chunk — and the rest on
waiting requests' prompts in FCFS order, chunked to what is left, in the same step (a *mixed*
batch). At most ``max_num_seqs`` requests run at once.

KV is allocated step by step for the tokens being computed, with no reservation for future
output (SGLang reserves ``new_token_ratio`` of it) and no watermark: when a running request
cannot get the KV for its next token, the most recently admitted request is preempted, to the
front of the waiting queue, and recomputed later (``self.running.pop()``; V1 has no swap); no
waiting request is admitted in a step with a preemption. A waiting request that does not fit
stops admission for the step (strict FCFS).

In ``SchedulerConfig`` terms: ``max_prefill_tokens`` is the step's token budget (decodes
included) and ``chunked_prefill_size`` vLLM's ``long_prefill_token_threshold`` (the budget
itself by default); ``max_running_requests`` is ``max_num_seqs``; ``cuda_graph_max_bs``
is ``max_cudagraph_capture_size``.
"""

from __future__ import annotations

from hisim_jax.serving.scheduler.base import EngineView, ReqState, SchedulerConfig

VLLM_BLOCK_SIZE = 16  # KV block (page) on CUDA (vllm/platforms/cuda.py)
# max_num_batched_tokens, max_num_seqs of the OpenAI API server (vllm/engine/arg_utils.py,
# _set_default_args, v0.15.1): on a GPU with >= 70 GiB that is not an A100, and otherwise
_DEFAULTS_LARGE = (8192, 1024)
_DEFAULTS_SMALL = (2048, 256)
_LARGE_GPU_BYTES = 70 * 2**30
MAX_CAPTURE_SIZE = 512


def vllm_defaults(hbm_bytes: float, gpu_name: str = "") -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM's API server picks for this GPU."""
    large = hbm_bytes >= _LARGE_GPU_BYTES and "a100" not in gpu_name.lower()
    return _DEFAULTS_LARGE if large else _DEFAULTS_SMALL


def vllm_max_capture_size(max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """``max_cudagraph_capture_size``'s default (vllm/config/vllm.py): twice max_num_seqs,
    at most 512 and at most the token budget."""
    return min(2 * max_num_seqs, MAX_CAPTURE_SIZE, max_num_batched_tokens)


def vllm_cuda_graph_sizes(max_size: int) -> list[int]:
    """vLLM's default captured sizes (vllm/config/vllm.py): 1, 2, 4, every 8 up to 248, then
    every 16 from 256, up to ``max_cudagraph_capture_size``. Decode-only batches replay a full
    graph padded to the next size; mixed batches run piecewise graphs around eager attention,
    which this model costs as unpadded."""
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max_size + 1, 16))
    return sorted({s for s in sizes if s <= max_size} | {max_size})


class VLLMPolicy:
    """The batch-forming rules of one vLLM V1 replica. It keeps no state of its own."""

    # every step carries the running requests' decodes beside any prefill chunks
    mixes_decodes = True
    # async scheduling (on by default, vllm/config/vllm.py): step N+1 is scheduled while step
    # N runs, so a request arriving during step N first runs in step N+2
    async_scheduling = True

    def __init__(self, cfg: SchedulerConfig, prefill_only: bool = False):
        if cfg.preemption != "recompute":
            raise ValueError(f"preemption {cfg.preemption!r}: vLLM V1 preempts by recompute only")
        self.cfg = cfg
        self.prefill_only = prefill_only

    @staticmethod
    def cuda_graph_sizes(max_size: int) -> list[int]:
        return vllm_cuda_graph_sizes(max_size)

    # ------------------------------------------------------------------------------------
    # no decode reservation: KV is taken step by step, preempting when it runs out

    def reserve_tokens(self, clipped_output_tokens: float) -> float:
        return 0.0

    def after_decode(self, steps: int) -> None:
        return None

    @staticmethod
    def retract_order(running: list[ReqState]) -> list[ReqState]:
        """Victims first: the most recently admitted (the tail of vLLM's running list)."""
        return sorted(running, key=lambda s: -s.join_seq)

    def after_retract(self, running: list[ReqState]) -> None:
        return None

    # ------------------------------------------------------------------------------------
    # the step's prefill part

    def prefill_batch(self, eng: EngineView, now: float) -> list[tuple[ReqState, int]]:
        """(request, chunk tokens) of the prefill chunks that join this step's decodes; empty:
        a decode-only step (the engine then runs decode steps until the next event)."""
        if not (eng.waiting or eng.chunked):
            return []
        # a decode's tokens: its newest, plus its drafts under speculative decoding
        decodes = len(eng.running) * eng.decode_slots
        # the decodes' next tokens are allocated first; if even they do not fit, the decode
        # step preempts and nothing new is admitted (vLLM: no admission after a preemption)
        room = eng.l1_available() - decodes
        if room < 0:
            return []
        budget = self.cfg.max_prefill_tokens - decodes
        if budget <= 0:
            return []
        batch = []
        if eng.chunked is not None:
            st = eng.chunked
            chunk = min(st.prompt_left, self.cfg.chunked_prefill_size, budget)
            if not eng.continue_prefill(st, chunk, now):
                return []
            batch.append((st, chunk))
            budget -= chunk
            room = eng.l1_available() - decodes
            if chunk == st.prompt_left:
                eng.chunked = None  # its last chunk: the rest of the budget goes to new prompts
        while eng.waiting and budget > 0 and eng.chunked is None:
            if len(eng.running) + len(batch) >= self.cfg.max_running_requests:
                break
            st = eng.waiting[0]
            hit, prompt = eng.match_prefix(st, now)
            new = prompt - hit.total_tokens
            chunk = min(new, self.cfg.chunked_prefill_size, budget)
            # its chunk's blocks plus cached blocks it takes out of the free queue
            if eng.pages(chunk) + hit.lower_pages + hit.unpinned_l1_pages > room:
                break  # FCFS: the head blocks the queue until memory frees up
            if not eng.start_prefill(st, hit, prompt, chunk, now):
                break
            eng.waiting.popleft()
            batch.append((st, chunk))
            budget -= chunk
            room = eng.l1_available() - decodes
            if chunk < st.prompt_left:
                eng.chunked = st  # continued first in the next step
        return batch
