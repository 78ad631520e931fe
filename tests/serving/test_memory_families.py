"""A replica's memory for the new model families: the three cache terms (growing KV, windowed
KV, recurrent state), attention data parallelism, the hybrid state grid, and whole runs of
the issue's two deployments on the default workload."""

from __future__ import annotations

import math

import pytest

from hisim_jax.serving import memory
from hisim_jax.serving.memory import (
    STATE_MEMORY_SHARE,
    SWA_FULL_TOKENS_RATIO,
    size_replica,
    state_grid,
)
from hisim_jax.simulation import SimulationOptions
from hisim_jax.simulation import run as simulate
from hisim_jax.specs import load_hardware, load_model

H100 = load_hardware("h100-sxm")
H200 = load_hardware("h200-sxm")


def test_states_take_slots_and_tokens_the_rest():
    m = load_model("qwen3.5-35b-a3b")
    s = size_replica(m, H100, 1, None, 2.0, 0.88, max_requests=1024)
    free = H100.engine_memory_bytes * 0.88 - m.weight_bytes()
    assert s.request_bytes == m.state_bytes_per_request()
    # the Mamba-pool share caps the slots below the scheduler's 1024
    assert s.max_requests == int(STATE_MEMORY_SHARE * free // s.request_bytes) < 1024
    used = s.l1_tokens * s.kv_bytes_per_token + s.max_requests * s.request_bytes
    assert free - s.kv_bytes_per_token < used <= free


def test_a_small_running_cap_leaves_the_memory_to_tokens():
    m = load_model("qwen3.5-35b-a3b")
    many = size_replica(m, H100, 1, None, 2.0, 0.88, max_requests=1024)
    few = size_replica(m, H100, 1, None, 2.0, 0.88, max_requests=8)
    assert few.max_requests == 8 and few.l1_tokens > many.l1_tokens


def test_models_without_states_have_no_slot_cap():
    s = size_replica(load_model("llama-3.1-8b"), H100, 1, None, 2.0, 0.88, max_requests=64)
    assert s.max_requests is None and s.request_bytes == 0


def test_windowed_layers_cost_the_swa_pool_share_per_token():
    m = load_model("gemma-4-26b-a4b")
    s = size_replica(m, H100, 1, None, 2.0, 0.88)
    want = m.kv_bytes_per_token() + SWA_FULL_TOKENS_RATIO * m.windowed_bytes_per_token()
    assert s.kv_bytes_per_token == want
    # Mistral: every layer slides, its window bytes are a token's (as before windows counted)
    mistral = size_replica(load_model("mistral-7b"), H100, 1, 2.0, 2.0, 0.88)
    assert mistral.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_checkpoint_formats_size_the_weights():
    ds = load_model("deepseek-v3")
    fp8 = size_replica(ds, H200, 8, None, 2.0, 0.88)
    assert fp8.weight_bytes == pytest.approx(ds.weight_bytes() / 8)
    with pytest.raises(ValueError, match="no room for KV"):  # bf16 does not fit 8 x H200
        size_replica(ds, H200, 8, "bf16", 2.0, 0.88)
    go = size_replica(load_model("gpt-oss-120b"), H100, 1, None, 2.0, 0.88)
    assert go.weight_bytes < 70e9 and go.l1_tokens > 100_000


def test_attention_data_parallelism_replicates_mixers_and_multiplies_kv_ranks():
    ds = load_model("deepseek-v3")
    tp = size_replica(ds, H200, 8, None, 2.0, 0.88)
    dp = size_replica(ds, H200, 8, None, 2.0, 0.88, dp=8)
    attention = ds.param_counts()["attention"] * 1.0  # fp8
    assert dp.weight_bytes - tp.weight_bytes == pytest.approx(attention * 7 / 8, rel=1e-3)
    # MLA's latent is one copy per token on every rank: dp ranks hold dp x the tokens
    assert dp.kv_bytes_per_token == tp.kv_bytes_per_token == 70_272
    per_rank = dp.l1_tokens / 8
    assert per_rank == int(per_rank) and 4 * tp.l1_tokens < dp.l1_tokens < 8 * tp.l1_tokens


def test_state_grid_per_engine():
    q = load_model("qwen3.5-35b-a3b")
    assert state_grid(q, "sglang", 1) == 64 and state_grid(q, "sglang", 48) == math.lcm(64, 48)
    grid = state_grid(q, "vllm", 16)
    per_layer_state = q.state_bytes_per_request() / q.layers("gdn")
    per_layer_token = q.kv_bytes_per_token() / q.layers("full")
    # vLLM's hybrid block: a multiple of 16 whose KV per layer covers a layer's state
    assert grid % memory.VLLM_KERNEL_BLOCK == 0
    assert grid * per_layer_token >= per_layer_state > (grid - 16) * per_layer_token
    assert state_grid(load_model("llama-3.1-8b"), "vllm", 16) is None


def test_hybrid_run_caps_running_requests_and_saves_states():
    o = SimulationOptions(model="qwen3.5-35b-a3b", limit=120)
    res = simulate(o)
    rep = res.summary["replica"]
    assert rep["scheduler"]["max_running_requests"] < 1024
    assert res.summary["requests_completed"] == 120
    # a state only lets a prefix resume where it was saved: fewer hits than the dense rule
    dense = simulate(SimulationOptions(model="qwen3-30b-a3b", limit=120))
    assert res.summary["cache"]["hit_rate"] <= dense.summary["cache"]["hit_rate"] + 1e-9


@pytest.mark.parametrize(
    "options",
    [
        dict(model="deepseek-v3", hardware="h200-sxm", tp=8),
        dict(model="gpt-oss-120b", hardware="h100-sxm"),
    ],
    ids=["deepseek-v3-h200-tp8", "gpt-oss-120b-h100"],
)
def test_issue_deployments_run_end_to_end_on_the_default_workload(options):
    res = simulate(SimulationOptions(**options))
    s = res.summary
    assert s["requests_total"] > 1000 and s["requests_completed"] == s["requests_total"]
    tpot = res.summary["tpot_s"]["mean"]
    assert 0.005 < tpot < 0.2


def test_expert_and_attention_parallel_run():
    res = simulate(
        SimulationOptions(
            model="deepseek-v3", hardware="h200-sxm", tp=8, ep=8, dp_attention=8, limit=150
        )
    )
    assert res.summary["options"]["ep"] == 8
    with pytest.raises(ValueError, match="dp_attention"):
        SimulationOptions(dp_attention=0)


def test_a_speculative_draft_takes_weights_and_kv():
    from hisim_jax.specs import draft_model

    ds = load_model("deepseek-v3")
    plain = size_replica(ds, H200, 8, None, 2.0, 0.88)
    mtp = size_replica(ds, H200, 8, None, 2.0, 0.88, draft=draft_model(ds))
    # DeepSeek's MTP layer is one MLA + MoE layer: ~11.7 GB in fp8, 1/8 per rank
    assert 1.2e9 < mtp.weight_bytes - plain.weight_bytes < 1.7e9
    assert mtp.kv_bytes_per_token == plain.kv_bytes_per_token + 576 * 2
    assert mtp.l1_tokens < plain.l1_tokens
