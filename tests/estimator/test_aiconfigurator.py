"""aiconfigurator-core import: names, errors, shipped calibrations, table conversion, the fit.

Tests marked by ``_needs_data`` read the installed package's tables and skip without the
``aic`` extra; the others need nothing beyond hisim itself."""

import json
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pandas as pd
import pytest

from hisim_jax.estimator import aiconfigurator as aic
from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.batch import pack
from hisim_jax.estimator.roofline import (
    PARAM_NAMES,
    Params,
    _communication_s,
    load_calibration,
    ops,
    params_to_dict,
)
from hisim_jax.paths import data_dir
from hisim_jax.specs import SpecError, load_hardware, load_model

CALIBRATIONS = data_dir("hardware_specs") / "calibration"
SHIPPED = sorted(CALIBRATIONS.glob("*.vllm.json")) + sorted(CALIBRATIONS.glob("*.sglang.json"))
H100 = load_hardware("h100-sxm")


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# names and errors (no package needed)


def test_every_system_maps_to_a_shipped_gpu_and_back():
    for system, stem in aic.SYSTEMS.items():
        assert load_hardware(stem).name == stem
        assert aic.hardware_name(system) == stem
        assert aic.system_name(stem) == system
    assert aic.hardware_name("h100_sxm") == "h100-sxm"
    assert aic.hardware_name("a100_sxm") == "a100-sxm-80gb"
    assert aic.hardware_name("b200_sxm") == "b200"


