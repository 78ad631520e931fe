"""Golden outputs: four reference runs whose requests.csv and steps.csv must stay byte-identical
across refactors. A change that moves them on purpose regenerates the hashes with
``HISIM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` and says why in its commit."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from hisim_jax.simulation import SimulationOptions, run, write_outputs

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE = TRACES / "azure_llm_2023_code.csv"
HASHES = Path(__file__).parent / "golden" / "outputs.json"

RUNS = {
    "default": ({}, None),
    "mooncake_l2": (
        {"trace": str(MOONCAKE), "trace_format": "mooncake", "limit": 2000, "l2_gb": 256.0},
        MOONCAKE,
    ),
    "azure_lpm": (
        {"trace": str(AZURE), "trace_format": "azure", "limit": 2000, "schedule_policy": "lpm"},
        AZURE,
    ),
    "cluster4": (
        {
            "trace": str(MOONCAKE),
            "trace_format": "mooncake",
            "limit": 2000,
            "replicas": 4,
            "router": "cache_aware",
            "l2_gb": 64.0,
        },
        MOONCAKE,
    ),  # fmt: skip
}


def _hashes(out: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((out / name).read_bytes()).hexdigest()
        for name in ("requests.csv", "steps.csv")
    }


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_outputs_are_byte_identical(name, tmp_path):
    options, needs = RUNS[name]
    if needs is not None and not needs.is_file():
        pytest.skip("shared traces not present")
    write_outputs(run(SimulationOptions.checked(options)), tmp_path)
    got = _hashes(tmp_path)
    table = json.loads(HASHES.read_text()) if HASHES.is_file() else {}
    if os.environ.get("HISIM_UPDATE_GOLDEN") == "1":
        table[name] = got
        HASHES.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        return
    assert got == table[name], f"{name}: outputs moved (see this module's docstring)"
