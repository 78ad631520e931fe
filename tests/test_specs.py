"""Model and hardware spec loaders: shipped files, dimensions, and one-line errors on bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hisim_jax import specs
from hisim_jax.paths import data_dir
from hisim_jax.specs import (
    SUPPORTED_ARCHITECTURES,
    HardwareSpec,
    ModelSpec,
    SpecError,
    available_hardware,
    available_models,
    hardware_from_dict,
    load_hardware,
    load_model,
    model_from_config,
)

MODELS_DIR = data_dir("models")
HW_DIR = data_dir("hardware_specs")
MODEL_FILES = sorted(MODELS_DIR.glob("*.json"))
HW_FILES = sorted(HW_DIR.glob("*.yaml")) + sorted(HW_DIR.glob("*.yml"))

HW_FIELDS = (
    "sm_count",
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


def one_line(msg: str) -> str:
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.strip(), "empty error message"
    return msg


def load_error(loader, path) -> str:
    """The one-line SpecError message ``loader(path)`` raises."""
    with pytest.raises(SpecError) as ei:
        loader(path)
    return one_line(str(ei.value))


def architecture_of(path: Path) -> str:
    return json.loads(path.read_text())["architectures"][0]


# ------------------------------------------------------------------------------------------------
# shipped model configs


def test_models_folder_is_not_empty():
    assert len(MODEL_FILES) >= 10
    assert set(available_models()) == {p.stem for p in MODEL_FILES}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_every_supported_model_file_loads(path):
    arch = architecture_of(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        with pytest.raises(SpecError):
            load_model(path.stem)
        return
    m = load_model(path.stem)
    assert isinstance(m, ModelSpec)
    assert m.name == path.stem
    assert m.architecture == arch
    for field in (
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
    ):
        assert getattr(m, field) >= 1, field
    assert m.num_heads % m.num_kv_heads == 0
    assert m.intermediate_size >= 0
    if m.is_moe:
        assert 1 <= m.experts_per_token <= m.num_experts
        assert 1 <= m.num_moe_layers <= m.num_layers
        assert m.moe_intermediate_size >= 1
    else:
        assert m.num_experts == m.experts_per_token == m.num_moe_layers == 0
    assert m.weight_params() > 0
    assert sum(g.count for g in m.layer_groups) == m.num_layers
    if {g.attention for g in m.layer_groups} == {"full"} and not m.global_head_dim:
        assert m.kv_bytes_per_token() == 2.0 * m.num_layers * m.num_kv_heads * m.head_dim * 2.0
    # loading by path gives the same spec as loading by name
    assert load_model(path) == m


def test_supported_family_count():
    supported = [p for p in MODEL_FILES if architecture_of(p) in SUPPORTED_ARCHITECTURES]
    assert len(supported) >= 15


def test_llama_3_1_8b_dims():
    m = load_model("llama-3.1-8b")
    assert (m.num_layers, m.hidden_size, m.num_kv_heads, m.head_dim) == (32, 4096, 8, 128)
    assert m.num_heads == 32
    assert m.intermediate_size == 14336
    assert m.vocab_size == 128256
    assert not m.is_moe
    assert m.sliding_window is None
    assert not m.qkv_bias and not m.qk_norm and not m.tie_word_embeddings
    assert m.architecture == "LlamaForCausalLM"


def test_qwen3_30b_a3b_dims():
    m = load_model("qwen3-30b-a3b")
    assert m.is_moe
    assert m.num_experts == 128
    assert m.experts_per_token == 8
    assert m.moe_intermediate_size == 768
    assert m.num_layers == 48
    assert m.num_moe_layers == 48
    assert m.qk_norm is True
    assert m.qkv_bias is False
    assert m.sliding_window is None  # use_sliding_window is false


def test_mixtral_8x7b_dims():
    m = load_model("mixtral-8x7b")
    assert m.num_experts == 8
    assert m.experts_per_token == 2
    assert m.moe_intermediate_size == m.intermediate_size == 14336
    assert m.num_moe_layers == m.num_layers == 32


def test_qwen2_5_1_5b_dims():
    m = load_model("qwen2.5-1.5b")
    assert m.qkv_bias is True
    assert m.tie_word_embeddings is True
    assert m.sliding_window is None
    assert m.qk_norm is False
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim) == (1536, 12, 2, 128)


def test_mistral_7b_sliding_window():
    m = load_model("mistral-7b")
    assert m.sliding_window == 4096
    assert m.architecture == "MistralForCausalLM"


def test_llama_3_2_1b_head_dim():
    m = load_model("llama-3.2-1b")
    assert m.head_dim == 64
    assert m.hidden_size == 2048
    assert m.tie_word_embeddings is True


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "T5ForConditionalGeneration"])
def test_unsupported_architectures_rejected(tmp_path, arch):
    cfg = json.loads((MODELS_DIR / "llama-3.1-8b.json").read_text())
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({**cfg, "architectures": [arch]}))
    msg = load_error(load_model, path)
    assert str(path) in msg
    assert "architectures" in msg
    assert arch in msg


def test_weight_params_llama_3_1_8b():
    n = load_model("llama-3.1-8b").weight_params()
    assert abs(n / 8.03e9 - 1.0) < 0.02, n


def test_weight_params_qwen2_5_1_5b():
    n = load_model("qwen2.5-1.5b").weight_params()
    assert abs(n / 1.54e9 - 1.0) < 0.03, n


def test_tied_embeddings_count_once():
    cfg = json.loads((MODELS_DIR / "llama-3.2-1b.json").read_text())
    tied = model_from_config({**cfg, "tie_word_embeddings": True})
    untied = model_from_config({**cfg, "tie_word_embeddings": False})
    assert untied.weight_params() - tied.weight_params() == tied.vocab_size * tied.hidden_size


def test_unknown_model_lists_known_names():
    with pytest.raises(SpecError) as ei:
        load_model("no-such-model-xyz")
    msg = one_line(str(ei.value))
    assert "no-such-model-xyz" in msg
    for known in ("llama-3.1-8b", "qwen3-30b-a3b", "mixtral-8x7b"):
        assert known in msg


def test_unknown_hardware_lists_known_names():
    with pytest.raises(SpecError) as ei:
        load_hardware("no-such-gpu")
    msg = one_line(str(ei.value))
    assert "no-such-gpu" in msg
    assert "h100-sxm" in msg and "a100-sxm-80gb" in msg


# ------------------------------------------------------------------------------------------------
# shipped hardware


def test_hardware_folder_is_not_empty():
    assert len(HW_FILES) >= 5
    assert set(available_hardware()) == {p.stem for p in HW_FILES}


@pytest.mark.parametrize("path", HW_FILES, ids=lambda p: p.stem)
def test_every_hardware_file_loads(path):
    hw = load_hardware(path.stem)
    assert isinstance(hw, HardwareSpec)
    assert hw.name == path.stem
    assert isinstance(hw.sm_count, int) and hw.sm_count > 0
    for f in HW_FIELDS:
        v = getattr(hw, f)
        assert math.isfinite(v) and v > 0, (f, v)
    # low precision never slower than the next precision up
    assert hw.fp8_flops_per_s >= hw.bf16_flops_per_s
    assert hw.fp4_flops_per_s >= hw.fp8_flops_per_s
    assert load_hardware(path) == hw


def test_a100_fp8_falls_back_to_bf16():
    hw = load_hardware("a100-sxm-80gb")
    assert hw.bf16_flops_per_s == pytest.approx(312.0e12)
    assert hw.fp8_flops_per_s == hw.bf16_flops_per_s
    assert hw.fp4_flops_per_s == hw.bf16_flops_per_s


def test_h100_fp4_falls_back_to_fp8():
    hw = load_hardware("h100-sxm")
    assert hw.fp8_flops_per_s == pytest.approx(1978.9e12)
    assert hw.fp4_flops_per_s == hw.fp8_flops_per_s
    assert hw.sm_count == 132
    assert hw.hbm_bytes_per_s == pytest.approx(3.35e12)


def test_h100_has_a_source_for_each_field():
    sources = dict(load_hardware("h100-sxm").sources)
    datasheet = {k for k in sources if not k.startswith("sustained.")}  # tests/test_specs_sustained
    assert datasheet == set(HW_FIELDS) | {"hbm_visible_bytes"}  # the one optional it has
    for field, text in sources.items():
        assert isinstance(text, str) and len(text.strip()) > 5, field


# ------------------------------------------------------------------------------------------------
# bad model files


def write_json_model(tmp_path: Path, cfg: dict, name: str = "bad.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(cfg, indent=2))
    return p


@pytest.fixture
def llama_cfg() -> dict:
    return json.loads((MODELS_DIR / "llama-3.1-8b.json").read_text())


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": ,\n}\n')
    msg = load_error(load_model, p)
    assert str(p) in msg
    assert "line 3" in msg


def test_missing_hidden_size(tmp_path, llama_cfg):
    del llama_cfg["hidden_size"]
    p = write_json_model(tmp_path, llama_cfg)
    msg = load_error(load_model, p)
    assert str(p) in msg
    assert "hidden_size" in msg
    assert "missing" in msg


def test_non_integer_hidden_size(tmp_path, llama_cfg):
    llama_cfg["hidden_size"] = "abc"
    p = write_json_model(tmp_path, llama_cfg)
    msg = load_error(load_model, p)
    assert str(p) in msg
    assert "hidden_size" in msg
    assert "abc" in msg


def test_kv_heads_must_divide_heads(tmp_path, llama_cfg):
    llama_cfg["num_key_value_heads"] = 5  # 32 heads
    p = write_json_model(tmp_path, llama_cfg)
    msg = load_error(load_model, p)
    assert str(p) in msg
    assert "num_key_value_heads" in msg
    assert "5" in msg


def test_top_k_above_experts(tmp_path):
    cfg = json.loads((MODELS_DIR / "mixtral-8x7b.json").read_text())
    cfg["num_experts_per_tok"] = 9
    p = write_json_model(tmp_path, cfg)
    msg = load_error(load_model, p)
    assert "num_experts_per_tok" in msg and str(p) in msg


def test_json_not_an_object(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2, 3]\n")
    msg = load_error(load_model, p)
    assert str(p) in msg


# ------------------------------------------------------------------------------------------------
# bad hardware files


@pytest.fixture
def h100_doc() -> dict:
    return yaml.safe_load((HW_DIR / "h100-sxm.yaml").read_text())


def write_yaml(tmp_path: Path, doc: dict, name: str = "gpu.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_hardware_copy_loads(tmp_path, h100_doc):
    """The round-trip through a temp file works, so the failures below are the edits' doing."""
    hw = load_hardware(write_yaml(tmp_path, h100_doc, "copy.yaml"))
    assert hw.name == "copy"
    assert hw.hbm_bytes_per_s == load_hardware("h100-sxm").hbm_bytes_per_s


