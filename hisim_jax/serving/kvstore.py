"""A remote KV store shared by every replica of a cluster: the L3 tier of Mooncake Store, LMCache
or SGLang HiCache with a storage backend.

Any replica can read a prefix block another replica wrote. Blocks are keyed by their chained
prefix key (a block's key hashes its parent's key and its own id, so equal ids under different
prefixes differ), hold the whole model's KV of their tokens, and are evicted least recently
used first; a path is refreshed from its last block to its first, so parents stay more recent
than their children and leaves go first. Reads and writes each go over one FIFO link of the
store's aggregate bandwidth on the global clock, which every replica shares.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVStoreConfig:
    capacity_tokens: int
    read_bytes_per_s: float = 25e9  # aggregate, over the store's NICs
    write_bytes_per_s: float = 25e9

    def __post_init__(self):
        if self.capacity_tokens <= 0:
            raise ValueError(
                f"shared store capacity must be > 0 tokens, got {self.capacity_tokens}"
            )
        if not (self.read_bytes_per_s > 0 and self.write_bytes_per_s > 0):
            raise ValueError("shared store bandwidths must be > 0")


class KVStore:
    """Block key → tokens, LRU, with read/write links and counters."""

    def __init__(self, cfg: KVStoreConfig):
        self.cfg = cfg
        self.blocks: OrderedDict[int, int] = OrderedDict()  # oldest first
        self.used_tokens = 0
        self.read_busy_until = 0.0
        self.write_busy_until = 0.0
        self.bytes_read = 0.0
        self.bytes_written = 0.0
        self.evicted_tokens = 0

    def __contains__(self, key: int) -> bool:
        return key in self.blocks

    def tokens(self, key: int) -> int:
        return self.blocks.get(key, -1)

    def touch(self, keys) -> None:
        """Mark a path used (keys in path order): leaves end up older than their parents."""
        blocks = self.blocks
        for k in reversed(keys):
            if k in blocks:
                blocks.move_to_end(k)

    def write(self, entries, bytes_per_token: float, now: float) -> float:
        """Store ``(key, tokens)`` blocks of one path (path order) not yet held, evicting the
        least recently used; returns when the write completes. Blocks that cannot fit are
        dropped (the store keeps what it can of the path's beginning)."""
        blocks = self.blocks
        cap = self.cfg.capacity_tokens
        fresh = 0
        for key, tokens in entries:
            if key in blocks:
                continue
            if tokens > cap:
                break
            while self.used_tokens + tokens > cap:
                _, t = blocks.popitem(last=False)
                self.used_tokens -= t
                self.evicted_tokens += t
            blocks[key] = tokens
            self.used_tokens += tokens
            fresh += tokens
        self.touch([k for k, _ in entries])
        return self._book_write(fresh * bytes_per_token, now) if fresh else now

    def _book_write(self, nbytes: float, now: float) -> float:
        start = max(now, self.write_busy_until)
        self.write_busy_until = start + nbytes / self.cfg.write_bytes_per_s
        self.bytes_written += nbytes
        return self.write_busy_until

    def read(self, nbytes: float, now: float) -> float:
        """Book a read of ``nbytes``; returns when it lands."""
        start = max(now, self.read_busy_until)
        self.read_busy_until = start + nbytes / self.cfg.read_bytes_per_s
        self.bytes_read += nbytes
        return self.read_busy_until

    def stats(self) -> dict:
        return {
            "capacity_tokens": self.cfg.capacity_tokens,
            "used_tokens": self.used_tokens,
            "blocks": len(self.blocks),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "evicted_tokens": self.evicted_tokens,
        }

    def check_invariants(self) -> None:
        if self.used_tokens != sum(self.blocks.values()):
            raise AssertionError("shared store usage out of date")
        if self.used_tokens > self.cfg.capacity_tokens:
            raise AssertionError("shared store over capacity")
