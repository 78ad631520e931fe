"""Batch -> step seconds: per-operator FLOPs and bytes (ops.py), kernel-backend attention
(attention/), the fitted roofline and its jitted entry points (roofline.py), fitting
(calibrate.py)."""

from hisim_jax.estimator.roofline import Estimator, Params, load_calibration, step_seconds_grid

__all__ = ["Estimator", "Params", "load_calibration", "step_seconds_grid"]
