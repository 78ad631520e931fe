"""Current model families from their published config.json files: layer groups, KV and state
memory worked by hand from the configs, parameter counts against the publishers' totals, and
the step-cost physics each layer kind must show."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hisim_jax import Estimator
from hisim_jax.estimator import ops
from hisim_jax.paths import data_dir
from hisim_jax.specs import SpecError, draft_model, load_model, model_from_config

MODELS = data_dir("models")


def groups(name):
    return {(g.attention, g.mlp): g.count for g in load_model(name).layer_groups}


# ------------------------------------------------------------------------------------------------
# layer groups


def test_deepseek_v3_groups_and_mla_dims():
    m = load_model("deepseek-v3")
    assert groups("deepseek-v3") == {("mla", "dense"): 3, ("mla", "moe"): 58}
    assert (m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim) == (
        512,
        64,
        128,
        128,
    )
    assert (m.num_experts, m.experts_per_token, m.shared_expert_intermediate_size) == (
        256,
        8,
        2048,
    )
    assert m.weight_dtype == m.expert_weight_dtype == "fp8"
    assert m.mtp_layers == 1


def test_gpt_oss_alternates_sliding_and_full_with_mxfp4_experts():
    m = load_model("gpt-oss-120b")
    assert groups("gpt-oss-120b") == {("sliding", "moe"): 18, ("full", "moe"): 18}
    assert m.sliding_window == 128
    assert (m.weight_dtype, m.expert_weight_dtype) == ("bf16", "mxfp4")


def test_llama4_chunked_on_three_of_four_layers_and_interleaved_moe():
    assert groups("llama-4-scout-17b-16e") == {("chunked", "moe"): 36, ("full", "moe"): 12}
    assert groups("llama-4-maverick") == {
        ("chunked", "dense"): 24,
        ("chunked", "moe"): 12,
        ("full", "moe"): 12,
    }
    m = load_model("llama-4-maverick")
    assert m.attention_chunk == 8192
    assert m.intermediate_size == 16384  # dense layers: intermediate_size_mlp


def test_qwen35_linear_attention_on_three_of_four_layers():
    assert groups("qwen3.5-27b") == {("gdn", "dense"): 48, ("full", "dense"): 16}
    assert groups("qwen3.5-397b-a17b") == {("gdn", "moe"): 45, ("full", "moe"): 15}
    assert load_model("qwen3.5-35b-a3b").state_dtype_bytes == 4.0  # mamba_ssm_dtype float32


def test_nemotron_h_pattern():
    g = groups("nemotron-h-56b")
    assert g == {("mamba2", "none"): 54, ("none", "dense"): 54, ("full", "none"): 10}
    assert not load_model("nemotron-h-56b").mlp_gated  # ReLU² MLP
    assert groups("nemotron-3-nano-30b-a3b")[("none", "moe")] == 23


def test_gemma4_local_global():
    m = load_model("gemma-4-26b-a4b")
    assert groups("gemma-4-26b-a4b") == {("sliding", "moe"): 25, ("full", "moe"): 5}
    assert (m.global_head_dim, m.global_kv_heads, m.global_kv_shared) == (512, 2, True)


def test_kimi_k25_nested_text_config_int4_experts():
    m = load_model("kimi-k2.5")
    assert m.num_experts == 384 and m.family == "deepseek-v3"
    assert (m.weight_dtype, m.expert_weight_dtype) == ("bf16", "int4")


# ------------------------------------------------------------------------------------------------
# KV and state memory, worked by hand from the configs (bf16)


@pytest.mark.parametrize(
    "name, kv, windowed, state",
    [
        # (512 + 64) x 2 B x 61 layers
        ("deepseek-v3", 576 * 2 * 61, 0, 0),
        # ... + the indexer's 128-dim key
        ("deepseek-v3.2", (576 + 128) * 2 * 61, 0, 0),
        ("glm-5", (576 + 128) * 2 * 78, 0, 0),
        # 18 full layers x K,V x 8 heads x 64 x 2 B; sliding: 18 x 128 tokens x the same
        ("gpt-oss-120b", 18 * 2 * 8 * 64 * 2, 18 * 128 * 2 * 8 * 64 * 2, 0),
        ("gpt-oss-20b", 12 * 2 * 8 * 64 * 2, 12 * 128 * 2 * 8 * 64 * 2, 0),
        # 12 global layers; 36 chunked layers hold at most one 8192-token chunk
        ("llama-4-scout-17b-16e", 12 * 2 * 8 * 128 * 2, 36 * 8192 * 2 * 8 * 128 * 2, 0),
        # 10 full layers x 2 x 2 heads x 256; 30 GDN layers x (32 x 128 x 128 fp32 state +
        # (2 x 16 x 128 + 32 x 128) conv channels x 3 x 2 B)
        (
            "qwen3.5-35b-a3b",
            10 * 2 * 2 * 256 * 2,
            0,
            30 * (32 * 128 * 128 * 4 + (2 * 16 * 128 + 32 * 128) * 3 * 2),
        ),
        # 10 attention layers; 54 Mamba layers x (256 heads x 64 x 256 bf16 + (16384 + 2 x 8
        # x 256) x 3 x 2 B)
        (
            "nemotron-h-56b",
            10 * 2 * 8 * 128 * 2,
            0,
            54 * (256 * 64 * 256 * 2 + (16384 + 2 * 8 * 256) * 3 * 2),
        ),
        # 5 global layers, K = V: 1 x 2 heads x 512; 25 sliding layers x 1024 x 2 x 8 x 256
        ("gemma-4-26b-a4b", 5 * 2 * 512 * 2, 25 * 1024 * 2 * 8 * 256 * 2, 0),
    ],
)
def test_kv_and_state_bytes_by_hand(name, kv, windowed, state):
    m = load_model(name)
    assert m.kv_bytes_per_token() == kv
    assert m.windowed_kv_bytes() == windowed
    assert m.state_bytes_per_request() == state


def test_mla_latent_is_not_split_by_tp():
    m = load_model("deepseek-v3")
    assert m.kv_bytes_per_token(tp=8) == m.kv_bytes_per_token(tp=1) == 70_272


def test_gqa_kv_and_states_split_by_tp():
    m = load_model("qwen3.5-35b-a3b")
    assert m.kv_bytes_per_token(tp=2) == m.kv_bytes_per_token() / 2
    assert m.state_bytes_per_request(tp=2) == m.state_bytes_per_request() / 2


# ------------------------------------------------------------------------------------------------
# parameter counts against the publishers' stated totals (language model; MTP layers apart)


@pytest.mark.parametrize(
    "name, total, active",
    [
        ("deepseek-v3", 671e9, None),  # DeepSeek-V3 report: 671B (+14B MTP)
        ("deepseek-r1", 671e9, None),
        ("gpt-oss-120b", 116.83e9, 5.13e9),  # OpenAI gpt-oss model card
        ("gpt-oss-20b", 20.91e9, 3.61e9),
        ("llama-4-maverick", 400e9, None),  # Meta: 400B total (17B active counts the embedding)
        ("glm-5", 744e9, None),  # Z.ai: 744B
        ("qwen3.5-397b-a17b", 397e9, None),  # Qwen: 397B-A17B
        ("nemotron-3-nano-30b-a3b", 31.6e9, 3.2e9),  # NVIDIA: 31.6B total, 3.2B active
        ("nemotron-h-56b", 56e9, None),
        ("gemma-4-26b-a4b", 25.2e9, 3.8e9),  # Google: 25.2B total, 3.8B active
        ("qwen3-235b-a22b", 235e9, None),
    ],
)
def test_parameter_counts_match_publishers(name, total, active):
    m = load_model(name)
    assert abs(m.weight_params() / total - 1) < 0.01, m.weight_params()
    if active is not None:
        assert abs(m.active_params() / active - 1) < 0.01, m.active_params()


def test_checkpoint_formats_set_weight_bytes():
    # gpt-oss-120b fits one 80 GB GPU only because its experts are MXFP4
    assert load_model("gpt-oss-120b").weight_bytes() < 70e9
    assert load_model("gpt-oss-120b").weight_bytes("bf16") > 200e9
    # DeepSeek-V3 in fp8: about a byte per parameter
    m = load_model("deepseek-v3")
    assert abs(m.weight_bytes() / m.weight_params() - 1.0) < 0.01


# ------------------------------------------------------------------------------------------------
# loader errors name the field


def _cfg(name):
    return json.loads((MODELS / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "name, edit, field",
    [
        ("gpt-oss-20b", {"layer_types": ["full_attention"] * 3}, "layer_types"),
        ("gpt-oss-20b", {"layer_types": ["odd_attention"] * 24}, "layer_types[0]"),
        ("nemotron-h-56b", {"hybrid_override_pattern": "MX"}, "hybrid_override_pattern"),
        ("deepseek-v3", {"kv_lora_rank": None}, "kv_lora_rank"),
        (
            "deepseek-v3",
            {"quantization_config": {"quant_method": "gptq"}},
            "quantization_config.quant_method",
        ),
        ("qwen3.5-27b", {"text_config": 3}, "text_config"),
    ],
)
def test_unrepresentable_configs_name_the_field(name, edit, field):
    cfg = {**_cfg(name), **edit}
    with pytest.raises(SpecError) as ei:
        model_from_config(cfg, "/x/m.json")
    msg = str(ei.value)
    assert "\n" not in msg and f"'{field}" in msg and "/x/m.json" in msg


def test_nested_text_config_field_errors_too():
    cfg = _cfg("qwen3.5-27b")
    cfg["text_config"] = {**cfg["text_config"], "linear_num_key_heads": "many"}
    with pytest.raises(SpecError, match="linear_num_key_heads"):
        model_from_config(cfg, "/x/m.json")


def test_draft_model_is_the_mtp_layers():
    d = draft_model(load_model("deepseek-v3"))
    assert d.num_layers == 1 and d.layers("mla", "moe") == 1
    assert draft_model(load_model("llama-3.1-8b"), 2).layers("full", "dense") == 2


# ------------------------------------------------------------------------------------------------
# step-cost physics of each layer kind


def _attention_s(est, batch):
    return est.breakdown_s(batch)["attention"]


def test_windowed_attention_flat_beyond_the_window():
    est = Estimator("mistral-7b", "h100-sxm")  # every layer slides over 4096 tokens
    far = [_attention_s(est, [(c, 1)] * 32) for c in (8192, 16384, 65536)]
    assert far[0] == pytest.approx(far[1], rel=1e-9) == pytest.approx(far[2], rel=1e-9)
    assert _attention_s(est, [(1024, 1)] * 32) < far[0]


def test_chunked_attention_resets_at_each_chunk():
    est = Estimator("llama-4-scout-17b-16e", "h100-sxm", tp=4)
    spec = est.model
    # a decode at the start of a chunk sees few keys: cheaper than at the chunk's end
    start = _attention_s(est, [(8192 * 3 + 10, 1)] * 16)
    end = _attention_s(est, [(8192 * 3 + 8000, 1)] * 16)
    assert start < end
    assert spec.attention_chunk == 8192


def test_linear_attention_decode_flat_in_context():
    m = load_model("qwen3.5-27b")
    only_gdn = model_from_config(
        {**_cfg("qwen3.5-27b"), "text_config": {
            **_cfg("qwen3.5-27b")["text_config"], "layer_types": ["linear_attention"] * 64,
        }},
        "/x/gdn.json",
    )  # fmt: skip
    assert only_gdn.layers("gdn") == 64 and m.layers("full") == 16
    est = Estimator(only_gdn, "h100-sxm")
    steps = [float(est.step_latency_s([[(c, 1)] * 16])[0]) for c in (100, 10_000, 200_000)]
    assert steps[0] == pytest.approx(steps[1], rel=1e-12) == pytest.approx(steps[2], rel=1e-12)
    # but a prefill's scan grows with its tokens
    assert est.step_latency_s([[(0, 4096)]])[0] > est.step_latency_s([[(0, 1024)]])[0]


def test_mamba_state_traffic_shows_in_decode():
    est = Estimator("nemotron-h-56b", "h100-sxm", tp=2)
    few = est.step_latency_s([[(1000, 1)] * 8])[0]
    many = est.step_latency_s([[(1000, 1)] * 64])[0]
    # 64 requests read and write 8x the states of 8: the recurrent term grows with requests
    b8 = est.breakdown_s([(1000, 1)] * 8)["attention"]
    b64 = est.breakdown_s([(1000, 1)] * 64)["attention"]
    assert many > few and b64 > 4 * b8


def test_mla_decode_reads_the_latent_once_for_all_heads():
    est = Estimator("deepseek-v3", "h200-sxm", tp=8)
    short = _attention_s(est, [(1000, 1)] * 64)
    long = _attention_s(est, [(32000, 1)] * 64)
    assert long > 5 * short  # dense MLA: grows with context
    sparse = Estimator("deepseek-v3.2", "h200-sxm", tp=8)
    # DeepSeek sparse attention: beyond top-k only the indexer grows, far more slowly
    assert _attention_s(sparse, [(32000, 1)] * 64) < 0.5 * long


def test_expert_parallelism_all_to_all_and_fewer_local_experts():
    tp8 = Estimator("deepseek-v3", "h200-sxm", tp=8)
    ep8 = Estimator("deepseek-v3", "h200-sxm", tp=8, ep=8, dp=8)
    batch = [(2000, 1)] * 256
    a, b = tp8.breakdown_s(batch), ep8.breakdown_s(batch)
    assert b["communication"] != a["communication"]
    assert b["attention"] < a["attention"]  # each DP rank attends 1/8 of the requests
    assert ep8.dims.experts_local == 32
    with pytest.raises(ValueError, match="ep=3"):
        ops.model_dims(load_model("deepseek-v3"), tp=8, ep=3)


def test_every_new_family_costs_a_mixed_batch():
    cases = [
        ("deepseek-v3", "h200-sxm", 8),
        ("kimi-k2", "h200-sxm", 8),
        ("glm-5", "b200", 8),
        ("gpt-oss-120b", "h100-sxm", 1),
        ("llama-4-maverick", "h200-sxm", 8),
        ("qwen3.5-397b-a17b", "h200-sxm", 8),
        ("nemotron-3-nano-30b-a3b", "h100-sxm", 1),
        ("gemma-4-26b-a4b", "h100-sxm", 1),
    ]
    for name, hw, tp in cases:
        est = Estimator(name, hw, tp=tp)
        t = est.step_latency_s([[(0, 2048), (3000, 1), (500, 1)], [(100, 1)] * 8])
        assert np.all(np.isfinite(t)) and np.all(t > 0), name
        assert t[0] > t[1], name


def test_mla_verify_steps_take_the_absorbed_kernel():
    est = Estimator("deepseek-v3", "h200-sxm", tp=8)
    decode = est.step_latency_s([[(2000, 1)] * 32])[0]
    verify = est.step_latency_s([[(2000, 3)] * 32])[0]
    chunk = est.step_latency_s([[(2000, 64)] * 32])[0]
    # three tokens a request cost far less than three decodes; a 64-token chunk goes MHA
    assert decode < verify < 2 * decode < chunk


def test_lookup_backends_refuse_layer_kinds_they_do_not_cover():
    from hisim_jax.estimator.backends import make_estimator

    with pytest.raises(ValueError, match="mla layers"):
        make_estimator("aiconfigurator", "deepseek-v3", "h200-sxm", 8)
