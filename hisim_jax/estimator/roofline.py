"""Step latency: operator FLOPs and bytes (ops.py) + attention grid (attention.py) + roofline
shaped by fitted efficiencies → seconds. The one jit(vmap) boundary of the package.

Two stages keep the vectorized call cheap: ``features`` reduces a padded batch to a handful of
hardware-independent scalars (O(R) work, done once per batch), and ``costs`` turns those into
per-operator seconds for one GPU (O(1) plus the split-KV candidate scan), vmapped over GPUs.

Fitted parameters are relative to the hardware's datasheet peaks (efficiencies) or are small
absolute fixed costs (kernels that do little), so they transfer to GPUs never profiled.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hisim_jax import compile_cache, files
from hisim_jax.estimator import ops
from hisim_jax.estimator.attention import fa2 as attn
from hisim_jax.estimator.attention import fa3, flashinfer
from hisim_jax.estimator.batch import (
    Batch,
    RaggedBatches,
    bucket_size,
    pack_ragged,
)
from hisim_jax.estimator.ops import HwArrays, ModelDims
from hisim_jax.estimator.pytree import pytree_dataclass
from hisim_jax.paths import data_dir
from hisim_jax.specs import HardwareSpec, ModelSpec, SpecError, load_hardware, load_model

DEFAULT_CALIBRATION = "h100-sxm"
_MOE_BLOCK_M = 64.0  # fused-MoE kernel M tile (SGLang/vLLM triton fused_moe default config)
# Elementwise kernels stream at the device-to-device copy ceiling: 2.97 of 3.35 TB/s measured
# on the H100 (data/profiles/h100/device.json). Their fitted pass counts absorb the rest.
COPY_BW_FRACTION = 0.886


@pytree_dataclass
class Params:
    """Fitted scale factors. Efficiencies are fractions of datasheet peaks; ``*_s`` are seconds."""

    gemm_flops_eff: jnp.ndarray = 0.72
    gemm_fp8_flops_eff: jnp.ndarray = 0.62  # fp8/fp4 GEMMs reach less of their (higher) peak
    gemm_bytes_eff: jnp.ndarray = 0.80
    gemm_blend: jnp.ndarray = 0.2  # how much of the non-binding roofline side still shows
    attn_flops_eff: jnp.ndarray = 0.5
    attn_bytes_eff: jnp.ndarray = 0.8
    attn_chain_flops_eff: jnp.ndarray = 0.3  # one CTA alone on an SM, vs the SM's share of peak
    attn_chain_bytes_eff: jnp.ndarray = 0.75  # one CTA's K/V stream vs the SM's share of HBM
    attn_blend: jnp.ndarray = 0.3  # tail of the block schedule beyond max(work, chain)
    # a block's tile math while another block shares its SM, over alone: 1.65x in the FA2
    # micro-benchmarks (data/profiles/h100/attention.csv), so 0.65 more
    attn_shared_slowdown: jnp.ndarray = 0.65
    attn_block_s: jnp.ndarray = 1.0e-6  # per thread block: Q load, softmax epilogue, O write
    attn_combine_s: jnp.ndarray = 3.0e-6  # the split-KV combine kernel's fixed cost
    elem_hidden: jnp.ndarray = 40.0  # unfused passes over hidden-width vectors per token-layer
    elem_inter: jnp.ndarray = 5.0  # ... over MLP-width vectors
    elem_qkv: jnp.ndarray = 8.0  # ... over q/k/v-width vectors
    layer_s: jnp.ndarray = 70.0e-6  # fixed cost per layer (small kernels, even in a CUDA graph)
    gemv_saving_s: jnp.ndarray = 3.0e-6  # per cuBLAS GEMM with one row: a GEMV kernel, no tiles
    step_s: jnp.ndarray = 50.0e-6  # fixed cost per step (embedding, final norm, argmax)
    comm_eff: jnp.ndarray = 0.75  # all-reduce bus efficiency vs the interconnect's peak
    comm_latency_s: jnp.ndarray = 8.0e-6  # per all-reduce
    # The new layer kinds' kernels, fitted on aiconfigurator-core's kernel tables (H100; see
    # BENCHMARKS.md "Kernel tables of the new layer kinds"): MLA kernels stream the latent at
    # ~0.9 of HBM and compute at 0.6-0.8 of bf16 peak, far above FA2's fitted attention rates
    mla_flops_eff: jnp.ndarray = 0.63
    mla_bytes_eff: jnp.ndarray = 0.92
    # fused-MoE: the least a CTA (one 64-row block x 128-column tile of an expert GEMM)
    # takes, and the fp8/fp4 experts' compute efficiency (grouped GEMMs reach less of it)
    moe_tile_s: jnp.ndarray = 2.8e-6
    moe_fp8_flops_eff: jnp.ndarray = 0.25
    # DeepEP: normal mode (prefill) runs on 20 SMs, each moving about this much, and a
    # dispatch + combine pair has its own fixed cost
    a2a_sm_gb_s: jnp.ndarray = 18.0
    a2a_latency_s: jnp.ndarray = 40.0e-6
    # GDN / Mamba-2 chunked scans: a small share of bf16 peak by the flop count here, and a
    # fixed cost per prefill call (chunk kernels launched in sequence)
    scan_flops_eff: jnp.ndarray = 0.05
    scan_bytes_eff: jnp.ndarray = 0.8
    scan_fixed_s: jnp.ndarray = 35.0e-6


@dataclass(frozen=True, slots=True)
class Needs:
    """Which parts of the cost graph a call can need; static, so the rest is pruned when the
    call is traced. The default keeps everything. The simulator knows that a dense model at
    tp=1 needs no MoE or communication, and whether a batch is a pure decode (in which case
    FA2 takes its decode path exactly when GQA heads fold) or not."""

    moe: bool = True
    comm: bool = True
    attention: str = "any"  # "any" | "decode" (folded GQA decode) | "prefill" (standard grid)
    # the model's token mixers (ops.attention_kinds): only these are traced
    kinds: tuple[str, ...] = ("full",)


ALL = Needs()

PARAM_NAMES = tuple(Params.__dataclass_fields__)
# What calibration fits by default; communication has no profiles yet, so it keeps its prior.
# The new layer kinds' parameters are fitted on their kernel tables (aiconfigurator.py
# LAYER_FIT_NAMES), never on steps of models without those layers.
KERNEL_ONLY_PREFIXES = ("comm", "mla_", "moe_", "a2a_", "scan_")
FIT_NAMES = tuple(n for n in PARAM_NAMES if not n.startswith(KERNEL_ONLY_PREFIXES))
DEEPEP_NORMAL_SMS = 20.0  # SMs DeepEP's normal-mode kernels occupy (its default)


def params_from_dict(values: dict[str, float]) -> Params:
    unknown = set(values) - set(PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    defaults = Params()
    return Params(**{n: ops._float(values.get(n, getattr(defaults, n))) for n in PARAM_NAMES})


def params_to_dict(params: Params) -> dict[str, float]:
    return {n: float(getattr(params, n)) for n in PARAM_NAMES}


def as_float_params(params: Params) -> Params:
    return jax.tree.map(ops._float, params)


# ------------------------------------------------------------------------------------------------
# stage 1: hardware-independent features of one padded batch


def features(
    dims: ModelDims, batch: Batch, backend: attn.AttentionBackend = attn.FA2, xp=jnp, needs=ALL
):
    """Scalars of one padded batch ``[R]`` that do not depend on the GPU.

    All per-request quantities are stacked and reduced in one sum and one max: on CPUs each
    separate reduction is a kernel launch, which would dominate a single-batch call.
    """
    dims = ops.as_attention(dims)
    c, n, m = batch.cache_len, batch.new_len, batch.mask
    if backend.name in ("fa3", "flashinfer"):  # one grid per batch (fa3.py, flashinfer.py)
        nm = n * m
        sums = xp.sum(xp.stack([nm, m]), axis=-1)
        grid = (fa3 if backend.name == "fa3" else flashinfer).features(
            c, n, m, dims.q_heads, dims.kv_heads, dims.window, xp, backend
        )
        return dict(tokens=sums[0], n_req=sums[1], **grid)
    t = attn.request_tiles(c, n, m, dims.window, backend, xp)
    nm = n * m
    sums = xp.sum(xp.stack([nm, m, t["tiles"], t["m_blocks"], t["last"], t["dec_split"]]), axis=-1)
    maxes = xp.max(xp.stack([nm, t["last"], t["dec_split"], t["m_blocks"]]), axis=-1)
    bn, sbn = float(backend.block_n), float(backend.split_block_n)
    eligible = (
        None
        if needs.attention == "prefill"
        else attn.split_eligible(xp.maximum(maxes[2], 1.0), backend, xp)
    )
    return dict(
        tokens=sums[0],
        n_req=sums[1],
        pf_work=dims.q_heads * sums[2] * bn,
        pf_chain=maxes[1] * bn,
        pf_blocks=dims.q_heads * sums[3],
        # the grid (max m-blocks, R, heads) launches empty blocks for requests shorter than
        # the longest: they decide which blocks share an SM
        pf_launched=dims.q_heads * sums[1] * maxes[3],
        is_decode=maxes[0] <= 1.0,
        dec_std_keys=sums[4] * bn,
        dec_split_keys=sums[5] * sbn,
        dec_max_split_tiles=maxes[2],
        dec_std_chain=maxes[1] * bn,
        split_eligible=eligible,
    )


# ------------------------------------------------------------------------------------------------
# stage 2: seconds per operator on one GPU


def _roofline_s(flops, bytes_, flops_per_s, bytes_per_s, blend, xp):
    tc = flops / flops_per_s
    tm = bytes_ / bytes_per_s
    return xp.maximum(tc, tm) + blend * xp.minimum(tc, tm)


def _attention_s(
    p: Params, dims: ModelDims, f, hw: HwArrays, be: attn.AttentionBackend, xp, needs=ALL
):
    """Seconds of one layer's attention call.

    Work (all blocks) runs at the whole GPU's rates; the heaviest block's chain runs on one SM,
    alone or nearly so, at per-SM rates with their own efficiencies (one 4-warp CTA cannot
    saturate an SM). In the standard kernel every query head's block reads its KV head's keys,
    so the ``groups`` heads sharing a KV head hit L2 instead of HBM.
    """
    dims = ops.as_attention(dims)
    # q·k and p·v flops per key and query row: 2 (d_qk + d_v), 4 d for plain attention
    row_flops = 2.0 * (dims.head_dim + dims.v_dim)
    d = dims.v_dim  # partial outputs of the split kernels carry the value dim
    groups = dims.q_heads / dims.kv_heads
    sm_flops = hw.bf16_flops_per_s / hw.sm_count
    sm_bytes = ops.hbm_ceiling(hw) / hw.sm_count
    kv_bytes_per_key = dims.kv_elems * dims.kv_bytes

    def kernel_s(work, chain, blocks, rows, heads_per_kv, mem_work=None, launched=None, heavy=1.0):
        # seconds per key column: across the whole GPU, and for one block alone on an SM;
        # ``mem_work``: the key columns actually read, where tiles past the end move no bytes
        key_flops_s = rows * row_flops / (hw.bf16_flops_per_s * p.attn_flops_eff)
        key_bytes_s = kv_bytes_per_key / heads_per_kv / (ops.hbm_ceiling(hw) * p.attn_bytes_eff)
        # The heaviest block is bound by its own tile math, slowed while another block shares
        # its SM (the share of its life that does, from the launched grid: fa2.py), or by the
        # few K/V tiles one 4-warp CTA keeps in flight, about its SM's share of HBM whether or
        # not other blocks stream beside it.
        shared = attn.coresident_share(
            work,
            chain,
            blocks,
            blocks if launched is None else launched,
            heavy,
            hw.sm_count,
            1.0 + p.attn_shared_slowdown,
            be.ctas_per_sm,
            xp,
        )
        key_lone_s = xp.maximum(
            rows
            * row_flops
            / (sm_flops * p.attn_chain_flops_eff)
            * (1.0 + p.attn_shared_slowdown * shared),
            kv_bytes_per_key / (sm_bytes * p.attn_chain_bytes_eff),
        )
        if mem_work is None:
            work_s = work * xp.maximum(key_flops_s, key_bytes_s)
        else:
            work_s = xp.maximum(work * key_flops_s, mem_work * key_bytes_s)
        chain_s = chain * key_lone_s
        # The heaviest block may start late only if some blocks wait for an SM; with every
        # block on an SM of its own the makespan is max(work, chain).
        late = 1.0 - xp.minimum(1.0, hw.sm_count / xp.maximum(blocks, 1.0))
        # ... and only by as much as it exceeds an average block (equal blocks form waves)
        excess_s = (chain - work / xp.maximum(blocks, 1.0)) * key_lone_s
        tail = p.attn_blend * late * xp.minimum(work_s, xp.maximum(excess_s, 0.0))
        return xp.maximum(work_s, chain_s) + tail + blocks * p.attn_block_s / hw.sm_count

    if be.name == "fa3":
        # packed GQA: each block reads its KV head once; the heaviest block's KV axis is cut
        # into the heuristic's splits, partial outputs merged by the combine kernel
        n_blocks = xp.maximum(f["fa3_chain_tiles"], 1.0)
        total_mblocks = f["n_req"] * dims.kv_heads * f["fa3_mblocks_max"]
        splits = fa3.num_splits(total_mblocks, hw.sm_count, n_blocks, xp, be)
        chain = xp.ceil(n_blocks / splits) * be.block_n
        combine_bytes = (splits - 1.0) * f["n_req"] * dims.q_heads * (d + 1.0) * 4.0 * 2.0
        combine_s = xp.where(
            splits > 1.0,
            combine_bytes / (ops.hbm_ceiling(hw) * p.attn_bytes_eff) + p.attn_combine_s,
            0.0,
        )
        blocks = f["fa3_blocks"] * splits
        work_s = kernel_s(f["fa3_work"], chain, blocks, f["fa3_rows"], 1.0, f["fa3_keys"])
        return work_s + combine_s

    if be.name == "flashinfer":
        # balanced KV chunks: the grid's slots per KV head, filled by the requests' m-blocks or
        # by chunks of their KV axes (flashinfer.py); the heaviest block walks one chunk
        slots_per_head = hw.sm_count * be.ctas_per_sm / dims.kv_heads
        chunk = flashinfer.chunk_keys(
            f["fi_kv_total"], f["fi_max_keys"], f["fi_mblocks"], slots_per_head, xp
        )
        split = chunk < f["fi_max_keys"]
        chunks = xp.where(
            split,
            xp.minimum(f["fi_kv_total"] / chunk + f["fi_mblocks"], slots_per_head),
            f["fi_mblocks"],
        )
        merge_bytes = xp.where(split, chunks * groups * (d + 1.0) * 4.0 * 2.0, 0.0) * dims.kv_heads
        merge_s = xp.where(
            split, merge_bytes / (ops.hbm_ceiling(hw) * p.attn_bytes_eff) + p.attn_combine_s, 0.0
        )
        blocks = dims.kv_heads * chunks
        # balanced chunks are equally long: split, every block is as heavy as the heaviest
        heavy = xp.where(split, blocks, dims.kv_heads)
        fi_s = kernel_s(f["fi_work"], chunk, blocks, f["fi_tile"], 1.0, f["fi_keys"], blocks, heavy)
        return fi_s + merge_s

    prefill = kernel_s(
        f["pf_work"],
        f["pf_chain"],
        f["pf_blocks"],
        float(be.block_m),
        groups,
        launched=f["pf_launched"],
        heavy=dims.q_heads,
    )
    if needs.attention == "prefill":
        return prefill

    # Decode with GQA: query heads folded into rows, grid R x kv_heads, optional KV split.
    swapped = f["is_decode"] & (groups > 1.0) & be.decode_swaps_groups
    n_blocks = xp.ceil(f["dec_max_split_tiles"])
    bhm = f["n_req"] * dims.kv_heads * xp.ceil(groups / be.split_block_m)
    splits = attn.num_splits(
        bhm, hw.sm_count, xp.maximum(n_blocks, 1.0), be, xp, f["split_eligible"]
    )
    std = kernel_s(
        dims.kv_heads * f["dec_std_keys"],
        f["dec_std_chain"],
        f["n_req"] * dims.kv_heads,
        float(be.block_m),
        1.0,
        heavy=dims.kv_heads,
    )
    per_split = xp.ceil(n_blocks / splits)
    split_chain = xp.minimum(f["dec_max_split_tiles"], per_split) * be.split_block_n
    # the combine kernel reads and writes fp32 partial outputs of every split
    combine_bytes = splits * f["n_req"] * dims.q_heads * (d + 1.0) * 4.0 * 2.0
    split = (
        kernel_s(
            dims.kv_heads * f["dec_split_keys"],
            split_chain,
            bhm * splits,
            float(be.split_block_m),
            1.0,
            heavy=bhm / xp.maximum(f["n_req"], 1.0) * splits,  # the longest request's splits
        )
        + combine_bytes / (ops.hbm_ceiling(hw) * p.attn_bytes_eff)
        + p.attn_combine_s
    )
    decode = xp.where(splits > 1.0, split, std)
    if needs.attention == "decode":
        return decode
    return xp.where(swapped, decode, prefill)


# Chunk lengths of the recurrent layers' prefill scans: Gated DeltaNet's chunked kernel
# (fla's chunk_gated_delta_rule, 64) and Mamba-2's SSD (the configs' chunk_size, 128-256).
GDN_CHUNK = 64.0
MAMBA_CHUNK = 256.0
# Requests computing at most this many tokens take MLA's absorbed kernel: decodes and
# speculative verifies (vLLM's MLA backends treat query lengths up to 1 + the speculative
# tokens as decodes; SGLang's target-verify mode runs the decode kernel), longer ones MHA.
MLA_ABSORB_MAX_NEW = 8.0
MLA_GRID = fa3.FA3  # the grid MLA kernels are priced through, whatever the GQA backend


def step_features(dims: ModelDims, batch: Batch, be: attn.AttentionBackend, xp=jnp, needs=ALL):
    """Everything a step's cost needs from one padded batch, per token mixer the model has
    (``needs.kinds``): the attention grid's features for full, sliding and chunked layers
    (chunked ones over the position within the chunk: Llama 4's local attention is a batch of
    virtual requests, one per chunk, as vLLM builds it), MLA's absorbed decode and its prefill
    as multi-head attention (requests split by whether they decode), and the sums the
    recurrent layers and MLA's up-projections read."""
    c, n, m = batch.cache_len, batch.new_len, batch.mask
    out = {}
    if "full" in needs.kinds:
        out["full"] = features(ops.gqa_attention(dims, "full"), batch, be, xp, needs)
    if "sliding" in needs.kinds:
        out["sliding"] = features(ops.gqa_attention(dims, "sliding"), batch, be, xp, needs)
    if "chunked" in needs.kinds:
        local = Batch(xp.mod(c, xp.maximum(dims.chunk, 1.0)), n, m)
        out["chunked"] = features(ops.gqa_attention(dims, "chunked"), local, be, xp, needs)
    split = {"mla", "gdn", "mamba2"} & set(needs.kinds)
    if not split and out:  # GQA only: the attention features' own sums are all it needs
        first = next(iter(out.values()))
        out.update(tokens=first["tokens"], n_req=first["n_req"])
        return out
    dec = xp.where(n <= 1.0, m, 0.0)
    pf = m - dec
    sums = xp.sum(xp.stack([n * m, m, dec, pf, (c + n) * pf, n * pf]), axis=-1)
    out.update(
        tokens=sums[0], n_req=sums[1], n_dec=sums[2], n_pf=sums[3], pf_keys=sums[4],
        pf_tokens=sums[5],
    )  # fmt: skip
    if "mla" in needs.kinds:
        # decodes and speculative verifies (a few tokens each) take the absorbed kernel, their
        # query tokens folded with the heads into rows as one query over c + n - 1 keys;
        # longer chunks the multi-head prefill path
        absorbed = xp.where(n <= MLA_ABSORB_MAX_NEW, m, 0.0)
        mha = m - absorbed
        rows = xp.max(xp.where(absorbed > 0.0, n, 1.0))
        s = xp.sum(xp.stack([absorbed, n * absorbed, mha, (c + n) * mha]), axis=-1)
        out.update(mla_rows=rows, mla_abs_req=s[0], mla_abs_tokens=s[1], mla_mha_req=s[2])
        out["mla_mha_keys"] = s[3]
        any_needs = Needs(needs.moe, needs.comm, "any", needs.kinds)
        pf_needs = Needs(needs.moe, needs.comm, "prefill", needs.kinds)
        one = Batch(c + n - 1.0, xp.ones_like(n), absorbed)
        # MLA kernels (FlashMLA, FlashInfer's and TRT-LLM's MLA, FA3's MLA path) pack the
        # heads into a tile's rows whatever the engine's GQA backend: FA3's grid models that
        # (FA2's 128-row tile per head group overstated TRT-LLM's decode table 213% vs 60%)
        mb = MLA_GRID
        out["mla_dec"] = features(ops.mla_decode_attention(dims, rows), one, mb, xp, any_needs)
        out["mla_pf"] = features(
            ops.mla_prefill_attention(dims), Batch(c, n, mha), mb, xp, pf_needs
        )
        # the indexer's decode kernel folds its heads into rows as the absorbed MLA does
        out["index_dec"] = features(ops.indexer_attention(dims, rows), one, mb, xp, any_needs)
        out["index_pf"] = features(ops.indexer_attention(dims), Batch(c, n, mha), mb, xp, pf_needs)
    if "gdn" in needs.kinds or "mamba2" in needs.kinds:
        chunks = xp.stack([xp.ceil(n / GDN_CHUNK) * pf, xp.ceil(n / MAMBA_CHUNK) * pf])
        csum = xp.sum(chunks, axis=-1)
        out.update(gdn_chunks=csum[0], mamba_chunks=csum[1])
    return out


