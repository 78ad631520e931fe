"""Speculative decoding as a replica runs it: a chain draft (EAGLE or MTP with SGLang's
``--speculative-eagle-topk 1``) of ``k`` tokens checked by one verify step of the target.

Each decode step of a speculating replica is a draft pass — ``k`` decode steps of a small
draft model over the running requests — then one verify step of the target over ``k + 1``
tokens per request (its newest token and the ``k`` drafts), batch entries ``(cache_len, k+1)``.
A request then advances by the drafts accepted plus the target's own next token (the bonus).

Acceptance is an expected value, not a draw, so runs are reproducible and every running
request advances alike (a decode stretch stays one vectorized computation): with ``a_i`` the
probability that draft token ``i`` is accepted given the ones before it were, a verify step
yields on average ``g = 1 + sum_{i<=k} prod_{j<=i} a_j`` tokens, and the replica's ``n``-th
verify step (counted over the replica's whole run, so a stretch cut short by an arrival does
not round its tokens down) advances every request by ``floor((n+1)·g) − floor(n·g)`` tokens:
``floor(g)`` or ``ceil(g)``, ``g`` on average. A request never takes more than it has left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hisim_jax.estimator.batch import RaggedBatches, bucket_size

MAX_NUM_STEPS = 64  # draft depth; SGLang's EAGLE runs take 1-8


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """``num_steps`` draft tokens per verify step (SGLang's ``--speculative-num-steps``),
    ``accept_rates[i]``: the probability draft token ``i`` is accepted given the ones before
    it were, and the draft model's depth in decoder layers."""

    num_steps: int
    accept_rates: tuple[float, ...]
    draft_layers: int = 1

    def __post_init__(self):
        if not 1 <= self.num_steps <= MAX_NUM_STEPS:
            raise ValueError(
                f"speculative num_steps must be in [1, {MAX_NUM_STEPS}], got {self.num_steps}"
            )
        rates = tuple(float(a) for a in self.accept_rates)
        if len(rates) != self.num_steps:
            raise ValueError(
                f"speculative accept_rates needs {self.num_steps} rates (one per draft step), "
                f"got {len(rates)}"
            )
        if not all(0.0 <= a <= 1.0 for a in rates):
            raise ValueError(f"speculative accept_rates must lie in [0, 1], got {rates}")
        if self.draft_layers < 1:
            raise ValueError(f"speculative draft_layers must be >= 1, got {self.draft_layers}")
        object.__setattr__(self, "accept_rates", rates)

    @classmethod
    def of(cls, num_steps: int, accept: float | Sequence[float], draft_layers: int = 1):
        """A config from one rate for every draft position or one rate per position."""
        rates = (accept,) * num_steps if np.ndim(accept) == 0 else tuple(accept)
        return cls(num_steps, rates, draft_layers)  # type: ignore[arg-type]

    @property
    def slots(self) -> int:
        """KV slots a request writes in a verify step (the rejected ones are freed after it)."""
        return self.num_steps + 1

    @property
    def tokens_per_step(self) -> float:
        """``g``: expected tokens a verify step yields per request, bonus token included."""
        return 1.0 + float(np.sum(np.cumprod(self.accept_rates)))

    def advance(self, first: int, steps: int) -> np.ndarray:
        """Tokens per request of verify steps ``first .. first + steps - 1`` (int64)."""
        n = np.arange(first, first + steps + 1, dtype=np.float64)
        return np.diff(np.floor(n * self.tokens_per_step).astype(np.int64))


# Planes are padded to a power of two of at least this many requests and costed in calls of a
# fixed number of rows per width (the estimator's decode-stretch shape family), so a run
# compiles a few programs per estimator, not one per (bucket, rows) pair a ragged list makes.
MIN_WIDTH = 64
ROWS = 64
CELLS = 8192


def _first_gpu(seconds) -> np.ndarray:
    out = np.asarray(seconds, dtype=float)
    return out[:, 0] if out.ndim == 2 else out


def _planes_seconds(cost, planes: np.ndarray, prompt: bool) -> np.ndarray:
    """Seconds per row of ``[3, rows, width]`` planes (cache_len, new_len, mask): through the
    estimator's ``padded_latency_s`` in calls of a fixed shape where it has one, else through
    ``step_latency_s`` as a ragged list (a fake in tests, a lookup-table backend)."""
    rows, width = planes.shape[1:]
    if not hasattr(cost, "padded_latency_s"):
        sizes = planes[2].sum(axis=1).astype(np.int64)
        take = planes[2] > 0
        batches = RaggedBatches(planes[0][take], planes[1][take], sizes)
        return _first_gpu(cost.step_latency_s(batches))
    per_call = max(16, min(ROWS, CELLS // width))
    out = np.empty(rows)
    for r0 in range(0, rows, per_call):
        part = planes[:, r0 : r0 + per_call]
        n = part.shape[1]
        if n < per_call:  # rows past the end: no requests (mask 0), costed as nothing
            part = np.concatenate([part, np.zeros((3, per_call - n, width))], axis=1)
        out[r0 : r0 + n] = _first_gpu(cost.padded_latency_s(part, prompt=prompt))[:n]
    return out


def stretch_seconds(
    target,
    draft,
    spec: SpeculativeConfig,
    context: np.ndarray,
    before: np.ndarray,
    active: np.ndarray,
    padded: np.ndarray,
) -> np.ndarray:
    """Seconds of consecutive speculative decode steps (draft pass + verify), ``[m]``.

    Request i holds ``context[i]`` tokens in KV at the first step and ``context[i] +
    before[j]`` at step j, where only the first ``active[j]`` requests still decode (ordered
    by remaining output, longest first); graph replay pads step j to ``padded[j]`` slots with
    empty dummies. The target verifies ``(cache_len, k + 1)`` per request; draft step i of the
    pass decodes one token per request at ``cache_len + i``."""
    k = spec.num_steps
    padded = np.maximum(padded, active)
    width = bucket_size(int(padded.max()), MIN_WIDTH)
    col = np.arange(width)
    live = col < active[:, None]  # [m, width]
    slot = (col < padded[:, None]).astype(np.float64)
    ctx = np.zeros(width, np.float64)
    ctx[: len(context)] = context
    cache = np.where(live, ctx + before[:, None], 0.0)
    verify = _planes_seconds(target, np.stack([cache, slot * (k + 1), slot]), prompt=True)
    steps = np.arange(k, dtype=np.float64)[:, None, None]
    drafts = np.stack(
        [
            (cache + steps * live).reshape(-1, width),  # draft step i: i tokens further
            np.tile(slot, (k, 1)),
            np.tile(slot, (k, 1)),
        ]
    )
    return verify + _planes_seconds(draft, drafts, prompt=False).reshape(k, -1).sum(axis=0)


def prefill_draft_seconds(draft, spec: SpeculativeConfig, pairs, decode_context) -> float:
    """The draft model's share of a prefill (or mixed) step: it runs over the prompt chunks
    too (EAGLE/MTP draft extend: its KV and hidden states must cover the prompt), and a mixed
    step's decodes (vLLM) take their ``k`` draft steps."""
    batches = []
    if pairs:
        batches.append(list(pairs))
    decode_context = list(decode_context)
    if decode_context:
        batches += [[(c + i, 1) for c in decode_context] for i in range(spec.num_steps)]
    if not batches:
        return 0.0
    return float(_first_gpu(draft.step_latency_s(batches)).sum())
