"""Try bad inputs against the ``hisim`` CLI and the Python API; list the cases that break the
README's promise for bad input.

The promise: one line on stderr starting ``error:``, exit code 2, no traceback, nothing on
stdout, and nothing already written lost or corrupted (a failing command leaves the folder it
ran in exactly as it was: no new, changed or half-written files). Cases marked ``ok`` may
instead succeed, but then every summary.json / JSON output must be strict JSON (no NaN or
Infinity) and every request must end completed or rejected.

Each case runs in-process (typer's CliRunner) in a fresh temporary folder holding small valid
inputs (a model config, a GPU spec, traces of every format, a calibration, a profile, a step
log, an old results folder); the case spoils one of them or passes one bad option.

    python scripts/probe_bad_inputs.py                # every case; a count per class
    python scripts/probe_bad_inputs.py -k trace -v    # cases whose name contains 'trace'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from hisim_jax.cli import app
from hisim_jax.paths import data_dir

REPO = Path(__file__).resolve().parents[1]
EIO_FILE = Path("/proc/self/mem")  # a regular file whose read fails (EIO) even for root
UNWRITABLE = Path("/sys/hisim-probe")  # mkdir fails (EPERM) even for root

# ------------------------------------------------------------------------------------------------
# fixtures: small valid inputs in every case's folder

GENERIC_JSONL = "".join(
    json.dumps({"arrival_s": 0.5 * i, "input_len": 300 + 10 * i, "output_len": 8}) + "\n"
    for i in range(6)
)
GENERIC_CSV = "arrival_s,input_len,output_len\n" + "".join(
    f"{0.5 * i},{300 + 10 * i},8\n" for i in range(6)
)
MOONCAKE = "".join(
    json.dumps({"timestamp": 500 * i, "input_length": 600, "output_length": 8, "hash_ids": [0, i]})
    + "\n"
    for i in range(4)
)
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
    f"2023-11-16 18:15:4{i}.000,{400 + i},8\n" for i in range(4)
)
SHAREGPT = json.dumps(
    [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": "hi " * 200},
                {"from": "gpt", "value": "ok " * 20},
            ],
        }
        for i in range(3)
    ]  # fmt: skip
)
LOG = "start_s,kind,request_ids\n0.0,prefill,0 1\n0.1,decode,0 1\n0.6,prefill,2\n"
OLD = {"requests.csv": "old requests\n", "steps.csv": "old steps\n", "summary.json": "{}\n"}


def make_fixtures(d: Path) -> None:
    shutil.copy(data_dir("models") / "llama-3.2-1b.json", d / "model.json")
    shutil.copy(data_dir("hardware_specs") / "h100-sxm.yaml", d / "hw.yaml")
    shutil.copy(data_dir("hardware_specs") / "calibration" / "h100-sxm.json", d / "cal.json")
    steps = pd.read_csv(data_dir("data") / "profiles" / "h100" / "steps.csv").head(4)
    steps.to_csv(d / "steps.csv", index=False)
    (d / "profiles").mkdir()
    steps.to_csv(d / "profiles" / "steps.csv", index=False)
    (d / "t.jsonl").write_text(GENERIC_JSONL)
    (d / "t.csv").write_text(GENERIC_CSV)
    (d / "mooncake.jsonl").write_text(MOONCAKE)
    (d / "azure.csv").write_text(AZURE)
    (d / "sharegpt.json").write_text(SHAREGPT)
    (d / "log.csv").write_text(LOG)
    (d / "run.yaml").write_text("limit: 5\n")
    (d / "afile").write_text("a file, not a folder\n")
    (d / "old").mkdir()
    for name, text in OLD.items():
        (d / "old" / name).write_text(text)


# ------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    cls: str
    name: str
    make: Callable[[Path], list | Callable[[], object]]  # CLI args, or a Python call
    ok: bool = False  # success is acceptable too (outputs then checked)
    patch: Callable[[], contextlib.AbstractContextManager] | None = None
    notes: list[str] = field(default_factory=list)


CASES: list[Case] = []


def case(cls: str, name: str, ok: bool = False, patch=None):
    def deco(make):
        CASES.append(Case(cls, name, make, ok, patch))
        return make

    return deco


def add(cls: str, name: str, args, ok: bool = False, patch=None) -> None:
    """A case whose args do not depend on the folder (strings, or callables of the folder)."""
    CASES.append(Case(cls, name, lambda d: [a(d) if callable(a) else a for a in args], ok, patch))


def w(path: str, text: str | bytes) -> Callable[[Path], str]:
    """An argument: write ``text`` to ``path`` in the case's folder, pass its path."""

    def make(d: Path) -> str:
        p = d / path
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return str(p)

    return make


def edit_json(src: str, dst: str, change: Callable[[dict], str]) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        (d / dst).write_text(change(json.loads((d / src).read_text())))
        return str(d / dst)

    return make


def edit_text(src: str, dst: str, change: Callable[[str], str]) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        (d / dst).write_text(change((d / src).read_text()))
        return str(d / dst)

    return make


# -- class: files (one reader for every loader) --------------------------------------------------


