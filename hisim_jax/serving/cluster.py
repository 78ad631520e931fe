"""Many replicas on one global clock, behind a router; optionally prefill/decode disaggregated.

The cluster walks the workload's arrivals in time order. Before each arrival it advances every
replica to that instant (each replica runs the steps that start before it, so its clock ends at
or just past it — a request arriving mid-step is seen at the step's end, as on a real server),
tells the router which requests have ended by then, and lets the router pick a replica. The
router sees only what a real one would: what it routed and what has finished, never the engines'
queues or caches.

Disaggregated (``prefill`` and ``decode`` engines): a request is routed to a prefill replica;
when its prompt is done, its KV goes over that replica's link to the least-loaded decode
replica (FIFO per link: ``latency_s + bytes / bandwidth``, every TP rank sending its heads'
share over its own NIC, as in Mooncake's transfer engine), and the decode replica admits it
with its KV and streams its tokens. TTFT therefore includes the transfer (the first token,
computed by the prefill replica, reaches the user with the KV, as in SGLang's PD mode), and so
does the first inter-token gap.

Every request ends completed or rejected with a reason: one that arrives past the clock's
horizon (``CLOCK_HORIZON_S``; an infinite time, say) never arrives (rejected at the end of the
run, routed nowhere: ``replica`` -1), one whose KV would land past it (a link so slow the time
overflows) is rejected when its prompt is done, and the drain rounds after the last arrival stop
when a round changes nothing.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hisim_jax.serving.engine import Engine, EngineResult, StepLog, no_cyclic_gc
from hisim_jax.serving.kvcache import CacheStats
from hisim_jax.serving.router import Router, RouterConfig
from hisim_jax.serving.scheduler.base import ReqState

DRAIN_ROUND_S = 1.0
SESSION_MODES = ("open", "closed")
# Closed-loop clients over several replicas: the cluster runs every replica only to where
# some replica could next release a client's request (Engine.release_horizon), so a follow-up
# routed anywhere finds its replica's clock at or before it; each round runs at least this
# far (one step or so), the most a follow-up can then join late.
MIN_ROUND_S = 1e-3
# Past 2**32 s (136 years) a float64 clock in seconds resolves no finer than a microsecond, so
# steps stop moving it: an arrival or a KV landing later than this never happens in a run.
CLOCK_HORIZON_S = 2.0**32


@dataclass(frozen=True, slots=True)
class KVLink:
    """The prefill→decode KV path of one GPU (per TP rank); defaults: a 400 Gb/s RDMA NIC
    per GPU at ~90% of line rate, as in Mooncake's and DistServe's deployments."""

    bandwidth_bytes_per_s: float = 45e9
    latency_s: float = 20e-6

    def __post_init__(self):
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"kv link bandwidth must be > 0, got {self.bandwidth_bytes_per_s}")
        if not self.latency_s >= 0:
            raise ValueError(f"kv link latency must be >= 0, got {self.latency_s}")


@dataclass(frozen=True, slots=True)
class Replica:
    """An engine and what the cluster needs to know about it."""

    engine: Engine
    name: str  # e.g. "h100-sxm/tp1"
    gpus: int
    kv_bytes_per_token: float  # per TP rank
    price_usd_per_hour: float  # per GPU


@dataclass(slots=True)
class ClusterResult:
    states: list  # ReqState per request, in workload order (``replica``, ``decode_replica`` set)
    replicas: list  # Replica, prefill (or unified) ones first
    results: list  # EngineResult per replica, same order
    simulated_s: float
    roles: list  # "unified", "prefill" or "decode" per replica

    def merged(self) -> EngineResult:
        """The whole cluster as one EngineResult (for the cluster-wide summary)."""
        stats = CacheStats()
        for r in self.results:
            s = r.cache.stats
            for t in range(3):
                stats.hit_tokens[t] += s.hit_tokens[t]
                stats.evicted_tokens[t] += s.evicted_tokens[t]
            stats.miss_tokens += s.miss_tokens
            for k, v in s.bytes_moved.items():
                stats.bytes_moved[k] += v
        steps = StepLog()
        steps.count = sum(len(r.steps) for r in self.results)
        itl = [r.itl_s for r in self.results if len(r.itl_s)]
        return EngineResult(
            self.states,
            steps,
            np.concatenate(itl) if itl else np.zeros(0),
            _Stats(stats),
            sum(r.preemptions for r in self.results),
            self.simulated_s,
            sum(r.spec_verify_steps for r in self.results),
            sum(r.spec_tokens for r in self.results),
        )


@dataclass(frozen=True, slots=True)
class _Stats:
    stats: CacheStats


class Cluster:
    """``replicas`` serve requests as the router sends them; ``decode`` replicas, if any, take
    every request after its prefill (disaggregation)."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        router: Router,
        decode: Sequence[Replica] = (),
        link: KVLink = KVLink(),
        sessions: str = "open",
        max_concurrency: int | None = None,
    ):
        if sessions not in SESSION_MODES:
            raise ValueError(
                f"sessions must be one of {', '.join(SESSION_MODES)}, got {sessions!r}"
            )
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        self.sessions = sessions
        self.max_concurrency = max_concurrency
        if not replicas:
            raise ValueError("a cluster needs at least one replica")
        roles = {r.engine.cfg.role for r in replicas}
        if decode and roles != {"prefill"}:
            raise ValueError("with decode replicas, every routed replica must have role prefill")
        if not decode and roles != {"unified"}:
            raise ValueError("without decode replicas, every replica must have role unified")
        if any(d.engine.cfg.role != "decode" for d in decode):
            raise ValueError("decode replicas must have role decode")
        self.replicas = list(replicas)
        self.decode = list(decode)
        self.router = router
        self.link = link
        # the decode side is balanced by outstanding tokens (SGLang's PD router picks the
        # decode server separately from the prefill one)
        self.decode_router = (
            Router(RouterConfig(policy="least_loaded"), len(self.decode), 1) if decode else None
        )
        self._link_busy_until = [0.0] * len(self.replicas)
        self._ended: list = []  # heap of (end_s, seq, side, replica, state) not yet told
        self._seq = 0
        self._handed_off = 0
        self._rejected = 0  # rejected here, not by an engine (KV that never lands, ...)
        self._on_end: Callable[[ReqState], None] | None = None  # clients: an end releases

    # ------------------------------------------------------------------------------------

    def _collect_ended(self) -> None:
        for side, group in ((0, self.replicas), (1, self.decode)):
            for i, rep in enumerate(group):
                ended = rep.engine.ended
                if not ended:
                    continue
                for st in ended:
                    t = (
                        st.prefill_end_s
                        if side == 0 and self.decode and not st.rejected
                        else st.finish_s
                    )
                    self._seq += 1
                    heapq.heappush(self._ended, (t, self._seq, side, i, st))
                    if self._on_end is not None and (st.finish_s >= 0 or st.rejected):
                        self._on_end(st)  # completed or rejected (not a hand-off)
                ended.clear()

    def _tell_router(self, now: float) -> None:
        """Report to the routers every request that has left a replica by ``now``."""
        self._collect_ended()
        heap = self._ended
        while heap and heap[0][0] <= now:
            t, _, side, i, st = heapq.heappop(heap)
            (self.router if side == 0 else self.decode_router).finish(st.req, i, t)

    def _reject(self, st: ReqState, reason: str, now: float) -> None:
        """End a request that no engine holds (it never arrived, or is between replicas)."""
        st.rejected = reason
        st.finish_s = now
        self._rejected += 1

    def _send_kv(self) -> list:
        """Book the KV transfers of prompts finished on prefill replicas: (landing s, state).
        A transfer that would land past the clock's horizon is not booked: the request is
        rejected with the reason, and the link stays free for the next one."""
        out = []
        for i, rep in enumerate(self.replicas):
            eng = rep.engine
            for st in eng.handoffs:
                nbytes = eng.cache.pages(st.req.input_len) * rep.kv_bytes_per_token
                start = max(st.prefill_end_s, self._link_busy_until[i])
                # each TP rank sends its share over its own NIC, in parallel
                end = start + nbytes / self.link.bandwidth_bytes_per_s
                if not end + self.link.latency_s <= CLOCK_HORIZON_S:
                    bw = self.link.bandwidth_bytes_per_s
                    why = f"its KV never reaches a decode replica ({nbytes:.3g} B at {bw:.3g} B/s)"
                    self._reject(st, why, st.prefill_end_s)
                    continue
                self._link_busy_until[i] = end
                out.append((end + self.link.latency_s, st))
            self._handed_off += len(eng.handoffs)
            eng.handoffs.clear()
        return out

    def _advance(self, group, until: float) -> None:
        for rep in group:
            rep.engine.advance(until)

    def _advance_all(self, t: float) -> None:
        """Every replica to ``t``. KV of prompts done by then goes to a decode replica chosen
        on the load it had at the last round (SGLang's PD router also picks it before the
        transfer); the decode replica takes it in when it lands, advancing after."""
        self._advance(self.replicas, t)
        for landing, st in self._send_kv():
            j = self.decode_router.route(st.req, st.prefill_end_s)
            st.decode_replica = j
            self.decode[j].engine.receive(st, landing)
        self._advance(self.decode, t)

    def run(
        self, requests: Sequence, progress: Callable[[int], None] | None = None
    ) -> ClusterResult:
        with no_cyclic_gc():
            if self.sessions == "open" and self.max_concurrency is None:
                return self._run(requests, progress)
            return self._run_clients(requests, progress)

    def _drain_until(self, stalled: bool) -> float:
        """The end of the next drain round after the last arrival. Prefill replicas drain in
        short rounds so that the decode side is still chosen on a recent view of its load; but
        after a round that changed nothing, with no transfer on its way that could unblock a
        replica, they run to the end (where an engine rejects what can never fit), and so
        they do when the clock is too far on to count a round (now + 1 s == now)."""
        busy = [r.engine for r in self.replicas if r.engine.busy()]
        now = min(e.now for e in busy)
        t = now + DRAIN_ROUND_S
        if t <= now:
            return math.inf
        if stalled and not any(
            math.isfinite(s.ready_s) for e in busy for s in e.prefetching + e.swapping_in
        ):
            return math.inf
        return t

    def _progress_mark(self) -> tuple:
        """What a drain round changes when it gets anywhere: steps run, requests ended."""
        return tuple((len(r.engine.steps), r.engine.finished) for r in self.replicas)

    def _run(self, requests: Sequence, progress) -> ClusterResult:
        states = [ReqState(r) for r in requests]
        # a request that can never arrive is routed nowhere and rejected at the end
        never = [s for s in states if not s.req.arrival_s <= CLOCK_HORIZON_S]
        order = sorted(
            (i for i, s in enumerate(states) if s.req.arrival_s <= CLOCK_HORIZON_S),
            key=lambda i: (states[i].req.arrival_s, i),
        )
        arrivals = [states[i] for i in order]
        nxt = 0
        told = 0
        mark = None
        while True:
            if nxt < len(arrivals):
                t = arrivals[nxt].req.arrival_s
            elif self.decode and any(r.engine.busy() for r in self.replicas):
                before, mark = mark, self._progress_mark()
                t = self._drain_until(stalled=before == mark)
            else:
                break
            self._advance_all(t)
            self._tell_router(t)
            while nxt < len(arrivals) and arrivals[nxt].req.arrival_s <= t:
                st = arrivals[nxt]
                st.replica = self.router.route(st.req, t)
                self.replicas[st.replica].engine.submit(st)
                nxt += 1
            if progress is not None:
                done = self._count_done()
                if done != told:
                    progress(done - told)
                    told = done
        return self._finish_run(states, never, told, progress)

    def _finish_run(self, states, never, told, progress) -> ClusterResult:
        # disaggregated, the loop ran until no prefill replica was busy: no KV is left to send
        self._advance(self.replicas, math.inf)
        self._advance(self.decode, math.inf)
        self._tell_router(math.inf)
        everyone = self.replicas + self.decode
        end_s = max((rep.engine.now for rep in everyone), default=0.0)
        for st in never:
            st.replica = -1
            why = f"never arrives (arrival at {st.req.arrival_s:.3g} s, past the clock's horizon)"
            self._reject(st, why, end_s)
        for st in states:  # the last guard: every request ends completed or rejected
            if st.finish_s < 0 and not st.rejected:
                self._reject(st, f"did not finish: {_where(st, everyone)}", end_s)
        if progress is not None:
            progress(len(states) - told)
        by_replica: list[list] = [[] for _ in everyone]
        for st in states:
            if st.replica < 0:
                continue
            by_replica[st.replica].append(st)
            if st.decode_replica >= 0:
                by_replica[len(self.replicas) + st.decode_replica].append(st)
        results = [rep.engine.result(s) for rep, s in zip(everyone, by_replica, strict=True)]
        return ClusterResult(
            states, everyone, results, end_s, [rep.engine.cfg.role for rep in everyone]
        )

    def _run_clients(self, requests: Sequence, progress) -> ClusterResult:
        """The run with clients that wait: closed-loop sessions (a session's next turn is sent
        its think time after the previous turn's reply ended, on the same prompt the workload
        recorded) and/or at most ``max_concurrency`` requests in flight (a request due while
        that many are out waits for the next to end, and is sent, and timed, from then: as
        bench_serving's semaphore). Open-loop arrivals are walked as in ``_run``; a replica
        stops where a client's next request is due (``Engine.release_s``), and the cluster
        routes it then."""
        states = [ReqState(r) for r in requests]
        index = {id(st): i for i, st in enumerate(states)}
        follow: dict[int, ReqState] = {}  # request id -> its session's next turn
        think: dict[int, float] = {}  # request id -> the client's wait after it ends
        if self.sessions == "closed":
            by_session: dict[int, list] = {}
            for st in states:
                if st.req.session_id >= 0:
                    by_session.setdefault(st.req.session_id, []).append(st)
            for turns in by_session.values():
                turns.sort(key=lambda s: (s.req.turn, s.req.arrival_s, s.req.request_id))
                for prev, nxt in itertools.pairwise(turns):
                    follow[prev.req.request_id] = nxt
                    wait = nxt.req.think_s
                    if not wait >= 0:  # unknown: the recorded gap between the two arrivals
                        wait = max(0.0, nxt.req.arrival_s - prev.req.arrival_s)
                    think[prev.req.request_id] = wait
        held = {id(s) for s in follow.values()}
        everyone = self.replicas + self.decode
        for rep in everyone:
            rep.engine.followup_think = think
        due: list = []  # heap of (send s, workload index, state, holds a slot already)
        never = []
        for i, st in enumerate(states):
            if id(st) in held:
                continue
            if not st.req.arrival_s <= CLOCK_HORIZON_S:
                never.append(st)
                continue
            due.append((st.req.arrival_s, i, st, False))
        heapq.heapify(due)
        waiting: deque = deque()  # due, no slot free (max_concurrency)
        limit = self.max_concurrency or math.inf
        out = [0]  # requests in flight

        def send_at(st: ReqState, t: float, slot: bool) -> None:
            if t != st.req.arrival_s:
                st.req = dataclasses.replace(st.req, arrival_s=t)
            heapq.heappush(due, (t, index[id(st)], st, slot))

        def ended(st: ReqState) -> None:
            out[0] -= 1
            end = st.finish_s
            nxt = follow.pop(st.req.request_id, None)
            while nxt is not None and st.rejected:
                # the client's session stops: its later turns are never sent
                self._reject(nxt, f"session ended: turn {st.req.turn} was rejected", end)
                nxt.replica = -1
                st, nxt = nxt, follow.pop(nxt.req.request_id, None)
            if nxt is not None:
                send_at(nxt, end + think[st.req.request_id], False)
            if waiting:
                q = waiting.popleft()
                out[0] += 1  # the freed slot is its
                send_at(q, max(end, q.req.arrival_s), True)

        self._on_end = ended
        several = len(everyone) > 1
        min_wait = min(think.values(), default=0.0)
        told = 0
        mark = None
        while True:
            for rep in everyone:  # with requests queued for a slot, every end is an event
                rep.engine.stop_on_any_end = bool(waiting)
            busy = [rep.engine for rep in everyone if rep.engine.busy()]
            if due:
                t = due[0][0]
            elif self.decode and any(r.engine.busy() for r in self.replicas):
                before, mark = mark, self._progress_mark()
                t = self._drain_until(stalled=before == mark)
            elif busy and (follow or waiting):
                t = math.inf  # a replica stops where a client's next request is due
            else:
                break
            if several and busy:
                # no replica runs past where another could release a client's next request
                # (which may be routed anywhere); at least a step per round
                horizon = min(e.release_horizon(min_wait) for e in busy)
                t = min(t, max(horizon, min(e.now for e in busy) + MIN_ROUND_S))
            self._advance_all(t)
            self._collect_ended()  # ends release clients' next requests into ``due``
            for rep in everyone:
                rep.engine.release_s = math.inf
            if due and due[0][0] < t:
                t = due[0][0]  # released before the horizon the replicas ran to
                for rep in everyone:
                    rep.engine.rewind_idle(t)
            if not math.isfinite(t):
                continue
            self._tell_router(t)
            while due and due[0][0] <= t:
                when, _, st, slot = heapq.heappop(due)
                if not slot and out[0] >= limit:
                    waiting.append(st)
                    continue
                if not slot:
                    out[0] += 1
                st.replica = self.router.route(st.req, when)
                self.replicas[st.replica].engine.submit(st)
            if progress is not None:
                done = self._count_done()
                if done != told:
                    progress(done - told)
                    told = done
        self._on_end = None
        end_s = max((rep.engine.now for rep in everyone), default=0.0)
        for nxt in follow.values():  # after a turn that never arrived: the client never sent
            nxt.replica = -1
            self._reject(nxt, "session ended: an earlier turn never arrived", end_s)
        return self._finish_run(states, never, told, progress)

    def _count_done(self) -> int:
        """Requests completed or rejected so far (a hand-off is neither)."""
        done = sum(r.engine.finished for r in self.replicas) - self._handed_off
        return done + sum(r.engine.finished for r in self.decode) + self._rejected


def _where(st: ReqState, replicas) -> str:
    """Where an unfinished request is stuck (the reason of its rejection)."""
    for rep in replicas:
        e = rep.engine
        if st in e.prefetching or st in e.swapping_in:
            return f"its KV transfer never lands (ready at {st.ready_s})"
        if any(p[2] is st for p in e._pending):
            return f"it never reaches its replica (at {st.ready_s})"
    return "no replica could make progress with it"
