"""Token accounting that adds up: every prefill token a step computed belongs to one request's
row, and the hit rate counts reuse across requests only (never above an infinite cache)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hisim_jax.simulation import SimulationOptions, run


def infinite_cache_hit_rate(work) -> float:
    """The best any cache can do: every distinct prefix block is computed once, at its
    shortest length among the requests that hold it."""
    bt = work.block_tokens
    shortest: dict[tuple, int] = {}
    total = 0
    for r in work.requests:
        total += r.input_len
        key: tuple = ()
        for k, b in enumerate(r.block_ids):
            n = min(bt, r.input_len - k * bt)
            if n <= 0:
                break
            key += (b,)
            shortest[key] = min(shortest.get(key, n), n)
    return 1 - sum(shortest.values()) / total


def check_accounting(result) -> None:
    req, steps = result.requests, result.steps
    prefill = int(steps.loc[steps["kind"] == "prefill", "new_tokens"].sum())
    # a mixed step (vLLM) computes its running requests' decodes beside the prompt chunks
    mixed = steps[steps["kind"] == "mixed"]
    prefill += int((mixed["new_tokens"] - mixed["running"]).sum())
    rows = int((req["computed_prompt_tokens"] + req["recomputed_tokens"]).sum())
    assert rows == prefill
    assert (req["computed_prompt_tokens"] >= 0).all() and (req["recomputed_tokens"] >= 0).all()
    ok = req["rejected"] == ""
    # a completed request's first prefill covers its whole prompt, from cache or computed
    hits = req[["l1_hit_tokens", "l2_hit_tokens", "l3_hit_tokens"]].sum(axis=1)
    assert (hits + req["computed_prompt_tokens"])[ok].eq(req["input_len"][ok]).all()
    assert (req["recomputed_tokens"][req["preemptions"] == 0] == 0).all()
    cache = result.summary["cache"]
    for tier in ("l1", "l2", "l3"):
        assert cache[f"{tier}_hit_tokens"] == int(req[f"{tier}_hit_tokens"].sum())
    assert cache["rehit_tokens"] == int(req["rehit_tokens"].sum())
    assert cache["hit_rate"] <= infinite_cache_hit_rate(result.workload) + 1e-12


def test_preempting_replica_rows_add_up_to_its_steps():
    # a small L1 (Llama-3.1-8B's 16 GB of weights in 17.6 GB) forces recompute preemptions
    r = run(SimulationOptions.checked({"limit": 300, "l1_fraction": 0.22}))
    assert r.summary["preemptions"] > 0
    check_accounting(r)
    req = r.requests
    assert req["recomputed_tokens"].sum() > 0
    assert r.summary["cache"]["rehit_tokens"] > 0  # re-prefills hit their own prompt


CONFIGS = st.fixed_dictionaries(
    {
        "limit": st.integers(20, 160),
        "seed": st.integers(0, 3),
        "l1_fraction": st.sampled_from([0.215, 0.22, 0.25, 0.88]),
        "l2_gb": st.sampled_from([0.0, 2.0, 64.0]),
        "preemption": st.sampled_from(["recompute", "swap"]),
        "page_size": st.sampled_from([1, 16, 64]),
        "schedule_policy": st.sampled_from(["fcfs", "lpm"]),
        "engine": st.sampled_from(["sglang", "vllm"]),
        "cluster": st.sampled_from(
            [
                {},
                {"replicas": 2},
                {"pd": "1:1"},
                {"pd": "1:2"},
                {"replicas": 2, "l3_shared_gb": 20.0},
                {"l3_gb": 20.0},
            ]
        ),  # fmt: skip
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
def test_rows_add_up_to_steps_on_random_configurations(cfg):
    cfg = dict(cfg)
    cluster = cfg.pop("cluster")
    if cfg["l2_gb"] == 0 and ("l3_gb" in cluster or "l3_shared_gb" in cluster):
        cfg["l2_gb"] = 2.0  # SSD tiers are fed through host DRAM
    cfg.update(cluster)
    if cfg["engine"] == "vllm":  # its own memory knob (plus the activation reserve); FCFS,
        # recompute only
        cfg["gpu_memory_utilization"] = cfg.pop("l1_fraction") + 0.02
        cfg.update(schedule_policy="fcfs", preemption="recompute")
    check_accounting(run(SimulationOptions.checked(cfg)))


def test_summary_is_the_sum_of_rows_on_the_default_run():
    r = run(SimulationOptions.checked({}))
    check_accounting(r)
    json.dumps(r.summary, allow_nan=False, default=float)
