"""Keep compiled estimator shapes across runs (JAX's persistent compilation cache), so a
repeated ``hisim`` command skips seconds of XLA compilation."""

from __future__ import annotations

import os
from pathlib import Path


def enable() -> None:
    """HISIM_CACHE_DIR picks the folder (default ``~/.cache/hisim-jax/xla``); an empty value
    turns it off."""
    folder = os.environ.get("HISIM_CACHE_DIR", str(Path.home() / ".cache" / "hisim-jax" / "xla"))
    if not folder:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
