"""Workload readers (real traces and small fixtures), load_trace options, generators, and
property tests for the generic parsers."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.serving.workload import (
    DEFAULT_WORKLOAD,
    GEN_S_PER_TOKEN,
    LengthDist,
    Request,
    ThinkTime,
    Workload,
    WorkloadError,
    agent_sessions,
    arrival_times,
    build_workload,
    chat_sessions,
    default_agent,
    default_chat,
    load_trace,
    prefix_reuse_ratio,
    read_azure,
    read_csv,
    read_jsonl,
    read_mooncake,
    read_sharegpt,
    select,
    synthetic,
    write_csv,
    write_jsonl,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE = TRACES / "azure_llm_2023_code.csv"


def one_line(msg: str) -> str:
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.strip(), "empty error message"
    return msg


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(WorkloadError) as ei:
        fn(*args, **kwargs)
    return one_line(str(ei.value))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mooncake_line(ts=0, inp=600, out=10, ids=None) -> str:
    ids = list(range(math.ceil(inp / 512))) if ids is None else ids
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids})


def assert_well_formed(w: Workload) -> None:
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == sorted(arrivals)
    assert [r.request_id for r in w.requests] == list(range(len(w)))
    for r in w.requests:
        assert r.input_len >= 1 and r.output_len >= 1
        assert r.block_ids == () or len(r.block_ids) == math.ceil(r.input_len / w.block_tokens)


# ------------------------------------------------------------------------------------------------
# real traces


@pytest.fixture(scope="module")
def mooncake() -> Workload:
    if not MOONCAKE.is_file():
        pytest.skip(f"{MOONCAKE} not present")
    return read_mooncake(MOONCAKE)


def test_mooncake_trace_matches_its_readme(mooncake):
    s = mooncake.summary()
    assert s["requests"] == 12_031
    assert s["input_len_mean"] == pytest.approx(12_035, abs=1)
    assert s["output_len_mean"] == pytest.approx(343, abs=1)
    assert s["duration_s"] == pytest.approx(3_537, abs=1)
    assert s["prefix_reuse_ratio"] == pytest.approx(0.366, abs=0.001)
    assert mooncake.block_tokens == 512 and mooncake.skipped_lines == 0
    assert mooncake.source.startswith("mooncake:")
    assert_well_formed(mooncake)
    # the last block of a prompt is usually partial
    partial = sum(r.input_len % 512 != 0 for r in mooncake.requests)
    assert partial > 0.9 * len(mooncake)
    # arrivals come in bursts 3 s apart, and every prompt starts with the same block
    assert len({r.arrival_s for r in mooncake.requests}) == 1_180
    assert {r.block_ids[0] for r in mooncake.requests} == {0}


def test_mooncake_reuse_definitions_coincide(mooncake):
    """The prefix-chain count and the 'id seen earlier anywhere' count agree on this trace."""
    seen: set[int] = set()
    hits = total = 0
    for r in mooncake.requests:
        hits += sum(b in seen for b in r.block_ids)
        total += len(r.block_ids)
        seen.update(r.block_ids)
    assert hits / total == pytest.approx(prefix_reuse_ratio(mooncake.requests), abs=1e-12)


def test_azure_code_trace():
    if not AZURE.is_file():
        pytest.skip(f"{AZURE} not present")
    w = read_azure(AZURE)
    # The README says 8,818 rows: that is `wc -l` minus the header, but the file has no final
    # newline, so there are 8,819 data rows.
    assert len(w) == 8_819
    assert 57 * 60 <= w.summary()["duration_s"] < 58 * 60
    assert w.requests[0].arrival_s == 0.0
    # 18:17:04.0319600 - 18:17:03.9799600: sub-second digits are kept
    assert w.requests[1].arrival_s == pytest.approx(0.052, abs=1e-9)
    assert all(r.block_ids == () for r in w.requests)
    assert w.summary()["prefix_reuse_ratio"] == 0.0
    assert_well_formed(w)


# ------------------------------------------------------------------------------------------------
# Mooncake fixtures


def test_mooncake_fixture_parses_and_sorts(tmp_path):
    p = write_lines(
        tmp_path / "m.jsonl",
        [
            mooncake_line(1500, 600, 5, [1, 2]),
            "",
            mooncake_line(0, 512, 7, [1]),
            "   ",
            mooncake_line(1500, 1, 1, [9]),
        ],
    )
    w = read_mooncake(p)
    assert [(r.arrival_s, r.input_len, r.output_len, r.block_ids) for r in w.requests] == [
        (0.0, 512, 7, (1,)),
        (1.5, 600, 5, (1, 2)),  # ties keep file order
        (1.5, 1, 1, (9,)),
    ]
    assert_well_formed(w)
    assert w.summary()["prefix_reuse_ratio"] == pytest.approx(1 / 4)


BAD_MOONCAKE = [
    ("{not json", None, "invalid JSON"),
    ("[1, 2, 3]", None, "expected a JSON object"),
    (json.dumps({"timestamp": 0, "input_length": 5, "hash_ids": [1]}), "output_length", "missing"),
    (mooncake_line(inp=-5, ids=[]), "input_length", "-5"),
    (mooncake_line(out=0), "output_length", "0"),
    (mooncake_line(ts=-1), "timestamp", "-1"),
    (mooncake_line(ts="soon"), "timestamp", "'soon'"),
    (mooncake_line(out="12"), "output_length", "'12'"),
    (mooncake_line(out=True), "output_length", "True"),
    (mooncake_line(out=1.5), "output_length", "1.5"),
    (mooncake_line(ids="abc"), "hash_ids", "'abc'"),
    (mooncake_line(ids=[1, "x"]), "hash_ids", "'x'"),
    (mooncake_line(inp=600, ids=[1]), "hash_ids", "got 1"),
    (
        '{"timestamp": NaN, "input_length": 1, "output_length": 1, "hash_ids": [1]}',
        "timestamp",
        "nan",
    ),
]


@pytest.mark.parametrize("bad, field, value", BAD_MOONCAKE)
def test_mooncake_bad_line_is_one_line_error(tmp_path, bad, field, value):
    p = write_lines(tmp_path / "m.jsonl", [mooncake_line(), "", bad, mooncake_line()])
    msg = error_of(read_mooncake, p)
    assert msg.startswith(f"{p}: line 3: ")
    if field:
        assert f"field '{field}'" in msg
    assert value in msg
    w = read_mooncake(p, skip_bad_lines=True)
    assert len(w) == 2 and w.skipped_lines == 1


def test_mooncake_all_bad_or_empty(tmp_path):
    p = write_lines(tmp_path / "m.jsonl", ["{", "nope"])
    assert "no requests (2 bad lines skipped)" in error_of(read_mooncake, p, skip_bad_lines=True)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    assert "no requests" in error_of(read_mooncake, empty)


def test_missing_file_and_directory(tmp_path):
    assert (
        error_of(read_mooncake, tmp_path / "nope.jsonl")
        == f"{tmp_path / 'nope.jsonl'}: no such file"
    )
    assert "is a directory" in error_of(read_azure, tmp_path)


def test_invalid_utf8_and_deep_nesting_are_bad_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(
        mooncake_line().encode()
        + b"\n\xff\xfe{\n"
        + b"[" * 100_000
        + b"\n"
        + mooncake_line().encode()
    )
    assert "line 2: invalid JSON" in error_of(read_mooncake, p)
    w = read_mooncake(p, skip_bad_lines=True)
    assert len(w) == 2 and w.skipped_lines == 2


# ------------------------------------------------------------------------------------------------
# Azure fixtures

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def test_azure_fixture_precision_zero_output_and_order(tmp_path):
    p = write_lines(
        tmp_path / "a.csv",
        [
            AZURE_HEADER,
            "2023-11-16 18:15:46.6805900,100,5",
            "2023-11-16 18:15:46.6805901,200,0",
            "2023-11-16 18:15:45.5,300,7",
            "2023-11-17 00:00:00,400,8",
        ],
    )
    w = read_azure(p)
    got = [(r.arrival_s, r.input_len, r.output_len) for r in w.requests]
    assert got[0] == (0.0, 300, 7)  # arrivals count from the earliest row
    assert got[1][0] == pytest.approx(1.18059, abs=1e-12)
    assert got[2][0] - got[1][0] == pytest.approx(1e-7, abs=1e-9)  # 100 ns resolution
    assert got[2][2] == 1  # 0 generated tokens -> 1
    assert got[3][0] == pytest.approx(86400 - (18 * 3600 + 15 * 60 + 45.5), abs=1e-9)
    assert w.block_tokens == 512 and all(r.block_ids == () for r in w.requests)


def test_azure_timezone_offsets(tmp_path):
    p = write_lines(
        tmp_path / "a.csv",
        [AZURE_HEADER, "2024-05-10 00:00:00+00:00,1,1", "2024-05-10T02:00:01.5+02:00,1,1"],
    )
    assert [r.arrival_s for r in read_azure(p).requests] == [0.0, 1.5]


@pytest.mark.parametrize(
    "row, field, value",
    [
        ("2023-11-16 18:15:46.1,abc,5", "ContextTokens", "'abc'"),
        ("2023-11-16 18:15:46.1,0,5", "ContextTokens", "'0'"),
        ("2023-11-16 18:15:46.1,10,-3", "GeneratedTokens", "'-3'"),
        ("2023-13-16 18:15:46.1,10,3", "TIMESTAMP", "2023-13-16"),
        ("yesterday,10,3", "TIMESTAMP", "'yesterday'"),
        ("2023-11-16 18:15:46.1,10", "GeneratedTokens", "missing"),
    ],
)
def test_azure_bad_rows(tmp_path, row, field, value):
    p = write_lines(tmp_path / "a.csv", [AZURE_HEADER, "2023-11-16 18:15:46.0,1,1", row])
    msg = error_of(read_azure, p)
    assert msg.startswith(f"{p}: line 3: field '{field}'")
    assert value in msg
    w = read_azure(p, skip_bad_lines=True)
    assert len(w) == 1 and w.skipped_lines == 1


def test_azure_missing_column_and_extra_cells(tmp_path):
    p = write_lines(tmp_path / "a.csv", ["TIMESTAMP,ContextTokens", "2023-11-16 18:15:46.0,1"])
    msg = error_of(read_azure, p)
    assert "line 1: field 'GeneratedTokens': missing column" in msg
    p = write_lines(tmp_path / "b.csv", [AZURE_HEADER, "2023-11-16 18:15:46.0,1,1,9"])
    assert "line 2: expected 3 fields" in error_of(read_azure, p)


# ------------------------------------------------------------------------------------------------
# generic JSONL / CSV


def test_generic_jsonl_fields_and_defaults(tmp_path):
    p = write_lines(
        tmp_path / "g.jsonl",
        [
            json.dumps({"timestamp_ms": 2500, "input_len": 20, "output_len": 3}),
            json.dumps(
                {
                    "arrival_s": 1.0,
                    "input_len": 20,
                    "output_len": 4,
                    "block_ids": [7, 8],
                    "session_id": 3,
                    "turn": 2,
                }
            ),
            json.dumps({"arrival_s": 0.5, "input_len": 1, "output_len": 1, "block_ids": None}),
        ],
    )
    w = read_jsonl(p, block_tokens=16)
    assert w.requests == (
        Request(0, 0.5, 1, 1),
        Request(1, 1.0, 20, 4, (7, 8), 3, 2),
        Request(2, 2.5, 20, 3),
    )
    assert w.block_tokens == 16 and w.source == f"jsonl:{p}"


@pytest.mark.parametrize(
    "rec, field, value",
    [
        (
            {"arrival_s": 1, "timestamp_ms": 5, "input_len": 1, "output_len": 1},
            "arrival_s",
            "not both",
        ),
        ({"input_len": 1, "output_len": 1}, "arrival_s", "missing"),
        (
            {"arrival_s": 1, "input_len": 40, "output_len": 1, "block_ids": [1]},
            "block_ids",
            "got 1",
        ),
        ({"arrival_s": 1, "input_len": 1, "output_len": 1, "session_id": -2}, "session_id", "-2"),
        ({"arrival_s": 1, "input_len": 1, "output_len": 1, "turn": "x"}, "turn", "'x'"),
        ({"arrival_s": 1e400, "input_len": 1, "output_len": 1}, "arrival_s", "inf"),
        ({"arrival_s": 1, "input_len": 2**70, "output_len": 1}, "input_len", "2**62"),
        (
            {"arrival_s": 1, "input_len": 1, "output_len": 1, "block_ids": [2**64]},
            "block_ids",
            "int64",
        ),
    ],
)
def test_generic_jsonl_bad_records(tmp_path, rec, field, value):
    p = write_lines(tmp_path / "g.jsonl", [json.dumps(rec)])
    msg = error_of(read_jsonl, p, block_tokens=16)
    assert msg.startswith(f"{p}: line 1: field '{field}'")
    assert value in msg


def test_generic_csv_fields_and_errors(tmp_path):
    p = write_lines(
        tmp_path / "g.csv",
        [
            "timestamp_ms,input_len,output_len,block_ids,session_id,turn,comment",
            '1000,20,3,"[1, 2]",4,1,hello',
            "0,5,2,,,,",
            "",
            "500,5.0,2,[],,,",
        ],
    )
    w = read_csv(p, block_tokens=16)
    assert w.requests == (
        Request(0, 0.0, 5, 2),
        Request(1, 0.5, 5, 2),
        Request(2, 1.0, 20, 3, (1, 2), 4, 1),
    )
    bad = write_lines(tmp_path / "b.csv", ["arrival_s,input_len,output_len,block_ids", "1,2,3,[1"])
    msg = error_of(read_csv, bad)
    assert msg.startswith(f"{bad}: line 2: field 'block_ids'") and "'[1'" in msg
    no_time = write_lines(tmp_path / "c.csv", ["input_len,output_len", "1,1"])
    assert "line 1: field 'arrival_s': missing column (or timestamp_ms)" in error_of(
        read_csv, no_time
    )


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    p = write_lines(
        tmp_path / "g.csv",
        ["arrival_s,input_len,output_len,note", '0,1,1,"two', 'lines"', "1,oops,1,x"],
    )
    assert error_of(read_csv, p).startswith(f"{p}: line 4: field 'input_len'")


# ------------------------------------------------------------------------------------------------
# ShareGPT


def _conv(*msgs):
    return [{"from": f, "value": v} for f, v in msgs]


def test_sharegpt_turns_lengths_blocks_and_arrivals(tmp_path):
    data = [
        {
            "id": "a",
            "conversations": _conv(
                ("system", "s" * 40),
                ("human", "h" * 100),
                ("gpt", "g" * 401),
                ("human", "h" * 30),
                ("gpt", "g" * 8),
            ),
        },
        {"id": "b", "conversations": _conv(("human", "only a question"))},
        {
            "id": "c",
            "messages": [
                {"role": "user", "content": "x" * 9},
                {"role": "assistant", "content": "y"},
            ],
        },
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    w = read_sharegpt(p, block_tokens=16, rate=2.0, seed=1)
    by = {(r.session_id, r.turn): r for r in w.requests}
    assert set(by) == {(0, 0), (0, 1), (2, 0)}
    t0, t1 = by[0, 0], by[0, 1]
    assert (t0.input_len, t0.output_len) == (10 + 25, 101)  # ceil(40/4) + ceil(100/4), ceil(401/4)
    assert (t1.input_len, t1.output_len) == (35 + 101 + 8, 2)
    assert (by[2, 0].input_len, by[2, 0].output_len) == (3, 1)
    full0 = t0.input_len // 16
    assert t1.block_ids[:full0] == t0.block_ids[:full0]
    assert t1.block_ids[full0] != t0.block_ids[full0]  # turn 0's partial block is not shared
    assert t1.arrival_s >= t0.arrival_s + t0.output_len * GEN_S_PER_TOKEN
    assert_well_formed(w)
    again = read_sharegpt(p, block_tokens=16, rate=2.0, seed=1)
    assert again == w
    assert read_sharegpt(p, block_tokens=16, rate=2.0, seed=2).requests != w.requests


def test_sharegpt_bad_conversations(tmp_path):
    p = tmp_path / "sg.json"
    good = {"conversations": _conv(("human", "hi"), ("gpt", "yo"))}
    p.write_text(json.dumps([good, {"conversations": [{"from": "alien", "value": "x"}]}]))
    msg = error_of(read_sharegpt, p)
    assert msg.startswith(f"{p}: conversation 1: message 0: field 'from'") and "'alien'" in msg
    w = read_sharegpt(p, skip_bad_lines=True)
    assert len(w) == 1 and w.skipped_lines == 1
    p.write_text('[{"conversations": ]')
    assert error_of(read_sharegpt, p).startswith(f"{p}: line 1: invalid JSON")
    p.write_text('{"conversations": []}')
    assert "expected a JSON list" in error_of(read_sharegpt, p)


# ------------------------------------------------------------------------------------------------
# load_trace


@pytest.fixture
def ten(tmp_path) -> Path:
    lines = [mooncake_line(ts=1000 + 500 * i, inp=10 + i, out=1, ids=[i]) for i in range(10)]
    return write_lines(tmp_path / "m.jsonl", lines)


def test_load_trace_rebases_and_renumbers(ten):
    w = load_trace(ten, "mooncake")
    assert [r.arrival_s for r in w.requests] == [0.5 * i for i in range(10)]
    assert_well_formed(w)


def test_load_trace_window_limit_and_rate(ten):
    w = load_trace(ten, "mooncake", start_s=1.0, end_s=3.0)
    assert [r.input_len for r in w.requests] == [12, 13, 14, 15]  # [1.0, 3.0) from the start
    assert [r.request_id for r in w.requests] == [0, 1, 2, 3]
    assert w.requests[0].arrival_s == 0.0
    w = load_trace(ten, "mooncake", start_s=1.0, limit=2)
    assert [r.input_len for r in w.requests] == [12, 13]
    base = load_trace(ten, "mooncake")
    fast = load_trace(ten, "mooncake", rate_scale=2.0)
    gaps = np.diff([r.arrival_s for r in base.requests])
    np.testing.assert_allclose(np.diff([r.arrival_s for r in fast.requests]), gaps / 2)
    assert [r.block_ids for r in fast.requests] == [r.block_ids for r in base.requests]


def test_load_trace_errors(ten, tmp_path):
    assert error_of(load_trace, ten, "parquet").startswith(f"{ten}: unknown trace format")
    assert (
        error_of(load_trace, tmp_path / "x.csv", "azure") == f"{tmp_path / 'x.csv'}: no such file"
    )
    assert "selects no requests" in error_of(load_trace, ten, "mooncake", start_s=100.0)
    assert "rate_scale" in error_of(load_trace, ten, "mooncake", rate_scale=0)
    assert "limit" in error_of(load_trace, ten, "mooncake", limit=0)
    assert "end_s" in error_of(load_trace, ten, "mooncake", start_s=2.0, end_s=1.0)
    assert "takes no option 'block_tokens'" in error_of(
        load_trace, ten, "mooncake", block_tokens=16
    )


def test_load_trace_passes_reader_options(tmp_path):
    p = write_lines(tmp_path / "g.csv", ["arrival_s,input_len,output_len", "3,1,1", "5,1,1"])
    w = load_trace(p, "CSV", block_tokens=32)
    assert w.block_tokens == 32 and [r.arrival_s for r in w.requests] == [0.0, 2.0]


# ------------------------------------------------------------------------------------------------
# generators


def test_arrival_times_rates_and_burstiness():
    t = arrival_times(5000, 4.0, "poisson", rng=0)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert (len(t) - 1) / t[-1] == pytest.approx(4.0, rel=0.10)
    for cv in (0.5, 2.0):
        g = np.diff(arrival_times(5000, 4.0, "gamma", cv=cv, rng=1))
        assert g.mean() == pytest.approx(0.25, rel=0.10)
        assert g.std() / g.mean() == pytest.approx(cv, rel=0.15)
    np.testing.assert_allclose(np.diff(arrival_times(5, 2.0, "constant")), 0.5)
    assert arrival_times(0, 1.0).shape == (0,)
    with pytest.raises(ValueError, match="arrival process"):
        arrival_times(3, 1.0, "weibull")
    with pytest.raises(ValueError, match="rate"):
        arrival_times(3, 0.0)


def test_length_dists():
    rng = np.random.default_rng(0)
    assert set(LengthDist.fixed(7).sample(100, rng).tolist()) == {7}
    u = LengthDist.uniform(3, 6).sample(2000, rng)
    assert set(u.tolist()) == {3, 4, 5, 6}
    ln = LengthDist.lognormal(600, 0.5).sample(20_000, rng)
    assert ln.dtype == np.int64 and ln.min() >= 1
    assert ln.mean() == pytest.approx(600, rel=0.03)
    assert np.median(ln) == pytest.approx(600 * math.exp(-0.125), rel=0.03)
    clipped = LengthDist.lognormal(600, 2.0, clip_min=10, clip_max=1000).sample(5000, rng)
    assert clipped.min() == 10 and clipped.max() == 1000
    e = LengthDist.empirical([5, 50, 500]).sample(1000, rng)
    assert set(e.tolist()) == {5, 50, 500}
    assert LengthDist.empirical(np.array([1, 2])).values == (1, 2)
    with pytest.raises(ValueError, match="kind"):
        LengthDist("normal")
    with pytest.raises(ValueError, match="low <= high"):
        LengthDist.uniform(5, 2)


def test_generators_are_deterministic():
    for make in (
        lambda s: synthetic(200, 5.0, seed=s),
        lambda s: chat_sessions(30, 1.0, seed=s),
        lambda s: agent_sessions(5, 1.0, seed=s),
        default_chat,
    ):
        a, b, c = make(0), make(0), make(1)
        assert a == b
        assert a.requests != c.requests


def _by_session(w: Workload) -> dict[int, list[Request]]:
    out: dict[int, list[Request]] = {}
    for r in w.requests:
        out.setdefault(r.session_id, []).append(r)
    for turns in out.values():
        turns.sort(key=lambda r: r.turn)
        assert [r.turn for r in turns] == list(range(len(turns)))
    return out


def test_chat_sessions_grow_and_share_prefix_blocks():
    bt = 32
    w = chat_sessions(50, 2.0, block_tokens=bt, seed=3)
    assert_well_formed(w)
    sessions = _by_session(w)
    assert len(sessions) == 50
    for turns in sessions.values():
        for prev, cur in zip(turns, turns[1:], strict=False):
            full = prev.input_len // bt
            assert cur.block_ids[:full] == prev.block_ids[:full]
            assert cur.input_len > prev.input_len + prev.output_len
            assert cur.arrival_s >= prev.arrival_s + prev.output_len * GEN_S_PER_TOKEN
    # no system prompt: different sessions share nothing
    firsts = [turns[0].block_ids[0] for turns in sessions.values()]
    assert len(set(firsts)) == len(firsts)
    assert 0.3 < w.summary()["prefix_reuse_ratio"] < 0.95


def test_chat_sessions_max_context_and_system_prompt():
    w = chat_sessions(40, 2.0, system_prompt_len=200, block_tokens=64, max_context=2000, seed=0)
    assert all(r.input_len + r.output_len <= 2000 for r in w.requests)
    assert all(r.input_len > 200 for r in w.requests)
    assert len({r.block_ids[:3] for r in w.requests}) == 1  # 200 // 64 = 3 shared blocks
    assert len({r.block_ids[3] for r in w.requests if r.turn == 0}) == sum(
        r.turn == 0 for r in w.requests
    )


def test_agent_sessions_prefix_grows():
    w = agent_sessions(8, 0.5, calls=LengthDist.uniform(4, 10), shared_prefix_len=1024, seed=2)
    assert_well_formed(w)
    assert len({r.block_ids[:16] for r in w.requests}) == 1  # 1024 / 64 shared blocks
    for turns in _by_session(w).values():
        assert 4 <= len(turns) <= 10
        for prev, cur in zip(turns, turns[1:], strict=False):
            assert cur.input_len > prev.input_len + prev.output_len
            full = prev.input_len // 64
            assert cur.block_ids[:full] == prev.block_ids[:full]
    assert w.summary()["prefix_reuse_ratio"] > 0.6


def test_agent_defaults_follow_the_published_trace():
    """The built-in agent workload against TraceLab's statistics (workload.AGENT_*): outputs of
    median ~210 tokens, tool waits of median ~0.3 s, most calls reusing nearly their whole
    context (TraceLab: 96% of input tokens hit the prefix cache), every call's wait kept."""
    w = default_agent(seed=0)
    later = [r for r in w.requests if r.turn > 0]
    assert 150 <= np.median([r.output_len for r in w.requests]) <= 280
    waits = np.array([r.think_s for r in later])
    assert (waits >= 0).all() and 0.1 < np.median(waits) < 3.0
    assert w.summary()["prefix_reuse_ratio"] > 0.9
    assert max(r.input_len + r.output_len for r in w.requests) <= 131072
    assert w.summary()["sessions"] == 20


