"""Sustained ceilings of the hardware specs: the optional ``sustained:`` mapping, its one-line
errors, the sustained/datasheet fractions, and the shipped values."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from hisim_jax.paths import data_dir
from hisim_jax.specs import (
    SUSTAINED_FIELDS,
    SpecError,
    available_hardware,
    hardware_from_dict,
    load_hardware,
    sustained_ratios,
)

HW_DIR = data_dir("hardware_specs")
PATH = "/specs/gpu.yaml"


@pytest.fixture(scope="module")
def base_doc() -> dict:
    """The H100 file without its sustained block (tests add their own)."""
    doc = yaml.safe_load((HW_DIR / "h100-sxm.yaml").read_text())
    doc.pop("sustained", None)
    return doc


def with_sustained(doc: dict, block) -> dict:
    return {**doc, "sustained": block}


def error(doc: dict) -> str:
    with pytest.raises(SpecError) as ei:
        hardware_from_dict(doc, PATH)
    msg = str(ei.value)
    assert "\n" not in msg and PATH in msg, msg
    return msg


FULL = {
    "hbm_bytes_per_s": {"value": 3.0e12, "source": "a copy kernel"},
    "bf16_gemm_flops_per_s": {"value": 800.0e12, "source": "a bf16 GEMM"},
    "fp8_gemm_flops_per_s": {"value": 1500.0e12, "source": "an fp8 GEMM"},
}


def test_parses_values_and_sources(base_doc):
    hw = hardware_from_dict(with_sustained(base_doc, FULL), PATH)
    assert hw.sustained_hbm_bytes_per_s == 3.0e12
    assert hw.sustained_bf16_gemm_flops_per_s == 800.0e12
    assert hw.sustained_fp8_gemm_flops_per_s == 1500.0e12
    sources = dict(hw.sources)
    assert sources["sustained.hbm_bytes_per_s"] == "a copy kernel"
    assert sources["sustained.bf16_gemm_flops_per_s"] == "a bf16 GEMM"
    assert sources["sustained.fp8_gemm_flops_per_s"] == "an fp8 GEMM"
    f = hw.sustained_fractions()
    assert set(f) == set(SUSTAINED_FIELDS)
    assert f["hbm_bytes_per_s"] == pytest.approx(3.0 / 3.35)
    assert f["bf16_gemm_flops_per_s"] == pytest.approx(800.0 / 989.4)
    assert f["fp8_gemm_flops_per_s"] == pytest.approx(1500.0 / 1978.9)


def test_yaml_text_parses(tmp_path, base_doc):
    """The written form (floats with a signed exponent), through the file loader."""
    text = (HW_DIR / "h100-sxm.yaml").read_text().split("\nsustained:")[0].rstrip("\n")
    text += (
        "\nsustained:\n"
        '  hbm_bytes_per_s: {value: 2.97e+12, source: "copy"}\n'
        '  bf16_gemm_flops_per_s: {value: null, source: "not measured"}\n'
    )
    p = tmp_path / "gpu.yaml"
    p.write_text(text)
    hw = load_hardware(p)
    assert hw.sustained_hbm_bytes_per_s == 2.97e12
    assert hw.sustained_bf16_gemm_flops_per_s == 0.0
    assert dict(hw.sources)["sustained.bf16_gemm_flops_per_s"] == "not measured"


def test_absent_means_not_measured(base_doc):
    for doc in (base_doc, with_sustained(base_doc, None), with_sustained(base_doc, {})):
        hw = hardware_from_dict(doc, PATH)
        assert hw.sustained_hbm_bytes_per_s == 0.0
        assert hw.sustained_fractions() == dict.fromkeys(SUSTAINED_FIELDS)
        assert not any(k.startswith("sustained.") for k, _ in hw.sources)


def test_each_key_optional_and_null_allowed(base_doc):
    block = {"bf16_gemm_flops_per_s": FULL["bf16_gemm_flops_per_s"]}
    block["hbm_bytes_per_s"] = {"value": None}  # not measured, no source needed
    hw = hardware_from_dict(with_sustained(base_doc, block), PATH)
    f = hw.sustained_fractions()
    assert f["hbm_bytes_per_s"] is None and f["fp8_gemm_flops_per_s"] is None
    assert f["bf16_gemm_flops_per_s"] == pytest.approx(800.0 / 989.4)
    assert "sustained.hbm_bytes_per_s" not in dict(hw.sources)


def test_equal_to_the_peak_is_allowed(base_doc):
    block = {"hbm_bytes_per_s": {"value": 3.35e12, "source": "x"}}
    assert hardware_from_dict(with_sustained(base_doc, block), PATH).sustained_fractions()[
        "hbm_bytes_per_s"
    ] == pytest.approx(1.0)


# (entry, words the message must hold besides the file and the field)
BAD_ENTRIES = {
    "string": ({"value": "fast", "source": "x"}, ["number", "'fast'"]),
    "bool": ({"value": True, "source": "x"}, ["True"]),
    "list": ({"value": [1, 2], "source": "x"}, ["[1, 2]"]),
    "nan": ({"value": math.nan, "source": "x"}, ["positive", "nan"]),
    "inf": ({"value": math.inf, "source": "x"}, ["positive", "inf"]),
    "zero": ({"value": 0.0, "source": "x"}, ["positive", "0.0"]),
    "negative": ({"value": -2.0e12, "source": "x"}, ["positive", "-2"]),
    "tiny": ({"value": 7.7, "source": "x"}, ["at least", "7.7"]),
    "no-source": ({"value": 1.0e12}, ["source", "1"]),
    "empty-source": ({"value": 1.0e12, "source": "  "}, ["source", "1"]),
    "null-source": ({"value": 1.0e12, "source": None}, ["source", "1"]),
    "bare-number": (1.0e12, ["value, source", "1"]),
    "no-value": ({"source": "x"}, ["value, source", "'x'"]),
}


@pytest.mark.parametrize("key", list(SUSTAINED_FIELDS))
@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_entry(base_doc, key, case):
    entry, words = BAD_ENTRIES[case]
    msg = error(with_sustained(base_doc, {key: entry}))
    assert f"'sustained.{key}'" in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize(
    "key, value, peak",
    [
        ("hbm_bytes_per_s", 3.36e12, "hbm_bytes_per_s"),
        ("bf16_gemm_flops_per_s", 990.0e12, "bf16_flops_per_s"),
        ("fp8_gemm_flops_per_s", 1979.0e12, "fp8_flops_per_s"),
    ],
)
def test_above_the_datasheet_peak(base_doc, key, value, peak):
    msg = error(with_sustained(base_doc, {key: {"value": value, "source": "x"}}))
    assert f"'sustained.{key}'" in msg and peak in msg and "exceeds" in msg
    assert repr(value) in msg


def test_fp8_without_fp8_tensor_cores_is_capped_by_bf16(base_doc):
    """fp8 falls back to the bf16 peak on parts without fp8 (A100): so does its ceiling."""
    doc = {**base_doc, "fp8_flops_per_s": {"value": None, "source": "none"}}
    msg = error(with_sustained(doc, {"fp8_gemm_flops_per_s": {"value": 1.0e15, "source": "x"}}))
    assert "sustained.fp8_gemm_flops_per_s" in msg and "exceeds" in msg


def test_unknown_key(base_doc):
    msg = error(with_sustained(base_doc, {"fp4_gemm_flops_per_s": {"value": 1e15, "source": "x"}}))
    assert "'sustained.fp4_gemm_flops_per_s'" in msg and "unknown" in msg and repr(1e15) in msg
    assert "bf16_gemm_flops_per_s" in msg  # the known keys are listed


@pytest.mark.parametrize("block", [[1, 2], "fast", 3.0e12])
def test_sustained_not_a_mapping(base_doc, block):
    msg = error(with_sustained(base_doc, block))
    assert "'sustained'" in msg and repr(block) in msg


def test_ratios(base_doc):
    h100 = hardware_from_dict(with_sustained(base_doc, FULL), PATH)
    other_doc = {**base_doc, "hbm_bytes_per_s": {"value": 6.0e12, "source": "x"}}
    block = {
        "hbm_bytes_per_s": {"value": 4.5e12, "source": "x"},  # 0.75 of peak vs 3.0/3.35
        "bf16_gemm_flops_per_s": {"value": 400.0e12, "source": "x"},
    }
    other = hardware_from_dict(with_sustained(other_doc, block), PATH)
    r = sustained_ratios(h100, other)
    assert r["hbm_bytes_per_s"] == pytest.approx(0.75 / (3.0 / 3.35))
    assert r["bf16_gemm_flops_per_s"] == pytest.approx(0.5)
    assert r["fp8_gemm_flops_per_s"] == 1.0  # the target has no fp8 measurement
    assert sustained_ratios(h100, h100) == dict.fromkeys(SUSTAINED_FIELDS, pytest.approx(1.0))
    bare = hardware_from_dict(base_doc, PATH)
    assert sustained_ratios(bare, other) == dict.fromkeys(SUSTAINED_FIELDS, 1.0)


# ------------------------------------------------------------------------------------------------
# shipped specs


@pytest.mark.parametrize("name", available_hardware())
def test_shipped_sustained_values_are_sourced_and_below_peak(name):
    hw = load_hardware(name)
    sources = dict(hw.sources)
    for key, fraction in hw.sustained_fractions().items():
        if fraction is None:
            continue
        assert 0.3 < fraction <= 1.0, (key, fraction)
        assert len(sources[f"sustained.{key}"]) > 20, key


# ------------------------------------------------------------------------------------------------
# scripts/sustained_ceilings.py: the shipped values are what it derives


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sustained_ceilings.py"


@pytest.fixture(scope="module")
def script():
    if not SCRIPT.is_file():
        pytest.skip("scripts/ not present")
    spec = importlib.util.spec_from_file_location("sustained_ceilings", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sustained_ceilings"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_replace_block_keeps_every_other_line(script):
    text = "# c\nname: x\nsustained:\n  hbm_bytes_per_s: {value: 1}\n  x: 2\nprice: {value: 1}\n"
    out = script.replace_block(text, "sustained:\n  new: 1\n")
    assert out == "# c\nname: x\nprice: {value: 1}\nsustained:\n  new: 1\n"
    assert script.replace_block(out, "sustained:\n  new: 1\n") == out
    assert script.replace_block("a: 1", "sustained:\n") == "a: 1\nsustained:\n"


def test_shipped_values_are_what_the_tables_give(script, capsys):
    if importlib.util.find_spec("aiconfigurator_core") is None or (
        importlib.util.find_spec("pyarrow") is None
    ):
        pytest.skip("aiconfigurator-core and pyarrow not installed")
    source = dict(load_hardware("h100-sxm").sources)["sustained.bf16_gemm_flops_per_s"]
    shipped = re.match(r"aiconfigurator-core (\S+),", source).group(1)
    if importlib.metadata.version("aiconfigurator-core") != shipped:
        pytest.skip(f"the specs were derived from aiconfigurator-core {shipped}")
    assert script.main(["--check"]) == 0, capsys.readouterr().out