def _recurrent_s(p: Params, dims: ModelDims, f, hw: HwArrays, kind: str, xp):
    """One Gated DeltaNet or Mamba-2 layer's scan: every request reads and writes its whole
    state once per step (a decode step is nothing but that and a few matrix-vector products
    per head), a prefill scans its tokens in chunks, each chunk's state written out (fla's and
    mamba_ssm's chunked kernels). Flops per token and head: GDN ~6 dk dv (state update and
    read-out) + 2 C (dk + dv) within a chunk of C; Mamba-2 ~6 p N + 2 C (p + N)."""
    if kind == "gdn":
        heads, a, b, chunk = dims.gdn_v_heads, dims.gdn_k_dim, dims.gdn_v_dim, GDN_CHUNK
        conv = 2.0 * dims.gdn_k_heads * dims.gdn_k_dim + heads * dims.gdn_v_dim
        chunks = f["gdn_chunks"]
    else:
        heads, a, b, chunk = dims.m_heads, dims.m_head_dim, dims.m_state, MAMBA_CHUNK
        conv = heads * dims.m_head_dim + 2.0 * dims.m_groups * dims.m_state
        chunks = f["mamba_chunks"]
    state_bytes = heads * a * b * dims.state_bytes
    t = f["tokens"]
    flops = heads * (6.0 * a * b * t + 2.0 * chunk * (a + b) * f["pf_tokens"])
    # every request: its state in and out, its conv window in and out; prefills: one state
    # per chunk written, and the conv inputs of its tokens
    bytes_ = (
        2.0 * f["n_req"] * (state_bytes + conv * (dims.conv_kernel - 1.0) * dims.act_bytes)
        + chunks * state_bytes
        + 2.0 * t * conv * dims.act_bytes
    )
    fixed = xp.where(f["n_pf"] > 0.0, p.scan_fixed_s, 0.0)
    return fixed + _roofline_s(
        flops,
        bytes_,
        hw.bf16_flops_per_s * p.scan_flops_eff,
        ops.hbm_ceiling(hw) * p.scan_bytes_eff,
        p.gemm_blend,
        xp,
    )


