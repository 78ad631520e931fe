"""Wiring for ``hisim simulate``: options → workload, estimator and engine → metrics and files.

``SimulationOptions`` is the one frozen record of a run (what a YAML ``--config`` holds);
``run`` performs it and ``write_outputs`` writes ``requests.csv``, ``steps.csv`` and
``summary.json`` through temporary files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hisim_jax import files, specs
from hisim_jax.estimator.backends import BACKENDS, make_estimator
from hisim_jax.estimator.ops import DTYPE_BYTES
from hisim_jax.estimator.roofline import Estimator
from hisim_jax.serving import workload as wl
from hisim_jax.serving.cluster import SESSION_MODES, Cluster, KVLink, Replica
from hisim_jax.serving.engine import Engine, EngineConfig, StepCost
from hisim_jax.serving.frontend import FRONTENDS, Frontend
from hisim_jax.serving.kvstore import KVStore, KVStoreConfig
from hisim_jax.serving.memory import (
    MEM_FRACTION_STATIC,
    VLLM_GPU_MEMORY_UTILIZATION,
    cache_config,
    size_replica,
    state_grid,
    vllm_reserved_bytes,
)
from hisim_jax.serving.metrics import (
    CPU_PRICE_USD_PER_HOUR,
    SLO,
    cluster_request_frame,
    cluster_step_frame,
    cluster_summary,
    summary,
)
from hisim_jax.serving.router import Router, RouterConfig
from hisim_jax.serving.scheduler.base import SchedulerConfig
from hisim_jax.serving.scheduler.vllm import VLLM_BLOCK_SIZE, vllm_defaults, vllm_max_capture_size
from hisim_jax.serving.speculative import MAX_NUM_STEPS, SpeculativeConfig
from hisim_jax.specs import ModelSpec, SpecError

# Numeric options and the range each must lie in: (lowest, whether lowest itself is allowed,
# highest or None). Checked up front so a bad value is named with its field, not found deep in a
# run. The upper bounds keep the run finite: a link slower than 1 MB/s, a step overhead above
# 1000 s or a latency above 1000 s pushes the float clock towards infinity; a tier above a
# petabyte per GPU overflows the token counts; a larger CUDA-graph table or fleet exhausts memory.
MAX_REPLICAS = 4096
_LINK_GB_S = (1e-3, True, 1e6)
_RANGES = {
    "tp": (1, True, 1024),
    "ep": (1, True, 1024),
    "dp_attention": (1, True, 1024),
    "limit": (1, True, None),
    "max_concurrency": (1, True, None),
    "rate_scale": (0, False, None),  # and arrivals within wl.MAX_SPAN_S, checked by select
    "start_s": (0, True, None),
    "end_s": (0, True, None),
    "seed": (0, True, None),
    "block_tokens": (1, True, None),
    "l1_fraction": (0, False, 1),
    "gpu_memory_utilization": (0, False, 1),
    "kv_cache_tokens": (1, True, None),
    "max_num_batched_tokens": (1, True, None),
    "max_num_seqs": (1, True, None),
    "max_model_len": (2, True, None),
    "l2_gb": (0, True, 1e6),
    "l3_gb": (0, True, 1e6),
    "l2_gb_s": _LINK_GB_S,
    "l3_gb_s": _LINK_GB_S,
    "page_size": (1, True, None),
    "chunked_prefill_size": (1, True, None),
    "max_prefill_tokens": (1, True, None),
    "max_running_requests": (1, True, None),
    "cuda_graph_max_bs": (1, True, 65536),
    "step_overhead_ms": (0, True, 1e6),
    "slo_ttft_ms": (0, False, None),
    "slo_tpot_ms": (0, False, None),
    "gpu_price_usd_per_hour": (0, True, 1e6),
    "cpu_price_usd_per_hour": (1e-6, True, 1e6),
    "replicas": (1, True, MAX_REPLICAS),
    "kv_link_gb_s": _LINK_GB_S,
    "kv_link_latency_us": (0, True, 1e9),
    "l3_shared_gb": (0, True, 1e9),
    "l3_shared_gb_s": _LINK_GB_S,
    "speculative_num_steps": (0, True, MAX_NUM_STEPS),
    "speculative_draft_layers": (1, True, 1024),
}
DEFAULT_ACCEPT_RATE = 0.7  # per draft position, when speculating without a rate given


# options that belong to one engine's scheduler or memory accounting, and their counterparts
ENGINE_ONLY = {
    "sglang": ("l1_fraction", "chunked_prefill_size", "max_prefill_tokens", "max_running_requests"),
    "vllm": ("gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs"),
}
_COUNTERPART = {
    "l1_fraction": "gpu_memory_utilization",
    "gpu_memory_utilization": "l1_fraction",
    "chunked_prefill_size": "max_num_batched_tokens",
    "max_prefill_tokens": "max_num_batched_tokens",
    "max_num_batched_tokens": "chunked_prefill_size and max_prefill_tokens",
    "max_running_requests": "max_num_seqs",
    "max_num_seqs": "max_running_requests",
}


def parse_accept_rates(v, where: str = "options") -> float | tuple[float, ...]:
    """``speculative_accept_rate`` as given: one rate (a number or ``"0.7"``) or one per
    draft position (a list, or ``"0.8,0.6,0.4"``). Ranges are checked by the options."""
    bad = SpecError(
        f"{where}: field 'speculative_accept_rate' has an invalid value {v!r} "
        "(expected a rate in [0, 1] or one per draft step, e.g. 0.8,0.6,0.4)"
    )
    if isinstance(v, str):
        parts = [x.strip() for x in v.split(",")]
        try:
            rates = tuple(float(x) for x in parts)
        except ValueError:
            raise bad from None
        return rates[0] if len(rates) == 1 else rates
    if isinstance(v, (list, tuple)):
        if not v or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            raise bad
        return tuple(float(x) for x in v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad
    return float(v)


def range_error(name: str, v, lo, closed: bool = True, hi=None) -> str | None:
    """Why number ``v`` is out of range for field ``name`` (None if it is in range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"field '{name}' must be a number, got {v!r}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"field '{name}' must be a finite number, got {v!r}"
    if v < lo if closed else v <= lo:  # name the bound that is broken
        return f"field '{name}' must be {'>=' if closed else '>'} {lo:g}, got {v!r}"
    if hi is not None and v > hi:
        return f"field '{name}' must be <= {hi:g}, got {v!r}"
    return None


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    model: str = "llama-3.1-8b"
    hardware: str = "h100-sxm"
    tp: int = 1
    # linear layers' format [the checkpoint's: its quantization_config, e.g. DeepSeek-V3's fp8,
    # gpt-oss's MXFP4 experts]; one name quantizes them all
    weight_dtype: str | None = None
    kv_dtype: str = "bf16"
    # expert parallelism (SGLang --ep-size, vLLM --enable-expert-parallel): ranks the routed
    # experts are spread over [1]; attention data parallelism (SGLang --enable-dp-attention
    # --dp N): ranks that each run attention for their own requests [1]; both divide tp
    ep: int = 1
    dp_attention: int = 1
    calibration: str | None = None
    # step-latency backend (estimator/backends.py): roofline, aiconfigurator or table
    estimator: str = "roofline"
    estimator_table: str | None = None  # steps.csv (model, batch, step_ms) of estimator table
    extrapolate: bool = False  # estimator table: predict batches outside its data's range
    # workload: a trace, or a built-in one: "chat" (multi-turn chat) or "agent" (coding-agent
    # sessions, workload.agent_sessions)
    workload: str = "chat"
    # sessions: "closed" sends a session's next turn its think time after the previous reply
    # ends (cluster.py), "open" at the times the workload recorded [closed for the built-in
    # workloads, open for traces]
    sessions: str | None = None
    # a client that keeps at most this many requests in flight (bench_serving's
    # --max-concurrency): later ones wait for a slot and are timed from when sent [no limit]
    max_concurrency: int | None = None
    # the built-in workloads' think (chat) / tool (agent) time: fixed:S, exponential:MEAN,
    # lognormal:MEAN[:SIGMA] or empirical:FILE [chat exponential:10; agent: TraceLab's]
    think_time: str | None = None
    trace: str | None = None
    trace_format: str = "mooncake"
    limit: int | None = None
    rate_scale: float = 1.0
    start_s: float | None = None
    end_s: float | None = None
    skip_bad_lines: bool = False
    block_tokens: int | None = None  # prefix block of a jsonl/csv/sharegpt trace [512; 64]
    seed: int = 0
    # the engine whose scheduler and defaults are simulated: "sglang" or "vllm"
    engine: str = "sglang"
    # the serving front end in client-side latencies (serving/frontend.py): "on" or "off"
    frontend: str = "on"
    # KV cache (capacity: kv_cache_tokens, else the engine's own memory accounting)
    l1_fraction: float | None = None  # SGLang's mem_fraction_static [0.88]
    gpu_memory_utilization: float | None = None  # vLLM's [0.9]
    kv_cache_tokens: int | None = None  # SGLang max_total_tokens, vLLM num_gpu_blocks x block
    l2_gb: float = 0.0
    l3_gb: float = 0.0
    l2_gb_s: float | None = None  # L1<->L2 link per GPU (default: PCIe from the spec)
    l3_gb_s: float | None = None  # L2<->L3 link per GPU (default: the spec's SSD)
    page_size: int | None = None  # [SGLang 1, vLLM 16 (its block size)]
    eviction: str = "lru"
    write_policy: str = "write_through"
    # scheduler: SGLang's knobs (None: its defaults, scheduler.base.SchedulerConfig) ...
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int | None = None
    max_running_requests: int | None = None
    schedule_policy: str = "fcfs"
    preemption: str = "recompute"
    prefetch_policy: str = "best_effort"
    # ... vLLM's (None: its defaults by GPU memory, scheduler.vllm)
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    # longest prompt + output served (vLLM --max-model-len, SGLang --context-length) [model's]
    max_model_len: int | None = None
    cuda_graph_max_bs: int | None = None  # largest captured batch [SGLang 160, vLLM 2 x seqs]
    step_overhead_ms: float = 0.0
    # SLOs for goodput, and prices
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    gpu_price_usd_per_hour: float | None = None
    cpu_price_usd_per_hour: float = CPU_PRICE_USD_PER_HOUR
    # cluster: replicas behind a router, optionally prefill/decode disaggregated
    replicas: int = 1
    fleet: str | None = (
        None  # "h100-sxm:1x6,h200-sxm:2x2" (HARDWARE[:TP]xCOUNT); overrides the two above
    )
    router: str = "cache_aware"
    bucket_bounds: str = "2048,8192"  # input-length bounds of the bucket router
    pd: str | None = None  # "P:D": the first P replicas prefill, the other D decode
    kv_link_gb_s: float = 45.0  # prefill -> decode KV bandwidth per GPU
    kv_link_latency_us: float = 20.0
    l3_shared_gb: float = 0.0  # a KV store shared by all replicas (instead of a local L3)
    l3_shared_gb_s: float = 25.0  # its aggregate read and write bandwidth
    # speculative decoding (serving/speculative.py): draft tokens per verify step (0: off;
    # SGLang's --speculative-num-steps), the probability each draft token is accepted given
    # the ones before it were (one rate, or one per draft step) [0.7], and the draft model's
    # decoder layers [the model's MTP layers, else 1]
    speculative_num_steps: int = 0
    speculative_accept_rate: float | tuple[float, ...] | None = None
    speculative_draft_layers: int | None = None

    def __post_init__(self):
        for name, (lo, closed, hi) in _RANGES.items():
            v = getattr(self, name)
            if v is not None and (why := range_error(name, v, lo, closed, hi)):
                raise ValueError(why)
        self._check_speculative()
        if self.engine not in ENGINE_ONLY:
            raise ValueError(
                f"field 'engine' must be one of {', '.join(ENGINE_ONLY)}, got {self.engine!r}"
            )
        for other, names in ENGINE_ONLY.items():
            for name in names if other != self.engine else ():
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"field '{name}' is an option of engine {other}, not {self.engine} "
                        f"(its counterpart: {_COUNTERPART[name]})"
                    )
        if self.estimator not in BACKENDS:
            raise ValueError(
                f"field 'estimator' must be one of {', '.join(BACKENDS)}, got {self.estimator!r}"
            )
        if (self.estimator == "table") != (self.estimator_table is not None):
            raise ValueError(
                "field 'estimator_table' (a steps.csv) is needed by estimator table and only by it"
            )
        if self.workload not in BUILTIN_WORKLOADS:
            raise ValueError(
                f"field 'workload' must be one of {', '.join(BUILTIN_WORKLOADS)}, "
                f"got {self.workload!r}"
            )
        if self.trace is not None and self.workload != "chat":
            raise ValueError(
                f"field 'workload' {self.workload!r} picks a built-in workload; a trace is "
                "its own workload (give one or the other)"
            )
        if self.sessions is not None and self.sessions not in SESSION_MODES:
            raise ValueError(
                f"field 'sessions' must be one of {', '.join(SESSION_MODES)}, got {self.sessions!r}"
            )
        if self.think_time is not None:
            if self.trace is not None:
                raise ValueError(
                    "field 'think_time' sets the built-in workloads' think times; a trace "
                    "keeps its own (its recorded gaps)"
                )
            try:
                wl.ThinkTime.parse(self.think_time)
            except wl.WorkloadError as e:
                raise ValueError(f"field 'think_time': {e}") from None
        if self.frontend not in ("on", "off"):
            raise ValueError(f"field 'frontend' must be on or off, got {self.frontend!r}")
        if self.engine == "vllm":
            for name, value, only in (
                ("schedule_policy", self.schedule_policy, "fcfs"),
                ("preemption", self.preemption, "recompute"),
            ):
                if value != only:
                    raise ValueError(f"field '{name}' {value!r}: vLLM V1 supports {only!r} only")

    def _check_speculative(self) -> None:
        name, rate, k = (
            "speculative_accept_rate",
            self.speculative_accept_rate,
            self.speculative_num_steps,
        )
        if isinstance(rate, list):  # from Python: kept as a tuple (options are frozen)
            rate = tuple(rate)
            object.__setattr__(self, name, rate)
        for other, v in ((name, rate), ("speculative_draft_layers", self.speculative_draft_layers)):
            if v is not None and k == 0:
                raise ValueError(f"field '{other}' needs speculative_num_steps >= 1, got 0")
        if rate is None:
            return
        rates = rate if isinstance(rate, tuple) else (rate,)
        for v in rates:
            if why := range_error(name, v, 0, True, 1):
                raise ValueError(why)
        if isinstance(rate, tuple) and len(rate) != k:
            raise ValueError(
                f"field '{name}' needs one rate or {k} (one per draft step of "
                f"speculative_num_steps {k}), got {len(rate)}: {','.join(map(str, rate))}"
            )

    def speculative(self, model: ModelSpec) -> SpeculativeConfig | None:
        """The speculative decoding a replica of ``model`` runs, or None (off)."""
        k = self.speculative_num_steps
        if not k:
            return None
        rate = (
            DEFAULT_ACCEPT_RATE
            if self.speculative_accept_rate is None
            else self.speculative_accept_rate
        )
        return SpeculativeConfig.of(
            k, rate, draft_spec(model, self.speculative_draft_layers).num_layers
        )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict) -> SimulationOptions:
        """Options from a YAML mapping (keys as the CLI flags, - or _), then ``overrides``."""
        return cls.from_config(read_config(path), overrides, where=str(path))

    @classmethod
    def from_config(cls, config: dict, overrides: dict, where: str) -> SimulationOptions:
        """Options from a mapping ``read_config`` returned, then ``overrides``."""
        values = {k: v for k, v in config.items() if k != "out"}  # where to write, not what
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.checked(values, where=where)

    @classmethod
    def resolve(cls, config: str | Path | None, given: dict) -> SimulationOptions:
        """Options from a YAML file overridden by the flags given (None: not given), or from
        the flags alone."""
        if config is not None:
            return cls.from_yaml(config, given)
        return cls.checked({k: v for k, v in given.items() if v is not None})

    @classmethod
    def checked(cls, values: dict, where: str = "options") -> SimulationOptions:
        """Build with type checks: one-line errors naming the field and value."""
        out = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if f.name == "speculative_accept_rate" and v is not None:
                out[f.name] = parse_accept_rates(v, where)  # a rate or a list of them
                continue
            kind = str(f.type)
            try:
                if v is None and "None" in kind:
                    out[f.name] = None
                elif kind.startswith("int"):
                    if isinstance(v, bool) or float(v) != int(float(v)):
                        raise ValueError
                    out[f.name] = int(float(v))
                elif kind.startswith("float"):
                    if isinstance(v, bool):
                        raise ValueError
                    out[f.name] = float(v)
                elif kind.startswith("bool"):
                    if not isinstance(v, bool):
                        raise ValueError
                    out[f.name] = v
                else:
                    out[f.name] = str(v)
            except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
                raise SpecError(f"{where}: field '{f.name}' has an invalid value {v!r}") from None
        try:
            return cls(**out)
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None


