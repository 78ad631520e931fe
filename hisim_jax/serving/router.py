"""Global request router over N replicas, after SGLang's sgl-router.

The router sees only what it sends: per replica the requests and tokens it routed that have not
finished yet, and (``cache_aware``) its own approximate index of the prefixes it sent there. It
never looks into an engine's KV cache, exactly like sgl-router's approximate radix tree, so a
prefix the engine already evicted can still attract requests.

Policies (``POLICIES``):

- ``random``: uniform, from ``numpy.random.default_rng(seed)``.
- ``round_robin``: 0, 1, ..., N-1, 0, ...
- ``least_loaded``: fewest outstanding tokens (input + output of in-flight requests).
- ``power_of_two``: two distinct random replicas; fewer outstanding tokens wins, a tie goes to
  the first drawn.
- ``cache_aware``: sgl-router's algorithm. If in-flight request counts are imbalanced
  (``max - min > balance_abs_threshold`` and ``max > balance_rel_threshold * min``), the
  replica with the fewest in-flight requests. Otherwise the replica whose index matches the
  longest prefix of the prompt if that match covers more than ``cache_threshold`` of the prompt,
  else the replica with the smallest index (most cache room). Either way the prompt's blocks
  are then inserted into the chosen replica's index.
- ``bucket``: input-length buckets, each served by a group of replicas; fewest outstanding
  tokens within the group.

Every tie goes to fewer in-flight requests, then to the lowest index. Same seed, same routes.

The index: one LRU ordered dict per replica of chained block keys (block k's key hashes block
k-1's key with id k, so an id only matches under the same prefix), and one dict from key to a
bitmask of the replicas holding it, so matching a prompt against all replicas walks its blocks
once. Routing refreshes the path from the last block to the first, so a parent is always more
recent than its children and evicting from the old end removes leaves first: every index stays
prefix-closed. Python's hash of a tuple of ints does not depend on ``PYTHONHASHSEED``.
Deviation from sgl-router: it trims its tree every ``eviction_interval_secs`` to
``max_tree_size``; here an index is trimmed to ``index_tokens`` right after each insertion, so
its size never exceeds the bound and the result does not depend on a timer.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hisim_jax.serving.workload import Request

POLICIES = ("random", "round_robin", "least_loaded", "power_of_two", "cache_aware", "bucket")

_CHAIN_ROOT = 0x9E3779B97F4A7C15  # key "before" block 0; any fixed int works


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _bad(field: str, value: object, what: str) -> ValueError:
    return ValueError(f"router {field} {value!r} {what}")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Which policy and its knobs. Bucket bounds are exclusive upper bounds: bucket i holds
    ``bucket_bounds[i-1] <= input_len < bucket_bounds[i]``, the last bucket everything from
    ``bucket_bounds[-1]`` up."""

    policy: str = "cache_aware"
    seed: int = 0
    # cache_aware defaults are sgl-router's: RouterArgs in sgl-router/py_src/sglang_router/
    # router_args.py (--cache-threshold 0.3, --balance-abs-threshold 64,
    # --balance-rel-threshold 1.5), the same as the Rust CliArgs defaults. Early sgl-router
    # READMEs showed --cache-threshold 0.5; the current default is 0.3.
    cache_threshold: float = 0.3  # prefix match rate (matched / input tokens) that must be exceeded
    balance_abs_threshold: int = 64  # in-flight requests, max - min
    balance_rel_threshold: float = 1.5  # in-flight requests, max / min
    bucket_bounds: tuple[int, ...] = (2048, 8192)  # exclusive upper bounds, tokens, ascending
    # Replica indices per bucket, len(bucket_bounds) + 1 groups (a replica may serve several
    # buckets); None: the replicas split in order into contiguous, near-equal groups.
    bucket_groups: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise _bad("policy", self.policy, f"unknown (choose from {', '.join(POLICIES)})")
        if not _is_int(self.seed) or self.seed < 0:
            raise _bad("seed", self.seed, "must be a non-negative integer")
        thr = self.cache_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
            raise _bad("cache_threshold", thr, "must be a match rate in [0, 1]")
        if not _is_int(self.balance_abs_threshold) or self.balance_abs_threshold < 0:
            raise _bad(
                "balance_abs_threshold", self.balance_abs_threshold, "must be an integer >= 0"
            )
        rel = self.balance_rel_threshold
        # A ratio of the largest to the smallest load: below 1 the test is always true.
        if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not 1.0 <= rel < np.inf:
            raise _bad("balance_rel_threshold", rel, "must be a finite ratio >= 1")
        bounds = self.bucket_bounds
        if (
            not isinstance(bounds, tuple)
            or not all(_is_int(b) and b > 0 for b in bounds)
            or any(a >= b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        ):
            raise _bad("bucket_bounds", bounds, "must be a tuple of ascending positive integers")
        groups = self.bucket_groups
        if groups is None:
            return
        if not isinstance(groups, tuple) or len(groups) != len(bounds) + 1:
            raise _bad(
                "bucket_groups",
                groups,
                f"must be a tuple of {len(bounds) + 1} groups, one per bucket of {bounds}",
            )
        for g in groups:
            if not isinstance(g, tuple) or not g or not all(_is_int(i) and i >= 0 for i in g):
                raise _bad(
                    "bucket_groups",
                    groups,
                    f"has group {g!r}: not a non-empty tuple of replica indices",
                )
            if len(set(g)) != len(g):
                raise _bad("bucket_groups", groups, f"has group {g!r} with a repeated replica")


def _default_groups(n_replicas: int, n_buckets: int) -> tuple[tuple[int, ...], ...]:
    """Contiguous, near-equal groups in replica order; the first groups get the extra ones."""
    base, extra = divmod(n_replicas, n_buckets)
    groups, start = [], 0
    for g in range(n_buckets):
        size = base + (g < extra)
        groups.append(tuple(range(start, start + size)))
        start += size
    return tuple(groups)


class Router:
    """Routes requests over ``n_replicas`` replicas with ``cfg.policy``; see the module doc.

    ``index_tokens``: per replica, the capacity in tokens of the router's prefix index for
    ``cache_aware`` (None, or 0 for a replica: unbounded). Only ``cache_aware`` keeps an index;
    for the other policies ``matched_tokens`` is always 0.
    """

    def __init__(
        self,
        cfg: RouterConfig,
        n_replicas: int,
        block_tokens: int,
        index_tokens: Sequence[int] | None = None,
    ):
        if not _is_int(n_replicas) or n_replicas < 1:
            raise _bad("n_replicas", n_replicas, "must be an integer >= 1")
        if not _is_int(block_tokens) or block_tokens < 1:
            raise _bad("block_tokens", block_tokens, "must be an integer >= 1")
        n = int(n_replicas)
        if index_tokens is None:
            caps = [0] * n
        else:
            caps = list(index_tokens)
            if len(caps) != n or not all(_is_int(c) and c >= 0 for c in caps):
                raise _bad(
                    "index_tokens",
                    index_tokens,
                    f"must be {n} integers >= 0 (tokens per replica, 0 for unbounded)",
                )
        self.cfg = cfg
        self.n_replicas = n
        self.block_tokens = int(block_tokens)
        self._caps = [int(c) for c in caps]
        self._rng = np.random.default_rng(cfg.seed)
        self._next_rr = 0
        # Plain lists, not arrays: route() reads and updates single entries, where a list is
        # several times faster than numpy scalar indexing. The public views are array copies.
        self._tokens = [0] * n
        self._requests = [0] * n
        self._routed = [0] * n
        # cache_aware index: per replica key -> block tokens in LRU order (oldest first), its
        # size in tokens, and per key the bitmask of replicas holding it.
        self._lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(n)]
        self._index_used = [0] * n
        self._owners: dict[int, int] = {}
        self._groups: tuple[tuple[int, ...], ...] = ()
        if cfg.policy == "bucket":
            self._groups = self._check_groups(cfg, n)
        self._route_fn = {
            "random": self._route_random,
            "round_robin": self._route_round_robin,
            "least_loaded": self._route_least_loaded,
            "power_of_two": self._route_power_of_two,
            "cache_aware": self._route_cache_aware,
            "bucket": self._route_bucket,
        }[cfg.policy]

    @staticmethod
    def _check_groups(cfg: RouterConfig, n: int) -> tuple[tuple[int, ...], ...]:
        n_buckets = len(cfg.bucket_bounds) + 1
        if cfg.bucket_groups is None:
            if n < n_buckets:
                raise _bad(
                    "n_replicas",
                    n,
                    f"too few for {n_buckets} buckets (bucket_bounds={cfg.bucket_bounds}): "
                    "give fewer bounds or explicit bucket_groups",
                )
            return _default_groups(n, n_buckets)
        for g in cfg.bucket_groups:
            for i in g:
                if i >= n:
                    raise _bad(
                        "bucket_groups",
                        cfg.bucket_groups,
                        f"names replica {i}, out of range for {n} replicas",
                    )
        return tuple(tuple(int(i) for i in g) for g in cfg.bucket_groups)

    # -- public state (copies: mutate through route/finish only) ------------------------------

    @property
    def outstanding_tokens(self) -> np.ndarray:
        """Per replica: sum of input_len + output_len over routed, unfinished requests."""
        return np.array(self._tokens, dtype=np.int64)

    @property
    def outstanding_requests(self) -> np.ndarray:
        """Per replica: routed, unfinished requests."""
        return np.array(self._requests, dtype=np.int64)

    @property
    def routed(self) -> np.ndarray:
        """Per replica: requests routed so far."""
        return np.array(self._routed, dtype=np.int64)

    @property
    def index_size_tokens(self) -> np.ndarray:
        """Per replica: tokens in the router's prefix index (cache_aware; else zeros)."""
        return np.array(self._index_used, dtype=np.int64)

    # -- routing ------------------------------------------------------------------------------

    def route(self, req: Request, now: float) -> int:
        """Pick a replica for req, and record it: its load grows and (cache_aware) its index
        learns req's blocks. Deterministic for a seed. ``now`` is accepted for policies that
        age state; none of the current ones do."""
        r = self._route_fn(req)
        self._tokens[r] += req.input_len + req.output_len
        self._requests[r] += 1
        self._routed[r] += 1
        return r

    def finish(self, req: Request, replica: int, now: float) -> None:
        """req left ``replica`` (completed or rejected): its load shrinks."""
        if not 0 <= replica < self.n_replicas:
            raise _bad("replica", replica, f"out of range for {self.n_replicas} replicas")
        if self._requests[replica] <= 0:
            # Finishing a request that was never routed there would corrupt the loads silently.
            raise _bad("replica", replica, f"has no in-flight request to finish ({req.request_id})")
        self._tokens[replica] -= req.input_len + req.output_len
        self._requests[replica] -= 1

    def matched_tokens(self, req: Request, replica: int) -> int:
        """Prompt tokens the router's index believes ``replica`` has cached for req."""
        lru = self._lru[replica]
        k = 0
        for key in self._chain(req)[0]:
            if key not in lru:
                break
            k += 1
        return min(k * self.block_tokens, req.input_len)

    def _least_requests(self, mask: int) -> int:
        """Among the replicas in a bitmask: fewest in-flight requests, then lowest index."""
        best, best_load = -1, 0
        while mask:
            low = mask & -mask
            i = low.bit_length() - 1
            load = self._requests[i]
            if best < 0 or load < best_load:
                best, best_load = i, load
            mask ^= low
        return best

    def _route_random(self, req: Request) -> int:
        return int(self._rng.integers(self.n_replicas))

    def _route_round_robin(self, req: Request) -> int:
        r = self._next_rr
        self._next_rr = (r + 1) % self.n_replicas
        return r

    def _route_least_loaded(self, req: Request) -> int:
        tokens = self._tokens
        return tokens.index(min(tokens))

    def _route_power_of_two(self, req: Request) -> int:
        n = self.n_replicas
        if n == 1:
            return 0
        a = int(self._rng.integers(n))
        b = int(self._rng.integers(n - 1))
        b += b >= a  # second draw uniform over the other n-1 replicas
        return b if self._tokens[b] < self._tokens[a] else a

    def _route_bucket(self, req: Request) -> int:
        group = self._groups[bisect.bisect_right(self.cfg.bucket_bounds, req.input_len)]
        tokens = self._tokens
        return min(group, key=lambda i: (tokens[i], i))

    def _route_cache_aware(self, req: Request) -> int:
        cfg = self.cfg
        loads = self._requests
        hi, lo = max(loads), min(loads)
        keys, sizes = self._chain(req)
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            r = loads.index(lo)
        else:
            blocks, holders = self._longest_match(keys)
            rate = min(blocks * self.block_tokens, req.input_len) / req.input_len
            if rate > cfg.cache_threshold:
                r = self._least_requests(holders)
            else:
                used = self._index_used
                smallest = min(used)
                r = min(
                    (i for i in range(self.n_replicas) if used[i] == smallest),
                    key=lambda i: (loads[i], i),
                )
        self._insert(r, keys, sizes)
        return r

    # -- the approximate prefix index ---------------------------------------------------------

    def _chain(self, req: Request) -> tuple[list[int], list[int]]:
        """Chained keys and token sizes of req's blocks (at most ceil(input_len / block))."""
        bt = self.block_tokens
        n_blocks = min(len(req.block_ids), -(-req.input_len // bt))
        keys, sizes = [], []
        key = _CHAIN_ROOT
        for k in range(n_blocks):
            key = hash((key, req.block_ids[k]))
            keys.append(key)
            sizes.append(min(bt, req.input_len - k * bt))
        return keys, sizes

    def _longest_match(self, keys: list[int]) -> tuple[int, int]:
        """(blocks, bitmask of replicas) of the longest prefix of keys held by any replica."""
        owners = self._owners
        alive = (1 << self.n_replicas) - 1
        for k, key in enumerate(keys):
            still = alive & owners.get(key, 0)
            if not still:
                return k, alive
            alive = still
        return len(keys), alive

    def _insert(self, r: int, keys: list[int], sizes: list[int]) -> None:
        lru, owners, bit = self._lru[r], self._owners, 1 << r
        used = self._index_used[r]
        # Last block first: each parent ends up more recent than its children, so the LRU end
        # always holds leaves and eviction keeps the index prefix-closed.
        for k in range(len(keys) - 1, -1, -1):
            key, size = keys[k], sizes[k]
            old = lru.get(key)
            if old is None:
                lru[key] = size
                owners[key] = owners.get(key, 0) | bit
                used += size
            else:
                lru.move_to_end(key)
                if size > old:  # a partial last block seen again as a full one
                    lru[key] = size
                    used += size - old
        cap = self._caps[r]
        if cap:
            while used > cap:
                key, size = lru.popitem(last=False)
                left = owners[key] & ~bit
                if left:
                    owners[key] = left
                else:
                    del owners[key]
                used -= size
        self._index_used[r] = used