@pytest.mark.parametrize("as_entry", [True, False], ids=["value-entry", "bare"])
def test_hardware_non_number(tmp_path, h100_doc, as_entry):
    h100_doc["hbm_bytes_per_s"] = {"value": "fast", "source": "x"} if as_entry else "fast"
    p = write_yaml(tmp_path, h100_doc)
    msg = load_error(load_hardware, p)
    assert str(p) in msg
    assert "'hbm_bytes_per_s'" in msg
    assert "fast" in msg


def test_hardware_negative_value(tmp_path, h100_doc):
    h100_doc["hbm_bytes"] = {"value": -80.0e9, "source": "x"}
    p = write_yaml(tmp_path, h100_doc)
    msg = load_error(load_hardware, p)
    assert str(p) in msg
    assert "hbm_bytes" in msg
    assert "-80" in msg


def test_hardware_zero_value(tmp_path, h100_doc):
    h100_doc["sm_count"] = 0
    p = write_yaml(tmp_path, h100_doc)
    with pytest.raises(SpecError) as ei:
        load_hardware(p)
    assert "sm_count" in one_line(str(ei.value))


def test_hardware_missing_field(tmp_path, h100_doc):
    del h100_doc["l2_bytes"]
    p = write_yaml(tmp_path, h100_doc)
    msg = load_error(load_hardware, p)
    assert str(p) in msg
    assert "l2_bytes" in msg
    assert "missing" in msg


