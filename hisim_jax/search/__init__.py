"""SLO-constrained configuration search: ``space.py`` (axes, feasibility), ``screen.py`` (the
vectorized steady state), ``run.py`` (halving, cache, pool/Ray), ``pareto.py``.

The package itself is callable, so the public entry reads as the others do::

    import hisim_jax
    result = hisim_jax.search("space.yaml", strategy="halving", jobs=2)
    result.points, result.pareto, result.best

``search(space, **options)`` takes a space file, a mapping as a space file holds, or a
``SearchSpace``, and the fields of ``run.SearchOptions`` as keywords. With ``jobs`` > 1 it
starts worker processes by spawning: call it under ``if __name__ == "__main__":`` in a script.
"""

from __future__ import annotations

import sys
import types


def search(space, progress=None, **options):
    """Run a configuration search; returns a ``run.SearchResult`` (pandas DataFrames
    ``points`` and ``pareto``, dicts ``best`` and ``report``)."""
    from hisim_jax.search.run import SearchOptions, run_search
    from hisim_jax.search.space import SearchSpace, space_from_dict

    if isinstance(space, dict):
        space = space_from_dict(space, "space")
    elif not isinstance(space, (SearchSpace, str)) and not hasattr(space, "__fspath__"):
        raise TypeError(f"space: expected a file, a mapping or a SearchSpace, got {space!r}")
    return run_search(space, SearchOptions(**options), progress=progress)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