def read_config(path: str | Path) -> dict:
    """A simulate config file: its mapping with keys as option names (``out`` included).

    Read strictly (``files.read_yaml``): a key given twice, also as ``rate-scale`` and
    ``rate_scale``, and ``.inf``/``.nan`` values are errors naming the field."""
    path = Path(path)
    # an empty file is an error (a mistake, not "all defaults"); one of only comments is {}
    doc = files.read_yaml(path, "mapping of simulate options (YAML)", SpecError) or {}
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping of options, got {type(doc).__name__}")
    known = {f.name for f in fields(SimulationOptions)} | {"out"}
    values: dict = {}
    spelled: dict[str, str] = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SpecError(f"{path}: field '{key}' is not an option of simulate")
        if name in values:
            raise SpecError(
                f"{path}: field '{name}' is given twice (as '{spelled[name]}' and '{key}')"
            )
        values[name], spelled[name] = value, str(key)
    if "out" in values and not isinstance(values["out"], str):
        raise SpecError(f"{path}: field 'out' must be a folder path, got {values['out']!r}")
    return values


@dataclass(frozen=True, slots=True)
class SimulationRun:
    options: SimulationOptions
    workload: wl.Workload
    summary: dict
    requests: object  # pandas DataFrame
    steps: object  # pandas DataFrame