def test_think_time_distributions_parse_sample_and_reject_bad_specs(tmp_path):
    rng = np.random.default_rng(0)
    assert (ThinkTime.parse("fixed:2.5").sample(4, rng) == 2.5).all()
    assert abs(ThinkTime.parse("exponential:10").sample(20000, rng).mean() - 10) < 0.5
    ln = ThinkTime.parse("lognormal:20:2.9").sample(200000, rng)
    assert abs(np.median(ln) - 20 / np.exp(2.9**2 / 2)) < 0.05  # the mean is 20
    f = tmp_path / "gaps.csv"
    f.write_text("think_s\n1.0\n2.0\n")
    assert set(ThinkTime.parse(f"empirical:{f}").sample(50, rng)) <= {1.0, 2.0}
    for bad in ("gamma:3", "fixed:-1", "lognormal:5:0", "exponential:x", "fixed"):
        with pytest.raises(WorkloadError, match="think time"):
            ThinkTime.parse(bad)
    f.write_text("1.0\nsoon\n")
    with pytest.raises(WorkloadError, match="line 2"):
        ThinkTime.parse(f"empirical:{f}")


def test_synthetic_system_prompt_shared():
    w = synthetic(300, 10.0, system_prompt_len=130, block_tokens=64, seed=0)
    assert len({r.block_ids[:2] for r in w.requests}) == 1
    assert all(r.input_len > 130 for r in w.requests)
    alone = synthetic(300, 10.0, block_tokens=64, seed=0)
    assert alone.summary()["prefix_reuse_ratio"] == 0.0
    fixed = synthetic(
        100, 1.0, LengthDist.fixed(100), LengthDist.fixed(7), "constant", system_prompt_len=28
    )
    assert {(r.input_len, r.output_len) for r in fixed.requests} == {(128, 7)}
    np.testing.assert_allclose(np.diff([r.arrival_s for r in fixed.requests]), 1.0)


