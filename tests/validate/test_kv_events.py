"""`validate cache` on real KV-cache events: vLLM's and SGLang's event stream, replayed and set
beside hisim's KV cache.

The fixtures were encoded with msgspec 0.23 (``msgspec.json.encode`` of each batch) from the
engines' own struct definitions:

- ``fixtures/vllm_kv_events.jsonl``: vLLM 0.34.0, ``vllm/distributed/kv_events.py``
  (``KVEventBatch``, ``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``). Lines 1, 2 and 5
  as 0.34.0 publishes them (a positional batch of tagged maps; line 5 with a sha256 bytes hash,
  which msgspec writes as base64); lines 3 and 6 with ``KVCacheEvent`` made ``array_like=True``,
  the positional events vLLM published before PR #42892 (with 0.34.0's trailing fields); lines
  4 and 7 with ``EventBatch`` not ``array_like``: named fields throughout.
- ``fixtures/sglang_kv_events.jsonl``: SGLang 0.5.23, ``sglang/srt/disaggregation/kv_events.py``
  (``[ts, events, attn_dp_rank]``, media ``GPU``, ``CPU_PINNED``, ``DISK``; int64 hashes; a
  ``medium`` left at None is omitted).
"""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.estimator.calibrate import ProfileError
from hisim_jax.serving.kvcache import TIER_NAMES, KVCacheConfig
from hisim_jax.serving.workload import Request
from hisim_jax.validate.cache import (
    _RecordingCache,
    _serve,
    prefix_hashes,
    replay_cache,
    trace_cache,
)
from hisim_jax.validate.kv_events import (
    BUCKET_COLUMNS,
    EVENT_COLUMNS,
    compare_kv_events,
    read_kv_events,
    resident_timeline,
    sim_kv_event_lines,
)

FIXTURES = Path(__file__).parent / "fixtures"
VLLM = FIXTURES / "vllm_kv_events.jsonl"
SGLANG = FIXTURES / "sglang_kv_events.jsonl"
T0 = 1767225600.0  # the fixtures' first ts
BT = 4


def _write(tmp_path, *lines, name="events.jsonl"):
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def _stored(hashes, parent=None, medium="GPU", tokens=None, **kw):
    ev = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": list(range(BT * len(hashes))) if tokens is None else tokens,
        "block_size": BT,
        "lora_id": None,
        "medium": medium,
    }
    return ev | kw


def _removed(hashes, medium="GPU"):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


# ------------------------------------------------------------------------------------------
# reading


def test_reads_every_encoding_of_the_vllm_fixture():
    log = read_kv_events(VLLM)
    ev = log.events
    assert list(ev.columns) == list(EVENT_COLUMNS)
    assert log.batches == 7 and log.first_ts == T0 and log.skipped_lines == 0
    assert ev["line"].tolist() == [1, 2, 2, 3, 3, 4, 4, 4, 5, 6, 6, 7]
    assert ev["kind"].tolist() == (
        ["stored"] * 4 + ["removed"] + ["stored"] * 2 + ["removed", "stored", "removed"]
        + ["cleared", "stored"]
    )  # fmt: skip
    assert ev["medium"].tolist() == [
        "GPU", "GPU", "GPU", "CPU", "GPU", "GPU", "STORAGE", "CPU", "GPU", "GPU", None, "GPU",
    ]  # fmt: skip
    assert ev["tier"].tolist() == [
        "l1", "l1", "l1", "l2", "l1", "l1", "l3", "l2", "l1", "l1", "", "l1",
    ]  # fmt: skip
    first = ev.iloc[0]
    assert first["block_hashes"] == (101, 102) and first["parent_block_hash"] is None
    assert (first["blocks"], first["tokens"], first["block_size"]) == (2, 8, 4)
    assert ev.iloc[1]["parent_block_hash"] == 102
    assert ev["dp_rank"].unique().tolist() == [0]
    assert ev["time_s"].tolist() == pytest.approx(
        [0, 0.05, 0.05, 0.1, 0.1, 0.15, 0.15, 0.15, 0.2, 0.25, 0.25, 0.3]
    )
    # a sha256 block hash arrives as the base64 text msgspec writes for bytes: kept as a name
    assert ev.iloc[8]["block_hashes"] == ("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",)
    # the positional (line 3) and named (line 4) forms read the same fields
    assert ev.iloc[3]["block_hashes"] == (101, 102) and ev.iloc[3]["tokens"] == 8
    assert ev.iloc[7]["block_hashes"] == (102,) and ev.iloc[7]["tier"] == "l2"