BUILTIN_WORKLOADS = ("chat", "agent")


def sessions_mode(o: SimulationOptions) -> str:
    """Closed loop for the built-in workloads, open for traces, unless set."""
    if o.sessions is not None:
        return o.sessions
    return "closed" if o.trace is None else "open"


def build_workload(o: SimulationOptions) -> wl.Workload:
    if o.trace is None:
        think = None if o.think_time is None else wl.ThinkTime.parse(o.think_time)
        if o.workload == "agent":
            w = wl.default_agent(seed=o.seed, tool_time=think)
        else:
            w = wl.default_chat(seed=o.seed, think=think)
        return wl.select(
            w, start_s=o.start_s, end_s=o.end_s, limit=o.limit, rate_scale=o.rate_scale
        )
    extra = {} if o.block_tokens is None else {"block_tokens": o.block_tokens}
    if str(o.trace_format).lower() == "sharegpt":
        extra["seed"] = o.seed  # conversation starts are drawn (the file has no times)
    return wl.load_trace(
        o.trace,
        o.trace_format,
        skip_bad_lines=o.skip_bad_lines,
        limit=o.limit,
        rate_scale=o.rate_scale,
        start_s=o.start_s,
        end_s=o.end_s,
        **extra,
    )


def parse_fleet(o: SimulationOptions) -> list[tuple[str, int]]:
    """(hardware, tp) per replica: ``fleet`` groups, else ``replicas`` copies (``P + D`` of
    them with ``pd``)."""
    return replica_kinds(o.fleet, o.hardware, o.tp, o.replicas, o.pd)


