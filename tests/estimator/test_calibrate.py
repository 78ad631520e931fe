"""Calibration: finite gradients, recovery of known parameters, and error reports."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.roofline import Params, ops, params_to_dict, step_s
from hisim_jax.specs import load_hardware

H100 = load_hardware("h100-sxm")


def _synthetic_steps_csv(path, params: Params):
    rng = np.random.default_rng(0)
    rows = []
    for model in ("llama-3.1-8b", "qwen2.5-1.5b"):
        for n in (16, 256, 1024, 4096):
            rows.append((model, [[0, n]]))
        for b in (1, 8, 64, 256):
            rows.append((model, [[int(c), 1] for c in rng.integers(16, 8000, b)]))
        for _ in range(4):
            dec = [[int(c), 1] for c in rng.integers(16, 8000, int(rng.integers(2, 40)))]
            rows.append((model, dec + [[int(rng.integers(0, 4000)), int(rng.integers(64, 2048))]]))
    frame = pd.DataFrame({"model": [r[0] for r in rows], "batch": [json.dumps(r[1]) for r in rows]})
    frame["step_ms"] = 1.0
    frame.to_csv(path, index=False)
    steps = cal.read_steps(path)
    truth_s = cal.predict_steps_s(params, steps, H100)
    frame["step_ms"] = truth_s * 1e3
    frame.to_csv(path, index=False)
    return cal.read_steps(path)


def test_loss_gradients_are_finite(tmp_path):
    steps = _synthetic_steps_csv(tmp_path / "s.csv", Params())
    p = jax.tree.map(ops._float, Params())
    hw = ops.hw_arrays(H100)

    def loss(log_eff):
        q = eqx.tree_at(lambda t: t.gemm_flops_eff, p, jnp.exp(log_eff))
        pred = jax.vmap(lambda d, b: step_s(q, d, b, hw))(steps.dims, steps.batches)
        return jnp.mean((jnp.log(pred) - jnp.log(ops._float(steps.measured_s))) ** 2)

    g = jax.grad(loss)(ops._float(np.log(0.6)))
    assert np.isfinite(float(g)) and float(g) != 0.0
    # the fit's own loss over every fitted parameter
    log_fit = {n: jnp.log(getattr(p, n)) for n in cal.FIT_NAMES}
    prior = {n: jnp.log(getattr(p, n)) for n in cal.FIT_NAMES}
    data = (steps.dims, steps.batches, ops._float(steps.measured_s))
    grads = jax.grad(cal._loss)(log_fit, p, prior, ops._float(1e-3), data, None, None, hw)
    for name, v in grads.items():
        assert np.isfinite(float(v)), name


def test_fit_recovers_known_parameters(tmp_path):
    truth = Params(gemm_flops_eff=0.62, gemm_bytes_eff=0.74, layer_s=55e-6, attn_flops_eff=0.42)
    steps = _synthetic_steps_csv(tmp_path / "s.csv", truth)
    names = ("gemm_flops_eff", "gemm_bytes_eff", "layer_s", "attn_flops_eff")
    result = cal.fit(
        steps,
        H100,
        init=Params(),
        fit_names=names,
        steps_n=600,
        learning_rate=0.05,
        prior_weight=0.0,
    )
    got = params_to_dict(result.params)
    for n in names:
        assert got[n] == pytest.approx(float(getattr(truth, n)), rel=0.03), n
    pred = cal.predict_steps_s(result.params, steps, H100)
    assert cal.error_report(steps.frame, pred, steps.measured_s)["mape"] < 0.01


def test_error_report_groups():
    frame = pd.DataFrame({"model": ["a", "a", "b"], "kind": ["x", "y", "x"]})
    rep = cal.error_report(frame, np.array([1.1, 1.0, 0.8]), np.array([1.0, 1.0, 1.0]))
    assert rep["mape"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert rep["per_model"] == pytest.approx({"a": 0.05, "b": 0.2})
    assert rep["per_kind"] == pytest.approx({"x": 0.15, "y": 0.0})
    assert rep["max"] == pytest.approx(0.2)


def test_read_steps_rejects_bad_rows(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('model,batch,step_ms\nllama-3.1-8b,"[[0,5]]",1.0\nllama-3.1-8b,"[[0,-5]]",1.0\n')
    with pytest.raises(cal.ProfileError, match=r"line 3: field 'batch'"):
        cal.read_steps(p)
    p.write_text('model,batch,step_ms\nllama-3.1-8b,"[[0,5]]",-1\n')
    with pytest.raises(cal.ProfileError, match=r"line 2: field 'step_ms'"):
        cal.read_steps(p)
    p.write_text('model,batch,step_ms\nno-such-model,"[[0,5]]",1\n')
    with pytest.raises(cal.ProfileError, match=r"line 2: field 'model'"):
        cal.read_steps(p)


def test_micro_tables_use_the_fastest_run(tmp_path):
    g = tmp_path / "gemm.csv"
    g.write_text(
        "model,op,dtype,m,k,n,ms,ms_min,ms_max\n"
        "llama-3.1-8b,qkv,bf16,4096,4096,6144,0.30,0.20,0.90\n"
        "llama-3.1-8b,qkv,bf16,1,4096,6144,0.09,0.05,0.12\n"  # below the floor once at its fastest
    )
    rows = cal.read_gemm(g)
    assert np.asarray(rows.measured_s) == pytest.approx([0.20e-3])
    # a table with only the median still reads
    g.write_text("model,op,dtype,m,k,n,ms\nllama-3.1-8b,qkv,bf16,4096,4096,6144,0.30\n")
    assert np.asarray(cal.read_gemm(g).measured_s) == pytest.approx([0.30e-3])
    steps = _synthetic_steps_csv(tmp_path / "s.csv", Params())
    a = tmp_path / "attention.csv"
    a.write_text(
        "nq,nkv,d,batch,ms,ms_min,ms_max\n"
        '12,2,128,"[[16384,128]]",0.83,0.53,0.99\n'
        '12,2,128,"[[0,512]]",0.20,0.05,0.30\n'
    )
    template = jax.tree.map(lambda x: x[0], steps.dims)
    assert np.asarray(cal.read_attention(a, template).measured_s) == pytest.approx([0.53e-3])


def test_attention_table_with_no_fittable_row_is_one_line_error(tmp_path):
    from hisim_jax.estimator import ops
    from hisim_jax.estimator.calibrate import ProfileError, read_attention
    from hisim_jax.specs import load_model

    path = tmp_path / "attention.csv"
    path.write_text('nq,nkv,d,batch,ms\n32,8,128,"[[0, 16]]",0.01\n')
    with pytest.raises(ProfileError, match="no row to fit"):
        read_attention(path, ops.model_dims(load_model("llama-3.1-8b")))


def test_eager_attention_rows_get_their_own_scale_only_beside_steps(tmp_path):
    """Eager FlashAttention calls timed 1.3x slower than the kernels inside the steps: with
    both fitted, the eager rows' own scale takes the difference and the steps keep their
    level; alone, the micro rows have no scale (it would only trade with the efficiencies)."""
    truth = Params(attn_flops_eff=0.42, attn_chain_flops_eff=0.3)
    steps = _synthetic_steps_csv(tmp_path / "s.csv", truth)
    template = jax.tree.map(lambda x: x[0], steps.dims)
    batches = [[[16384, 128]], [[16384, 512]], [[16384, 2048]], [[0, 2048]], [[0, 8192]]]
    csv = tmp_path / "attention.csv"
    pd.DataFrame(
        {"nq": 32, "nkv": 8, "d": 128, "batch": [json.dumps(b) for b in batches], "ms": 1.0}
    ).to_csv(csv, index=False)
    rows = cal.read_attention(csv, template)
    kernel_s = np.asarray(
        cal._attn_kernel_s(jax.tree.map(ops._float, truth), rows, ops.hw_arrays(H100))
    )
    pd.DataFrame(
        {"nq": 32, "nkv": 8, "d": 128, "batch": [json.dumps(b) for b in batches],
         "ms": kernel_s * 1.3e3}
    ).to_csv(csv, index=False)  # fmt: skip
    rows = cal.read_attention(csv, template)
    names = ("attn_flops_eff", "attn_chain_flops_eff")
    both = cal.fit(steps, H100, None, rows, init=truth, fit_names=names, steps_n=400,
                   prior_weight=0.0, eager_init_s={"eager_attn_s": 1e-6})  # fmt: skip
    assert both.eager_s["eager_attn_scale"] == pytest.approx(1.3, rel=0.05)
    got = params_to_dict(both.params)
    assert got["attn_flops_eff"] == pytest.approx(0.42, rel=0.05)
    alone = cal.fit(None, H100, None, rows, fit_names=names, steps_n=50)
    assert "eager_attn_scale" not in alone.eager_s
