"""A batch as arrays: per request ``cache_len`` (tokens already cached) and ``new_len`` (tokens
computed this step), padded to a power-of-two bucket with a mask so a run compiles a handful of
shapes, not one per batch. Padded slots have ``cache_len = new_len = mask = 0``; every cost
formula multiplies by the mask or is zero for them, so padding never changes a result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

MIN_BUCKET = 8


class Batch(eqx.Module):
    """``cache_len``, ``new_len``, ``mask``: float arrays of shape ``[..., R]`` (R a bucket)."""

    cache_len: jnp.ndarray
    new_len: jnp.ndarray
    mask: jnp.ndarray


def bucket_size(n_requests: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two ≥ n_requests (and ≥ minimum)."""
    return max(minimum, 1 << max(0, int(n_requests) - 1).bit_length())


def parse_batch(text: str | Sequence, where: str = "batch") -> list[tuple[int, int]]:
    """Parse ``[[cache_len, new_len], ...]`` from JSON text or a sequence; one-line errors."""
    if isinstance(text, str):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg}): {text[:60]!r}") from None
    else:
        obj = text
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ValueError(f"{where}: expected a non-empty list of [cache_len, new_len], got {obj!r}")
    out = []
    for i, req in enumerate(obj):
        if (
            not isinstance(req, (list, tuple))
            or len(req) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in req)
        ):
            raise ValueError(
                f"{where}: request {i} must be [cache_len, new_len] integers, got {req!r}"
            )
        c, n = int(req[0]), int(req[1])
        if c < 0 or n < 1:
            raise ValueError(
                f"{where}: request {i} needs cache_len >= 0 and new_len >= 1, got {req!r}"
            )
        out.append((c, n))
    return out


def pack(batches: Sequence[Sequence[tuple[int, int]]], bucket: int | None = None) -> Batch:
    """Stack ragged batches into one ``Batch`` of shape ``[len(batches), bucket]`` (numpy leaves)."""
    longest = max((len(b) for b in batches), default=1)
    size = bucket or bucket_size(longest)
    if size < longest:
        raise ValueError(f"bucket {size} is smaller than the largest batch ({longest} requests)")
    c = np.zeros((len(batches), size), np.float64)
    n = np.zeros_like(c)
    m = np.zeros_like(c)
    for i, b in enumerate(batches):
        arr = np.asarray(b, np.float64).reshape(-1, 2)
        c[i, : len(arr)] = arr[:, 0]
        n[i, : len(arr)] = arr[:, 1]
        m[i, : len(arr)] = 1.0
    return Batch(c, n, m)


def pack_by_bucket(
    batches: Sequence[Sequence[tuple[int, int]]],
) -> list[tuple[np.ndarray, Batch]]:
    """Group batches by their power-of-two bucket and pack each group: padding then costs at
    most 2x per batch instead of up to the largest batch's size. Returns (positions, Batch)."""
    sizes = np.array([bucket_size(len(b)) for b in batches], dtype=np.int64)
    out = []
    for size in np.unique(sizes):
        idx = np.flatnonzero(sizes == size)
        out.append((idx, pack([batches[i] for i in idx], bucket=int(size))))
    return out