def test_reads_the_sglang_fixture():
    ev = read_kv_events(SGLANG).events
    assert ev["medium"].tolist() == [None, "CPU_PINNED", "GPU", "DISK", "CPU_PINNED"]
    assert ev["tier"].tolist() == ["l1", "l2", "l1", "l3", "l2"]  # no medium: the GPU
    assert ev.iloc[0]["block_hashes"] == (-4611686018427387904, 77)  # int64, signed
    tl = resident_timeline(SGLANG)
    assert tl["l1_blocks"].tolist() == [2, 1, 1]
    assert tl["l2_blocks"].tolist() == [0, 2, 1]
    assert tl["l3_blocks"].tolist() == [0, 0, 1]


def test_older_positional_events_and_other_forms(tmp_path):
    p = _write(
        tmp_path,
        # the first vLLM releases: no medium; SGLang's attn_dp_rank; a batch without a rank
        [1.0, [["BlockStored", [1, 2], None, list(range(8)), 4, None]], 3],
        {"ts": 2.0, "events": [_stored([3], 2, medium="cpu")], "attn_dp_rank": 3},
        {"ts": 3.0, "events": [["BlockRemoved", [3], "CPU"], {"type": "AllBlocksCleared"}]},
        "",  # blank lines are skipped
        [4.0, []],
        [5.0, [_stored([9], None, medium="HBM", tokens=[[1, 2], [3, 4]], extra=1)], 3],
    )
    log = read_kv_events(p, media={"HBM": "l1"})
    ev = log.events
    assert log.batches == 5
    assert ev["tier"].tolist() == ["l1", "l2", "l2", "", "l1"]
    assert ev["dp_rank"].tolist() == [3, 3, -1, -1, 3]
    assert ev.iloc[-1]["tokens"] == 2  # SGLang's bigram pages: token pairs


def test_tokens_when_the_engine_sends_no_token_ids(tmp_path):
    p = _write(tmp_path, [1.0, [_stored([1, 2, 3], tokens=[])], 0])
    assert read_kv_events(p).events.iloc[0]["tokens"] == 3 * BT