def _variant(kind: str, suffix: str) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        p = d / f"bad{suffix}"
        if kind == "missing":
            return str(d / f"nope{suffix}")
        if kind == "directory":
            p.mkdir()
        elif kind == "undecodable":
            p.write_bytes(b"\xff\xfe\xfa\x00\x81 garbage \x9c\n\x80\x81,\xfe\n")
        elif kind == "unreadable":
            p.symlink_to(EIO_FILE)
        elif kind == "parent_is_file":
            return str(d / "afile" / f"x{suffix}")
        elif kind == "empty":
            p.write_text("")
        elif kind == "symlink_loop":
            p.symlink_to(p.name)
        return str(p)

    return make


FILE_VARIANTS = (
    "missing", "directory", "undecodable", "unreadable", "parent_is_file", "empty", "symlink_loop",
)  # fmt: skip
SIM = ["simulate", "--limit", "4", "--out", "o"]
FILE_SLOTS = {
    "model": (".json", lambda p: ["estimate", "--model", p]),
    "hardware": (".yaml", lambda p: ["estimate", "-H", p]),
    "calibration": (".json", lambda p: ["estimate", "--calibration", p]),
    "batches": (".csv", lambda p: ["estimate", "--batches", p]),
    "profile": (".csv", lambda p: ["validate", "steps", "--profile", p, "--plot", "v.png"]),
    "config": (".yaml", lambda p: ["simulate", "--config", p, "--out", "o"]),
    "sim-model": (".json", lambda p: [*SIM, "--model", p]),
    "sim-calibration": (".json", lambda p: [*SIM, "--calibration", p]),
    **{
        f"trace-{fmt}": (suf, lambda p, fmt=fmt: [*SIM, "--trace", p, "--trace-format", fmt])
        for fmt, suf in (
            ("mooncake", ".jsonl"),
            ("jsonl", ".jsonl"),
            ("csv", ".csv"),
            ("azure", ".csv"),
            ("sharegpt", ".json"),
        )  # fmt: skip
    },
    "cache-trace": (
        ".jsonl",
        lambda p: [
            "validate",
            "cache",
            "--trace",
            p,
            "--trace-format",
            "jsonl",
            "--l1-tokens",
            "1000",
        ],  # fmt: skip
    ),
    "scheduler-log": (
        ".csv",
        lambda p: [
            "validate",
            "scheduler",
            "--log",
            p,
            "--trace",
            "t.jsonl",
            "--trace-format",
            "jsonl",
        ],  # fmt: skip
    ),
    "scheduler-config": (
        ".yaml",
        lambda p: ["validate", "scheduler", "--log", "log.csv", "--config", p],
    ),  # fmt: skip
    "calibrate-profiles": (
        "",
        lambda p: ["calibrate", "--profiles", p, "--iterations", "2", "--out", "c.json"],
    ),  # fmt: skip
}
for slot, (suffix, build) in FILE_SLOTS.items():
    for kind in FILE_VARIANTS:
        CASES.append(
            Case("files", f"{slot}:{kind}", lambda d, b=build, v=_variant(kind, suffix): b(v(d)))
        )
for name in ("gemm.csv", "attention.csv"):
    for kind, content in (("undecodable", b"\xff\xfe\x00\x81\n\x9c"), ("garbage", b"a,b\n1,2\n")):
        add("files", f"calibrate-{name}:{kind}",
            ["calibrate", "--profiles", w(f"p2/{name}", content), "--iterations", "2",
             "--out", "c.json"])  # fmt: skip
# the profiles folder is given, not the file: point at the folder holding it
for c in CASES[-4:]:
    c.make = (lambda m: lambda d: _profiles_dir(d, m(d)))(c.make)


def _profiles_dir(d: Path, args: list) -> list:
    shutil.copy(d / "steps.csv", d / "p2" / "steps.csv")
    return [str(d / "p2") if a.endswith((".csv",)) and "/p2/" in a else a for a in args]


# -- class: output folders and files validated before any work -----------------------------------

for label, out in (("parent_is_file", "afile/o"), ("is_a_file", "afile"),
                   ("unwritable", str(UNWRITABLE / "o"))):  # fmt: skip
    add("outputs", f"simulate-out:{label}", ["simulate", "--limit", "4", "--out", out])
    add("outputs", f"config-out:{label}",
        ["simulate", "--config", w("c.yaml", f"limit: 4\nout: {out}\n")])  # fmt: skip
for label, out in (("parent_is_file", "afile/x.csv"), ("is_a_dir", "old"),
                   ("unwritable", str(UNWRITABLE / "x.csv"))):  # fmt: skip
    add("outputs", f"estimate-out:{label}", ["estimate", "--batches", "steps.csv", "--out", out])
    add(
        "outputs",
        f"validate-out:{label}",
        ["validate", "steps", "--profile", "steps.csv", "--out", out, "--plot", "v.png"],
    )
    add("outputs", f"validate-plot:{label}",
        ["validate", "steps", "--profile", "steps.csv", "--out", "rows.csv",
         "--plot", out.replace(".csv", ".png")])  # fmt: skip
    add("outputs", f"calibrate-out:{label}",
        ["calibrate", "--profiles", "profiles", "--iterations", "2",
         "--out", out.replace(".csv", ".json")])  # fmt: skip
add(
    "outputs",
    "validate-plot:missing-dir",
    ["validate", "steps", "--profile", "steps.csv", "--out", "rows.csv", "--plot", "no/v.png"],
)


# -- class: a failed write leaves the previous results whole --------------------------------------


