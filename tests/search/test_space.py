"""The space file: ranges, aliases, engine-only options, budgets, SLOs, errors."""

from __future__ import annotations

import pytest

from hisim_jax.search.space import expand, space_from_dict
from hisim_jax.specs import SpecError


def _space(**doc):
    return space_from_dict(doc, "space.yaml")


def test_ranges_linear_log_and_step():
    s = _space(axes={"l2_gb": {"min": 0, "max": 100, "step": 50},
                     "token_budget": {"min": 1024, "max": 16384, "num": 5, "scale": "log"}})  # fmt: skip
    axes = dict(s.axes)
    assert axes["l2_gb"] == (0, 50, 100)
    assert axes["token_budget"] == (1024, 2048, 4096, 8192, 16384)
    assert dict(_space(axes={"rate_scale": {"min": 0.5, "max": 1.5, "num": 3}}).axes)[
        "rate_scale"
    ] == (0.5, 1.0, 1.5)


@pytest.mark.parametrize(
    "axes, words",
    [
        ({"l2_gb": {"min": 0, "max": 10}}, "exactly one of step or num"),
        ({"l2_gb": {"min": 0, "max": 10, "num": 3, "scale": "log"}}, "min > 0"),
        ({"l2_gb": {"min": 5, "max": 1, "num": 3}}, "below min"),
        ({"l2_gb": {"min": 0, "max": 10, "num": 3, "by": 2}}, "unknown key 'by'"),
        ({"l2_gb": [0, -3]}, "axes.l2_gb[1]"),
        ({"trace": ["a.jsonl"]}, "workload is fixed"),
        ({"warp_speed": [1]}, "axes.warp_speed is not an option"),
        ({"token_budget": [2048], "chunked_prefill_size": [4096]}, "keep one"),
        ({"engine": ["tgi"]}, "axes.engine[0]"),
        ({"hardware": ["h100-sxm", "h999"]}, "axes.hardware[1]: h999: no such file"),
    ],
)
def test_bad_axes_name_the_axis(axes, words):
    with pytest.raises(SpecError, match=None) as e:
        _space(axes=axes)
    msg = str(e.value)
    assert msg.startswith("space.yaml: ") and words in msg and "\n" not in msg


def test_aliases_follow_the_engine_and_other_engines_options_are_dropped():
    s = _space(axes={"engine": ["sglang", "vllm"], "token_budget": [2048, 8192],
                     "max_running_requests": [64, 128]})  # fmt: skip
    pts = expand(s)
    sg = [p for p in pts if p.options.get("engine", "sglang") == "sglang"]
    vl = [p for p in pts if p.options.get("engine") == "vllm"]
    assert len(sg) == 4  # 2 budgets x 2 running caps
    assert len(vl) == 2  # max_running_requests is SGLang's: the vLLM points collapse
    assert {p.options["chunked_prefill_size"] for p in sg} == {2048, 8192}
    assert {p.options["max_num_batched_tokens"] for p in vl} == {2048, 8192}
    assert all("chunked_prefill_size" not in p.options for p in vl)
    assert all(p.axes["max_running_requests"] is None for p in vl)
    assert len({p.id for p in pts}) == len(pts)


def test_budget_expands_replicas_and_marks_points_over_it():
    pts = expand(_space(gpus=4, axes={"tp": [1, 2]}))
    shapes = sorted((p.options.get("tp", 1), p.options["replicas"]) for p in pts)
    assert shapes == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]
    assert all(p.gpus <= 4 and not p.reason for p in pts)
    over = expand(_space(gpus=4, axes={"tp": [2], "replicas": [2, 3]}))
    reasons = {p.options["replicas"]: p.reason for p in over}
    assert reasons[2] == "" and "6 GPUs, over the budget of 4" in reasons[3]


def test_pd_sets_the_replica_count():
    pts = expand(_space(axes={"pd": ["none", "1:1", "1:3"]}))
    assert sorted(p.options.get("replicas", 1) for p in pts) == [1, 2, 4]
    assert sum("pd" in p.options for p in pts) == 2


def test_slo_keys():
    s = _space(slo={"ttft_p99_ms": 2000, "tpot_mean_ms": 50, "tpot_ms": 80, "attainment": 0.9})
    assert dict(s.slo.limits) == {"ttft_s_p99": 2.0, "tpot_s_mean": 0.05}
    assert s.slo.request_tpot_s == 0.08 and s.slo.attainment == 0.9
    for bad, words in (({"ttft_p95_ms": 1}, "expected <metric>_<stat>_ms"),
                       ({"ttft_p99_ms": -1}, "> 0"), ({"attainment": 0.9}, "per-request limit"),
                       ({"attainment": 1.5}, "(0, 1]")):  # fmt: skip
        with pytest.raises(SpecError, match=None) as e:
            _space(slo=bad)
        assert words in str(e.value)


def test_unknown_fields_and_objectives():
    with pytest.raises(SpecError, match="field 'colour' is not an option"):
        _space(colour="red")
    with pytest.raises(SpecError, match="unknown metric 'speed'"):
        _space(objectives=["speed"])
    with pytest.raises(SpecError, match="gpus"):
        _space(gpus=0)
    with pytest.raises(SpecError, match="field 'model': llama-99b: no such file"):
        _space(model="llama-99b")
    with pytest.raises(SpecError, match="slo.e2e_ms: expected"):
        _space(slo={"e2e_ms": 100})


def test_point_ids_are_stable():
    a = [p.id for p in expand(_space(gpus=2, axes={"engine": ["sglang", "vllm"]}))]
    b = [p.id for p in expand(_space(gpus=2, axes={"engine": ["sglang", "vllm"]}))]
    assert a == b and len(set(a)) == len(a)
