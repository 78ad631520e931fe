"""Capacity and progress under any configuration: no KV tier is ever above its capacity, after
any step of any replica, whatever the page and block sizes, tier sizes, write and preemption
policies, prefetch policy, PD split, replica count or shared store; and every run ends, each
request completed or rejected with a reason."""

from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import FakeCost

from hisim_jax.serving.cluster import Cluster, KVLink, Replica
from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.kvcache import KVCacheConfig
from hisim_jax.serving.kvstore import KVStore, KVStoreConfig
from hisim_jax.serving.metrics import cluster_request_frame, request_frame
from hisim_jax.serving.router import Router, RouterConfig
from hisim_jax.serving.scheduler.base import SchedulerConfig
from hisim_jax.serving.workload import LengthDist, Request, chat_sessions

BYTES_PER_TOKEN = 1e5


def check_capacity(eng: Engine) -> None:
    """Every tier of the replica within its capacity, its books consistent; the shared
    store too."""
    c = eng.cache
    c.check_invariants()
    held = [c.used[0] + c.private, c.used[1] + c.l2_private, c.used[2]]
    for tier in range(3):
        assert 0 <= held[tier] <= c.capacity[tier], (tier, held, c.capacity)
    assert 0 <= c.pinned_pages <= c.used[0]
    if c.shared is not None:
        c.shared.check_invariants()
        assert c.shared.used_tokens <= c.shared.cfg.capacity_tokens


def watch(eng: Engine, seen: list) -> None:
    """Check the replica's capacity after each of its steps (prefill or decode stretch)."""
    prefill, decode = eng._run_prefill, eng._decode_stretch

    def checked_prefill(batch, now):
        end = prefill(batch, now)
        check_capacity(eng)
        seen.append(1)
        return end

    def checked_decode(now, next_event):
        end = decode(now, next_event)
        check_capacity(eng)
        seen.append(1)
        return end

    eng._run_prefill = checked_prefill
    eng._decode_stretch = checked_decode


configs = st.fixed_dictionaries(
    {
        "page": st.sampled_from([1, 3, 16, 64, 128]),
        "block": st.sampled_from([4, 16, 64]),
        "l1": st.sampled_from([1_500, 3_000, 8_000]),
        "l2": st.sampled_from([0, 0, 2_000, 50_000]),
        "l3": st.sampled_from([0, 3_000, 100_000]),
        "shared": st.sampled_from([0, 0, 2_000, 100_000]),
        "write_policy": st.sampled_from(["write_through", "write_back"]),
        "eviction": st.sampled_from(["lru", "lfu"]),
        "preemption": st.sampled_from(["recompute", "swap"]),
        "prefetch": st.sampled_from(["best_effort", "wait_complete", "timeout"]),
        "schedule": st.sampled_from(["fcfs", "lpm"]),
        "chunk": st.sampled_from([256, 8192]),
        "max_running": st.sampled_from([4, 1024]),
        "split": st.sampled_from([(1, 0), (2, 0), (3, 0), (1, 1), (1, 2), (2, 1)]),
        "sessions": st.integers(3, 16),
        "rate": st.sampled_from([2.0, 20.0]),
        "seed": st.integers(0, 2**16),
        "engine": st.sampled_from(["sglang", "vllm"]),
    }
)


def build(cfg: dict):
    """A cluster of the configuration, every replica watched; a valid configuration only
    (as ``hisim simulate`` checks: one L3 kind, and write-back needs an L2 to pass through)."""
    l3 = 0 if cfg["shared"] else cfg["l3"]
    l2 = cfg["l2"]
    if cfg["write_policy"] == "write_back" and (l3 or cfg["shared"]) and not l2:
        l2 = 2_000
    store = KVStore(KVStoreConfig(cfg["shared"], 5e9, 5e9)) if cfg["shared"] else None
    vllm = cfg["engine"] == "vllm"  # vLLM: FCFS and recompute only; its budget is the chunk
    sched = SchedulerConfig(
        chunked_prefill_size=cfg["chunk"],
        max_prefill_tokens=cfg["chunk"] if vllm else 16384,
        max_running_requests=cfg["max_running"],
        schedule_policy="fcfs" if vllm else cfg["schedule"],
        preemption="recompute" if vllm else cfg["preemption"],
        prefetch_policy=cfg["prefetch"],
    )
    cache = KVCacheConfig(
        l1_tokens=cfg["l1"], bytes_per_token=BYTES_PER_TOKEN, block_tokens=cfg["block"],
        page_size=cfg["page"], l2_tokens=l2, l3_tokens=l3, l2_read_bytes_per_s=5e10,
        l2_write_bytes_per_s=5e10, l3_read_bytes_per_s=5e9, l3_write_bytes_per_s=3e9,
        eviction=cfg["eviction"], write_policy=cfg["write_policy"],
    )  # fmt: skip
    n_prefill, n_decode = cfg["split"]
    seen: list = []

    def replica(role):
        eng = Engine(
            EngineConfig(
                sched, cache, num_layers=32, max_context=32768, role=role, policy=cfg["engine"]
            ),
            FakeCost(),
            store if role != "decode" else None,
        )
        watch(eng, seen)
        return Replica(eng, "fake", 1, BYTES_PER_TOKEN, 1.0)

    routed_role = "prefill" if n_decode else "unified"
    routed = [replica(routed_role) for _ in range(n_prefill)]
    decode = [replica("decode") for _ in range(n_decode)]
    router = Router(RouterConfig("cache_aware", seed=cfg["seed"]), n_prefill, cfg["block"])
    return Cluster(routed, router, decode, KVLink()), seen


