"""SGLang scheduler logs: the reader of their batch lines, and the comparison with a simulation.

The fixture ``fixtures/sglang_scheduler.log`` and the lines below follow SGLang 0.5.23's
``sglang/srt/managers/scheduler_components/metrics_reporter.py`` (``report_prefill_stats``,
``report_decode_stats``; usage parts from ``pool_stats_observer.py``, the ``[date time TP0]``
prefix from ``configure_logger`` in ``srt/utils/common.py`` with a TP-size-2 server); the older
variants follow ``scheduler.py`` / ``scheduler_metrics_mixin.py`` of SGLang v0.3-0.5.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.estimator.calibrate import ProfileError
from hisim_jax.simulation import SimulationOptions, run
from hisim_jax.validate.sglang_log import (
    compare_sglang_log,
    looks_like_sglang_log,
    parse_sglang_log,
    read_sglang_log,
    replay_sglang_log,
    sglang_log_lines,
)

FIX = Path(__file__).parent / "fixtures" / "sglang_scheduler.log"
PRE = (
    "[2025-06-10 09:15:30 TP0] Prefill batch, #new-seq: 2, #new-token: 2048, #cached-token: 256, "
    "token usage: 0.01, #running-req: 1, #queue-req: 1, #pending-token: 1200, cuda graph: False, "
    "input throughput (token/s): 30378.61"
)
DEC = (
    "[2025-06-10 09:15:31 TP0] Decode batch, #running-req: 4, #token: 4310, token usage: 0.01, "
    "cuda graph: True, gen throughput (token/s): 321.55, #queue-req: 0"
)


def _rec(frame: pd.DataFrame, line: int) -> dict:
    row = frame[frame["line"] == line]
    assert len(row) == 1
    return {k: (None if v is pd.NA else v) for k, v in row.iloc[0].to_dict().items()}


# ------------------------------------------------------------------------------------------------
# reading


def test_the_fixture_is_read_field_by_field():
    log = read_sglang_log(FIX)
    # the warm-up prefill (line 14, before "fired up and ready to roll") is dropped
    assert log["line"].tolist() == [17, 18, 20, 21, 22, 23, 25, 26, 28]
    assert log["kind"].tolist() == ["prefill"] * 3 + ["decode"] * 3 + ["prefill"] + ["decode"] * 2
    assert set(log["rank"]) == {"TP0"}
    assert log["stamp_res_s"].eq(1.0).all()
    assert log["time_s"].tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 4]
    assert log["timestamp"].iloc[0] == pd.Timestamp("2025-06-10 09:15:30")

    first = _rec(log, 17)
    assert (first["new_seq"], first["new_tokens"], first["cached_tokens"]) == (1, 512, 0)
    assert (first["running_req"], first["queue_req"], first["pending_tokens"]) == (0, 0, 0)
    assert first["token_usage"] == 0.0 and first["input_throughput"] == 68.27
    assert bool(first["cuda_graph"]) is False
    assert first["kv_tokens"] is None and math.isnan(first["gen_throughput"])
    assert first["decode_steps"] is None and math.isnan(first["interval_start_s"])

    chunked = _rec(log, 18)  # a new prompt and the first chunk of another (1200 tokens left)
    assert (chunked["new_seq"], chunked["new_tokens"], chunked["cached_tokens"]) == (2, 2048, 256)
    assert (chunked["running_req"], chunked["queue_req"]) == (1, 1)
    assert chunked["pending_tokens"] == 1200 and chunked["token_usage"] == 0.01
    rest = _rec(log, 20)  # the chunked prompt's last 1200 tokens and a new 256-token prompt
    assert (rest["new_seq"], rest["new_tokens"], rest["cached_tokens"]) == (2, 1456, 512)

    dec = _rec(log, 21)
    assert (dec["running_req"], dec["kv_tokens"], dec["queue_req"]) == (4, 4310, 0)
    assert dec["token_usage"] == 0.01 and dec["gen_throughput"] == 321.55
    assert bool(dec["cuda_graph"]) is True
    assert dec["new_seq"] is None and dec["new_tokens"] is None
    # every decode record stands for the 40 decode steps since the previous decode record
    assert dec["decode_steps"] == 40 and dec["interval_start_s"] == 0.0
    assert _rec(log, 22)["interval_start_s"] == 1.0
    last = _rec(log, 28)
    assert (last["running_req"], last["kv_tokens"], last["queue_req"]) == (3, 4120, 1)
    assert last["interval_start_s"] == 3.0

    kept = read_sglang_log(FIX, skip_warmup=False, decode_log_interval=10)
    assert kept["line"].iloc[0] == 14 and kept["time_s"].iloc[-1] == 12.0
    assert set(kept["decode_steps"].dropna()) == {10}
    assert looks_like_sglang_log(FIX)


@pytest.mark.parametrize(
    "line, expected",
    [
        (  # v0.3-0.4: "." after the kind, cache hit rate, the chunked prompt counted as queued
            "[2025-01-23 19:35:28 TP0] Prefill batch. #new-seq: 1, #new-token: 7, "
            "#cached-token: 0, cache hit rate: 0.00%, token usage: 0.00, #running-req: 0, "
            "#queue-req: 0",
            {"kind": "prefill", "new_seq": 1, "new_tokens": 7, "rank": "TP0", "queue_req": 0},
        ),
        (  # v0.3 --enable-mixed-chunk: the running requests decode in the prefill step
            "[2024-09-01 10:00:00 TP0] Prefill batch(mixed #running-req: 3). #new-seq: 2, "
            "#new-token: 8190, #cached-token: 0, cache hit rate: 0.00%, token usage: 0.12, "
            "#queue-req: 7",
            {"kind": "prefill", "running_req": 3, "mixed": True, "new_tokens": 8190},
        ),
        (  # v0.4-0.5 decode, with "cuda graph"
            "[2025-07-18 15:32:54 TP0] Decode batch. #running-req: 1, #token: 2266, "
            "token usage: 0.00, cuda graph: True, gen throughput (token/s): 3.13, #queue-req: 0, ",
            {"kind": "decode", "running_req": 1, "kv_tokens": 2266, "gen_throughput": 3.13},
        ),
        (  # request time-stats logging: its ISO timestamp field is the finer time
            "[2025-07-18 15:32:52 TP0] Prefill batch. #new-seq: 1, #new-token: 2192, "
            "#cached-token: 35, #token: 35, token usage: 0.00, #running-req: 0, #queue-req: 0, "
            "timestamp: 2025-07-18T15:32:52.498932",
            {"cached_tokens": 35, "kv_tokens": 35, "stamp_res_s": 1e-6},
        ),
        (  # PD prefill server, DP attention ranks
            "[2026-05-09 12:00:00 DP0 TP0 EP0] Prefill batch, #new-seq: 2, #new-token: 8192, "
            "#cached-token: 0, full token usage: 0.10, #running-req: 0, #queue-req: 0, "
            "#prealloc-req: 0, #inflight-req: 3, input throughput (token/s): 1000.0",
            {"rank": "DP0 TP0 EP0", "token_usage": 0.10, "prealloc_req": 0, "inflight_req": 3},
        ),
        (  # PD decode server, a hybrid model's "#full token"
            "[2026-05-09 12:00:00 DP1 TP4 EP4] Decode batch, #running-req: 4, "
            "#full token: 10000, full token usage: 0.20, pre-allocated usage: 0.10, "
            "#prealloc-req: 1, #transfer-req: 2, #retracted-req: 0, "
            "gen throughput (token/s): 500.0, #queue-req: 0",
            {"kv_tokens": 10000, "token_usage": 0.2, "transfer_req": 2, "prealloc_req": 1},
        ),
        (  # SGLANG_LOG_MS and SGLANG_LOG_FORWARD_ITERS, speculative decoding, no TP prefix
            "[2026-01-02 03:04:05.678] Decode batch [1234], #running-req: 8, #token: 900, "
            "token usage: 0.02, accept len: 2.31, accept rate: 0.66, npu graph: False, "
            "gen throughput (token/s): 812.5, #queue-req: 2",
            {"running_req": 8, "queue_req": 2, "stamp_res_s": 0.001, "cuda_graph": False},
        ),
        (  # docker compose's prefix; the first chunk of a long prompt
            "sglang  | [2025-06-06 10:23:32 TP0] Prefill batch. #new-seq: 2, #new-token: 8191, "
            "#cached-token: 0, token usage: 0.01, #running-req: 1, #queue-req: 7",
            {"new_seq": 2, "new_tokens": 8191, "queue_req": 7},
        ),
        (  # a colourized structured logger without SGLang's bracket
            "\x1b[2m2025-12-30T15:52:38.206058Z\x1b[0m \x1b[32m INFO\x1b[0m Prefill batch, "
            "#new-seq: 5, #new-token: 40960, #cached-token: 0, token usage: 0.78, "
            "#running-req: 5, #queue-req: 0",
            {"new_seq": 5, "token_usage": 0.78, "stamp_res_s": 1e-6},
        ),
    ],
)
def test_older_and_other_variants(line, expected):
    rec = _rec(parse_sglang_log(["noise", line, "[2025-01-01 00:00:00] more noise"]), 2)
    for key, value in expected.items():
        if isinstance(value, float):
            assert rec[key] == pytest.approx(value), key
        else:
            assert rec[key] == value, key


@pytest.mark.parametrize(
    "bad, good, field, value",
    [
        ("#new-seq: 2,", "#new-seq: x,", "#new-seq", "'x'"),
        ("#new-token: 2048,", "#new-token: ,", "#new-token", "''"),
        ("#cached-token: 256,", "#cached-token: -3,", "#cached-token", "'-3'"),
        ("#running-req: 1,", "#running-req: 1.5,", "#running-req", "'1.5'"),
        ("#queue-req: 1,", "#queue-req,", "#queue-req", "no value"),
        ("token usage: 0.01,", "token usage: lots,", "token usage", "'lots'"),
        ("#pending-token: 1200,", "#pending-token: 12OO,", "#pending-token", "'12OO'"),
        ("cuda graph: False,", "cuda graph: maybe,", "cuda graph", "'maybe'"),
        ("(token/s): 30378.61", "(token/s): nan", "input throughput (token/s)", "'nan'"),
        ("#cached-token: 256, ", "", "#cached-token", "missing"),
        ("09:15:30 TP0]", "09:75:30 TP0]", "timestamp", "'2025-06-10 09:75:30 TP0'"),
        ("[2025-06-10 09:15:30 TP0] ", "", "timestamp", "missing"),
        ("Prefill batch,", "Prefill batch [x],", "forward iteration", "'x'"),
    ],
)
def test_a_bad_prefill_line_is_one_error_naming_line_field_and_value(bad, good, field, value):
    assert bad in PRE
    lines = ["[2025-06-10 09:15:29] INFO: started", DEC, PRE.replace(bad, good, 1)]
    with pytest.raises(ProfileError) as e:
        parse_sglang_log(lines, "run.log")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run.log: line 3: ")
    assert f"field '{field}'" in msg and value in msg


@pytest.mark.parametrize(
    "bad, good, field, value",
    [
        ("#running-req: 4,", "#running-req: four,", "#running-req", "'four'"),
        ("#token: 4310,", "#token: 4310x,", "#token", "'4310x'"),
        ("(token/s): 321.55", "(token/s): inf", "gen throughput (token/s)", "'inf'"),
        (", #queue-req: 0", "", "#queue-req", "missing"),
        ("09:15:31 TP0]", "TP0]", "timestamp", "'2025-06-10 TP0'"),
    ],
)
def test_a_bad_decode_line_is_one_error(bad, good, field, value):
    assert bad in DEC
    with pytest.raises(ProfileError) as e:
        parse_sglang_log([PRE, DEC.replace(bad, good, 1)], "run.log")
    msg = str(e.value)
    assert "\n" not in msg and "run.log: line 2: " in msg
    assert f"field '{field}'" in msg and value in msg


def test_logs_without_batch_lines_are_errors(tmp_path):
    cases = {
        "empty.log": "",
        "blank.log": "\n\n",
        "other.log": "[2025-06-10 09:15:21] INFO:     Started server process [4242]\n",
        "warmup.log": FIX.read_text().split("[2025-06-10 09:15:30")[0],
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ProfileError) as e:
            read_sglang_log(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(e.value)
    assert "warm-up" in str(e.value)
    with pytest.raises(ProfileError, match="no such file"):
        read_sglang_log(tmp_path / "missing.log")
    with pytest.raises(ValueError, match="decode_log_interval"):
        read_sglang_log(FIX, decode_log_interval=0)
    assert not looks_like_sglang_log(tmp_path / "other.log")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.lists(st.integers(0, 10**7), min_size=5, max_size=5),
            st.floats(0, 1, allow_nan=False),
            st.integers(0, 5000),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["", " TP0", " DP1 TP2 EP2"]),
)
def test_formatted_records_read_back(records, ranks):
    lines, t_ms = [], 0
    for is_prefill, (a, b, c, d, e), usage, gap_ms in records:
        t_ms += gap_ms
        clock = f"{t_ms // 60000:02d}:{t_ms // 1000 % 60:02d}.{t_ms % 1000:03d}"
        stamp = f"[2025-03-04 05:{clock}{ranks}]"
        if is_prefill:
            lines.append(
                f"{stamp} Prefill batch, #new-seq: {a}, #new-token: {b}, #cached-token: {c}, "
                f"token usage: {usage:.2f}, #running-req: {d}, #queue-req: {e}, "
                "#pending-token: 0, cuda graph: False, input throughput (token/s): 1.00"
            )
        else:
            lines.append(
                f"{stamp} Decode batch, #running-req: {a}, #token: {b}, token usage: {usage:.2f}, "
                f"cuda graph: True, gen throughput (token/s): {c / 100:.2f}, #queue-req: {e}"
            )
    log = parse_sglang_log(lines)
    assert len(log) == len(records)
    assert ("rank" in log.columns) == bool(ranks)
    t0 = records[0][3]
    expect = [sum(r[3] for r in records[: i + 1]) - t0 for i in range(len(records))]
    assert log["time_s"].tolist() == pytest.approx([x / 1e3 for x in expect])
    for (is_prefill, (a, b, c, d, e), usage, _), row in zip(
        records, log.itertuples(index=False), strict=True
    ):
        assert row.kind == ("prefill" if is_prefill else "decode")
        assert row.queue_req == e and row.token_usage == float(f"{usage:.2f}")
        if is_prefill:
            assert (row.new_seq, row.new_tokens, row.cached_tokens, row.running_req) == (a, b, c, d)
        else:
            assert (row.running_req, row.kv_tokens) == (a, b)
            assert row.gen_throughput == float(f"{c / 100:.2f}") and row.decode_steps == 40


# ------------------------------------------------------------------------------------------------
# comparing with a simulation


@pytest.fixture(scope="module")
def sim():
    # small prompt chunks, so chunked prefills (a prompt over several steps) are compared too
    opts = SimulationOptions(limit=40, chunked_prefill_size=256)
    return opts, run(opts)


def _replayed(sim, **kw):
    _, result = sim
    cap = result.summary["replica"]["l1_tokens"]
    lines = sglang_log_lines(result.steps, result.requests, kv_cache_tokens=cap, **kw)
    return parse_sglang_log(lines, "replayed.log"), cap


@pytest.mark.parametrize("milliseconds", [True, False])
def test_a_log_written_from_the_simulation_agrees_with_it(sim, milliseconds):
    _, result = sim
    log, cap = _replayed(sim, milliseconds=milliseconds)
    rep = compare_sglang_log(log, result.steps, result.requests, kv_cache_tokens=cap)
    s = rep.summary
    n_pre = int(result.steps["kind"].eq("prefill").sum())
    assert (
        s["log_prefill_records"] == s["prefill_paired"] == s["sim_prefill_steps_in_span"] == n_pre
    )
    assert s["prefill_tokens_log"] == s["prefill_tokens_sim"] > 0
    assert s["cached_tokens_log"] == s["cached_tokens_sim"] > 0
    for q in ("new_seq", "new_tokens", "cached_tokens", "running_req", "queue_req"):
        assert s[f"prefill_{q}"]["abs_diff_mean"] == 0.0, q
        assert s[f"prefill_{q}"]["log_mean"] == pytest.approx(s[f"prefill_{q}"]["sim_mean"])
    assert s["decode_paired"] == s["log_decode_records"] > 10
    steps = s["decode_decode_steps"]
    if milliseconds:  # every record stands for exactly its 40 simulated decode steps
        assert steps["abs_diff_mean"] == 0.0 and steps["sim_mean"] == 40.0
        assert (
            s["decode_gen_throughput"]["abs_diff_mean"]
            < 0.01 * s["decode_gen_throughput"]["log_mean"]
        )
    else:  # seconds: records of one second share its steps
        assert steps["sim_mean"] == pytest.approx(40.0, rel=0.05)
    assert abs(s["decode_steps_sim"] - s["decode_steps_log"]) < 40
    # snapshots at an interval's end against the interval's mean: close, not equal
    assert abs(s["decode_running_req"]["diff_mean"]) < 0.25
    assert abs(s["decode_kv_tokens"]["diff_mean"]) < 0.05 * s["decode_kv_tokens"]["log_mean"]
    assert s["decode_queue_req"]["abs_diff_mean"] < 0.5
    assert 0 < s["decode_token_usage"]["sim_mean"] < 1
    rec = rep.records
    assert len(rec) == len(log) and rec["time_s"].is_monotonic_increasing
    pre = rec[rec["kind"] == "prefill"]
    assert (pre["new_tokens_diff"] == 0).all() and (pre["sim_steps"] == 1).all()
    csv = rep.to_csv().splitlines()
    assert csv[0].startswith("line,kind,time_s,rank,") and len(csv) == len(rec) + 1


def test_a_different_schedule_shows_in_the_differences(sim):
    _, result = sim
    log, cap = _replayed(sim)
    pre = log.index[log["kind"] == "prefill"]
    log.loc[pre, "new_tokens"] += 100  # the engine computed 100 more tokens per prefill
    dec = log.index[log["kind"] == "decode"]
    log.loc[dec, "queue_req"] += 3  # and had three more requests waiting
    s = compare_sglang_log(log, result.steps, result.requests, kv_cache_tokens=cap).summary
    assert s["prefill_new_tokens"]["diff_mean"] == pytest.approx(-100)
    assert s["prefill_new_seq"]["abs_diff_mean"] == 0.0
    assert s["decode_queue_req"]["diff_p50"] == pytest.approx(-3, abs=0.5)
    # without the request frame and the pool size, cached tokens and usage are undefined
    s = compare_sglang_log(log, result.steps).summary
    assert s["prefill_cached_tokens"]["sim_mean"] is None and s["cached_tokens_sim"] is None
    assert s["decode_token_usage"]["sim_mean"] is None


def test_ranks_and_replicas_are_chosen(sim):
    _, result = sim
    a = sglang_log_lines(result.steps, result.requests, ranks="DP0 TP0")
    b = sglang_log_lines(result.steps, result.requests, ranks="DP1 TP1")
    log = parse_sglang_log(sorted(a + b))
    first = compare_sglang_log(log, result.steps, result.requests).summary
    assert first["rank"] == "DP0 TP0" and first["ranks_in_log"] == "DP0 TP0, DP1 TP1"
    other = compare_sglang_log(log, result.steps, result.requests, rank="DP1 TP1").summary
    assert other["prefill_new_tokens"]["abs_diff_mean"] == 0.0
    with pytest.raises(ValueError, match="rank 'TP7' is not in the log"):
        compare_sglang_log(log, result.steps, rank="TP7")
    with pytest.raises(ValueError, match="replica 3 is not in the simulation"):
        compare_sglang_log(log, result.steps, replica=3)
    with pytest.raises(ValueError, match="missing column"):
        compare_sglang_log(log, result.steps.drop(columns="waiting"))


def test_replay_reads_the_log_then_simulates(sim, tmp_path):
    opts, result = sim
    path = tmp_path / "server.log"
    lines = sglang_log_lines(result.steps, result.requests)
    path.write_text(
        "[2025-01-01 00:00:00] The server is fired up and ready to roll!\n"
        + "\n".join(lines)
        + "\n"
    )
    rep = replay_sglang_log(path, opts)
    assert rep.summary["log"] == str(path) and rep.summary["engine"] == "sglang"
    assert rep.summary["prefill_new_tokens"]["abs_diff_mean"] == 0.0
    assert rep.summary["decode_token_usage"]["sim_mean"] is not None
    # a bad log fails before any simulating
    path.write_text(lines[0].replace("#new-seq: 1", "#new-seq: one") + "\n")
    with pytest.raises(ProfileError, match="line 1: field '#new-seq'"):
        replay_sglang_log(path, SimulationOptions(limit=10**6))
    steps_csv = tmp_path / "steps.csv"
    result.steps.to_csv(steps_csv, index=False)
    assert not looks_like_sglang_log(steps_csv)


def test_the_fixture_against_a_simulation_gives_sane_numbers(sim):
    _, result = sim
    s = compare_sglang_log(read_sglang_log(FIX), result.steps, result.requests).summary
    assert s["log_prefill_records"] == 4 and s["log_decode_records"] == 5
    assert s["prefill_paired"] == 4 and s["decode_paired"] >= 1
    assert s["prefill_new_tokens"]["log_mean"] == pytest.approx((512 + 2048 + 1456 + 300) / 4)
    assert s["stamp_resolution_s"] == 1.0 and s["log_span_s"] == 5.0
    assert s["decode_running_req"]["log_p50"] == 4.0
