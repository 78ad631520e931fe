"""Efficiencies fitted on one GPU meet another GPU's ceilings through the two cards' sustained
fractions of peak (hardware specs' ``sustained:``), per parameter family."""

import dataclasses

import numpy as np
import pytest

from hisim_jax import Estimator
from hisim_jax.estimator import ops
from hisim_jax.estimator import roofline as rf
from hisim_jax.specs import load_hardware, sustained_ratios


def test_each_family_is_traced_to_the_gpu_it_was_fitted_on():
    assert rf.calibration_gpus(None, "h100-sxm") == dict.fromkeys(rf.TRANSFER, "h100-sxm")
    # b200's vLLM file: GEMM throughput from b200's own tables, the HBM stream and the
    # elementwise kernels carried over from the H100's end-to-end fit
    gpus = rf.calibration_gpus(None, "b200", "vllm")
    assert gpus["gemm_bf16_scale"] == gpus["gemm_fp8_scale"] == "b200"
    assert gpus["hbm_scale"] == gpus["copy_scale"] == "h100-sxm"
    # gb200 is not read as b200
    assert rf.calibration_gpus(None, "gb200", "vllm")["gemm_bf16_scale"] == "gb200"


def test_scales_are_ratios_of_sustained_fractions_and_one_without_data():
    h100, h200 = load_hardware("h100-sxm"), load_hardware("h200-sxm")
    gpus = dict.fromkeys(rf.TRANSFER, "h100-sxm")
    assert rf.transfer_scales(gpus, h100) == dict.fromkeys(rf.TRANSFER, 1.0)
    s = rf.transfer_scales(gpus, h200)
    r = sustained_ratios(h100, h200)
    assert s["gemm_bf16_scale"] == pytest.approx(r["bf16_gemm_flops_per_s"])
    assert s["hbm_scale"] == s["copy_scale"] == pytest.approx(r["hbm_bytes_per_s"])
    assert s["gemm_bf16_scale"] < 1.0  # the H200's big GEMMs reach less of the same peak
    # a datasheet-only GPU keeps the fitted efficiencies as they are
    assert rf.transfer_scales(gpus, load_hardware("rtx-4090")) == dict.fromkeys(rf.TRANSFER, 1.0)
    # no fp8 tensor cores (A100): fp8 GEMMs run at the bf16 rate, so take its ratio
    a100 = rf.transfer_scales(gpus, load_hardware("a100-sxm-80gb"))
    assert a100["gemm_fp8_scale"] == a100["gemm_bf16_scale"]


def test_a_gpus_sustained_ceilings_slow_what_they_bound():
    """The same H100 calibration on an H200, with and without its measured ceilings: a
    GEMM-bound prefill slows by the GEMM ratio, a decode on long contexts (HBM-bound) by
    at most the HBM one."""
    h200 = load_hardware("h200-sxm")
    bare = dataclasses.replace(
        h200,
        sustained_hbm_bytes_per_s=0.0,
        sustained_bf16_gemm_flops_per_s=0.0,
        sustained_fp8_gemm_flops_per_s=0.0,
    )
    r = sustained_ratios(load_hardware("h100-sxm"), h200)
    prefill, decode = [(0, 8192)], [(32768, 1)] * 64
    with_data = Estimator("llama-3.1-8b", h200)
    without = Estimator("llama-3.1-8b", bare)
    assert without.transfer == [dict.fromkeys(rf.TRANSFER, 1.0)]
    slow = with_data.step_latency_s([prefill, decode]) / without.step_latency_s([prefill, decode])
    slow = np.ravel(slow)
    gemm_share = with_data.breakdown_s(prefill)
    assert 1.0 < slow[0] <= 1.0 / r["bf16_gemm_flops_per_s"] + 1e-9
    assert gemm_share["mlp"] > 0.3 * sum(gemm_share.values())
    assert 1.0 < slow[1] <= 1.0 / r["hbm_bytes_per_s"] + 1e-9


def test_hw_arrays_refuses_unknown_scales():
    with pytest.raises(ValueError, match="unknown transfer scale"):
        ops.hw_arrays(load_hardware("h100-sxm"), {"gemm_scale": 0.9})