def costs(
    p: Params,
    dims: ModelDims,
    f,
    hw: HwArrays,
    be: attn.AttentionBackend = attn.FA2,
    xp=jnp,
    needs=ALL,
):
    """Seconds per operator group for one step on one GPU (per TP rank; ranks run in lockstep).

    With attention data parallelism (``dims.dp`` > 1) each rank runs the token mixers for
    1/dp of the batch (requests spread evenly), the MLPs for all of it."""
    t, r = f["tokens"], f["n_req"]
    low_precision = xp.maximum(dims.weight_bytes, dims.gemm_in_bytes) < 1.5
    peak = ops.gemm_peak_flops(dims, hw, xp) * xp.where(
        low_precision, p.gemm_fp8_flops_eff, p.gemm_flops_eff
    )
    bw = ops.hbm_ceiling(hw) * p.gemm_bytes_eff
    wb, ab = dims.weight_bytes, dims.act_bytes

    def gemm_s(m, k, n):
        return _roofline_s(
            ops.gemm_flops(m, k, n),
            ops.gemm_bytes(m, k, n, wb, dims.gemm_in_bytes, ab),
            peak,
            bw,
            p.gemm_blend,
            xp,
        )

    out = {}
    kinds = needs.kinds
    ta = t / dims.dp  # tokens of one rank's token mixers
    h, hd = dims.hidden, dims.head_dim
    qkv_s = o_s = 0.0 * t
    attn_s = 0.0 * t
    if "full" in kinds:
        ghd = dims.g_head_dim
        width = (dims.q_heads * dims.q_out + dims.g_kv_copies * dims.g_kv_heads) * ghd
        qkv_s += dims.n_full * gemm_s(ta, h, width)
        o_s += dims.n_full * gemm_s(ta, dims.q_heads * ghd, h)
        a = ops.gqa_attention(dims, "full")
        attn_s += dims.n_full * _attention_s(p, a, f["full"], hw, be, xp, needs)
    for kind, count in (("sliding", dims.n_sliding), ("chunked", dims.n_chunked)):
        if kind in kinds:
            width = (dims.q_heads * dims.q_out + 2.0 * dims.kv_heads) * hd
            qkv_s += count * gemm_s(ta, h, width)
            o_s += count * gemm_s(ta, dims.q_heads * hd, h)
            a = ops.gqa_attention(dims, kind)
            attn_s += count * _attention_s(p, a, f[kind], hw, be, xp, needs)
    if "mla" in kinds:
        qs, ls = _mla_s(p, dims, f, hw, be, xp, needs, gemm_s, peak, bw)
        qkv_s += dims.n_mla * qs
        o_s += dims.n_mla * gemm_s(ta, dims.mla_heads * dims.v_dim, h)
        attn_s += dims.n_mla * ls
    for kind, count in (("gdn", dims.n_gdn), ("mamba2", dims.n_mamba)):
        if kind in kinds:
            if kind == "gdn":
                kd = dims.gdn_k_heads * dims.gdn_k_dim
                vd = dims.gdn_v_heads * dims.gdn_v_dim
                width, inner = 2.0 * kd + 2.0 * vd + 2.0 * dims.gdn_v_heads, vd
            else:
                inner = dims.m_heads * dims.m_head_dim
                width = 2.0 * inner + 2.0 * dims.m_groups * dims.m_state + dims.m_heads
            qkv_s += count * gemm_s(ta, h, width)
            o_s += count * gemm_s(ta, inner, h)
            attn_s += count * _recurrent_s(p, dims, f, hw, kind, xp)
    out["qkv_proj"] = qkv_s
    out["o_proj"] = o_s
    mats = dims.mlp_mats
    out["mlp"] = dims.dense_layers * (
        gemm_s(t, h, (mats - 1.0) * dims.inter) + gemm_s(t, dims.inter, h)
    )
    out["moe"] = _moe_s(p, dims, t, peak, bw, gemm_s, xp, hw) if needs.moe else 0.0 * t
    # each rank's share of the mixers' batch; the longest block chain does not shrink, but a
    # closed form of the split is beyond this model (the ranks' batches differ anyway)
    out["attention"] = attn_s / dims.dp
    elems = ops.elementwise_elems_per_token(dims, p.elem_hidden, p.elem_inter, p.elem_qkv)
    copy_bw = hw.hbm_bytes_per_s * hw.copy_scale * COPY_BW_FRACTION
    out["elementwise"] = dims.layers * t * elems * ab / copy_bw
    # LM head for every request's last token, then argmax over the logits.
    out["lm_head"] = gemm_s(r, h, dims.vocab) + r * dims.vocab * ab / copy_bw
    out["embedding"] = 2.0 * t * h * ab / copy_bw
    out["communication"] = _communication_s(p, dims, t, r, hw, xp) if needs.comm else 0.0 * t
    # cuBLAS runs a one-row GEMM as a GEMV, which skips the tiled kernel's fixed cost: every
    # projection of a lone decode, and the LM head of any single-request step.
    gemms_per_step = 2.0 * dims.layers + 2.0 * dims.dense_layers
    gemv_s = p.gemv_saving_s * (
        xp.where(t <= 1.0, gemms_per_step, 0.0) + xp.where(r <= 1.0, 1.0, 0.0)
    )
    out["fixed"] = dims.layers * p.layer_s + p.step_s - gemv_s
    return out