def test_hardware_required_field_null(tmp_path, h100_doc):
    h100_doc["bf16_flops_per_s"] = {"value": None, "source": "x"}
    p = write_yaml(tmp_path, h100_doc)
    msg = load_error(load_hardware, p)
    assert "bf16_flops_per_s" in msg and str(p) in msg


def test_hardware_malformed_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nsm_count: {value: 132, source: 'a'\nbf16_flops_per_s: [1, 2\n")
    msg = load_error(load_hardware, p)
    assert str(p) in msg
    assert "YAML" in msg
    assert "line" in msg


def test_hardware_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError) as ei:
        load_hardware(p)
    assert str(p) in one_line(str(ei.value))


def test_hardware_from_dict_non_integer_sm_count(h100_doc):
    h100_doc["sm_count"] = 131.5
    with pytest.raises(SpecError) as ei:
        hardware_from_dict(h100_doc, "x.yaml")
    assert "sm_count" in one_line(str(ei.value))


# ------------------------------------------------------------------------------------------------
# property tests of model_from_config

DENSE_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@st.composite
def valid_configs(draw):
    arch = draw(st.sampled_from(DENSE_ARCHS + ("MixtralForCausalLM", "Qwen3MoeForCausalLM")))
    kv = draw(st.integers(1, 16))
    heads = kv * draw(st.integers(1, 8))
    explicit_head_dim = draw(st.booleans())
    if explicit_head_dim:
        head_dim = draw(st.integers(1, 256))
        hidden = heads * draw(st.integers(1, 256))  # need not equal heads * head_dim
    else:
        head_dim = draw(st.integers(1, 256))
        hidden = heads * head_dim
    cfg = {
        "architectures": [arch],
        "hidden_size": hidden,
        "num_hidden_layers": draw(st.integers(1, 128)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": draw(st.integers(1, 300_000)),
        "intermediate_size": draw(st.integers(0 if arch in DENSE_ARCHS else 1, 65_536)),
        "tie_word_embeddings": draw(st.booleans()),
        "max_position_embeddings": draw(st.integers(0, 1 << 20)),
    }
    if explicit_head_dim:
        cfg["head_dim"] = head_dim
    if arch == "MistralForCausalLM" and draw(st.booleans()):
        cfg["sliding_window"] = draw(st.integers(1, 1 << 16))
    if arch == "MixtralForCausalLM":
        cfg["num_local_experts"] = draw(st.integers(1, 64))
        cfg["num_experts_per_tok"] = draw(st.integers(1, cfg["num_local_experts"]))
    if arch == "Qwen3MoeForCausalLM":
        cfg["num_experts"] = draw(st.integers(1, 256))
        cfg["num_experts_per_tok"] = draw(st.integers(1, cfg["num_experts"]))
        cfg["moe_intermediate_size"] = draw(st.integers(1, 8192))
    return cfg, head_dim


@settings(max_examples=150, deadline=None)
@given(valid_configs())
def test_model_from_config_round_trips(case):
    cfg, head_dim = case
    m = model_from_config(cfg, "/some/where/x.json")
    arch = cfg["architectures"][0]
    assert m.name == "x"
    assert m.architecture == arch
    assert m.hidden_size == cfg["hidden_size"]
    assert m.num_layers == cfg["num_hidden_layers"]
    assert m.num_heads == cfg["num_attention_heads"]
    assert m.num_kv_heads == cfg["num_key_value_heads"]
    assert m.head_dim == head_dim
    assert m.intermediate_size == cfg["intermediate_size"]
    assert m.vocab_size == cfg["vocab_size"]
    assert m.tie_word_embeddings == cfg["tie_word_embeddings"]
    assert m.max_position_embeddings == cfg["max_position_embeddings"]
    assert m.qkv_bias == (arch == "Qwen2ForCausalLM")
    assert m.qk_norm == arch.startswith("Qwen3")
    assert m.sliding_window == cfg.get("sliding_window")
    if arch == "MixtralForCausalLM":
        assert (m.num_experts, m.experts_per_token) == (
            cfg["num_local_experts"],
            cfg["num_experts_per_tok"],
        )
        assert m.moe_intermediate_size == cfg["intermediate_size"]
        assert m.num_moe_layers == m.num_layers
    elif arch == "Qwen3MoeForCausalLM":
        assert (m.num_experts, m.experts_per_token) == (
            cfg["num_experts"],
            cfg["num_experts_per_tok"],
        )
        assert m.moe_intermediate_size == cfg["moe_intermediate_size"]
        assert m.num_moe_layers == m.num_layers
    else:
        assert not m.is_moe and m.num_moe_layers == 0
    # integral floats are accepted as integers
    m2 = model_from_config({**cfg, "hidden_size": float(cfg["hidden_size"])}, "/some/where/x.json")
    assert m2 == m


_BASE_CFG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "intermediate_size": 512,
}
# field -> smallest valid value
_INT_FIELDS = {
    "hidden_size": 1,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 1,
    "vocab_size": 1,
    "intermediate_size": 0,
}
# None means "absent" for fields with a default, so leave it out of the junk for those.
_HAS_DEFAULT = {"num_key_value_heads", "head_dim"}

_finite_junk = st.one_of(
    st.text(max_size=12),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
)


@st.composite
def junk_case(draw):
    field = draw(st.sampled_from(sorted(_INT_FIELDS)))
    below = st.integers(max_value=_INT_FIELDS[field] - 1)
    values = st.one_of(_finite_junk, below)
    if field not in _HAS_DEFAULT:
        values = st.one_of(values, st.none())
    return field, draw(values)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk_case())
