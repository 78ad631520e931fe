"""The search end to end on a small space: infeasible points and their reasons, SLOs on the
fronts, the cache, determinism, replayable configs, the grid baseline, the CLI and Ray."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import hisim_jax
from hisim_jax.cli import app
from hisim_jax.search import pareto
from hisim_jax.search.run import metrics_of, write_outputs
from hisim_jax.search.space import METRICS
from hisim_jax.simulation import SimulationOptions, run

SPACE = {
    "model": "llama-3.1-8b",
    "limit": 120,
    "gpus": 3,
    "slo": {"ttft_p99_ms": 3000, "tpot_p99_ms": 100},
    "axes": {
        "hardware": ["h100-sxm", "a100-sxm-80gb"],
        "tp": [1, 3],
        "engine": ["sglang", "vllm"],
    },  # fmt: skip
}
FAST = {"jobs": 1, "max_simulations": 5}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return hisim_jax.search(SPACE, cache_dir=str(cache), **FAST), cache


def test_infeasible_points_carry_their_reason_and_are_never_simulated(first):
    result, _ = first
    pts = result.points
    tp3 = pts[pts["tp"] == 3]
    assert len(tp3) == 4 and not tp3["feasible"].any()
    assert tp3["reason"].str.contains("tp=3 does not divide the 32 attention heads").all()
    assert (tp3["stage"] == "infeasible").all() and tp3["ttft_s_p99"].isna().all()
    assert result.report["infeasible"] == 4 and result.report["screened"] == len(pts) - 4


def test_fronts_hold_only_fully_simulated_points_within_the_slos(first):
    result, _ = first
    front = result.pareto
    assert len(front) > 0
    assert (front["stage"] == "full").all() and front["meets_slo"].all()
    assert (front["ttft_s_p99"] <= 3.0).all() and (front["tpot_s_p99"] <= 0.1).all()
    simulated = result.points[result.points["stage"] == "full"]
    assert 0 < len(simulated) <= FAST["max_simulations"]
    # no SLO-meeting simulated point dominates a front point
    ok = simulated[simulated["meets_slo"]]
    for x, y in result.space.fronts:
        mx = [METRICS[x], METRICS[y]]
        f = front[front["front"] == f"{y} vs {x}"][[x, y]].to_numpy(float)
        assert not pareto.dominates_any(ok[[x, y]].to_numpy(float), f, mx).any()
    for obj, best in result.best.items():
        col = ok[obj].to_numpy(float)
        assert best["value"] == (col.max() if METRICS[obj] else col.min())


def test_a_rerun_is_served_by_the_cache_and_gives_the_same_table(first):
    result, cache = first
    again = hisim_jax.search(SPACE, cache_dir=str(cache), **FAST)
    assert again.report["simulations"] == 0
    assert again.report["simulations_cached"] == result.report["simulations"]
    pd.testing.assert_frame_equal(again.points, result.points)


def test_the_same_seed_gives_the_same_front_without_a_cache(first):
    result, _ = first
    again = hisim_jax.search(SPACE, cache_dir="", **FAST)
    pd.testing.assert_frame_equal(again.pareto, result.pareto)


def test_a_front_config_replays_to_its_metrics(first, tmp_path):
    result, _ = first
    write_outputs(result, tmp_path / "out")
    for name in ("points.csv", "pareto.csv", "best.json", "report.md", "fronts.png",
                 "slo_attainment.png"):  # fmt: skip
        assert (tmp_path / "out" / name).stat().st_size > 0
    row = result.pareto.iloc[0]
    path = tmp_path / "out" / "configs" / f"{row['id']}.yaml"
    replay = run(SimulationOptions.from_yaml(path, {}))
    m = metrics_of(replay.summary)
    for col in ("ttft_s_p99", "tpot_s_p99", "e2e_s_mean", "throughput_output_tok_s"):
        assert math.isclose(m[col], row[col], rel_tol=1e-9), col
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert set(best) == set(result.space.objectives)
    points = pd.read_csv(tmp_path / "out" / "points.csv")
    for col in ("id", "hardware", "tp", "engine", "feasible", "reason", "stage", "meets_slo",
                "gpus", "tokens_per_s_per_gpu", "tokens_per_s_per_user", "usd_per_mtok",
                "ttft_s_p99", "tpot_s_p99", "itl_s_p90", "e2e_s_p50"):  # fmt: skip
        assert col in points.columns, col


def test_grid_is_complete_and_finds_nothing_beyond_the_default_front(first):
    result, cache = first
    grid = hisim_jax.search(SPACE, cache_dir=str(cache), strategy="grid", jobs=1)
    assert grid.report["complete"]
    feasible = grid.points[grid.points["feasible"]]
    assert (feasible["stage"] == "full").all() and len(feasible) == result.report["screened"]
    ok = feasible[feasible["meets_slo"]]
    for x, y in result.space.fronts:
        mx = [METRICS[x], METRICS[y]]
        front = result.pareto[result.pareto["front"] == f"{y} vs {x}"][[x, y]].to_numpy(float)
        assert len(front)
        # no configuration of the exhaustive grid beats a point of the default front
        assert not pareto.dominates_any(ok[[x, y]].to_numpy(float), front, mx).any()


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"model": "llama-3.1-70b", "axes": {"hardware": ["l40s"]}}, "weights"),
        ({"kv_cache_tokens": 64}, "KV cache of 64 tokens"),
    ],
)
def test_points_that_cannot_hold_the_model_or_the_longest_request(extra, words):
    space = {**SPACE, **extra}
    space.setdefault("axes", {})
    result = hisim_jax.search(space, cache_dir="", jobs=1, max_simulations=1)
    assert not result.points["feasible"].any()
    pts = result.points
    divisible = pts[pts["tp"] != 3] if "tp" in pts else pts  # tp=3 fails first on the heads
    assert len(divisible) and divisible["reason"].str.contains(words).all()
    assert result.report["simulations"] == 0 and len(result.pareto) == 0


def test_cli_search_writes_the_outputs_and_refuses_bad_spaces(tmp_path):
    space = tmp_path / "space.yaml"
    small = {**SPACE, "axes": {"engine": ["sglang", "vllm"]}, "gpus": 1}
    space.write_text(yaml.safe_dump(small))
    runner = CliRunner()
    res = runner.invoke(app, ["search", "--space", str(space), "--out", str(tmp_path / "o"),
                              "--jobs", "1", "--no-cache", "--max-simulations", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "pareto.csv").exists() and (tmp_path / "o" / "configs").is_dir()
    space.write_text(yaml.safe_dump({**small, "axes": {"l2_gb": [0, -1]}}))
    res = runner.invoke(app, ["search", "--space", str(space), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2
    assert "axes.l2_gb[1]" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_ray_runs_the_same_search():
    pytest.importorskip("ray")
    small = {**SPACE, "axes": {"engine": ["sglang", "vllm"]}, "gpus": 1}
    serial = hisim_jax.search(small, cache_dir="", jobs=1, max_simulations=2)
    remote = hisim_jax.search(small, cache_dir="", ray_address="local", max_simulations=2)
    cols = ["id", "stage", "ttft_s_p99", "tpot_s_p99", "tokens_per_s_per_gpu"]
    # the tests run JAX in float64 (conftest); Ray's workers start with its float32 default,
    # as every process of a real search does
    pd.testing.assert_frame_equal(serial.points[cols], remote.points[cols], rtol=1e-4)


def test_a_process_pool_runs_the_same_search():
    small = {**SPACE, "axes": {"engine": ["sglang", "vllm"]}, "gpus": 1}
    serial = hisim_jax.search(small, cache_dir="", jobs=1, max_simulations=2)
    pooled = hisim_jax.search(small, cache_dir="", jobs=2, max_simulations=2)
    cols = ["id", "stage", "ttft_s_p99", "tpot_s_p99", "tokens_per_s_per_gpu"]
    # spawned workers start with JAX's float32 default; the tests run float64 (conftest)
    pd.testing.assert_frame_equal(serial.points[cols], pooled.points[cols], rtol=1e-4)
    assert pooled.report["simulations"] == serial.report["simulations"] == 2


def test_the_space_prices_price_simulated_points_and_their_configs(tmp_path):
    small = {**SPACE, "axes": {"engine": ["sglang"]}, "gpus": 1, "prices": {"h100-sxm": 1.0}}
    res = hisim_jax.search(small, cache_dir="", jobs=1, max_simulations=1)
    row = res.points.iloc[0]
    assert row["stage"] == "full" and math.isclose(row["usd_per_hour"], 1.0)
    per_token = 1.0 / 3600 / row["throughput_output_tok_s"] * 1e6
    assert math.isclose(row["usd_per_mtok"], per_token)
    assert res.options[row["id"]]["gpu_price_usd_per_hour"] == 1.0


def test_expert_and_attention_parallel_axes():
    space = {
        "model": "qwen3-30b-a3b",
        "limit": 80,
        "gpus": 4,
        "slo": {"ttft_p99_ms": 5000, "tpot_p99_ms": 200},
        "axes": {"tp": [2, 4], "ep": [1, 4], "dp_attention": [1, 2]},
    }
    result = hisim_jax.search(space, cache_dir="", jobs=1, max_simulations=4)
    pts = result.points
    bad = pts[(pts["tp"] == 2) & (pts["ep"] == 4)]
    assert len(bad) and not bad["feasible"].any()
    assert bad["reason"].str.contains("ep=4 does not divide tp=2").all()
    good = pts[(pts["tp"] == 4) & (pts["ep"] == 4) & (pts["dp_attention"] == 2)]
    assert good["feasible"].all() and good["stage"].ne("infeasible").all()
