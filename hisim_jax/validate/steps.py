"""Validation against measurements: step-latency error of the estimator on a steps table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hisim_jax.estimator.calibrate import error_report, predict_steps_s, read_steps
from hisim_jax.estimator.roofline import Params
from hisim_jax.specs import HardwareSpec


@dataclass(frozen=True)
class StepValidation:
    frame: pd.DataFrame  # input rows + predicted_ms, measured_ms, error
    report: dict


def validate_steps(
    profile: str | Path,
    hw: HardwareSpec,
    params: Params,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    attention: str = "fa2",
) -> StepValidation:
    """Predicted vs measured step times; ``attention``: the calibration's attention model."""
    from hisim_jax.estimator.roofline import ATTENTION_BACKENDS

    rows = read_steps(
        profile, require_time=True, tp=tp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )
    pred_s = predict_steps_s(params, rows, hw, be=ATTENTION_BACKENDS[attention])
    frame = rows.frame.copy()
    frame["predicted_ms"] = pred_s * 1e3
    frame["measured_ms"] = rows.measured_s * 1e3
    frame["error"] = pred_s / rows.measured_s - 1.0
    return StepValidation(frame, error_report(rows.frame, pred_s, rows.measured_s))


def report_rows(report: dict) -> list[tuple[str, str, float]]:
    """(scope, name, MAPE) rows for a table: overall, per model, per kind."""
    out = [("overall", "all", report["mape"])]
    for scope in ("model", "kind"):
        for name, v in report.get(f"per_{scope}", {}).items():
            out.append((scope, name, v))
    return out
