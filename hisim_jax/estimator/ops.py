"""The operator inventory of one forward step: FLOPs and bytes of every op, as pure jnp.

Everything here is per tensor-parallel rank and per step. Shapes: batch fields are ``[R]`` (one
bucket of requests); model and hardware fields are scalars. All functions take ``xp`` (``jnp`` by
default, ``numpy`` works too) so the same formulas serve the jitted estimator and the plain-Python
reference loop of ``scripts/bench_estimator.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hisim_jax.estimator.pytree import pytree_dataclass
from hisim_jax.specs import HardwareSpec, ModelSpec

# Bytes per element as kernels stream them; 4-bit formats carry their block scales (MXFP4:
# an e8m0 per 32, int4: a bf16 per group of 32), which the weight stream reads too.
DTYPE_BYTES = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "fp4": 0.5,
    "mxfp4": 0.5 + 1.0 / 32,
    "int4": 0.5 + 2.0 / 32,
}


def _float(x) -> jnp.ndarray:
    """A scalar leaf in the default float dtype (float64 under x64), so strict promotion holds."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


@pytree_dataclass
class ModelDims:
    """A model's dimensions per TP rank, plus dtypes, as float leaves (vmappable over models).

    ``q_heads``/``kv_heads``/``head_dim`` are the softmax-attention layers' (sliding and
    chunked ones, and full ones unless ``g_*`` say otherwise); ``n_<kind>`` count the layers
    of each token mixer (specs.ATTENTION_KINDS), ``dense_layers``/``moe_layers`` the MLPs."""

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
    # layer counts by token mixer
    n_full: jnp.ndarray = 0.0
    n_sliding: jnp.ndarray = 0.0
    n_chunked: jnp.ndarray = 0.0
    n_mla: jnp.ndarray = 0.0
    n_gdn: jnp.ndarray = 0.0
    n_mamba: jnp.ndarray = 0.0
    chunk: jnp.ndarray = 0.0  # chunked layers' chunk in tokens
    q_out: jnp.ndarray = 1.0  # q_proj outputs per head dim (2: Qwen3.5's output gate)
    g_kv_heads: jnp.ndarray = 0.0  # full layers' KV heads per rank (Gemma 4; else kv_heads)
    g_head_dim: jnp.ndarray = 0.0
    g_kv_copies: jnp.ndarray = 2.0  # K and V kept apart (2) or one tensor for both (1)
    mlp_mats: jnp.ndarray = 3.0  # gate+up+down (3) or up+down (2)
    shared_inter: jnp.ndarray = 0.0  # always-on experts' width per rank
    experts_local: jnp.ndarray = 0.0  # routed experts on one rank (experts / ep)
    ep: jnp.ndarray = 1.0  # expert-parallel ranks
    dp: jnp.ndarray = 1.0  # attention data-parallel ranks (SGLang --dp with dp attention)
    expert_weight_bytes: jnp.ndarray = 2.0
    # MLA (per rank: heads)
    mla_heads: jnp.ndarray = 0.0
    q_lora: jnp.ndarray = 0.0
    kv_lora: jnp.ndarray = 0.0
    qk_nope: jnp.ndarray = 0.0
    qk_rope: jnp.ndarray = 0.0
    v_dim: jnp.ndarray = 0.0
    index_topk: jnp.ndarray = 0.0
    index_heads: jnp.ndarray = 0.0
    index_dim: jnp.ndarray = 0.0
    # Gated DeltaNet (heads per rank)
    gdn_k_heads: jnp.ndarray = 0.0
    gdn_v_heads: jnp.ndarray = 0.0
    gdn_k_dim: jnp.ndarray = 0.0
    gdn_v_dim: jnp.ndarray = 0.0
    # Mamba-2 (heads and groups per rank)
    m_heads: jnp.ndarray = 0.0
    m_head_dim: jnp.ndarray = 0.0
    m_state: jnp.ndarray = 0.0
    m_groups: jnp.ndarray = 0.0
    conv_kernel: jnp.ndarray = 0.0
    state_bytes: jnp.ndarray = 2.0  # recurrent-state element bytes


def attention_kinds(spec: ModelSpec) -> tuple[str, ...]:
    """The softmax and recurrent token mixers this model has, in a fixed order: the static
    part of a cost graph (a kind the model lacks is not traced)."""
    order = ("full", "sliding", "chunked", "mla", "gdn", "mamba2")
    return tuple(k for k in order if spec.layers(k))


