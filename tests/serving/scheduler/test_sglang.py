"""SGLang's batch-forming rules against hand-worked cases, through a fake engine view: the
policy decides only through queues and KV admission, so no cache or clock is needed."""

from collections import deque
from dataclasses import dataclass, field

from hisim_jax.serving.scheduler.base import ReqState, SchedulerConfig
from hisim_jax.serving.scheduler.sglang import SGLangPolicy


@dataclass(frozen=True)
class Req:
    request_id: int
    input_len: int
    output_len: int
    block_ids: tuple = ()


@dataclass
class Hit:
    total_tokens: int = 0
    unpinned_l1_pages: int = 0
    lower_pages: int = 0


@dataclass
class FakeView:
    """KV as a plain token count; a prefix hit of ``cached[request_id]`` tokens."""

    free: int
    cached: dict = field(default_factory=dict)
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    swapped: deque = field(default_factory=deque)
    chunked: ReqState | None = None
    reserved: float = 0.0
    decode_slots: int = 1  # KV per running request in a decode step (more when speculating)

    def pages(self, tokens):
        return tokens

    def l1_available(self):
        return self.free

    def reserved_decode(self):
        return self.reserved

    def clipped_left(self, st):
        return min(st.req.output_len - st.generated, 4096)

    def cached_prefix_tokens(self, st):
        return self.cached.get(st.req.request_id, 0)

    def match_prefix(self, st, now):
        return Hit(self.cached_prefix_tokens(st)), st.req.input_len

    def start_prefill(self, st, hit, prompt, chunk, now):
        if chunk > self.free:
            return False
        self.free -= chunk
        st.target, st.cached, st.computed = prompt, hit.total_tokens, hit.total_tokens
        return True

    def continue_prefill(self, st, chunk, now):
        if chunk > self.free:
            return False
        self.free -= chunk
        return True

    def swap_in(self, now):
        pass


def states(*lens, output=100):
    return [ReqState(Req(i, n, output)) for i, n in enumerate(lens)]


def ids(batch):
    return [(st.req.request_id, chunk) for st, chunk in batch]


def test_prefill_budget_chunks_the_request_that_crosses_it():
    cfg = SchedulerConfig(max_prefill_tokens=1000, chunked_prefill_size=600, new_token_ratio=0.0)
    view = FakeView(free=10**6, waiting=deque(states(300, 500, 800, 100)))
    pol = SGLangPolicy(cfg)
    batch = pol.prefill_batch(view, 0.0)
    # 300 fits, 500 fits (800 used), 800 gets the last 200 as a chunk and is continued later
    assert ids(batch) == [(0, 300), (1, 500), (2, 200)]
    assert view.chunked is batch[2][0]
    assert [s.req.request_id for s in view.waiting] == [3]
    # the next batch continues the chunked prompt (its last 600 tokens) and takes no one else
    # while it is still the chunked request (the engine clears that when its prompt is done)
    batch[2][0].computed += 200
    assert ids(pol.prefill_batch(view, 0.0)) == [(2, 600)]


def test_fcfs_head_that_does_not_fit_blocks_the_queue():
    cfg = SchedulerConfig(new_token_ratio=0.5)
    view = FakeView(free=1000, waiting=deque(states(200, 900, 10, output=100)))
    batch = SGLangPolicy(cfg).prefill_batch(view, 0.0)
    # 200 + 0.5 x 100 reserved fits; 900 + 50 does not fit the 750 left: nothing behind it runs
    assert ids(batch) == [(0, 200)]
    assert [s.req.request_id for s in view.waiting] == [1, 2]


def test_lpm_admits_longest_cached_prefix_first():
    cfg = SchedulerConfig(schedule_policy="lpm", new_token_ratio=0.0)
    view = FakeView(free=10**6, waiting=deque(states(100, 100, 100)), cached={1: 64, 2: 96})
    batch = SGLangPolicy(cfg).prefill_batch(view, 0.0)
    assert [st.req.request_id for st, _ in batch] == [2, 1, 0]
    assert [c for _, c in batch] == [4, 36, 100]  # only the uncached tokens are computed


def test_max_running_requests_caps_admission():
    cfg = SchedulerConfig(max_running_requests=3, new_token_ratio=0.0)
    view = FakeView(free=10**6, waiting=deque(states(10, 10, 10, 10)))
    view.running = states(5)  # one already decoding
    assert len(SGLangPolicy(cfg).prefill_batch(view, 0.0)) == 2


def test_retraction_order_and_reestimated_ratio():
    pol = SGLangPolicy(SchedulerConfig())
    a, b, c = states(100, 300, 200, output=1000)
    a.generated, b.generated, c.generated = 50, 10, 10
    # fewest output tokens first, then the longest input
    assert pol.retract_order([a, b, c]) == [b, c, a]
    pol.after_retract([a])
    assert pol.new_token_ratio == (50 + 20) / 1000
    pol.after_retract([])
    assert pol.new_token_ratio == 1.0


def test_reservation_decays_to_its_floor():
    cfg = SchedulerConfig(new_token_ratio=0.7, min_new_token_ratio=0.1, new_token_ratio_decay=0.01)
    pol = SGLangPolicy(cfg)
    assert pol.reserve_tokens(100) == 70.0
    pol.after_decode(10)
    assert abs(pol.new_token_ratio - 0.6) < 1e-12
    pol.after_decode(1000)
    assert pol.new_token_ratio == 0.1
    assert SGLangPolicy(cfg, prefill_only=True).prefill_only
