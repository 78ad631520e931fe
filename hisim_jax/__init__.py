"""hisim-jax: a CPU-only simulator of LLM serving with a calibrated JAX step-latency estimator."""

import os as _os

import jax as _jax

# The simulator makes many small, sequential estimator calls on the CPU; handing each one to
# JAX's async dispatch thread costs more than the computation (~25 µs of a ~50 µs call).
# Set HISIM_ASYNC_DISPATCH=1 to keep JAX's default.
if _os.environ.get("HISIM_ASYNC_DISPATCH", "0") != "1":
    _jax.config.update("jax_cpu_enable_async_dispatch", False)

from hisim_jax.estimator.roofline import Estimator, Params  # noqa: E402
from hisim_jax.specs import HardwareSpec, ModelSpec, SpecError, load_hardware, load_model  # noqa: E402

__all__ = [
    "Estimator",
    "HardwareSpec",
    "ModelSpec",
    "Params",
    "SpecError",
    "load_hardware",
    "load_model",
]
__version__ = "0.1.0"
