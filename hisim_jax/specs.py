"""Model and hardware specifications: loaders for HF config.json and hardware YAML, with validation.

A model is named by the stem of its file in ``models/`` and a GPU by the stem of its file in
``hardware_specs/``; any path to such a file works too. Every loader error is a ``SpecError``
whose message is one line naming the file, the field and the offending value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hisim_jax import files
from hisim_jax.paths import data_dir

# Architectures the loader reads, by family. The family decides which config fields describe
# the layers; every family is a list of layer groups (``LayerGroup``) in the end.
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3-moe",
    "DeepseekV3ForCausalLM": "deepseek-v3",
    "DeepseekV32ForCausalLM": "deepseek-v3.2",
    "KimiK25ForConditionalGeneration": "deepseek-v3",
    "GlmMoeDsaForCausalLM": "deepseek-v3.2",
    "GptOssForCausalLM": "gpt-oss",
    "Llama4ForConditionalGeneration": "llama4",
    "Llama4ForCausalLM": "llama4",
    "Qwen3_5ForConditionalGeneration": "qwen3.5",
    "Qwen3_5MoeForConditionalGeneration": "qwen3.5",
    "Qwen3NextForCausalLM": "qwen3.5",
    "NemotronHForCausalLM": "nemotron-h",
    "Gemma4ForConditionalGeneration": "gemma4",
    "Gemma4ForCausalLM": "gemma4",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# Qwen2 has biases on its q/k/v projections without saying so in config.json.
_ARCH_QKV_BIAS = {"Qwen2ForCausalLM": True}
_QK_NORM_FAMILIES = ("qwen3", "qwen3-moe", "qwen3.5", "gemma4")

# Layer kinds. Attention: "full" (GQA over the whole context), "sliding" (the last W tokens),
# "chunked" (tokens of the same C-token chunk: Llama 4's local attention), "mla" (DeepSeek's
# latent attention; sparse top-k when the model has an indexer), "gdn" (Gated DeltaNet linear
# attention: a fixed state per request), "mamba2" (Mamba-2 SSM: a fixed state per request),
# "none" (an MLP-only layer, as Nemotron-H's). MLP: "dense", "moe", "none" (a mixer-only layer).
ATTENTION_KINDS = ("full", "sliding", "chunked", "mla", "gdn", "mamba2", "none")
MLP_KINDS = ("dense", "moe", "none")
# Weight formats a checkpoint's quantization_config names, with bytes per weight including
# the scales: fp8 with 128x128 blocks (fp32 scales), MXFP4 (e8m0 scale per 32), int4 in
# groups of 32 (bf16 scale per group).
WEIGHT_DTYPE_BYTES = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0 + 4.0 / (128 * 128),
    "mxfp4": 0.5 + 1.0 / 32,
    "fp4": 0.5 + 1.0 / 16,  # NVFP4: an fp8 scale per 16
    "int4": 0.5 + 2.0 / 32,
}


class SpecError(ValueError):
    """A bad model or hardware file; the message is one line: file, field, value."""


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """``count`` decoder layers of one kind: a token mixer (``attention``) and an MLP."""

    attention: str
    mlp: str
    count: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a decoder-only model, as far as step cost and memory depend on it.

    The layers are ``layer_groups``; the fields below are the dimensions each kind reads.
    ``num_heads``/``num_kv_heads``/``head_dim`` describe the softmax-attention layers (full,
    sliding, chunked; MLA's query heads); ``global_*`` override them on full layers where a
    model gives those other dimensions (Gemma 4)."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (0 when no layer has a dense MLP)
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None  # tokens of the sliding layers; None = none
    num_experts: int = 0  # routed experts; 0 = dense
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_moe_layers: int = 0
    max_position_embeddings: int = 0
    family: str = ""
    layer_groups: tuple[LayerGroup, ...] = ()
    mlp_gated: bool = True  # gate and up projections (SwiGLU/GeGLU); False: up only (ReLU²)
    shared_expert_intermediate_size: int = 0  # total width of the always-on experts
    attn_output_gate: bool = False  # Qwen3.5: q_proj also emits a sigmoid gate per head
    attention_chunk: int | None = None  # tokens per chunk of the chunked layers
    global_head_dim: int = 0  # full layers' head dim where it differs (0: head_dim)
    global_kv_heads: int = 0  # ... and their KV heads (0: num_kv_heads)
    global_kv_shared: bool = False  # full layers keep one tensor for K and V (Gemma 4)
    # MLA
    q_lora_rank: int = 0  # 0: a plain q projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    index_topk: int = 0  # DeepSeek sparse attention: keys each query attends (0: dense MLA)
    index_n_heads: int = 0
    index_head_dim: int = 0
    # Gated DeltaNet
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    # Mamba-2
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state_size: int = 0
    mamba_groups: int = 0
    conv_kernel: int = 0  # the short causal convolution of GDN and Mamba layers
    state_dtype_bytes: float = 2.0  # recurrent state's element size (fp32 where configured)
    mtp_layers: int = 0  # multi-token-prediction (draft) layers shipped with the model
    weight_dtype: str = "bf16"  # the checkpoint's linear layers (quantization_config)
    expert_weight_dtype: str = "bf16"  # the checkpoint's routed experts

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layers(self, attention: str | None = None, mlp: str | None = None) -> int:
        """How many layers have this token mixer and/or this MLP."""
        return sum(
            g.count
            for g in self.layer_groups
            if (attention is None or g.attention == attention) and (mlp is None or g.mlp == mlp)
        )

    @property
    def has_state(self) -> bool:
        """Some layers keep a fixed recurrent state per request (GDN, Mamba-2)."""
        return self.layers("gdn") + self.layers("mamba2") > 0

    # -- memory per request ------------------------------------------------------------------

    def _gqa_kv_elems(self, kind: str, tp: int) -> float:
        """K and V elements one token adds to one layer of ``kind`` on one TP rank: KV heads
        are split over the ranks, replicated once there are more ranks than heads."""
        if kind == "full" and (self.global_kv_heads or self.global_head_dim):
            kv = self.global_kv_heads or self.num_kv_heads
            d = self.global_head_dim or self.head_dim
            return (1 if self.global_kv_shared else 2) * max(1, kv // tp) * d
        return 2 * max(1, self.num_kv_heads // tp) * self.head_dim

    def mla_kv_elems(self) -> int:
        """MLA's cached elements per token per layer: the latent and the rope key, one copy
        for all heads (so not split by TP), plus the indexer's key where the model is sparse."""
        return self.kv_lora_rank + self.qk_rope_head_dim + self.index_head_dim

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2.0, tp: int = 1) -> float:
        """Cache bytes one token adds across the layers whose cache grows with the context
        (full attention and MLA), per TP rank."""
        elems = self.layers("full") * self._gqa_kv_elems("full", tp)
        elems += self.layers("mla") * self.mla_kv_elems()
        return float(elems * kv_dtype_bytes)

    def windowed_bytes_per_token(self, kv_dtype_bytes: float = 2.0, tp: int = 1) -> float:
        """Cache bytes a token adds to the sliding and chunked layers (which hold at most
        ``sliding_window`` / ``attention_chunk`` tokens of a request), per TP rank."""
        elems = (self.layers("sliding") + self.layers("chunked")) * self._gqa_kv_elems(
            "sliding", tp
        )
        return float(elems * kv_dtype_bytes)

    def windowed_kv_bytes(self, kv_dtype_bytes: float = 2.0, tp: int = 1) -> float:
        """The most a request's sliding and chunked layers hold: W (or C) tokens each."""
        per = self._gqa_kv_elems("sliding", tp) * kv_dtype_bytes
        return float(
            self.layers("sliding") * (self.sliding_window or 0) * per
            + self.layers("chunked") * (self.attention_chunk or 0) * per
        )

    def state_bytes_per_request(self, tp: int = 1) -> float:
        """The recurrent state a request keeps whatever its length, per TP rank: per GDN
        layer the delta-rule matrix (value heads x key dim x value dim) and the convolution's
        last kernel-1 inputs; per Mamba-2 layer the SSM state (heads x head dim x state) and
        its convolution window. States in ``state_dtype_bytes``, convolution inputs bf16."""
        total = 0.0
        if n := self.layers("gdn"):
            hv = self.linear_num_value_heads // tp
            hk = self.linear_num_key_heads // tp
            dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
            conv_dim = 2 * hk * dk + hv * dv
            total += n * (
                hv * dk * dv * self.state_dtype_bytes + conv_dim * (self.conv_kernel - 1) * 2.0
            )
        if n := self.layers("mamba2"):
            h = self.mamba_num_heads // tp
            d_inner = h * self.mamba_head_dim
            conv_dim = d_inner + 2 * (self.mamba_groups // tp) * self.ssm_state_size
            total += n * (
                h * self.mamba_head_dim * self.ssm_state_size * self.state_dtype_bytes
                + conv_dim * (self.conv_kernel - 1) * 2.0
            )
        return total

    # -- parameters --------------------------------------------------------------------------

    def _attention_params(self, kind: str) -> int:
        h = self.hidden_size
        if kind == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            heads = self.num_heads
            q = (
                h * self.q_lora_rank + self.q_lora_rank * heads * qk
                if self.q_lora_rank
                else h * heads * qk
            )
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * heads * (
                self.qk_nope_head_dim + self.v_head_dim
            )
            o = heads * self.v_head_dim * h
            index = 0
            if self.index_topk:  # the indexer: its own queries, one key head, head weights
                qin = self.q_lora_rank or h
                index = (
                    qin * self.index_n_heads * self.index_head_dim
                    + h * self.index_head_dim
                    + h * self.index_n_heads
                )
            return q + kv + o + index
        if kind == "gdn":
            hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
            kd, vd = hk * self.linear_key_head_dim, hv * self.linear_value_head_dim
            return (
                h * (2 * kd + 2 * vd)  # q, k, v and the output gate z
                + h * 2 * hv  # beta and the decay gate
                + (2 * kd + vd) * self.conv_kernel
                + vd * h
            )
        if kind == "mamba2":
            d_inner = self.mamba_num_heads * self.mamba_head_dim
            bc = 2 * self.mamba_groups * self.ssm_state_size
            return (
                h * (2 * d_inner + bc + self.mamba_num_heads)  # z, x, B, C, dt
                + (d_inner + bc) * self.conv_kernel
                + d_inner * h
            )
        if kind == "none":
            return 0
        d = self.head_dim
        kv_heads = self.num_kv_heads
        kv_copies = 2
        if kind == "full" and (self.global_head_dim or self.global_kv_heads):
            d = self.global_head_dim or d
            kv_heads = self.global_kv_heads or kv_heads
            kv_copies = 1 if self.global_kv_shared else 2
        q_out = self.num_heads * d * (2 if self.attn_output_gate else 1)
        return h * (q_out + kv_copies * kv_heads * d) + self.num_heads * d * h

    def _mlp_params(self, width: int) -> int:
        return (3 if self.mlp_gated else 2) * self.hidden_size * width

    def param_counts(self) -> dict[str, int]:
        """Parameters by module (MTP layers excluded; embedding and LM head once if tied)."""
        out = {"attention": 0, "dense_mlp": 0, "experts": 0, "shared_experts": 0, "router": 0}
        for g in self.layer_groups:
            out["attention"] += g.count * self._attention_params(g.attention)
            if g.mlp == "dense":
                out["dense_mlp"] += g.count * self._mlp_params(self.intermediate_size)
            elif g.mlp == "moe":
                out["experts"] += (
                    g.count * self.num_experts * self._mlp_params(self.moe_intermediate_size)
                )
                out["shared_experts"] += g.count * self._mlp_params(
                    self.shared_expert_intermediate_size
                )
                out["router"] += g.count * self.hidden_size * self.num_experts
        out["embedding"] = self.vocab_size * self.hidden_size
        out["lm_head"] = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return out

    def weight_params(self) -> int:
        """Parameter count (embedding and LM head counted once if tied; MTP layers not)."""
        return int(sum(self.param_counts().values()))

    def active_params(self) -> int:
        """Parameters one token computes with: all but the routed experts it skips and the
        input embedding (a table lookup), as OpenAI and NVIDIA count them; the LM head counts
        (a tied one too)."""
        c = self.param_counts()
        share = self.experts_per_token / self.num_experts if self.num_experts else 0.0
        head = c["lm_head"] or c["embedding"]
        rest = sum(c.values()) - c["experts"] - c["embedding"] - c["lm_head"]
        return int(rest + c["experts"] * share + head)

    def weight_bytes(self, weight_dtype: str | None = None) -> float:
        """Bytes of the weights at the checkpoint's formats (embedding, LM head, norms and
        router in bf16), or every linear layer in ``weight_dtype`` where given."""
        c = self.param_counts()
        lin = WEIGHT_DTYPE_BYTES[weight_dtype or self.weight_dtype]
        exp = WEIGHT_DTYPE_BYTES[weight_dtype or self.expert_weight_dtype]
        return float(
            (c["attention"] + c["dense_mlp"] + c["shared_experts"]) * lin
            + c["experts"] * exp
            + (c["router"] + c["embedding"] + c["lm_head"]) * 2.0
        )

    def parallelism_error(self, tp: int, ep: int = 1, dp: int = 1) -> str | None:
        """Why ``tp`` ranks cannot split this model's heads, or ``ep`` expert-parallel and
        ``dp`` attention data-parallel ranks cannot divide them (ep also its experts), or
        None."""
        for what, n in (("tp", tp), ("ep", ep), ("dp_attention", dp)):
            if n < 1:
                return f"{what}={n} must be >= 1"
        checks = [("attention heads", self.num_heads)]
        if self.layers("gdn"):
            checks += [
                ("linear-attention key heads", self.linear_num_key_heads),
                ("linear-attention value heads", self.linear_num_value_heads),
            ]
        if self.layers("mamba2"):
            checks += [("Mamba heads", self.mamba_num_heads), ("Mamba groups", self.mamba_groups)]
        for what, n in checks:
            if n % tp:
                return f"tp={tp} does not divide the {n} {what} of {self.name}"
        for what, n in (("ep", ep), ("dp_attention", dp)):
            if tp % n:
                return f"{what}={n} does not divide tp={tp}"
        if ep > 1 and not self.is_moe:
            return f"ep={ep}: {self.name} has no experts to spread"
        if ep > 1 and self.num_experts % ep:
            return f"ep={ep} does not divide the {self.num_experts} routed experts of {self.name}"
        return None


def draft_model(spec: ModelSpec, layers: int | None = None) -> ModelSpec:
    """The draft model of speculative decoding (MTP / EAGLE): ``layers`` decoder layers
    (default: the model's MTP layers, else 1) of the target's last layer shape, with its
    embedding and LM head."""
    n = layers if layers is not None else (spec.mtp_layers or 1)
    if n < 1:
        raise ValueError(f"draft layers must be >= 1, got {n}")
    # MTP layers are full attention (DeepSeek: MLA) with the model's MLP of its last layer
    last = spec.layer_groups[-1]
    attention = "mla" if spec.layers("mla") else "full"
    mlp = last.mlp if last.mlp != "none" else ("moe" if spec.is_moe else "dense")
    if mlp == "dense" and not spec.intermediate_size:
        mlp = "moe"
    group = LayerGroup(attention, mlp, n)
    return replace(
        spec,
        name=f"{spec.name}-draft",
        num_layers=n,
        num_moe_layers=n if mlp == "moe" else 0,
        layer_groups=(group,),
        mtp_layers=0,
    )


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """One GPU's datasheet numbers, SI units; ``sources`` maps each field to where it came from."""

    name: str
    vendor: str
    architecture: str
    sm_count: int
    bf16_flops_per_s: float
    fp8_flops_per_s: float  # equals bf16 where the part has no fp8 tensor cores
    fp4_flops_per_s: float  # equals fp8 where the part has no fp4 tensor cores
    hbm_bytes_per_s: float
    hbm_bytes: float
    l2_bytes: float
    interconnect_bytes_per_s: float  # per GPU, per direction (NVLink, IF, or PCIe)
    pcie_bytes_per_s: float  # per direction
    host_dram_bytes: float
    ssd_read_bytes_per_s: float
    ssd_write_bytes_per_s: float
    price_usd_per_hour: float
    sources: tuple[tuple[str, str], ...] = ()
    # what CUDA reports as total memory (cudaMemGetInfo), the figure engines multiply by their
    # memory fraction; 0: the spec's hbm_bytes
    hbm_visible_bytes: float = 0.0
    # measured ceilings beside the datasheet peaks (YAML ``sustained:``); 0: not measured
    sustained_hbm_bytes_per_s: float = 0.0  # a streaming kernel's read + write bytes per second
    sustained_bf16_gemm_flops_per_s: float = 0.0  # a large bf16 GEMM's throughput
    sustained_fp8_gemm_flops_per_s: float = 0.0  # a large per-tensor fp8 GEMM's throughput

    @property
    def engine_memory_bytes(self) -> float:
        return self.hbm_visible_bytes or self.hbm_bytes

    def sustained_fractions(self) -> dict[str, float | None]:
        """Each measured ceiling over its datasheet peak, by its ``sustained:`` key (None where
        not measured): what the part reaches of its peak, comparable between parts because
        every shipped value comes from the same kind of measurement."""
        return {
            key: (getattr(self, field) / getattr(self, peak)) or None
            for key, (field, peak) in SUSTAINED_FIELDS.items()
        }


def sustained_ratios(fitted_on: HardwareSpec, target: HardwareSpec) -> dict[str, float]:
    """``target``'s sustained fraction over ``fitted_on``'s, per ``sustained:`` key: the factor
    an efficiency fitted on one part (relative to its peaks) takes to another; 1 where either
    part lacks the measurement."""
    a, b = fitted_on.sustained_fractions(), target.sustained_fractions()
    return {k: (b[k] / a[k]) if a[k] and b[k] else 1.0 for k in SUSTAINED_FIELDS}


# ------------------------------------------------------------------------------------------------
# other tools' names for our GPUs

# aiconfigurator-core's system names -> hardware_specs/ stems. Here, not in
# estimator/aiconfigurator.py, because every simulation reads a calibration's ``fitted_on``
# by these names and should not import that module (with pandas, optax and equinox) to do so.
AICONFIGURATOR_SYSTEMS = {
    "a100_sxm": "a100-sxm-80gb",
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200-sxm",
    "b200_sxm": "b200",
    "b300_sxm": "b300",
    "gb200": "gb200",
    "gb300": "gb300",
    "l40s": "l40s",
    "rtx_pro_6000_server": "rtx-pro-6000",
}


# ------------------------------------------------------------------------------------------------
# resolution of names to files


def _resolve(name_or_path: str | Path, folder: str, suffixes: tuple[str, ...]) -> Path:
    p = Path(name_or_path)
    if p.suffix in suffixes and os.path.lexists(p):
        return p  # a path that exists in some form: the reader says what is wrong with it
    base = data_dir(folder)
    for suf in suffixes:
        cand = base / f"{name_or_path}{suf}"
        if cand.is_file():
            return cand
    known = ", ".join(sorted(available(folder, suffixes)))
    raise SpecError(f"{name_or_path}: no such file, and not a name in {folder}/ (known: {known})")


def available(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    base = data_dir(folder)
    return sorted({f.stem for f in base.iterdir() if f.suffix in suffixes}) if base.is_dir() else []


def available_models() -> list[str]:
    return available("models", (".json",))


def available_hardware() -> list[str]:
    return available("hardware_specs", (".yaml", ".yml"))


# ------------------------------------------------------------------------------------------------
# models


# Config integers (widths, counts, lengths) beyond int32 are typos, and their products would
# overflow the estimator's arithmetic.
INT_FIELD_MAX = 2**31 - 1


def _int_field(cfg: dict, path: Path, key: str, default: Any = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise SpecError(f"{path}: field '{key}' is missing")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or value != int(value)
    ):
        raise SpecError(f"{path}: field '{key}' must be an integer, got {value!r}")
    if int(value) < minimum:
        raise SpecError(f"{path}: field '{key}' must be >= {minimum}, got {value!r}")
    if int(value) > INT_FIELD_MAX:
        raise SpecError(f"{path}: field '{key}' must be <= {INT_FIELD_MAX}, got {value!r}")
    return int(value)


def _layer_list(cfg: dict, path: Path, key: str, layers: int) -> set[int]:
    """A list of layer indices (``mlp_only_layers``): integers in ``[0, layers)``."""
    value = cfg.get(key)
    if value is None:
        return set()
    if not isinstance(value, list):
        raise SpecError(f"{path}: field '{key}' must be a list of layer indices, got {value!r}")
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < layers:
            raise SpecError(
                f"{path}: field '{key}' must hold layer indices in [0, {layers}), got {x!r}"
            )
    return set(value)


def _bool_field(cfg: dict, path: Path, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{path}: field '{key}' must be true or false, got {value!r}")
    return value


def _layer_types(cfg: dict, path: Path, layers: int, kinds: dict[str, str]) -> list[str]:
    """``layer_types``: one name per layer, each mapped by ``kinds`` to a layer kind."""
    value = cfg.get("layer_types")
    if not isinstance(value, list) or len(value) != layers:
        raise SpecError(
            f"{path}: field 'layer_types' must list one type per layer ({layers}), got {value!r}"
        )
    for i, t in enumerate(value):
        if t not in kinds:
            raise SpecError(
                f"{path}: field 'layer_types[{i}]': unknown layer type {t!r} "
                f"(known: {', '.join(kinds)})"
            )
    return [kinds[t] for t in value]


def _groups(attention: list[str], mlp: list[str]) -> tuple[LayerGroup, ...]:
    """Consecutive-or-not layers of equal kinds counted together, in first-seen order."""
    counts: dict[tuple[str, str], int] = {}
    for a, m in zip(attention, mlp, strict=True):
        counts[a, m] = counts.get((a, m), 0) + 1
    return tuple(LayerGroup(a, m, n) for (a, m), n in counts.items())


def _dtype_of(cfg: dict, path: Path) -> tuple[str, str]:
    """(linear layers, routed experts) weight formats from ``quantization_config``."""
    q = cfg.get("quantization_config")
    if q is None:
        return "bf16", "bf16"
    if not isinstance(q, dict):
        raise SpecError(f"{path}: field 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method")
    if method == "fp8":
        return "fp8", "fp8"
    if method == "mxfp4":
        # gpt-oss: attention, router, embedding and LM head stay bf16 (modules_to_not_convert)
        skipped = " ".join(map(str, q.get("modules_to_not_convert") or ()))
        return ("bf16" if "self_attn" in skipped else "mxfp4"), "mxfp4"
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        bits = {
            (g.get("weights") or {}).get("num_bits") for g in groups.values() if isinstance(g, dict)
        }
        kind = (next(iter(groups.values())).get("weights") or {}).get("type") if groups else None
        if bits == {4}:
            fmt = "int4" if kind == "int" else "fp4"
        elif bits == {8}:
            fmt = "fp8"
        else:
            raise SpecError(
                f"{path}: field 'quantization_config.config_groups': unsupported weight bits "
                f"{sorted(map(str, bits))}"
            )
        # Kimi K2.5: only the routed experts are quantized (attention, shared experts and the
        # dense MLPs are listed in ``ignore``)
        ignored = " ".join(map(str, q.get("ignore") or ()))
        return ("bf16" if "self_attn" in ignored else fmt), fmt
    if method in ("modelopt", "modelopt_fp4", "nvfp4"):
        return "fp4", "fp4"
    raise SpecError(
        f"{path}: field 'quantization_config.quant_method': unsupported {method!r} "
        "(supported: fp8, mxfp4, compressed-tensors, modelopt)"
    )


def _text_config(cfg: dict, path: Path) -> dict:
    """Multimodal configs nest the language model under ``text_config``: its fields win,
    the outer file keeps ``architectures`` (and quantization, where only it has one)."""
    inner = cfg.get("text_config")
    if inner is None:
        return cfg
    if not isinstance(inner, dict):
        raise SpecError(f"{path}: field 'text_config' must be an object, got {inner!r}")
    return {**cfg, **inner}


def model_from_config(
    cfg: dict, path: Path | str = "<config>", name: str | None = None
) -> ModelSpec:
    """Build a ModelSpec from a parsed Hugging Face config.json dict."""
    path = Path(path)
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise SpecError(f"{path}: field 'architectures' must be a list of names, got {archs!r}")
    arch = archs[0]
    if arch not in FAMILIES:
        raise SpecError(
            f"{path}: field 'architectures': unsupported architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    family = FAMILIES[arch]
    cfg = _text_config(cfg, path)
    h = _int_field(cfg, path, "hidden_size")
    layers = _int_field(cfg, path, "num_hidden_layers")
    heads = _int_field(cfg, path, "num_attention_heads")
    kv_heads = _int_field(cfg, path, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise SpecError(
            f"{path}: field 'num_key_value_heads' must divide num_attention_heads={heads}, "
            f"got {kv_heads}"
        )
    head_key = "attention_head_dim" if cfg.get("attention_head_dim") is not None else "head_dim"
    head_dim_default = h // heads if h % heads == 0 else None
    head_dim = _int_field(cfg, path, head_key, default=head_dim_default)
    if cfg.get(head_key) is None and head_dim_default is None:
        raise SpecError(f"{path}: field 'head_dim' is missing and hidden_size/heads is fractional")
    vocab = _int_field(cfg, path, "vocab_size")
    inter = _int_field(cfg, path, "intermediate_size", default=0, minimum=0)
    weight_dtype, expert_dtype = _dtype_of(cfg, path)
    extra: dict[str, Any] = {}
    attention = ["full"] * layers
    mlp = ["dense"] * layers

    window = None
    if family in ("qwen2", "qwen3", "qwen3-moe"):
        # Qwen configs carry a sliding_window value but only use it when use_sliding_window is set.
        if cfg.get("use_sliding_window"):
            window = _int_field(cfg, path, "sliding_window")
            attention = ["sliding"] * layers
    elif family in ("llama", "mistral", "mixtral") and cfg.get("sliding_window") is not None:
        window = _int_field(cfg, path, "sliding_window")
        attention = ["sliding"] * layers

    n_exp = top_k = moe_inter = 0
    if family == "mixtral":
        n_exp = _int_field(cfg, path, "num_local_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        moe_inter, mlp = inter, ["moe"] * layers
    if family == "qwen3-moe" or (family == "qwen3.5" and cfg.get("num_experts") is not None):
        n_exp = _int_field(cfg, path, "num_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        moe_inter = _int_field(cfg, path, "moe_intermediate_size")
        step = _int_field(cfg, path, "decoder_sparse_step", default=1)
        dense_only = _layer_list(cfg, path, "mlp_only_layers", layers)
        mlp = ["dense" if i in dense_only or (i + 1) % step else "moe" for i in range(layers)]
        extra["shared_expert_intermediate_size"] = _int_field(
            cfg, path, "shared_expert_intermediate_size", default=0, minimum=0
        )
    if family in ("deepseek-v3", "deepseek-v3.2"):
        attention = ["mla"] * layers
        n_exp = _int_field(cfg, path, "n_routed_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        moe_inter = _int_field(cfg, path, "moe_intermediate_size")
        first_dense = _int_field(cfg, path, "first_k_dense_replace", default=0, minimum=0)
        freq = _int_field(cfg, path, "moe_layer_freq", default=1)
        mlp = ["moe" if i >= first_dense and i % freq == 0 else "dense" for i in range(layers)]
        shared = _int_field(cfg, path, "n_shared_experts", default=0, minimum=0)
        q_lora = cfg.get("q_lora_rank")
        extra.update(
            shared_expert_intermediate_size=shared * moe_inter,
            q_lora_rank=0 if q_lora is None else _int_field(cfg, path, "q_lora_rank"),
            kv_lora_rank=_int_field(cfg, path, "kv_lora_rank"),
            qk_nope_head_dim=_int_field(cfg, path, "qk_nope_head_dim"),
            qk_rope_head_dim=_int_field(cfg, path, "qk_rope_head_dim"),
            v_head_dim=_int_field(cfg, path, "v_head_dim"),
            mtp_layers=_int_field(cfg, path, "num_nextn_predict_layers", default=0, minimum=0),
        )
        head_dim = extra["qk_nope_head_dim"] + extra["qk_rope_head_dim"]
        if family == "deepseek-v3.2":
            extra.update(
                index_topk=_int_field(cfg, path, "index_topk"),
                index_n_heads=_int_field(cfg, path, "index_n_heads"),
                index_head_dim=_int_field(cfg, path, "index_head_dim"),
            )
    if family in ("gpt-oss", "gemma4"):  # local/global: a window and a type per layer
        window = _int_field(cfg, path, "sliding_window")
        attention = _layer_types(
            cfg, path, layers, {"full_attention": "full", "sliding_attention": "sliding"}
        )
    if family == "gpt-oss":
        n_exp = _int_field(cfg, path, "num_local_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        moe_inter, mlp = inter, ["moe"] * layers
    elif family == "llama4":
        chunk = cfg.get("attention_chunk_size")
        rope = cfg.get("no_rope_layers")
        if rope is None:  # HF's default: every 4th layer is a global NoPE layer
            interval = _int_field(cfg, path, "no_rope_layer_interval", default=4)
            rope = [int((i + 1) % interval != 0) for i in range(layers)]
        if not isinstance(rope, list) or len(rope) != layers or set(rope) - {0, 1}:
            raise SpecError(
                f"{path}: field 'no_rope_layers' must list 0 or 1 per layer ({layers}), "
                f"got {rope!r}"
            )
        if chunk is not None:
            extra["attention_chunk"] = _int_field(cfg, path, "attention_chunk_size")
            attention = ["chunked" if r else "full" for r in rope]
        n_exp = _int_field(cfg, path, "num_local_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        step = _int_field(cfg, path, "interleave_moe_layer_step", default=1)
        moe_idx = set(range(step - 1, layers, step))
        mlp = ["moe" if i in moe_idx else "dense" for i in range(layers)]
        moe_inter = inter  # experts and the shared expert are intermediate_size wide
        extra["shared_expert_intermediate_size"] = inter
        inter = _int_field(cfg, path, "intermediate_size_mlp", default=inter, minimum=0)
    elif family == "qwen3.5":
        attention = _layer_types(
            cfg, path, layers, {"full_attention": "full", "linear_attention": "gdn"}
        )
        extra.update(
            attn_output_gate=_bool_field(cfg, path, "attn_output_gate", False),
            linear_num_key_heads=_int_field(cfg, path, "linear_num_key_heads"),
            linear_num_value_heads=_int_field(cfg, path, "linear_num_value_heads"),
            linear_key_head_dim=_int_field(cfg, path, "linear_key_head_dim"),
            linear_value_head_dim=_int_field(cfg, path, "linear_value_head_dim"),
            conv_kernel=_int_field(cfg, path, "linear_conv_kernel_dim"),
            state_dtype_bytes=_state_dtype(cfg, path, "mamba_ssm_dtype"),
            mtp_layers=_int_field(cfg, path, "mtp_num_hidden_layers", default=0, minimum=0),
        )
    elif family == "nemotron-h":
        pattern = cfg.get("hybrid_override_pattern")
        kinds = {"M": ("mamba2", "none"), "*": ("full", "none"), "-": ("none", "dense")}
        kinds["E"] = ("none", "moe")
        if not isinstance(pattern, str) or len(pattern) != layers or set(pattern) - set(kinds):
            raise SpecError(
                f"{path}: field 'hybrid_override_pattern' must give one of M, *, -, E per "
                f"layer ({layers}), got {pattern!r}"
            )
        attention = [kinds[c][0] for c in pattern]
        mlp = [kinds[c][1] for c in pattern]
        if "E" in pattern:
            n_exp = _int_field(cfg, path, "n_routed_experts")
            top_k = _int_field(cfg, path, "num_experts_per_tok")
            moe_inter = _int_field(cfg, path, "moe_intermediate_size")
            shared = _int_field(cfg, path, "n_shared_experts", default=0, minimum=0)
            extra["shared_expert_intermediate_size"] = shared * _int_field(
                cfg, path, "moe_shared_expert_intermediate_size", default=moe_inter
            )
        mamba_heads = _int_field(cfg, path, "mamba_num_heads")
        extra.update(
            mlp_gated=False,  # ReLU² MLPs and experts: up and down projections only
            mamba_num_heads=mamba_heads,
            mamba_head_dim=_int_field(cfg, path, "mamba_head_dim"),
            ssm_state_size=_int_field(cfg, path, "ssm_state_size"),
            mamba_groups=_int_field(cfg, path, "n_groups"),
            conv_kernel=_int_field(cfg, path, "conv_kernel"),
            state_dtype_bytes=_state_dtype(cfg, path, "mamba_ssm_cache_dtype"),
        )
    elif family == "gemma4":
        extra.update(
            global_head_dim=_int_field(cfg, path, "global_head_dim", default=0, minimum=0),
            global_kv_heads=_int_field(
                cfg, path, "num_global_key_value_heads", default=0, minimum=0
            ),
            global_kv_shared=_bool_field(cfg, path, "attention_k_eq_v", False),
        )
        if _bool_field(cfg, path, "enable_moe_block", False):
            # every layer runs its dense MLP beside the routed experts: an always-on expert
            n_exp = _int_field(cfg, path, "num_experts")
            top_k = _int_field(cfg, path, "top_k_experts")
            moe_inter = _int_field(cfg, path, "moe_intermediate_size")
            extra["shared_expert_intermediate_size"] = inter
            mlp, inter = ["moe"] * layers, 0
    if n_exp and top_k > n_exp:
        raise SpecError(f"{path}: field 'num_experts_per_tok' exceeds experts {n_exp}, got {top_k}")
    if not n_exp:
        mlp = ["dense" if m == "moe" else m for m in mlp]

    return ModelSpec(
        name=name or path.stem,
        architecture=arch,
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=_bool_field(cfg, path, "tie_word_embeddings", False),
        qkv_bias=_bool_field(cfg, path, "attention_bias", _ARCH_QKV_BIAS.get(arch, False)),
        qk_norm=family in _QK_NORM_FAMILIES,
        sliding_window=window if "sliding" in attention else None,
        num_experts=n_exp,
        experts_per_token=top_k,
        moe_intermediate_size=moe_inter,
        num_moe_layers=mlp.count("moe"),
        max_position_embeddings=_int_field(cfg, path, "max_position_embeddings", 0, minimum=0),
        family=family,
        layer_groups=_groups(attention, mlp),
        weight_dtype=weight_dtype,
        expert_weight_dtype=expert_dtype if n_exp else weight_dtype,
        **extra,
    )


_STATE_DTYPES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}


def _state_dtype(cfg: dict, path: Path, key: str) -> float:
    """A recurrent state's element bytes: the config's dtype, else the model's (bf16), as
    vLLM's ``mamba_ssm_cache_dtype="auto"`` takes it."""
    value = cfg.get(key)
    if value is None:
        return 2.0
    if value not in _STATE_DTYPES:
        raise SpecError(
            f"{path}: field '{key}' must be one of {', '.join(_STATE_DTYPES)}, got {value!r}"
        )
    return _STATE_DTYPES[value]


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Load a model by name (stem of a file in models/) or by path to a config.json."""
    path = _resolve(name_or_path, "models", (".json",))
    # Nemotron-H's published time_step_limit holds Infinity (a field the loader never reads)
    text = files.read_text(path, "model config (config.json)", SpecError)
    cfg = files.loads_json(text, path, SpecError, inf_ok=("time_step_limit",))
    stem = path.name.removesuffix(".json").removesuffix(".config")
    return model_from_config(cfg, path, name=stem)


# ------------------------------------------------------------------------------------------------
# hardware

_HW_FLOAT_FIELDS = (
    "bf16_flops_per_s",
    "fp8_flops_per_s",
    "fp4_flops_per_s",
    "hbm_bytes_per_s",
    "hbm_bytes",
    "l2_bytes",
    "interconnect_bytes_per_s",
    "pcie_bytes_per_s",
    "host_dram_bytes",
    "ssd_read_bytes_per_s",
    "ssd_write_bytes_per_s",
    "price_usd_per_hour",
)
_HW_OPTIONAL = ("fp8_flops_per_s", "fp4_flops_per_s")
# Optional measured ceilings, the YAML's ``sustained:`` mapping: key -> (HardwareSpec field,
# the datasheet peak it cannot beat). hardware_specs/README.md says how they were measured.
SUSTAINED_FIELDS = {
    "hbm_bytes_per_s": ("sustained_hbm_bytes_per_s", "hbm_bytes_per_s"),
    "bf16_gemm_flops_per_s": ("sustained_bf16_gemm_flops_per_s", "bf16_flops_per_s"),
    "fp8_gemm_flops_per_s": ("sustained_fp8_gemm_flops_per_s", "fp8_flops_per_s"),
}
# What a GPU can plausibly have, SI units (wide: a phone to far beyond any part announced).
# Values outside are typos (a missing exponent, bytes for GB) that would otherwise push the
# simulated clock to infinity or the KV capacity past int64.
_FLOPS = (1e9, 1e19)
_HW_RANGES = {
    "sm_count": (1, 1e5),
    "bf16_flops_per_s": _FLOPS,
    "fp8_flops_per_s": _FLOPS,
    "fp4_flops_per_s": _FLOPS,
    "hbm_bytes_per_s": (1e6, 1e16),
    "hbm_bytes": (1e6, 1e15),
    "hbm_visible_bytes": (1e6, 1e15),
    "l2_bytes": (1e3, 1e12),
    "interconnect_bytes_per_s": (1e6, 1e15),
    "pcie_bytes_per_s": (1e6, 1e15),
    "host_dram_bytes": (1e6, 1e16),
    "ssd_read_bytes_per_s": (1e6, 1e14),
    "ssd_write_bytes_per_s": (1e6, 1e14),
    "price_usd_per_hour": (1e-6, 1e6),
}


def _positive_number(entry: Any, path: Path, field: str) -> float:
    """A spec value as a finite float > 0 (not a bool), else a one-line error naming it."""
    try:
        value = float(entry) if not isinstance(entry, bool) else math.nan
    except (TypeError, ValueError):
        raise SpecError(f"{path}: field '{field}' must be a number, got {entry!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SpecError(f"{path}: field '{field}' must be a positive number, got {entry!r}")
    return value


def _hw_number(doc: dict, path: Path, key: str) -> tuple[float | None, str]:
    if key not in doc:
        raise SpecError(f"{path}: field '{key}' is missing")
    entry = doc[key]
    source = ""
    if isinstance(entry, dict):
        source = str(entry.get("source", ""))
        if "value" not in entry:
            raise SpecError(f"{path}: field '{key}' has no 'value'")
        entry = entry["value"]
    if entry is None:
        if key in _HW_OPTIONAL:
            return None, source
        raise SpecError(f"{path}: field '{key}' must be a number, got null")
    value = _positive_number(entry, path, key)
    lo, hi = _HW_RANGES[key]
    if not lo <= value <= hi:
        raise SpecError(f"{path}: field '{key}' must be between {lo:g} and {hi:g}, got {entry!r}")
    return value, source


def _sustained(doc: dict, path: Path, peaks: dict[str, float]) -> tuple[dict, dict]:
    """The optional ``sustained:`` mapping: HardwareSpec fields and ``sustained.<key>`` sources.
    Each entry is ``{value, source}``; ``value: null`` means not measured; a measured value
    needs its source and cannot exceed the datasheet peak it is a fraction of."""
    block = doc.get("sustained")
    if block is None:
        return {}, {}
    if not isinstance(block, dict):
        raise SpecError(
            f"{path}: field 'sustained' must be a mapping of {{value, source}} entries, got "
            f"{block!r}"
        )
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for key, entry in block.items():
        field = f"sustained.{key}"
        if key not in SUSTAINED_FIELDS:
            raise SpecError(
                f"{path}: field '{field}' is unknown (known: {', '.join(SUSTAINED_FIELDS)}), "
                f"got {entry!r}"
            )
        if not isinstance(entry, dict) or "value" not in entry:
            raise SpecError(f"{path}: field '{field}' must be {{value, source}}, got {entry!r}")
        value, source = entry["value"], str(entry.get("source") or "").strip()
        if value is None:  # not measured
            if source:
                sources[field] = source
            continue
        number = _positive_number(value, path, field)
        spec_field, peak_key = SUSTAINED_FIELDS[key]
        lo = _HW_RANGES[peak_key][0]
        if number < lo:
            raise SpecError(f"{path}: field '{field}' must be at least {lo:g}, got {value!r}")
        if number > peaks[peak_key]:
            raise SpecError(
                f"{path}: field '{field}' exceeds the datasheet {peak_key} "
                f"({peaks[peak_key]:g}), which a sustained rate cannot beat, got {value!r}"
            )
        if not source:
            raise SpecError(
                f"{path}: field '{field}' has no 'source' (where it was measured), got {value!r}"
            )
        values[spec_field], sources[field] = number, source
    return values, sources


def hardware_from_dict(doc: dict, path: Path | str = "<hardware>", name: str | None = None):
    path = Path(path)
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a YAML mapping, got {type(doc).__name__}")
    values: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for key in ("sm_count", *_HW_FLOAT_FIELDS):
        values[key], sources[key] = _hw_number(doc, path, key)
    visible = 0.0
    if "hbm_visible_bytes" in doc:  # optional: CUDA's view of the memory, where measured
        visible, sources["hbm_visible_bytes"] = _hw_number(doc, path, "hbm_visible_bytes")
        if visible > 1.1 * values["hbm_bytes"]:
            raise SpecError(
                f"{path}: field 'hbm_visible_bytes' exceeds hbm_bytes by more than 10%, got "
                f"{visible!r}"
            )
    sm = values["sm_count"]
    if sm != int(sm):
        raise SpecError(f"{path}: field 'sm_count' must be an integer, got {sm!r}")
    # Parts without low-precision tensor cores run fp8/fp4 weights at the next precision up.
    fp8 = values["fp8_flops_per_s"] or values["bf16_flops_per_s"]
    fp4 = values["fp4_flops_per_s"] or fp8
    peaks = {**values, "fp8_flops_per_s": fp8}
    sustained, sustained_sources = _sustained(doc, path, peaks)
    sources.update(sustained_sources)
    return HardwareSpec(
        name=name or path.stem,
        vendor=str(doc.get("vendor", "")),
        architecture=str(doc.get("architecture", "")),
        sm_count=int(sm),
        bf16_flops_per_s=values["bf16_flops_per_s"],
        fp8_flops_per_s=fp8,
        fp4_flops_per_s=fp4,
        hbm_bytes_per_s=values["hbm_bytes_per_s"],
        hbm_bytes=values["hbm_bytes"],
        l2_bytes=values["l2_bytes"],
        interconnect_bytes_per_s=values["interconnect_bytes_per_s"],
        pcie_bytes_per_s=values["pcie_bytes_per_s"],
        host_dram_bytes=values["host_dram_bytes"],
        ssd_read_bytes_per_s=values["ssd_read_bytes_per_s"],
        ssd_write_bytes_per_s=values["ssd_write_bytes_per_s"],
        price_usd_per_hour=values["price_usd_per_hour"],
        sources=tuple(sorted(sources.items())),
        hbm_visible_bytes=visible,
        **sustained,
    )


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """Load a GPU by name (stem of a file in hardware_specs/) or by path to a YAML file."""
    path = _resolve(name_or_path, "hardware_specs", (".yaml", ".yml"))
    doc = files.read_yaml(path, "GPU spec (YAML)", SpecError)
    return hardware_from_dict(doc, path, name=path.stem)
