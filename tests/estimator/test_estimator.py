"""Invariants of the step-latency estimator."""

import jax
import numpy as np
import pytest

from hisim_jax import Estimator
from hisim_jax.estimator import ops
from hisim_jax.estimator import roofline as est_mod
from hisim_jax.estimator.batch import pack
from hisim_jax.specs import load_hardware


@pytest.fixture(scope="module")
def llama():
    return Estimator("llama-3.1-8b", "h100-sxm")


@pytest.fixture(scope="module")
def qwen():
    return Estimator("qwen2.5-1.5b", "h100-sxm")


def test_latency_grows_with_new_tokens(llama, qwen):
    for est in (llama, qwen):
        sizes = [1, 16, 128, 512, 1024, 2048, 4096, 8192]
        lat = est.step_latency_s([[(0, n)] for n in sizes])
        assert np.all(np.diff(lat) > 0), lat
        cached = est.step_latency_s([[(3000, n)] for n in sizes])
        assert np.all(np.diff(cached) > 0), cached


def test_latency_grows_with_context(llama, qwen):
    for est in (llama, qwen):
        ctx = [0, 512, 2048, 8192, 32768, 100_000]
        decode = est.step_latency_s([[(c, 1)] * 64 for c in ctx])
        assert np.all(np.diff(decode) >= 0), decode
        assert decode[-1] > decode[0] * 1.5
        chunk = est.step_latency_s([[(c, 512)] for c in ctx])
        assert np.all(np.diff(chunk) > 0), chunk


def test_latency_grows_with_requests(llama):
    lat = llama.step_latency_s([[(1000, 1)] * r for r in (1, 8, 32, 128, 512)])
    assert np.all(np.diff(lat) > 0), lat


def test_padding_and_bucket_do_not_change_results(llama):
    batches = [[(0, 700), (4096, 1), (12, 1)], [(300, 1)] * 5, [(5000, 64)]]
    p = llama.params
    hw = ops.hw_arrays(load_hardware("h100-sxm"))
    hws = ops.stack([hw])
    outs = []
    for bucket in (8, 16, 64, 256):
        b = jax.tree.map(ops._float, pack(batches, bucket=bucket))
        outs.append(np.asarray(est_mod.step_seconds_grid(p, llama.dims, b, hws))[:, 0])
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-12)


def test_request_order_does_not_matter(llama):
    a = [(0, 700), (4096, 1), (12, 1), (80, 3)]
    lat = llama.step_latency_s([a, a[::-1]])
    assert lat[0] == pytest.approx(lat[1], rel=1e-12)


def test_vmap_over_hardware_equals_loop():
    names = ["h100-sxm", "a100-sxm-80gb", "b200", "l40s", "mi300x"]
    batches = [[(0, 2048)], [(4096, 1)] * 32, [(100, 512), (9000, 1), (5, 1)]]
    multi = Estimator("qwen3-8b", names).step_latency_s(batches)
    assert multi.shape == (3, len(names))
    for j, name in enumerate(names):
        single = Estimator("qwen3-8b", name).step_latency_s(batches)
        np.testing.assert_allclose(multi[:, j], single, rtol=1e-12)


def test_numpy_reference_equals_jax(llama):
    """The same formulas evaluated eagerly in numpy (the benchmark's baseline) agree with jit."""
    batch = [(0, 700), (4096, 1), (12, 1), (80, 3)]
    b = pack([batch])
    b1 = jax.tree.map(lambda x: x[0], b)
    np_params = jax.tree.map(np.asarray, llama.params)
    np_dims = ops.np_dims(llama.dims)
    np_hw = jax.tree.map(np.asarray, ops.hw_arrays(load_hardware("h100-sxm")))
    ref = est_mod.step_s(np_params, np_dims, b1, np_hw, xp=np)
    assert float(ref) == pytest.approx(float(llama.step_latency_s([batch])[0]), rel=1e-9)
    decode = [(c, 1) for c in (10, 500, 9000)]
    b1 = jax.tree.map(lambda x: x[0], pack([decode]))
    ref = est_mod.step_s(np_params, np_dims, b1, np_hw, xp=np)
    assert float(ref) == pytest.approx(float(llama.step_latency_s([decode])[0]), rel=1e-9)


def test_breakdown_sums_to_total(llama):
    batch = [(0, 2048), (4096, 1)]
    parts = llama.breakdown_s(batch)
    assert sum(parts.values()) == pytest.approx(float(llama.step_latency_s([batch])[0]), rel=1e-9)
    assert all(v >= 0 for v in parts.values())
    assert parts["moe"] == 0 and parts["communication"] == 0
    assert parts["mlp"] > parts["attention"] > 0


def test_calibrated_on_h100_is_close_on_known_points(llama):
    # two rows of data/profiles/h100/steps.csv: a 4096-token prefill and a 256-request decode
    lat = llama.step_latency_s([[(0, 4096)], [(256, 1)] * 256])
    np.testing.assert_allclose(lat, [0.12018525, 0.01535334], rtol=0.08)


def test_faster_gpu_is_faster():
    batches = [[(0, 4096)], [(2048, 1)] * 64]
    lat = Estimator("llama-3.1-8b", ["a100-sxm-80gb", "h100-sxm", "b200"]).step_latency_s(batches)
    assert np.all(lat[:, 0] > lat[:, 1]) and np.all(lat[:, 1] > lat[:, 2])


