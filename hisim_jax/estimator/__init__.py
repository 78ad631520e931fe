"""Batch -> step seconds: per-operator FLOPs and bytes (ops.py), kernel-backend attention
(attention/), the fitted roofline and its jitted entry points (roofline.py), fitting
(calibrate.py)."""

import os as _os

import jax as _jax

# The simulator makes many small, sequential estimator calls on the CPU; handing each one to
# JAX's async dispatch thread costs more than the computation (~25 µs of a ~50 µs call).
# Set HISIM_ASYNC_DISPATCH=1 to keep JAX's default.
if _os.environ.get("HISIM_ASYNC_DISPATCH", "0") != "1":
    _jax.config.update("jax_cpu_enable_async_dispatch", False)

from hisim_jax.estimator.batch import RaggedBatches  # noqa: E402
from hisim_jax.estimator.roofline import (  # noqa: E402
    Estimator,
    Params,
    load_calibration,
    step_seconds_grid,
)

__all__ = ["Estimator", "Params", "RaggedBatches", "load_calibration", "step_seconds_grid"]