@contextlib.contextmanager
def _disk_full_on_summary():
    """json.dumps of a run summary fails as a full disk would while writing summary.json."""
    real = json.dumps

    def dumps(obj, *a, **k):
        if isinstance(obj, dict) and "requests_total" in obj and k.get("indent") == 2:
            raise OSError(28, "No space left on device")
        return real(obj, *a, **k)

    json.dumps = dumps
    try:
        yield
    finally:
        json.dumps = real


@contextlib.contextmanager
def _disk_full_on_csv():
    real = pd.DataFrame.to_csv
    calls = {"n": 0}

    def to_csv(self, path=None, *a, **k):
        calls["n"] += 1
        if path is not None and calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, path, *a, **k)

    pd.DataFrame.to_csv = to_csv
    try:
        yield
    finally:
        pd.DataFrame.to_csv = real


add("writes", "simulate:summary-write-fails", ["simulate", "--limit", "4", "--out", "old"],
    patch=_disk_full_on_summary)  # fmt: skip
add("writes", "simulate:steps-write-fails", ["simulate", "--limit", "4", "--out", "old"],
    patch=_disk_full_on_csv)  # fmt: skip
add(
    "writes",
    "validate-steps:plot-fails-after-csv",
    ["validate", "steps", "--profile", "steps.csv", "--out", "rows.csv", "--plot", "old"],
)


# -- class: every number finite and in range -------------------------------------------------------

# caps that only stop limiting when huge: a run with them is valid (its outputs are checked)
HARMLESS_WHEN_HUGE = ("--chunked-prefill-size", "--max-prefill-tokens", "--page-size")
for opt, value in (
    ("--rate-scale", "1e-300"), ("--rate-scale", "inf"), ("--rate-scale", "nan"),
    ("--l1-fraction", "nan"), ("--step-overhead-ms", "1e300"), ("--l3-gb", "1e300"),
    ("--l3-shared-gb", "1e300"), ("--cuda-graph-max-bs", "1000000000000"),
    ("--replicas", "100000000"), ("--tp", "1000000"), ("--page-size", "1000000000000000"),
    ("--chunked-prefill-size", "1000000000000000000000"), ("--start-s", "1e300"),
    ("--end-s", "inf"), ("--gpu-price-usd-per-hour", "1e308"),
    ("--cpu-price-usd-per-hour", "1e-320"), ("--max-prefill-tokens", "1000000000000000000000"),
    ("--fleet", "h100-sxm:1x100000000"), ("--fleet", "h100-sxm:0x1"),
    ("--bucket-bounds", "nan"), ("--bucket-bounds", "8192,-5"), ("--pd", "1:0"),
):  # fmt: skip
    add(
        "numbers",
        f"simulate{opt}={value}",
        ["simulate", "--limit", "4", opt, value, "--out", "o"],
        ok=opt in HARMLESS_WHEN_HUGE,
    )
# this sitting's options: the engines, their own knobs, the front end, the KV override
for opt, value in (
    ("--engine", "tgi"), ("--frontend", "maybe"), ("--kv-cache-tokens", "0"),
    ("--kv-cache-tokens", "1e30"), ("--gpu-memory-utilization", "1.5"),
    ("--gpu-memory-utilization", "nan"),
):  # fmt: skip
    extra = ["--engine", "vllm"] if opt == "--gpu-memory-utilization" else []
    add("numbers", f"simulate{opt}={value}", ["simulate", "--limit", "4", *extra, opt, value,
        "--out", "o"])  # fmt: skip
for name, args in (
    ("vllm-with-l1-fraction", ["--engine", "vllm", "--l1-fraction", "0.8"]),
    ("sglang-with-max-num-seqs", ["--max-num-seqs", "64"]),
    ("vllm-with-swap", ["--engine", "vllm", "--preemption", "swap"]),
    ("vllm-max-num-batched-tokens-0", ["--engine", "vllm", "--max-num-batched-tokens", "0"]),
):
    add("numbers", f"simulate:{name}", ["simulate", "--limit", "4", *args, "--out", "o"])
# speculative decoding: its depth, acceptance (one rate or one per draft step), draft depth
SPEC = ["--speculative-num-steps", "3"]
for name, args in (
    ("spec-steps-negative", ["--speculative-num-steps", "-1"]),
    ("spec-steps-huge", ["--speculative-num-steps", "1000000"]),
    ("spec-rate-above-one", [*SPEC, "--speculative-accept-rate", "1.5"]),
    ("spec-rate-nan", [*SPEC, "--speculative-accept-rate", "nan"]),
    ("spec-rate-list-too-short", [*SPEC, "--speculative-accept-rate", "0.8,0.6"]),
    ("spec-rate-not-a-number", [*SPEC, "--speculative-accept-rate", "0.8,x,0.4"]),
    ("spec-rate-without-steps", ["--speculative-accept-rate", "0.7"]),
    ("spec-draft-layers-zero", [*SPEC, "--speculative-draft-layers", "0"]),
):
    add("numbers", f"simulate:{name}", ["simulate", "--limit", "4", *args, "--out", "o"])
add("numbers", "config:speculative_accept_rate=[0.8, true, 0.4]",
    ["simulate", "--config", w("c.yaml", "speculative_num_steps: 3\n"
     "speculative_accept_rate: [0.8, true, 0.4]\n"), "--out", "o"])  # fmt: skip