def model_dims(
    spec: ModelSpec,
    tp: int = 1,
    weight_dtype: str | None = None,
    kv_dtype: str = "bf16",
    act_dtype: str | None = None,
    ep: int = 1,
    dp: int = 1,
) -> ModelDims:
    """``weight_dtype``: every linear layer's format; None: the checkpoint's own (its
    quantization_config: fp8 DeepSeek, MXFP4 gpt-oss experts). ``act_dtype`` is the GEMM
    input precision; by default fp8/fp4 weights mean W8A8 GEMMs (SGLang's fp8 path on Hopper
    quantizes activations per token), bf16 weights (or 4-bit experts beside bf16 layers,
    weight-only) mean bf16. ``ep``: ranks the routed experts are spread over (each holds
    experts/ep of them, split tp/ep ways); ``dp``: attention data-parallel ranks (each runs
    attention for 1/dp of the batch with tp/dp-way heads)."""
    if why := spec.parallelism_error(tp, ep, dp):
        raise ValueError(why)
    dense_dtype = weight_dtype or spec.weight_dtype
    expert_dtype = weight_dtype or spec.expert_weight_dtype
    if act_dtype is None:
        act_dtype = "fp8" if DTYPE_BYTES.get(dense_dtype, 2.0) < 2.0 else "bf16"
    for what, dt in (
        ("weight dtype", dense_dtype),
        ("expert weight dtype", expert_dtype),
        ("kv dtype", kv_dtype),
        ("act dtype", act_dtype),
    ):
        if dt not in DTYPE_BYTES:
            raise ValueError(f"{what} {dt!r} unknown (choose from {', '.join(DTYPE_BYTES)})")
    f = _float
    atp = tp // dp  # attention's tensor parallelism
    moe_tp = tp // ep  # ranks one expert is split over
    n = spec.layers
    g_kv = spec.global_kv_heads or spec.num_kv_heads
    return ModelDims(
        hidden=f(spec.hidden_size),
        layers=f(spec.num_layers),
        q_heads=f(spec.num_heads // atp),
        kv_heads=f(max(1, spec.num_kv_heads // atp)),
        head_dim=f(spec.head_dim),
        inter=f(spec.intermediate_size / tp),
        dense_layers=f(n(mlp="dense")),
        moe_layers=f(n(mlp="moe")),
        experts=f(spec.num_experts),
        top_k=f(spec.experts_per_token),
        moe_inter=f(spec.moe_intermediate_size / moe_tp),
        vocab=f(spec.vocab_size / tp),
        window=f(spec.sliding_window or 0),
        qkv_bias=f(float(spec.qkv_bias)),
        qk_norm=f(float(spec.qk_norm)),
        tp=f(tp),
        weight_bytes=f(DTYPE_BYTES[dense_dtype]),
        act_bytes=f(2.0),
        gemm_in_bytes=f(DTYPE_BYTES[act_dtype]),
        kv_bytes=f(DTYPE_BYTES[kv_dtype]),
        n_full=f(n("full")),
        n_sliding=f(n("sliding")),
        n_chunked=f(n("chunked")),
        n_mla=f(n("mla")),
        n_gdn=f(n("gdn")),
        n_mamba=f(n("mamba2")),
        chunk=f(spec.attention_chunk or 0),
        q_out=f(2.0 if spec.attn_output_gate else 1.0),
        g_kv_heads=f(max(1, g_kv // atp)),
        g_head_dim=f(spec.global_head_dim or spec.head_dim),
        g_kv_copies=f(1.0 if spec.global_kv_shared else 2.0),
        mlp_mats=f(3.0 if spec.mlp_gated else 2.0),
        shared_inter=f(spec.shared_expert_intermediate_size / tp),
        experts_local=f(spec.num_experts / ep),
        ep=f(ep),
        dp=f(dp),
        expert_weight_bytes=f(DTYPE_BYTES[expert_dtype]),
        mla_heads=f(spec.num_heads // atp if spec.layers("mla") else 0),
        q_lora=f(spec.q_lora_rank),
        kv_lora=f(spec.kv_lora_rank),
        qk_nope=f(spec.qk_nope_head_dim),
        qk_rope=f(spec.qk_rope_head_dim),
        v_dim=f(spec.v_head_dim),
        index_topk=f(spec.index_topk),
        index_heads=f(spec.index_n_heads),
        index_dim=f(spec.index_head_dim),
        gdn_k_heads=f(spec.linear_num_key_heads // tp),
        gdn_v_heads=f(spec.linear_num_value_heads // tp),
        gdn_k_dim=f(spec.linear_key_head_dim),
        gdn_v_dim=f(spec.linear_value_head_dim),
        m_heads=f(spec.mamba_num_heads // tp),
        m_head_dim=f(spec.mamba_head_dim),
        m_state=f(spec.ssm_state_size),
        m_groups=f(spec.mamba_groups // tp),
        conv_kernel=f(spec.conv_kernel),
        state_bytes=f(spec.state_dtype_bytes),
    )


@pytree_dataclass
class AttnDims:
    """One attention kernel's shape per rank: query heads, KV heads, the q·k and value
    dims, elements read per key per KV head (2·head_dim for K and V; MLA's latent is one
    shared 576-element vector), keys visible per query (window; 0 = all) and KV bytes."""

    q_heads: jnp.ndarray
    kv_heads: jnp.ndarray
    head_dim: jnp.ndarray  # q·k dim
    v_dim: jnp.ndarray
    kv_elems: jnp.ndarray
    window: jnp.ndarray
    kv_bytes: jnp.ndarray


def gqa_attention(dims: ModelDims, kind: str) -> AttnDims:
    """The GQA kernel of full (``g_*`` dims, no window), sliding (the window) or chunked
    layers (the chunk, over the position within it: see ``roofline.step_features``)."""
    if kind == "full":
        return AttnDims(
            dims.q_heads,
            dims.g_kv_heads,
            dims.g_head_dim,
            dims.g_head_dim,
            dims.g_kv_copies * dims.g_head_dim,
            0.0 * dims.window,
            dims.kv_bytes,
        )
    window = dims.window if kind == "sliding" else dims.chunk
    d = dims.head_dim
    return AttnDims(dims.q_heads, dims.kv_heads, d, d, 2.0 * d, window, dims.kv_bytes)


def mla_decode_attention(dims: ModelDims, rows=1.0) -> AttnDims:
    """MLA absorbed (FlashMLA-style): every query head attends the one shared latent + rope
    key (576 = 512 + 64 for DeepSeek-V3) and reads the latent as its value; sparse models
    attend only their indexer's top-k keys. ``rows``: query tokens per request (a
    speculative verify's k+1), folded with the heads into the kernel's rows."""
    latent = dims.kv_lora + dims.qk_rope
    return AttnDims(
        dims.mla_heads * rows, 1.0 + 0.0 * dims.kv_lora, latent, dims.kv_lora, latent,
        dims.index_topk, dims.kv_bytes,
    )  # fmt: skip


def mla_prefill_attention(dims: ModelDims) -> AttnDims:
    """MLA prefill as multi-head attention over keys and values up-projected from the latent
    (bf16, per head: nope + rope key dims, v value dims)."""
    qk = dims.qk_nope + dims.qk_rope
    return AttnDims(
        dims.mla_heads, dims.mla_heads, qk, dims.v_dim, qk + dims.v_dim, dims.index_topk,
        dims.act_bytes,
    )  # fmt: skip


def indexer_attention(dims: ModelDims, rows=1.0) -> AttnDims:
    """DeepSeek sparse attention's lightning indexer: index heads score every cached key (one
    fp8 key head, no values) to pick each query's top-k (``rows``: as for the absorbed MLA)."""
    return AttnDims(
        dims.index_heads * rows, 1.0 + 0.0 * dims.index_dim, dims.index_dim, 0.0 * dims.index_dim,
        dims.index_dim, 0.0 * dims.index_dim, 1.0 + 0.0 * dims.index_dim,
    )  # fmt: skip


def as_attention(dims) -> AttnDims:
    """``AttnDims`` as given, or the GQA kernel of a ``ModelDims`` with its own window (the
    kernel-level fits in calibrate.py and aiconfigurator.py pass ModelDims rows)."""
    if isinstance(dims, AttnDims):
        return dims
    d = dims.head_dim
    return AttnDims(dims.q_heads, dims.kv_heads, d, d, 2.0 * d, dims.window, dims.kv_bytes)


@pytree_dataclass
class HwArrays:
    """The hardware numbers the estimator uses, as float leaves (vmappable over GPUs)."""

    sm_count: jnp.ndarray
    bf16_flops_per_s: jnp.ndarray
    fp8_flops_per_s: jnp.ndarray
    fp4_flops_per_s: jnp.ndarray
    hbm_bytes_per_s: jnp.ndarray
    interconnect_bytes_per_s: jnp.ndarray
    # How this GPU's sustained ceilings compare with those of the GPU the efficiencies were
    # fitted on, as a ratio of sustained fractions of peak (specs.sustained_ratios; 1 where
    # either lacks a measurement): bf16 and fp8/fp4 GEMM throughput, the HBM stream of GEMMs
    # and attention, and the copy stream of the elementwise kernels.
    gemm_bf16_scale: jnp.ndarray = 1.0
    gemm_fp8_scale: jnp.ndarray = 1.0
    hbm_scale: jnp.ndarray = 1.0
    copy_scale: jnp.ndarray = 1.0


SCALE_FIELDS = ("gemm_bf16_scale", "gemm_fp8_scale", "hbm_scale", "copy_scale")
# the spec's own numbers: every other field, named as in HardwareSpec
HW_FIELDS = tuple(f for f in HwArrays.__dataclass_fields__ if f not in SCALE_FIELDS)


def hw_arrays(spec: HardwareSpec, scales: dict[str, float] | None = None) -> HwArrays:
    """The spec's numbers, with the transfer ``scales`` (SCALE_FIELDS; default 1) from the
    GPUs a calibration was fitted on (roofline.transfer_scales)."""
    scales = scales or {}
    unknown = set(scales) - set(SCALE_FIELDS)
    if unknown:
        raise ValueError(f"unknown transfer scale(s): {', '.join(sorted(unknown))}")
    return HwArrays(
        *(_float(getattr(spec, k)) for k in HW_FIELDS),
        *(_float(scales.get(k, 1.0)) for k in SCALE_FIELDS),
    )


def hbm_ceiling(hw: HwArrays):
    """HBM bandwidth the fitted stream efficiencies of GEMMs and attention apply to."""
    return hw.hbm_bytes_per_s * hw.hbm_scale


def gemm_rate(hw: HwArrays, low_precision, fp4=None, xp=jnp):
    """Tensor-core peak a GEMM's fitted efficiency applies to: bf16, or fp8 (fp4 where
    ``fp4``) for ``low_precision``, each scaled by its transfer ratio."""
    fp8 = (
        hw.fp8_flops_per_s if fp4 is None else xp.where(fp4, hw.fp4_flops_per_s, hw.fp8_flops_per_s)
    )
    return xp.where(
        low_precision, fp8 * hw.gemm_fp8_scale, hw.bf16_flops_per_s * hw.gemm_bf16_scale
    )


def stack(trees):
    """Stack equal-structured pytrees (e.g. several HwArrays) along a new leading axis, as
    numpy leaves (a jnp stack would compile a program per leaf shape on every start)."""
    import jax

    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def gemm_peak_flops(dims: ModelDims, hw: HwArrays, xp=jnp):
    """Tensor-core peak of the GEMMs: the wider of weight and input precision sets it."""
    widest = xp.maximum(dims.weight_bytes, dims.gemm_in_bytes)
    return gemm_rate(hw, widest < 1.5, widest < 0.75, xp)


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


def mixer_width(dims: ModelDims):
    """The token mixer's projected width per token, averaged over the layers (q/k/v for GQA;
    queries, latent and values for MLA; q/k/v/z for GDN; z/x/B/C for Mamba-2)."""
    gqa = (dims.q_heads * dims.q_out + 2.0 * dims.kv_heads) * dims.head_dim
    full = (dims.q_heads * dims.q_out + dims.g_kv_copies * dims.g_kv_heads) * dims.g_head_dim
    mla = dims.mla_heads * (dims.qk_nope + dims.qk_rope + dims.v_dim) + dims.kv_lora
    gdn = 2.0 * (dims.gdn_k_heads * dims.gdn_k_dim + dims.gdn_v_heads * dims.gdn_v_dim)
    mamba = 2.0 * (dims.m_heads * dims.m_head_dim + dims.m_groups * dims.m_state)
    total = (
        dims.n_full * full
        + (dims.n_sliding + dims.n_chunked) * gqa
        + dims.n_mla * mla
        + dims.n_gdn * gdn
        + dims.n_mamba * mamba
    )
    return total / dims.layers


def elementwise_elems_per_token(dims: ModelDims, coeff_hidden, coeff_inter, coeff_qkv):
    """Activation elements read+written per token per layer by unfused ops (norms, residual
    adds, rotary, KV write, SiLU·mul, QK-norm). The coefficients are fitted: they count passes
    over a vector of that width, which depends on how far the engine fuses its kernels."""
    qkv_width = mixer_width(dims)
    mlp_width = dims.inter * dims.dense_layers / dims.layers + (
        dims.top_k / dims.ep * dims.moe_inter + dims.shared_inter
    ) * (dims.moe_layers / dims.layers)
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
