"""The operator inventory of one forward step: FLOPs and bytes of every op, as pure jnp.

Everything here is per tensor-parallel rank and per step. Shapes: batch fields are ``[R]`` (one
bucket of requests); model and hardware fields are scalars. All functions take ``xp`` (``jnp`` by
default, ``numpy`` works too) so the same formulas serve the jitted estimator and the plain-Python
reference loop of ``scripts/bench_estimator.py``.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from hisim_jax.specs import HardwareSpec, ModelSpec

DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp4": 0.5}


def _float(x) -> jnp.ndarray:
    """A scalar leaf in the default float dtype (float64 under x64), so strict promotion holds."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


class ModelDims(eqx.Module):
    """A model's dimensions per TP rank, plus dtypes, as float leaves (vmappable over models)."""

    hidden: jnp.ndarray
    layers: jnp.ndarray
    q_heads: jnp.ndarray  # per rank
    kv_heads: jnp.ndarray  # per rank (replicated when tp > kv heads)
    head_dim: jnp.ndarray
    inter: jnp.ndarray  # dense MLP width per rank
    dense_layers: jnp.ndarray
    moe_layers: jnp.ndarray
    experts: jnp.ndarray
    top_k: jnp.ndarray
    moe_inter: jnp.ndarray  # per expert, per rank
    vocab: jnp.ndarray  # LM-head columns per rank
    window: jnp.ndarray  # sliding window in tokens; 0 = full attention
    qkv_bias: jnp.ndarray  # 0/1
    qk_norm: jnp.ndarray  # 0/1
    tp: jnp.ndarray
    weight_bytes: jnp.ndarray  # bytes per weight element
    act_bytes: jnp.ndarray  # bytes per activation element between kernels
    gemm_in_bytes: jnp.ndarray  # bytes per GEMM input activation (1 when activations are fp8)
    kv_bytes: jnp.ndarray  # bytes per KV-cache element