# the new families: parallelism that does not divide tp or the experts, configs the loader
# cannot represent (the field named), a checkpoint that does not fit
for name, args in (
    ("ep-not-dividing-tp", ["--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "4"]),
    ("ep-on-a-dense-model", ["--tp", "2", "--ep", "2"]),
    ("ep-zero", ["--ep", "0"]),
    ("dp-attention-not-dividing-tp", ["--tp", "2", "--dp-attention", "4"]),
    ("dp-attention-nan", ["--dp-attention", "nan"]),
    ("deepseek-on-one-h100", ["--model", "deepseek-v3"]),
    ("weight-dtype-unknown", ["--weight-dtype", "int3"]),
):
    add("numbers", f"simulate:{name}", ["simulate", "--limit", "4", *args, "--out", "o"])


def _family(src_name: str, change: Callable[[dict], dict]) -> Callable[[Path], list]:
    def make(d: Path) -> list:
        cfg = json.loads((data_dir("models") / f"{src_name}.json").read_text())
        (d / "family.json").write_text(json.dumps(change(cfg)))
        return ["estimate", "--model", str(d / "family.json")]

    return make


for label, src_name, change in (
    ("layer_types-short", "gpt-oss-20b", lambda c: {**c, "layer_types": ["full_attention"]}),
    ("layer_types-unknown", "gpt-oss-20b",
     lambda c: {**c, "layer_types": ["odd"] * c["num_hidden_layers"]}),
    ("hybrid_override_pattern-bad", "nemotron-h-56b",
     lambda c: {**c, "hybrid_override_pattern": "MX"}),
    ("kv_lora_rank-missing", "deepseek-v3", lambda c: {**c, "kv_lora_rank": None}),
    ("quant_method-gptq", "deepseek-v3",
     lambda c: {**c, "quantization_config": {"quant_method": "gptq"}}),
    ("text_config-not-object", "qwen3.5-27b", lambda c: {**c, "text_config": [1]}),
    ("no_rope_layers-bad", "llama-4-maverick",
     lambda c: {**c, "text_config": {**c["text_config"], "no_rope_layers": [2, 3]}}),
    ("mamba_ssm_dtype-bad", "qwen3.5-27b",
     lambda c: {**c, "text_config": {**c["text_config"], "mamba_ssm_dtype": "int8"}}),
):  # fmt: skip
    CASES.append(Case("numbers", f"model:{label}", _family(src_name, change)))
add("files", "validate-e2e:missing-run", ["validate", "e2e", "nope.json", "--out", "rep"])
add(
    "files", "validate-e2e:empty-json", ["validate", "e2e", w("bad-run.json", "{}"), "--out", "rep"]
)
add("files", "validate-e2e:bad-csv", ["validate", "e2e",
    w("bad-run.csv", "arrival_s,input_len,output_len,ttft_ms,e2e_ms\n0,-3,8,10,20\n"),
    "--out", "rep"])  # fmt: skip
# hisim search: a bad space file or flag, one line naming the key, nothing written
for name, text in (
    ("not-a-mapping", "[1, 2]\n"),
    ("axes-not-a-mapping", "axes: [1, 2]\n"),
    ("bad-yaml", "model: [\n"),
    ("duplicate-key", "gpus: 2\ngpus: 3\n"),
    ("unknown-key", "colour: red\n"),
    ("unknown-model", "model: llama-99b\n"),
    ("unknown-gpu-in-axis", "axes: {hardware: [h100-sxm, h999]}\n"),
    ("negative-axis-value", "axes: {l2_gb: [0, -1]}\n"),
    ("inf-slo", "slo: {ttft_p99_ms: .inf}\n"),
    ("unknown-slo", "slo: {ttft_p95_ms: 100}\n"),
    ("range-without-step", "axes: {l2_gb: {min: 0, max: 10}}\n"),
    ("log-range-from-zero", "axes: {l2_gb: {min: 0, max: 10, num: 3, scale: log}}\n"),
    ("workload-axis", "axes: {trace: [a.jsonl]}\n"),
    ("budget-zero", "gpus: 0\n"),
    ("out-in-space", "out: somewhere\n"),
):
    add("search", f"search:{name}",
        ["search", "--space", w(f"space-{name}.yaml", text), "--out", "s", "--no-cache"])  # fmt: skip
add("search", "search:missing-space", ["search", "--space", "nope.yaml", "--out", "s"])
add("search", "search:space-is-a-folder", ["search", "--space", "old", "--out", "s"])
add("search", "search:out-is-a-file", ["search", "--out", "afile", "--no-cache"])
add("search", "search:bad-strategy", ["search", "--strategy", "best", "--out", "s"])
add("search", "search:bad-slo-flag", ["search", "--slo", "ttft=3", "--out", "s"])
add("search", "search:bad-tp-flag", ["search", "--tp", "1,x", "--out", "s"])
add("search", "search:zero-max-simulations", ["search", "--max-simulations", "0", "--out", "s"])
add("search", "search:nan-margin", ["search", "--margin", "nan", "--out", "s"])
add("search", "search:zero-cpu-price", ["search", "--cpu-price", "0", "--out", "s"])
add("usage", "calibrate:aiconfigurator-no-system",
    ["calibrate", "--source", "aiconfigurator", "--out", "c.json"])  # fmt: skip
add("usage", "calibrate:unknown-source", ["calibrate", "--source", "magic", "--out", "c.json"])
for opt, value in (("--l2-gb-s", "1e-300"), ("--l3-gb-s", "1e-300")):
    add(
        "numbers",
        f"simulate{opt}={value}",
        ["simulate", "--limit", "4", "--l2-gb", "8", "--l3-gb", "8", opt, value, "--out", "o"],
    )
add("numbers", "simulate--l3-shared-gb-s=1e-300",
    ["simulate", "--limit", "4", "--l2-gb", "8", "--l3-shared-gb", "8",
     "--l3-shared-gb-s", "1e-300", "--out", "o"])  # fmt: skip
for opt, value in (("--kv-link-gb-s", "1e-300"), ("--kv-link-latency-us", "1e300")):
    add(
        "numbers",
        f"simulate-pd{opt}={value}",
        ["simulate", "--limit", "4", "--pd", "1:1", opt, value, "--out", "o"],
    )
add(
    "numbers",
    "simulate--block-tokens=1e15",
    [
        "simulate",
        "--trace",
        "t.jsonl",
        "--trace-format",
        "jsonl",
        "--block-tokens",
        "1000000000000000",
        "--out",
        "o",
    ],
    ok=True,
)  # one partial block per prompt: valid
for key, value in (("limit", ".inf"), ("limit", ".nan"), ("limit", "1e400"),
                   ("rate_scale", ".inf"), ("rate_scale", "1.0e-300"), ("l2_gb", "-.inf"),
                   ("tp", "1.0e+30"), ("seed", "-1"), ("limit", "[1]"), ("l1_fraction", "true"),
                   ("kv_link_gb_s", ".nan"), ("limit", "{a: 1}")):  # fmt: skip
    add(
        "numbers",
        f"config:{key}={value}",
        ["simulate", "--config", w("c.yaml", f"{key}: {value}\n"), "--out", "o"],
    )
for label, text in (
    ("csv-arrival-1e400", "arrival_s,input_len,output_len\n0,300,8\n1e400,300,8\n"),
    ("csv-arrival-1e308", "arrival_s,input_len,output_len\n0,300,8\n1e308,300,8\n"),
    ("csv-arrival-1e15", "arrival_s,input_len,output_len\n0,300,8\n1e15,300,8\n"),
    ("csv-timestamp_ms-1e300", "timestamp_ms,input_len,output_len\n0,300,8\n1e300,300,8\n"),
    ("csv-output-1e18", "arrival_s,input_len,output_len\n0,300,1000000000000000000\n"),
    ("csv-input-1e18", "arrival_s,input_len,output_len\n0,1000000000000000000,8\n"),
):
    add(
        "numbers",
        f"trace:{label}",
        ["simulate", "--trace", w("b.csv", text), "--trace-format", "csv", "--out", "o"],
        ok="-input-" in label or "-output-" in label,
    )  # such a request is rejected with a reason
add("numbers", "trace:jsonl-arrival-1e308-rate-0.5",
    ["simulate", "--trace", w("b.jsonl", '{"arrival_s":0,"input_len":9,"output_len":2}\n'
                              '{"arrival_s":1e308,"input_len":9,"output_len":2}\n'),
     "--trace-format", "jsonl", "--rate-scale", "0.5", "--out", "o"])  # fmt: skip
add("numbers", "trace:mooncake-timestamp-1e300",
    ["simulate", "--trace", w("b.jsonl", MOONCAKE + json.dumps(
        {"timestamp": 1e300, "input_length": 9, "output_length": 2, "hash_ids": [7]}) + "\n"),
     "--out", "o"])  # fmt: skip
add(
    "numbers",
    "trace:rate-scale-1e-9-mooncake",
    ["simulate", "--trace", "mooncake.jsonl", "--rate-scale", "1e-9", "--out", "o"],
)


def _hw(key: str, value: str) -> Callable[[Path], str]:
    def change(text: str) -> str:
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key}:")]
        return "\n".join([*lines, f"{key}: {value}", ""])

    return edit_text("hw.yaml", "bad-hw.yaml", change)


for key, value in (("hbm_bytes", "1.0e+300"), ("bf16_flops_per_s", "1.0e-300"),
                   ("pcie_bytes_per_s", "1.0e-300"), ("sm_count", "1.0e+12"),
                   ("host_dram_bytes", "1.0e+300"), ("price_usd_per_hour", "1.0e+308"),
                   ("hbm_bytes_per_s", "1.0e-300")):  # fmt: skip
    add("numbers", f"hardware:{key}={value}",
        ["simulate", "--limit", "4", "--l2-gb", "16", "--hardware", _hw(key, value),
         "--out", "o"])  # fmt: skip


def _model(change: dict, base: str = "model.json") -> Callable[[Path], str]:
    return edit_json(base, "bad-model.json", lambda cfg: json.dumps({**cfg, **change}))


def _qwen_moe(d: Path) -> None:
    shutil.copy(data_dir("models") / "qwen3-30b-a3b.json", d / "moe.json")


for label, change in (
    ("mlp_only_layers-int", {"mlp_only_layers": 3}),
    ("mlp_only_layers-str", {"mlp_only_layers": "0,1"}),
    ("mlp_only_layers-float", {"mlp_only_layers": [1.5]}),
    ("mlp_only_layers-dict", {"mlp_only_layers": {"a": 1}}),
):
    CASES.append(Case("numbers", f"model:{label}", (
        lambda ch: lambda d: (_qwen_moe(d), ["estimate", "--model", _model(ch, "moe.json")(d)])[1]
    )(change)))  # fmt: skip
for label, change in (
    ("hidden_size-1e30", {"hidden_size": 1e30}),
    ("num_hidden_layers-1e12", {"num_hidden_layers": 10**12}),
    ("vocab_size-1e15", {"vocab_size": 10**15}),
    ("max_position_embeddings-neg", {"max_position_embeddings": -1}),
    ("intermediate_size-nan", {"intermediate_size": math.nan}),
    ("head_dim-1e9", {"head_dim": 10**9}),
    ("rms_norm_eps-nan", {"rms_norm_eps": math.nan}),
    ("rope_theta-neg", {"rope_theta": -5}),
    ("tie_word_embeddings-str", {"tie_word_embeddings": "yes"}),
):
    add(
        "numbers",
        f"model:{label}",
        ["simulate", "--limit", "4", "--model", _model(change), "--out", "o"],
        ok=label == "rope_theta-neg",
    )  # unused


def _cal(change: Callable[[dict], None]) -> Callable[[Path], str]:
    def edit(doc: dict) -> str:
        change(doc)
        return json.dumps(doc)

    return edit_json("cal.json", "bad-cal.json", edit)


for label, value in (("inf", math.inf), ("nan", math.nan), ("1e-300", 1e-300), ("1e300", 1e300)):
    add(
        "numbers",
        f"calibration:gemm_flops_eff={label}",
        [
            "simulate",
            "--limit",
            "4",
            "--calibration",
            _cal(lambda d, v=value: d["params"].__setitem__("gemm_flops_eff", v)),
            "--out",
            "o",
        ],
    )
add(
    "numbers",
    "calibration:params-list",
    ["estimate", "--calibration", w("c.json", '{"params": [1, 2]}')],
)
for label, text in (
    ("step_ms-inf", 'model,batch,step_ms\nllama-3.1-8b,"[[0,16]]",inf\n'),
    ("batch-1e400", 'model,batch,step_ms\nllama-3.1-8b,"[[0,1e400]]",1.0\n'),
    ("batch-nan", 'model,batch,step_ms\nllama-3.1-8b,"[[NaN,1]]",1.0\n'),
):
    add(
        "numbers",
        f"profile:{label}",
        ["validate", "steps", "--profile", w("p.csv", text), "--plot", "v.png"],
    )
for opt, value in (("--bytes-per-token", "nan"), ("--bytes-per-token", "-1"),
                   ("--bytes-per-token", "inf"), ("--bytes-per-token", "0"),
                   ("--l1-tokens", "-5"), ("--l1-tokens", "0"), ("--l2-tokens", "-1"),
                   ("--page-size", "0"), ("--limit", "0"), ("--block-tokens", "0"),
                   ("--eviction", "fifo"), ("--write-policy", "sometimes")):  # fmt: skip
    add("numbers", f"cache{opt}={value}",
        ["validate", "cache", "--trace", "t.jsonl", "--trace-format", "jsonl",
         "--l1-tokens", "1000", opt, value])  # fmt: skip
for opt, value in (("--tp", "0"), ("--tp", "-1"), ("--tp", "7"), ("--batch", "[[0,1e400]]"),
                   ("--batch", "[[NaN,1]]"), ("--batch", "[[0,1.5]]")):  # fmt: skip
    add("numbers", f"estimate{opt}={value}", ["estimate", opt, value])
add("numbers", "validate-steps--tp=0", ["validate", "steps", "--tp", "0", "--plot", "v.png"])


# -- class: duplicate keys -------------------------------------------------------------------------

add("duplicates", "config", ["simulate", "--config", w("c.yaml", "limit: 4\nlimit: 5\n"),
                             "--out", "o"])  # fmt: skip
add(
    "duplicates",
    "config-dash-underscore",
    ["simulate", "--config", w("c.yaml", "rate-scale: 2\nrate_scale: 3\nlimit: 4\n"), "--out", "o"],
)
add(
    "duplicates",
    "hardware",
    ["estimate", "-H", edit_text("hw.yaml", "d.yaml", lambda t: t + "sm_count: 7\n")],
)
add(
    "duplicates",
    "model",
    [
        "estimate",
        "--model",
        edit_text("model.json", "d.json", lambda t: t.replace("{", '{"hidden_size": 7,', 1)),
    ],
)
add(
    "duplicates",
    "calibration",
    [
        "estimate",
        "--calibration",
        edit_text(
            "cal.json", "d.json", lambda t: t.replace('"params": {', '"params": {"layer_s": 1,', 1)
        ),
    ],
)
add(
    "duplicates",
    "trace-jsonl-line",
    [
        "simulate",
        "--trace",
        w("b.jsonl", '{"arrival_s":0,"input_len":9,"input_len":90,"output_len":2}\n'),
        "--trace-format",
        "jsonl",
        "--out",
        "o",
    ],
)
add("duplicates", "trace-csv-header",
    ["simulate", "--trace", w("b.csv", "arrival_s,input_len,input_len,output_len\n0,9,90,2\n"),
     "--trace-format", "csv", "--out", "o"])  # fmt: skip
add("duplicates", "scheduler-log-header",
    ["validate", "scheduler", "--log", w("l.csv", "start_s,kind,kind,request_ids\n0,prefill,"
                                          "decode,0\n"), "--trace", "t.jsonl",
     "--trace-format", "jsonl"])  # fmt: skip


# -- class: strict JSON and every request accounted for -------------------------------------------

add("summary", "all-rejected",
    ["simulate", "--trace", w("b.csv", "arrival_s,input_len,output_len\n0,500000,8\n"),
     "--trace-format", "csv", "--out", "o"], ok=True)  # fmt: skip
add("summary", "one-request",
    ["simulate", "--trace", w("b.csv", "arrival_s,input_len,output_len\n0,50,1\n"),
     "--trace-format", "csv", "--out", "o", "--format", "json"], ok=True)  # fmt: skip
add("summary", "tiny-slo",
    ["simulate", "--limit", "4", "--slo-ttft-ms", "1e-300", "--slo-tpot-ms", "1e-300",
     "--out", "o", "--format", "json"], ok=True)  # fmt: skip
add(
    "summary",
    "huge-gpu-price",
    ["simulate", "--limit", "4", "--gpu-price-usd-per-hour", "1e307", "--out", "o"],
    ok=True,
)
add("summary", "pd-validate-cache-json",
    ["validate", "cache", "--trace", "t.jsonl", "--trace-format", "jsonl", "--l1-tokens", "1",
     "--format", "json"], ok=True)  # fmt: skip


# -- class: scheduler logs -------------------------------------------------------------------------

for label, text in (
    ("header-only", "start_s,kind,request_ids\n"),
    ("unknown-ids", "start_s,kind,request_ids\n0.0,prefill,0 1 99\n"),
    ("negative-id", "start_s,kind,request_ids\n0.0,prefill,-1\n"),
    ("non-integer-id", "start_s,kind,request_ids\n0.0,prefill,0 x\n"),
    ("nan-start", "start_s,kind,request_ids\nnan,prefill,0\n"),
    ("inf-start", "start_s,kind,request_ids\ninf,prefill,0\n"),
    ("unknown-kind", "start_s,kind,request_ids\n0.0,Prefill,0\n"),
    ("only-decode", "start_s,kind,request_ids\n0.0,decode,0\n"),
    ("missing-column", "start_s,request_ids\n0.0,0\n"),
):
    add("scheduler-log", label,
        ["validate", "scheduler", "--log", w("l.csv", text), "--trace", "t.jsonl",
         "--trace-format", "jsonl"])  # fmt: skip


# -- class: usage errors (typer/click) in one line -------------------------------------------------

for label, args in (
    ("unknown-command", ["frobnicate"]),
    ("unknown-subcommand", ["validate", "frobnicate"]),
    ("unknown-option", ["simulate", "--frobnicate"]),
    ("misspelt-option", ["simulate", "--lmit", "3"]),
    ("bad-int", ["simulate", "--limit", "abc"]),
    ("bad-float", ["simulate", "--rate-scale", "fast"]),
    ("bad-choice", ["estimate", "--format", "xml"]),
    ("missing-value", ["simulate", "--trace"]),
    ("missing-required", ["validate", "cache"]),
    ("below-min", ["calibrate", "--out", "c.json", "--iterations", "0"]),
    ("no-command", []),
    ("validate-no-command", ["validate"]),
    ("extra-argument", ["estimate", "extra"]),
    ("undecodable-trace-path", ["simulate", "--trace", "\udcff\udcfe.jsonl", "--out", "o"]),
):
    add("usage", label, args)


# -- class: the Python API ------------------------------------------------------------------------


@case("api", "run-empty-request-list", ok=False)
def _(d):
    from hisim_jax.simulation import SimulationOptions, run

    return lambda: run(SimulationOptions(), workload=[])


@case("api", "engine-run-empty", ok=True)
def _(d):
    from hisim_jax.simulation import SimulationOptions, build_cluster

    return lambda: build_cluster(SimulationOptions(), 64).run([])


@case("api", "select-empty")
def _(d):
    from hisim_jax.serving.workload import Workload, select

    return lambda: select(Workload((), 64, "x"))


@case("api", "options-limit-inf")
def _(d):
    from hisim_jax.simulation import SimulationOptions

    return lambda: SimulationOptions.checked({"limit": math.inf})


@case("api", "options-rate-scale-1e-300")
def _(d):
    from hisim_jax.simulation import SimulationOptions, run

    return lambda: run(SimulationOptions(rate_scale=1e-300, limit=4))


# ------------------------------------------------------------------------------------------------
# running and judging


def snapshot(d: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[str(Path(root, name).relative_to(d)) + "/"] = None
        for name in files:
            p = Path(root, name)
            try:
                out[str(p.relative_to(d))] = p.read_bytes() if not p.is_symlink() else b"->"
            except OSError:
                out[str(p.relative_to(d))] = b"<unreadable>"
    return out


def strict_json(text: str):
    def no_constant(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=no_constant)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False, env={"COLUMNS": "200"})
    except TypeError:
        return CliRunner(env={"COLUMNS": "200"})


# names the files class gives its spoiled paths (the error line must name the file)
SPOILED = ("nope", "bad", "afile/x", "p2")


def judge_cli(c: Case, d: Path, args: list) -> list[str]:
    before = snapshot(d)
    with c.patch() if c.patch else contextlib.nullcontext():
        res = _runner().invoke(app, [str(a) for a in args])
    problems = []
    exc = res.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-2:])
        problems.append(f"traceback: {type(exc).__name__}: {str(exc)[:160]} | {tb.strip()[-200:]}")
    after = snapshot(d)
    if c.ok and res.exit_code == 0:
        for rel in sorted(set(after)):
            if rel.endswith("summary.json") and after[rel] != before.get(rel):
                try:
                    s = strict_json(after[rel].decode())
                    total = s["requests_total"]
                    done = s["requests_completed"] + s["requests_rejected"]
                    if total != done:
                        problems.append(f"{total} requests, {done} completed or rejected")
                except (ValueError, KeyError) as e:
                    problems.append(f"{rel}: not strict JSON ({e})")
        if "--format" in args and args[args.index("--format") + 1] == "json":
            try:
                strict_json(res.stdout)
            except ValueError as e:
                problems.append(f"stdout not strict JSON ({e})")
        return problems
    if res.exit_code != 2:
        problems.append(f"exit code {res.exit_code}")
    lines = res.stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr not one 'error:' line: {res.stderr.strip()[:300]!r}")
    if c.cls == "files" and lines and not any(n in lines[0] for n in SPOILED):
        problems.append("error line does not name the file")
    if res.stdout.strip():
        problems.append(f"stdout: {res.stdout.strip()[:120]!r}")
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        problems.append(f"files changed: {changed[:6]}")
    c.notes.append(lines[0] if len(lines) == 1 else "")
    return problems


