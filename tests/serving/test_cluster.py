"""Clusters on a fake step cost: routing exactly once, one clock, sessions kept together, PD."""

import json

import numpy as np
import pytest
from test_engine import FakeCost
from typer.testing import CliRunner

from hisim_jax.cli import app
from hisim_jax.serving.cluster import Cluster, KVLink, Replica
from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.kvcache import KVCacheConfig
from hisim_jax.serving.kvstore import KVStore, KVStoreConfig
from hisim_jax.serving.metrics import cluster_request_frame, cluster_summary, request_frame
from hisim_jax.serving.router import POLICIES, Router, RouterConfig
from hisim_jax.serving.scheduler.base import SchedulerConfig
from hisim_jax.serving.workload import Request, chat_sessions

BYTES_PER_TOKEN = 1e5


def make_engine(role="unified", l1=60_000, l2=0, l3=0, **sched):
    cache = KVCacheConfig(
        l1_tokens=l1, bytes_per_token=BYTES_PER_TOKEN, block_tokens=64, l2_tokens=l2,
        l3_tokens=l3, l2_read_bytes_per_s=5e10, l2_write_bytes_per_s=5e10,
        l3_read_bytes_per_s=5e9, l3_write_bytes_per_s=3e9,
    )  # fmt: skip
    cfg = EngineConfig(SchedulerConfig(**sched), cache, 32, 32768, role=role)
    return Engine(cfg, FakeCost())


def replica(role="unified", **kw):
    return Replica(make_engine(role, **kw), "fake", 1, BYTES_PER_TOKEN, 1.0)


def cluster(n=4, policy="round_robin", seed=0, pd=None, link=KVLink(), **kw):
    router = Router(RouterConfig(policy=policy, seed=seed), n, 64)
    if pd is None:
        return Cluster([replica(**kw) for _ in range(n)], router)
    return Cluster(
        [replica("prefill", **kw) for _ in range(n)],
        router,
        [replica("decode", **kw) for _ in range(pd)],
        link,
    )


def chat(n_sessions=80, rate=3.0, seed=0):
    return chat_sessions(n_sessions, rate, think_s_mean=2.0, block_tokens=64, seed=seed).requests


def check_cluster(c, reqs, res):
    """Every request ends exactly once; no engine leaks pages or keeps work."""
    assert len(res.states) == len(reqs)
    assert all(s.finish_s >= 0 for s in res.states)
    n_routed = len(c.replicas)
    assert sum(len(r.states) for r in res.results[:n_routed]) == len(reqs)  # routed once
    assert c.router.routed.sum() == len(reqs)
    assert c.router.outstanding_requests.sum() == 0  # the router heard of every end
    for rep, r in zip(res.replicas, res.results, strict=True):
        eng = rep.engine
        r.cache.check_invariants()
        assert eng.cache.private == 0 and eng.cache.pinned_pages == 0
        assert not eng.busy() and not eng.handoffs
    for s in res.states:
        if not s.rejected:
            assert s.generated == s.req.output_len
            assert s.finish_s >= s.first_token_s >= s.req.arrival_s


def test_one_replica_cluster_equals_the_engine_alone():
    for kw in ({}, {"l1": 8000, "l2": 20_000, "l3": 60_000, "prefetch_policy": "wait_complete"}):
        reqs = chat(120, rate=6.0)
        alone = request_frame(make_engine(**kw).run(reqs))
        c = cluster(1, **kw)
        res = c.run(reqs)
        check_cluster(c, reqs, res)
        both = cluster_request_frame(res).drop(columns=["replica", "session_id", "turn"])
        assert both.equals(alone)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_routes_each_request_once(policy):
    reqs = chat(60, rate=8.0, seed=1)
    c = cluster(4, policy, seed=3)
    res = c.run(reqs)
    check_cluster(c, reqs, res)
    assert {s.replica for s in res.states} <= set(range(4))
    s = cluster_summary(res)
    assert len(s["replicas"]) == 4 and s["cluster"]["replicas"] == 4
    assert sum(r["requests"] for r in s["replicas"]) == len(reqs)


def _shared_prefix_tokens(a, b, block=64):
    n = 0
    for x, y in zip(a.block_ids, b.block_ids, strict=False):
        if x != y:
            break
        n += 1
    return min(n * block, b.input_len)