def workload(cfg: dict):
    return chat_sessions(
        cfg["sessions"],
        cfg["rate"],
        turns=LengthDist.uniform(1, 5),
        first_input=LengthDist.lognormal(500, 0.8, clip_max=4_000),
        turn_input=LengthDist.lognormal(100, 0.8, clip_max=1_000),
        output=LengthDist.lognormal(200, 0.8, clip_max=1_000),
        think_s_mean=1.0,
        system_prompt_len=cfg["block"] * 3,
        block_tokens=cfg["block"],
        seed=cfg["seed"],
    ).requests


@settings(max_examples=120, deadline=None)
@given(configs)
def test_no_tier_over_capacity_and_every_run_ends(ends_within, cfg):
    cluster, seen = build(cfg)
    reqs = workload(cfg)
    with ends_within(60):
        res = cluster.run(reqs)
    assert seen or not reqs
    assert len(res.states) == len(reqs)
    for s in res.states:
        assert s.finish_s >= 0  # ended: completed, or rejected with its reason
        if not s.rejected:
            assert s.generated == s.req.output_len
            assert s.finish_s >= s.first_token_s >= s.req.arrival_s
    for rep in cluster.replicas + cluster.decode:
        eng = rep.engine
        check_capacity(eng)
        assert not eng.busy() and not eng.handoffs
        assert eng.cache.private == 0 and eng.cache.pinned_pages == 0
        assert eng.cache.l2_private == 0
    assert cluster.router.outstanding_requests.sum() == 0


def _engine(role="unified", l1=21, page=7, block=4):
    cache = KVCacheConfig(
        l1_tokens=l1, bytes_per_token=BYTES_PER_TOKEN, block_tokens=block, page_size=page
    )
    return Engine(EngineConfig(SchedulerConfig(), cache, 32, 32768, role=role), FakeCost())


def test_a_request_that_can_never_start_ends_at_once_and_stalls_nothing(ends_within):
    # pages of 7 on 4-token blocks: request 1 needs the 14 cached pages of request 0's blocks
    # pinned beside 7 pages for its 5 new tokens and its decode reservation: never in 21
    # tokens, though the request alone fits. It used to wait, the replica frozen, until the
    # last arrival of the workload; the requests behind it waited with it
    reqs = [Request(0, 0.0, 8, 1, (1, 2)), Request(1, 1.0, 12, 1, (1, 2, 3))]
    reqs += [Request(i, 1.0 + i, 4, 2, (100 + i,)) for i in range(2, 8)]
    with ends_within(20):
        alone = _engine().run(reqs)
        c = Cluster(
            [Replica(_engine(), "u", 1, BYTES_PER_TOKEN, 1.0)], Router(RouterConfig(), 1, 4)
        )
        res = c.run(reqs)
    for states in (alone.states, res.states):
        assert "does not fit" in states[1].rejected and states[1].finish_s == 1.0
        for s in states[2:]:
            assert not s.rejected and s.first_token_s - s.req.arrival_s < 0.01  # served at once
    cluster = cluster_request_frame(res).drop(columns=["replica", "session_id", "turn"])
    assert request_frame(alone).equals(cluster)


def test_an_engine_alone_rejects_a_request_that_never_arrives(ends_within):
    reqs = [Request(0, 0.0, 8, 2, (1, 2)), Request(1, float("inf"), 8, 2, (3, 4))]
    with ends_within(20):
        res = _engine(l1=100, page=1).run(reqs)
    assert not res.states[0].rejected
    assert res.states[1].rejected.startswith("never arrives") and res.states[1].finish_s >= 0
    assert res.simulated_s < float("inf")
