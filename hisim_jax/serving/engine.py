"""One serving replica on a virtual clock: scheduler policy + KV cache + step-latency estimator.

Every iteration the engine asks its scheduler policy (scheduler/sglang.py) for a prefill batch
and runs it, or else one decode step over all running requests; the policy decides through
the engine's queues and KV admission (``scheduler.base.EngineView``). Step time comes from the
estimator (anything with its ``step_latency_s`` and ``decode_steps_s``, so tests can hand in a
fake), plus a per-step CPU overhead; decode batches are padded to the captured CUDA-graph
sizes.

Decode-only stretches are predictable — each running request's context grows by one token per
step — so the engine costs up to ``FAST_FORWARD_STEPS`` future steps in one vectorized estimator
call and jumps the clock to the next event (an arrival, a request finishing, a prefetch landing,
or the KV cache running out), never one JAX call per step.

With speculative decoding (``EngineConfig.speculative``, speculative.py) a decode step is a
draft pass and a verify step over k + 1 tokens per request, costed by the target's and the
draft model's estimators; every running request advances by the same accepted tokens, so the
stretches stay vectorized the same way.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hisim_jax.serving.frontend import Frontend
from hisim_jax.serving.kvcache import L1, L2, L3, KVCache, KVCacheConfig
from hisim_jax.serving.kvstore import KVStore
from hisim_jax.serving.scheduler import POLICIES
from hisim_jax.serving.scheduler.base import (
    CLIP_MAX_NEW_TOKENS,
    ReqState,
    SchedulerConfig,
    graph_padded_size,
)
from hisim_jax.serving.speculative import (
    SpeculativeConfig,
    prefill_draft_seconds,
    stretch_seconds,
)

FAST_FORWARD_STEPS = 256
MAX_PREEMPTIONS = 50  # a request retracted more often than this is rejected


@contextlib.contextmanager
def no_cyclic_gc():
    """Pause Python's cycle collector for a simulation loop. The loop allocates a prefix-cache
    node per new KV block, and every few hundred allocations the collector walks the young
    objects, and now and then the whole trie: ~10% of a run's wall time. Reference counting
    still frees nearly everything; the few cycles left wait until the collector resumes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Columns:
    """Rows of numbers with one column per element of a list kept beside them: inserts and
    deletes shift a slice in place (np.insert would allocate a new array each time)."""

    def __init__(self, rows: int, dtype):
        self._buf = np.zeros((rows, 64), dtype)
        self.n = 0

    @property
    def view(self) -> np.ndarray:
        return self._buf[:, : self.n]

    def insert(self, i: int, values) -> None:
        n, buf = self.n, self._buf
        if n == buf.shape[1]:
            self._buf = buf = np.concatenate([buf, np.zeros_like(buf)], axis=1)
        buf[:, i + 1 : n + 1] = buf[:, i:n]
        buf[:, i] = values
        self.n = n + 1

    def delete(self, i: int) -> None:
        n, buf = self.n, self._buf
        buf[:, i : n - 1] = buf[:, i + 1 : n]
        self.n = n - 1


class StepCost(Protocol):
    """What the engine needs from a step-latency model (the Estimator, or a fake in tests)."""

    def step_latency_s(self, batches: Sequence[Sequence[tuple[int, int]]]) -> np.ndarray: ...

    def decode_steps_s(
        self, context: np.ndarray, steps: int, padded=0, active=None
    ) -> np.ndarray: ...


ROLES = ("unified", "prefill", "decode")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    scheduler: SchedulerConfig
    cache: KVCacheConfig
    num_layers: int = 32  # L2→L1 loads overlap with the forward pass layer by layer
    max_context: int = 0  # model's context window (0: unlimited)
    # prefill/decode disaggregation: a "prefill" replica hands each request off after its
    # prompt (see ``handoffs``); a "decode" replica takes them in with their KV (``receive``)
    role: str = "unified"
    policy: str = "sglang"  # the scheduler's rules (scheduler.POLICIES)
    frontend: Frontend = Frontend()  # what requests pass through before the engine sees them
    # speculative decoding (speculative.py): each decode step a draft pass and a verify step
    speculative: SpeculativeConfig | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"engine role {self.role!r} unknown (choose from {', '.join(ROLES)})")
        if self.policy not in POLICIES:
            raise ValueError(
                f"scheduler policy {self.policy!r} unknown (choose from {', '.join(POLICIES)})"
            )


class StepLog:
    """Per-step records, appended a step or a whole decode stretch at a time."""

    COLUMNS = ("start_s", "duration_s", "kind", "n_requests", "new_tokens", "kv_tokens",
               "waiting", "running", "request_ids")  # fmt: skip

    def __init__(self):
        self._rows: list[tuple] = []  # one tuple per step or stretch, split into columns at the end
        self.count = 0

    def add(self, start, dur, kind, n, new, kv, waiting, running, ids=""):
        self.add_many(np.atleast_1d(start), np.atleast_1d(dur), kind, n, new,
                      np.atleast_1d(kv), waiting, running, ids)  # fmt: skip

    def add_many(self, start, dur, kind, n, new, kv, waiting, running, ids=""):
        """Columns are arrays of the stretch's length or one value for all its steps."""
        self._rows.append((start, dur, kind, n, new, kv, waiting, running, ids))
        self.count += len(start)

    def column(self, name: str) -> np.ndarray:
        c = self.COLUMNS.index(name)
        parts = []
        for row in self._rows:
            v, k = row[c], len(row[0])
            parts.append(
                v
                if isinstance(v, np.ndarray)
                else np.full(k, v, dtype=object if isinstance(v, str) else None)
            )
        return np.concatenate(parts) if parts else np.zeros(0)

    def __len__(self) -> int:
        return self.count