def test_junk_int_field_raises_spec_error(case):
    field, value = case
    cfg = {**_BASE_CFG, field: value}
    try:
        model_from_config(cfg, "/cfg/junk.json")
    except SpecError as e:
        msg = one_line(str(e))
        assert "/cfg/junk.json" in msg
        assert f"'{field}'" in msg, msg
    else:  # pragma: no cover - the assertion is the point
        pytest.fail(f"{field}={value!r} was accepted")


# Non-finite numbers: Python's json module accepts NaN/Infinity in config.json; the loader
# must reject them with a SpecError naming the file and field.


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["hidden_size", "num_key_value_heads", "vocab_size"])
def test_non_finite_int_field_raises_spec_error(field, value):
    with pytest.raises(SpecError) as ei:
        model_from_config({**_BASE_CFG, field: value}, "/cfg/junk.json")
    assert field in one_line(str(ei.value))


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_config_json_with_non_finite_hidden_size(tmp_path, literal):
    p = tmp_path / "nan.json"
    p.write_text(json.dumps(_BASE_CFG).replace('"hidden_size": 256', f'"hidden_size": {literal}'))
    assert literal in p.read_text()
    msg = load_error(load_model, p)
    assert str(p) in msg and "hidden_size" in msg


@pytest.mark.parametrize("value", ["abc", [1], math.nan], ids=["str", "list", "nan"])
def test_junk_max_position_embeddings_raises_spec_error(value):
    with pytest.raises(SpecError) as ei:
        model_from_config({**_BASE_CFG, "max_position_embeddings": value}, "/cfg/junk.json")
    assert "max_position_embeddings" in one_line(str(ei.value))


def test_specs_module_exports():
    # SpecError is a ValueError so callers that catch ValueError keep working
    assert issubclass(SpecError, ValueError)
    assert specs.available_models() == sorted(specs.available_models())


def test_visible_memory_is_optional_and_checked(tmp_path):
    import yaml

    base = yaml.safe_load((data_dir("hardware_specs") / "h100-sxm.yaml").read_text())
    h = load_hardware("h100-sxm")
    assert h.engine_memory_bytes == 85.52e9 and h.hbm_bytes == 80e9
    del base["hbm_visible_bytes"]
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_hardware(path).engine_memory_bytes == 80e9  # absent: the datasheet figure
    base["hbm_visible_bytes"] = {"value": 100e9, "source": "typo"}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(SpecError, match="hbm_visible_bytes"):
        load_hardware(path)
