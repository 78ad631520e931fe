"""`validate e2e`: benchmark readers, the replay's comparison and the report files."""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.simulation import SimulationOptions
from hisim_jax.validate import e2e
from hisim_jax.validate.e2e import E2EError

FIX = Path(__file__).parent / "fixtures" / "e2e"
IP = FIX / "inference-perf"
SHARED_RAW = Path(__file__).resolve().parents[3] / "shared" / "e2e" / "vllm-h100" / "raw"
HAS_ENGINE = "engine" in {f.name for f in fields(SimulationOptions)}


# ------------------------------------------------------------------------------------------------
# detection and parsing


@pytest.mark.parametrize(
    "path, fmt",
    [
        (IP, "inference-perf"),
        (FIX / "vllm-bench.json", "vllm-bench"),
        (FIX / "sglang-bench.jsonl", "sglang-bench"),
        (FIX / "requests.csv", "csv"),
    ],
)
def test_formats_are_detected(path, fmt):
    assert e2e.detect_format(path) == fmt
    assert e2e.read_run(path).format == fmt


def test_inference_perf_run_folder():
    run = e2e.read_run(IP, arrivals="uniform")
    d = run.deployment
    assert (d.model_id, d.tp, d.engine) == ("meta-llama/Llama-2-7b-hf", 2, "vllm")
    assert (d.max_num_seqs, d.max_num_batched_tokens, d.max_model_len) == (64, 2048, 4096)
    assert d.gpu_memory_utilization == 0.85 and d.hardware == "h100-sxm"
    assert [(s.index, s.start_s, s.end_s, s.rate) for s in run.stages] == [
        (0, 0.0, 2.0, 2.0),
        (1, 2.0 + e2e.STAGE_GAP_S, 5.0 + e2e.STAGE_GAP_S, 1.0),
    ]
    assert run.stage_of == (0, 0, 0, 0, 1, 1, 1)  # int(rate x duration) per stage
    r = run.requests
    # uniform: the first request one gap after the stage start, the last at its end
    assert [x.arrival_s for x in r[:4]] == [0.5, 1.0, 1.5, 2.0]
    assert r[4].arrival_s == pytest.approx(1.0 + run.stages[1].start_s)
    assert all(x.input_len == 54 and x.output_len == 8 for x in r)  # round(54.4), output_len
    assert [x.request_id for x in r] == list(range(7))
    assert run.drain_between_stages and run.stage_pause_s == 2.0 and run.timeout_s is None
    # 4 prompts, each request j uses prompt j mod 4 of a seeded order; stage 1 restarts at 0
    assert [x.block_ids for x in r[4:]] == [x.block_ids for x in r[:3]]
    assert len({x.block_ids for x in r[:4]}) == 4
    # 54 tokens = 4 blocks of 16; system prompt 32 tokens = the first 2 blocks, per group
    assert all(len(x.block_ids) == 4 for x in r)
    firsts = {x.block_ids[:2] for x in r[:4]}
    assert len(firsts) == 2  # two groups
    assert len({x.block_ids[2] for x in r[:4]}) == 4  # the rest is the prompt's own
    m = run.measured[0]
    assert (m.requests_ok, m.requests_failed) == (4, 0)
    assert (m.ttft.mean, m.ttft.p50, m.ttft.p90, m.ttft.p99) == (0.020, 0.019, 0.025, 0.030)
    assert (m.e2e.mean, m.e2e.p50) == (0.090, 0.088)
    assert m.tpot.mean == pytest.approx((0.090 - 0.020) / 7) and m.tpot.p50 is None
    assert m.itl.mean is None  # inference-perf's own ITL is per chunk: kept aside
    assert m.extra["itl_ip_mean_s"] == 0.004
    assert m.request_throughput_per_s == 1.9 and m.input_tok_s == pytest.approx(1.9 * 54.4)
    assert m.quantiles["ttft"][0] == (0.0, 0.015) and m.quantiles["ttft"][-1] == (1.0, 0.031)


def test_inference_perf_arrivals_follow_its_timer():
    """'constant' in inference-perf: exponential gaps rescaled to span the stage exactly."""
    a = e2e.read_run(IP, seed=3)
    b = e2e.read_run(IP, seed=3)
    assert a.requests == b.requests
    t = np.array([r.arrival_s for r in a.requests[:4]])
    assert t[-1] == pytest.approx(2.0) and np.all(np.diff(t) > 0) and t[0] > 0
    assert e2e.read_run(IP, seed=4).requests != a.requests


