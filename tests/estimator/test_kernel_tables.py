"""Kernel tables of the new layer kinds (aiconfigurator-core's MLA, DeepSeek-shaped MoE, DeepEP
all-to-all, Gated DeltaNet and Mamba-2 tables): readers on small synthetic tables in the real
column format, one-line errors on malformed ones, the rows through hisim's kernel terms
(finite, growing with the work), and the kernel-family fit.

Tests marked by ``_needs_data`` read the installed package's tables and skip without the
``aic`` extra; the others need nothing beyond hisim itself."""

import jax
import numpy as np
import pandas as pd
import pytest

from hisim_jax.estimator import aiconfigurator as aic
from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.roofline import Params, load_calibration
from hisim_jax.specs import SpecError

P = load_calibration()


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def _fake(monkeypatch, frames: dict[str, pd.DataFrame]):
    monkeypatch.setattr(aic, "_read", lambda path: frames[str(path)].copy())


def _predict(op, frame, system="h100_sxm", params=P, floors=None):
    """Predicted seconds of ``frame``'s rows in the frame's own order."""
    parts = [(system, frame.reset_index(drop=True).assign(_row=np.arange(len(frame))))]
    pred, meas = aic.predict_sets(params, aic.kernel_sets(op, parts), floors)
    order = pd.concat([f for _, f in aic.kernel_set_parts(op, parts)])["_row"].to_numpy()
    out = np.empty(len(frame))
    out[order] = pred
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    return out


# ------------------------------------------------------------------------------------------------
# synthetic tables in the real column formats


def _mla(kernel="default", phase="context", **cols):
    n = len(next(iter(cols.values())))
    base = {
        "framework": ["X"] * n,
        "version": ["1"] * n,
        "device": ["d"] * n,
        "op_name": [f"mla_{phase}"] * n,
        "kernel_source": [kernel] * n,
        "mla_dtype": ["bfloat16"] * n,
        "kv_cache_dtype": ["bfloat16"] * n,
        "num_heads": [128] * n,
        "batch_size": [1] * n,
        "isl": [1] * n,
        "tp_size": [1] * n,
        "step": [0] * n,
        "latency": [0.05] * n,
    }
    return pd.DataFrame({**base, **cols})


def _moe(**cols):
    n = len(next(iter(cols.values())))
    base = {
        "framework": ["X"] * n,
        "op_name": ["moe"] * n,
        "kernel_source": ["triton"] * n,
        "moe_dtype": ["fp8_block"] * n,
        "num_tokens": [64] * n,
        "hidden_size": [7168] * n,
        "inter_size": [2048] * n,
        "topk": [8] * n,
        "num_experts": [256] * n,
        "moe_tp_size": [1] * n,
        "moe_ep_size": [1] * n,
        "distribution": ["balanced"] * n,
        "latency": [0.5] * n,
    }
    return pd.DataFrame({**base, **cols})