GOOD = [1.0, [_stored([1])], 0]
BAD_LINES = [
    ("[1.0, [", "invalid JSON"),
    ('{"ts": 1.0, "ts": 2.0, "events": []}', "field 'ts': given twice"),
    ("5", "field 'batch': must be an event batch"),
    ("[1.0]", "field 'batch': an event batch is [ts, events]"),
    ('{"events": []}', "field 'ts': missing"),
    ('{"ts": 1.0}', "field 'events': missing"),
    ('["1.0", []]', "field 'ts': must be a finite number, got '1.0'"),
    ("[NaN, []]", "field 'ts': must be a finite number, got nan"),
    ("[true, []]", "field 'ts': must be a finite number, got True"),
    ("[1.0, {}]", "field 'events': must be a list of events"),
    ('[1.0, [], "0"]', "field 'data_parallel_rank': must be an integer or null, got '0'"),
    ("[1.0, [], -1]", "field 'data_parallel_rank': must be >= 0, got -1"),
    ("[1.0, [5]]", "field 'events[0]': must be an event"),
    ('[1.0, [{"type": "BlockEvicted"}]]', "field 'events[0].type': must be one of"),
    ('[1.0, [["BlockMoved", [1]]]]', "field 'events[0].type': must be one of"),
    ("[1.0, [[7, [1]]]]", "field 'events[0]': must start with the event type"),
    ('[1.0, [{"block_hashes": [1]}]]', "field 'events[0].type': missing"),
    (
        [1.0, [{k: v for k, v in _stored([1]).items() if k != "token_ids"}]],
        "field 'events[0].token_ids': missing",
    ),
    ('[1.0, [["BlockStored", [1], null]]]', "field 'events[0].token_ids': missing, got 2 values"),
    ('[1.0, [{"type": "BlockRemoved"}]]', "field 'events[0].block_hashes': missing"),
    (
        [1.0, [_stored(5, tokens=[])]],
        "field 'events[0].block_hashes': must be a list of block hashes",
    ),
    ([1.0, [_stored([1, 1.5])]], "field 'events[0].block_hashes[1]': must be a block hash"),
    ([1.0, [_stored([1], parent=[2])]], "field 'events[0].parent_block_hash': must be a block"),
    ([1.0, [_stored([1], tokens=[1, "a"])]], "field 'events[0].token_ids[1]': must be a token"),
    ([1.0, [_stored([1], block_size="4")]], "field 'events[0].block_size': must be an integer"),
    ([1.0, [_stored([1], block_size=0)]], "field 'events[0].block_size': must be >= 1, got 0"),
    ([1.0, [_stored([1], lora_id="a")]], "field 'events[0].lora_id': must be an integer or null"),
    ([1.0, [_stored([1], medium="HBM")]], "field 'events[0].medium': unknown medium"),
    ([1.0, [GOOD[1][0], _removed([1], medium=3)]], "field 'events[1].medium': must be a string"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_a_bad_line_is_one_error_naming_file_line_and_field(tmp_path, bad, message):
    p = _write(tmp_path, GOOD, bad)
    with pytest.raises(ProfileError) as e:
        read_kv_events(p)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"{p}: line 2: ")
    assert message in text


def test_bad_lines_can_be_skipped_and_an_empty_log_is_an_error(tmp_path):
    p = _write(tmp_path, GOOD, "[1.0, [", GOOD)
    log = read_kv_events(p, skip_bad_lines=True)
    assert (log.batches, log.skipped_lines) == (2, 1)
    with pytest.raises(ProfileError, match=r"no event batches \(1 bad lines skipped\)"):
        read_kv_events(_write(tmp_path, "[", "", name="bad.jsonl"), skip_bad_lines=True)
    with pytest.raises(ProfileError, match="events.jsonl"):
        read_kv_events(tmp_path / "missing" / "events.jsonl")


# ------------------------------------------------------------------------------------------
# the resident-block timeline


def test_resident_timeline_of_the_vllm_fixture():
    tl = resident_timeline(VLLM)
    assert tl["line"].tolist() == list(range(1, 8))
    # 1: GPU 101 102; 2: + 103 201; 3: CPU 101 102, GPU - 103; 4: GPU + 103, disk 101,
    # CPU - 102; 5: GPU + a sha256 hash; 6: GPU - 201, then everything cleared; 7: GPU 101
    assert tl["l1_blocks"].tolist() == [2, 4, 3, 4, 5, 0, 1]
    assert tl["l2_blocks"].tolist() == [0, 0, 2, 1, 1, 0, 0]
    assert tl["l3_blocks"].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert tl["l1_tokens"].tolist() == [4 * n for n in tl["l1_blocks"]]
    assert tl["stored_blocks"].tolist() == [2, 2, 2, 2, 1, 0, 1]
    assert tl["removed_blocks"].tolist() == [0, 0, 1, 1, 0, 7, 0]


def test_copies_of_one_hash_and_reuse_reports(tmp_path):
    # vLLM can hold two physical blocks with one hash: it publishes each store and removal
    p = _write(
        tmp_path,
        [1.0, [_stored([1, 2])], 0],
        [2.0, [_stored([1, 2])], 0],
        [3.0, [_removed([1, 2])], 0],
        [4.0, [_removed([2, 7])], 0],
    )
    tl = resident_timeline(p)
    assert tl["l1_blocks"].tolist() == [2, 2, 2, 1]
    # kv_cache_report_mode="full": the second store re-reports blocks already held (a hit)
    tl = resident_timeline(p, reuse_reports=True)
    assert tl["l1_blocks"].tolist() == [2, 2, 0, 0]


def test_several_ranks_need_one_chosen(tmp_path):
    p = _write(tmp_path, [1.0, [_stored([1])], 0], [2.0, [_stored([1]), _stored([2], 1)], 1])
    with pytest.raises(ProfileError, match="ranks 0, 1"):
        resident_timeline(p)
    assert resident_timeline(p, dp_rank=1)["l1_blocks"].tolist() == [2]
    with pytest.raises(ProfileError, match="no events of data-parallel rank 2"):
        resident_timeline(p, dp_rank=2)


# ------------------------------------------------------------------------------------------
# hisim's record of its cache


def _cfg(**kw):
    base = dict(l1_tokens=10 * BT, bytes_per_token=1.0, block_tokens=BT)
    return KVCacheConfig(**(base | kw))


def _workload(prompts, lengths=None, step_s=0.25):
    out = []
    for i, ids in enumerate(prompts):
        n = len(ids) * BT if lengths is None else lengths[i]
        out.append(Request(i, step_s * i, n, 1, tuple(ids)))
    return out


PROMPTS = [
    (i % 3, 10 + i % 4, 20 + i % 5, 30 + i % 2)[: 1 + i % 4] + ((40 + i,) if i % 5 == 0 else ())
    for i in range(40)
]
LENGTHS = [len(ids) * BT - (i % 3) for i, ids in enumerate(PROMPTS)]  # some partial blocks


def _check_record(events, cfg):
    """Each store enters a tier the block was not in, each removal leaves one it was in, a
    resident block's parent is resident in that tier, and no tier goes over capacity."""
    resident = [dict(), dict(), dict()]
    for kind, tier, h, parent, tokens in zip(
        events["kind"], events["tier"], events["block_hash"], events["parent_hash"],
        events["tokens"], strict=True,
    ):  # fmt: skip
        t = TIER_NAMES.index(tier)
        if kind == "stored":
            assert h not in resident[t]
            assert parent is None or parent in resident[t]
            resident[t][h] = tokens
        else:
            assert h in resident[t]
            del resident[t][h]
        cap = (cfg.l1_tokens, cfg.l2_tokens, cfg.l3_tokens)[t]
        assert sum(resident[t].values()) <= cap
    return [len(r) for r in resident]


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_trace_records_every_block_each_tier_gains_and_loses(write_policy):
    reqs = _workload(PROMPTS, LENGTHS)
    cfg = _cfg(l2_tokens=12 * BT, l3_tokens=30 * BT, write_policy=write_policy)
    trace = trace_cache(reqs, cfg)
    assert trace.report == replay_cache(reqs, cfg)
    ev = trace.events
    assert set(ev["kind"]) == {"stored", "removed"} and set(ev["tier"]) == {"l1", "l2", "l3"}
    final = _check_record(ev, cfg)
    # the record sees every change: its final residency is the cache's own count
    cache = _RecordingCache(cfg)
    for _ in _serve(cache, reqs):
        pass
    assert final == cache.resident_nodes
    # per-request hits and misses add up to the report's
    rq = trace.requests
    for t in TIER_NAMES:
        assert rq[f"{t}_hit_tokens"].sum() == trace.report[f"{t}_hit_tokens"]
    assert rq["miss_tokens"].sum() == trace.report["miss_tokens"]
    # evicted tokens per tier are the removals' tokens
    removed = ev[ev["kind"] == "removed"].groupby("tier")["tokens"].sum()
    for t in TIER_NAMES:
        assert removed.get(t, 0) == trace.report["evicted_tokens"][t]
    # block names chain over the prefix: a request's first block is named from the root
    assert ev.iloc[0]["block_hash"] == prefix_hashes(reqs[0].block_ids)[0]
    assert ev.iloc[0]["parent_hash"] is None


# ------------------------------------------------------------------------------------------
# comparison


def _agree(cmp):
    r, b = cmp.report, cmp.buckets
    for what in ("hit_tokens", "stored_blocks", "stored_tokens", "peak_resident_blocks",
                 "final_resident_blocks"):  # fmt: skip
        assert r[f"{what}_log"] == r[f"{what}_sim"], what
    assert r["removed_blocks_log"] == r["removed_blocks_sim"]
    for col in BUCKET_COLUMNS:
        if col.endswith("_log"):
            assert b[col].tolist() == b[col[:-4] + "_sim"].tolist(), col


@pytest.mark.parametrize("encoding", ["msgspec", "array", "object"])
def test_a_log_of_hisims_own_cache_agrees_with_its_replay(tmp_path, encoding):
    reqs = _workload(PROMPTS, LENGTHS)
    cfg = _cfg(l2_tokens=12 * BT, l3_tokens=30 * BT)
    trace = trace_cache(reqs, cfg)
    p = _write(tmp_path, *sim_kv_event_lines(trace, encoding, start_ts=T0))
    # one bucket per arrival: every request's hits compare one by one
    cmp = compare_kv_events(p, reqs, cfg, request_hashes="chain", bucket_s=0.25)
    _agree(cmp)
    r = cmp.report
    assert r["requests_matched_log"] == len(reqs) and r["note"] == ""
    assert r["hit_tokens_sim"]["total"] == sum(trace.report[f"{t}_hit_tokens"] for t in TIER_NAMES)
    assert min(r["hit_tokens_log"][t] for t in TIER_NAMES) > 0  # every tier serves hits
    assert min(r["removed_blocks_log"][t] for t in ("l1", "l2")) > 0
    assert r["log_stores_outside_prompts"] == 0
    assert r["media"] == {"CPU": "l2", "GPU": "l1", "STORAGE": "l3"}
    assert len(cmp.buckets) == 40 and list(cmp.buckets.columns) == list(BUCKET_COLUMNS)
    assert cmp.buckets["requests"].tolist() == [1] * 40
    assert cmp.buckets["prompt_tokens"].sum() == sum(LENGTHS)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), min_size=1, max_size=30),
    st.integers(2, 8),
    st.sampled_from([0, 4, 16]),
    st.sampled_from([0, 8, 40]),
    st.sampled_from(["write_through", "write_back"]),
    st.sampled_from([1, BT]),
    st.sampled_from(["msgspec", "array", "object"]),
)
def test_agreement_on_random_workloads(prompts, l1, l2, l3, policy, page, encoding):
    reqs = _workload(prompts, [len(p) * BT - (i % 2) for i, p in enumerate(prompts)])
    # every prompt fits in L1: the log side looks up every request, hisim skips what cannot fit
    cfg = _cfg(
        l1_tokens=(l1 + 5) * BT, l2_tokens=l2 * BT, l3_tokens=l3 * BT, write_policy=policy,
        page_size=page,
    )  # fmt: skip
    trace = trace_cache(reqs, cfg)
    assert trace.report["skipped_too_large"] == 0
    lines = sim_kv_event_lines(trace, encoding, start_ts=100.0)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "e.jsonl"
        p.write_text("\n".join(lines) + "\n")
        cmp = compare_kv_events(
            p, reqs, cfg, request_hashes="chain", bucket_s=0.25, log_start_s=100.0
        )
    _agree(cmp)


