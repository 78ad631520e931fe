"""`hisim validate cache`: the KV cache replay against an independent brute-force LRU."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hisim_jax.cli import app
from hisim_jax.serving.kvcache import KVCacheConfig
from hisim_jax.serving.workload import Request, write_jsonl
from hisim_jax.serving.workload import Workload as WL
from hisim_jax.validate.cache import replay_cache
from tests.serving.test_kvcache import BT, RefLRU

MOONCAKE = (
    Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 3), min_size=1, max_size=6).map(tuple), min_size=1, max_size=50
    ),
    st.integers(2, 12),
)
def test_l1_replay_matches_brute_force_lru(prompts, capacity_blocks):
    cap = (capacity_blocks + 6) * BT
    reqs = [Request(i, float(i), len(ids) * BT, 1, ids) for i, ids in enumerate(prompts)]
    got = replay_cache(reqs, KVCacheConfig(l1_tokens=cap, bytes_per_token=1.0, block_tokens=BT))
    ref = RefLRU(cap)
    expected = sum(ref.serve(r.block_ids, r.input_len, r.arrival_s) for r in reqs)
    assert got["l1_hit_tokens"] == expected
    assert got["l1_hit_tokens"] + got["miss_tokens"] == sum(r.input_len for r in reqs)


def test_lower_tiers_catch_what_l1_evicts():
    reqs = [
        Request(i, float(i), 4 * BT, 1, (i % 5, 10 + i % 5, 20 + i % 5, 30 + i % 5))
        for i in range(40)
    ]
    small = replay_cache(
        reqs, KVCacheConfig(l1_tokens=8 * BT, bytes_per_token=1.0, block_tokens=BT)
    )
    tiered = replay_cache(
        reqs,
        KVCacheConfig(l1_tokens=8 * BT, l2_tokens=40 * BT, bytes_per_token=1.0, block_tokens=BT),
    )
    assert small["hit_rate"] == 0.0  # 5 rotating prompts of 4 blocks never fit in 8 blocks
    assert tiered["l2_hit_tokens"] > 0 and tiered["hit_rate"] > 0.5
    # every L2 hit was loaded into L1 (1 byte per token here); whole blocks move
    assert tiered["prefetch_bytes"]["l2_to_l1"] >= tiered["l2_hit_tokens"]
    assert tiered["evicted_tokens"]["l1"] > 0


@pytest.mark.skipif(not MOONCAKE.is_file(), reason="shared traces not present")
def test_infinite_cache_reaches_the_trace_reuse_ratio():
    r = CliRunner().invoke(
        app,
        ["validate", "cache", "--trace", str(MOONCAKE), "--l1-tokens", "1000000000",
         "--limit", "3000", "--format", "json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    # token-level hits of an unbounded cache sit at the block-level reuse ratio of the prefix
    from hisim_jax.serving.workload import load_trace, prefix_reuse_ratio

    w = load_trace(MOONCAKE, "mooncake", limit=3000)
    assert rep["hit_rate"] == pytest.approx(prefix_reuse_ratio(w.requests), abs=0.02)
    assert rep["evicted_tokens"]["l1"] == 0


def test_validate_cache_cli_on_generic_jsonl(tmp_path):
    reqs = tuple(Request(i, float(i), 3 * BT, 2, (1, 2, 3 + i % 2)) for i in range(6))
    p = tmp_path / "t.jsonl"
    write_jsonl(WL(reqs, BT, "test"), p)
    r = CliRunner().invoke(
        app,
        ["validate", "cache", "--trace", str(p), "--trace-format", "jsonl", "--l1-tokens", "64",
         "--block-tokens", str(BT), "--format", "json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["requests"] == 6 and rep["l1_hit_tokens"] > 0


def test_validate_scheduler_on_its_own_log_and_a_perturbed_one(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["simulate", "--limit", "60", "--out", str(out)])
    assert r.exit_code == 0, r.output
    same = runner.invoke(
        app,
        [
            "validate",
            "scheduler",
            "--log",
            str(out / "steps.csv"),
            "--limit",
            "60",
            "--format",
            "json",
        ],
    )
    assert same.exit_code == 0, same.output
    rep = json.loads(same.stdout)
    assert rep["requests_compared"] == 60 and rep["order_pairs_agreeing"] == 1.0
    assert rep["queue_abs_diff_s"]["max"] < 1e-6

    import pandas as pd

    log = pd.read_csv(out / "steps.csv", dtype={"request_ids": str}, keep_default_na=False)
    pre = log.index[log["kind"] == "prefill"]
    # a log in which the engine served the second and third prefills the other way round
    a, b = pre[1], pre[2]
    log.loc[a, "request_ids"], log.loc[b, "request_ids"] = (
        log.loc[b, "request_ids"],
        log.loc[a, "request_ids"],
    )
    log.loc[pre[5:], "start_s"] += 0.5  # and everything after it half a second later
    log.to_csv(tmp_path / "perturbed.csv", index=False)
    r = runner.invoke(
        app,
        [
            "validate",
            "scheduler",
            "--log",
            str(tmp_path / "perturbed.csv"),
            "--limit",
            "60",
            "--format",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["order_pairs_agreeing"] < 1.0
    assert rep["queue_abs_diff_s"]["max"] == pytest.approx(0.5, abs=0.05)

    (tmp_path / "bad.csv").write_text("start_s,kind\n0,prefill\n")
    r = runner.invoke(
        app, ["validate", "scheduler", "--log", str(tmp_path / "bad.csv"), "--limit", "5"]
    )
    assert r.exit_code == 2 and "request_ids" in r.stderr


def test_a_vllm_step_log_with_mixed_steps_is_read_and_compared(tmp_path):
    from hisim_jax.validate.scheduler import first_scheduled, read_step_log

    out = tmp_path / "o"
    r = CliRunner().invoke(
        app, ["simulate", "--engine", "vllm", "--limit", "30", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    log = read_step_log(out / "steps.csv")
    assert "mixed" in set(log["kind"])
    # every request's prompt is scheduled in a prefill or a mixed step
    assert len(first_scheduled(log)) == 30
