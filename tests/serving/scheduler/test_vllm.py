"""vLLM V1's batch-forming rules against hand-worked cases: the policy through a fake engine
view (token budget, mixing, max_num_seqs, KV admission, preemption order), then whole engine
runs with a unit-cost estimator, step by step."""

from collections import deque

import numpy as np
import pytest

from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.kvcache import KVCacheConfig
from hisim_jax.serving.scheduler.base import SchedulerConfig
from hisim_jax.serving.scheduler.vllm import (
    VLLMPolicy,
    vllm_cuda_graph_sizes,
    vllm_defaults,
    vllm_max_capture_size,
)
from hisim_jax.serving.workload import Request
from tests.serving.scheduler.test_sglang import FakeView, ids, states


def policy(budget=10, seqs=1024):
    cfg = SchedulerConfig(
        chunked_prefill_size=budget, max_prefill_tokens=budget, max_running_requests=seqs
    )
    return VLLMPolicy(cfg)


def view(free, running=0, waiting=()):
    v = FakeView(free=free, waiting=deque(waiting))
    v.running = states(*([1] * running))
    return v


def test_decodes_take_the_budget_first_then_new_prompts_chunked_to_what_is_left():
    v = view(100, running=3, waiting=states(4, 5))
    batch = policy(budget=10).prefill_batch(v, 0.0)
    # 10 tokens: 3 decodes, the first prompt whole (4), the second chunked to 3
    assert ids(batch) == [(0, 4), (1, 3)]
    assert v.chunked is batch[1][0] and not v.waiting


def test_the_chunked_prompt_continues_before_new_requests():
    v = view(100, running=2, waiting=states(4, 3))
    p = policy(budget=10)
    first = p.prefill_batch(v, 0.0)
    assert ids(first) == [(0, 4), (1, 3)]  # 2 decodes + 4 + 3 = 9: prompt 1 not chunked
    chunked = states(20)[0]
    v = view(100, running=2, waiting=states(6))
    v.chunked = chunked
    chunked.target, chunked.computed = 20, 15  # 5 prompt tokens left
    batch = p.prefill_batch(v, 0.0)
    assert ids(batch) == [(0, 5), (0, 3)]  # its last 5, then 3 of the waiting prompt
    assert batch[0][0] is chunked and v.chunked is batch[1][0]


def test_max_num_seqs_caps_the_requests_running_and_prefilling():
    v = view(100, running=2, waiting=states(1, 1, 1))
    assert ids(policy(budget=50, seqs=3).prefill_batch(v, 0.0)) == [(0, 1)]


def test_a_prompt_that_does_not_fit_blocks_the_queue_and_decodes_keep_their_room():
    # 10 free tokens, 4 of them for the decodes' next tokens: a 7-token prompt does not fit,
    # and the 1-token prompt behind it waits too (FCFS)
    v = view(10, running=4, waiting=states(7, 1))
    assert policy(budget=100).prefill_batch(v, 0.0) == []
    assert len(v.waiting) == 2 and v.free == 10


def test_no_admission_when_the_decodes_alone_do_not_fit():
    v = view(3, running=4, waiting=states(1))
    assert policy().prefill_batch(v, 0.0) == []  # the decode step preempts instead


def test_preemption_takes_the_most_recently_admitted_first():
    run = states(5, 5, 5)
    for st, seq in zip(run, (2, 3, 1), strict=True):
        st.join_seq = seq
    assert [s.req.request_id for s in VLLMPolicy.retract_order(run)] == [1, 0, 2]


def test_swap_preemption_is_refused():
    with pytest.raises(ValueError, match="recompute only"):
        VLLMPolicy(SchedulerConfig(preemption="swap"))


