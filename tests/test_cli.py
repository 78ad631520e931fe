"""The ``hisim`` command line, driven through typer's CliRunner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from hisim_jax.cli import app
from hisim_jax.estimator.roofline import PARAM_NAMES
from hisim_jax.paths import data_dir

STEPS_CSV = data_dir("data") / "profiles" / "h100" / "steps.csv"
KINDS = {"decode_mixed", "decode_uniform", "mixed", "prefill", "prefill_cached", "prefill_multi"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _runner() -> CliRunner:
    # click >= 8.2 (and typer's own runner) always keep stderr apart; older click needs the flag.
    try:
        return CliRunner(mix_stderr=False, env={"COLUMNS": "200"})
    except TypeError:
        return CliRunner(env={"COLUMNS": "200"})


runner = _runner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str):
    res = invoke(*args)
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def assert_one_line_error(res, *fragments: str) -> str:
    """Exit 2, exactly one stderr line starting 'error:', nothing on stdout, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error:"), line
    assert "Traceback" not in err and "Traceback" not in res.stdout
    assert res.stdout == ""
    for f in fragments:
        assert f in line, (f, line)
    return line


# ------------------------------------------------------------------------------------------------
# estimate


def test_estimate_defaults_table():
    res = ok("estimate")
    assert "predicted_ms" in res.stdout
    assert "h100-sxm" in res.stdout
    assert "llama-3.1-8b" in res.stdout


def test_estimate_json():
    row = json.loads(ok("estimate", "--format", "json").stdout)
    assert isinstance(row, dict)
    assert row["model"] == "llama-3.1-8b"
    assert row["hardware"] == "h100-sxm"
    assert row["tp"] == 1
    assert math.isfinite(row["predicted_ms"]) and row["predicted_ms"] > 0


def test_estimate_csv():
    lines = ok("estimate", "--format", "csv").stdout.strip().splitlines()
    assert lines[0] == "model,hardware,tp,predicted_ms"
    assert len(lines) == 2
    model, hw, tp, ms = lines[1].split(",")
    assert (model, hw, tp) == ("llama-3.1-8b", "h100-sxm", "1")
    assert float(ms) > 0


def test_estimate_two_gpus_a100_slower():
    rows = json.loads(
        ok("estimate", "-H", "h100-sxm", "-H", "a100-sxm-80gb", "--format", "json").stdout
    )
    assert isinstance(rows, list) and len(rows) == 2
    by_hw = {r["hardware"]: r["predicted_ms"] for r in rows}
    assert set(by_hw) == {"h100-sxm", "a100-sxm-80gb"}
    assert [r["hardware"] for r in rows] == ["h100-sxm", "a100-sxm-80gb"]
    assert by_hw["a100-sxm-80gb"] > by_hw["h100-sxm"] > 0
    # the same H100 number as the single-GPU run
    single = json.loads(ok("estimate", "--format", "json").stdout)["predicted_ms"]
    assert by_hw["h100-sxm"] == pytest.approx(single, rel=1e-9)


def test_estimate_breakdown_sums_to_total():
    row = json.loads(ok("estimate", "--breakdown", "--format", "json").stdout)
    parts = row["breakdown_ms"]
    assert {"attention", "mlp", "qkv_proj", "o_proj", "fixed"} <= set(parts)
    assert all(v >= 0 for v in parts.values())
    total = sum(parts.values())
    assert abs(total - row["predicted_ms"]) <= 1e-6 * row["predicted_ms"]


def test_estimate_custom_batch_decode_faster_than_prefill():
    decode = json.loads(ok("estimate", "--batch", "[[4096,1]]", "--format", "json").stdout)
    prefill = json.loads(ok("estimate", "--batch", "[[0,8192]]", "--format", "json").stdout)
    assert 0 < decode["predicted_ms"] < prefill["predicted_ms"]


def test_estimate_batches_csv_two_gpus(tmp_path):
    out = tmp_path / "out.csv"
    res = ok("estimate", "--batches", STEPS_CSV, "-H", "h100-sxm", "-H", "h200-sxm", "--out", out)
    assert "268" in res.stderr
    src = pd.read_csv(STEPS_CSV)
    assert len(src) == 134
    got = pd.read_csv(out)
    assert len(got) == 2 * 134
    assert set(got.columns) == set(src.columns) | {"hardware", "predicted_ms"}
    assert list(got.columns[: len(src.columns)]) == list(src.columns)
    h100 = got[got["hardware"] == "h100-sxm"].reset_index(drop=True)
    h200 = got[got["hardware"] == "h200-sxm"].reset_index(drop=True)
    assert len(h100) == len(h200) == 134
    for col in src.columns:  # input columns come through unchanged, in order
        pd.testing.assert_series_equal(h100[col], src[col], check_names=False)
        pd.testing.assert_series_equal(h200[col], src[col], check_names=False)
    assert (h100["predicted_ms"] > 0).all()
    assert (h200["predicted_ms"] <= h100["predicted_ms"]).all()
    assert (h200["predicted_ms"] < h100["predicted_ms"]).any()


