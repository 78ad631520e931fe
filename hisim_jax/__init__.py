"""hisim-jax: a CPU-only simulator of LLM serving with a calibrated JAX step-latency estimator."""

from hisim_jax.estimator import Estimator, Params
from hisim_jax.specs import HardwareSpec, ModelSpec, SpecError, load_hardware, load_model

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