def test_defaults_follow_the_gpu_memory_and_cuda_graph_sizes():
    assert vllm_defaults(80e9, "NVIDIA H100 SXM") == (8192, 1024)
    assert vllm_defaults(80e9, "NVIDIA A100 SXM4 80GB") == (2048, 256)
    assert vllm_defaults(48e9, "NVIDIA L40S") == (2048, 256)
    assert vllm_max_capture_size(128, 2048) == 256
    assert vllm_max_capture_size(1024, 8192) == 512
    sizes = vllm_cuda_graph_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-3:] == [480, 496, 512] and len(sizes) == 51


# ------------------------------------------------------------------------------------------
# whole runs with a unit-cost estimator: every step takes 1 s


class UnitCost:
    def __init__(self):
        self.batches = []

    def step_latency_s(self, batches):
        self.batches += [sorted(b) for b in batches]
        return np.ones(len(batches))

    def decode_steps_s(self, ctx, k, padded=0, active=None):
        return np.ones(k)


def run_engine(requests, policy_name, budget=8):
    cache = KVCacheConfig(
        l1_tokens=1000, bytes_per_token=1.0, block_tokens=4, page_size=1,
        l2_read_bytes_per_s=1e9, l2_write_bytes_per_s=1e9,
        l3_read_bytes_per_s=1e9, l3_write_bytes_per_s=1e9,
    )  # fmt: skip
    sched = SchedulerConfig(chunked_prefill_size=budget, max_prefill_tokens=budget)
    cost = UnitCost()
    eng = Engine(EngineConfig(sched, cache, num_layers=1, policy=policy_name), cost)
    res = eng.run(requests)
    return res, cost


def two_requests():
    return [
        Request(0, 0.0, 4, 3, (1,)),
        Request(1, 0.5, 4, 2, (2,)),
    ]


def times(res):
    return [(s.first_token_s, s.finish_s) for s in res.states]


def test_vllm_mixes_the_arriving_prompt_into_the_running_decode_one_step_late():
    res, cost = run_engine(two_requests(), "vllm")
    # t=0..1 A's prompt. B arrives at 0.5, after the step at 1 was scheduled (async
    # scheduling forms it when the step at 0 starts): t=1..2 A decodes alone; t=2..3 A's last
    # decode beside B's prompt; t=3..4 B's last decode
    assert list(res.steps.column("kind")) == ["prefill", "decode", "mixed", "decode"]
    assert cost.batches == [[(0, 4)], [(0, 4), (5, 1)]]
    assert times(res) == [(1.0, 3.0), (3.0, 4.0)]


def test_an_idle_vllm_engine_schedules_an_arrival_at_once():
    res, _ = run_engine([Request(0, 0.0, 4, 1, (1,)), Request(1, 2.5, 4, 1, (2,))], "vllm")
    assert times(res) == [(1.0, 1.0), (3.5, 3.5)]


def test_sglang_runs_the_arriving_prompt_as_its_own_step():
    res, _ = run_engine(two_requests(), "sglang")
    # the overlap scheduler also forms a batch one step ahead: t=1..2 A decodes (B, arrived
    # at 0.5, was not there when it was formed), t=2..3 B's prompt alone (A waits), t=3..4
    # both decode their last token
    assert list(res.steps.column("kind")) == ["prefill", "decode", "prefill", "decode"]
    assert times(res) == [(1.0, 4.0), (3.0, 4.0)]


def test_vllm_chunks_a_long_prompt_across_mixed_steps_under_the_budget():
    reqs = [Request(0, 0.0, 2, 4, (1,)), Request(1, 0.5, 13, 1, (2, 3, 4, 5))]
    res, cost = run_engine(reqs, "vllm", budget=8)
    # B (arrived during A's prompt step) from t=2: 7 of its 13 tokens beside A's decode
    # (8 - 1), then the last 6 beside A's next decode
    assert cost.batches[1:3] == [[(0, 7), (3, 1)], [(4, 1), (7, 6)]]
    assert res.states[1].first_token_s == 4.0
    assert sum(s.computed_prompt for s in res.states) == 15