def judge_api(c: Case, call: Callable[[], object]) -> list[str]:
    try:
        call()
    except ValueError as e:
        msg = str(e)
        if "\n" in msg.strip() or not msg.strip():
            return [f"ValueError message not one line: {msg[:200]!r}"]
        c.notes.append(f"{type(e).__name__}: {msg}")
        return []
    except Exception as e:
        return [f"{type(e).__name__}: {str(e)[:200]}"]
    return [] if c.ok else ["no error raised"]


def run_case(i: int) -> dict:
    """Run case ``i`` in a fresh folder: {"problems": [...], "note": "..."}."""
    c = CASES[i]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="hisim-probe-") as tmp:
        d = Path(tmp)
        make_fixtures(d)
        os.chdir(d)
        try:
            made = c.make(d)
            problems = judge_api(c, made) if callable(made) else judge_cli(c, d, made)
        except MemoryError:
            problems = [f"MemoryError (over the worker's {MEMORY_GB} GB)"]
        except Exception as e:  # a bug of the probe itself
            problems = [f"probe error {type(e).__name__}: {e}"]
        finally:
            os.chdir(cwd)
    # after a MemoryError or an interpreter error the worker is not to be trusted: replace it
    broken = any(("MemoryError" in p or "SystemError" in p) for p in problems)
    return {"problems": problems, "note": c.notes[-1] if c.notes else "", "restart": broken}


