"""Model and hardware specifications: loaders for HF config.json and hardware YAML, with validation.

A model is named by the stem of its file in ``models/`` and a GPU by the stem of its file in
``hardware_specs/``; any path to such a file works too. Every loader error is a ``SpecError``
whose message is one line naming the file, the field and the offending value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hisim_jax import files
from hisim_jax.paths import data_dir

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)
# Qwen2 has biases on its q/k/v projections without saying so in config.json.
_ARCH_QKV_BIAS = {"Qwen2ForCausalLM": True}
_ARCH_QK_NORM = {"Qwen3ForCausalLM": True, "Qwen3MoeForCausalLM": True}


class SpecError(ValueError):
    """A bad model or hardware file; the message is one line: file, field, value."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as far as step cost depends on it."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (0 when every layer is MoE)
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None  # tokens; None = full attention
    num_experts: int = 0  # 0 = dense
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_moe_layers: int = 0
    max_position_embeddings: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2.0) -> float:
        """KV-cache bytes one token occupies across all layers (K and V)."""
        return 2.0 * self.num_layers * self.num_kv_heads * self.head_dim * kv_dtype_bytes

    def weight_params(self) -> int:
        """Parameter count (embedding and LM head counted once if tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        dense_mlp = 3 * h * self.intermediate_size
        moe_mlp = self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
        n_dense = self.num_layers - self.num_moe_layers
        layers = self.num_layers * attn + n_dense * dense_mlp + self.num_moe_layers * moe_mlp
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return int(layers + embed)


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

    @property
    def engine_memory_bytes(self) -> float:
        return self.hbm_visible_bytes or self.hbm_bytes


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
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SpecError(
            f"{path}: field 'architectures': unsupported architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    h = _int_field(cfg, path, "hidden_size")
    layers = _int_field(cfg, path, "num_hidden_layers")
    heads = _int_field(cfg, path, "num_attention_heads")
    kv_heads = _int_field(cfg, path, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise SpecError(
            f"{path}: field 'num_key_value_heads' must divide num_attention_heads={heads}, "
            f"got {kv_heads}"
        )
    head_dim_default = h // heads if h % heads == 0 else None
    head_dim = _int_field(cfg, path, "head_dim", default=head_dim_default)
    if cfg.get("head_dim") is None and head_dim_default is None:
        raise SpecError(f"{path}: field 'head_dim' is missing and hidden_size/heads is fractional")
    vocab = _int_field(cfg, path, "vocab_size")
    inter = _int_field(cfg, path, "intermediate_size", minimum=0)

    window = None
    if arch.startswith("Qwen"):
        # Qwen configs carry a sliding_window value but only use it when use_sliding_window is set.
        if cfg.get("use_sliding_window"):
            window = _int_field(cfg, path, "sliding_window")
    elif cfg.get("sliding_window") is not None:
        window = _int_field(cfg, path, "sliding_window")

    n_exp = top_k = moe_inter = n_moe_layers = 0
    if arch == "MixtralForCausalLM":
        n_exp = _int_field(cfg, path, "num_local_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        moe_inter, n_moe_layers = inter, layers
    elif arch == "Qwen3MoeForCausalLM":
        n_exp = _int_field(cfg, path, "num_experts")
        top_k = _int_field(cfg, path, "num_experts_per_tok")
        moe_inter = _int_field(cfg, path, "moe_intermediate_size")
        step = _int_field(cfg, path, "decoder_sparse_step", default=1)
        dense_only = _layer_list(cfg, path, "mlp_only_layers", layers)
        n_moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    if n_exp and top_k > n_exp:
        raise SpecError(f"{path}: field 'num_experts_per_tok' exceeds experts {n_exp}, got {top_k}")

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
        qk_norm=_ARCH_QK_NORM.get(arch, False),
        sliding_window=window,
        num_experts=n_exp,
        experts_per_token=top_k,
        moe_intermediate_size=moe_inter,
        num_moe_layers=n_moe_layers,
        max_position_embeddings=_int_field(cfg, path, "max_position_embeddings", 0, minimum=0),
    )


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Load a model by name (stem of a file in models/) or by path to a config.json."""
    path = _resolve(name_or_path, "models", (".json",))
    cfg = files.read_json(path, "model config (config.json)", SpecError)
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
    try:
        value = float(entry) if not isinstance(entry, bool) else math.nan
    except (TypeError, ValueError):
        raise SpecError(f"{path}: field '{key}' must be a number, got {entry!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SpecError(f"{path}: field '{key}' must be a positive number, got {entry!r}")
    lo, hi = _HW_RANGES[key]
    if not lo <= value <= hi:
        raise SpecError(f"{path}: field '{key}' must be between {lo:g} and {hi:g}, got {entry!r}")
    return value, source


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
    )


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """Load a GPU by name (stem of a file in hardware_specs/) or by path to a YAML file."""
    path = _resolve(name_or_path, "hardware_specs", (".yaml", ".yml"))
    doc = files.read_yaml(path, "GPU spec (YAML)", SpecError)
    return hardware_from_dict(doc, path, name=path.stem)