def test_vllm_bench_json():
    run = e2e.read_run(FIX / "vllm-bench.json", seed=1)
    assert run.deployment.model_id == "meta-llama/Llama-3.2-1B"
    assert run.deployment.engine == "vllm"
    m = run.measured[0]
    assert (m.requests_ok, m.requests_failed) == (4, 1)
    assert (m.ttft.mean, m.ttft.p50, m.ttft.p99) == (28.75 / 1e3, 27.5 / 1e3, 39.7 / 1e3)
    assert m.ttft.p90 == pytest.approx(np.quantile([0.020, 0.030, 0.025, 0.040], 0.9))
    assert m.e2e.mean == 79.5 / 1e3 and m.request_throughput_per_s == 1.6
    assert m.samples["tpot"] == pytest.approx([0.045 / 9, 0.054 / 9, 0.055 / 11, 0.049 / 7])
    assert len(m.samples["itl"]) == 9 + 9 + 11 + 7
    assert sorted(r.input_len for r in run.requests) == [80, 90, 100, 100, 120]
    # the failed request keeps its prompt and gets the mean successful output (10)
    assert sorted(r.output_len for r in run.requests) == [8, 10, 10, 10, 12]
    t = np.array([r.arrival_s for r in run.requests])
    assert t.max() == pytest.approx(5 / 4.0)  # vLLM rescales: the last at N / rate
    assert e2e.read_run(FIX / "vllm-bench.json", seed=1).requests == run.requests


def test_vllm_bench_start_times_win(tmp_path):
    doc = json.loads((FIX / "vllm-bench.json").read_text())
    doc["start_times"] = [100.5, 100.0, 101.0, 102.0, 100.25]
    p = tmp_path / "v.json"
    p.write_text(json.dumps(doc))
    run = e2e.read_run(p)
    assert [r.arrival_s for r in run.requests] == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert [r.input_len for r in run.requests] == [120, 90, 100, 80, 100]


def test_sglang_jsonl_stages():
    run = e2e.read_run(FIX / "sglang-bench.jsonl")
    assert [s.rate for s in run.stages] == [2.0, math.inf]
    assert run.stage_of == (0, 0, 0, 1, 1)
    m0, m1 = run.measured
    assert m0.requests_ok == 3 and m0.request_throughput_per_s == 2.0
    assert m0.samples["e2e"] == pytest.approx([0.022, 0.027, 0.032])  # ttft + sum(itls)
    assert m0.ttft.mean == pytest.approx(0.012)
    assert m1.ttft.mean == pytest.approx(0.021)
    t1 = [r.arrival_s for r in run.requests[3:]]
    assert t1[0] == t1[1] == run.stages[1].start_s  # rate inf: all at once
    assert run.stages[1].start_s >= run.stages[0].end_s + e2e.STAGE_GAP_S


