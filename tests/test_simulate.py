"""`hisim simulate` end to end through typer's CliRunner, on the built-in workload and traces."""

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from hisim_jax.cli import app

MOONCAKE = (
    Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
)
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["simulate", *map(str, args)])


def test_default_run_writes_outputs_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = invoke("--limit", 80, "--out", out, "--slo-ttft-ms", 200, "--slo-tpot-ms", 50)
        assert r.exit_code == 0, r.output
    s = json.loads((a / "summary.json").read_text())
    for key in ("requests_total", "requests_completed", "simulated_s", "wall_s", "ttft_s", "tpot_s",
                "itl_s", "e2e_s", "throughput_input_tok_s", "throughput_output_tok_s", "cache",
                "preemptions", "goodput_req_s"):  # fmt: skip
        assert key in s, key
    for key in ("mean", "p50", "p90", "p99"):
        assert s["ttft_s"][key] > 0
    for key in (
        "hit_rate",
        "l1_hit_tokens",
        "l2_hit_tokens",
        "l3_hit_tokens",
        "miss_tokens",
        "evicted_tokens",
    ):
        assert key in s["cache"]
    assert s["requests_completed"] == s["requests_total"] == 80
    req = pd.read_csv(a / "requests.csv")
    assert len(req) == 80 and (req["ttft_s"] > 0).all()
    assert (req["l1_hit_tokens"] + req["computed_prompt_tokens"] == req["input_len"]).all()
    steps = pd.read_csv(a / "steps.csv")
    assert set(steps["kind"]) == {"prefill", "decode"}
    # same inputs and seed: byte-identical per-request and per-step outputs
    assert (a / "requests.csv").read_bytes() == (b / "requests.csv").read_bytes()
    assert (a / "steps.csv").read_bytes() == (b / "steps.csv").read_bytes()
    sb = json.loads((b / "summary.json").read_text())
    for k in ("wall_s", "cost"):  # measurements of the run itself
        s.pop(k), sb.pop(k)
    assert s == sb