def test_hits_derived_from_the_vllm_fixture():
    # a workload named by the engine's hashes (block_ids are vLLM's int block hashes)
    reqs = [
        Request(0, 0.0, 8, 1, (101, 102)),  # arrives before anything is stored: a miss
        Request(1, 0.12, 12, 1, (101, 102, 103)),  # 101 102 on the GPU, 103 just removed
        Request(2, 0.27, 8, 1, (101, 102)),  # after the clear: nothing
        Request(3, 0.35, 9, 1, (101, 555, 556)),  # 101 is back on the GPU
    ]
    cfg = _cfg(page_size=BT, l2_tokens=8 * BT, l3_tokens=8 * BT)
    # (bucket edges away from the batches' times: ts near 1.8e9 s keep only ~0.2 us)
    cmp = compare_kv_events(VLLM, reqs, cfg, log_start_s=T0, bucket_s=0.14)
    r = cmp.report
    assert r["requests_matched_log"] == 4
    assert r["hit_tokens_log"] == {"l1": 12, "l2": 0, "l3": 0, "total": 12}
    assert r["hit_rate_log"] == pytest.approx(12 / 37)
    assert r["stored_blocks_log"] == {"l1": 7, "l2": 2, "l3": 1}
    assert r["removed_blocks_log"] == {"l1": 6, "l2": 2, "l3": 1}
    assert r["final_resident_blocks_log"] == {"l1": 1, "l2": 0, "l3": 0}
    assert r["peak_resident_blocks_log"] == {"l1": 5, "l2": 2, "l3": 1}
    assert (r["clears_log"], r["duplicate_stores_log"], r["unknown_removals_log"]) == (1, 0, 0)
    assert r["log_stores_outside_prompts"] == 2  # 201 and the sha256 block: no prompt's
    assert r["log_block_size"] == 4 and r["log_batches"] == 7
    assert r["media"] == {"CPU": "l2", "GPU": "l1", "STORAGE": "l3"}
    b = cmp.buckets
    assert b["requests"].tolist() == [2, 1, 1]
    assert b["hit_tokens_log"].tolist() == [8, 0, 4]
    assert b["l1_hit_tokens_log"].tolist() == [8, 0, 4]
    assert b["l1_resident_blocks_log"].tolist() == [3, 0, 1]
    assert b["l1_stored_blocks_log"].tolist() == [4, 2, 1]
    assert b["l1_removed_blocks_log"].tolist() == [1, 5, 0]
    # hisim on the same workload: its own hits, side by side
    assert r["hit_tokens_sim"]["total"] == b["hit_tokens_sim"].sum()
    json.dumps(r)  # plain values only