def test_tensor_parallel_splits_work_and_adds_communication():
    batch = [(0, 4096)]
    one = Estimator("llama-3.1-70b", "h100-sxm", tp=4)
    two = Estimator("llama-3.1-70b", "h100-sxm", tp=8)
    assert two.step_latency_s([batch])[0] < one.step_latency_s([batch])[0]
    parts = two.breakdown_s(batch)
    assert parts["communication"] > 0
    with pytest.raises(ValueError, match="tp=3"):
        Estimator("llama-3.1-8b", "h100-sxm", tp=3)


def test_fp8_weights_speed_up_decode_and_prefill():
    bf16 = Estimator("llama-3.1-8b", "h100-sxm")
    fp8 = Estimator("llama-3.1-8b", "h100-sxm", weight_dtype="fp8", kv_dtype="fp8")
    batches = [[(1024, 1)] * 16, [(0, 8192)]]
    assert np.all(fp8.step_latency_s(batches) < bf16.step_latency_s(batches))


def test_moe_model_cost_tracks_active_experts():
    moe = Estimator("qwen3-30b-a3b", "h100-sxm")
    dense = Estimator("qwen3-32b", "h100-sxm")
    batches = [[(1000, 1)] * 8, [(0, 2048)]]
    assert np.all(moe.step_latency_s(batches) < dense.step_latency_s(batches))
    parts = moe.breakdown_s([(1000, 1)] * 8)
    assert parts["moe"] > 0 and parts["mlp"] == 0
    touched = [float(ops.moe_experts_touched(t, 128.0, 8.0)) for t in (1.0, 4.0, 64.0, 4096.0)]
    assert touched[0] == pytest.approx(8.0) and np.all(np.diff(touched) > 0)
    assert touched[-1] == pytest.approx(128.0, rel=1e-6)


def test_sliding_window_caps_attention_cost():
    mistral = Estimator("mistral-7b", "h100-sxm")
    lat = mistral.step_latency_s([[(8000, 1)] * 32, [(30000, 1)] * 32])
    assert lat[1] == pytest.approx(lat[0], rel=1e-9)


def test_single_batch_and_list_of_batches_agree(llama):
    b = [(0, 100), (5, 1)]
    assert llama.step_latency_s(b)[0] == pytest.approx(llama.step_latency_s([b])[0])


def test_weight_only_fp8_computes_in_bf16():
    w8a8 = Estimator("llama-3.1-8b", "h100-sxm", weight_dtype="fp8")
    w8a16 = Estimator("llama-3.1-8b", "h100-sxm", weight_dtype="fp8", act_dtype="bf16")
    bf16 = Estimator("llama-3.1-8b", "h100-sxm")
    prefill = [[(0, 8192)]]
    assert w8a8.step_latency_s(prefill)[0] < w8a16.step_latency_s(prefill)[0]
    # weight-only fp8 still halves the weight bytes of a decode step
    decode = [[(100, 1)] * 4]
    assert w8a16.step_latency_s(decode)[0] < 0.75 * bf16.step_latency_s(decode)[0]


def test_pruned_cost_graphs_match_the_full_one():
    """Needs only removes work whose result the full graph would discard."""
    for model, tp in (("llama-3.1-8b", 1), ("qwen3-30b-a3b", 2)):
        est = Estimator(model, "h100-sxm", tp=tp)
        ctx = np.array([5, 900, 4000, 12000])
        pruned = est.decode_steps_s(ctx, 20, padded=8)
        grid = est.step_latency_s(
            [[(int(c) + j, 1) for c in ctx] + [(0, 1)] * 4 for j in range(20)]
        )
        np.testing.assert_allclose(pruned, grid, rtol=1e-6)
        prompt = [(100, 700), (0, 3000), (5000, 1)]
        one = est.step_latency_s([prompt])  # fast path, standard grid only
        two = est.step_latency_s([prompt, prompt])  # grouped path, full graph
        np.testing.assert_allclose(one, two[:1], rtol=1e-6)


def test_blocks_share_an_sm_only_once_the_grid_outgrows_the_sms():
    # one long prefill chunk (12 blocks on Qwen2.5-1.5B); beside 9 short decodes the grid
    # launches 120 blocks on 132 SMs, each alone: no slowdown, however busy the GPU is; beside
    # 40 decodes (492 blocks) SMs host two, and the heaviest block's tile math slows
    alone = [(16000, 30)]
    own_sms, sharing = alone + [(64, 1)] * 9, alone + [(64, 1)] * 40

    def attention_s(**params):
        p = est_mod.Params(attn_shared_slowdown=5.0, attn_block_s=1e-12, **params)
        est = Estimator("qwen2.5-1.5b", "h100-sxm", calibration=p)
        return [est.breakdown_s(b)["attention"] for b in (alone, own_sms, sharing)]

    a, b, c = attention_s(attn_chain_bytes_eff=0.05)  # its K/V stream binds: never slowed
    assert b == pytest.approx(a, rel=0.01) and c == pytest.approx(a, rel=0.02)
    a, b, c = attention_s(attn_chain_bytes_eff=100.0)  # its tile math binds
    assert b == pytest.approx(a, rel=0.01)
    assert c > 1.5 * a


def test_one_row_gemms_run_as_gemv_and_skip_their_fixed_cost():
    p = est_mod.Params(gemv_saving_s=2e-6)
    est = Estimator("llama-3.1-8b", "h100-sxm", calibration=p)
    lone = est.breakdown_s([(100, 1)])["fixed"]
    pair = est.breakdown_s([(100, 1), (100, 1)])["fixed"]
    prefill = est.breakdown_s([(0, 64)])["fixed"]  # its LM head has one row
    # 32 layers x (qkv, o, gate_up, down) + the LM head
    assert pair - lone == pytest.approx(2e-6 * (4 * 32 + 1), rel=1e-4)
    assert pair - prefill == pytest.approx(2e-6, rel=1e-3)
