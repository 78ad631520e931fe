"""A replica's memory: KV capacity per tier from the model, the GPU and the options, and the
links between the tiers. SGLang's accounting: ``mem_fraction_static`` of HBM holds weights and
KV, the rest is its activation and CUDA-graph reserve."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hisim_jax.serving.kvcache import KVCacheConfig
from hisim_jax.specs import WEIGHT_DTYPE_BYTES

# Pinned host<->device copies reach 55 of PCIe Gen5's 64 GB/s per direction at >= 64 MiB
# (data/profiles/h100/pcie.csv).
PCIE_EFFICIENCY = 0.86
MEM_FRACTION_STATIC = 0.88  # SGLang's share of HBM for weights + KV on an 80 GB GPU
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's share for weights, activations and KV
# Memory vLLM's profile run sees besides weights and activations: the CUDA context's and
# cuBLAS/NCCL workspaces outside PyTorch's allocator (~0.5 GiB logged at TP 1).
VLLM_NON_TORCH_BYTES = 0.5 * 2**30


# SGLang's --mamba-full-memory-ratio (0.9, server_args.py of v0.5): recurrent states get 0.9
# parts of the KV budget for every part the growing KV gets, i.e. at most 0.9/1.9 of it.
STATE_MEMORY_SHARE = 0.9 / 1.9
# SGLang's --swa-full-tokens-ratio (0.8): its sliding-window pool holds 0.8 tokens for every
# token of the full-attention pool, so a token costs the full layers' bytes + 0.8 of the
# windowed layers' (a request uses min(length, W) tokens of that pool, freed past the window)
SWA_FULL_TOKENS_RATIO = 0.8


@dataclass(frozen=True, slots=True)
class ReplicaSizing:
    kv_bytes_per_token: float  # per TP rank
    weight_bytes: float  # per TP rank
    l1_tokens: int
    l2_tokens: int
    l3_tokens: int
    # running-request slots the recurrent states were reserved for; None: the model has none,
    # nothing caps the running requests
    max_requests: int | None = None
    request_bytes: float = 0.0  # per slot, per rank


def _weights_per_rank(model, tp: int, dp: int, weight_dtype) -> float:
    """Weights one rank holds: everything split over the tp ranks, except that attention
    data parallelism replicates the token mixers over its dp ranks (each splits the heads
    tp/dp ways). ``weight_dtype``: a format name (None: the checkpoint's own) or, as older
    callers give it, bytes per parameter for every weight."""
    if isinstance(weight_dtype, (int, float)):
        total = model.weight_params() * float(weight_dtype)
        mixers = model.param_counts()["attention"] * float(weight_dtype)
    else:
        total = model.weight_bytes(weight_dtype)
        share = WEIGHT_DTYPE_BYTES[weight_dtype or model.weight_dtype]
        mixers = model.param_counts()["attention"] * share
    if dp == 1:
        return total / tp
    return (total - mixers) / tp + mixers * dp / tp


def size_replica(
    model,
    hardware,
    tp: int = 1,
    weight_dtype: str | float | None = None,
    kv_bytes: float = 2.0,
    l1_fraction: float = MEM_FRACTION_STATIC,
    reserved_bytes: float = 0.0,
    l2_gb: float = 0.0,
    l3_gb: float = 0.0,
    kv_tokens: int | None = None,
    max_requests: int | None = None,
    dp: int = 1,
    draft=None,
) -> ReplicaSizing:
    """KV capacity per tier in tokens: L1 is the HBM share minus the weights and
    ``reserved_bytes`` (SGLang: the share holds weights + KV, the rest of HBM is its activation
    and CUDA-graph reserve; vLLM: the share also holds the profiled activation peak), or
    ``kv_tokens`` when given (SGLang's max_total_tokens, vLLM's num_gpu_blocks_override x
    block size); L2 and L3 are the host DRAM and SSD given per GPU.

    A model's cache has three terms (specs.ModelSpec): bytes per token that grow with the
    context (full attention, MLA), bytes a request's sliding or chunked layers hold (at most
    W or C tokens), and a recurrent state per request (GDN, Mamba-2). Windowed layers add
    ``SWA_FULL_TOKENS_RATIO`` of their bytes to every token, as SGLang sizes its SWA pool
    beside the full one (a model whose layers all slide, Mistral, counts all of them). States
    are reserved per running-request slot — ``max_requests`` slots (the scheduler's cap), or
    fewer where they would take more than ``STATE_MEMORY_SHARE`` of the budget, as SGLang
    sizes its Mamba pool — and the tokens take the rest.

    ``dp``: attention data-parallel ranks; each holds the KV of its own requests (MLA's
    latent is one copy per token whatever the heads' split), so the replica's token capacity
    is dp times a rank's.

    ``draft``: the speculative-decoding draft model (specs.draft_model), whose decoder layers
    (it shares the target's embedding and LM head, as MTP/NEXTN drafts do) and KV take their
    part of the same memory."""
    if not 0 < l1_fraction <= 1:
        raise ValueError(f"l1 fraction must be in (0, 1], got {l1_fraction}")
    for name, gb in (("l2_gb", l2_gb), ("l3_gb", l3_gb)):
        if not (math.isfinite(gb) and gb >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {gb}")
    host = hardware.host_dram_bytes
    if host and l2_gb * 1e9 > host:
        raise ValueError(
            f"l2_gb={l2_gb:g} exceeds the {host / 1e9:.0f} GB of host DRAM per GPU of "
            f"{hardware.name} (its spec's host_dram_bytes)"
        )
    atp = max(1, tp // dp)
    per_token = model.kv_bytes_per_token(kv_bytes, atp)
    windowed = model.windowed_bytes_per_token(kv_bytes, atp)
    # every layer slides: its window bytes are what a token costs (as before windows counted)
    per_token = per_token + SWA_FULL_TOKENS_RATIO * windowed if per_token > 0 else windowed
    per_request = model.state_bytes_per_request(tp)
    weights = _weights_per_rank(model, tp, dp, weight_dtype)
    if draft is not None:
        c = draft.param_counts()
        if isinstance(weight_dtype, (int, float)):
            layers_only = (draft.weight_params() - c["embedding"] - c["lm_head"]) * weight_dtype
        else:
            layers_only = draft.weight_bytes(weight_dtype) - (c["embedding"] + c["lm_head"]) * 2.0
        weights += layers_only / tp
        per_token += draft.kv_bytes_per_token(kv_bytes, atp)
    # the engines multiply the memory CUDA reports (80 GB marketed is 79.65 GiB on an H100)
    free = hardware.engine_memory_bytes * l1_fraction - weights - reserved_bytes
    slots = None
    if per_request > 0:
        slots = int(STATE_MEMORY_SHARE * max(free, 0.0) // per_request)
        if max_requests is not None:
            slots = min(slots, -(-max_requests // dp))
        if slots < 1:
            raise ValueError(
                f"{model.name} at tp={tp} needs {per_request / 1e6:.0f} MB per running request "
                f"(recurrent state) beside {weights / 1e9:.1f} GB of weights per "
                f"GPU; {hardware.name} has no room for one (a larger --tp, or a larger share)"
            )
        free -= slots * per_request
    if kv_tokens is not None:
        free = kv_tokens * per_token / dp
    if free <= per_token:
        raise ValueError(
            f"{model.name} at tp={tp} needs {weights / 1e9:.1f} GB of weights per GPU"
            + (f" and {reserved_bytes / 1e9:.1f} GB of activations" if reserved_bytes else "")
            + f"; {hardware.name} leaves no room for KV in its {l1_fraction:g} share of HBM "
            "(SGLang's --l1-fraction, vLLM's --gpu-memory-utilization; or a larger --tp)"
        )
    return ReplicaSizing(
        per_token,
        weights,
        int(free // per_token) * dp,
        int(l2_gb * 1e9 // per_token),
        int(l3_gb * 1e9 // per_token),
        None if slots is None else slots * dp,
        per_request,
    )


def cache_config(
    sizing: ReplicaSizing,
    hardware,
    block_tokens: int,
    page_size: int = 1,
    eviction: str = "lru",
    write_policy: str = "write_through",
    ranks: int = 1,
    l2_bytes_per_s: float | None = None,
    l3_bytes_per_s: float | None = None,
    state_grid_tokens: int | None = None,
) -> KVCacheConfig:
    """Tier links from the hardware spec (PCIe at its measured efficiency for L1<->L2, the
    SSD for L2<->L3), or the given overrides (both directions). ``state_grid_tokens``: the
    model keeps recurrent states, saved where a cached prefix ends, rounded down to a multiple
    of this (``state_grid``); None: a model without states."""
    pcie = l2_bytes_per_s or hardware.pcie_bytes_per_s * PCIE_EFFICIENCY
    states = {}
    if state_grid_tokens is not None:
        states = dict(state_checkpoints=True, state_grid_tokens=state_grid_tokens)
    return KVCacheConfig(
        **states,
        l1_tokens=sizing.l1_tokens,
        bytes_per_token=sizing.kv_bytes_per_token,
        block_tokens=block_tokens,
        page_size=page_size,
        l2_tokens=sizing.l2_tokens,
        l3_tokens=sizing.l3_tokens,
        l2_read_bytes_per_s=pcie,
        l2_write_bytes_per_s=pcie,
        l3_read_bytes_per_s=l3_bytes_per_s or hardware.ssd_read_bytes_per_s,
        l3_write_bytes_per_s=l3_bytes_per_s or hardware.ssd_write_bytes_per_s,
        eviction=eviction,
        write_policy=write_policy,
        ranks=ranks,
    )


# SGLang's extra_buffer mode (its default under overlap scheduling, v0.5.23
# mem_cache/unified_cache/components/mamba.py) tracks states every 64 tokens.
SGLANG_STATE_GRID = 64
VLLM_KERNEL_BLOCK = 16  # vLLM aligns a hybrid model's block size to its attention kernel's


def state_grid(model, engine: str, page_size: int, kv_bytes: float = 2.0, tp: int = 1):
    """Where a hybrid model's prefix can resume (tokens), or None for a model without
    recurrent states. SGLang: every lcm(64, page) tokens. vLLM (v0.11+, ``mamba_cache_mode``
    "align", config.py ``HybridAttentionMambaModelConfig``): at its hybrid block size, the
    attention block stretched until one block's KV per layer is as large as a layer's state
    (vLLM keeps one page size for both), a multiple of the kernel's 16-token block."""
    if not model.has_state:
        return None
    if engine == "vllm":
        per_layer = model.state_bytes_per_request(tp) / (
            model.layers("gdn") + model.layers("mamba2")
        )
        attn = model.layers("full") or 1
        kv_per_layer_token = model.kv_bytes_per_token(kv_bytes, tp) / attn
        blocks = math.ceil(per_layer / (VLLM_KERNEL_BLOCK * kv_per_layer_token))
        return VLLM_KERNEL_BLOCK * max(1, blocks)
    return math.lcm(SGLANG_STATE_GRID, page_size)


def vllm_reserved_bytes(model, tp: int, max_num_batched_tokens: int, act_bytes: float = 2.0):
    """What vLLM's profile run takes from ``gpu_memory_utilization`` besides the weights
    (vllm/v1/worker/gpu_worker.py, ``determine_available_memory``): the peak activations of a
    forward pass over ``max_num_batched_tokens`` tokens — the widest live tensors, the fused
    gate/up output and its activation (MoE: of the routed copies), beside the residual stream
    and the QKV output — plus the non-torch memory."""
    h, d = model.hidden_size, model.head_dim
    inter = model.intermediate_size
    if model.is_moe:
        inter = max(inter, model.moe_intermediate_size * model.experts_per_token)
    qkv = (model.num_heads + 2 * model.num_kv_heads) * d
    per_token = (3 * inter / tp + 2 * h + qkv / tp) * act_bytes
    return max_num_batched_tokens * per_token + VLLM_NON_TORCH_BYTES
