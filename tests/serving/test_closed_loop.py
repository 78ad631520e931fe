"""Closed-loop sessions and concurrency-limited clients (serving/cluster.py ``_run_clients``):
a session's next turn is sent its think time after the previous reply ended, on the prompt
the workload recorded; at most ``max_concurrency`` requests are ever in flight."""

import numpy as np
import pytest

from hisim_jax.serving import workload as wl
from hisim_jax.simulation import SimulationOptions, run


def chat(n=60, rate=4.0, think=1.0, seed=0):
    return wl.chat_sessions(
        n, rate, think_s_mean=think, system_prompt_len=256, block_tokens=64, seed=seed
    )


def simulate(work, **kw):
    o = SimulationOptions(**{"sessions": "closed", **kw})
    return run(o, workload=work)


def by_session(frame):
    f = frame[frame["session_id"] >= 0].sort_values(["session_id", "turn"])
    return {sid: g for sid, g in f.groupby("session_id")}


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"replicas": 3, "router": "cache_aware"},
        {"replicas": 3, "router": "round_robin"},
        {"pd": "1:2"},
        {"engine": "vllm"},
    ],
)
def test_a_turn_is_sent_its_think_time_after_the_previous_reply(kw):
    work = chat()
    think = {r.request_id: r.think_s for r in work.requests}
    res = simulate(work, **kw)
    req = res.requests
    assert (req["rejected"] == "").all()
    for g in by_session(req).values():
        prev = None
        for row in g.itertuples():
            if prev is not None:
                # never before the reply it answers, and exactly its think time after it
                assert row.arrival_s >= prev.finish_s
                assert row.arrival_s == pytest.approx(prev.finish_s + think[row.request_id])
            prev = row


def test_on_one_replica_a_follow_up_is_admitted_when_due():
    """The replica stops where a client's next turn is due, so the turn is admitted at the
    first step boundary after it, as any arrival: its queueing is at most a step or two."""
    res = simulate(chat(n=40, rate=1.0, think=2.0))
    req = res.requests
    later = req[req["turn"] > 0]
    assert len(later) > 40
    steps = res.steps
    longest_step = steps["duration_s"].max()
    assert later["queue_s"].max() <= 2 * longest_step + 0.01