def test_cache_aware_keeps_sessions_together_and_hits_more():
    reqs = chat(80, rate=2.0, seed=2)
    kept, hit = {}, {}
    for policy in ("cache_aware", "round_robin"):
        res = cluster(4, policy).run(reqs)
        prev, same = {}, []
        for st in sorted(res.states, key=lambda s: (s.req.arrival_s, s.req.request_id)):
            p = prev.get(st.req.session_id)
            # a turn that mostly repeats the previous one (above SGLang's cache threshold)
            if p is not None and _shared_prefix_tokens(p.req, st.req) > 0.35 * st.req.input_len:
                same.append(p.replica == st.replica)
            prev[st.req.session_id] = st
        assert len(same) >= 40
        kept[policy] = np.mean(same)
        hit[policy] = sum(sum(s.hit_tokens) for s in res.states)
    assert kept["cache_aware"] == 1.0  # load stays balanced: such turns follow their session
    assert kept["round_robin"] < 0.5
    assert hit["cache_aware"] > 1.3 * hit["round_robin"]


def test_bucket_routing_respects_bounds():
    reqs = chat(60, rate=8.0, seed=4)
    router = Router(RouterConfig(policy="bucket", bucket_bounds=(1000,)), 4, 64)
    c = Cluster([replica() for _ in range(4)], router)
    res = c.run(reqs)
    check_cluster(c, reqs, res)
    for st in res.states:
        assert st.replica in ((0, 1) if st.req.input_len < 1000 else (2, 3))


def test_same_seed_same_outputs_other_seed_other_routes():
    reqs = chat(60, rate=8.0, seed=5)
    a = cluster_request_frame(cluster(4, "random", seed=7).run(reqs))
    b = cluster_request_frame(cluster(4, "random", seed=7).run(reqs))
    c = cluster_request_frame(cluster(4, "random", seed=8).run(reqs))
    assert a.equals(b)
    assert not a["replica"].equals(c["replica"])


def test_power_of_two_spreads_load_better_than_random():
    # a statistical property: on average over routing seeds, not for every one of them
    reqs = chat(400, rate=20.0, seed=6)
    imb = {"random": 0.0, "power_of_two": 0.0}
    for policy in imb:
        for seed in (1, 2, 3):
            res = cluster(4, policy, seed=seed).run(reqs)
            imb[policy] += cluster_summary(res)["cluster"]["load_imbalance_prompt_tokens"] / 3
    assert imb["power_of_two"] < imb["random"] - 0.02


def test_disaggregated_requests_pay_the_kv_transfer():
    reqs = chat(60, rate=4.0, seed=7)
    fast = cluster(2, "round_robin", pd=2, link=KVLink(1e12, 0.0))
    slow = cluster(2, "round_robin", pd=2, link=KVLink(1e9, 1e-3))
    res_fast, res_slow = fast.run(reqs), slow.run(reqs)
    check_cluster(fast, reqs, res_fast)
    check_cluster(slow, reqs, res_slow)
    frame = cluster_request_frame(res_slow)
    assert set(frame["decode_replica"]) <= {0, 1}
    for st in res_slow.states:
        # the whole prompt's KV crosses the 1 GB/s link after the prefill, then the latency
        transfer_s = st.req.input_len * BYTES_PER_TOKEN / 1e9 + 1e-3
        assert st.first_token_s >= st.prefill_end_s + transfer_s - 1e-9
        assert st.prefill_end_s >= st.req.arrival_s
    ttft = lambda res: np.mean([s.first_token_s - s.req.arrival_s for s in res.states])  # noqa: E731
    assert ttft(res_slow) > ttft(res_fast)
    roles = cluster_summary(res_slow)["replicas"]
    assert [r["role"] for r in roles] == ["prefill", "prefill", "decode", "decode"]
    assert sum(r["requests"] for r in roles[2:]) == len(reqs)  # every request decoded once


def test_cluster_rejects_mismatched_roles():
    router = Router(RouterConfig(policy="round_robin"), 1, 64)
    with pytest.raises(ValueError, match="role"):
        Cluster([replica("prefill")], router)
    with pytest.raises(ValueError, match="role"):
        Cluster([replica()], router, [replica("decode")])


runner = CliRunner()


