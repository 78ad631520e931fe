"""hisim-jax: a CPU-only simulator of LLM serving with a calibrated JAX step-latency estimator.

The names below load on first use, so ``import hisim_jax`` (and ``hisim list``, ``--help``)
does not pay for importing JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Estimator": "hisim_jax.estimator.roofline",
    "Params": "hisim_jax.estimator.roofline",
    "RaggedBatches": "hisim_jax.estimator.batch",
    "HardwareSpec": "hisim_jax.specs",
    "ModelSpec": "hisim_jax.specs",
    "SpecError": "hisim_jax.specs",
    "load_hardware": "hisim_jax.specs",
    "load_model": "hisim_jax.specs",
}

__all__ = sorted([*_EXPORTS, "search"])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "search":  # the callable subpackage: hisim_jax.search(space, ...)
        return importlib.import_module("hisim_jax.search")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hisim_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
