"""Tests run in float64 with strict dtype promotion, so silent mixed-precision bugs fail loudly."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HISIM_CACHE_DIR", "")  # tests never write JAX's compilation cache

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