def _mla_s(p, dims, f, hw, be, xp, needs, gemm_s, peak, bw):
    """One MLA layer: (projections into the latent and the queries, attention).

    Projections: q_a/kv_a (one fused GEMM into the q and kv latents, replicated on every
    rank), q_b into the heads' queries; decodes absorb kv_b into their queries and outputs
    (two batched GEMMs over the heads, the weights read once), prefills up-project the
    latent of every key they attend (kv_b over the cached and new tokens). Attention: the
    absorbed MQA kernel over the latent for decodes, multi-head attention for prefills, and
    for sparse models the indexer over every cached key."""
    ta = f["tokens"] / dims.dp
    h, heads = dims.hidden, dims.mla_heads
    latent_out = dims.q_lora + dims.kv_lora + dims.qk_rope
    q_in = xp.where(dims.q_lora > 0, dims.q_lora, h)
    q_s = gemm_s(ta, h, latent_out) + gemm_s(ta, q_in, heads * (dims.qk_nope + dims.qk_rope))
    wb, ab = dims.weight_bytes, dims.act_bytes
    n_dec = f["mla_abs_tokens"] / dims.dp
    absorb_elems = heads * dims.kv_lora * (dims.qk_nope + dims.v_dim)
    absorb_s = _roofline_s(
        2.0 * n_dec * absorb_elems,
        absorb_elems * wb + n_dec * heads * (dims.qk_nope + dims.kv_lora + dims.v_dim) * 2.0 * ab,
        peak,
        bw,
        p.gemm_blend,
        xp,
    )
    absorb_s = xp.where(n_dec > 0.0, absorb_s, 0.0)
    up_s = gemm_s(f["mla_mha_keys"] / dims.dp, dims.kv_lora, heads * (dims.qk_nope + dims.v_dim))
    up_s = xp.where(f["mla_mha_req"] > 0.0, up_s, 0.0)
    any_needs = Needs(needs.moe, needs.comm, "any", needs.kinds)
    pf_needs = Needs(needs.moe, needs.comm, "prefill", needs.kinds)
    be = MLA_GRID
    # MLA kernels' own rates (see Params), not the GQA backend's fitted ones
    p = dataclasses.replace(p, attn_flops_eff=p.mla_flops_eff, attn_bytes_eff=p.mla_bytes_eff)
    absorbed = ops.mla_decode_attention(dims, f["mla_rows"])
    dec_attn = _attention_s(p, absorbed, f["mla_dec"], hw, be, xp, any_needs)
    pf_attn = _attention_s(p, ops.mla_prefill_attention(dims), f["mla_pf"], hw, be, xp, pf_needs)
    attn = xp.where(f["mla_abs_req"] > 0.0, dec_attn, 0.0) + xp.where(
        f["mla_mha_req"] > 0.0, pf_attn, 0.0
    )
    ix_dec = ops.indexer_attention(dims, f["mla_rows"])
    ix_pf = ops.indexer_attention(dims)
    index = xp.where(
        f["mla_abs_req"] > 0.0, _attention_s(p, ix_dec, f["index_dec"], hw, be, xp, any_needs), 0.0
    ) + xp.where(
        f["mla_mha_req"] > 0.0, _attention_s(p, ix_pf, f["index_pf"], hw, be, xp, pf_needs), 0.0
    )
    attn = attn + xp.where(dims.index_topk > 0.0, index, 0.0)
    return q_s + absorb_s + up_s, attn