def test_request_csv():
    run = e2e.read_run(FIX / "requests.csv")
    assert [r.block_ids for r in run.requests] == [(1, 2, 3), (1, 2, 4), (1, 5), (1, 2, 3), (7,)]
    assert run.stage_of == (0, 0, 0, 1, 1)
    m0, m1 = run.measured
    assert (m0.requests_ok, m1.requests_ok, m1.requests_failed) == (3, 1, 1)
    assert m0.ttft.mean == pytest.approx(0.020) and m0.e2e.mean == pytest.approx(0.054)
    assert m0.samples["tpot"] == pytest.approx([0.01, 0.0105, 0.01])
    assert m0.itl.mean == pytest.approx((0.040 + 0.042 + 0.020) / (4 + 4 + 2))
    assert m0.request_throughput_per_s == pytest.approx(3 / 1.038)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1e4, allow_nan=False),
            st.integers(1, 200),
            st.integers(1, 50),
            st.floats(0, 1e3, allow_nan=False),
            st.floats(0, 1e3, allow_nan=False),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_request_csv_reads_back_what_was_written(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("csv") / "r.csv"
    lines = ["arrival_s,input_len,output_len,ttft_ms,e2e_ms"]
    lines += [f"{a!r},{i},{o},{t!r},{t + d!r}" for a, i, o, t, d in rows]
    p.write_text("\n".join(lines) + "\n")
    run = e2e.read_run(p)
    want = sorted(rows, key=lambda r: r[0])
    assert [(r.arrival_s, r.input_len, r.output_len) for r in run.requests] == [
        (a, i, o) for a, i, o, _, _ in want
    ]
    assert run.measured[0].requests_ok == len(rows)
    assert sorted(run.measured[0].samples["ttft"]) == pytest.approx(
        sorted(t / 1e3 for *_, t, _ in want)
    )


# ------------------------------------------------------------------------------------------------
# bad input: one line naming the file, the field and the value


def _copy_ip(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    for f in IP.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_inference_perf_inputs(tmp_path):
    d = _copy_ip(tmp_path)
    cfg = (d / "results_config.yaml").read_text()
    (d / "results_config.yaml").write_text(cfg.replace("num_groups: 2", "num_groups: two"))
    with pytest.raises(E2EError) as e:
        e2e.read_run(d)
    assert "results_config.yaml" in _one_line(e) and "'num_groups'" in str(e.value)
    assert "'two'" in str(e.value)
    (d / "results_config.yaml").write_text(cfg.replace("shared_prefix\n", "random\n", 1))
    with pytest.raises(E2EError, match=r"data.type' must be shared_prefix .*got 'random'"):
        e2e.read_run(d)
    (d / "results_config.yaml").write_text(cfg)
    stage = json.loads((d / "results_stage_1_lifecycle_metrics.json").read_text())
    stage["successes"]["latency"]["time_to_first_token"]["mean"] = "fast"
    (d / "results_stage_1_lifecycle_metrics.json").write_text(json.dumps(stage))
    with pytest.raises(E2EError) as e:
        e2e.read_run(d)
    msg = _one_line(e)
    assert "results_stage_1_lifecycle_metrics.json" in msg and "'mean'" in msg and "'fast'" in msg
    (d / "results_stage_1_lifecycle_metrics.json").unlink()
    with pytest.raises(E2EError, match="no lifecycle metrics for stage 1"):
        e2e.read_run(d)


def test_bad_benchmark_files(tmp_path):
    doc = json.loads((FIX / "vllm-bench.json").read_text())
    del doc["input_lens"]
    p = tmp_path / "v.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(E2EError, match=r"field 'input_lens' is missing .*--save-detailed"):
        e2e.read_run(p, "vllm-bench")
    doc = json.loads((FIX / "vllm-bench.json").read_text())
    doc["ttfts"][2] = -1
    p.write_text(json.dumps(doc))
    with pytest.raises(E2EError) as e:
        e2e.read_run(p)
    assert _one_line(e) == f"{p}: request 2: field 'ttfts' must be >= 0, got -1"
    doc["ttfts"] = doc["ttfts"][:3]
    p.write_text(json.dumps(doc))
    with pytest.raises(E2EError, match="field 'ttfts' has 3 entries, expected 5"):
        e2e.read_run(p)
    s = tmp_path / "s.jsonl"
    s.write_text(
        (FIX / "sglang-bench.jsonl").read_text().replace('"ttfts": [0.01', '"ttfts": [NaN')
    )
    with pytest.raises(E2EError) as e:
        e2e.read_run(s, "sglang-bench")
    assert "line 1" in _one_line(e) and "'ttfts'" in str(e.value)
    c = tmp_path / "r.csv"
    c.write_text("arrival_s,input_len,output_len,ttft_ms,e2e_ms,block_ids\n0,40,5,20,60,1 2\n")
    with pytest.raises(E2EError) as e:
        e2e.read_run(c)
    assert _one_line(e) == (
        f"{c}: line 2: field 'block_ids' has 2 ids, expected 3 "
        "(ceil(input_len 40 / block_tokens 16))"
    )
    c.write_text("arrival_s,input_len,output_len,ttft_ms\n0,40,5,20\n")
    with pytest.raises(E2EError, match="missing column 'e2e_ms'"):
        e2e.read_run(c)
    with pytest.raises(E2EError, match="field 'format' must be one of"):
        e2e.read_run(c, "mooncake")


# ------------------------------------------------------------------------------------------------
# options of the deployment


def test_options_from_the_run_hints():
    run = e2e.read_run(IP)
    o = e2e.options_for(run, SimulationOptions(model="llama-3.2-1b", tp=1))
    assert (o.model, o.tp, o.hardware, o.block_tokens) == ("llama-2-7b", 2, "h100-sxm", 16)
    kept = e2e.options_for(run, SimulationOptions(model="llama-3.2-1b"), explicit=("model",))
    assert kept.model == "llama-3.2-1b"
    if HAS_ENGINE:
        assert o.engine == "vllm"
        assert (o.max_num_seqs, o.max_num_batched_tokens) == (64, 2048)
        assert o.gpu_memory_utilization == 0.85
    else:  # before the vLLM fields land: SGLang's counterparts
        assert (o.max_running_requests, o.chunked_prefill_size) == (64, 2048)


def test_model_and_gpu_names():
    assert e2e.model_stem("codellama/CodeLlama-34b-Instruct-hf") == "codellama-34b-instruct"
    assert e2e.model_stem("mistralai/Mixtral-8x7B-v0.1") == "mixtral-8x7b"
    assert e2e.model_stem("someone/llama-3.2-1b") == "llama-3.2-1b"  # a stem of that name
    assert e2e.model_stem("someone/unknown-model") is None
    assert e2e.hardware_stem("H100-80GB-HBM3 SXM") == "h100-sxm"
    assert e2e.hardware_stem("NVIDIA H200") == "h200-sxm"
    assert e2e.hardware_stem("TPU v5e") is None


def test_model_stem_reads_name_or_path(tmp_path):
    (tmp_path / "my-model.json").write_text(json.dumps({"_name_or_path": "Org/My-Model"}))
    assert e2e.model_stem("org/my-model", models_dir=tmp_path) == "my-model"


# ------------------------------------------------------------------------------------------------
# replay against a known prediction


@dataclass
class FakeRun:
    requests: pd.DataFrame
    steps: pd.DataFrame


def fake_simulate(ttft_s=0.01, tpot_s=0.002, late_stage0_s=0.0, calls=None):
    """A stand-in for simulation.run: every request gets ``ttft_s`` and ``tpot_s``; stage 0's
    requests (arrivals before 100 s) finish ``late_stage0_s`` later."""

    def sim(options, reqs):
        if calls is not None:
            calls.append([r.arrival_s for r in reqs])
        rows = []
        for r in reqs:
            extra = late_stage0_s if r.arrival_s < 100 else 0.0
            first = r.arrival_s + ttft_s + extra
            finish = first + tpot_s * (r.output_len - 1)
            rows.append(
                dict(
                    request_id=r.request_id, arrival_s=r.arrival_s, input_len=r.input_len,
                    output_len=r.output_len, queue_s=0.0, first_token_s=first, finish_s=finish,
                    ttft_s=first - r.arrival_s, tpot_s=tpot_s, e2e_s=finish - r.arrival_s,
                    rejected="",
                )
            )  # fmt: skip
        steps = pd.DataFrame(
            dict(
                start_s=[0.0, 0.01, 0.012, 0.014], duration_s=[0.01, 0.002, 0.003, 0.002],
                kind=["prefill", "decode", "prefill", "decode"], n_requests=[1, 2, 1, 2],
            )
        )  # fmt: skip
        return FakeRun(pd.DataFrame(rows), steps)

    return sim


def test_replay_errors_are_exact():
    run = e2e.read_run(FIX / "requests.csv")
    rep = e2e.replay(run, SimulationOptions(), simulate=fake_simulate(0.010, 0.002))
    c0 = rep.stages[0]
    p = c0.predicted
    assert p.ttft.mean == pytest.approx(0.010) and p.tpot.mean == pytest.approx(0.002)
    assert p.e2e.mean == pytest.approx(0.010 + 0.002 * (4 + 4 + 2) / 3)
    assert p.itl.mean == pytest.approx(0.002)  # exact: every gap of the stage's requests
    # percentiles from the fake step log: decode gaps 0.002 and 0.003 + 0.002 (a prefill between)
    assert (p.itl.p50, p.itl.p99) == (0.002, 0.005)
    rows = {(r["stage"], r["metric"]): r for r in rep.rows()}
    r = rows[0, "ttft_mean_ms"]
    assert r["measured"] == pytest.approx(20.0) and r["predicted"] == pytest.approx(10.0)
    assert r["error"] == pytest.approx(10.0 / 20.0 - 1)
    r = rows[0, "e2e_mean_ms"]
    assert r["error"] == pytest.approx(p.e2e.mean / 0.054 - 1)
    assert (
        rows[1, "requests_failed"]["measured"] == 1 and rows[1, "requests_failed"]["predicted"] == 0
    )
    assert rows[0, "ttft_p90_ms"]["error"] == pytest.approx(
        10.0 / (np.quantile([20, 22, 18], 0.9)) - 1
    )
    assert rep.simulations == 1


def test_regimes():
    run = e2e.read_run(FIX / "requests.csv")
    rep = e2e.replay(run, SimulationOptions(), simulate=fake_simulate())
    # measured: lowest TTFT 15 ms; stage 0 mean 20 ms is unloaded, stage 1 had a failure
    assert [c.measured_regime for c in rep.stages] == ["unloaded", "queueing"]
    assert [c.predicted_regime for c in rep.stages] == ["unloaded", "unloaded"]
    assert [c.regime_match for c in rep.stages] == [True, False]
    m = e2e.StageMetrics(0, 10, 0, ttft=e2e.Dist(mean=0.4))
    assert e2e.regime(m, 0.1) == "queueing" and e2e.regime(m, 0.2) == "unloaded"


def test_late_drain_retimes_the_next_stage():
    run = e2e.read_run(IP, arrivals="uniform")
    calls = []
    late = e2e.STAGE_GAP_S + 10  # stage 0 drains after stage 1 would have started
    rep = e2e.replay(
        run, SimulationOptions(), simulate=fake_simulate(late_stage0_s=late, calls=calls)
    )
    assert rep.simulations == 2
    first, second = np.array(calls[0]), np.array(calls[1])
    assert np.array_equal(first[:4], second[:4])
    last_finish = 2.0 + late + 0.01 + 0.002 * 7
    assert second[4:].min() == pytest.approx(last_finish + run.stage_pause_s, abs=1e-5)
    assert rep.stages[1].stage.start_s == pytest.approx(second[4:].min() - 1.0, abs=1e-5)


def test_write_report(tmp_path):
    run = e2e.read_run(IP)
    rep = e2e.replay(run, SimulationOptions(), simulate=fake_simulate())
    out = e2e.write_report(rep, tmp_path / "out")
    names = sorted(p.name for p in out)
    assert names == ["cdf_e2e.png", "cdf_tpot.png", "cdf_ttft.png", "e2e.csv", "summary.json"]
    summ = json.loads((tmp_path / "out" / "summary.json").read_text())  # strict: no NaN
    assert summ["stages"][0]["measured"]["ttft_s"]["mean"] == 0.020
    assert summ["stages"][0]["error"]["itl_mean_ms"] is None
    csv = pd.read_csv(tmp_path / "out" / "e2e.csv")
    assert len(csv) == 2 * (len(e2e.METRICS) * len(e2e.STATS) + len(e2e.THROUGHPUTS) + 2)
    assert list(csv.columns) == ["stage", "rate", "metric", "measured", "predicted", "error"]


def test_replay_a_tiny_real_run(ends_within):
    """The real simulator on the CSV fixture: every request comes back, stage by stage."""
    run = e2e.read_run(FIX / "requests.csv")
    o = e2e.options_for(run, SimulationOptions(model="llama-3.2-1b"))
    with ends_within(60):
        rep = e2e.replay(run, o)
    assert [c.predicted.requests_ok + c.predicted.requests_failed for c in rep.stages] == [3, 2]
    p = rep.stages[0].predicted
    assert 0 < p.ttft.mean < p.e2e.mean and p.tpot.mean > 0


@pytest.mark.skipif(not SHARED_RAW.is_dir(), reason="shared e2e data not present")
def test_every_shared_run_parses():
    runs = sorted(p for p in SHARED_RAW.iterdir() if p.name[:1].isdigit())
    assert len(runs) == 16
    for p in runs:
        run = e2e.read_run(p)
        assert run.deployment.hardware == "h100-sxm"
        assert e2e.model_stem(run.deployment.model_id) is not None
        assert len(run.requests) == sum(int(s.rate * (s.end_s - s.start_s)) for s in run.stages)


def test_cli_validate_e2e_replays_a_fixture_and_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from hisim_jax.cli import app

    out = tmp_path / "rep"
    run = Path(__file__).parent / "fixtures" / "e2e" / "requests.csv"
    r = CliRunner().invoke(
        app, ["validate", "e2e", str(run), "--model", "llama-3.2-1b", "--hardware", "h100-sxm",
              "--engine", "vllm", "--out", str(out), "--format", "json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["options"]["engine"] == "vllm" and doc["stages"]
    assert {"e2e.csv", "summary.json"} <= {p.name for p in out.iterdir()}
    bad = CliRunner().invoke(app, ["validate", "e2e", str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_sglang_jsonl_allows_infinity_only_as_the_request_rate(tmp_path):
    line = (FIX / "sglang-bench.jsonl").read_text().splitlines()[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line.replace('"duration": 0.1', '"duration": Infinity') + "\n")
    with pytest.raises(E2EError, match=r"line 1: field 'duration' must be a finite number"):
        e2e.read_run(bad, "sglang-bench")
    neg = tmp_path / "neg.jsonl"
    neg.write_text(line.replace('"request_rate": Infinity', '"request_rate": -Infinity') + "\n")
    with pytest.raises(E2EError, match="field 'request_rate' must be a finite number"):
        e2e.read_run(neg, "sglang-bench")
