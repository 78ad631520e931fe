"""Bad input, by class (issue 11, item 6): every loader reports a bad file the same way; output
paths are checked before any work; numbers are finite and in range; duplicate keys are
rejected; a failed write keeps the previous results; JSON outputs are strict; step logs are
checked against the workload; usage errors are one line. ``scripts/probe_bad_inputs.py``
tries many more cases end to end."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hisim_jax import files
from hisim_jax.cli import app
from hisim_jax.estimator.calibrate import read_steps
from hisim_jax.estimator.roofline import PARAM_RANGE, load_calibration
from hisim_jax.paths import data_dir
from hisim_jax.serving import workload as wl
from hisim_jax.simulation import (
    _RANGES,
    SimulationOptions,
    read_config,
    run,
    summary_json,
    write_outputs,
)
from hisim_jax.specs import SpecError, hardware_from_dict, load_hardware, load_model
from hisim_jax.validate.scheduler import check_request_ids, read_step_log

STEPS_CSV = data_dir("data") / "profiles" / "h100" / "steps.csv"
H100 = data_dir("hardware_specs") / "h100-sxm.yaml"
CALIBRATION = data_dir("hardware_specs") / "calibration" / "h100-sxm.json"
MODEL = data_dir("models") / "llama-3.2-1b.json"
GENERIC = "".join(
    json.dumps({"arrival_s": 0.5 * i, "input_len": 300 + i, "output_len": 4}) + "\n"
    for i in range(5)
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False, env={"COLUMNS": "200"})
    except TypeError:
        return CliRunner(env={"COLUMNS": "200"})


def invoke(*args):
    return _runner().invoke(app, [str(a) for a in args])


def one_line_error(res, *fragments: str) -> str:
    """Exit 2, one stderr line 'error: ...' holding every fragment, nothing on stdout."""
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.stdout == ""
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def tree(d: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``d`` with its bytes (to check nothing changed)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(d.rglob("*")):
        out[str(p.relative_to(d))] = None if p.is_dir() or p.is_symlink() else p.read_bytes()
    return out


# ------------------------------------------------------------------------------------------------
# class: one reader of files — every loader reports a bad path alike, naming it


def _spoil(kind: str, d: Path, suffix: str) -> tuple[Path, str]:
    """A bad path of ``kind`` and a fragment its error must hold."""
    p = d / f"bad{suffix}"
    if kind == "missing":
        return d / f"nope{suffix}", "no such file"
    if kind == "directory":
        p.mkdir()
        return p, "is a directory"
    if kind == "undecodable":
        p.write_bytes(b'{"a": "\xff\xfe"}\n')
        return p, "line 1"
    if kind == "parent_is_file":
        (d / "afile").write_text("x")
        return d / "afile" / f"x{suffix}", "no such file"
    if kind == "empty":
        p.write_text("  \n")
        return p, ""
    if kind == "symlink_loop":
        p.symlink_to(p.name)
        return p, "cannot read"
    raise AssertionError(kind)


LOADERS = {
    "model": (".json", load_model),
    "hardware": (".yaml", load_hardware),
    "simulate config": (".yaml", read_config),
    "calibration": (".json", load_calibration),
    "profile": (".csv", read_steps),
    "step log": (".csv", read_step_log),
    **{
        f"trace {fmt}": (suffix, lambda p, fmt=fmt: wl.load_trace(p, fmt))
        for fmt, suffix in (
            ("mooncake", ".jsonl"),
            ("jsonl", ".jsonl"),
            ("csv", ".csv"),
            ("azure", ".csv"),
            ("sharegpt", ".json"),
        )
    },
}
KINDS = ("missing", "directory", "undecodable", "parent_is_file", "empty", "symlink_loop")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_names_a_bad_file(tmp_path, loader, kind):
    suffix, load = LOADERS[loader]
    path, fragment = _spoil(kind, tmp_path, suffix)
    with pytest.raises(ValueError) as ei:
        load(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert fragment in msg, (fragment, msg)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs /proc/self/mem")
def test_a_file_whose_read_fails_is_named(tmp_path):
    p = tmp_path / "eio.json"
    p.symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), even for root
    with pytest.raises(SpecError, match=r"eio\.json: cannot read"):
        load_model(p)


def test_undecodable_text_names_the_line():
    with pytest.raises(files.FileError, match=r"x: line 3: not UTF-8 text \(byte 0xff\)"):
        files.decode(b"a\nb\n\xff\n", "x")


@pytest.mark.parametrize(
    "args, path",
    [
        (["estimate", "--model", "{d}/m.json"], "m.json"),
        (["estimate", "-H", "{d}/h.yaml"], "h.yaml"),
        (["estimate", "--calibration", "{d}/c.json"], "c.json"),
        (["estimate", "--batches", "{d}/b.csv"], "b.csv"),
        (["validate", "steps", "--profile", "{d}/p.csv", "--plot", "{d}/v.png"], "p.csv"),
        (["simulate", "--config", "{d}/s.yaml", "--out", "{d}/o"], "s.yaml"),
        (["simulate", "--trace", "{d}/t.jsonl", "--out", "{d}/o"], "t.jsonl"),
        (["validate", "scheduler", "--log", "{d}/l.csv"], "l.csv"),
    ],
)
def test_cli_reports_a_folder_given_as_a_file(tmp_path, args, path):
    (tmp_path / path).mkdir()
    before = tree(tmp_path)
    res = invoke(*(a.format(d=tmp_path) for a in args))
    one_line_error(res, path, "is a directory")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# class: output paths checked before any work


def test_output_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(files.FileError, match="afile is a file, not a folder"):
        files.check_output_dir(tmp_path / "afile" / "out")
    with pytest.raises(files.FileError, match="exists and is not a folder"):
        files.check_output_dir(tmp_path / "afile")
    with pytest.raises(files.FileError, match="is a directory, not a file"):
        files.check_output_file(tmp_path)
    with pytest.raises(files.FileError, match="does not exist"):
        files.check_output_file(tmp_path / "no" / "x.csv")
    files.check_output_dir(tmp_path / "new" / "deeper")  # to be created: fine, nothing made
    files.check_output_file(tmp_path / "x.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_unwritable_folder_is_found_before_the_run(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # how a read-only folder answers
    one_line_error(invoke("simulate", "--out", tmp_path / "o"), "cannot write in", "denied")
    one_line_error(invoke("calibrate", "--out", tmp_path / "c.json"), "c.json", "denied")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--out", "{d}/afile/o"],
        ["simulate", "--out", "{d}/afile"],
        ["estimate", "--batches", STEPS_CSV, "--out", "{d}/afile/x.csv"],
        ["calibrate", "--out", "{d}/old"],
        ["validate", "steps", "--out", "{d}/rows.csv", "--plot", "{d}/afile/v.png"],
        ["validate", "steps", "--out", "{d}/rows.csv", "--plot", "{d}/old"],
    ],
)
def test_bad_output_paths_fail_before_any_work(tmp_path, args):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "old").mkdir()
    before = tree(tmp_path)
    one_line_error(invoke(*(str(a).format(d=tmp_path) for a in args)))
    assert tree(tmp_path) == before  # validate steps wrote no rows.csv before the plot failed


# ------------------------------------------------------------------------------------------------
# class: a failed write leaves the previous results whole

OLD = {"requests.csv": b"old requests\n", "steps.csv": b"old steps\n", "summary.json": b"{}\n"}


def _old_results(d: Path) -> Path:
    d.mkdir()
    for name, data in OLD.items():
        (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("failing", list(OLD))
def test_write_files_atomic_keeps_the_previous_set_when_a_write_fails(tmp_path, failing):
    out = _old_results(tmp_path / "out")

    def writer(name):
        def write(p):
            if name == failing:
                raise OSError(28, "No space left on device")
            Path(p).write_text("new")

        return write

    with pytest.raises(files.FileError, match=f"cannot write {failing}.*No space"):
        files.write_files_atomic(out, {name: writer(name) for name in OLD})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_write_files_atomic_puts_back_what_it_moved_when_a_move_fails(tmp_path, monkeypatch):
    out = _old_results(tmp_path / "out")
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:  # the second file's new copy: the first is already in place
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky)
    with pytest.raises(files.FileError, match="kept the previous files"):
        files.write_files_atomic(out, {name: lambda p: Path(p).write_text("new") for name in OLD})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == OLD


def test_a_failing_simulate_write_keeps_the_old_results(tmp_path, monkeypatch):
    out = _old_results(tmp_path / "old")
    real = pd.DataFrame.to_csv

    def full_disk(self, path=None, *a, **k):
        if path is not None and Path(path).name == "steps.csv":
            raise OSError(28, "No space left on device")
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    one_line_error(invoke("simulate", "--limit", 3, "--out", out), "steps.csv", "No space")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


# ------------------------------------------------------------------------------------------------
# class: every number finite and in range (hypothesis)

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -0.0, 1e-320, 1e-300, 5e-324, 1e300, 1e308, 2**63, -1]),
)


@FAST
@given(name=st.sampled_from(sorted(_RANGES)), value=NUMBERS)
def test_an_accepted_option_is_finite_and_in_range(name, value):
    lo, closed, hi = _RANGES[name]
    try:
        o = SimulationOptions.checked({name: value})
    except SpecError as e:
        assert "\n" not in str(e) and f"'{name}'" in str(e)
        return
    v = getattr(o, name)
    assert isinstance(v, int) or math.isfinite(v)  # an int may exceed a float: no inf/nan
    assert (v >= lo if closed else v > lo) and (hi is None or v <= hi)


@FAST
@given(name=st.sampled_from(sorted(_RANGES)), value=NUMBERS)
def test_an_option_from_yaml_is_checked_like_a_flag(tmp_path_factory, name, value):
    text = yaml_number(value)
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(f"{name}: {text}\n")
    try:
        SimulationOptions.from_yaml(p, {})
    except SpecError as e:
        assert "\n" not in str(e) and str(p) in str(e) and name in str(e)


def yaml_number(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ".nan"
    if isinstance(v, float) and math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    return repr(v)


HW_FIELDS = (
    "sm_count",
    "bf16_flops_per_s",
    "hbm_bytes_per_s",
    "hbm_bytes",
    "l2_bytes",
    "pcie_bytes_per_s",
    "host_dram_bytes",
    "ssd_read_bytes_per_s",
    "price_usd_per_hour",
)


@FAST
@given(field=st.sampled_from(HW_FIELDS), value=NUMBERS)
def test_an_accepted_gpu_spec_is_finite_and_plausible(field, value):
    import yaml

    doc = yaml.safe_load(H100.read_text())
    doc[field] = {"value": value}
    try:
        hw = hardware_from_dict(doc, "gpu.yaml")
    except SpecError as e:
        assert str(e).startswith("gpu.yaml: field ") and field in str(e) and "\n" not in str(e)
        return
    v = getattr(hw, field)
    assert math.isfinite(v) and v > 0
    assert 1e-6 <= v <= 1e19  # prices go below 1 $/h; every other field is >= 1
    assert field == "price_usd_per_hour" or v >= 1


@FAST
@given(value=st.one_of(NUMBERS, st.text(max_size=4), st.lists(NUMBERS, max_size=3)))
def test_mlp_only_layers_must_be_layer_indices(value):
    from hisim_jax.specs import model_from_config

    cfg = json.loads((data_dir("models") / "qwen3-30b-a3b.json").read_text())
    cfg["mlp_only_layers"] = value
    try:
        m = model_from_config(cfg, "moe.json")
    except SpecError as e:
        assert "mlp_only_layers" in str(e) and "\n" not in str(e)
        return
    assert isinstance(value, list) and all(type(x) is int and 0 <= x < 48 for x in value)
    assert m.num_moe_layers == 48 - len(set(value))


@FAST
@given(value=NUMBERS)
def test_an_accepted_calibration_parameter_is_in_range(tmp_path_factory, value):
    doc = json.loads(CALIBRATION.read_text())
    doc["params"]["layer_s"] = value
    p = tmp_path_factory.mktemp("cal") / "c.json"
    p.write_text(json.dumps(doc))  # NaN and Infinity as JSON's non-standard literals
    try:
        load_calibration(p)
    except SpecError as e:
        assert "layer_s" in str(e) and str(p) in str(e)
        return
    assert PARAM_RANGE[0] <= value <= PARAM_RANGE[1]


@FAST
@given(
    offsets=st.lists(st.floats(0, 1e300), min_size=1, max_size=6),
    rate_scale=st.floats(1e-300, 1e300),
)
def test_selected_arrivals_stay_within_the_clock(offsets, rate_scale):
    reqs = [wl.Request(i, t, 10, 2) for i, t in enumerate(offsets)]
    w = wl.build_workload(reqs, 64, "t")
    try:
        out = wl.select(w, rate_scale=rate_scale)
    except wl.WorkloadError as e:
        assert "\n" not in str(e) and ("rate_scale" in str(e) or "arrives" in str(e))
        return
    assert all(0 <= r.arrival_s <= wl.MAX_SPAN_S for r in out.requests)


def test_a_far_arrival_in_a_csv_trace_names_the_request(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,input_len,output_len\n0,30,2\n1e308,30,2\n")
    one_line_error(
        invoke("simulate", "--trace", p, "--trace-format", "csv", "--out", tmp_path / "o"),
        "t.csv",
        "request 1",
    )
    one_line_error(
        invoke("simulate", "--rate-scale", "1e-300", "--out", tmp_path / "o"),
        "field 'rate_scale'",
        "1e-300",
    )


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "0"])
def test_validate_cache_bytes_per_token(tmp_path, value):
    t = tmp_path / "t.jsonl"
    t.write_text(GENERIC)
    res = invoke("validate", "cache", "--trace", t, "--trace-format", "jsonl", "--l1-tokens",
                 "1000", "--bytes-per-token", value)  # fmt: skip
    one_line_error(res, "options: field 'bytes_per_token'", value)


@pytest.mark.parametrize(
    "text, fragment",
    [("limit: .inf\n", "line 1: field 'limit' must be a finite number"),
     ("limit: 1e400\n", "field 'limit' has an invalid value"),
     ("tp: 1.0e+30\n", "field 'tp' must be <= 1024")],
)  # fmt: skip
def test_config_numbers(tmp_path, text, fragment):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    one_line_error(invoke("simulate", "--config", p, "--out", tmp_path / "o"), str(p), fragment)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.yaml"]


# ------------------------------------------------------------------------------------------------
# class: duplicate keys


@pytest.mark.parametrize(
    "name, text, load",
    [
        ("c.yaml", "limit: 4\nseed: 1\nlimit: 5\n", read_config),
        ("c.yaml", "rate-scale: 2\nrate_scale: 3\n", read_config),
        ("h.yaml", H100.read_text() + "sm_count: 7\n", load_hardware),
        ("m.json", MODEL.read_text().replace("{", '{"hidden_size": 7,', 1), load_model),
        ("c.json", '{"params": {"layer_s": 1e-4, "layer_s": 2e-4}}', load_calibration),
        ("t.jsonl", '{"arrival_s": 0, "input_len": 9, "input_len": 90, "output_len": 2}\n',
         lambda p: wl.load_trace(p, "jsonl")),
        ("t.csv", "arrival_s,input_len,input_len,output_len\n0,9,90,2\n",
         lambda p: wl.load_trace(p, "csv")),
        ("l.csv", "start_s,kind,kind,request_ids\n0,prefill,decode,0\n", read_step_log),
        ("s.json", '[{"conversations": [], "conversations": []}]',
         lambda p: wl.load_trace(p, "sharegpt")),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_an_error(tmp_path, name, text, load):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError, match="twice") as ei:
        load(p)
    assert str(ei.value).startswith(str(p)) and "\n" not in str(ei.value)


def test_yaml_duplicate_names_both_lines():
    with pytest.raises(
        files.FileError, match=r"line 3: field 'a' is given twice \(first on line 1\)"
    ):
        files.loads_yaml("a: 1\nb: 2\na: 3\n", "x.yaml")


def test_yaml_merge_keys_are_not_duplicates():
    assert files.loads_yaml("base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n", "x") == {
        "base": {"x": 1},
        "c": {"x": 1, "y": 2},
    }


def test_non_finite_numbers_in_config_files_name_the_field():
    with pytest.raises(files.FileError, match="field 'rms_norm_eps' must be a finite number"):
        files.loads_json('{"rms_norm_eps": NaN}', "m.json")
    with pytest.raises(files.FileError, match="line 2: field 'l2_gb' must be a finite number"):
        files.loads_yaml("limit: 3\nl2_gb: -.inf\n", "c.yaml")


# ------------------------------------------------------------------------------------------------
# class: strict JSON outputs


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


def _strict_loads(text: str):
    def refuse(c):
        raise ValueError(c)

    return json.loads(text, parse_constant=refuse)


@FAST
@given(obj=JSONISH)
def test_strict_json_has_no_nan_or_infinity(obj):
    back = _strict_loads(files.strict_json(obj))
    assert back == json.loads(json.dumps(files.finite_or_none(obj)))


def test_summary_json_nulls_undefined_numbers():
    text = summary_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert _strict_loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_a_run_of_only_rejected_requests_writes_strict_json(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("arrival_s,input_len,output_len\n0,500000,8\n")
    res = invoke("simulate", "--trace", t, "--trace-format", "csv", "--out", tmp_path / "o",
                 "--format", "json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    for text in (res.stdout, (tmp_path / "o" / "summary.json").read_text()):
        s = _strict_loads(text)
        assert s["requests_rejected"] == s["requests_total"] == 1
        assert s["ttft_s"]["mean"] is None


# ------------------------------------------------------------------------------------------------
# class: scheduler logs against the workload


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("start_s,kind,request_ids\n", "no steps"),
        ("start_s,kind,request_ids\n0,decode,0\n", "no prefill step"),
        ("start_s,kind,request_ids\n0,Prefill,0\n", "line 2: field 'kind'"),
        ("start_s,kind,request_ids\n0,prefill,0 -1\n", "line 2: field 'request_ids'"),
        ("start_s,kind,request_ids\n0,prefill,0\ninf,prefill,1\n", "line 3: field 'start_s'"),
    ],
)
def test_bad_step_logs(tmp_path, text, fragment):
    p = tmp_path / "l.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        read_step_log(p)


def test_a_step_log_naming_requests_the_workload_lacks(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("start_s,kind,request_ids\n0,prefill,0 1\n0.5,prefill,2 7\n")
    frame = read_step_log(p)
    check_request_ids(frame, 8, str(p))
    with pytest.raises(ValueError, match=r"line 3: field 'request_ids': request 7 is not in"):
        check_request_ids(frame, 5, str(p))
    t = tmp_path / "t.jsonl"
    t.write_text(GENERIC)
    res = invoke("validate", "scheduler", "--log", p, "--trace", t, "--trace-format", "jsonl")
    one_line_error(res, "l.csv", "request 7", "5 requests")


# ------------------------------------------------------------------------------------------------
# class: the Python simulation API


def test_run_on_an_empty_request_list_is_a_clear_error():
    with pytest.raises(wl.WorkloadError, match="no requests to simulate"):
        run(SimulationOptions(), workload=[])
    with pytest.raises(wl.WorkloadError, match="item 0 must be a Request"):
        run(SimulationOptions(), workload=[(0.0, 10, 2)])


def test_run_on_a_request_list(tmp_path):
    reqs = [wl.Request(0, 0.2 * i, 200, 3) for i in range(4)]
    result = run(SimulationOptions(), workload=reqs)
    assert result.summary["requests_completed"] == 4
    files_ = write_outputs(result, tmp_path / "o")
    assert [p.name for p in files_] == ["requests.csv", "steps.csv", "summary.json"]
    _strict_loads((tmp_path / "o" / "summary.json").read_text())


# ------------------------------------------------------------------------------------------------
# class: usage errors in one line


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["frobnicate"], ["No such command 'frobnicate'"]),
        (["validate", "frobnicate"], ["No such command"]),
        (["simulate", "--lmit", "3"], ["No such option: --lmit", "--limit"]),
        (["simulate", "--limit", "abc"], ["'--limit'", "'abc'"]),
        (["estimate", "--format", "xml"], ["'--format'", "'xml'"]),
        (["simulate", "--trace"], ["'--trace' requires an argument"]),
        (["validate", "cache"], ["Missing option '--trace'"]),
        (["calibrate", "--out", "c.json", "--iterations", "0"], ["'--iterations'", "'0'"]),
        ([], ["Missing command"]),
    ],
)
def test_usage_errors_are_one_line(args, fragments):
    one_line_error(invoke(*args), "error: options: ", *fragments)


def test_help_still_exits_0():
    res = invoke("simulate", "--help")
    assert res.exit_code == 0 and "--rate-scale" in res.stdout


def test_probe_script_lists_its_cases():
    """The probe (scripts/probe_bad_inputs.py) imports and enumerates without running."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "probe_bad_inputs.py"
    if not path.is_file():
        pytest.skip("scripts/ not present")
    spec = importlib.util.spec_from_file_location("probe_bad_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    assert len(mod.CASES) > 180
    assert {c.cls for c in mod.CASES} >= {"files", "outputs", "numbers", "duplicates", "usage"}
