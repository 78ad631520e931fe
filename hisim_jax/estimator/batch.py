"""A batch as arrays: per request ``cache_len`` (tokens already cached) and ``new_len`` (tokens
computed this step), padded to a power-of-two bucket with a mask so a run compiles a handful of
shapes, not one per batch. Padded slots have ``cache_len = new_len = mask = 0``; every cost
formula multiplies by the mask or is zero for them, so padding never changes a result.

``RaggedBatches`` holds many batches as flat arrays (every request of every batch, plus the
number of requests of each batch) and is checked once when built; ``pack_ragged`` pads them into
bucket planes with NumPy index arithmetic, without a Python loop per batch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from hisim_jax import files
from hisim_jax.estimator.pytree import pytree_dataclass

MIN_BUCKET = 8
# Token counts above this lose integer exactness in float64 (and in any case mean a bug).
MAX_TOKENS = 2**53
FIELDS = ("cache_len", "new_len")


@pytree_dataclass
class Batch:
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


# ------------------------------------------------------------------------------------------------
# many batches as flat arrays


def _as_int_array(values, what: str) -> np.ndarray:
    """A 1-D integer copy of ``values``; floats must hold whole numbers. Errors name ``what``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.floor(arr)) | (np.abs(arr) > MAX_TOKENS)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{what}[{i}] must be a whole number, got {arr[i].item()!r}")
        return arr.astype(np.int64)
    if arr.dtype.kind in "OUSb":
        for i, v in enumerate(arr):  # ints too large for int64, strings, bools, None...
            _check_value(v, f"{what}[{i}]", 0)
    raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")


def _check_value(v, where: str, lowest: int) -> None:
    """One token count, with a message naming where it is (the slow path of errors only)."""
    if isinstance(v, np.generic):
        v = v.item()
    if not _is_number(v):
        raise ValueError(f"{where} must be an integer, got {v!r}")
    if isinstance(v, (float, np.floating)) and not (math.isfinite(v) and float(v).is_integer()):
        raise ValueError(f"{where} must be a whole number, got {v!r}")
    if v < lowest:
        raise ValueError(f"{where} must be >= {lowest}, got {v!r}")
    if v > MAX_TOKENS:
        raise ValueError(f"{where} must be <= 2**53, got {v!r}")


