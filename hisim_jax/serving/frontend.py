"""The serving front end a client's timings include and the engine's do not: the HTTP
request and its parsing, tokenization of the prompt, and the first token's way back
(detokenization, the streamed chunk). Both ways are charged on the way in: a request reaches
the engine ``in_s`` after the client sent it, so TTFT and E2E grow by it and TPOT and ITL do
not (a constant delay of every token cancels in them).

vLLM's defaults: ``request_s`` fitted on the client-side TTFT of ../shared/e2e/vllm-h100
(scripts/fit_e2e.py: the mean TTFT residual of the stages served without queueing, after the
engine's own time); the prompt's tokenization at ``per_input_token_s`` (a Rust HF tokenizer
encodes about a million tokens a second on one core; the data's prompts, 575-790 tokens,
are too alike to fit it). ``Frontend()`` is the engine alone (``--frontend off``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Frontend:
    request_s: float = 0.0  # HTTP, parsing and the hand-off to the engine, and the way back
    per_input_token_s: float = 0.0  # tokenizing the prompt

    def __post_init__(self):
        for name in ("request_s", "per_input_token_s"):
            v = getattr(self, name)
            if not (v >= 0 and v < 1e3):
                raise ValueError(f"frontend {name} must be in [0, 1000) s, got {v!r}")

    def in_s(self, input_len: int) -> float:
        """From the client's send to the engine's queue."""
        return self.request_s + self.per_input_token_s * input_len


# request_s: 9.3 ms mean TTFT residual (measured - engine-only prediction) over the 16 stages
# at <= 10 req/s, less the ~0.6 ms of tokenizing their ~600-token prompts (the residual is
# 6-7 ms for Llama-2-7B and CodeLlama-34B, 10-13 ms for Llama-2-70B and Mixtral)
VLLM_FRONTEND = Frontend(request_s=8.7e-3, per_input_token_s=1e-6)
# SGLang: no client-side runs to fit on yet; its HTTP server and tokenizer manager do the same
# work in the same way (a separate process hands tokenized requests to the scheduler), so
# vLLM's figures stand in
FRONTENDS = {"vllm": VLLM_FRONTEND, "sglang": VLLM_FRONTEND}