def test_estimate_batches_json_output(tmp_path):
    csv = tmp_path / "few.csv"
    csv.write_text('model,batch\nllama-3.1-8b,"[[0,128]]"\nqwen2.5-1.5b,"[[512,1],[512,1]]"\n')
    rows = json.loads(ok("estimate", "--batches", csv, "--format", "json").stdout)
    assert [r["model"] for r in rows] == ["llama-3.1-8b", "qwen2.5-1.5b"]
    assert all(r["hardware"] == "h100-sxm" and r["predicted_ms"] > 0 for r in rows)


# ------------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr


def test_unknown_model():
    line = assert_one_line_error(invoke("estimate", "--model", "no-such-model"), "no-such-model")
    assert "llama-3.1-8b" in line


def test_unknown_hardware():
    line = assert_one_line_error(invoke("estimate", "-H", "no-such-gpu"), "no-such-gpu")
    assert "h100-sxm" in line


def test_unsupported_architecture(tmp_path):
    cfg = json.loads((data_dir("models") / "llama-3.1-8b.json").read_text())
    path = tmp_path / "bert.json"
    path.write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    assert_one_line_error(
        invoke("estimate", "--model", str(path)), "architectures", "BertForMaskedLM"
    )


@pytest.mark.parametrize(
    "batch, fragment",
    [
        ("[[0,1],", "invalid JSON"),
        ("[[-5,1]]", "cache_len >= 0"),
        ("[[0,0]]", "new_len >= 1"),
        ("[]", "non-empty"),
    ],
)
def test_bad_batch_option(batch, fragment):
    assert_one_line_error(invoke("estimate", "--batch", batch), "--batch", fragment)


def test_batch_and_batches_together(tmp_path):
    assert_one_line_error(
        invoke("estimate", "--batch", "[[0,1]]", "--batches", STEPS_CSV), "--batches"
    )


def test_batches_csv_missing_batch_column(tmp_path):
    csv = tmp_path / "nobatch.csv"
    csv.write_text("model,kind\nllama-3.1-8b,prefill\n")
    assert_one_line_error(invoke("estimate", "--batches", csv), str(csv), "'batch'")