@dataclass(frozen=True, slots=True)
class RaggedBatches:
    """Many batches as flat integer arrays: ``cache_len`` and ``new_len`` ``[total]`` hold every
    request of every batch in order, ``sizes`` ``[N]`` the number of requests of each batch
    (batch ``i`` is requests ``offsets[i] : offsets[i] + sizes[i]``).

    Checked when built: at least one batch, none empty, ``cache_len >= 0`` and ``new_len >= 1``
    whole numbers; a ``ValueError`` names the batch and the field. The arrays are read-only
    int64 copies.

    >>> RaggedBatches([0, 4096, 512], [2048, 1, 1], [2, 1])   # [[(0, 2048), (4096, 1)], [(512, 1)]]
    """

    cache_len: np.ndarray
    new_len: np.ndarray
    sizes: np.ndarray

    def __post_init__(self):
        sizes = _as_int_array(self.sizes, "sizes")
        if len(sizes) == 0:
            raise ValueError("batches: expected at least one batch, got none")
        if (sizes < 1).any():
            raise ValueError(f"batch {int(np.argmax(sizes < 1))}: expected at least one request")
        cols = {}
        for name, lowest in zip(FIELDS, (0, 1), strict=True):
            try:
                arr = _as_int_array(getattr(self, name), name)
            except ValueError as e:
                raise ValueError(self._locate(sizes, str(e), name)) from None
            if len(arr) != int(sizes.sum()):
                raise ValueError(
                    f"{name} holds {len(arr)} requests but sizes add up to {int(sizes.sum())}"
                )
            bad = (arr < lowest) | (arr > MAX_TOKENS)
            if bad.any():
                i = int(np.argmax(bad))
                rule = f">= {lowest}" if arr[i] < lowest else "<= 2**53"
                raise ValueError(
                    f"{self._where(sizes, i)}: field '{name}' must be {rule}, got {arr[i].item()}"
                )
            arr.flags.writeable = False
            cols[name] = arr
        sizes.flags.writeable = False
        object.__setattr__(self, "sizes", sizes)
        for name, arr in cols.items():
            object.__setattr__(self, name, arr)

    @staticmethod
    def _where(sizes: np.ndarray, i: int) -> str:
        b = int(np.searchsorted(np.cumsum(sizes), i, side="right"))
        return f"batch {b}: request {i - int(np.sum(sizes[:b]))}"

    @classmethod
    def _locate(cls, sizes: np.ndarray, message: str, name: str) -> str:
        """Turn ``name[i] must ...`` into ``batch b: request r: field 'name' must ...``."""
        head, sep, rest = message.partition("] ")
        if sep and head.startswith(f"{name}[") and head[len(name) + 1 :].isdigit():
            i = int(head[len(name) + 1 :])
            if i < int(sizes.sum()):
                return f"{cls._where(sizes, i)}: field '{name}' {rest}"
        return f"field '{name}': {message}"

    @classmethod
    def from_batches(cls, batches: Sequence[Sequence[Sequence[int]]]) -> RaggedBatches:
        """From ``[[(cache_len, new_len), ...], ...]`` (lists, tuples or ``[R, 2]`` arrays).

        Fast path: every number of every batch through one flat list into one NumPy array,
        whose inferred dtype shows a non-integer anywhere; only a bad input is walked in Python,
        to name the batch, request and field."""
        if isinstance(batches, cls):
            return batches
        try:
            sizes = np.fromiter(map(len, batches), np.int64, len(batches))
            chain = itertools.chain.from_iterable
            if set(map(len, chain(batches))) - {2}:
                raise TypeError
            flat = np.array(list(chain(chain(batches))))
        except (TypeError, ValueError):
            _explain(batches)
            raise
        if flat.dtype.kind not in "iuf" or flat.ndim != 1 or len(flat) != 2 * int(sizes.sum()):
            _explain(batches)
        pairs = flat.reshape(-1, 2)
        return cls(pairs[:, 0], pairs[:, 1], sizes)

    @classmethod
    def from_frame(
        cls, frame, batch: str = "batch_id", cache_len: str = "cache_len", new_len: str = "new_len"
    ) -> RaggedBatches:
        """From a DataFrame with one row per request and a batch-id column: batches in order of
        first appearance, requests in row order within each batch (rows of a batch need not be
        adjacent)."""
        for col in (batch, cache_len, new_len):
            if col not in frame.columns:
                raise ValueError(
                    f"frame: no column {col!r} (columns: {', '.join(map(str, frame.columns))})"
                )
        if len(frame) == 0:
            raise ValueError("frame: expected at least one batch, got no rows")
        ids = frame[batch].to_numpy()
        _, first, inverse, sizes = np.unique(
            ids, return_index=True, return_inverse=True, return_counts=True
        )
        # number the batches by first appearance, then order rows by batch (stable: row order kept)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        order = np.argsort(rank[inverse.reshape(-1)], kind="stable")
        columns = {}
        for name, col in zip(FIELDS, (cache_len, new_len), strict=True):
            values = frame[col].to_numpy()
            if values.dtype.kind not in "iuf":  # object columns: numbers only, no strings or NA
                for i, v in enumerate(values):
                    if not _is_number(v):
                        raise ValueError(
                            f"frame: row {i} (batch {files.plain(ids[i])!r}): field '{name}' "
                            f"must be an integer, got {v!r}"
                        )
                values = np.array(values.tolist())
            columns[name] = values[order]
        return cls(columns["cache_len"], columns["new_len"], sizes[np.argsort(first)])

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> np.ndarray:
        """``[N]`` index of each batch's first request in the flat arrays."""
        out = np.zeros(len(self.sizes), np.int64)
        np.cumsum(self.sizes[:-1], out=out[1:])
        return out

    def __getitem__(self, i: int) -> RaggedBatches:
        """Batch ``i`` alone."""
        i = range(len(self))[i]
        start = int(self.offsets[i])
        end = start + int(self.sizes[i])
        return RaggedBatches(
            self.cache_len[start:end], self.new_len[start:end], self.sizes[i : i + 1]
        )

    def to_lists(self) -> list[list[tuple[int, int]]]:
        pairs = list(zip(self.cache_len.tolist(), self.new_len.tolist(), strict=True))
        ends = np.cumsum(self.sizes).tolist()
        return [pairs[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _explain(batches) -> None:
    """Raise the ValueError naming the first bad batch, request and field (slow path)."""
    if isinstance(batches, (str, bytes)) or not isinstance(batches, (Sequence, np.ndarray)):
        raise ValueError(f"batches: expected a list of batches, got {type(batches).__name__}")
    if len(batches) == 0:
        raise ValueError("batches: expected at least one batch, got none")
    for b, batch in enumerate(batches):
        if isinstance(batch, (str, bytes)) or not isinstance(batch, (Sequence, np.ndarray)):
            raise ValueError(f"batch {b}: expected a list of (cache_len, new_len), got {batch!r}")
        if len(batch) == 0:
            raise ValueError(f"batch {b}: expected at least one request")
        for r, req in enumerate(batch):
            if (
                isinstance(req, (str, bytes))
                or not isinstance(req, (Sequence, np.ndarray))
                or len(req) != 2
            ):
                raise ValueError(
                    f"batch {b}: request {r}: expected (cache_len, new_len), got {req!r}"
                )
            for name, v, lowest in zip(FIELDS, req, (0, 1), strict=True):
                _check_value(v, f"batch {b}: request {r}: field '{name}'", lowest)
    raise ValueError("batches: expected (cache_len, new_len) integer pairs")


def bucket_sizes(sizes: np.ndarray, minimum: int = MIN_BUCKET) -> np.ndarray:
    """``bucket_size`` of every entry of an int array: the exponent frexp returns for
    ``size - 1`` is its bit length (exact for integers below 2**53)."""
    bits = np.frexp(np.asarray(sizes, np.float64) - 1.0)[1].astype(np.int64)
    return np.maximum(minimum, np.left_shift(1, np.maximum(bits, 0)))


def bucket_rows(bucket: int, cells: int = 1 << 17, most: int = 4096) -> int:
    """Batches per call for a bucket: about ``cells`` padded requests per call (a few MB of
    planes), at most ``most``."""
    return max(1, min(most, cells // bucket))


def pack_ragged(
    rb: RaggedBatches, dtype=np.float64, groups=None, cells: int = 1 << 17, most: int = 4096
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pad ``rb`` into ``[3, rows, R]`` planes (cache_len, new_len, mask) per power-of-two
    bucket ``R``, cut into calls of about ``cells`` padded requests (``bucket_rows``); a group's
    last call is padded to a power of two of rows (all-zero rows: no requests). ``groups`` (an
    int array ``[N]``, optional) splits each bucket further, e.g. by the cost graph a batch
    needs. Returns ``(positions, planes)`` per call, positions ``[n <= rows]`` of its batches
    in ``rb``.

    Vectorized: batches are sorted by (bucket, group) and their requests gathered once into
    that order, so each call's requests are one contiguous run that a boolean mask of the
    padded layout takes in row-major order. Python loops only over calls, never batches."""
    sizes = rb.sizes
    buckets = bucket_sizes(sizes)
    key = buckets if groups is None else buckets * 2 + np.asarray(groups)  # buckets are even
    order = np.argsort(key, kind="stable")
    ssizes = sizes[order]
    ends = np.cumsum(ssizes)
    first = ends - ssizes  # of each sorted batch's requests in the sorted request order
    if np.array_equal(order, np.arange(len(order))):  # already grouped: no gather
        c, n = rb.cache_len.astype(dtype), rb.new_len.astype(dtype)
    else:  # sorted request i comes from flat index i + (its batch's offset - first)
        total = int(ends[-1])
        index = np.int32 if total < 2**31 else np.int64
        src = np.zeros(total, index)
        src[first] = np.diff(rb.offsets[order] - first, prepend=0)
        np.cumsum(src, out=src)
        src += np.arange(total, dtype=index)
        c, n = rb.cache_len.astype(dtype)[src], rb.new_len.astype(dtype)[src]
    skey = key[order]
    bounds = [0, *(np.flatnonzero(skey[1:] != skey[:-1]) + 1).tolist(), len(order)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        size = int(buckets[order[a]])
        rows = bucket_rows(size, cells, most)
        cols = np.arange(size)
        for i in range(a, b, rows):
            k = min(rows, b - i)
            mask = cols < ssizes[i : i + k, None]
            r0, r1 = int(first[i]), int(ends[i + k - 1])
            planes = np.zeros((3, rows if k == rows else bucket_size(k, 1), size), dtype)
            planes[0, :k][mask] = c[r0:r1]
            planes[1, :k][mask] = n[r0:r1]
            planes[2, :k] = mask
            out.append((order[i : i + k], planes))
    return out