def test_every_follow_up_hits_the_prefix_its_session_left_in_the_cache():
    # one replica, a cache far larger than the workload: nothing is evicted
    work = chat(n=30, rate=2.0)
    res = simulate(work, kv_cache_tokens=4_000_000)
    req = res.requests.set_index("request_id")
    bt = work.block_tokens
    for g in by_session(res.requests).values():
        rows = list(g.itertuples())
        for prev, cur in zip(rows, rows[1:], strict=False):
            hit = req.loc[cur.request_id, ["l1_hit_tokens", "l2_hit_tokens", "l3_hit_tokens"]]
            assert hit.sum() >= (prev.input_len // bt) * bt


def test_open_loop_can_send_a_turn_before_its_reply_closed_never_does():
    # a heavy load on an L40S: the open-loop schedule (20 ms per output token) outruns it
    work = wl.chat_sessions(80, 8.0, think_s_mean=0.2, block_tokens=64, seed=1)
    early = {}
    for mode in ("open", "closed"):
        req = simulate(work, sessions=mode, hardware="l40s").requests
        n = 0
        for g in by_session(req).values():
            a, f = g["arrival_s"].to_numpy(), g["finish_s"].to_numpy()
            n += int(np.sum(a[1:] < f[:-1]))
        early[mode] = n
    assert early["open"] > 0 and early["closed"] == 0


@pytest.mark.parametrize("limit", [1, 4, 16])
def test_concurrency_limit_holds_at_every_instant(limit):
    work = wl.synthetic(200, 50.0, seed=3)
    res = simulate(work, sessions="open", max_concurrency=limit)
    req = res.requests
    assert (req["rejected"] == "").all()
    start, end = req["arrival_s"].to_numpy(), req["finish_s"].to_numpy()
    # requests in flight just after each send
    at = np.sort(start)
    inflight = np.array([np.sum((start <= t) & (end > t)) for t in at])
    assert inflight.max() <= limit
    if limit == 1:  # one at a time: each is sent when the one before it ends
        order = np.argsort(start)
        assert np.all(start[order][1:] >= end[order][:-1] - 1e-12)


def test_closed_loop_with_a_concurrency_limit_and_seeds_reproduce():
    work = chat(n=50, rate=5.0, think=0.5)
    a = simulate(work, max_concurrency=8, replicas=2)
    b = simulate(work, max_concurrency=8, replicas=2)
    assert a.requests.equals(b.requests) and a.steps.equals(b.steps)
    c = simulate(chat(n=50, rate=5.0, think=0.5, seed=1), max_concurrency=8, replicas=2)
    assert not c.requests["arrival_s"].equals(a.requests["arrival_s"])


def test_a_rejected_turn_ends_its_session():
    # turns past the context window are rejected; the client sends none after them
    work = wl.chat_sessions(20, 2.0, think_s_mean=0.5, block_tokens=64, seed=2)
    req = simulate(work, max_model_len=1500).requests
    ended = req["rejected"].str.startswith("session ended")
    assert ended.any()
    for g in by_session(req).values():
        rej = g["rejected"].to_numpy() != ""
        if rej.any():
            assert rej[np.argmax(rej) :].all()  # once one is rejected, all later ones are


def test_built_in_workloads_default_to_closed_loop_and_traces_to_open():
    from hisim_jax.simulation import sessions_mode

    assert sessions_mode(SimulationOptions()) == "closed"
    assert sessions_mode(SimulationOptions(workload="agent")) == "closed"
    assert sessions_mode(SimulationOptions(trace="x.jsonl")) == "open"
    assert sessions_mode(SimulationOptions(trace="x.jsonl", sessions="closed")) == "closed"
    for bad in ({"sessions": "half"}, {"workload": "batch"}, {"max_concurrency": 0}):
        with pytest.raises(ValueError):
            SimulationOptions(**bad)
    with pytest.raises(ValueError, match="think_time"):
        SimulationOptions(trace="x.jsonl", think_time="fixed:1")
    with pytest.raises(ValueError, match="workload"):
        SimulationOptions(trace="x.jsonl", workload="agent")


def test_turns_after_one_that_never_arrives_are_not_sent():
    work = chat(n=4, rate=1.0)
    reqs = list(work.requests)
    first = next(r for r in reqs if r.turn == 0 and any(q.session_id == r.session_id and q.turn
                                                        for q in reqs))  # fmt: skip
    reqs[first.request_id] = wl.Request(first.request_id, float("inf"), first.input_len,
                                        first.output_len, first.block_ids, first.session_id, 0)  # fmt: skip
    # (the workload checks refuse such an arrival; the cluster alone can be handed one)
    from hisim_jax.simulation import build_cluster

    res = build_cluster(SimulationOptions(sessions="closed"), work.block_tokens).run(reqs)
    mine = [s for s in res.states if s.req.session_id == first.session_id]
    assert all(s.rejected for s in mine)
    assert all(s.rejected.startswith("session ended") for s in mine if s.req.turn > 0)
    assert not any(s.rejected for s in res.states if s.req.session_id != first.session_id)


def test_a_queued_turn_is_sent_the_moment_a_slot_frees():
    """One request in flight at a time, closed loop: a turn due while another is out is sent
    exactly when that one ends (its own reply's think time has no say then)."""
    work = chat(n=12, rate=20.0, think=0.2)
    think = {r.request_id: r.think_s for r in work.requests}
    recorded = {r.request_id: r.arrival_s for r in work.requests}
    req = simulate(work, max_concurrency=1).requests.sort_values("arrival_s")
    prev_turn_end = {}
    ends = []
    for row in req.itertuples():
        if row.turn == 0:
            due = recorded[row.request_id]
        else:
            due = prev_turn_end[row.session_id] + think[row.request_id]
        if ends:
            assert row.arrival_s >= ends[-1]  # one at a time
            if due < ends[-1]:  # it was due while another was out: sent at that one's end
                assert row.arrival_s == pytest.approx(ends[-1])
            else:
                assert row.arrival_s == pytest.approx(due)
        # and admitted at once: nothing else is running (the engine stopped at the slot's end)
        assert row.queue_s < 0.03  # (the front end: HTTP and tokenization)
        ends.append(row.finish_s)
        prev_turn_end[row.session_id] = row.finish_s