def _moe_s(p, dims, t, peak, bw, gemm_s, xp, hw=None):
    """Router GEMM, then the fused expert GEMMs over this rank's touched experts' weights
    (with expert parallelism: experts/ep of them and t·k/ep routed rows, balanced), then the
    shared (always-on) experts as plain GEMMs over every token."""
    h, e, k, im = dims.hidden, dims.experts, dims.top_k, dims.moe_inter
    ab, ewb = dims.act_bytes, dims.expert_weight_bytes
    mats = dims.mlp_mats
    rows_total = ops.moe_padded_rows(t, e, k, _MOE_BLOCK_M, xp)
    touched = ops.moe_experts_touched(t, e, k, xp) / dims.ep
    rows = rows_total / dims.ep
    moe_flops = 2.0 * rows * mats * h * im
    # weights of the touched experts; per routed token: read h and I (inputs), write
    # (mats-1) I and h
    moe_bytes = touched * mats * h * im * ewb + t * k / dims.ep * (
        (h + im) * dims.gemm_in_bytes + ((mats - 1.0) * im + h) * ab
    )
    expert_peak = peak
    if hw is not None:
        # 4-bit experts: a GPU with FP4 tensor cores (Blackwell) runs them W4A8 at its fp8
        # rate (tcgen05's f8f6f4 MMA, as vLLM's MXFP4 x MXFP8 MoE on B200); one without
        # (Hopper, Ampere) dequantizes them to the activations' precision
        has_fp4 = hw.fp4_flops_per_s > hw.fp8_flops_per_s
        widest = xp.maximum(ewb, dims.gemm_in_bytes)
        low = (ewb < 0.75) & has_fp4
        rate = ops.gemm_rate(hw, low | (widest < 1.5), None, xp)
        expert_peak = rate * xp.where(low | (widest < 1.5), p.moe_fp8_flops_eff, p.gemm_flops_eff)
    si = dims.shared_inter
    shared = xp.where(si > 0.0, gemm_s(t, h, (mats - 1.0) * si) + gemm_s(t, si, h), 0.0)
    if hw is not None:
        # The fused kernel runs a CTA per (64-row block, 128-column tile) of each expert
        # GEMM, streaming a k x 128 slice of weights; a CTA costs at least ``moe_tile_s``,
        # which shows where its slice is small: the down projection of narrow experts (k =
        # the expert width per rank; TRT-LLM's DeepSeek-shaped MoE table ran 3.3x slower
        # than the roofline at 128 columns per rank), never for wide ones (Mixtral)
        blocks = rows / _MOE_BLOCK_M
        floor_bytes = p.moe_tile_s * bw / hw.sm_count  # what a CTA's fixed cost is worth
        short = xp.maximum(floor_bytes - h * 128.0 * ewb, 0.0) * xp.ceil(
            (mats - 1.0) * im / 128.0
        ) + xp.maximum(floor_bytes - im * 128.0 * ewb, 0.0) * xp.ceil(h / 128.0)
        moe_bytes = moe_bytes + blocks * short
    return dims.moe_layers * (
        gemm_s(t, h, e)
        + _roofline_s(moe_flops, moe_bytes, expert_peak, bw, p.gemm_blend, xp)
        + shared
    )


def _communication_s(p, dims, t, r, hw, xp):
    """All-reduces after every token mixer (over the tp/dp ranks that split its heads) and
    every MLP (over all tp ranks), and a logits all-gather. With attention data parallelism
    and expert parallelism, MoE layers dispatch each token's hidden state to its experts'
    ranks and combine the results back (two all-to-alls, DeepEP's normal mode) instead."""
    ab = dims.act_bytes
    ic = hw.interconnect_bytes_per_s * p.comm_eff
    atp = dims.tp / dims.dp
    mixers = dims.n_full + dims.n_sliding + dims.n_chunked + dims.n_mla + dims.n_gdn
    mixers = mixers + dims.n_mamba

    def ar_s(ranks, tokens):
        ring = 2.0 * (ranks - 1.0) / ranks * (tokens * dims.hidden) * ab
        return xp.where(ranks > 1.0, ring / ic + p.comm_latency_s, 0.0)

    a2a = (dims.ep > 1.0) & (dims.dp > 1.0)
    # DeepEP sends a token once to each other rank holding one of its top-k experts; decode
    # steps (one token a request) take its low-latency mode (fp8 dispatch with scales, bf16
    # combine, link-bound), prefills its normal mode, bound by the 20 SMs it runs on
    ranks = (dims.ep - 1.0) * (1.0 - (1.0 - 1.0 / dims.ep) ** dims.top_k)
    per_token = (t / dims.dp) * ranks * dims.hidden
    decode = t <= r
    a2a_bytes = per_token * (xp.where(decode, 1.03, ab) + ab)
    normal_bw = xp.minimum(ic, DEEPEP_NORMAL_SMS * p.a2a_sm_gb_s * 1e9)
    a2a_s = a2a_bytes / xp.where(decode, ic, normal_bw) + p.a2a_latency_s
    moe_s = xp.where(a2a, a2a_s, ar_s(dims.tp, t))
    # with attention DP each rank's tokens are gathered for the dense MLPs and scattered back
    mlp_s = ar_s(dims.tp, t)
    gather_s = xp.where(
        dims.tp > 1.0, (dims.tp - 1.0) * r * dims.vocab * ab / ic + p.comm_latency_s, 0.0
    )
    return (
        mixers * ar_s(atp, t / dims.dp)
        + dims.dense_layers * mlp_s
        + dims.moe_layers * moe_s
        + gather_s
    )


def breakdown_s(p, dims, batch, hw, be: attn.AttentionBackend = attn.FA2, xp=jnp, needs=ALL):
    return costs(p, dims, step_features(dims, batch, be, xp, needs), hw, be, xp, needs)


def step_s(p, dims, batch, hw, be: attn.AttentionBackend = attn.FA2, xp=jnp, needs=ALL):
    parts = breakdown_s(p, dims, batch, hw, be, xp, needs)
    return sum(parts.values())


# ------------------------------------------------------------------------------------------------
# jitted public entry points (module level: compiled once per shape)


@partial(jax.jit, static_argnames=("be", "needs"))
def breakdown_one(p: Params, dims: ModelDims, batch: Batch, hw: HwArrays, be=attn.FA2, needs=ALL):
    """Per-operator seconds of one batch ``[R]`` on one GPU."""
    return breakdown_s(p, dims, batch, hw, be, jnp, needs)


@partial(jax.jit, static_argnames=("be", "needs"))
def step_seconds_grid(
    p: Params, dims: ModelDims, batches: Batch, hws: HwArrays, be=attn.FA2, needs=ALL
):
    """Seconds for batches ``[N, R]`` × GPUs ``[H]`` → ``[N, H]``; features once per batch."""

    def one_batch(b):
        f = step_features(dims, b, be, jnp, needs)
        return jax.vmap(lambda hw: sum(costs(p, dims, f, hw, be, jnp, needs).values()))(hws)

    return jax.vmap(one_batch)(batches)


