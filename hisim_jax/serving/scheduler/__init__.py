"""Scheduler policies: what runs next. ``base`` holds the settings, request state and the view
of an engine that every policy shares; one file per engine's rules."""

from hisim_jax.serving.scheduler.sglang import SGLangPolicy
from hisim_jax.serving.scheduler.vllm import VLLMPolicy

# engine name -> its policy class (the engine builds one per replica)
POLICIES = {"sglang": SGLangPolicy, "vllm": VLLMPolicy}

__all__ = ["POLICIES", "SGLangPolicy", "VLLMPolicy"]