@dataclass(slots=True)
class EngineResult:
    states: list  # ReqState per request, in workload order
    steps: StepLog
    itl_s: np.ndarray  # every inter-token latency sample
    cache: KVCache
    preemptions: int
    simulated_s: float
    # speculative decoding: request-steps of verify, and the tokens they emitted
    spec_verify_steps: int = 0
    spec_tokens: int = 0


class Engine:
    """A single replica. ``run(requests)`` simulates a whole workload; a cluster instead
    ``submit``s requests as they are routed and ``advance``s every replica on one clock."""

    def __init__(
        self,
        cfg: EngineConfig,
        step_cost: StepCost,
        shared_l3: KVStore | None = None,
        draft_cost: StepCost | None = None,
    ):
        self.cfg = cfg
        self.sched = cfg.scheduler
        self.step_cost = step_cost
        # speculative decoding: the draft model's step cost, and counters of the verify steps
        self.spec = cfg.speculative
        if self.spec is not None and draft_cost is None:
            raise ValueError("speculative decoding needs the draft model's step cost")
        self.draft_cost = draft_cost
        self.decode_slots = 1 if self.spec is None else self.spec.slots  # KV per decode
        self._spec_step = 0  # verify steps run: the phase of the acceptance pattern
        self._spec_verify_steps = 0  # request-steps of verify
        self._spec_tokens = 0  # tokens they emitted
        self.cache = KVCache(cfg.cache, shared_l3)
        self.policy = POLICIES[cfg.policy](cfg.scheduler, prefill_only=cfg.role == "prefill")
        self.graph_sizes = np.array(self.policy.cuda_graph_sizes(self.sched.cuda_graph_max_bs))
        # the padded size of every batch size up to the largest captured graph: one lookup
        self._graph_pad = graph_padded_size(np.arange(self.graph_sizes[-1] + 1), self.graph_sizes)
        self.waiting: deque[ReqState] = deque()
        self.prefetching: list[ReqState] = []  # waiting on an L3 prefetch (policy permitting)
        self.running: list[ReqState] = []  # decoding
        self.swapped: deque[ReqState] = deque()
        self.swapping_in: list[ReqState] = []  # KV on its way back to L1, then they decode
        self.chunked: ReqState | None = None  # a prompt being prefilled chunk by chunk
        self.preemptions = 0
        self.steps = StepLog()
        self.finished = 0  # completed or rejected
        self._last_decode_s = 0.0  # duration of the latest decode step
        self._remaining_clipped = 0  # sum over running of min(remaining output, clip)
        self._joins = 0
        # The running batch's per-request counters live in arrays parallel to ``running``
        # while it runs, offset by ``_tick`` (tokens every request that stayed in the batch
        # has decoded: one per decode step, or a speculative step's accepted tokens, the same
        # for all): a decode stretch then bumps one integer instead of updating each request.
        # ``_materialize`` writes them back to the ReqState when it leaves.
        self._tick = 0
        # rows: generated - output_len - tick (ascending: the sort key), input_len +
        # generated - 1 - tick (the context), private - tick
        self._r_int = _Columns(3, np.int64)
        self._r_last = _Columns(1, np.float64)  # last_token_s
        self._itl: list[np.ndarray] = []
        self.now = 0.0  # this replica's clock: when its next iteration starts
        self._pending: list = []  # heap of (arrival_s, seq, ReqState) submitted, not yet arrived
        self._seq = 0
        self.ended: list[ReqState] = []  # finished, rejected or handed off; a cluster drains it
        self.handoffs: list[ReqState] = []  # prefill role: prompts done, KV to send on
        self.received: deque[ReqState] = deque()  # decode role: KV arrived, not yet admitted
        self._prefill_only = cfg.role == "prefill"
        self._async = self.policy.async_scheduling
        # decode steps costed but not yet run, keyed by (batch version, tick) (_decode_stretch)
        self._spare: tuple | None = None
        self._batch_version = 0  # bumped whenever a request joins or leaves the running batch
        self._formed_s: float | None = None  # async: when the next step's batch is formed
        # Closed-loop clients (serving/cluster.py): a request whose end releases the client's
        # next request, by request id, with the seconds the client waits after that end (a
        # think or tool time); ``stop_on_any_end``: every end releases one (a concurrency-
        # limited client with requests queued). The engine stops at the earliest release
        # (``release_s``) so that the cluster sends the next request when the client would,
        # and cuts a decode stretch there.
        self.followup_think: dict[int, float] = {}
        self.stop_on_any_end = False
        self.release_s = math.inf
        self._last_busy_s = 0.0  # when its last step ended
        self._min_decode_s = math.inf  # the fastest decode step so far (release_horizon)

    # ------------------------------------------------------------------------------------
    # arrivals and admission

    def _reject(self, st: ReqState) -> str:
        r = st.req
        if self.cfg.max_context and r.input_len + r.output_len > self.cfg.max_context:
            return f"longer than the context window ({r.input_len + r.output_len} > {self.cfg.max_context})"
        # at its last decode step it holds all but its last token, and a verify writes k + 1
        need = self.cache.pages(r.input_len + r.output_len + self.decode_slots - 1)
        if need > self.cache.capacity[L1]:
            page = self.cache.cfg.page_size
            held = f"{need} in pages of {page}" if page > 1 else str(need)
            return f"longer than L1 can ever hold ({held} > {self.cache.capacity[L1]} tokens)"
        return ""

    def _give_up(self, st: ReqState, reason: str, now: float) -> None:
        """Report a request as rejected: it ends here, counted once, with its reason."""
        st.rejected = reason
        st.finish_s = now
        self.finished += 1
        self.ended.append(st)
        self._released_by(st, now)

    def _released_by(self, st: ReqState, now: float) -> None:
        """A closed-loop client's next request is due ``now`` + its wait (see __init__)."""
        if self.stop_on_any_end:  # the slot it frees goes to a queued request now
            self.release_s = min(self.release_s, now)
            return
        think = self.followup_think.get(st.req.request_id)
        if think is not None:
            self.release_s = min(self.release_s, now + think)

    def _release_in_stretch(self, ends: np.ndarray, remaining: np.ndarray, k: int) -> float:
        """The earliest release by a request finishing within the ``k`` decode steps ending
        at ``ends`` (``remaining``: output left per running request, descending)."""
        n_done = int(np.count_nonzero(remaining <= k))
        if not n_done:
            return math.inf
        run = self.running
        think = self.followup_think
        out = math.inf
        for st, left in zip(
            run[len(run) - n_done :], remaining[len(run) - n_done :].tolist(), strict=True
        ):
            wait = 0.0 if self.stop_on_any_end else think.get(st.req.request_id)
            if wait is not None:
                out = min(out, float(ends[left - 1]) + wait)
        return out

    def _arrive(self, st: ReqState, now: float) -> None:
        reason = self._reject(st)
        if reason:
            self._give_up(st, reason, now)
            return
        st.ready_s = now
        if not (self.cache.has_l3 and self.cache.capacity[L2]):
            self.waiting.append(st)  # no L3 tier: nothing to prefetch while it waits
            return
        hit = self.cache.lookup(st.req.block_ids, st.req.input_len)
        if hit.tokens[L3] > 0:
            done = self.cache.prefetch_to_l2(hit.nodes, now)
            if done is not None and done > now:
                pol = self.sched.prefetch_policy
                if pol == "wait_complete":
                    st.ready_s = done
                elif pol == "timeout":
                    st.ready_s = min(done, now + self.sched.prefetch_timeout_s(hit.tokens[L3]))
                if st.ready_s > now:
                    self.prefetching.append(st)
                    return
        self.waiting.append(st)

    def _release_prefetched(self, now: float) -> None:
        if not self.prefetching:
            return
        still = []
        for st in self.prefetching:
            (self.waiting.append if st.ready_s <= now else still.append)(st)
        self.prefetching = still

    # ------------------------------------------------------------------------------------
    # what the scheduler policy sees (scheduler.base.EngineView)

    def pages(self, tokens: int) -> int:
        return self.cache.pages(tokens)

    def l1_available(self) -> int:
        return self.cache.l1_available()

    def reserved_decode(self) -> float:
        """KV tokens the running requests are expected to still need: the policy's share of
        their remaining output, each clipped, summed as it changes."""
        return self.policy.reserve_tokens(self._remaining_clipped)

    @staticmethod
    def clipped_left(st: ReqState) -> int:
        return min(st.req.output_len - st.generated, CLIP_MAX_NEW_TOKENS)

    def cached_prefix_tokens(self, st: ReqState) -> int:
        return self.cache.lookup(st.req.block_ids, st.req.input_len).total_tokens

    def match_prefix(self, st: ReqState, now: float):
        """Its prefix hit now, and the prompt to have in KV: after a recompute preemption the
        tokens generated so far are prefilled again."""
        r = st.req
        prompt = r.input_len + (st.generated if st.preemptions else 0)
        return self.cache.lookup(r.block_ids, r.input_len, now), prompt

    def start_prefill(self, st: ReqState, hit, prompt: int, chunk: int, now: float) -> bool:
        """Pin and load the matched prefix and allocate the KV of the first chunk."""
        r = st.req
        done = self.cache.acquire(hit, now)
        if done is None:
            return False
        need = self.cache.pages(chunk)  # a chunk's pages: later chunks fill the last one first
        if not self.cache.make_room(L1, need, now):
            self.cache.release(hit.nodes, now)
            return False
        # allocated now, not when the step runs: the next admission's make_room must see it
        self.cache.alloc_private(need)
        st.private += need
        if st.counted:
            # a re-prefill after a recompute: its hits are mostly its own earlier prompt, not
            # reuse across requests, so they stay out of the hit rate and are counted apart
            st.rehit += hit.total_tokens
        else:
            self.cache.record_lookup(hit.tokens, r.input_len)
            st.hit_tokens = list(hit.tokens)
            st.counted = True
        st.hit_nodes = hit.nodes
        st.target = prompt
        st.cached = hit.total_tokens
        st.computed = hit.total_tokens
        st.ready_s = max(st.ready_s, done)
        if st.scheduled_s < 0:
            st.scheduled_s = now
        return True

    def continue_prefill(self, st: ReqState, chunk: int, now: float) -> bool:
        # the prompt's private KV is paged as one allocation, not chunk by chunk
        done = st.computed - st.cached
        pages = self.cache.pages(done + chunk) - self.cache.pages(done)
        if not self.cache.make_room(L1, pages, now):
            return False
        self.cache.alloc_private(pages)
        st.private += pages
        return True

    def _join(self, st: ReqState) -> None:
        # ``running`` stays sorted by remaining output, longest first: every running request
        # decodes one token per step, so joins are the only thing that can break the order
        self._joins += 1
        st.join_seq = self._joins
        tick = self._tick
        key = st.generated - st.req.output_len - tick
        i = int(np.searchsorted(self._r_int.view[0], key, side="right"))  # after equal keys
        self.running.insert(i, st)
        self._batch_version += 1
        self._r_int.insert(i, (key, st.req.input_len + st.generated - 1 - tick, st.private - tick))
        self._r_last.insert(i, st.last_token_s)
        self._remaining_clipped += self.clipped_left(st)

    def _materialize(self, i: int) -> ReqState:
        """Write the counters of the running request at position ``i`` back to its state."""
        st = self.running[i]
        key, _, priv = self._r_int.view[:, i].tolist()
        st.generated = key + st.req.output_len + self._tick
        st.private = priv + self._tick
        st.last_token_s = float(self._r_last.view[0, i])
        return st

    def _sync_running(self) -> None:
        for i in range(len(self.running)):
            self._materialize(i)

    def _leave(self, st: ReqState) -> None:
        i = self.running.index(st)
        self._materialize(i)
        del self.running[i]
        self._batch_version += 1
        self._r_int.delete(i)
        self._r_last.delete(i)
        self._remaining_clipped -= self.clipped_left(st)

    # ------------------------------------------------------------------------------------
    # steps

    def _run_prefill(self, batch, now: float) -> float:
        """One step of prefill chunks; with a policy that mixes batches (vLLM) the running
        requests decode a token each in the same step."""
        pairs = [(st.computed, c) for st, c in batch]
        decodes = []
        # the policy admitted the chunks leaving L1 room for the decodes' tokens; should it
        # not be there, the decodes sit this step out and the next decode step preempts
        slots = self.decode_slots
        if self.policy.mixes_decodes and 0 < len(self.running) * slots <= self.cache.l1_available():
            # each decode reads the KV of its prompt and every token but the newest
            ctx = self._r_int.view[1] + self._tick
            decodes = [(c, slots) for c in ctx.tolist()]
        compute_s = float(self.step_cost.step_latency_s([decodes + pairs])[0])
        if self.spec is not None:  # the draft model runs over the prompts and drafts
            compute_s += prefill_draft_seconds(
                self.draft_cost, self.spec, pairs, [c for c, _ in decodes]
            )
        compute_s += self.sched.step_overhead_s
        # KV arriving from L2/L3 is consumed layer by layer as the forward pass reaches it
        ready = max(st.ready_s for st, _ in batch)
        end = max(now + compute_s, ready + compute_s / self.cfg.num_layers)
        n_dec = len(decodes)
        self.steps.add(
            now,
            end - now,
            "mixed" if n_dec else "prefill",
            n_dec + len(batch),
            n_dec * slots + sum(c for _, c in batch),
            sum(a + b for a, b in decodes) + sum(a + b for a, b in pairs),
            len(self.waiting),
            len(self.running),
            " ".join(str(st.req.request_id) for st, _ in batch),
        )
        if n_dec:
            # before the prompts that finish here join: they get their first token, not two
            step = np.array([end - now])
            if self.spec is None:
                fits = self._decode_tokens(now, step, step + now, np.array([n_dec]), log=False)
            else:
                fits = self._spec_tokens_of(now, step, step + now, 1, log=False)
            if not fits:
                raise RuntimeError("internal: L1 room for the decodes vanished within a step")
        for st, c in batch:
            st.computed += c
            # every prefill token a step computes belongs to one request's row
            if st.preemptions:
                st.recomputed += c
            else:
                st.computed_prompt += c
            if st.prompt_left > 0:
                continue
            if self.chunked is st:
                self.chunked = None
            path, new_pages = self.cache.insert(
                st.req.block_ids, st.req.input_len, end, prefix=st.hit_nodes
            )
            # the matched prefix is pinned since admission; pin the blocks computed here
            self.cache.pin(path[len(st.hit_nodes) :])
            st.hit_nodes = []
            st.path = path
            moved = min(new_pages, st.private)
            self.cache.free_private(moved)
            st.private -= moved
            if self._prefill_only:
                self._hand_off(st, end)
                continue
            if st.first_token_s < 0:
                st.first_token_s = end
                st.last_token_s = end
                st.generated = 1
            self._join(st)
            if st.generated >= st.req.output_len:
                self._finish(st, end)
        return end

    def _decode_stretch(self, now: float, next_event: float) -> float:
        """Run decode steps until the next event; returns the new clock.

        With nobody waiting, requests that finish mid-stretch leave without ending it (their
        batch simply shrinks); with requests waiting, the first finish ends it, since the freed
        KV may admit one of them."""
        if self.spec is not None:
            return self._spec_stretch(now, next_event)
        tick = self._tick  # running: longest remaining output first
        key, ctx0, _ = self._r_int.view
        remaining = -(key + tick)
        through = not (self.waiting or self.swapped or self.chunked)
        k = int(min(remaining[0] if through else remaining[-1], FAST_FORWARD_STEPS))
        if math.isfinite(next_event) and self._last_decode_s > 0:
            # cost only about as many steps as fit before the next event (+ slack): costing
            # steps an arrival would cut off wastes estimator work
            k = max(1, min(k, int((next_event - now) / self._last_decode_s * 1.25) + 2))
        # decoding per step: requests with more than j tokens left (remaining is descending)
        active = np.searchsorted(-remaining, -np.arange(k), side="left")
        # KV for one more token per decoding request per step; evictable pages count as free
        need = np.cumsum(active)
        k = min(k, int(np.searchsorted(need, self.cache.l1_available(), side="right")))
        if k < 1:
            self._preempt(now)
            return now
        active = active[:k]
        spare = self._spare
        if spare is not None and spare[0] == (self._batch_version, tick) and len(spare[1]) >= k:
            # the same batch at the same step: the previous call costed these steps already
            dur = spare[1][:k]
        else:
            # decode batches replay the smallest captured CUDA graph that fits them
            pad_of = self._graph_pad
            padded = (
                pad_of[active]
                if active[0] < len(pad_of)
                else graph_padded_size(active, self.graph_sizes)
            )
            ctx = ctx0 + tick
            # graph replay computes the padded slots too (as one-token dummies)
            dur = np.asarray(self.step_cost.decode_steps_s(ctx, k, padded, active), dtype=float)
            dur = dur + self.sched.step_overhead_s
        ends = now + np.cumsum(dur)
        if self.followup_think or self.stop_on_any_end:
            # a closed-loop client sends its next request a wait after a reply ends: an event
            next_event = min(next_event, self._release_in_stretch(ends, remaining, k))
        # stop at the first step that ends after the next event (the scheduler looks then)
        over = int(np.searchsorted(ends, next_event))  # ends ascend
        costed = dur
        k = over + 1 if over < k else k
        dur, ends, active = dur[:k], ends[:k], active[:k]
        self._last_decode_s = float(dur[-1])
        self._min_decode_s = min(self._min_decode_s, float(dur.min()))
        if not self._decode_tokens(now, dur, ends, active, log=True):
            self._preempt(now)
            return now
        # steps costed past the cut: the next stretch of this same batch starts with them
        self._spare = ((self._batch_version, self._tick), costed[k:]) if k < len(costed) else None
        if self._async:
            self._formed_s = float(ends[-1] - dur[-1])  # the stretch's last step started then
        return float(ends[-1])

    def _graph_padded(self, active: np.ndarray) -> np.ndarray:
        pad_of = self._graph_pad
        if active[0] < len(pad_of):
            return pad_of[active]
        return graph_padded_size(active, self.graph_sizes)

    # ------------------------------------------------------------------------------------
    # speculative decoding (speculative.py): every request of the running batch advances by
    # the same tokens per verify step, so ``_tick`` counts tokens and a stretch stays a few
    # array operations, as without it

    def _spec_plan(self, steps: int):
        """The next ``steps`` verify steps of the running batch: tokens per request of each
        (``adv``), tokens before it (``before``) and after it (``incl``), requests still
        decoding at it (``active``, the head of the batch) and the L1 tokens the stretch holds
        at its verify (``peak``: what earlier steps kept, plus k + 1 slots per request)."""
        remaining = -(self._r_int.view[0] + self._tick)  # descending
        adv = self.spec.advance(self._spec_step, steps)
        incl = np.cumsum(adv)
        before = incl - adv
        active = np.searchsorted(-remaining, -before, side="left")  # remaining > before
        left = np.zeros(len(remaining) + 1, np.int64)  # left[i]: the output of requests i..
        left[:-1] = np.cumsum(remaining[::-1])[::-1]
        peak = active * before + left[active] + self.decode_slots * active
        return adv, before, incl, active, peak

    def _spec_stretch(self, now: float, next_event: float) -> float:
        """``_decode_stretch`` with speculative steps: each a draft pass and a verify step."""
        tick = self._tick
        key, ctx0, _ = self._r_int.view
        remaining = -(key + tick)
        through = not (self.waiting or self.swapped or self.chunked)
        _, before, incl, active, peak = self._spec_plan(FAST_FORWARD_STEPS)
        goal = remaining[0] if through else remaining[-1]
        k = min(int(np.searchsorted(incl, goal, side="left")) + 1, FAST_FORWARD_STEPS)
        if math.isfinite(next_event) and self._last_decode_s > 0:
            k = max(1, min(k, int((next_event - now) / self._last_decode_s * 1.25) + 2))
        # stop before the first verify whose KV slots L1 cannot hold (evictable pages count)
        over = np.flatnonzero(peak[:k] > self.cache.l1_available())
        if len(over):
            k = int(over[0])
        if k < 1:
            self._preempt(now)
            return now
        active = active[:k]
        spare = self._spare
        if spare is not None and spare[0] == (self._batch_version, tick) and len(spare[1]) >= k:
            dur = spare[1][:k]
        else:
            dur = stretch_seconds(
                self.step_cost, self.draft_cost, self.spec, ctx0 + tick, before[:k], active,
                self._graph_padded(active),
            )  # fmt: skip
            dur = dur + self.sched.step_overhead_s
        ends = now + np.cumsum(dur)
        over = int(np.searchsorted(ends, next_event))
        costed = dur
        k = over + 1 if over < k else k
        dur, ends = dur[:k], ends[:k]
        self._last_decode_s = float(dur[-1])
        if not self._spec_tokens_of(now, dur, ends, k, log=True):
            self._preempt(now)
            return now
        self._spare = ((self._batch_version, self._tick), costed[k:]) if k < len(costed) else None
        if self._async:
            self._formed_s = float(ends[-1] - dur[-1])
        return float(ends[-1])

    def _spec_tokens_of(self, now: float, dur, ends, steps: int, log: bool) -> bool:
        """``_decode_tokens`` for ``steps`` speculative steps: every request still decoding
        takes the step's accepted tokens + 1 (clipped to its output); the KV of rejected
        drafts is freed at the step's end, so each request keeps what it accepted. False:
        L1 cannot hold a verify's slots (nothing changed)."""
        run = self.running
        tick = self._tick
        key, ctx0, priv0 = self._r_int.view
        last = self._r_last.view[0]
        remaining = -(key + tick)
        adv, before, incl, active, peak = self._spec_plan(steps)
        if not self.cache.make_room(L1, int(peak.max()), now):
            return False
        total = int(incl[-1])
        got = np.minimum(remaining, total)  # tokens each request takes in these steps
        tokens = int(got.sum())
        self.cache.alloc_private(tokens)
        # ITL: a step's tokens arrive at once, its gap shared among them as SGLang's
        # bench_serving does (chunk gap / new tokens, once per token); a request's first gap
        # also spans any prefill steps since its last token
        pairs = int(active.sum())
        step = np.repeat(np.arange(steps), active)
        slot = np.arange(pairs) - np.repeat(np.cumsum(active) - active, active)
        tok = np.minimum(adv[step], remaining[slot] - before[step])
        gap = np.where(step == 0, ends[0] - last[slot], dur[step])
        self._itl.append(np.repeat(gap / tok, tok))
        self._spec_verify_steps += pairs
        self._spec_tokens += tokens
        self._remaining_clipped -= int(
            np.minimum(remaining, CLIP_MAX_NEW_TOKENS).sum()
            - np.minimum(remaining - got, CLIP_MAX_NEW_TOKENS).sum()
        )
        n_done = int(np.count_nonzero(remaining <= total))  # the tail of the sorted batch
        keep = len(run) - n_done
        if n_done:
            done = np.searchsorted(incl, remaining[keep:], side="left")  # its last step
            for s, r, t, p in zip(
                run[keep:], remaining[keep:].tolist(), ends[done].tolist(),
                (priv0[keep:] + tick).tolist(), strict=True,
            ):  # fmt: skip
                s.private = p + r
                s.generated = s.req.output_len
                s.last_token_s = t
        self._tick = tick + total
        self._spec_step += steps
        last[:keep] = ends[-1]
        if log:
            # KV read at step j: the first active[j] contexts, each before[j] longer
            kv = np.cumsum(ctx0 + tick)[active - 1] + active * before
            self.steps.add_many(
                ends - dur, dur, "decode", active, active * self.decode_slots, kv,
                len(self.waiting), active,
            )  # fmt: skip
        self.policy.after_decode(steps)
        if n_done:
            self._retire_tail(keep)
        return True

    def _retire_tail(self, keep: int) -> None:
        """The running batch's requests past ``keep`` (its sorted tail) have produced their
        last token: they leave the batch and finish, in the order their last tokens came."""
        run = self.running
        finished = run[keep:]
        self.running = run[:keep]
        self._batch_version += 1
        self._r_int.n = self._r_last.n = keep
        for s in sorted(finished, key=lambda s: (s.last_token_s, s.req.request_id)):
            self._finish(s, s.last_token_s, still_running=False)

    def _decode_tokens(self, now: float, dur, ends, active, log: bool) -> bool:
        """Every running request decodes in the steps of ``dur`` (ending at ``ends``) while it
        has output left (``active[j]`` of them at step j, the head of the batch): allocate their
        KV, record their tokens, finish the ones done. False: L1 cannot hold the new tokens
        (nothing changed)."""
        run = self.running
        k = len(dur)
        tick = self._tick
        key, ctx0, priv0 = self._r_int.view
        last = self._r_last.view[0]
        remaining = -(key + tick)
        slots = int(active.sum())
        if not self.cache.make_room(L1, slots, now):
            return False
        self.cache.alloc_private(slots)
        # ITL samples: a request's first gap also spans any prefill steps since its last token
        self._itl.append(ends[0] - last)
        if k > 1:
            self._itl.append(np.repeat(dur[1:], active[1:]))
        done_steps = np.minimum(remaining, k)
        self._remaining_clipped -= int(
            np.minimum(remaining, CLIP_MAX_NEW_TOKENS).sum()
            - np.minimum(remaining - done_steps, CLIP_MAX_NEW_TOKENS).sum()
        )
        # every request that stays decoded all k steps; the finishing tail gets its own counts
        n_done = int(np.count_nonzero(remaining <= k))  # the tail of the sorted batch
        keep = len(run) - n_done
        if n_done:
            tail = done_steps[keep:]
            for s, d, t, p in zip(
                run[keep:], tail.tolist(), ends[tail - 1].tolist(),
                (priv0[keep:] + tick).tolist(), strict=True,
            ):  # fmt: skip
                s.private = p + d
                s.generated = s.req.output_len
                s.last_token_s = t
        self._tick = tick + k
        last[:keep] = ends[-1]
        if log:
            # KV read at step j: the first active[j] contexts (>= 1 of them), each j longer
            kv = np.cumsum(ctx0 + tick)[active - 1] + active * np.arange(k)
            self.steps.add_many(
                ends - dur, dur, "decode", active, active, kv, len(self.waiting), active
            )  # fmt: skip
        self.policy.after_decode(k)
        if n_done:
            self._retire_tail(keep)
        return True

    def _hand_off(self, st: ReqState, now: float) -> None:
        """Prefill role: the prompt is done (its first token computed); the blocks stay in this
        replica's prefix cache and the request moves on, with a copy of its KV, to a decode
        replica (the cluster times the transfer)."""
        st.prefill_end_s = now
        self.cache.release(st.path, now)
        st.path = []
        self.cache.free_private(st.private)
        st.private = 0
        self.finished += 1
        self.ended.append(st)
        self.handoffs.append(st)

    def receive(self, st: ReqState, now: float) -> None:
        """Decode role: a request whose prompt KV has arrived at ``now``; it joins the running
        batch at this replica's next iteration that has room for it."""
        st.ready_s = now
        st.path, st.hit_nodes, st.private = [], [], 0
        # its first lookup stays in the prefill replica's counters: a recompute here is a rehit
        self._push_pending(st, now)

    def _admit_received(self, now: float) -> None:
        """Decode role: start received requests in arrival order while their prompt's KV and
        their decode reservation fit (SGLang's decode server pre-allocates the same way)."""
        while self.received:
            st = self.received[0]
            if len(self.running) >= self.sched.max_running_requests:
                return
            pages = self.cache.pages(st.req.input_len)
            need = pages
            if self.running:  # an idle replica takes any request that fits at all
                need += self.policy.reserve_tokens(self.clipped_left(st)) + self.reserved_decode()
            if self.cache.l1_available() < need or not self.cache.make_room(L1, pages, now):
                if not (
                    self.running or self.waiting or self.chunked or self.swapped
                    or self.swapping_in
                ):  # fmt: skip
                    self.received.popleft()
                    self._give_up(st, "does not fit in the KV cache beside cached data", now)
                    continue
                return
            self.received.popleft()
            self.cache.alloc_private(pages)
            st.private = pages
            st.computed = st.target = st.req.input_len
            if st.scheduled_s < 0:
                st.scheduled_s = now
            # the first token, computed by the prefill replica, reaches the user with the KV
            st.first_token_s = st.last_token_s = now
            st.generated = 1
            self._join(st)
            if st.generated >= st.req.output_len:
                self._finish(st, now)

    def _finish(self, st: ReqState, now: float, still_running: bool = True) -> None:
        st.finish_s = now
        self.finished += 1
        self.ended.append(st)
        self._released_by(st, now)
        if still_running:
            self._leave(st)
        self.cache.release(st.path, now)
        st.path = []
        self.cache.free_private(st.private)
        st.private = 0

    def _preempt(self, now: float) -> None:
        """Out of KV for the next decode step: retract requests (fewest output tokens, then
        longest input, first — as SGLang's retract_decode) until one step fits. With
        ``preemption="swap"`` a victim's private KV (what is not in the prefix cache) is
        copied to L2 and its prompt blocks are unpinned (they stay cached); otherwise, or if L2
        cannot take it, it is recomputed from its prompt later."""
        self._sync_running()
        order = self.policy.retract_order(self.running)
        while self.running and self.cache.l1_available() < len(self.running) * self.decode_slots:
            victim = order.pop(0)
            self._leave(victim)
            self.preemptions += 1
            victim.preemptions += 1
            if victim.preemptions > MAX_PREEMPTIONS:  # guarantees the run ends
                self._drop_kv(victim, now)
                reason = f"preempted {victim.preemptions} times: KV cache too small"
                self._give_up(victim, reason, now)
                continue
            swapped = None
            if self.sched.preemption == "swap":
                swapped = self.cache.swap_out(victim.private, now)
            if swapped is not None:
                victim.swapped_blocks = len(victim.path)
                self.cache.release(victim.path, now)
                victim.path = []
                victim.ready_s = swapped
                self.swapped.append(victim)
                continue
            self._drop_kv(victim, now)
            self.waiting.appendleft(victim)
        self.policy.after_retract(self.running)

    def _drop_kv(self, st: ReqState, now: float) -> None:
        """A preempted request keeps no KV of its own: its prompt is prefilled again (the
        prefix cache may still hold some of it) and its output tokens with it."""
        self.cache.release(st.path, now)
        st.path = []
        self.cache.free_private(st.private)
        st.private = 0
        st.computed = 0

    def swap_in(self, now: float) -> None:
        """Bring swapped requests back in order while their KV fits: pin their prompt blocks
        again (loading any that were evicted to L2/L3) and copy their private KV back from L2.
        They decode again once all of it has landed. A request whose prompt blocks left every
        tier meanwhile is recomputed instead."""
        cache = self.cache
        while self.swapped:
            st = self.swapped[0]
            n = st.swapped_blocks
            # blocks whose L2 copy is still landing count (acquire waits for them)
            hit = cache.lookup(st.req.block_ids[:n], st.req.input_len, whole=True)
            if len(hit.nodes) < n:
                self.swapped.popleft()
                self._drop_swapped_kv(st)
                st.computed = 0
                st.ready_s = now  # nothing of its own to wait for any more
                self.waiting.appendleft(st)
                continue
            need = hit.lower_pages + hit.unpinned_l1_pages + st.private
            if cache.l1_available() - self.reserved_decode() < need:
                return
            prompt_done = cache.acquire(hit, now)
            if prompt_done is None:
                return
            done = cache.swap_in(st.private, max(now, st.ready_s))
            if done is None:
                cache.release(hit.nodes, now, touch=False)
                return
            self.swapped.popleft()
            st.path = hit.nodes
            st.ready_s = max(prompt_done, done)
            if st.ready_s <= now:
                self._join(st)
            else:
                self.swapping_in.append(st)
                # its decode reservation holds from now, as for a running request
                self._remaining_clipped += self.clipped_left(st)

    def _drop_swapped_kv(self, st: ReqState) -> None:
        """Forget the private KV a swapped-out request holds in L2."""
        self.cache.drop_swapped(st.private)
        st.private = 0

    def _land_swapped(self, now: float) -> None:
        """Swapped-in requests whose KV has landed rejoin the running batch."""
        still = []
        for st in self.swapping_in:
            if st.ready_s <= now:
                self._remaining_clipped -= self.clipped_left(st)  # _join counts it again
                self._join(st)
            else:
                still.append(st)
        self.swapping_in = still

    # ------------------------------------------------------------------------------------
    # the loop

    def run(
        self, requests: Sequence, progress: Callable[[int], None] | None = None
    ) -> EngineResult:
        """Simulate a whole workload on this replica alone."""
        states = [ReqState(r) for r in requests]
        for i in sorted(range(len(states)), key=lambda i: (states[i].req.arrival_s, i)):
            self.submit(states[i])
        with no_cyclic_gc():
            self.advance(math.inf, progress)
        return self.result(states)

    def submit(self, st: ReqState) -> None:
        """A request that arrives here at its arrival time (now, if that has passed)."""
        if not math.isfinite(st.req.arrival_s):  # it would wait in the heap for ever
            self._give_up(st, f"never arrives (arrival at {st.req.arrival_s} s)", self.now)
            return
        # through the front end (HTTP, tokenization) before the engine sees it
        self._push_pending(st, st.req.arrival_s + self.cfg.frontend.in_s(st.req.input_len))

    def _push_pending(self, st: ReqState, t: float) -> None:
        self._seq += 1
        heapq.heappush(self._pending, (t, self._seq, st))

    def _take_arrivals(self, now: float) -> None:
        pending = self._pending
        decode_role = self.cfg.role == "decode"
        while pending and pending[0][0] <= now:
            st = heapq.heappop(pending)[2]
            if not decode_role:
                self._arrive(st, now)
            elif reason := self._reject(st):
                self._give_up(st, reason, now)
            else:
                self.received.append(st)

    def release_horizon(self, min_wait_s: float) -> float:
        """No client's next request can be due from this replica before this time: a waiting
        or arriving request could end at once, a decoding one not before its remaining tokens
        at the fastest decode step seen (less 10%), and a client waits ``min_wait_s`` at least
        (0 with requests queued for a slot). The cluster runs every replica to the earliest."""
        wait = 0.0 if self.stop_on_any_end else min_wait_s
        if (
            self.waiting or self.chunked or self.swapped or self.received or self.prefetching
            or self.swapping_in or self._pending or self.spec is not None
            or not math.isfinite(self._min_decode_s)
        ):  # fmt: skip
            return self.now + wait
        if not self.running:
            return math.inf
        key = self._r_int.view[0]
        left = int(-(key[-1] + self._tick))  # the batch is sorted: its last ends first
        return self.now + max(0, left - 1) * 0.9 * self._min_decode_s + wait

    def rewind_idle(self, t: float) -> None:
        """An idle replica's clock back to ``t`` (not before its last step ended): idle, its
        clock only says how far the cluster has looked, and a closed-loop client's request
        released at ``t`` must find it then."""
        if not self.busy() and t < self.now:
            self.now = max(t, self._last_busy_s)
            self._formed_s = None

    def busy(self) -> bool:
        return bool(
            self.waiting or self.running or self.chunked or self.swapped or self.received
            or self.prefetching or self.swapping_in or self._pending
        )  # fmt: skip

    def advance(self, until: float = math.inf, progress: Callable[[int], None] | None = None):
        """Run iterations that start before ``until`` (the next event this replica cannot
        foresee, such as a cluster's next arrival): afterwards the clock is at or past it, or
        the replica is idle with nothing submitted."""
        now = self.now
        done_count = self.finished
        while True:
            # prefetched requests became ready before anything arriving now was submitted
            self._release_prefetched(now)
            if self.swapping_in:
                self._land_swapped(now)
            # async scheduling: a busy engine formed this step's batch when the previous step
            # started, so requests that arrived during that step wait for the next one
            self._take_arrivals(now if self._formed_s is None else self._formed_s)
            if self.received:
                self._admit_received(now)
            if now >= until or now >= self.release_s:
                break  # (a release: the cluster sends a closed-loop client's next request)
            if not (self.waiting or self.running or self.chunked or self.swapped):
                upcoming = self._next_event(until)
                if upcoming == math.inf:
                    break
                now = max(now, upcoming)
                self._formed_s = None  # idle: the scheduler waits on its input queue
                continue
            batch = self.policy.prefill_batch(self, now)
            upcoming = self._next_event(until)  # after it: a swap-in it started is an event
            if batch:
                if self._async:
                    self._formed_s = now
                now = self._run_prefill(batch, now)
                self._last_busy_s = now
            elif self.running:
                now = self._decode_stretch(now, upcoming)
                self._last_busy_s = now
            else:
                # waiting requests that cannot be admitted now; nothing runs to free memory,
                # and with no KV transfer in flight nothing will (arrivals only add demand):
                # what is blocked now is blocked for good, so it ends here with its reason
                # rather than stalling the replica until the last arrival
                stuck = upcoming == math.inf or not (self.prefetching or self.swapping_in)
                if self.chunked is not None and stuck:
                    st, self.chunked = self.chunked, None  # its next chunk can never fit
                    self.cache.release(st.hit_nodes, now, touch=False)
                    st.hit_nodes = []
                    self.cache.free_private(st.private)
                    st.private = 0
                    self._give_up(st, "prompt does not fit in the KV cache beside cached data", now)
                    continue
                blocked = self.waiting[0] if self.waiting else None
                if blocked is not None and stuck and not self.swapped:
                    self.waiting.popleft()
                    self._give_up(blocked, "does not fit in the KV cache beside cached data", now)
                    continue
                if self.swapped and stuck:
                    st = self.swapped.popleft()  # nothing will free the memory it needs
                    self._drop_swapped_kv(st)
                    self._give_up(st, "swapped out and does not fit back beside cached data", now)
                    continue
                if upcoming == math.inf:
                    break
                now = max(now, upcoming)
                self._formed_s = None
            if progress is not None and self.finished != done_count:
                progress(self.finished - done_count)
                done_count = self.finished
        self.now = now

    def _next_event(self, until: float) -> float:
        """The next event this replica knows of: an arrival, a prefetch or swap-in landing,
        or ``until`` (a cluster may yet send more by then)."""
        t = self._pending[0][0] if self._pending else until
        t = min(t, self.release_s)
        if self.prefetching:
            t = min(t, min(s.ready_s for s in self.prefetching))
        if self.swapping_in:
            t = min(t, min(s.ready_s for s in self.swapping_in))
        return min(t, until)

    def result(self, states: list) -> EngineResult:
        self._sync_running()
        itl = np.concatenate(self._itl) if self._itl else np.zeros(0)
        return EngineResult(
            states, self.steps, itl, self.cache, self.preemptions, self.now,
            self._spec_verify_steps, self._spec_tokens,
        )  # fmt: skip