@partial(jax.jit, static_argnames=("treedef", "shapes", "be", "needs"))
def step_seconds_flat(theta, cnm, treedef, shapes, be=attn.FA2, needs=ALL):
    """``step_seconds_grid`` on one stacked ``[3, N, R]`` array (cache_len, new_len, mask),
    with parameters, model and GPUs flattened into one vector ``theta`` (see ``Estimator``):
    a simulator's many small calls then transfer two arrays instead of ~40 leaves and skip
    building a Batch, which otherwise cost more than the computation."""
    leaves, i = [], 0
    for shape in shapes:
        size = math.prod(shape)
        leaves.append(theta[i : i + size].reshape(shape))
        i += size
    p, dims, hws = jax.tree.unflatten(treedef, leaves)
    return step_seconds_grid(p, dims, Batch(cnm[0], cnm[1], cnm[2]), hws, be, needs)


@partial(jax.jit, static_argnames=("treedef", "shapes", "be", "needs"))
def decode_seconds_flat(theta, ctx, active, padded, treedef, shapes, be=attn.FA2, needs=ALL):
    """Consecutive decode steps (rows) of a batch whose requests (columns) hold ``ctx`` tokens
    at the first step and one more each step; row j has its first ``active[j]`` requests
    decoding and ``padded[j]`` slots in all (one-token dummies fill the rest). Rows past the
    stretch have active 0 and padded 1. Built here rather than on the host: a simulator's
    decode stretch then hands over three small vectors instead of three [k, R] planes."""
    col = jnp.arange(ctx.shape[0], dtype=ctx.dtype)
    step = jnp.arange(active.shape[0], dtype=ctx.dtype)[:, None]
    live = col[None, :] < active[:, None]
    c = jnp.where(live, ctx[None, :] + step, 0.0)
    nm = (col[None, :] < padded[:, None]).astype(c.dtype)
    return step_seconds_flat(theta, jnp.stack([c, nm, nm]), treedef, shapes, be, needs)


@partial(jax.jit, static_argnames=("be", "needs"))
def step_seconds_rows(
    p: Params, dims: ModelDims, batches: Batch, hw: HwArrays, be=attn.FA2, needs=ALL
):
    """Seconds for rows that each carry their own model: dims ``[N]``, batches ``[N, R]``
    (``needs.kinds``: every token mixer any row's model has)."""
    return jax.vmap(lambda d, b: step_s(p, d, b, hw, be, jnp, needs))(dims, batches)


# ------------------------------------------------------------------------------------------------
# calibration files


ATTENTION_BACKENDS = {b.name: b for b in (attn.FA2, fa3.FA3, flashinfer.FLASHINFER)}


def calibration_path(hardware_name: str, engine: str | None = None) -> Path:
    """The GPU's own calibration if shipped, else the H100 one (the default for every GPU).

    With ``engine`` ("vllm", "sglang"): that engine's production-kernel calibration of the GPU
    (``<gpu>.<engine>.json``: its kernel tables, plus the engine costs fitted end to end on
    vLLM's runs) if shipped, else the H100's. Without: the reference step's (``<gpu>.json``),
    what ``hisim estimate`` and ``validate steps`` compare with the reference profiles."""
    base = data_dir("hardware_specs") / "calibration"
    if engine is not None:
        # a GPU without the engine's kernel tables takes the H100's production fit: its
        # efficiencies are fractions of peak, which transfer, unlike an eager reference step
        for gpu in (hardware_name, DEFAULT_CALIBRATION):
            own_engine = base / f"{gpu}.{engine}.json"
            if own_engine.is_file():
                return own_engine
    own = base / f"{hardware_name}.json"
    return own if own.is_file() else base / f"{DEFAULT_CALIBRATION}.json"


# Every fitted parameter is an efficiency (~0.1-1), a pass count (~1-50), a blend or a fixed
# cost in seconds (~1e-6-1e-4): values outside this range are typos that would send step
# times to zero or to infinity.
PARAM_RANGE = (1e-12, 1e4)


def load_calibration(path: str | Path | None = None, hardware_name: str = DEFAULT_CALIBRATION):
    """Params from a calibration JSON (``{"params": {...}}``); see ``read_calibration``."""
    return read_calibration(path, hardware_name)[0]


def read_calibration(
    path: str | Path | None = None,
    hardware_name: str = DEFAULT_CALIBRATION,
    engine: str | None = None,
) -> tuple[Params, str]:
    """(Params, attention model) of a calibration JSON (``{"params": {...}}``), or of the GPU's
    default one (``calibration_path``; Params' defaults and fa2 if none is shipped), read once.
    The attention model is the file's ``attention_model`` (or an attention name in ``backend``,
    as older files have it), else fa2. The file is read strictly (no key given twice, no
    NaN/Infinity) and every parameter must be a known name with a value within
    ``PARAM_RANGE``: one-line ``SpecError`` otherwise."""
    return _params_of(*_calibration_doc(path, hardware_name, engine))


def _calibration_doc(path, hardware_name: str, engine: str | None) -> tuple[Path, dict | None]:
    """The calibration file ``read_calibration`` means and its parsed JSON (None: no file
    given and the GPU has none shipped)."""
    p = Path(path) if path is not None else calibration_path(hardware_name, engine)
    if path is None and not p.is_file():
        return p, None
    return p, files.read_json(p, "calibration (JSON)", SpecError)


def _params_of(p: Path, doc) -> tuple[Params, str]:
    if doc is None:
        return Params(), "fa2"
    values = doc.get("params") if isinstance(doc, dict) else None
    if not isinstance(values, dict):
        raise SpecError(f"{p}: field 'params' must be an object of parameter values")
    lo, hi = PARAM_RANGE
    for k, v in values.items():
        if k not in PARAM_NAMES:
            raise SpecError(f"{p}: field 'params.{k}' is not a known parameter")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{p}: field 'params.{k}' must be a number, got {v!r}")
        if not lo <= v <= hi:
            raise SpecError(f"{p}: field 'params.{k}' must be between {lo:g} and {hi:g}, got {v!r}")
    attention = next(
        (doc[k] for k in ("attention_model", "backend") if doc.get(k) in ATTENTION_BACKENDS),
        "fa2",
    )
    return params_from_dict(values), attention


# Which fitted parameter's GPU sets each transfer scale of ops.HwArrays, and the sustained
# ceiling (specs SUSTAINED_FIELDS) the two GPUs are compared by. Attention's tile math is not
# among them: its compute rate transfers as a fraction of the datasheet peak.
TRANSFER = {
    "gemm_bf16_scale": ("gemm_flops_eff", "bf16_gemm_flops_per_s"),
    "gemm_fp8_scale": ("gemm_fp8_flops_eff", "fp8_gemm_flops_per_s"),
    "hbm_scale": ("gemm_bytes_eff", "hbm_bytes_per_s"),
    "copy_scale": ("elem_hidden", "hbm_bytes_per_s"),
}


def _gpu_names() -> dict[str, str]:
    """Names a calibration's ``fitted_on`` may give a GPU by, to its spec stem: an
    aiconfigurator-core system (``b200_sxm``) or one of hardware_specs/ (``h100-sxm``)."""
    from hisim_jax.specs import AICONFIGURATOR_SYSTEMS, available_hardware

    return {**AICONFIGURATOR_SYSTEMS, **{stem: stem for stem in available_hardware()}}


def _gpu_named_in(text: str, names: dict[str, str]) -> str | None:
    """The GPU (spec stem) a calibration's ``fitted_on`` entry names (``b200_sxm/vllm``,
    ``on h100-sxm``; ``names``: ``_gpu_names``), else None."""
    import re

    for name in sorted(names, key=len, reverse=True):  # gb200 before b200
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
            return names[name]
    return None


def calibration_gpus(
    path: str | Path | None = None,
    hardware_name: str = DEFAULT_CALIBRATION,
    engine: str | None = None,
) -> dict[str, str | None]:
    """The GPU each transfer scale's parameter was fitted on (TRANSFER), by the calibration's
    per-parameter ``fitted_on`` where it has one, else by its ``hardware``; None where neither
    names a GPU in hardware_specs/ (a scale of 1). The file is the one ``read_calibration``
    reads, already checked there."""
    p = Path(path) if path is not None else calibration_path(hardware_name, engine)
    if not p.is_file():
        return dict.fromkeys(TRANSFER)
    return _fitted_gpus(_calibration_doc(p, hardware_name, engine)[1])


