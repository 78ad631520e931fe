"""Pareto fronts of configuration metrics, in plain NumPy (no JAX: host-side bookkeeping).

Rows are points, columns are objectives; ``maximize[k]`` says whether column ``k`` is better
high (throughput) or low (cost, latency). Row ``a`` dominates row ``b`` when it is at least as
good in every column and strictly better in one. A row holding a NaN is undefined on some
objective, so it is never on a front and never dominates anything; ``inf`` is an ordinary
(extreme) value. Exact duplicates do not dominate each other, so all copies of a front row are
on the front.

Two columns, the common case (throughput against cost, ...), use a sort and a sweep,
O(N log N); more columns compare blocks of rows pairwise against the front found so far,
O(N F K) for a front of F rows, in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Pairwise comparisons allocate [block, n_front, K] booleans; this bounds block * n_front.
_PAIRS_PER_BLOCK = 1 << 22


def _as_minimized(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """``values`` [N, K] as float64 with maximized columns negated, so lower is better
    everywhere. Checks the shape against ``maximize``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be a 2-D [N, K] array, got shape {v.shape}")
    signs = np.asarray(list(maximize), dtype=bool)
    if signs.shape != (v.shape[1],):
        raise ValueError(f"maximize has {signs.size} entries for {v.shape[1]} columns")
    return np.where(signs, -v, v)


def _valid_rows(s: np.ndarray) -> np.ndarray:
    """Bool [N]: rows without NaN (the only rows that can be on a front or dominate)."""
    return ~np.isnan(s).any(axis=1)


def _front_2d(s: np.ndarray) -> np.ndarray:
    """Non-dominated mask of NaN-free minimized points ``s`` [N, 2] by a sort and a sweep.

    After sorting by (x, y), a point is dominated either by a point with the same x and a
    smaller y, or by a point with a smaller x and a y no larger. So only the first y of each
    x-group can be on the front (and every copy of it), and only if that y is strictly below
    the smallest y of all groups with a smaller x.
    """
    n = s.shape[0]
    out = np.zeros(n, dtype=bool)
    if n == 0:
        return out
    x, y = s[:, 0], s[:, 1]
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    group_min = ys[starts]
    before_min = np.r_[np.inf, np.minimum.accumulate(group_min)[:-1]]
    # the first group has nothing before it, even when its y is +inf
    open_group = (group_min < before_min) | (np.arange(starts.size) == 0)
    on_front = open_group[group] & (ys == group_min[group])
    out[order] = on_front
    return out


def _dominated_pairwise(front: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Bool [M]: whether some row of ``front`` [F, K] dominates each row of ``cand`` [M, K]
    (both minimized, NaN-free), comparing blocks of candidates against every front row."""
    m, f = cand.shape[0], front.shape[0]
    out = np.zeros(m, dtype=bool)
    if m == 0 or f == 0:
        return out
    block = max(1, _PAIRS_PER_BLOCK // (f * max(1, cand.shape[1])))
    for lo in range(0, m, block):
        c = cand[lo : lo + block, None, :]  # [b, 1, K]
        no_worse = (front[None, :, :] <= c).all(axis=2)  # [b, F]
        better = (front[None, :, :] < c).any(axis=2)
        out[lo : lo + block] = (no_worse & better).any(axis=1)
    return out


def _dominated_2d(front: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Bool [M]: whether some row of ``front`` [F, 2] dominates each row of ``cand`` [M, 2]
    (both minimized, NaN-free), in O((F + M) log F).

    Dominance is transitive, so only ``front``'s own non-dominated rows matter. Sorted by x,
    their y strictly falls from one x to the next, so among those with x <= cx the last one
    has the smallest y: the candidate is dominated iff that y is below cy, or equal to it with
    a smaller x.
    """
    out = np.zeros(cand.shape[0], dtype=bool)
    if cand.shape[0] == 0 or front.shape[0] == 0:
        return out
    f = front[_front_2d(front)]
    f = f[np.lexsort((f[:, 1], f[:, 0]))]
    i = np.searchsorted(f[:, 0], cand[:, 0], side="right") - 1
    has = i >= 0
    fx, fy = f[i[has], 0], f[i[has], 1]
    cx, cy = cand[has, 0], cand[has, 1]
    out[has] = (fy < cy) | ((fy == cy) & (fx < cx))
    return out


def _front_blocks(s: np.ndarray, block: int = 512) -> np.ndarray:
    """Non-dominated mask of NaN-free minimized points ``s`` [N, K], any K.

    A dominator comes first in lexicographic order, and dominance is transitive, so walking
    the rows in that order each block only needs comparing against itself and the front found
    so far: O(N * front size) instead of O(N^2).
    """
    n = s.shape[0]
    out = np.zeros(n, dtype=bool)
    order = np.lexsort(s.T[::-1])
    found = s[:0]
    for lo in range(0, n, block):
        idx = order[lo : lo + block]
        c = s[idx]
        keep = ~(_dominated_pairwise(found, c) | _dominated_pairwise(c, c))
        out[idx[keep]] = True
        found = np.concatenate([found, c[keep]])
    return out


def pareto_mask(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Bool [N]: which rows of ``values`` [N, K] are on the Pareto front (no other row
    dominates them), with ``maximize[k]`` the direction of column ``k``.

    Rows with a NaN are never on the front and do not dominate; exact duplicates of a front row
    are all on it; N = 0 gives an empty mask. K = 2 runs in O(N log N) (hundreds of thousands
    of rows); K > 2 compares blocks of rows with the front found so far (thousands of rows).
    """
    s = _as_minimized(values, maximize)
    out = np.zeros(s.shape[0], dtype=bool)
    valid = _valid_rows(s)
    sv = s[valid]
    k = s.shape[1]
    if k == 0:  # nothing to be better at: nobody dominates
        out[valid] = True
    elif k == 1:
        out[valid] = sv[:, 0] == sv[:, 0].min() if sv.size else False
    elif k == 2:
        out[valid] = _front_2d(sv)
    else:
        out[valid] = _front_blocks(sv)
    return out


def dominates_any(
    front: np.ndarray, candidates: np.ndarray, maximize: Sequence[bool]
) -> np.ndarray:
    """Bool [M]: for each row of ``candidates`` [M, K], whether some row of ``front`` [F, K]
    dominates it (``maximize`` as in ``pareto_mask``).

    ``front`` need not be a front: any set of rows works. Its rows with a NaN dominate nothing,
    and a candidate with a NaN is dominated by nothing (False). Typical use: the rows of an
    exhaustive grid as ``front`` and a search's Pareto front as ``candidates``; all False
    means the search missed no better point.
    """
    f = _as_minimized(front, maximize)
    c = _as_minimized(candidates, maximize)
    if f.shape[1] != c.shape[1]:
        raise ValueError(f"front has {f.shape[1]} columns, candidates {c.shape[1]}")
    out = np.zeros(c.shape[0], dtype=bool)
    cvalid = _valid_rows(c)
    fv, cv = f[_valid_rows(f)], c[cvalid]
    if f.shape[1] == 2:
        out[cvalid] = _dominated_2d(fv, cv)
    else:
        out[cvalid] = _dominated_pairwise(fv, cv)
    return out


def front_order(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Int [F]: indices of the rows where ``mask`` is True, sorted by the first column of
    ``values`` [N, K] and then the second (ascending, stable), so a 2-D front is drawn or
    written from one end to the other."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    if idx.size == 0 or v.ndim != 2 or v.shape[1] == 0:
        return idx
    keys = [v[idx, c] for c in range(min(2, v.shape[1]))][::-1]
    return idx[np.lexsort(keys)]
