"""Tests run in float64 with strict dtype promotion, so silent mixed-precision bugs fail loudly."""

import contextlib
import os
import signal

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HISIM_CACHE_DIR", "")  # tests never write JAX's compilation cache

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@contextlib.contextmanager
def _ends_within(seconds: float):
    def hang(*_):
        raise TimeoutError(f"still running after {seconds} s: the run does not end")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def ends_within():
    """``with ends_within(seconds):`` fails, instead of hanging the suite, if the block runs
    longer than that (a simulation that never ends)."""
    return _ends_within