@pytest.mark.skipif(not MOONCAKE.is_file(), reason="shared traces not present")
def test_mooncake_trace_with_l2_from_a_yaml_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"trace: {MOONCAKE}\ntrace-format: mooncake\nlimit: 120\nl2_gb: 64\nrate_scale: 0.5\n"
    )
    r = invoke("--config", cfg, "--out", tmp_path / "o", "--format", "json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["requests_total"] == 120
    assert s["options"]["l2_gb"] == 64 and s["replica"]["l2_tokens"] > 0
    assert s["cache"]["hit_rate"] > 0


def test_bad_trace_line_is_one_line_error_or_skipped(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 20, "hash_ids": [1, 2]}\n'
        '{"timestamp": 10, "input_length": -5, "output_length": 20, "hash_ids": [1]}\n'
    )
    r = invoke("--trace", trace, "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "line 2" in r.stderr and "input_length" in r.stderr
    r = invoke("--trace", trace, "--skip-bad-lines", "--out", tmp_path / "o", "--format", "json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["skipped_lines"] == 1 and s["requests_completed"] == 1
    r = invoke("--trace", trace, "--skip-bad-lines", "--out", tmp_path / "o")
    assert r.exit_code == 0 and "skipped trace lines" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--schedule-policy", "random"], "schedule_policy"),
        (["--l1-fraction", "1.5"], "field 'l1_fraction' must be <= 1, got 1.5"),
        (["--l2-gb", "-3"], "field 'l2_gb' must be >= 0, got -3.0"),
        (["--l2-gb", "nan"], "field 'l2_gb' must be a finite number, got nan"),
        (["--l2-gb", "300"], "exceeds the 256 GB of host DRAM"),
        (["--l2-gb-s", "0"], "field 'l2_gb_s' must be >= 0.001"),
        (["--seed", "-1"], "field 'seed' must be >= 0, got -1"),
        (["--page-size", "0"], "field 'page_size' must be >= 1, got 0"),
        (["--step-overhead-ms", "-1"], "field 'step_overhead_ms' must be >= 0"),
        (["--cuda-graph-max-bs", "0"], "field 'cuda_graph_max_bs' must be >= 1"),
        (["--slo-ttft-ms", "-5"], "field 'slo_ttft_ms' must be > 0"),
        (["--gpu-price-usd-per-hour", "-1"], "field 'gpu_price_usd_per_hour' must be >= 0"),
        (["--cpu-price-usd-per-hour", "0"], "field 'cpu_price_usd_per_hour' must be >= 1e-06"),
        (["--l3-gb", "10", "--write-policy", "write_back"], "L3 tier without l2_gb"),
        (["--model", "nope"], "nope"),
        (["--trace-format", "parquet", "--trace", "x.jsonl"], "x.jsonl"),
    ],
)
def test_bad_options_exit_2(tmp_path, args, needle):
    r = invoke(*args, "--limit", 5, "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and r.stderr.startswith("error:")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_bad_option_in_a_config_file_names_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("l2_gb: -5\n")
    r = invoke("--config", cfg, "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert r.stderr == f"error: {cfg}: field 'l2_gb' must be >= 0, got -5.0\n"


def test_config_file_may_name_the_output_folder(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"limit: 10\nout: {tmp_path / 'from-yaml'}\n")
    assert invoke("--config", cfg).exit_code == 0
    assert (tmp_path / "from-yaml" / "summary.json").is_file()
    # the flag wins over the file
    assert invoke("--config", cfg, "--out", tmp_path / "flag").exit_code == 0
    assert (tmp_path / "flag" / "summary.json").is_file()


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modle: llama-3.1-8b\n")
    r = invoke("--config", cfg)
    assert r.exit_code == 2 and "modle" in r.stderr and str(cfg) in r.stderr


def test_sharegpt_arrivals_follow_the_seed_and_block_tokens_reach_the_reader(tmp_path):
    conv = [
        {"conversations": [{"from": "human", "value": "h" * (400 + i)}, {"from": "gpt", "value": "g" * 80}]}
        for i in range(6)
    ]  # fmt: skip
    trace = tmp_path / "sg.json"
    trace.write_text(json.dumps(conv))
    arrivals = {}
    for seed in (1, 1, 2):
        out = tmp_path / f"s{seed}"
        r = invoke("--trace", trace, "--trace-format", "sharegpt", "--seed", seed, "--out", out)
        assert r.exit_code == 0, r.output
        arrivals.setdefault(seed, []).append(
            pd.read_csv(out / "requests.csv")["arrival_s"].tolist()
        )
    assert arrivals[1][0] == arrivals[1][1] and arrivals[1][0] != arrivals[2][0]
    out = tmp_path / "b"
    r = invoke("--trace", trace, "--trace-format", "sharegpt", "--block-tokens", 32,
               "--out", out, "--format", "json")  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["options"]["block_tokens"] == 32
    assert s["workload"]["prompt_blocks"] == 6 * 4  # 101-token prompts in 32-token blocks
    # Mooncake's blocks are 512 tokens by definition: the option is refused, not ignored
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [1, 2]}\n'
    )
    r = invoke("--trace", mooncake, "--block-tokens", 64, "--out", tmp_path / "m")
    assert r.exit_code == 2 and "block_tokens" in r.stderr


def test_vllm_engine_runs_with_its_defaults_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = invoke("--engine", "vllm", "--limit", 80, "--out", out)
        assert r.exit_code == 0, r.output
    assert (a / "steps.csv").read_bytes() == (b / "steps.csv").read_bytes()
    assert (a / "requests.csv").read_bytes() == (b / "requests.csv").read_bytes()
    s = json.loads((a / "summary.json").read_text())
    rep = s["replica"]
    assert rep["engine"] == "vllm" and rep["page_size"] == 16
    # H100 (80 GB, not an A100): the API server's 8192-token budget and 1024 sequences
    assert rep["scheduler"]["max_prefill_tokens"] == 8192
    assert rep["scheduler"]["max_running_requests"] == 1024
    assert rep["scheduler"]["cuda_graph_max_bs"] == 512
    kinds = set(pd.read_csv(a / "steps.csv")["kind"])
    assert "mixed" in kinds and s["requests_completed"] == 80