MEMORY_GB = 4
TIMEOUT_S = 90


def worker() -> None:
    """Run the cases whose indices arrive on stdin, one JSON result per line on stdout."""
    import resource

    limit = MEMORY_GB << 30
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    out = os.fdopen(os.dup(1), "w")  # the CLI's own prints go to the real stdout
    sys.stdout = sys.stderr
    for line in sys.stdin:
        out.write(json.dumps(run_case(int(line))) + "\n")
        out.flush()


class Worker:
    """A child process running cases; killed and replaced when a case hangs or crashes."""

    def __init__(self) -> None:
        import subprocess

        # the compile cache off: the probe is about inputs, and a cache shared with other runs
        # would make its results depend on them
        env = {**os.environ, "HISIM_CACHE_DIR": ""}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip

    def run(self, i: int) -> dict | None:
        import selectors

        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(TIMEOUT_S):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose class:name contains this")
    ap.add_argument("-v", action="store_true", help="print every case, with its error line")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker()
        return 0
    chosen = [i for i, c in enumerate(CASES) if args.k in f"{c.cls}:{c.name}"]
    by_class: dict[str, list[int]] = {}
    failing = []
    t0 = time.perf_counter()
    w = Worker()
    for i in chosen:
        c = CASES[i]
        result = w.run(i)
        if result is None:  # hung or died: a fresh worker for the next case
            w.kill()
            w = Worker()
            result = {"problems": [f"no answer within {TIMEOUT_S} s (hang, or crashed)"],
                      "note": ""}  # fmt: skip
        if result.get("restart"):
            w.kill()
            w = Worker()
        problems = result["problems"]
        counts = by_class.setdefault(c.cls, [0, 0])
        counts[0 if problems else 1] += 1
        if problems:
            failing.append((c, problems))
        if args.v:
            mark = "FAIL" if problems else "ok  "
            print(f"{mark} {c.cls}:{c.name}  {result['note']}"[:220], flush=True)
            for p in problems:
                print(f"       {p}"[:400], flush=True)
    w.kill()
    if not args.v:
        for c, problems in failing:
            print(f"FAIL {c.cls}:{c.name}")
            for p in problems:
                print(f"       {p}"[:400])
    print()
    total_ok = sum(v[1] for v in by_class.values())
    for cls, (bad, good) in by_class.items():
        print(f"{cls:14s} {good:4d} / {good + bad:4d} keep the promise")
    print(f"{'all':14s} {total_ok:4d} / {len(chosen):4d}   ({time.perf_counter() - t0:.0f} s)")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
