"""Frozen dataclasses whose fields are JAX pytree children: the estimator's parameter, model,
hardware and batch records.

They were ``equinox.Module``s; the estimator uses nothing of equinox beyond that, and importing
it costs ~0.3 s of every ``hisim`` start (issue 11). Calibration still uses equinox's
``tree_at`` and ``filter_jit`` on these records: both work on any pytree."""

from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(cls):
    """``cls`` as a frozen dataclass registered with JAX, every field a child (flattened,
    vmapped and traced like an equinox Module's). Equality is identity, as for arrays: two
    records are compared by their leaves, never with ``==``."""
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
