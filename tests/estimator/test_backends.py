"""Estimator backends (estimator/backends.py): one interface to the engine, the table backend's
range refusal, the aiconfigurator lookup (skipped without the ``aic`` extra), CLI round trips."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hisim_jax.cli import app
from hisim_jax.estimator import backends as be
from hisim_jax.estimator.batch import RaggedBatches
from hisim_jax.paths import data_dir
from hisim_jax.simulation import SimulationOptions, run
from hisim_jax.specs import SpecError

STEPS = data_dir("data") / "profiles" / "h100" / "steps.csv"
MODEL = "qwen2.5-1.5b"
HW = "h100-sxm"
BATCHES = [[(0, 2048)], [(4096, 1), (512, 1)], [(1024, 512), (2000, 1), (300, 1)]]


def _has_aic() -> bool:
    try:
        from hisim_jax.estimator import aiconfigurator as aic

        aic.data_root()
        return True
    except SpecError:
        return False


def _backend(kind):
    if kind == "aiconfigurator":
        pytest.importorskip("aiconfigurator_core")
        pytest.importorskip("pyarrow")
        return be.make_estimator(kind, MODEL, HW)
    if kind == "table":
        return be.make_estimator(kind, MODEL, HW, table=STEPS, extrapolate=True)
    return be.make_estimator(kind, MODEL, HW)


@pytest.fixture(scope="module", params=["aiconfigurator", "table"])
def est(request):
    return _backend(request.param)


def test_backends_by_name():
    assert set(be.BACKENDS) == {"roofline", "aiconfigurator", "table"}
    with pytest.raises(ValueError, match="estimator 'foo' unknown"):
        be.make_estimator("foo", MODEL, HW)
    with pytest.raises(ValueError, match="goes with estimator table"):
        be.make_estimator("roofline", MODEL, HW, table=STEPS)
    with pytest.raises(ValueError, match="calibration goes with estimator roofline"):
        be.make_estimator("table", MODEL, HW, table=STEPS, calibration="x.json")


def test_engine_interface(est):
    """What engine, simulation and metrics read: step_latency_s, decode_steps_s, model, hardware."""
    assert est.model.name == MODEL and est.hardware[0].name == HW and est.tp == 1
    out = est.step_latency_s(BATCHES)
    assert out.shape == (3,) and np.all(out > 0) and np.all(np.isfinite(out))
    # one batch, a list holding one batch and a RaggedBatches agree
    one = est.step_latency_s(BATCHES[2])
    assert one.shape == (1,)
    np.testing.assert_allclose(one, est.step_latency_s([BATCHES[2]]))
    np.testing.assert_allclose(out, est.step_latency_s(RaggedBatches.from_batches(BATCHES)))
    # the breakdown adds up to the step
    parts = est.breakdown_s(BATCHES[1])
    assert pytest.approx(sum(parts.values()), rel=1e-12) == out[1]


def test_decode_steps_equal_single_steps(est):
    ctx = np.array([3000, 2000, 1000])
    active = [3, 3, 2, 1]
    got = est.decode_steps_s(ctx, 4, padded=4, active=active)
    ref = [
        est.step_latency_s([[(int(c) + j, 1) for c in ctx[:a]] + [(0, 1)] * (4 - a)])[0]
        for j, a in enumerate(active)
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_latency_grows_with_tokens(est):
    small, big = est.step_latency_s([[(0, 512)], [(0, 4096)]])
    assert big > small
    short, long_ = est.step_latency_s([[(1000, 1)] * 8, [(20000, 1)] * 8])
    assert long_ >= short


def test_simulation_runs_on_each_backend(est, ends_within):
    kind = "aiconfigurator" if isinstance(est, be.AiconfiguratorEstimator) else "table"
    extra = {"estimator_table": str(STEPS), "extrapolate": True} if kind == "table" else {}
    with ends_within(60):
        result = run(
            SimulationOptions.checked({"model": MODEL, "limit": 30, "estimator": kind, **extra})
        )
    assert result.summary["requests_completed"] == 30
    assert result.summary["options"]["estimator"] == kind


# ------------------------------------------------------------------------------------------------
# table


def test_table_refuses_outside_its_range_unless_extrapolate():
    strict = be.make_estimator("table", MODEL, HW, table=STEPS)
    with pytest.raises(be.OutOfRangeError) as e:
        strict.step_latency_s([[(0, 100000)]])
    msg = str(e.value)
    assert "feature 'tokens' = 100000" in msg and "range [" in msg and "--extrapolate" in msg
    assert "\n" not in msg
    with pytest.raises(be.OutOfRangeError, match="feature"):
        strict.decode_steps_s(np.array([10]), 2)  # too little context
    loose = be.make_estimator("table", MODEL, HW, table=STEPS, extrapolate=True)
    assert loose.step_latency_s([[(0, 100000)]])[0] > loose.step_latency_s([[(0, 4096)]])[0]


def test_table_fit_recovers_a_linear_law():
    rng = np.random.default_rng(0)
    batches = [
        [(int(rng.integers(0, 4000)), int(rng.choice([1, 1, 300]))) for _ in range(r)]
        for r in rng.integers(1, 20, 60)
    ]
    f = be.batch_features(RaggedBatches.from_batches(batches))
    coef = np.array([3e-3, 2e-5, 1e-5, 1e-8, 1e-10, 0.0, 4e-4])
    y = np.stack([np.ones(60)] + [f[k] for k in be.TABLE_FEATURES], -1) @ coef
    frame = pd.DataFrame({"model": MODEL, "batch": [json.dumps(b) for b in batches],
                          "step_ms": y * 1e3})  # fmt: skip
    est = be.make_estimator("table", MODEL, HW, table=frame)
    np.testing.assert_allclose(est.step_latency_s(batches), y, rtol=1e-6)


def test_table_errors_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="no steps of model llama-3.2-1b"):
        be.make_estimator("table", "llama-3.2-1b", HW, table=STEPS)
    with pytest.raises(ValueError, match="one hardware"):
        be.make_estimator("table", MODEL, [HW, "h200-sxm"], table=STEPS)
    bad = tmp_path / "steps.csv"
    bad.write_text('model,batch\nqwen2.5-1.5b,"[[0,8]]"\n')
    with pytest.raises(SpecError, match="step_ms"):
        be.make_estimator("table", MODEL, HW, table=bad)


def test_options_check_the_estimator():
    with pytest.raises(SpecError, match="field 'estimator'"):
        SimulationOptions.checked({"estimator": "magic"})
    with pytest.raises(SpecError, match="estimator_table"):
        SimulationOptions.checked({"estimator": "table"})
    with pytest.raises(SpecError, match="estimator_table"):
        SimulationOptions.checked({"estimator_table": str(STEPS)})


# ------------------------------------------------------------------------------------------------
# aiconfigurator


def test_log_grid_interpolates_log_log_and_clamps():
    frame = pd.DataFrame({"x": [1.0, 4.0, 16.0], "latency_s": [1.0, 2.0, 8.0]})
    g = be.LogGrid.from_frame(frame, ("x",))
    np.testing.assert_allclose(g([1.0, 4.0, 16.0]), [1.0, 2.0, 8.0])
    np.testing.assert_allclose(g([2.0, 8.0]), [np.sqrt(2.0), 4.0])  # linear in log-log
    np.testing.assert_allclose(g([0.5, 64.0]), [1.0, 8.0])  # clamped

    # beyond the top: scaled by the roofline quantity; below the bottom: clamped only
    def roof(x):
        return x

    np.testing.assert_allclose(be._scaled(g, roof, ([64.0, 0.5],), {}, {}), [32.0, 1.0])


def test_log_grid_fills_holes():
    frame = pd.DataFrame({"a": [1.0, 1.0, 2.0], "b": [1.0, 2.0, 1.0], "latency_s": [1.0, 2.0, 4.0]})
    g = be.LogGrid.from_frame(frame, ("a", "b"))
    assert np.isfinite(g.log_values).all()


def test_aiconfigurator_without_the_extra_is_one_line(monkeypatch):
    from hisim_jax.estimator import aiconfigurator as aic

    monkeypatch.setattr(aic, "_no_parquet", lambda: True)
    with pytest.raises(SpecError, match=r"pip install hisim-jax\[aic\]") as e:
        be.make_estimator("aiconfigurator", MODEL, HW)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not _has_aic(), reason="needs the aic extra")
def test_aiconfigurator_tp_and_moe_paths():
    est = be.make_estimator("aiconfigurator", "llama-3.1-8b", HW, tp=2)
    parts = est.breakdown_s([(0, 1024), (2000, 1)])
    assert parts["communication"] > 0 and parts["attention"] > 0
    one = be.make_estimator("aiconfigurator", "llama-3.1-8b", HW)
    assert one.step_latency_s([[(0, 1024)]])[0] > est.step_latency_s([[(0, 1024)]])[0]
    moe = be.make_estimator("aiconfigurator", "qwen3-30b-a3b", HW)
    assert moe.breakdown_s([(0, 256)])["moe"] > 0
    with pytest.raises(SpecError, match="no aiconfigurator system"):
        be.make_estimator("aiconfigurator", MODEL, "mi300x")


# ------------------------------------------------------------------------------------------------
# CLI


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_estimate_table_round_trip():
    r = _cli("estimate", "--model", MODEL, "--estimator", "table", "--estimator-table", STEPS,
             "--batch", "[[0,2048],[300,1]]", "--breakdown", "--format", "json")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    est = be.make_estimator("table", MODEL, HW, table=STEPS)
    want = est.step_latency_s([[(0, 2048), (300, 1)]])[0] * 1e3
    assert doc["predicted_ms"] == pytest.approx(want)
    assert sum(doc["breakdown_ms"].values()) == pytest.approx(want)


def test_cli_estimate_refusals_are_one_line():
    r = _cli("estimate", "--model", MODEL, "--estimator", "table", "--estimator-table", STEPS,
             "--batch", "[[0,100000]]")  # fmt: skip
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "feature 'tokens'" in r.stderr
    r = _cli("estimate", "--model", MODEL, "--estimator", "table", "--estimator-table", STEPS,
             "--batch", "[[0,100000]]", "--extrapolate", "--format", "csv")  # fmt: skip
    assert r.exit_code == 0, r.output
    for args in (("--estimator", "table"), ("--estimator", "nope"),
                 ("--estimator-table", STEPS), ("--estimator", "table", "--estimator-table",
                 STEPS, "--calibration", STEPS)):  # fmt: skip
        r = _cli("estimate", *args)
        assert r.exit_code == 2 and r.stderr.startswith("error: options:"), r.output


def test_cli_validate_steps_and_simulate_with_table(tmp_path):
    out = tmp_path / "pred.csv"
    r = _cli("validate", "steps", "--estimator", "table", "--estimator-table", STEPS,
             "--plot", tmp_path / "p.png", "--out", out, "--format", "json")  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["rows"] == len(pd.read_csv(STEPS)) and 0 < report["mape"] < 0.3
    assert "predicted_ms" in pd.read_csv(out).columns
    r = _cli("simulate", "--model", MODEL, "--limit", 20, "--estimator", "table",
             "--estimator-table", STEPS, "--extrapolate", "--out", tmp_path / "sim",
             "--format", "json")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["options"]["estimator"] == "table" and summary["requests_completed"] == 20
    assert Path(tmp_path / "sim" / "steps.csv").is_file()