def replica_kinds(
    fleet: str | None, hardware: str, tp: int, replicas: int, pd: str | None
) -> list[tuple[str, int]]:
    """``parse_fleet`` of these option values (the configuration search counts a point's
    GPUs with it before the point is checked as a whole)."""
    if fleet:
        out = []
        for group in fleet.split(","):
            spec, _, count = group.strip().rpartition("x")
            hw, _, tp_text = spec.partition(":")
            try:
                n, tp_n = int(count), int(tp_text or tp)
                if not hw or n < 1 or tp_n < 1:
                    raise ValueError
            except ValueError:
                raise SpecError(
                    f"options: field 'fleet' has an invalid group {group!r} "
                    "(expected HARDWARE[:TP]xCOUNT, e.g. h100-sxm:2x4)"
                ) from None
            out += [(hw, tp_n)] * n
            if len(out) > MAX_REPLICAS:
                raise SpecError(
                    f"options: field 'fleet' must have at most {MAX_REPLICAS} replicas, "
                    f"got {fleet!r}"
                )
        return out
    n = replicas
    if pd:
        p, d = parse_pd(pd)
        if n not in (1, p + d):
            raise SpecError(f"options: --pd {pd} needs {p + d} replicas, got replicas={n}")
        n = p + d
    if n < 1:
        raise SpecError(f"options: field 'replicas' must be >= 1, got {n}")
    return [(hardware, tp)] * n