def _gdn(phase, kernels, **cols):
    n = len(next(iter(cols.values())))
    rows = []
    for k in kernels:
        rows.append(
            pd.DataFrame(
                {
                    "framework": ["X"] * n,
                    "op_name": ["gdn"] * n,
                    "kernel_source": [k] * n,
                    "phase": [phase] * n,
                    "batch_size": [1] * n,
                    "seq_len": [1] * n,
                    "num_tokens": [1] * n,
                    "d_model": [5120] * n,
                    "d_conv": [4] * n,
                    "num_k_heads": [16] * n,
                    "head_k_dim": [128] * n,
                    "num_v_heads": [48] * n,
                    "head_v_dim": [128] * n,
                    "model_name": ["Qwen/Qwen3.5-27B"] * n,
                    "latency": [0.01] * n,
                    **cols,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_mla_tables_read_as_attention_calls(monkeypatch):
    ctx = _mla(
        kernel="default",
        batch_size=[4, 4, 4, 4],
        isl=[1024, 1024, 2048, 2048],
        kv_cache_dtype=["bfloat16", "bfloat16", "fp8", "int4"],
        latency=[0.2, 0.4, 0.5, 0.1],
    )
    gen = _mla(
        kernel="flash_attention",
        phase="generation",
        step=[1023, 15],
        latency=[0.02, np.nan],  # a failed case: no timing, not malformed
    )
    _fake(monkeypatch, {"c": ctx, "g": gen, "h": _mla(kernel="flash_attention", isl=[512])})
    c = aic.mla_frame("c", "context")
    # two collections of one shape give their median; the int4 KV cache is not read
    assert list(c["new_len"]) == [1024.0, 2048.0] and set(c["cache_len"]) == {0.0}
    assert list(c["latency_s"]) == pytest.approx([3e-4, 5e-4])
    assert list(c["kv_bytes"]) == [2.0, 1.0]
    assert not c["absorbed"].any()  # TRT-LLM's context kernel: multi-head over up-projections
    # SGLang's FA3 collector runs the prefill over the latent: the absorbed kernel
    assert aic.mla_frame("h", "context")["absorbed"].all()
    g = aic.mla_frame("g", "generation")
    assert list(g["cache_len"]) == [1023.0] and list(g["new_len"]) == [1.0]
    assert g["absorbed"].all()


def test_mla_bmm_sums_the_two_batched_gemms(monkeypatch):
    b = pd.DataFrame(
        {
            "op_name": ["mla_gen_pre", "mla_gen_post", "mla_gen_pre"],
            "kernel_source": ["bmm"] * 3,
            "bmm_dtype": ["bfloat16"] * 3,
            "num_tokens": [64, 64, 128],
            "num_heads": [128] * 3,
            "latency": [0.010, 0.008, 0.02],
        }
    )
    _fake(monkeypatch, {"b": b})
    f = aic.mla_bmm_frame("b")
    assert list(f["tokens"]) == [64.0]  # 128 tokens has only the first BMM
    assert list(f["latency_s"]) == pytest.approx([18e-6])


def test_moe_reader_keeps_deepseek_shapes_any_ep(monkeypatch):
    m = _moe(
        num_tokens=[64, 64, 64, 64, 64],
        moe_ep_size=[1, 8, 8, 1, 1],
        moe_tp_size=[1, 1, 1, 2, 1],
        hidden_size=[7168, 7168, 7168, 7168, 4096],
        distribution=["balanced", "balanced", "power_law_1.2", "balanced", "balanced"],
    )
    _fake(monkeypatch, {"m": m})
    f = aic.moe_ep_frame("m", ("balanced",))
    assert sorted(zip(f["ep"], f["moe_inter"], strict=True)) == [(1, 1024), (1, 2048), (8, 2048)]
    assert set(f["model"]) == {"deepseek-v3"}


def test_a2a_readers_add_dispatch_and_combine(monkeypatch):
    ll = pd.DataFrame(
        {
            "op_name": ["ll", "ll"],
            "node_num": [1, 1],
            "hidden_size": [7168, 7168],
            "num_token": [128, 256],
            "num_topk": [8, 8],
            "num_experts": [256, 256],
            "combine_avg_t_us": [30.0, 50.0],
            "combine_bandwidth_gbps": [1.0, 1.0],
            "dispatch_avg_t_us": [20.0, 30.0],
            "dispatch_bandwidth_gbps": [1.0, 1.0],
        }
    )
    a2a = pd.DataFrame(
        {
            "comm_backend": ["deepep_ht", "deepep_ht", "deepep_ht", "deepep_ll", "deepep_ll"],
            "phase": ["dispatch", "combine", "dispatch", "dispatch", "combine"],
            "comm_dtype": ["default", "default", "fp8", "default", "default"],
            "ep_size": [4] * 5,
            "node_num": [1] * 5,
            "hidden_size": [7168] * 5,
            "topk": [8] * 5,
            "num_experts": [256] * 5,
            "num_tokens": [512] * 5,
            "sms": [20, 20, 20, 0, 0],
            "latency": [100.0, 120.0, 50.0, 40.0, 45.0],
        }
    )
    _fake(monkeypatch, {"ll": ll, "a": a2a})
    f = aic.a2a_frame("ll", "ll", "gb200")
    assert list(f["latency_s"]) == pytest.approx([50e-6, 80e-6])
    assert set(f["ep"]) == {4.0}  # one GB200 node tray: 4 NVLink ranks
    assert set(aic.a2a_frame("ll", "ll", "h100_sxm")["ep"]) == {8.0}
    g = aic.a2a_frame("a", "a2a", "gb200")
    assert dict(zip(g["backend"], g["latency_s"], strict=True)) == pytest.approx(
        {"deepep_ht": 220e-6, "deepep_ll": 85e-6}
    )


def test_gdn_reader_sums_conv_and_scan(monkeypatch):
    ctx = _gdn("context", ["causal_conv1d_fn", "chunk_gated_delta_rule"], seq_len=[256, 512])
    gen = _gdn(
        "generation",
        [
            "causal_conv1d_update",
            "fused_recurrent_gated_delta_rule_packed_decode",
            "flashinfer_gated_delta_rule_decode",
        ],
        batch_size=[8],
    )
    _fake(monkeypatch, {"c": ctx, "g": gen})
    c = aic.gdn_frame("c", "context")
    assert list(c["new_len"]) == [256.0, 512.0]
    assert list(c["latency_s"]) == pytest.approx([2e-5, 2e-5])
    g = aic.gdn_frame("g", "generation")  # FlashInfer's bf16-state lane is not added
    assert list(g["latency_s"]) == pytest.approx([2e-5]) and list(g["new_len"]) == [1.0]


def test_malformed_tables_are_one_line_errors(monkeypatch):
    bad_heads = _mla(num_heads=[128, "x"], isl=[16, 32])
    no_step = _mla(isl=[16]).drop(columns="step")
    neg_tokens = _moe(num_tokens=[64, -1])
    _fake(monkeypatch, {"h": bad_heads, "s": no_step, "t": neg_tokens})
    with pytest.raises(SpecError) as ei:
        aic.mla_frame("h", "context")
    assert "h: row 2: field 'num_heads'" in _one_line(ei.value) and "'x'" in str(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.mla_frame("s", "generation")
    assert "s: missing column 'step'" in _one_line(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.moe_ep_frame("t")
    assert "field 'num_tokens'" in _one_line(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.a2a_frame("t", "broadcast", "h100_sxm")
    assert "ll, normal, a2a" in _one_line(ei.value)


def test_unreadable_table_is_one_line(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "context_mla_perf.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.mla_frame(path, "context")
    assert str(path) in _one_line(ei.value)


# ------------------------------------------------------------------------------------------------
# predictions: finite and growing with the work


def _frame(**cols) -> pd.DataFrame:
    n = max(len(v) for v in cols.values() if isinstance(v, list))
    return pd.DataFrame({k: v if isinstance(v, list) else [v] * n for k, v in cols.items()})


def test_mla_attention_grows_with_context_batch_and_heads():
    gen = _frame(
        batch=[1, 1, 1, 64, 64],
        cache_len=[1023, 8191, 65535, 8191, 8191],
        new_len=1.0,
        heads=[16, 16, 16, 16, 128],
        kv_bytes=2.0,
        absorbed=True,
        kernel="default",
        latency_s=1e-4,
    )
    t = _predict("mla_generation", gen)
    assert t[0] < t[1] < t[2] and t[1] < t[3] < t[4]
    fp8 = _predict("mla_generation", gen.assign(kv_bytes=1.0))
    assert np.all(fp8 <= t * (1 + 1e-9))  # fewer bytes per cached key
    # where the tile math is not binding (fast MLA kernels), the fp8 cache is faster
    fast = Params(attn_flops_eff=0.9, attn_chain_flops_eff=0.9)
    assert (
        _predict("mla_generation", gen.assign(kv_bytes=1.0), params=fast)[3]
        < 0.7 * (_predict("mla_generation", gen, params=fast)[3])
    )
    ctx = _frame(
        batch=[1, 1, 8],
        cache_len=0.0,
        new_len=[1024, 4096, 4096],
        heads=128,
        kv_bytes=2.0,
        absorbed=False,
        kernel="default",
        latency_s=1e-3,
    )
    c = _predict("mla_context", ctx)
    assert c[0] < c[1] < c[2]
    # the absorbed prefill (q.k over the 576-wide latent, v 512) does several times the work
    assert np.all(_predict("mla_context", ctx.assign(absorbed=True)) > 1.8 * c)


def test_module_bmm_moe_a2a_linear_attention_grow_with_tokens():
    module = _frame(
        batch=[1, 64, 256],
        cache_len=4095.0,
        new_len=1.0,
        heads=128,
        kv_bytes=2.0,
        gemm=["bfloat16", "bfloat16", "bfloat16"],
        kernel="FLASHMLA",
        model="deepseek-v3",
        latency_s=1e-4,
    )
    m = _predict("mla_generation_module", module)
    assert m[0] < m[1] < m[2]
    # block-fp8 GEMMs read half the weight bytes: a one-request decode is cheaper
    assert _predict("mla_generation_module", module.assign(gemm="fp8_block"))[0] < m[0]
    bmm = _predict(
        "mla_bmm",
        _frame(tokens=[1, 512, 8192], heads=128, dtype="bf16", kernel="k", latency_s=1e-5),
    )
    assert bmm[0] < bmm[1] < bmm[2]
    moe = _frame(
        tokens=[1, 64, 8192, 8192],
        hidden=7168.0,
        moe_inter=2048.0,
        top_k=8.0,
        experts=256.0,
        ep=[1.0, 1.0, 1.0, 8.0],
        dtype="fp8_block",
        kernel="k",
        model="deepseek-v3",
        latency_s=1e-3,
    )
    e = _predict("moe_deepseek", moe)
    assert e[0] < e[1] < e[2] and e[3] < e[2] / 4  # eight ranks: an eighth of the experts
    a2a = _frame(
        tokens=[16, 256, 4096],
        hidden=7168.0,
        top_k=8.0,
        experts=256.0,
        ep=8.0,
        nodes=1.0,
        backend="deepep_ll",
        latency_s=1e-4,
    )
    a = _predict("a2a_ll", a2a)
    assert a[0] < a[1] < a[2]
    # low-latency mode: each token once to each other rank holding one of its top-k
    # experts, (ep - 1)(1 - (1 - 1/ep)^k) of them, fp8 (+ scales) out and bf16 back, over
    # the NVLink peak, plus the pair's fixed cost
    p = P
    link = 450e9 * float(p.comm_eff)
    ranks = 7 * (1 - (7 / 8) ** 8)
    want = 4096 * ranks * 7168 * (1.03 + 2) / link + float(p.a2a_latency_s)
    assert a[2] == pytest.approx(want, rel=1e-6)
    gdn = _frame(
        batch=[1, 1, 8],
        new_len=[256, 4096, 4096],
        hidden=5120.0,
        k_heads=16.0,
        v_heads=48.0,
        k_dim=128.0,
        v_dim=128.0,
        conv_kernel=4.0,
        model="q",
        latency_s=1e-4,
    )
    g = _predict("gdn_context", gdn)
    assert g[0] < g[1] < g[2]
    d = _predict("gdn_generation", gdn.assign(new_len=1.0, batch=[1.0, 16.0, 256.0]))
    assert d[0] < d[1] < d[2]
    conv = _frame(
        batch=[1, 1, 64],
        new_len=[128, 4096, 4096],
        heads=128.0,
        head_dim=64.0,
        state=128.0,
        groups=8.0,
        conv_kernel=4.0,
        phase="context",
        model="m",
        latency_s=1e-5,
    )
    k = _predict("mamba2_conv", conv)
    assert k[0] < k[1] < k[2]


def test_floors_bound_small_kernels_from_below():
    gen = _frame(
        batch=1.0,
        cache_len=[1.0, 65535.0],
        new_len=1.0,
        heads=16.0,
        kv_bytes=2.0,
        absorbed=True,
        kernel="default",
        latency_s=1e-5,
    )
    bare = _predict("mla_generation", gen)
    floored = _predict("mla_generation", gen, floors={"floor_attn": 10e-6})
    assert floored[0] >= 10e-6 > bare[0]
    assert floored[1] == pytest.approx(bare[1], rel=0.05)  # a long kernel is barely moved


# ------------------------------------------------------------------------------------------------
# the fit over kernel families


def test_kernel_set_padding_changes_nothing():
    moe = _frame(
        tokens=[1, 8, 64, 512, 4096],
        hidden=7168.0,
        moe_inter=2048.0,
        top_k=8.0,
        experts=256.0,
        ep=1.0,
        dtype="bfloat16",
        kernel="k",
        model="deepseek-v3",
        latency_s=[1e-4, 2e-4, 5e-4, 1e-3, 3e-3],
    )
    plain = aic.kernel_sets("moe_deepseek", [("h100_sxm", moe)])
    padded = aic.kernel_sets("moe_deepseek", [("h100_sxm", moe)], pad_to=64)
    assert len(padded[0].measured_s) == 64 and float(np.sum(padded[0].weight)) == 5.0
    a = aic.predict_sets(P, plain)
    b = aic.predict_sets(P, padded)
    np.testing.assert_allclose(a[0], b[0]) and np.testing.assert_allclose(a[1], b[1])
    log_fit = {"gemm_bytes_eff": np.log(0.8), "floor_moe": np.log(5e-6)}
    args = (log_fit, P, {"gemm_bytes_eff": np.log(0.8)}, 1e-3)
    la = float(cal._sets_loss(*args, tuple(plain)))
    lb = float(cal._sets_loss(*args, tuple(padded)))
    assert la == pytest.approx(lb, rel=1e-9)


def test_fit_recovers_comm_efficiency_from_synthetic_a2a():
    """All-to-all timings made by the model itself at comm_eff 0.45, latency 15 us, on two
    GPUs: the fit from the priors finds them again."""
    truth = Params(comm_eff=0.45, a2a_latency_s=15e-6)
    parts = []
    for system in ("h100_sxm", "b200_sxm"):
        f = _frame(
            tokens=[16, 64, 256, 1024, 4096, 16384],
            hidden=7168.0,
            top_k=8.0,
            experts=256.0,
            ep=8.0,
            nodes=1.0,
            backend="deepep_ht",
            latency_s=1.0,
        )
        pred, _ = aic.predict_sets(truth, aic.kernel_sets("a2a", [(system, f)]))
        parts.append((system, f.assign(latency_s=pred)))
    result = cal.fit_kernel_sets(
        aic.kernel_sets("a2a", parts),
        init=Params(),
        fit_names=("comm_eff", "a2a_latency_s"),
        steps_n=400,
    )
    assert float(result.params.comm_eff) == pytest.approx(0.45, rel=0.05)
    assert float(result.params.a2a_latency_s) == pytest.approx(15e-6, rel=0.1)


def test_fit_kernel_sets_refuses_nonsense():
    with pytest.raises(ValueError, match="no kernel set"):
        cal.fit_kernel_sets([])
    moe = _frame(tokens=[1.0], hidden=7168.0, moe_inter=2048.0, top_k=8.0, experts=256.0)
    moe = moe.assign(ep=1.0, dtype="bfloat16", kernel="k", model="m", latency_s=1e-4)
    with pytest.raises(ValueError, match="unknown parameter"):
        cal.fit_kernel_sets(aic.kernel_sets("moe_deepseek", [("h100_sxm", moe)]), fit_names=("x",))
    with pytest.raises(ValueError, match="at least one row"):
        cal.kernel_set(lambda p, d: d, np.zeros(0), np.zeros(0))


# ------------------------------------------------------------------------------------------------
# the installed package's data (skipped without the extra)


@pytest.fixture
def _needs_data():
    pytest.importorskip("pyarrow")
    pytest.importorskip("aiconfigurator_core")


@pytest.mark.usefixtures("_needs_data")
def test_every_operator_has_tables_and_bad_names_are_one_line():
    for op in aic.LAYER_TABLES:
        assert any(aic.layer_table_versions(s, e, op) for s in aic.SYSTEMS for e in aic.ENGINES), op
    assert aic.layer_table_versions("h100_sxm", "sglang", "mla_context")
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.layer_table_versions("h100_sxm", "sglang", "mla_everything")
    assert "mla_context" in _one_line(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.layer_frame("h100_sxm", "tgi", "mla_context")
    assert "vllm, sglang, trtllm" in _one_line(ei.value)


@pytest.mark.usefixtures("_needs_data")
@pytest.mark.parametrize(
    ("engine", "op"),
    [
        ("trtllm", "mla_context"),
        ("sglang", "mla_generation"),
        ("sglang", "mla_bmm"),
        ("vllm", "mla_generation_module"),
        ("sglang", "moe_deepseek"),
        ("sglang", "moe_wideep_generation"),
        ("sglang", "a2a_normal"),
        ("trtllm", "a2a"),
        ("vllm", "gdn_context"),
        ("trtllm", "mamba2_conv"),
    ],
)
def test_h100_tables_predict_finite_positive(engine, op):
    version, frame = aic.layer_frame("h100_sxm", engine, op)
    assert version and len(frame) and (frame["latency_s"] > 0).all()
    sample = frame.sample(n=min(len(frame), 64), random_state=0)
    pred, meas = aic.predict_sets(P, aic.kernel_sets(op, [("h100_sxm", sample)]))
    assert len(pred) == len(sample) and np.all(np.isfinite(pred)) and np.all(pred > 0)
    # unfitted and without launch floors: the kernels of 100 us or more within 10x, mostly
    long = meas >= 100e-6
    if long.any():
        assert np.median(np.abs(np.log10(pred[long] / meas[long]))) < 1.0


def test_jax_sees_float_leaves_only():
    # the family data are numpy floats (no object columns leak into the jitted fit)
    moe = _frame(tokens=[1.0, 2.0], hidden=7168.0, moe_inter=2048.0, top_k=8.0, experts=256.0)
    moe = moe.assign(ep=1.0, dtype="bfloat16", kernel="k", model="m", latency_s=1e-4)
    (ks,) = aic.kernel_sets("moe_deepseek", [("h100_sxm", moe)])
    for leaf in jax.tree.leaves(ks.data):
        assert np.asarray(leaf).dtype.kind == "f"