def test_hits_are_not_derived_when_no_hash_matches():
    reqs = [Request(0, 0.0, 8, 1, (1, 2)), Request(1, 0.2, 8, 1, (1, 2))]
    cmp = compare_kv_events(VLLM, reqs, _cfg())
    r = cmp.report
    assert r["requests_matched_log"] == 0
    assert r["hit_tokens_log"] == {"l1": None, "l2": None, "l3": None, "total": None}
    assert r["hit_rate_log"] is None and r["log_stores_outside_prompts"] is None
    assert "cannot be derived" in r["note"]
    assert r["hit_tokens_sim"]["total"] == 7  # hisim still has its own
    assert cmp.buckets["hit_tokens_log"].isna().all()
    assert r["stored_blocks_log"] == {"l1": 7, "l2": 2, "l3": 1}


def test_options_are_checked():
    reqs = [Request(0, 0.0, 8, 1, (1, 2))]
    with pytest.raises(ValueError, match="request_hashes"):
        compare_kv_events(VLLM, reqs, _cfg(), request_hashes="tokens")
    with pytest.raises(ValueError, match="bucket_s"):
        compare_kv_events(VLLM, reqs, _cfg(), bucket_s=0.0)
    with pytest.raises(ValueError, match="buckets"):
        compare_kv_events(VLLM, reqs, _cfg(), bucket_s=1e-9)
    with pytest.raises(ValueError, match="hybrid"):
        compare_kv_events(VLLM, reqs, _cfg(state_checkpoints=True))
    with pytest.raises(ValueError, match="encoding"):
        sim_kv_event_lines(trace_cache(reqs, _cfg()), "msgpack")
    with pytest.raises(ValueError, match="media"):
        read_kv_events(VLLM, media={"HBM": "gpu"})