def test_cli_cluster_and_pd(tmp_path):
    r = runner.invoke(
        app,
        ["simulate", "--limit", "60", "--replicas", "2", "--router", "power_of_two",
         "--out", str(tmp_path / "a"), "--format", "json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["cluster"]["replicas"] == 2 and len(s["replicas"]) == 2
    assert s["requests_completed"] == s["requests_total"] == 60
    r = runner.invoke(
        app, ["simulate", "--limit", "40", "--pd", "1:1", "--out", str(tmp_path / "b")]
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["cluster"]["prefill_replicas"] == 1 and s["cluster"]["decode_replicas"] == 1
    assert "kv_transfer_s" in (tmp_path / "b" / "requests.csv").read_text().splitlines()[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--router", "nearest"], "router policy 'nearest'"),
        (["--pd", "0:2"], "field 'pd'"),
        (["--fleet", "h100-sxm:1"], "field 'fleet'"),
        (["--replicas", "2", "--pd", "1:3"], "--pd 1:3"),
    ],
)
def test_cli_bad_cluster_options_exit_2(tmp_path, args, needle):
    r = runner.invoke(app, ["simulate", "--limit", "5", *args, "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert needle in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------------------
# the shared L3 store


def test_store_lru_evicts_leaves_first_and_books_time():
    s = KVStore(KVStoreConfig(capacity_tokens=300, read_bytes_per_s=1e3, write_bytes_per_s=1e3))
    done = s.write([(1, 100), (2, 100)], 1.0, now=0.0)
    assert done == pytest.approx(0.2)  # 200 tokens x 1 byte at 1 kB/s
    assert s.write([(1, 100), (2, 100)], 1.0, now=5.0) == 5.0  # nothing new: no write
    s.write([(3, 100), (4, 100)], 1.0, now=6.0)  # over capacity: the oldest leaf goes
    assert 1 in s and 2 not in s and 3 in s and 4 in s  # the parent 1 stayed over its leaf 2
    assert s.used_tokens == 300 and s.evicted_tokens == 100
    s.check_invariants()
    assert s.read(500.0, now=0.0) == pytest.approx(0.5)
    assert s.read(500.0, now=0.1) == pytest.approx(1.0)  # FIFO behind the first read
    with pytest.raises(ValueError, match="capacity"):
        KVStoreConfig(capacity_tokens=0)


def test_shared_store_serves_one_replicas_prefix_to_another():
    reqs = chat(80, rate=2.0, seed=2)
    hits = {}
    for shared in (False, True):
        store = KVStore(KVStoreConfig(capacity_tokens=10**7)) if shared else None
        # wait_complete: at this light load a request is scheduled on arrival, before any of
        # its prefetch could land (best_effort would then recompute it, as SGLang does)
        engines = [
            make_engine(l1=60_000, l2=100_000, prefetch_policy="wait_complete") for _ in range(4)
        ]
        if store is not None:
            engines = [
                Engine(e.cfg, FakeCost(), shared_l3=store) for e in engines
            ]  # same config, one store
        router = Router(RouterConfig(policy="round_robin"), 4, 64)
        c = Cluster([Replica(e, "fake", 1, BYTES_PER_TOKEN, 1.0) for e in engines], router)
        res = c.run(reqs)
        check_cluster(c, reqs, res)
        hits[shared] = sum(s.hit_tokens[0] + s.hit_tokens[1] + s.hit_tokens[2] for s in res.states)
        if store is not None:
            store.check_invariants()
            assert store.bytes_read > 0 and store.bytes_written > 0
            assert sum(s.hit_tokens[1] + s.hit_tokens[2] for s in res.states) > 0
            assert cluster_summary(res)["cluster"]["shared_l3"]["used_tokens"] > 0
    # round-robin scatters sessions; the store lets a turn reuse its previous turn's KV
    assert hits[True] > 1.5 * hits[False]


def test_cli_shared_store(tmp_path):
    r = runner.invoke(
        app,
        ["simulate", "--limit", "60", "--replicas", "2", "--router", "round_robin",
         "--l2-gb", "8", "--l3-shared-gb", "100", "--out", str(tmp_path)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["cluster"]["shared_l3"]["capacity_tokens"] > 0
    r = runner.invoke(
        app, ["simulate", "--limit", "5", "--l3-gb", "10", "--l3-shared-gb", "10",
              "--out", str(tmp_path)],
    )  # fmt: skip
    assert r.exit_code == 2 and "not both" in r.output


def test_cli_mixed_fleet_of_gpus_and_tp(tmp_path):
    r = runner.invoke(
        app,
        ["simulate", "--limit", "40", "--fleet", "h100-sxm:1x1,h200-sxm:2x1",
         "--router", "least_loaded", "--out", str(tmp_path)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [(x["name"], x["gpus"]) for x in s["replicas"]] == [
        ("h100-sxm/tp1", 1),
        ("h200-sxm/tp2", 2),
    ]
    assert s["cluster"]["gpus"] == 3
    assert all(x["requests"] > 0 for x in s["replicas"])


def test_decode_replicas_count_only_their_own_prefix_lookups():
    # a decode replica that recomputes a preempted request counts that lookup itself; it never
    # takes back the count the prefill replica made (its counters stay non-negative)
    for mode in ("recompute", "swap"):
        c = cluster(2, "round_robin", pd=1, l1=6_000, l2=50_000, preemption=mode,
                    new_token_ratio=0.1)  # fmt: skip
        reqs = chat(80, rate=6.0)
        res = c.run(reqs)
        check_cluster(c, reqs, res)
        assert sum(r.preemptions for r in res.results) > 0
        for rec in cluster_summary(res)["replicas"]:
            cache = rec["cache"]
            assert min(cache["l1_hit_tokens"], cache["l2_hit_tokens"], cache["miss_tokens"]) >= 0
            assert 0 <= cache["hit_rate"] <= 1


def _small_engine(role, l1, page, block):
    cache = KVCacheConfig(
        l1_tokens=l1, bytes_per_token=BYTES_PER_TOKEN, block_tokens=block, page_size=page
    )
    return Engine(EngineConfig(SchedulerConfig(), cache, 32, 32768, role=role), FakeCost())


def _pd(l1=14, page=7, block=4, link=KVLink()):
    prefill = Replica(_small_engine("prefill", l1, page, block), "p", 1, BYTES_PER_TOKEN, 1.0)
    decode = Replica(_small_engine("decode", l1, page, block), "d", 1, BYTES_PER_TOKEN, 1.0)
    return Cluster([prefill], Router(RouterConfig("round_robin"), 1, block), [decode], link)


def test_drain_ends_when_a_prefill_replica_can_never_admit_its_request(ends_within):
    # pages of 7 on 4-token blocks: the cached 8 tokens of request 0 hold 14 pages, and
    # request 1 would need them pinned beside the 7 pages of its 5 new tokens: never in a
    # 14-token L1, though the request alone fits. The drain rounds after the last arrival
    # used to go on forever (each round the stuck replica jumped to its end, still busy)
    reqs = [Request(0, 0.0, 8, 1, (1, 2)), Request(1, 1.0, 12, 1, (1, 2, 3))]
    c = _pd()
    with ends_within(20):
        res = c.run(reqs)
    assert all(s.finish_s >= 0 for s in res.states)
    assert not res.states[0].rejected
    assert "does not fit" in res.states[1].rejected
    assert not any(r.engine.busy() for r in c.replicas + c.decode)


def test_kv_that_never_lands_is_rejected_with_a_reason():
    reqs = chat(10, rate=5.0)
    c = cluster(1, pd=1, link=KVLink(bandwidth_bytes_per_s=1e-300))  # bytes / 1e-300 = inf
    res = c.run(reqs)
    assert all(s.finish_s >= 0 and s.rejected for s in res.states)
    assert all("never reaches a decode replica" in s.rejected for s in res.states)
    assert c.router.outstanding_requests.sum() == 0
    assert c.decode_router.routed.sum() == 0
    for rep in c.replicas + c.decode:
        rep.engine.cache.check_invariants()
        assert not rep.engine.busy() and rep.engine.cache.private == 0
    frame = cluster_request_frame(res)
    assert frame["kv_transfer_s"].isna().all() and (frame["decode_replica"] == -1).all()


@pytest.mark.parametrize("pd", [None, 1])
def test_a_request_that_never_arrives_is_rejected_and_routed_nowhere(pd):
    reqs = list(chat(10, rate=5.0))
    reqs[3] = Request(3, float("inf"), 100, 5, ())
    c = cluster(2, pd=pd)
    counted = []
    res = c.run(reqs, progress=counted.append)
    assert sum(counted) == len(reqs)
    assert all(s.finish_s >= 0 for s in res.states)
    lost = res.states[3]
    assert lost.replica == -1 and lost.rejected.startswith("never arrives")
    assert lost.finish_s == res.simulated_s < float("inf")
    assert all(not s.rejected for i, s in enumerate(res.states) if i != 3)
    assert sum(len(r.states) for r in res.results[: len(c.replicas)]) == len(reqs) - 1
    assert c.router.routed.sum() == len(reqs) - 1
    summary = cluster_summary(res)
    assert json.dumps(summary, allow_nan=False)  # no Infinity from the lost request