def model_dims(
    spec: ModelSpec,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    act_dtype: str | None = None,
) -> ModelDims:
    """``act_dtype`` is the GEMM input precision; by default fp8/fp4 weights mean W8A8 GEMMs
    (SGLang's fp8 path on Hopper quantizes activations per token), bf16 weights mean bf16.
    Pass ``act_dtype="bf16"`` with fp8 weights for weight-only quantization (bf16 compute)."""
    if tp < 1 or spec.num_heads % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={spec.num_heads} of {spec.name}")
    if act_dtype is None:
        act_dtype = "fp8" if DTYPE_BYTES.get(weight_dtype, 2.0) < 2.0 else "bf16"
    for what, dt in (
        ("weight dtype", weight_dtype),
        ("kv dtype", kv_dtype),
        ("act dtype", act_dtype),
    ):
        if dt not in DTYPE_BYTES:
            raise ValueError(f"{what} {dt!r} unknown (choose from {', '.join(DTYPE_BYTES)})")
    f = _float
    return ModelDims(
        hidden=f(spec.hidden_size),
        layers=f(spec.num_layers),
        q_heads=f(spec.num_heads // tp),
        kv_heads=f(max(1, spec.num_kv_heads // tp)),
        head_dim=f(spec.head_dim),
        inter=f(spec.intermediate_size / tp),
        dense_layers=f(spec.num_layers - spec.num_moe_layers),
        moe_layers=f(spec.num_moe_layers),
        experts=f(spec.num_experts),
        top_k=f(spec.experts_per_token),
        moe_inter=f(spec.moe_intermediate_size / tp),
        vocab=f(spec.vocab_size / tp),
        window=f(spec.sliding_window or 0),
        qkv_bias=f(float(spec.qkv_bias)),
        qk_norm=f(float(spec.qk_norm)),
        tp=f(tp),
        weight_bytes=f(DTYPE_BYTES[weight_dtype]),
        act_bytes=f(2.0),
        gemm_in_bytes=f(DTYPE_BYTES[act_dtype]),
        kv_bytes=f(DTYPE_BYTES[kv_dtype]),
    )


class HwArrays(eqx.Module):
    """The hardware numbers the estimator uses, as float leaves (vmappable over GPUs)."""

    sm_count: jnp.ndarray
    bf16_flops_per_s: jnp.ndarray
    fp8_flops_per_s: jnp.ndarray
    fp4_flops_per_s: jnp.ndarray
    hbm_bytes_per_s: jnp.ndarray
    interconnect_bytes_per_s: jnp.ndarray


def hw_arrays(spec: HardwareSpec) -> HwArrays:
    return HwArrays(*(_float(getattr(spec, k)) for k in HwArrays.__dataclass_fields__))


def stack(trees):
    """Stack equal-structured pytrees (e.g. several HwArrays) along a new leading axis, as
    numpy leaves (a jnp stack would compile a program per leaf shape on every start)."""
    import jax

    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def gemm_peak_flops(dims: ModelDims, hw: HwArrays, xp=jnp):
    """Tensor-core peak of the GEMMs: the wider of weight and input precision sets it."""
    widest = xp.maximum(dims.weight_bytes, dims.gemm_in_bytes)
    return xp.where(
        widest < 0.75,
        hw.fp4_flops_per_s,
        xp.where(widest < 1.5, hw.fp8_flops_per_s, hw.bf16_flops_per_s),
    )


# ------------------------------------------------------------------------------------------------
# GEMMs: (m, k, n) of every projection, per layer


def layer_gemm_shapes(dims: ModelDims):
    """Dense-layer projections as (name, k, n): m is the token count of the step."""
    d = dims.head_dim
    return (
        ("qkv", dims.hidden, (dims.q_heads + 2.0 * dims.kv_heads) * d),
        ("o", dims.q_heads * d, dims.hidden),
        ("gate_up", dims.hidden, 2.0 * dims.inter),
        ("down", dims.inter, dims.hidden),
    )


def gemm_flops(m, k, n):
    return 2.0 * m * k * n


def gemm_bytes(m, k, n, w_bytes, in_bytes, out_bytes=2.0):
    """Weights read once, input activations read once, bf16 output written once."""
    return k * n * w_bytes + m * k * in_bytes + m * n * out_bytes


def moe_experts_touched(tokens, experts, top_k, xp=jnp):
    """Expected number of distinct experts hit when ``tokens`` each pick ``top_k`` of ``experts``."""
    safe_e = xp.maximum(experts, 1.0)
    p_unused = (1.0 - xp.minimum(top_k / safe_e, 1.0)) ** tokens
    return xp.where(experts > 0, experts * (1.0 - p_unused), 0.0)


def moe_padded_rows(tokens, experts, top_k, block_m, xp=jnp):
    """Rows the fused-MoE kernel computes: each touched expert's tokens padded to its M tile."""
    touched = moe_experts_touched(tokens, experts, top_k, xp)
    per_expert = tokens * top_k / xp.maximum(touched, 1.0)
    return touched * xp.ceil(per_expert / block_m) * block_m


# ------------------------------------------------------------------------------------------------
# elementwise work that no GEMM or attention kernel absorbs


def elementwise_elems_per_token(dims: ModelDims, coeff_hidden, coeff_inter, coeff_qkv):
    """Activation elements read+written per token per layer by unfused ops (norms, residual
    adds, rotary, KV write, SiLU·mul, QK-norm). The coefficients are fitted: they count passes
    over a vector of that width, which depends on how far the engine fuses its kernels."""
    qkv_width = (dims.q_heads + 2.0 * dims.kv_heads) * dims.head_dim
    mlp_width = dims.inter * dims.dense_layers / dims.layers + dims.top_k * dims.moe_inter * (
        dims.moe_layers / dims.layers
    )
    # QK-norm is one more RMSNorm pass over q and k; bias adds are fused into the GEMM epilogue.
    qk_norm = dims.qk_norm * 0.25 * coeff_hidden * (dims.q_heads + dims.kv_heads) * dims.head_dim
    return coeff_hidden * dims.hidden + coeff_inter * mlp_width + coeff_qkv * qkv_width + qk_norm


def allreduce_bytes_per_rank(elems, dims: ModelDims):
    """Ring all-reduce traffic each rank sends: 2 (tp-1)/tp of the buffer."""
    return 2.0 * (dims.tp - 1.0) / dims.tp * elems * dims.act_bytes


def np_dims(dims: ModelDims) -> ModelDims:
    """The same dims with numpy leaves, for the plain-Python reference path."""
    import jax

    return jax.tree.map(np.asarray, dims)
