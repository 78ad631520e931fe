"""FlashAttention-3's grid (attention/fa3.py): packed-GQA tiles against an enumeration of its
m-blocks, the split heuristic against a reference loop of heuristics.h, and what it changes
in a step: decode rows in a mixed batch no longer pay a 128-row tile per query head."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hisim_jax.estimator import Estimator
from hisim_jax.estimator.attention import fa3


def enumerate_tiles(c, n, groups, bm, bn=128):
    """Key tiles and keys read per KV head of one request, m-block by m-block (packed rows,
    causal)."""
    rows = n * groups
    total = keys = 0
    for i in range(math.ceil(rows / bm)):
        last_row = min(rows, (i + 1) * bm) - 1
        visible = c + last_row // groups + 1
        total += math.ceil(visible / bn)
        keys += visible
    return total, math.ceil(rows / bm), keys


@settings(max_examples=60, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 700)), min_size=1, max_size=6),
    groups=st.sampled_from([1, 2, 4, 8]),
)
def test_packed_tiles_match_enumeration(reqs, groups):
    c = np.array([r[0] for r in reqs], float)
    n = np.array([r[1] for r in reqs], float)
    kv = 2.0
    f = fa3.features(c, n, np.ones_like(c), kv * groups, kv, 0.0, np)
    bm = 64 if n.max() * groups <= 64 else 128
    assert f["fa3_rows"] == bm
    exact = [enumerate_tiles(ci, ni, groups, bm) for ci, ni in zip(c, n, strict=True)]
    blocks = sum(e[1] for e in exact)
    assert f["fa3_blocks"] == kv * blocks
    # the closed form spreads an m-block's query positions evenly: within a tile (and its
    # query positions' keys) per m-block
    assert abs(f["fa3_work"] / (kv * 128) - sum(e[0] for e in exact)) <= blocks
    assert abs(f["fa3_keys"] / kv - sum(e[2] for e in exact)) <= blocks * (bm / groups + 1)
    if n.max() == 1:  # decodes read exactly their keys
        assert f["fa3_keys"] == kv * sum(c + 1)


def reference_splits(total_mblocks, sms, n_blocks, max_splits=128):
    if total_mblocks >= 0.8 * sms or n_blocks <= 4:
        return 1
    max_splits = min(max_splits, sms, n_blocks)
    eff = [
        (total_mblocks * s / sms) / math.ceil(total_mblocks * s / sms)
        for s in range(1, max_splits + 1)
    ]
    best = max(eff)
    return next(s for s, e in enumerate(eff, 1) if e >= 0.85 * best)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 200), st.sampled_from([78, 108, 132, 148]), st.integers(1, 300))
def test_split_heuristic_matches_reference(total_mblocks, sms, n_blocks):
    got = fa3.num_splits(float(total_mblocks), float(sms), float(n_blocks), np)
    assert got == reference_splits(total_mblocks, sms, n_blocks)


def test_decode_rows_in_a_mixed_batch_cost_about_what_they_cost_alone():
    decodes = [(714, 1)] * 33
    mixed = decodes + [(576, 16)]
    times = {}
    for be in ("fa2", "fa3"):
        est = Estimator("codellama-34b-instruct", "h100-sxm", 2, backend=be)
        times[be] = [est.breakdown_s(b)["attention"] for b in (decodes, mixed)]
    # FA2 runs a mixed batch through its prefill grid: every decode row a 128-row tile per
    # query head; FA3 packs a KV head's 8 query heads of a decode into one tile's rows (a
    # 128-row tile now, not 64: the chunk's 16 x 8 packed rows set the call's tile)
    assert times["fa2"][1] > 3 * times["fa2"][0]
    assert times["fa3"][1] < 2 * times["fa3"][0]
    assert times["fa3"][1] < times["fa2"][1] / 2


def test_calibration_names_its_attention_model():
    from hisim_jax.estimator.roofline import calibration_path, read_calibration

    assert read_calibration(None, "h100-sxm")[1] == "fa2"  # the FA2 reference profiles
    assert read_calibration(calibration_path("h100-sxm", "vllm"))[1] == "fa3"
    assert read_calibration(None, "h100-sxm", "vllm")[1] == "fa3"  # the engine's default
    assert (
        Estimator(
            "llama-3.2-1b", "h100-sxm", calibration=calibration_path("h100-sxm", "vllm")
        ).backend.name
        == "fa3"
    )


def test_a_gpu_without_engine_tables_takes_the_h100_production_fit():
    from hisim_jax.estimator.roofline import calibration_path

    assert calibration_path("rtx-4090", "vllm").name == "h100-sxm.vllm.json"
    assert calibration_path("b200", "sglang").name == "b200.sglang.json"
    assert calibration_path("rtx-4090").name == "h100-sxm.json"  # estimate's reference default