def _fitted_gpus(doc: dict | None) -> dict[str, str | None]:
    """``calibration_gpus`` of a parsed calibration file (None: no file)."""
    if not isinstance(doc, dict):
        return dict.fromkeys(TRANSFER)
    fitted_on = doc.get("fitted_on") if isinstance(doc.get("fitted_on"), dict) else {}
    names = _gpu_names()
    whole = doc.get("hardware")
    whole = _gpu_named_in(whole, names) if isinstance(whole, str) else None
    out = {}
    for field, (param, _key) in TRANSFER.items():
        src = fitted_on.get(param)
        out[field] = (_gpu_named_in(src, names) if isinstance(src, str) else None) or whole
    return out


def transfer_scales(gpus: dict[str, str | None], target: HardwareSpec) -> dict[str, float]:
    """ops.HwArrays' transfer scales for ``target``: per scale, the ratio of target's sustained
    fraction of peak to that of the GPU its parameter was fitted on (1 where either lacks the
    measurement, or the GPU is the target). A GPU without fp8 tensor cores runs fp8 GEMMs at
    its bf16 rate, so its fp8 scale is its bf16 one."""
    from hisim_jax.specs import sustained_ratios

    out = {}
    for field, (_param, key) in TRANSFER.items():
        name = gpus.get(field)
        if name is None or name == target.name:
            out[field] = 1.0
            continue
        fitted = load_hardware(name)
        if key == "fp8_gemm_flops_per_s" and target.fp8_flops_per_s <= target.bf16_flops_per_s:
            key = "bf16_gemm_flops_per_s"
        out[field] = float(sustained_ratios(fitted, target)[key])
    return out


# ------------------------------------------------------------------------------------------------
# Python API


# Compiled programs with one Estimator's parameters, model and GPUs baked in as constants, by
# (kind, values, argument shapes): shared by Estimators whose flattened values are equal.
_PROGRAMS: dict = {}

# The decode-stretch shape family: requests padded to a power of two of at least
# DECODE_MIN_WIDTH (below it a call costs the same: dispatch dominates), steps cut into calls of
# DECODE_ROWS (fewer rows when the batch is wide). One shape per width, so a run compiles one
# or two decode programs instead of a dozen.
DECODE_MIN_WIDTH = 64
DECODE_ROWS = 64
DECODE_CELLS = 8192
# The single-batch program: requests padded to a power of two of at least this.
SINGLE_MIN_WIDTH = 64