def test_batches_csv_bad_batch_on_line_3(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text('model,batch\nllama-3.1-8b,"[[0,16]]"\nllama-3.1-8b,"[[0,-16]]"\n')
    assert_one_line_error(invoke("estimate", "--batches", csv), str(csv), "line 3", "batch")


def test_batches_csv_unknown_model_names_line(tmp_path):
    csv = tmp_path / "badmodel.csv"
    csv.write_text('model,batch\nllama-3.1-8b,"[[0,16]]"\nnot-a-model,"[[0,16]]"\n')
    assert_one_line_error(invoke("estimate", "--batches", csv), "line 3", "'model'")


def test_batches_csv_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    assert_one_line_error(invoke("estimate", "--batches", missing), str(missing))


def test_calibrate_missing_profiles_dir(tmp_path):
    missing = tmp_path / "no-profiles"
    assert_one_line_error(
        invoke("calibrate", "--profiles", missing, "--out", tmp_path / "c.json"), str(missing)
    )
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("bad", ["0", "-3.5", "abc"])
def test_validate_non_positive_step_ms(tmp_path, bad):
    src = pd.read_csv(STEPS_CSV).head(4)
    src["step_ms"] = src["step_ms"].astype(object)
    src.loc[2, "step_ms"] = bad  # data line 4 (header is line 1)
    prof = tmp_path / "steps.csv"
    src.to_csv(prof, index=False)
    plot = tmp_path / "v.png"
    line = assert_one_line_error(
        invoke("validate", "steps", "--profile", prof, "--plot", plot),
        str(prof),
        "step_ms",
        "line 4",
    )
    assert bad in line
    assert not plot.exists()


def test_bad_calibration_negative_param(tmp_path):
    cal = tmp_path / "neg.json"
    cal.write_text(json.dumps({"params": {"gemm_flops_eff": -0.5, "layer_s": 7e-5}}))
    assert_one_line_error(
        invoke("estimate", "--calibration", cal), str(cal), "params.gemm_flops_eff", "-0.5"
    )


def test_bad_calibration_unknown_param(tmp_path):
    cal = tmp_path / "unknown.json"
    cal.write_text(json.dumps({"params": {"warp_speed": 1.0}}))
    assert_one_line_error(invoke("estimate", "--calibration", cal), "params.warp_speed")


def test_bad_calibration_missing_file(tmp_path):
    cal = tmp_path / "missing.json"
    assert_one_line_error(invoke("estimate", "--calibration", cal), str(cal))


def test_model_config_with_infinity(tmp_path):
    cfg = json.loads((data_dir("models") / "llama-3.2-1b.json").read_text())
    p = tmp_path / "inf.json"
    p.write_text(json.dumps({**cfg, "hidden_size": math.inf}))  # json writes Infinity
    assert "Infinity" in p.read_text()
    assert_one_line_error(invoke("estimate", "--model", p), str(p), "hidden_size")


# ------------------------------------------------------------------------------------------------
# --out is never clobbered by a failing command

SENTINEL = "sentinel: do not overwrite\n"


@pytest.mark.parametrize("command", ["estimate", "calibrate", "validate"])
def test_failing_command_keeps_old_out(tmp_path, command):
    out = tmp_path / "existing.out"
    out.write_text(SENTINEL)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(
        'model,batch,step_ms\nllama-3.1-8b,"[[0,16]]",1.0\nllama-3.1-8b,"[[0,x]]",1.0\n'
    )
    args = {
        "estimate": ["estimate", "--batches", bad_csv, "--out", out],
        "calibrate": ["calibrate", "--profiles", tmp_path / "nowhere", "--out", out],
        "validate": [
            "validate",
            "steps",
            "--profile",
            bad_csv,
            "--out",
            out,
            "--plot",
            tmp_path / "p.png",
        ],
    }[command]
    assert_one_line_error(invoke(*args))
    assert out.read_text() == SENTINEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "existing.out"]