def test_default_chat():
    w = DEFAULT_WORKLOAD()
    assert w == default_chat(0)
    assert 800 <= len(w) <= 1200 and w.block_tokens == 64
    assert len({r.block_ids[:4] for r in w.requests}) == 1  # 256-token system prompt
    assert len({r.session_id for r in w.requests}) == 200
    assert_well_formed(w)


def test_chat_generator_makes_10k_requests():
    # speed is measured by scripts/bench_simulator.py, not by tests
    w = chat_sessions(2000, 5.0, seed=0)
    assert len(w) > 9000


def test_summary_and_select_on_small_workloads():
    w = build_workload([Request(9, 5.0, 10, 2, (1,)), Request(9, 1.0, 20, 4, (1, 2))], 16, "test")
    assert [r.request_id for r in w.requests] == [0, 1] and w.requests[0].arrival_s == 1.0
    s = w.summary()
    assert s["requests"] == 2 and s["duration_s"] == 4.0 and s["request_rate_per_s"] == 0.25
    assert s["input_len_mean"] == 15 and s["prefix_reuse_ratio"] == pytest.approx(1 / 3)
    assert Workload((), 16, "empty").summary()["requests"] == 0
    assert select(w, rate_scale=4.0).requests[1].arrival_s == 1.0


# ------------------------------------------------------------------------------------------------
# property tests for the generic parsers