def parse_pd(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
        if p < 1 or d < 1:
            raise ValueError
    except ValueError:
        raise SpecError(
            f"options: field 'pd' has an invalid value {text!r} (expected PREFILL:DECODE, e.g. 2:6)"
        ) from None
    return p, d


def _bucket_bounds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise SpecError(
            f"options: field 'bucket_bounds' has an invalid value {text!r} (expected e.g. 2048,8192)"
        ) from None


def scheduler_config(o: SimulationOptions, gpu) -> SchedulerConfig:
    """The engine's scheduler knobs: the options given, else that engine's defaults (vLLM's
    depend on the GPU's memory)."""
    overhead = o.step_overhead_ms / 1e3
    if o.engine == "vllm":
        budget, seqs = vllm_defaults(gpu.hbm_bytes, gpu.name)
        budget = o.max_num_batched_tokens or budget
        seqs = o.max_num_seqs or seqs
        return SchedulerConfig(
            chunked_prefill_size=budget,
            max_prefill_tokens=budget,
            max_running_requests=seqs,
            prefetch_policy=o.prefetch_policy,
            cuda_graph_max_bs=o.cuda_graph_max_bs or vllm_max_capture_size(seqs, budget),
            step_overhead_s=overhead,
        )
    d = SchedulerConfig()
    return SchedulerConfig(
        chunked_prefill_size=o.chunked_prefill_size or d.chunked_prefill_size,
        max_prefill_tokens=o.max_prefill_tokens or d.max_prefill_tokens,
        max_running_requests=o.max_running_requests or d.max_running_requests,
        schedule_policy=o.schedule_policy,
        preemption=o.preemption,
        prefetch_policy=o.prefetch_policy,
        cuda_graph_max_bs=o.cuda_graph_max_bs or d.cuda_graph_max_bs,
        step_overhead_s=overhead,
    )


def cap_running(sched: SchedulerConfig, sizing) -> SchedulerConfig:
    """At most as many running requests as the memory reserved slots for (a model with
    windowed KV or recurrent states: serving/memory.size_replica), as SGLang caps
    max_running_requests by its Mamba pool."""
    cap = sizing.max_requests
    if cap is None or cap >= sched.max_running_requests:
        return sched
    return dataclasses.replace(
        sched, max_running_requests=cap, cuda_graph_max_bs=min(sched.cuda_graph_max_bs, cap)
    )


def max_context(o: SimulationOptions, model) -> int:
    """The context window served: ``max_model_len`` if given (at most the model's, as both
    engines refuse a longer one), else the model's ``max_position_embeddings``."""
    own = model.max_position_embeddings
    if o.max_model_len is None:
        return own
    if own and o.max_model_len > own:
        raise SpecError(
            f"options: field 'max_model_len' must be <= {model.name}'s context window {own}, "
            f"got {o.max_model_len}"
        )
    return o.max_model_len


def memory_share(o: SimulationOptions, model, tp: int, sched: SchedulerConfig):
    """(share of HBM for weights + KV + reserve, bytes reserved besides the weights) under the
    engine's accounting: SGLang's mem_fraction_static holds weights and KV; vLLM's
    gpu_memory_utilization also holds the forward pass's peak activations."""
    if o.engine == "vllm":
        util = o.gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION
        return util, vllm_reserved_bytes(model, tp, sched.max_prefill_tokens)
    return (o.l1_fraction or MEM_FRACTION_STATIC), 0.0


def step_estimator(o: SimulationOptions, hardware: str, tp: int) -> StepCost:
    """The step-latency estimator the options name, for one kind of replica (the configuration
    search's screen prices its steady states with the same one)."""
    try:
        if o.estimator == "roofline":  # without a calibration: the engine's for the GPU
            return Estimator(o.model, hardware, tp, o.weight_dtype, o.kv_dtype, o.calibration,
                             engine=o.engine, ep=o.ep, dp=o.dp_attention)  # fmt: skip
        if o.ep > 1 or o.dp_attention > 1:
            raise SpecError(
                f"options: ep and dp_attention are modelled by the roofline estimator only, "
                f"not {o.estimator}"
            )
        return make_estimator(
            o.estimator, o.model, hardware, tp, o.weight_dtype, o.kv_dtype,
            calibration=o.calibration, table=o.estimator_table, extrapolate=o.extrapolate,
            engine=o.engine,
        )  # fmt: skip
    except SpecError:
        raise
    except ValueError as e:  # a combination of options (tp, dtypes) the model refuses
        raise SpecError(f"options: {e}") from None


def draft_spec(model: ModelSpec, layers: int | None = None) -> ModelSpec:
    """The draft model of speculative decoding: ``layers`` decoder layers of the target's
    shape with its embedding and LM head (default: the model's MTP layers, else 1)."""
    return specs.draft_model(model, layers)


def draft_estimator(o: SimulationOptions, target: StepCost, hardware: str, tp: int) -> StepCost:
    """The draft model's step cost beside the target's: always the roofline (a lookup table
    or aiconfigurator has no draft model), with the engine's calibration for the GPU."""
    spec = draft_spec(target.model, o.speculative_draft_layers)
    calibration = o.calibration if o.estimator == "roofline" else None
    try:
        return Estimator(spec, hardware, tp, o.weight_dtype, o.kv_dtype, calibration,
                         engine=o.engine, ep=o.ep if spec.is_moe else 1,
                         dp=o.dp_attention)  # fmt: skip
    except ValueError as e:
        raise SpecError(f"options: draft model: {e}") from None


def build_cluster(o: SimulationOptions, block_tokens: int) -> Cluster:
    """Replicas (one estimator per distinct GPU and TP degree), router and KV link."""
    fleet = parse_fleet(o)
    n_prefill = parse_pd(o.pd)[0] if o.pd else len(fleet)
    if o.pd and not 0 < n_prefill < len(fleet):
        raise SpecError(f"options: --pd {o.pd} does not split a fleet of {len(fleet)} replicas")
    if o.l3_shared_gb and o.l3_gb:
        raise SpecError("options: give either l3_gb (per replica) or l3_shared_gb, not both")
    if o.write_policy == "write_back" and (o.l3_gb or o.l3_shared_gb) and not o.l2_gb:
        raise SpecError(
            "options: write_back moves evicted blocks down through L2, so an L3 tier without "
            "l2_gb would stay empty (give l2_gb > 0, or use write_through)"
        )
    estimators: dict[tuple[str, int], StepCost] = {}
    drafts: dict[tuple[str, int], StepCost] = {}
    replicas = []
    store = None
    for i, (hw, tp) in enumerate(fleet):
        est = estimators.get((hw, tp))
        if est is None:
            est = estimators[hw, tp] = step_estimator(o, hw, tp)
        spec = o.speculative(est.model)
        draft = None
        if spec is not None:
            draft = drafts.get((hw, tp))
            if draft is None:
                draft = drafts[hw, tp] = draft_estimator(o, est, hw, tp)
        gpu = est.hardware[0]
        sched = scheduler_config(o, gpu)
        try:
            sizing = size_replica(
                est.model, gpu, tp, o.weight_dtype, DTYPE_BYTES[o.kv_dtype],
                *memory_share(o, est.model, tp, sched), o.l2_gb, o.l3_gb,
                kv_tokens=o.kv_cache_tokens, max_requests=sched.max_running_requests,
                dp=o.dp_attention, draft=None if draft is None else draft.model,
            )  # fmt: skip
        except ValueError as e:
            raise SpecError(f"options: {e}") from None
        sched = cap_running(sched, sizing)
        role = "unified" if not o.pd else "prefill" if i < n_prefill else "decode"
        context = max_context(o, est.model)
        if o.l3_shared_gb > 0 and store is None:
            try:
                store = KVStore(
                    KVStoreConfig(
                        int(o.l3_shared_gb * 1e9 // (sizing.kv_bytes_per_token * tp)),
                        o.l3_shared_gb_s * 1e9,
                        o.l3_shared_gb_s * 1e9,
                    )
                )
            except ValueError as e:
                raise SpecError(f"options: {e}") from None
        page = o.page_size or (VLLM_BLOCK_SIZE if o.engine == "vllm" else 1)
        try:
            cfg = EngineConfig(
                sched,
                cache_config(
                    sizing,
                    gpu,
                    block_tokens,
                    page,
                    o.eviction,
                    o.write_policy,
                    ranks=tp,
                    l2_bytes_per_s=o.l2_gb_s * 1e9 if o.l2_gb_s else None,
                    l3_bytes_per_s=o.l3_gb_s * 1e9 if o.l3_gb_s else None,
                    state_grid_tokens=state_grid(
                        est.model, o.engine, page, DTYPE_BYTES[o.kv_dtype], tp
                    ),
                ),  # fmt: skip
                num_layers=est.model.num_layers,
                max_context=context,
                role=role,
                policy=o.engine,
                # a disaggregated decode replica receives from the prefill one, not a client
                frontend=FRONTENDS[o.engine]
                if o.frontend == "on" and role != "decode"
                else Frontend(),
                speculative=spec,
            )
        except ValueError as e:  # a page size, eviction or write policy it refuses
            raise SpecError(f"options: {e}") from None
        replicas.append(
            Replica(
                Engine(cfg, est, store if role != "decode" else None, draft),
                f"{gpu.name}/tp{tp}",
                tp,
                sizing.kv_bytes_per_token,
                o.gpu_price_usd_per_hour or gpu.price_usd_per_hour,
            )
        )
    routed = replicas[:n_prefill]
    bounds = _bucket_bounds(o.bucket_bounds)
    try:
        router = Router(
            RouterConfig(policy=o.router, seed=o.seed, bucket_bounds=bounds),
            len(routed),
            block_tokens,
            # the router's approximate index holds about what a replica's tiers can
            index_tokens=[sum(r.engine.cache.capacity) for r in routed],
        )
        link = KVLink(o.kv_link_gb_s * 1e9, o.kv_link_latency_us * 1e-6)
    except ValueError as e:
        raise SpecError(f"options: {e}") from None
    return Cluster(routed, router, replicas[n_prefill:], link, sessions_mode(o), o.max_concurrency)


def given_workload(o: SimulationOptions, requests: wl.Workload | Iterable[wl.Request]):
    """A workload handed in from Python, simulated as given: a Workload as it is, Requests in
    any order sorted by arrival (``o.block_tokens`` or 64 tokens per prefix block). The
    options' trace, window, limit and rate scale do not apply. Empty: a ``WorkloadError``."""
    if isinstance(requests, wl.Workload):
        work = requests
    else:
        reqs = list(requests)
        bad = next((i for i, r in enumerate(reqs) if not isinstance(r, wl.Request)), None)
        if bad is not None:
            raise wl.WorkloadError(
                f"workload: item {bad} must be a Request, got {type(reqs[bad]).__name__}"
            )
        work = wl.build_workload(reqs, o.block_tokens or 64, "python")
    if not work.requests:
        raise wl.WorkloadError(f"{work.source}: no requests to simulate (the workload is empty)")
    offsets = [r.arrival_s - work.requests[0].arrival_s for r in work.requests]
    wl.check_span(work.source, offsets, 1.0)
    return work


def run(
    o: SimulationOptions,
    progress=None,
    workload: wl.Workload | Iterable[wl.Request] | None = None,
    frames: bool = True,
) -> SimulationRun:
    """Simulate the deployment serving the workload; ``progress(n_finished_delta, total)``.
    ``frames=False``: the summary only (``requests`` and ``steps`` are None).

    ``workload`` (a Workload or a list of Requests, see ``given_workload``) replaces the
    options' trace or built-in chat; an empty one raises ``WorkloadError``."""
    t0 = time.perf_counter()
    work = build_workload(o) if workload is None else given_workload(o, workload)
    cluster = build_cluster(o, work.block_tokens)
    total = len(work.requests)
    result = cluster.run(
        work.requests, progress=(lambda d: progress(d, total)) if progress else None
    )
    wall = time.perf_counter() - t0
    slo = None
    if o.slo_ttft_ms is not None or o.slo_tpot_ms is not None:
        slo = SLO(
            ttft_s=o.slo_ttft_ms / 1e3 if o.slo_ttft_ms is not None else None,
            tpot_s=o.slo_tpot_ms / 1e3 if o.slo_tpot_ms is not None else None,
        )
    gpus = sum(r.gpus for r in result.replicas)
    # a mixed fleet is priced replica by replica: the mean price per GPU times the GPUs
    price = sum(r.gpus * r.price_usd_per_hour for r in result.replicas) / gpus
    summ = summary(
        result.merged(), wall, price, gpus=gpus, slo=slo,
        cpu_price_usd_per_hour=o.cpu_price_usd_per_hour,
    )  # fmt: skip
    summ["workload"] = {"source": work.source, **_jsonable(work.summary())}
    summ["skipped_lines"] = work.skipped_lines
    first = result.replicas[0]
    summ["replica"] = {
        "model": first.engine.step_cost.model.name,
        "hardware": first.engine.step_cost.hardware[0].name,
        "tp": first.gpus,
        "l1_tokens": first.engine.cache.capacity[0],
        "l2_tokens": first.engine.cache.capacity[1],
        "l3_tokens": first.engine.cache.capacity[2],
        "kv_bytes_per_token": first.kv_bytes_per_token,
        "engine": o.engine,
        # the scheduler's knobs as run, engine defaults filled in (vLLM: max_prefill_tokens
        # is max_num_batched_tokens, max_running_requests is max_num_seqs)
        "scheduler": asdict(first.engine.sched),
        "page_size": first.engine.cache.cfg.page_size,
    }
    summ["speculative_num_steps"] = o.speculative_num_steps
    spec = o.speculative(first.engine.step_cost.model)
    if spec is not None:
        summ["speculative"] = {
            "accept_rates": list(spec.accept_rates),
            "expected_accept_length": spec.tokens_per_step,
            "draft_layers": spec.draft_layers,
        }
    summ.update(_jsonable(cluster_summary(result)))
    summ["options"] = asdict(o)
    if not frames:  # a summary is all a search needs; the step table of a long run is seconds
        return SimulationRun(o, work, summ, None, None)
    return SimulationRun(o, work, summ, cluster_request_frame(result), cluster_step_frame(result))


def _jsonable(d):
    return json.loads(json.dumps(d, default=float))


def write_outputs(run_: SimulationRun, out_dir: str | Path) -> list[Path]:
    """Write requests.csv, steps.csv and summary.json into ``out_dir`` (created if needed).

    All three are written into a temporary folder beside ``out_dir`` first and then moved in,
    so a failed write leaves the previous three whole. summary.json is strict JSON: an
    undefined number (a mean over no requests, a ratio over zero time) is ``null``."""
    return files.write_files_atomic(
        out_dir,
        {
            "requests.csv": lambda p: run_.requests.to_csv(p, index=False, float_format="%.9g"),
            "steps.csv": lambda p: run_.steps.to_csv(p, index=False, float_format="%.9g"),
            "summary.json": lambda p: Path(p).write_text(summary_json(run_.summary) + "\n"),
        },
    )


def summary_json(summary: dict) -> str:
    """The summary as strict JSON (``null`` for NaN or infinite numbers), as summary.json has it."""
    return files.strict_json(summary, indent=2, sort_keys=True)