def test_out_into_missing_directory(tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.csv"
    assert_one_line_error(
        invoke("estimate", "--batches", STEPS_CSV, "--out", out), "does not exist"
    )
    assert not out.exists()


def test_out_without_batches(tmp_path):
    out = tmp_path / "x.csv"
    assert_one_line_error(invoke("estimate", "--out", out), "--out")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# calibrate


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    out = d / "cal.json"
    res = ok("calibrate", "--iterations", "5", "--out", out)
    return out, res


def test_calibrate_writes_document(calibration):
    path, res = calibration
    assert "MAPE" in res.stdout
    doc = json.loads(path.read_text())
    params = doc["params"]
    assert set(params) == set(PARAM_NAMES)
    assert all(isinstance(v, float) and v > 0 and math.isfinite(v) for v in params.values())
    fit = doc["fit"]
    assert 0 < fit["mape"] < 1
    assert fit["rows"] == 134
    assert doc["hardware"] == "h100-sxm"
    assert not list(path.parent.glob(".*.tmp*"))  # temp siblings keep their suffix


def test_estimate_with_calibration(calibration):
    path, _ = calibration
    row = json.loads(ok("estimate", "--calibration", path, "--format", "json").stdout)
    assert row["predicted_ms"] > 0
    # a different parameter set gives a different answer
    default = json.loads(ok("estimate", "--format", "json").stdout)
    assert row["predicted_ms"] != default["predicted_ms"]


def test_calibration_with_negative_param_exits_2(calibration, tmp_path):
    path, _ = calibration
    doc = json.loads(path.read_text())
    doc["params"]["layer_s"] = -1e-5
    bad = tmp_path / "bad-cal.json"
    bad.write_text(json.dumps(doc))
    assert_one_line_error(invoke("estimate", "--calibration", bad), "params.layer_s")
    assert_one_line_error(
        invoke("validate", "steps", "--calibration", bad, "--plot", tmp_path / "v.png"),
        "params.layer_s",
    )


# ------------------------------------------------------------------------------------------------
# validate steps


def test_validate_steps_json_and_plot(tmp_path):
    plot = tmp_path / "v.png"
    out = tmp_path / "rows.csv"
    res = ok("validate", "steps", "--plot", plot, "--out", out, "--format", "json")
    report = json.loads(res.stdout)
    assert report["rows"] == 134
    assert 0 < report["mape"] < 0.10
    assert report["p90"] <= report["max"]
    assert set(report["per_kind"]) == KINDS
    assert set(report["per_model"]) == {"llama-3.1-8b", "qwen2.5-1.5b"}
    assert plot.is_file() and plot.read_bytes()[:8] == PNG_MAGIC
    rows = pd.read_csv(out)
    assert len(rows) == 134
    assert {"predicted_ms", "measured_ms", "error"} <= set(rows.columns)
    mape = (rows["predicted_ms"] / rows["measured_ms"] - 1).abs().mean()
    assert mape == pytest.approx(report["mape"], rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "v.png"]


def test_validate_steps_table(tmp_path):
    plot = tmp_path / "t.png"
    res = ok("validate", "steps", "--plot", plot)
    assert "MAPE" in res.stdout and "p90" in res.stdout
    assert plot.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------
# list


def test_list():
    res = ok("list")
    for name in ("llama-3.1-8b", "deepseek-v3", "h100-sxm", "a100-sxm-80gb"):
        assert name in res.stdout


def test_list_json_has_each_models_memory_terms():
    doc = json.loads(ok("list", "--format", "json").stdout)
    ds = doc["models"]["deepseek-v3"]
    assert ds["family"] == "deepseek-v3" and ds["kv_bytes_per_token"] == 70_272
    assert abs(ds["params"] / 671e9 - 1) < 0.01 and ds["active_params"] < 40e9
    assert doc["models"]["gpt-oss-120b"]["windowed_kv_bytes"] > 0
    assert doc["models"]["qwen3.5-35b-a3b"]["state_bytes_per_request"] > 0
    required = {
        "deepseek-v3", "deepseek-r1", "deepseek-v3.2", "kimi-k2", "glm-5", "gpt-oss-20b",
        "gpt-oss-120b", "llama-4-scout-17b-16e", "llama-4-maverick", "qwen3.5-27b",
        "qwen3.5-35b-a3b", "qwen3.5-397b-a17b", "nemotron-h-56b", "gemma-4-26b-a4b",
    }  # fmt: skip
    assert required <= set(doc["models"])
    assert doc["hardware"]["h100-sxm"]["hbm_gb"] == pytest.approx(80, rel=0.01)
    # measured sustained ceilings over the peaks, None for a datasheet-only GPU
    h100 = doc["hardware"]["h100-sxm"]
    assert 0.5 < h100["sustained_bf16_gemm_flops_per_s_fraction"] < 1.0
    assert doc["hardware"]["rtx-4090"]["sustained_hbm_bytes_per_s_fraction"] is None


def test_calibrate_from_aiconfigurator_writes_a_loadable_calibration(tmp_path):
    pytest.importorskip("aiconfigurator_core")
    pytest.importorskip("pyarrow")
    from hisim_jax.estimator.roofline import load_calibration

    out = tmp_path / "cal.json"
    r = runner.invoke(
        app, ["calibrate", "--source", "aiconfigurator", "--system", "h100_sxm", "--backend",
              "vllm", "--iterations", "30", "--out", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["source"] == "aiconfigurator" and doc["backend"] == "vllm"
    load_calibration(out)
    bad = runner.invoke(app, ["calibrate", "--source", "aiconfigurator", "--system", "h999",
                              "--backend", "vllm", "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert bad.exit_code == 2 and "choose from" in bad.output and not (tmp_path / "x.json").exists()


def test_estimate_with_engine_uses_each_gpus_production_calibration(tmp_path):
    from hisim_jax.estimator.roofline import Estimator, calibration_path

    r = runner.invoke(app, ["estimate", "--engine", "vllm", "-H", "h100-sxm", "-H", "b200",
                            "--batch", "[[700, 1], [0, 256]]", "--format", "json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = {row["hardware"]: row["predicted_ms"] for row in json.loads(r.stdout)}
    for hw in ("h100-sxm", "b200"):
        est = Estimator("llama-3.1-8b", hw, calibration=calibration_path(hw, "vllm"))
        want = float(est.step_latency_s([[(700, 1), (0, 256)]])[0]) * 1e3
        assert got[hw] == pytest.approx(want, rel=1e-9)
    bad = runner.invoke(app, ["estimate", "--engine", "vllm", "--calibration", "x.json"])
    assert bad.exit_code == 2 and "--engine" in bad.output


def test_help_shows_the_defaults_in_brackets():
    from typer.testing import CliRunner

    from hisim_jax.cli import app

    out = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}).output
    assert "[llama-3.1-8b]" in out and "[lru]" in out and "[h100-sxm]" in out
    out = CliRunner().invoke(app, ["search", "--help"], env={"COLUMNS": "200"}).output
    assert "replicas x tp <= GPUS" in out


# ------------------------------------------------------------------------------------------------
# closed-loop clients, the agent workload, SGLang logs


def test_simulate_agent_workload_closed_loop_with_a_concurrency_limit(tmp_path):
    out = tmp_path / "a"
    ok("simulate", "--workload", "agent", "--limit", "60", "--max-concurrency", "4",
       "--format", "json", "--out", out)  # fmt: skip
    req = pd.read_csv(out / "requests.csv", keep_default_na=False)
    assert {"session_id", "turn"} <= set(req.columns)
    assert (req["session_id"] >= 0).all() and req["turn"].max() > 0
    start, end = req["arrival_s"].to_numpy(), req["finish_s"].to_numpy()
    assert max(int(((start <= t) & (end > t)).sum()) for t in start) <= 4


def test_simulate_rejects_bad_client_options_in_one_line(tmp_path):
    out = str(tmp_path / "o")
    for args, frag in (
        (("--sessions", "half"), "sessions"),
        (("--workload", "batch"), "workload"),
        (("--max-concurrency", "0"), "max_concurrency"),
        (("--think-time", "gamma:2"), "think_time"),
        (("--think-time", f"empirical:{tmp_path / 'none.txt'}"), "none.txt"),
    ):
        assert_one_line_error(invoke("simulate", *args, "--out", out), frag)
    assert not (tmp_path / "o").exists()


def test_validate_scheduler_reads_an_sglang_server_log(tmp_path):
    log = Path(__file__).parent / "validate" / "fixtures" / "sglang_scheduler.log"
    rec = tmp_path / "records.csv"
    res = ok("validate", "scheduler", "--log", str(log), "--limit", "40", "--records", str(rec),
             "--format", "json")  # fmt: skip
    doc = json.loads(res.stdout)
    assert doc["log_prefill_records"] >= 1 and doc["log_decode_records"] >= 1
    frame = pd.read_csv(rec)
    assert {"kind", "new_tokens_log", "new_tokens_sim"} <= set(frame.columns)
    bad = tmp_path / "bad.log"
    bad.write_text(
        "[2025-06-10 09:16:02 TP0] Prefill batch. #new-seq: 1, #new-token: x, #cached-token: 0,"
        " token usage: 0.00, #running-req: 0, #queue-req: 0\n"
    )
    assert_one_line_error(invoke("validate", "scheduler", "--log", str(bad)), "line 1")


def test_validate_cache_sets_a_vllm_kv_event_log_beside_the_replay(tmp_path):
    fixtures = Path(__file__).parent / "validate" / "fixtures"
    trace = tmp_path / "trace.jsonl"  # the fixture's workload, named by vLLM's block hashes
    rows = [(0.0, 8, [101, 102]), (0.12, 12, [101, 102, 103]), (0.27, 8, [101, 102]),
            (0.35, 9, [101, 555, 556])]  # fmt: skip
    trace.write_text(
        "".join(
            json.dumps({"arrival_s": a, "input_len": n, "output_len": 1, "block_ids": ids}) + "\n"
            for a, n, ids in rows
        )
    )
    out = tmp_path / "buckets.csv"
    res = ok("validate", "cache", "--trace", str(trace), "--trace-format", "jsonl",
             "--block-tokens", "4", "--page-size", "4", "--l1-tokens", "32", "--l2-tokens", "32",
             "--l3-tokens", "32", "--events", str(fixtures / "vllm_kv_events.jsonl"),
             "--log-start-s", "1767225600", "--bucket-s", "0.14", "--buckets-csv", str(out),
             "--format", "json")  # fmt: skip
    doc = json.loads(res.stdout)
    assert doc["hit_tokens_log"]["total"] == 12 and doc["requests_matched_log"] == 4
    assert len(pd.read_csv(out)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[1.0, [{"type": "BlockStored"}], 0]\n')
    res = invoke("validate", "cache", "--trace", str(trace), "--trace-format", "jsonl",
                 "--block-tokens", "4", "--l1-tokens", "32", "--events", str(bad))  # fmt: skip
    assert_one_line_error(res, "bad.jsonl", "line 1")
