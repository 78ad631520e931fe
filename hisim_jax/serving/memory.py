"""A replica's memory: KV capacity per tier from the model, the GPU and the options, and the
links between the tiers. SGLang's accounting: ``mem_fraction_static`` of HBM holds weights and
KV, the rest is its activation and CUDA-graph reserve."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hisim_jax.serving.kvcache import KVCacheConfig

# Pinned host<->device copies reach 55 of PCIe Gen5's 64 GB/s per direction at >= 64 MiB
# (data/profiles/h100/pcie.csv).
PCIE_EFFICIENCY = 0.86
MEM_FRACTION_STATIC = 0.88  # SGLang's share of HBM for weights + KV on an 80 GB GPU
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's share for weights, activations and KV
# Memory vLLM's profile run sees besides weights and activations: the CUDA context's and
# cuBLAS/NCCL workspaces outside PyTorch's allocator (~0.5 GiB logged at TP 1).
VLLM_NON_TORCH_BYTES = 0.5 * 2**30


@dataclass(frozen=True, slots=True)
class ReplicaSizing:
    kv_bytes_per_token: float  # per TP rank
    weight_bytes: float  # per TP rank
    l1_tokens: int
    l2_tokens: int
    l3_tokens: int


def size_replica(
    model,
    hardware,
    tp: int = 1,
    weight_bytes_per_param: float = 2.0,
    kv_bytes: float = 2.0,
    l1_fraction: float = MEM_FRACTION_STATIC,
    reserved_bytes: float = 0.0,
    l2_gb: float = 0.0,
    l3_gb: float = 0.0,
    kv_tokens: int | None = None,
) -> ReplicaSizing:
    """KV capacity per tier in tokens, per TP rank: L1 is the HBM share minus the weights and
    ``reserved_bytes`` (SGLang: the share holds weights + KV, the rest of HBM is its activation
    and CUDA-graph reserve; vLLM: the share also holds the profiled activation peak), or
    ``kv_tokens`` when given (SGLang's max_total_tokens, vLLM's num_gpu_blocks_override x
    block size); L2 and L3 are the host DRAM and SSD given per GPU."""
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
    kv_heads = max(1, model.num_kv_heads // tp)
    per_token = 2.0 * model.num_layers * kv_heads * model.head_dim * kv_bytes
    weights = model.weight_params() * weight_bytes_per_param / tp
    # the engines multiply the memory CUDA reports (80 GB marketed is 79.65 GiB on an H100)
    free = hardware.engine_memory_bytes * l1_fraction - weights - reserved_bytes
    if kv_tokens is not None:
        free = kv_tokens * per_token
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
        int(free // per_token),
        int(l2_gb * 1e9 // per_token),
        int(l3_gb * 1e9 // per_token),
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
) -> KVCacheConfig:
    """Tier links from the hardware spec (PCIe at its measured efficiency for L1<->L2, the
    SSD for L2<->L3), or the given overrides (both directions)."""
    pcie = l2_bytes_per_s or hardware.pcie_bytes_per_s * PCIE_EFFICIENCY
    return KVCacheConfig(
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