def test_kv_cache_tokens_overrides_the_capacity_for_either_engine(tmp_path):
    for engine in ("sglang", "vllm"):
        out = tmp_path / engine
        r = invoke("--engine", engine, "--kv-cache-tokens", 50000, "--limit", 20, "--out", out)
        assert r.exit_code == 0, r.output
        assert json.loads((out / "summary.json").read_text())["replica"]["l1_tokens"] == 50000


@pytest.mark.parametrize(
    "args, message",
    [
        (("--engine", "vllm", "--l1-fraction", 0.8), "'l1_fraction' is an option of engine sglang"),
        (("--max-num-seqs", 64), "'max_num_seqs' is an option of engine vllm"),
        (("--engine", "vllm", "--schedule-policy", "lpm"), "supports 'fcfs' only"),
        (("--engine", "tgi"), "field 'engine' must be one of sglang, vllm"),
    ],
)
def test_options_of_the_other_engine_are_refused_in_one_line(tmp_path, args, message):
    r = invoke(*args, "--limit", 5, "--out", tmp_path / "o")
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1


def test_frontend_adds_to_ttft_and_e2e_not_to_tpot(tmp_path):
    from hisim_jax.serving.frontend import VLLM_FRONTEND

    s = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        r = invoke("--engine", "vllm", "--frontend", mode, "--limit", 20, "--rate-scale", 0.05,
                   "--out", out)  # fmt: skip
        assert r.exit_code == 0, r.output
        s[mode] = json.loads((out / "summary.json").read_text())
    # an idle replica (arrivals 20x sparser): the front end only shifts when the engine sees
    # each request, by its fixed cost plus tokenizing the prompt
    req = pd.read_csv(tmp_path / "on" / "requests.csv")
    extra = VLLM_FRONTEND.request_s + VLLM_FRONTEND.per_input_token_s * req.input_len.mean()
    assert s["on"]["ttft_s"]["mean"] - s["off"]["ttft_s"]["mean"] == pytest.approx(extra, rel=0.05)
    assert s["on"]["tpot_s"]["mean"] == pytest.approx(s["off"]["tpot_s"]["mean"], rel=0.02)


def test_engine_and_its_options_come_from_a_yaml_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("engine: vllm\nmax-num-seqs: 64\nmax_num_batched_tokens: 1024\nlimit: 20\n")
    out = tmp_path / "o"
    r = invoke("--config", cfg, "--out", out)
    assert r.exit_code == 0, r.output
    sched = json.loads((out / "summary.json").read_text())["replica"]["scheduler"]
    assert (sched["max_running_requests"], sched["max_prefill_tokens"]) == (64, 1024)
    assert sched["cuda_graph_max_bs"] == 128  # min(2 x 64, 512, 1024)


def test_max_model_len_rejects_longer_requests_and_is_capped_by_the_model(tmp_path):
    out = tmp_path / "o"
    # open loop: in a closed one a session whose turn is rejected sends no more turns
    r = invoke("--max-model-len", 1024, "--limit", 50, "--sessions", "open", "--out", out)
    assert r.exit_code == 0, r.output
    req = pd.read_csv(out / "requests.csv")
    long = req.input_len + req.output_len > 1024
    assert long.any() and (req.rejected[long].str.contains("context window")).all()
    assert req.rejected[~long].isna().all()
    bad = invoke("--max-model-len", 10**7, "--limit", 5, "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "context window 131072" in bad.output


def test_mem_fraction_static_is_sglangs_name_for_l1_fraction(tmp_path):
    out = {}
    for flag in ("--l1-fraction", "--mem-fraction-static"):
        d = tmp_path / flag.strip("-")
        r = invoke(flag, 0.8, "--limit", 5, "--out", d)
        assert r.exit_code == 0, r.output
        out[flag] = json.loads((d / "summary.json").read_text())["replica"]["l1_tokens"]
    assert out["--l1-fraction"] == out["--mem-fraction-static"]


def test_a_run_without_frames_has_the_same_summary():
    from hisim_jax.simulation import SimulationOptions, run

    o = SimulationOptions(limit=60)
    full, bare = run(o), run(o, frames=False)
    assert bare.requests is None and bare.steps is None
    drop = lambda s: {k: v for k, v in s.items() if k not in ("wall_s", "cost")}  # noqa: E731
    assert drop(full.summary) == drop(bare.summary)
