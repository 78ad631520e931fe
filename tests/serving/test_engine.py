"""The single-replica engine on a fake step cost: conservation, capacity, leaks, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.kvcache import L1, KVCacheConfig
from hisim_jax.serving.metrics import SLO, request_frame, summary
from hisim_jax.serving.scheduler.base import SchedulerConfig, cuda_graph_sizes, graph_padded_size
from hisim_jax.serving.workload import LengthDist, Request, chat_sessions, synthetic


class FakeCost:
    """Linear in tokens and context; counts calls so tests can check fast-forwarding."""

    def __init__(self):
        self.prefill_calls = 0
        self.decode_calls = 0
        self.decode_steps = 0

    def step_latency_s(self, batches):
        self.prefill_calls += 1
        return np.array(
            [2e-3 + 2e-5 * sum(n for _, n in b) + 1e-8 * sum(c for c, _ in b) for b in batches]
        )

    def decode_steps_s(self, ctx, k, padded=0, active=None):
        self.decode_calls += 1
        self.decode_steps += k
        active = np.full(k, len(ctx)) if active is None else np.asarray(active)
        padded = np.maximum(np.broadcast_to(padded, (k,)), active)
        return np.array(
            [
                5e-3 + 2e-5 * padded[j] + 1e-8 * (ctx[: active[j]].sum() + j * active[j])
                for j in range(k)
            ]
        )


def engine(l1=60_000, l2=0, l3=0, block=64, page_size=1, **sched):
    cache = KVCacheConfig(
        l1_tokens=l1, bytes_per_token=1e5, block_tokens=block, l2_tokens=l2, l3_tokens=l3,
        page_size=page_size,
        l2_read_bytes_per_s=5e10, l2_write_bytes_per_s=5e10, l3_read_bytes_per_s=5e9,
        l3_write_bytes_per_s=3e9,
    )  # fmt: skip
    return Engine(
        EngineConfig(SchedulerConfig(**sched), cache, num_layers=32, max_context=32768), FakeCost()
    )


def chat(n_sessions=60, seed=0):
    return chat_sessions(n_sessions, 3.0, think_s_mean=2.0, block_tokens=64, seed=seed).requests


def check_run(eng, reqs, res):
    states = res.states
    assert len(states) == len(reqs)
    for s in states:
        assert s.finish_s >= 0  # completed, or rejected with a reason
        if not s.rejected:
            assert s.finish_s >= s.first_token_s >= s.req.arrival_s
            assert s.generated == s.req.output_len
            assert sum(s.hit_tokens) <= s.req.input_len - 1  # hits never exceed the prompt
    assert eng.finished == len(reqs)  # each counted exactly once
    c = res.cache
    c.check_invariants()  # no tier over capacity, counts consistent
    assert c.private == 0 and c.pinned_pages == 0 and c.l2_private == 0  # nothing leaked
    assert not eng.running and not eng.waiting and not eng.swapped and eng.chunked is None
    assert eng._remaining_clipped == 0  # the tracked decode reservation returned to zero
    assert np.all(res.steps.column("duration_s") > 0)
    assert np.all(np.diff(res.steps.column("start_s")) >= -1e-12)  # one clock, moving forward


def test_chat_workload_completes_and_reuses_prefixes():
    reqs = chat()
    eng = engine()
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    assert all(not s.rejected for s in res.states)
    assert res.cache.stats.hit_tokens[L1] > 0.3 * sum(r.input_len for r in reqs)


def test_decode_stretches_are_fast_forwarded():
    reqs = synthetic(20, 100.0, output=LengthDist.fixed(400), seed=1).requests
    eng = engine()
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    cost = eng.step_cost
    assert cost.decode_steps >= 399  # the first token comes from the prefill
    assert cost.decode_calls < cost.decode_steps / 10  # many steps per estimator call


def test_same_seed_same_result():
    a = request_frame(engine().run(chat(seed=3)))
    b = request_frame(engine().run(chat(seed=3)))
    assert a.equals(b)
    c = request_frame(engine().run(chat(seed=4)))
    assert not a.equals(c)


def watch_decodes(eng):
    """Check before every decode stretch that each running request's KV is in L1 (its prompt
    blocks pinned there plus its private pages) and has landed: the batch never computes on
    KV it does not hold."""
    stretch, seen = eng._decode_stretch, []

    def checked(now, next_event):
        eng._sync_running()
        for s in eng.running:
            assert all(n.tiers[L1] and n.pins > 0 for n in s.path)
            # in pages: a prompt block's last page is charged whole, and after a recompute it
            # also holds the first regenerated tokens (their private pages start after it)
            held = sum(n.pages for n in s.path) + s.private
            assert held >= s.req.input_len + s.generated - 1, (s.req.request_id, held)
            assert s.ready_s <= now + 1e-12, (s.req.request_id, s.ready_s, now)
        seen.append(len(eng.running))
        return stretch(now, next_event)

    eng._decode_stretch = checked
    return seen


def test_small_l1_preempts_and_still_finishes_everything():
    reqs = synthetic(
        40, 50.0, input=LengthDist.fixed(1500), output=LengthDist.fixed(600), seed=2
    ).requests
    for mode, l2 in (("recompute", 0), ("swap", 200_000)):
        eng = engine(l1=20_000, l2=l2, preemption=mode)
        seen = watch_decodes(eng)
        res = eng.run(reqs)
        check_run(eng, reqs, res)
        assert seen and res.preemptions > 0, mode
        assert all(not s.rejected for s in res.states)
        # the summary counts each request's prefix lookup once (its last admission)
        stats = res.cache.stats
        for t in range(3):
            assert stats.hit_tokens[t] == sum(s.hit_tokens[t] for s in res.states)
        assert stats.miss_tokens == sum(s.req.input_len - sum(s.hit_tokens) for s in res.states)
    # swapped requests came back without recomputing anything, their KV copied both ways
    assert sum(s.recomputed for s in res.states) == 0
    moved = res.cache.stats.bytes_moved
    assert moved["l2_to_l1"] > 0 and moved["l1_to_l2"] >= moved["l2_to_l1"]


def test_swap_in_reloads_prompt_blocks_evicted_meanwhile():
    # long shared prompts under a tiny L1: while a request is swapped out, others evict its
    # (unpinned) prompt blocks to L2; swapping back must load them into L1 before it decodes
    # (1,153 tokens: the last of the 19 blocks holds 1 token, which a 16-token page cut drops)
    reqs = [Request(i, 0.01 * i, 1153, 400, tuple(range(i * 100, i * 100 + 19))) for i in range(16)]
    for page in (1, 16):  # a swapped request takes back all its blocks, whatever the page
        eng = engine(l1=8_000, l2=100_000, preemption="swap", page_size=page)
        seen = watch_decodes(eng)
        res = eng.run(reqs)
        check_run(eng, reqs, res)
        assert seen and res.preemptions > 0
        assert all(not s.rejected and s.recomputed == 0 for s in res.states), page


def test_swap_in_waits_for_prompt_blocks_still_landing_in_l2():
    # write-back over a slow link: a swapped request's prompt blocks are being written to L2
    # when it swaps back; it waits for them instead of dropping its KV and recomputing
    cache = KVCacheConfig(
        l1_tokens=3000, bytes_per_token=1e5, block_tokens=64, l2_tokens=100_000,
        l2_read_bytes_per_s=1e8, l2_write_bytes_per_s=1e8, write_policy="write_back",
    )  # fmt: skip
    cfg = EngineConfig(SchedulerConfig(preemption="swap", new_token_ratio=0.1), cache)
    eng = Engine(cfg, FakeCost())
    reqs = [
        Request(0, 0.0, 1200, 1700, tuple(range(19))),
        Request(1, 0.0, 1200, 600, tuple(range(100, 119))),
        Request(2, 3.0, 1000, 20, tuple(range(200, 216))),
    ]
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    assert res.preemptions > 0
    assert all(s.recomputed == 0 and not s.rejected for s in res.states)


def test_decode_replica_does_not_reject_while_a_request_swaps_back_in():
    from hisim_jax.serving.scheduler.base import ReqState

    def make():
        cache = KVCacheConfig(
            l1_tokens=3000, bytes_per_token=1e5, block_tokens=64, l2_tokens=100_000,
            l2_read_bytes_per_s=1e8, l2_write_bytes_per_s=1e8,
        )  # fmt: skip
        sched = SchedulerConfig(preemption="swap", new_token_ratio=0.1)
        return Engine(EngineConfig(sched, cache, role="decode"), FakeCost())

    reqs = [Request(0, 0.0, 1200, 1700, tuple(range(19))), Request(1, 0.0, 1200, 1700, tuple(range(100, 119)))]  # fmt: skip
    # a first run finds when a request is swapping back in with nothing else running
    eng, windows = make(), []
    swap_in = eng.swap_in

    def watch(now):
        swap_in(now)
        windows.extend((now, s.ready_s) for s in eng.swapping_in if not eng.running)

    eng.swap_in = watch
    for r in reqs:
        eng.receive(ReqState(r), 0.0)
    eng.advance()
    assert windows
    start, ready = windows[0]
    # the same, plus a request that fits L1 on its own, received inside that window
    eng = make()
    states = [ReqState(r) for r in reqs] + [
        ReqState(Request(2, 0.0, 1600, 10, tuple(range(200, 225))))
    ]
    for s in states[:2]:
        eng.receive(s, 0.0)
    eng.receive(states[2], (start + ready) / 2)
    eng.advance()
    assert all(not s.rejected and s.finish_s > 0 for s in states)


def test_chunked_prompt_pages_are_allocated_as_one_prompt():
    # 100-token chunks in 64-token pages: paged chunk by chunk, the prompt would need 26 pages
    # (1,664 tokens) of a 1,500-token L1 and never finish; paged as one prompt it needs 1,280
    eng = engine(l1=1500, page_size=64, chunked_prefill_size=100)
    reqs = [Request(0, 0.0, 1261, 2, tuple(range(20)))]
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    assert not res.states[0].rejected and res.states[0].generated == 2


def l3_engine(policy, **sched):
    # 1 MB of KV per token and a 1 GB/s L3: a 6,000-token prefix takes 6 s to read back
    cache = KVCacheConfig(
        l1_tokens=8_000, bytes_per_token=1e6, block_tokens=64, l2_tokens=8_000,
        l3_tokens=200_000, l2_read_bytes_per_s=1e12, l2_write_bytes_per_s=1e12,
        l3_read_bytes_per_s=1e9, l3_write_bytes_per_s=1e12,
    )  # fmt: skip
    cfg = EngineConfig(
        SchedulerConfig(prefetch_policy=policy, **sched), cache, num_layers=32, max_context=32768
    )
    return Engine(cfg, FakeCost())


def test_prefetch_policies_use_only_the_l3_blocks_that_have_landed():
    def prompt(family, t, rid):
        return Request(rid, t, 6_000, 2, tuple(range(family * 1000, family * 1000 + 94)))

    # family 0 is computed, pushed out of L1 and L2 by families 1-3, then asked for again
    reqs = [prompt(0, 0.0, 0), prompt(1, 1.0, 1), prompt(2, 2.0, 2), prompt(3, 3.0, 3)]
    reqs.append(prompt(0, 10.0, 4))
    out = {}
    for policy, extra in (
        ("best_effort", {}),
        ("wait_complete", {}),
        ("timeout", {"prefetch_timeout_base_s": 3.0, "prefetch_timeout_per_ki_token_s": 0.0}),
    ):
        eng = l3_engine(policy, **extra)
        res = eng.run(reqs)
        check_run(eng, reqs, res)
        last = res.states[4]
        out[policy] = (last.hit_tokens, last.first_token_s - last.req.arrival_s)
        assert last.hit_tokens[L1] == last.hit_tokens[1] == 0  # it was only in L3
        assert res.cache.stats.hit_tokens[2] == last.hit_tokens[2]
    # scheduled at once: the read has not landed anything, so the prompt is recomputed
    assert out["best_effort"][0][2] == 0 and out["best_effort"][1] < 1.0
    # waits the whole 6 s read and reuses all of it (but the last token)
    assert out["wait_complete"][0][2] == 5_999 and out["wait_complete"][1] >= 6.0
    # gives up after 3 s: the half of the prefix read by then is reused
    hit, ttft = out["timeout"]
    assert 2_900 <= hit[2] <= 3_100 and 3.0 <= ttft < 4.0


def test_rejections_are_reported_with_a_reason():
    reqs = [
        Request(0, 0.0, 40_000, 10),  # longer than the context window
        Request(1, 0.0, 9_000, 10),  # longer than L1 can ever hold
        Request(2, 0.0, 100, 5),
    ]
    eng = engine(l1=8_000)
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    assert "context window" in res.states[0].rejected
    assert "L1" in res.states[1].rejected
    assert res.states[2].rejected == "" and res.states[2].generated == 5
    # the summary groups rejections by reason, without each request's own numbers
    s = summary(res, wall_s=1.0, gpu_price_usd_per_hour=3.0)
    assert s["requests_rejected"] == 2
    assert s["rejections"] == {
        "longer than L1 can ever hold": 1,
        "longer than the context window": 1,
    }


def test_l2_and_l3_tiers_serve_hits_under_each_prefetch_policy():
    reqs = chat(n_sessions=80, seed=5)
    for policy in ("best_effort", "wait_complete", "timeout"):
        eng = engine(l1=6_000, l2=8_000, l3=200_000, prefetch_policy=policy)
        res = eng.run(reqs)
        check_run(eng, reqs, res)
        hits = res.cache.stats.hit_tokens
        assert hits[1] + hits[2] > 0, policy


def test_chunked_prefill_splits_long_prompts():
    reqs = [Request(0, 0.0, 20_000, 3)]
    eng = engine(chunked_prefill_size=4096)
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    prefill = [
        n
        for k, n in zip(res.steps.column("kind"), res.steps.column("new_tokens"), strict=True)
        if k == "prefill"
    ]
    assert prefill == [4096] * 4 + [20_000 - 4 * 4096]


def test_summary_metrics_and_goodput():
    reqs = chat()
    res = engine().run(reqs)
    s = summary(res, wall_s=1.0, gpu_price_usd_per_hour=3.0, slo=SLO(ttft_s=0.5, tpot_s=0.05))
    assert s["requests_completed"] == len(reqs)
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert s[k]["p50"] <= s[k]["p90"] <= s[k]["p99"]
    assert 0 < s["cache"]["hit_rate"] < 1
    assert s["cache"]["l1_hit_tokens"] + s["cache"]["miss_tokens"] == sum(r.input_len for r in reqs)
    assert 0 <= s["slo_attainment"] <= 1
    assert s["goodput_req_s"] <= s["request_throughput_per_s"] + 1e-12
    assert s["cost"]["evaluation_cost_ratio"] > 0


def test_page_size_keeps_hits_on_page_boundaries():
    reqs = chat(n_sessions=40, seed=7)
    eng = engine(page_size=16)
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    hits = [sum(s.hit_tokens) for s in res.states]
    assert sum(hits) > 0 and all(h % 16 == 0 for h in hits)
    # a request that fits in tokens but not in whole pages says so
    eng = engine(l1=1_000, page_size=64)
    res = eng.run([Request(0, 0.0, 990, 5)])
    assert (
        res.states[0].rejected == "longer than L1 can ever hold (1024 in pages of 64 > 1000 tokens)"
    )


def test_step_overhead_is_added_to_every_step():
    reqs = [Request(i, 0.0, 300 + 50 * i, 40 + 7 * i) for i in range(6)]  # all at once
    base = engine().run(reqs).steps
    slow = engine(step_overhead_s=0.003).run(reqs).steps
    assert len(base) == len(slow)
    assert list(base.column("kind")) == list(slow.column("kind"))
    assert np.allclose(slow.column("duration_s") - base.column("duration_s"), 0.003)


def test_decode_batches_are_padded_to_captured_graph_sizes():
    seen = []
    for max_bs in (160, 2):
        eng = engine(cuda_graph_max_bs=max_bs)
        cost = eng.step_cost
        decode = cost.decode_steps_s

        def record(ctx, k, padded=0, active=None, decode=decode, max_bs=max_bs):
            seen.append((max_bs, int(np.max(active)), int(np.max(padded))))
            return decode(ctx, k, padded, active)

        cost.decode_steps_s = record
        eng.run([Request(i, 0.0, 100, 30) for i in range(3)])
    # three decoding requests replay the graph captured for 4; above the largest captured
    # size (2) the batch runs as it is
    assert (160, 3, 4) in seen and (2, 3, 3) in seen


def test_cuda_graph_sizes():
    sizes = cuda_graph_sizes(160)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 160
    assert graph_padded_size(3, sizes) == 4 and graph_padded_size(9, sizes) == 16
    assert graph_padded_size(500, sizes) == 500


def test_bad_scheduler_options_are_rejected():
    with pytest.raises(ValueError, match="schedule_policy"):
        SchedulerConfig(schedule_policy="random")
    with pytest.raises(ValueError, match="prefetch_policy"):
        SchedulerConfig(prefetch_policy="eager")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 5),  # arrival
            st.integers(1, 3000),  # input
            st.integers(1, 400),  # output
            st.integers(0, 3),  # shared-prefix family
        ),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([4_000, 12_000, 60_000]),
    st.sampled_from(["recompute", "swap"]),
    st.sampled_from(["fcfs", "lpm"]),
    st.sampled_from([1, 16]),
)
def test_random_workloads_conserve_requests_and_memory(specs, l1, preemption, policy, page):
    reqs = []
    for i, (t, n_in, n_out, fam) in enumerate(sorted(specs)):
        blocks = -(-n_in // 64)
        ids = tuple(fam * 1000 + k if k < 4 else 10**6 + i * 100 + k for k in range(blocks))
        reqs.append(Request(i, t, n_in, n_out, ids))
    eng = engine(l1=l1, l2=20_000, preemption=preemption, schedule_policy=policy, page_size=page)
    watch_decodes(eng)
    res = eng.run(reqs)
    check_run(eng, reqs, res)
    for s in res.states:
        if not s.rejected:
            assert s.generated == s.req.output_len
