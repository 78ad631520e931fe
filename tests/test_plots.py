"""The search figures write a PNG for ordinary frames and for the awkward ones (no SLO-meeting
row, NaN metrics, nothing simulated, no hardware column)."""

import numpy as np
import pandas as pd
import pytest

from hisim_jax.plots import plot_search_fronts, plot_slo_attainment

FRONTS = [
    ("tokens_per_s_per_user", "tokens_per_s_per_gpu", True, True),
    ("usd_per_mtok", "ttft_s_p99", False, False),
]


def search_points(meets: bool) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 12
    stage = np.array(["infeasible", "screen", "halving", "full"] * 3)
    feasible = stage != "infeasible"
    simulated = np.isin(stage, ["halving", "full"])
    att = np.where(simulated, rng.uniform(0.5, 1.0, n), np.nan)
    frame = pd.DataFrame(
        {
            "id": [f"cfg{i:02d}" for i in range(n)],
            "hardware": np.where(np.arange(n) % 2 == 0, "H100", "A100"),
            "feasible": feasible,
            "meets_slo": (att >= 0.7) & meets,
            "stage": stage,
            "slo_attainment": att,
            "attainment_target": 0.7,
            "tokens_per_s_per_gpu": rng.uniform(100, 3000, n),
            "tokens_per_s_per_user": rng.uniform(5, 80, n),
            "usd_per_mtok": rng.uniform(0.05, 20.0, n),
            "ttft_s_p99": rng.uniform(0.1, 3.0, n),
        }
    )
    frame.loc[3, "usd_per_mtok"] = np.nan  # a simulated row without a cost
    return frame


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("meets", [True, False])
def test_search_figures_write_png(tmp_path, meets):
    points = search_points(meets)
    if meets:
        assert points["meets_slo"].sum() >= 2
    else:
        assert not points["meets_slo"].any()
    out = plot_search_fronts(points, FRONTS, tmp_path / "fronts.png")
    assert out == tmp_path / "fronts.png"
    assert_png(out)
    out = plot_slo_attainment(points, tmp_path / "attainment.png", top=5)
    assert out == tmp_path / "attainment.png"
    assert_png(out)
    # no temporary files left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attainment.png", "fronts.png"]


def test_search_figures_sparse_frames(tmp_path):
    """No hardware or target column, a single front, nothing simulated."""
    points = search_points(True).drop(columns=["hardware", "attainment_target"])
    assert_png(plot_search_fronts(points, FRONTS[:1], tmp_path / "one.png"))
    assert_png(plot_slo_attainment(points, tmp_path / "att.png"))
    nothing = points.assign(stage="screen", slo_attainment=np.nan, meets_slo=False)
    assert_png(plot_slo_attainment(nothing, tmp_path / "none.png"))
    assert_png(plot_search_fronts(nothing.iloc[:0], FRONTS, tmp_path / "empty.png"))