def test_unknown_names_list_the_choices():
    with pytest.raises(SpecError) as ei:
        aic.hardware_name("tpu_v5")
    assert "h100_sxm" in _one_line(ei.value) and "tpu_v5" in str(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.system_name("mi300x")
    assert "h100-sxm" in _one_line(ei.value)


def test_missing_extra_is_one_clear_line(monkeypatch):
    real = aic.importlib.util.find_spec
    monkeypatch.setattr(
        aic.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "aiconfigurator_core" else real(name, *a),
    )
    for call in (
        aic.data_root,
        lambda: aic.available_systems("vllm"),
        lambda: aic.calibrate_from_aiconfigurator("h100_sxm", "vllm"),
        lambda: aic.leave_one_gpu_out("vllm", ["h100_sxm", "h200_sxm"]),
    ):
        with pytest.raises(SpecError) as ei:
            call()
        assert isinstance(ei.value, aic.AiconfiguratorError)
        assert "pip install hisim-jax[aic]" in _one_line(ei.value)


def test_missing_pyarrow_is_the_same_error(monkeypatch):
    monkeypatch.setattr(aic, "_no_parquet", lambda: True)
    with pytest.raises(aic.AiconfiguratorError, match=r"pip install hisim-jax\[aic\]"):
        aic.data_root()


# ------------------------------------------------------------------------------------------------
# shipped calibrations (no package needed)


def test_calibrations_are_shipped_for_both_engines():
    names = {p.name for p in SHIPPED}
    assert {"h100-sxm.vllm.json", "h100-sxm.sglang.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_calibration_loads_and_round_trips(path: Path):
    doc = json.loads(path.read_text())
    assert json.loads(json.dumps(doc)) == doc
    gpu, engine, _ = path.name.split(".")
    assert doc["source"] == "aiconfigurator" and doc["backend"] == engine
    assert doc["hardware"] == gpu and load_hardware(gpu).name == gpu
    assert aic.hardware_name(doc["system"]) == gpu and isinstance(doc["version"], str)
    assert set(doc["params"]) == set(PARAM_NAMES) == set(doc["fitted_on"])
    p = load_calibration(path)
    assert params_to_dict(p) == pytest.approx(doc["params"])
    # what single-kernel tables cannot show is kept from the reference fit, or (vLLM) fitted
    # on the end-to-end runs (scripts/fit_e2e.py), and said to be
    base = params_to_dict(load_calibration())
    e2e = ("layer_s", "step_s", "elem_hidden", "elem_inter", "elem_qkv")
    for name in (*e2e, "gemv_saving_s"):
        if name in e2e:  # vLLM's end-to-end fit, carried to SGLang (no SGLang runs yet)
            assert "scripts/fit_e2e.py" in doc["fitted_on"][name]
            continue
        assert "kept from" in doc["fitted_on"][name]
        assert doc["params"][name] == pytest.approx(base[name], rel=1e-5)
    for name in aic.GEMM_NAMES + aic.ATTN_NAMES:
        if "scripts/fit_e2e.py" in doc["fitted_on"][name]:
            continue  # the H100's decode streaming efficiencies, refitted end to end
        fitted = name != "gemm_fp8_flops_eff" or "gemm_fp8" in doc["fit"]
        assert doc["fitted_on"][name].startswith("aiconfigurator-core") == fitted, name
    for op in ("gemm", "context_attention", "generation_attention"):
        fit = doc["fit"][op]
        assert fit["rows"] > 0 and 0.0 <= fit["mape"] < 1.0, (op, fit)


# ------------------------------------------------------------------------------------------------
# calibrate.py machinery used by the import (no package needed)


def test_repeated_request_equals_a_batch_of_copies():
    dims = ops.model_dims(load_model("llama-3.1-8b"))
    hw = ops.hw_arrays(H100)
    p = jax.tree.map(ops._float, Params())
    cases = [(0, 3000, 4), (0, 100, 64), (4095, 1, 32), (63, 1, 1), (131071, 1, 8)]
    copies = cal.AttnRows(
        ops.stack([dims] * len(cases)),
        jax.tree.map(ops._float, pack([[(c, n)] * r for c, n, r in cases])),
        ops._float(np.ones(len(cases))),
    )
    repeated = cal.AttnRows(
        ops.stack([dims] * len(cases)),
        jax.tree.map(ops._float, pack([[(c, n)] for c, n, _ in cases])),
        ops._float(np.ones(len(cases))),
        repeat=ops._float([r for *_, r in cases]),
    )
    kernel_s = eqx.filter_jit(cal._attn_kernel_s)
    a = np.asarray(kernel_s(p, copies, hw))
    b = np.asarray(kernel_s(p, repeated, hw))
    np.testing.assert_allclose(b, a, rtol=1e-12)


def test_allreduce_rows_cost_what_the_roofline_charges():
    p = jax.tree.map(ops._float, Params())
    hw = ops.hw_arrays(H100)
    dims = ops.model_dims(load_model("llama-3.1-8b"), tp=4)
    tokens = 256.0
    # the roofline: 2 all-reduces of tokens x hidden per layer + a logits all-gather
    step = float(_communication_s(p, dims, ops._float(tokens), ops._float(1.0), hw, jax.numpy))
    rows = cal.CommRows(
        ops._float([tokens * float(dims.hidden)]),
        ops._float([4.0]),
        ops._float([H100.interconnect_bytes_per_s]),
        ops._float([1.0]),
    )
    one = float(cal._comm_kernel_s(p, rows)[0])
    gather = step - 2.0 * float(dims.layers) * one
    assert 0.0 < gather < one  # the rest is one small all-gather


def _fake_tables(monkeypatch, frames: dict[str, pd.DataFrame]):
    monkeypatch.setattr(aic, "_read", lambda path: frames[path])


def test_table_rows_convert_to_our_shapes(monkeypatch):
    gen = pd.DataFrame(
        {
            "batch_size": [8, 8, 8, 8],
            "isl": [1, 1, 1, 1],
            "step": [1023, 1023, 1023, 15],
            "num_heads": [32, 32, 32, 32],
            "num_key_value_heads": [8, 8, 8, 8],
            "head_dim": [128, 128, 64, 128],
            "kv_cache_dtype": ["bfloat16", "bfloat16", "bfloat16", "fp8"],
            "kernel_source": ["fa3", "triton", "fa3", "fa3"],
            "latency": [0.02, 0.03, 0.01, 0.01],
        }
    )
    gemm = pd.DataFrame(
        {
            "m": [16, 16, 16, 16],
            "n": [4096, 4096, 4096, 32],
            "k": [4096, 4096, 4096, 4096],
            "gemm_dtype": ["bfloat16", "fp8", "fp8_block", "bfloat16"],
            "kernel_source": ["linear", "cutlass", "deepgemm", "linear"],
            "latency": [0.012, 0.008, 0.007, 0.003],
        }
    )
    # the dominant kernel ("fa3", 3 rows) wins where two kernels timed one shape
    gen = pd.concat([gen, gen.iloc[[0]].assign(step=63, latency=0.004)], ignore_index=True)
    _fake_tables(monkeypatch, {"g": gen, "m": gemm})
    a = aic.attention_frame("g", "generation")
    assert list(a["cache_len"]) == [1023.0, 63.0]  # head dim 64 and the fp8 KV cache dropped
    assert list(a["latency_s"]) == pytest.approx([2e-5, 4e-6])
    assert set(a["new_len"]) == {1.0} and set(a["kernel"]) == {"fa3"}
    c = aic.attention_frame("g", "context")
    assert list(c["new_len"]) == [1.0, 1.0] and set(c["cache_len"]) == {0.0}
    g = aic.gemm_frame("m")
    assert list(g["dtype"]) == ["bf16", "fp8"]  # block-scaled fp8 and n = 32 dropped
    assert list(g["latency_s"]) == pytest.approx([12e-6, 8e-6])


def test_fit_on_tables_recovers_gemm_efficiencies():
    """Synthetic GEMM timings from known parameters (behind a 3 us floor) on two GPUs."""
    truth = Params(
        gemm_flops_eff=0.81, gemm_fp8_flops_eff=0.55, gemm_bytes_eff=0.77, gemm_blend=0.1
    )
    rng = np.random.default_rng(0)
    gpus = [H100, load_hardware("b200")]
    frames = []
    for hw in gpus:
        n = 120
        f = pd.DataFrame(
            {
                "m": 2.0 ** rng.integers(0, 15, n),
                "k": 2.0 ** rng.integers(9, 15, n),
                "n": 2.0 ** rng.integers(9, 15, n),
                "dtype": rng.choice(["bf16", "fp8"], n),
                "latency_s": 1.0,
            }
        )
        rows = aic.gemm_rows([f], [hw])
        kernel = cal._gemm_kernel_s(jax.tree.map(ops._float, truth), rows, ops.hw_arrays(hw))
        f["latency_s"] = np.asarray(cal._eager_s(kernel, np.log(3e-6)))
        frames.append((hw, {"gemm": f}))
    result, names = aic._fit_tables(frames, Params(), steps_n=200, progress=None)
    assert names == aic.GEMM_NAMES
    for name in ("gemm_flops_eff", "gemm_fp8_flops_eff", "gemm_bytes_eff"):
        assert float(getattr(result.params, name)) == pytest.approx(getattr(truth, name), rel=0.06)
    report = aic._report(result.params, result.eager_s, gpus[1], frames[1][1])
    assert report["gemm"]["mape"] < 0.03


# ------------------------------------------------------------------------------------------------
# the installed package's data (skipped without the extra)


@pytest.fixture
def _needs_data():
    pytest.importorskip("pyarrow")
    pytest.importorskip("aiconfigurator_core")


@pytest.mark.usefixtures("_needs_data")
def test_listing_systems_engines_versions():
    assert "h100_sxm" in aic.available_systems("vllm")
    assert {"vllm", "sglang"} <= set(aic.available_engines("h100_sxm"))
    known = aic.versions("h100_sxm", "vllm")
    assert aic.resolve_version("h100_sxm", "vllm") in known
    assert aic.resolve_version("h100_sxm", "vllm", known[-1]) == known[-1]


@pytest.mark.usefixtures("_needs_data")
def test_bad_choices_are_one_line_errors_listing_valid_ones():
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.resolve_version("h100_sxm", "vllm", "9.9.9")
    assert aic.resolve_version("h100_sxm", "vllm") in _one_line(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.resolve_version("h100_sxm", "tgi")
    assert "vllm, sglang, trtllm" in _one_line(ei.value)
    with pytest.raises(aic.AiconfiguratorError) as ei:
        aic.calibrate_from_aiconfigurator("b60", "vllm")  # data, but no hisim spec
    assert "h100_sxm" in _one_line(ei.value)


@pytest.mark.usefixtures("_needs_data")
def test_reading_h100_vllm_tables():
    version, frames, used = aic.read_tables("h100_sxm", "vllm")
    assert set(aic.FITTED_OPS) <= set(frames) and set(used) == set(frames)
    for op, f in frames.items():
        assert len(f) > 0 and (f["latency_s"] > 0).all(), op
        assert aic._version_key(used[op]) <= aic._version_key(version)
    assert (frames["generation_attention"]["new_len"] == 1).all()
    assert (frames["context_attention"]["cache_len"] == 0).all()
    assert set(frames["gemm"]["dtype"]) == {"bf16", "fp8"}


@pytest.mark.usefixtures("_needs_data")
def test_calibrate_document_on_a_small_sample(tmp_path):
    calls = []
    doc = aic.calibrate_from_aiconfigurator(
        "h100_sxm", "vllm", steps_n=5, max_rows=30, progress=lambda i, n: calls.append((i, n))
    )
    assert calls[-1] == (5, 5)
    assert doc["source"] == "aiconfigurator" and doc["backend"] == "vllm"
    assert doc["hardware"] == "h100-sxm" and doc["tables"]["gemm"]["rows"] == 30
    assert {"gemm", "context_attention", "generation_attention", "allreduce"} <= set(doc["fit"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    assert params_to_dict(load_calibration(path)) == pytest.approx(doc["params"])


@pytest.mark.usefixtures("_needs_data")
def test_leave_one_gpu_out_reports_every_held_out_gpu():
    out = aic.leave_one_gpu_out("vllm", ["h100_sxm", "h200_sxm"], steps_n=5, max_rows=30)
    assert set(out["held_out"]) == {"h100_sxm", "h200_sxm"}
    for fit in out["held_out"].values():
        assert fit["gemm"]["rows"] == 30 and np.isfinite(fit["generation_attention"]["mape"])