def decode_shape(slots: int) -> tuple[int, int]:
    """(requests, steps) of the decode program for a stretch with up to ``slots`` slots."""
    width = bucket_size(slots, DECODE_MIN_WIDTH)
    return width, max(16, min(DECODE_ROWS, DECODE_CELLS // width))


def _host_float():
    """The numpy dtype of JAX's default float: arrays already in it skip a conversion per call
    (about 30 µs of a 70 µs simulator call)."""
    return np.float64 if jax.config.jax_enable_x64 else np.float32


def _single_batch(batch) -> np.ndarray | None:
    """The numbers of one batch of integer pairs as one flat int array ``[2R]`` (cache_len,
    new_len, cache_len, ...), or None when it needs the general path (floats, other types,
    other shapes: RaggedBatches names the problem). One flat list of ints into NumPy costs
    half of ``np.asarray`` on a list of pairs."""
    if not isinstance(batch, (list, tuple)) or not batch:
        return None
    try:
        if set(map(len, batch)) != {2}:
            return None
        flat = np.array(list(itertools.chain.from_iterable(batch)))
    except (TypeError, ValueError):
        return None
    return flat if flat.dtype.kind in "iu" else None


class Estimator:
    """Step latency of one model (at a TP degree and dtypes) on one or more GPUs.

    >>> est = Estimator("llama-3.1-8b", "h100-sxm")
    >>> est.step_latency_s([[(0, 2048), (4096, 1)]])       # -> array of shape [1]
    """

    def __init__(
        self,
        model: str | Path | ModelSpec,
        hardware: str | Path | HardwareSpec | Sequence[str | Path | HardwareSpec],
        tp: int = 1,
        weight_dtype: str | None = None,
        kv_dtype: str = "bf16",
        calibration: str | Path | Params | None = None,
        backend: str | None = None,
        act_dtype: str | None = None,
        engine: str | None = None,
        ep: int = 1,
        dp: int = 1,
    ):
        compile_cache.enable()  # before the first compile of this process (see compile_cache)
        self.model = model if isinstance(model, ModelSpec) else load_model(model)
        hw_list = [hardware] if isinstance(hardware, (str, Path, HardwareSpec)) else list(hardware)
        if not hw_list:
            raise ValueError("at least one hardware spec is needed")
        self.hardware = [h if isinstance(h, HardwareSpec) else load_hardware(h) for h in hw_list]
        if isinstance(calibration, Params):
            params, attention = calibration, "fa2"
            gpus = dict.fromkeys(TRANSFER)  # fitted on no GPU we know of: nothing transfers
        else:  # ``engine``: its production-kernel calibration when none is given
            p, doc = _calibration_doc(calibration, self.hardware[0].name, engine)
            params, attention = _params_of(p, doc)
            gpus = _fitted_gpus(doc)
        self.params = as_float_params(params)
        backend = backend or attention
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention backend {backend!r} unknown (choose from {', '.join(ATTENTION_BACKENDS)})"
            )
        self.backend = ATTENTION_BACKENDS[backend]
        self.tp, self.ep, self.dp = tp, ep, dp
        self.dims = ops.model_dims(self.model, tp, weight_dtype, kv_dtype, act_dtype, ep, dp)
        # FA2 folds the GQA heads of a pure-decode batch into rows (its decode path) only when
        # several query heads share a KV head on this rank
        atp = tp // dp  # attention heads are split over tp/dp ranks
        folds = self.model.num_heads // atp > max(1, self.model.num_kv_heads // atp)
        self._decode_attention = (
            "decode" if folds and self.backend.decode_swaps_groups else "prefill"
        )
        if self.backend.name in ("fa3", "flashinfer"):
            self._decode_attention = "any"  # one grid for every batch: nothing to prune
        # efficiencies fitted on one GPU meet another's ceilings through its sustained ones
        self.transfer = [transfer_scales(gpus, h) for h in self.hardware]
        self.hws = ops.stack(
            [ops.hw_arrays(h, s) for h, s in zip(self.hardware, self.transfer, strict=True)]
        )
        leaves, self._treedef = jax.tree.flatten((self.params, self.dims, self.hws))
        self._shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
        # numpy, not jnp: a jnp concatenate would compile two tiny programs on every start
        self._theta = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in leaves])
        kinds = ops.attention_kinds(self.model)
        self._needs = {
            a: Needs(self.model.is_moe, tp > 1, a, kinds) for a in ("any", "decode", "prefill")
        }
        self._programs: dict = {}  # (kind, attention, shapes) -> compiled program

    def _program(self, kind: str, attention: str, shape: tuple[int, ...]):
        """``step_seconds_flat`` (kind "flat", planes ``[3, *shape]``) or
        ``decode_seconds_flat`` (kind "decode", ``shape`` = (requests, steps)) compiled with
        this Estimator's values as compile-time constants. XLA then folds every expression of
        parameters, model and GPU, which otherwise runs as a kernel of its own on each call:
        a decode stretch compiles to 14 kernels instead of 29, ~19 µs instead of ~29 µs.
        Compiled programs persist in the cache folder (see ``compile_cache``), so a later run
        loads them without tracing or lowering."""
        fn = self._programs.get((kind, attention, shape))
        if fn is not None:
            return fn
        theta = np.asarray(self._theta, _host_float())
        needs = self._needs[attention]
        parts = (theta.tobytes(), self._treedef, self._shapes, self.backend, needs)
        dtype = _host_float()
        if kind == "decode":
            width, rows = shape
            args = (np.zeros(width, dtype), np.zeros(rows, dtype), np.ones(rows, dtype))
        else:
            args = (np.zeros((3, *shape), dtype),)
        key = (kind, parts, tuple((a.shape, a.dtype.str) for a in args))
        fn = _PROGRAMS.get(key)
        if fn is None:
            treedef, shapes, be = self._treedef, self._shapes, self.backend
            if kind == "decode":
                raw = decode_seconds_flat.__wrapped__

                def baked(ctx, active, padded):
                    return raw(theta, ctx, active, padded, treedef, shapes, be, needs)
            else:
                raw = step_seconds_flat.__wrapped__

                def baked(cnm):
                    return raw(theta, cnm, treedef, shapes, be, needs)

            baked.__name__ = f"hisim_{kind}"  # names the program in logs and JAX's cache
            fn = compile_cache.executable(jax.jit(baked), args, kind, parts)
            _PROGRAMS[key] = fn
        self._programs[kind, attention, shape] = fn
        return fn

    def _single(self, cache_len: np.ndarray, new_len: np.ndarray) -> np.ndarray | None:
        """Seconds ``[H]`` of one batch (the simulator's prefill steps), or None if a count is
        out of range (the caller then raises the error that names it)."""
        r = len(cache_len)
        cnm = np.zeros((3, 1, bucket_size(r, SINGLE_MIN_WIDTH)), _host_float())
        cnm[0, 0, :r] = cache_len
        cnm[1, 0, :r] = new_len
        cnm[2, 0, :r] = 1.0
        n = cnm[1, 0, :r]
        if not (cnm[0, 0, :r].min() >= 0 and n.min() >= 1):
            return None
        # prompts (any new_len > 1) take the standard grid; pure decodes may fold heads
        attention = "prefill" if n.max() > 1 else "any"
        return np.asarray(self._program("flat", attention, cnm.shape[1:])(cnm))[0]

    def _ragged(self, batches: RaggedBatches) -> np.ndarray:
        """Seconds ``[N, H]``: batches grouped by bucket and by the cost graph they need (a
        batch with a prompt never takes FA2's decode path), cut into calls of a few MB."""
        dtype = _host_float()
        # 1: a request computes more than one token (then only the standard grid applies)
        has_prompt = (np.maximum.reduceat(batches.new_len, batches.offsets) > 1).astype(np.int64)
        out = np.empty((len(batches), len(self.hardware)))
        for idx, planes in pack_ragged(batches, dtype, has_prompt):
            attention = "prefill" if has_prompt[idx[0]] else self._decode_attention
            fn = self._program("flat", attention, planes.shape[1:])
            out[idx] = np.asarray(fn(planes))[: len(idx)]
        return out

    def padded_latency_s(self, planes: np.ndarray, prompt: bool = True) -> np.ndarray:
        """Seconds ``[rows, H]`` of batches already padded by the caller into one
        ``[3, rows, width]`` array (cache_len, new_len, mask: 1 where a request is): one
        compiled shape for batches of any size up to ``width``, where ``step_latency_s``
        compiles one per power-of-two bucket. ``prompt``: some batch computes more than one
        token per request (then FA2's decode path is never taken). The configuration search
        costs its steady states this way."""
        planes = np.asarray(planes, _host_float())
        if planes.ndim != 3 or planes.shape[0] != 3:
            raise ValueError(f"planes must have shape [3, rows, width], got {planes.shape}")
        attention = "prefill" if prompt else self._decode_attention
        return np.asarray(self._program("flat", attention, planes.shape[1:])(planes))

    def step_latency_s(self, batches) -> np.ndarray:
        """Seconds per batch: shape ``[N]`` for one GPU, ``[N, H]`` for several.

        ``batches``: a ``RaggedBatches``, a list of batches ``[[(cache_len, new_len), ...],
        ...]`` or one batch ``[(cache_len, new_len), ...]``. Invalid token counts raise a
        ValueError naming the batch, request and field."""
        if not isinstance(batches, RaggedBatches):
            flat = _single_batch(batches[0]) if _one_batch(batches) else None
            # the simulator's prefill steps: straight to one array
            out = None if flat is None else self._single(flat[0::2], flat[1::2])
            if out is not None:
                return out if len(self.hardware) == 1 else out[None]
            batches = RaggedBatches.from_batches(
                [batches] if _looks_like_one_batch(batches) else batches
            )
        if len(batches) == 1:
            out = self._single(batches.cache_len, batches.new_len)[None]
        else:
            out = self._ragged(batches)
        return out[:, 0] if len(self.hardware) == 1 else out

    def decode_steps_s(self, context: np.ndarray, steps: int, padded=0, active=None) -> np.ndarray:
        """Seconds of ``steps`` consecutive decode steps on the first GPU. Request i holds
        ``context[i]`` tokens at the first step, one more each step; at step j only the first
        ``active[j]`` requests still decode (the others have finished: order them by remaining
        output, longest first), and the batch is padded with one-token dummies to ``padded[j]``
        requests (CUDA-graph replay). ``active`` defaults to all, ``padded`` may be one int.

        Three small vectors go in and the planes are built inside the jit, on one shape family
        (``decode_shape``: requests padded to a power of two >= 64, steps cut into calls of 64
        or fewer rows), so a simulation compiles one or two decode programs and costs a whole
        decode stretch in one call or a few."""
        n = len(context)
        dtype = _host_float()
        act = np.empty(steps, dtype)
        act[:] = n if active is None else np.asarray(active)[:steps]
        pad = np.maximum(padded, act).astype(dtype, copy=False)
        width, rows = decode_shape(max(int(pad.max()), 1))
        ctx = np.zeros(width, dtype)
        ctx[:n] = context
        fn = self._program("decode", self._decode_attention, (width, rows))
        if steps == rows:
            return np.asarray(fn(ctx, act, pad))[:, 0]
        out = np.empty(steps, dtype)
        for j0 in range(0, steps, rows):
            m = min(rows, steps - j0)
            a = np.zeros(rows, dtype)  # rows past the stretch: no request decodes...
            p = np.ones(rows, dtype)  # ...and a one-token dummy keeps them well defined
            a[:m] = act[j0 : j0 + m]
            p[:m] = pad[j0 : j0 + m]
            # step j0 + s sees ctx + j0 + s tokens: whole numbers, so the sum is exact
            out[j0 : j0 + m] = np.asarray(fn(ctx + dtype(j0) if j0 else ctx, a, p))[:m, 0]
        return out

    def breakdown_s(self, batch, hardware_index: int = 0) -> dict[str, float]:
        """Per-operator seconds of one batch (a list of pairs, or a ``RaggedBatches`` of one
        batch) on one of the GPUs."""
        rb = batch if isinstance(batch, RaggedBatches) else RaggedBatches.from_batches([batch])
        if len(rb) != 1:
            raise ValueError(f"breakdown_s: expected one batch, got {len(rb)}")
        cnm = pack_ragged(rb)[0][1][:, 0]  # [3, R] of the one batch
        b = Batch(*(ops._float(x) for x in cnm))
        hw = jax.tree.map(lambda x: x[hardware_index], self.hws)
        parts = breakdown_one(self.params, self.dims, b, hw, self.backend, self._needs["any"])
        return {k: float(v) for k, v in parts.items()}


def _one_batch(batches) -> bool:
    """Whether ``batches`` may be a list holding one batch (the simulator's prefill call)."""
    return isinstance(batches, (list, tuple)) and len(batches) == 1


def _looks_like_one_batch(batches) -> bool:
    """``[(c, n), ...]`` or an ``[R, 2]`` array (one batch) rather than ``[[(c, n), ...], ...]``."""
    if isinstance(batches, np.ndarray):
        return batches.ndim == 2
    if not isinstance(batches, (list, tuple)) or not batches:
        return False
    first = batches[0]
    return (
        isinstance(first, (tuple, list))
        and len(first) > 0
        and isinstance(first[0], (int, float, np.integer, np.floating))
    )


__all__ = [
    "Estimator",
    "Params",
    "bucket_size",
    "breakdown_one",
    "step_seconds_grid",
    "step_seconds_rows",
    "load_calibration",
]