BT = 16


@st.composite
def workloads(draw) -> Workload:
    reqs = []
    for _ in range(draw(st.integers(1, 12))):
        inp = draw(st.integers(1, 120))
        ids = ()
        if draw(st.booleans()):
            n = math.ceil(inp / BT)
            ids = tuple(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)))
        reqs.append(
            Request(
                0,
                draw(st.floats(0, 1e9, allow_nan=False, allow_infinity=False)),
                inp,
                draw(st.integers(1, 2**40)),
                ids,
                draw(st.integers(-1, 2**40)),
                draw(st.integers(0, 1000)),
            )
        )
    return build_workload(reqs, BT, "hypothesis")


@settings(max_examples=60, deadline=None)
@given(workloads(), st.sampled_from(["jsonl", "csv"]))
def test_generic_round_trip(w, fmt):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"w.{fmt}"
        (write_jsonl if fmt == "jsonl" else write_csv)(w, p)
        back = (read_jsonl if fmt == "jsonl" else read_csv)(p, block_tokens=BT)
    assert back.requests == w.requests


_FIELDS = [
    "arrival_s",
    "timestamp_ms",
    "input_len",
    "output_len",
    "block_ids",
    "session_id",
    "turn",
]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
_junk_records = st.dictionaries(st.sampled_from([*_FIELDS, "x"]), _json_values, max_size=7)
_junk_lines = st.lists(
    st.one_of(
        st.text(max_size=40),
        _junk_records.map(json.dumps),
        st.builds(
            lambda a, i, o: json.dumps({"arrival_s": a, "input_len": i, "output_len": o}),
            st.floats(-1, 10),
            st.integers(-2, 5),
            st.integers(-2, 5),
        ),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(_junk_lines, st.booleans())
def test_jsonl_junk_only_raises_workload_error(lines, skip):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "junk.jsonl"
        data = "\n".join(lines).encode("utf-8")
        p.write_bytes(data)
        try:
            w = read_jsonl(p, block_tokens=BT, skip_bad_lines=skip)
        except WorkloadError as e:
            one_line(str(e))
            return
    assert_well_formed(w)
    if skip:
        n_lines = sum(1 for line in data.split(b"\n") if line.strip())
        assert len(w) + w.skipped_lines == n_lines


_cells = st.one_of(
    st.text(max_size=12),
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True).map(repr),
    st.lists(st.integers(), max_size=3).map(json.dumps),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(st.text(max_size=40), st.lists(_cells, max_size=8).map(",".join)), max_size=8
    ),
    st.booleans(),
)
def test_csv_junk_only_raises_workload_error(lines, skip):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "junk.csv"
        p.write_text("\n".join([",".join(_FIELDS[:1] + _FIELDS[2:]), *lines]), encoding="utf-8")
        try:
            w = read_csv(p, block_tokens=BT, skip_bad_lines=skip)
        except WorkloadError as e:
            one_line(str(e))
            return
    assert_well_formed(w)
