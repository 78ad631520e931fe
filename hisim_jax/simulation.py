"""Wiring for ``hisim simulate``: options → workload, estimator and engine → metrics and files.

``SimulationOptions`` is the one frozen record of a run (what a YAML ``--config`` holds);
``run`` performs it and ``write_outputs`` writes ``requests.csv``, ``steps.csv`` and
``summary.json`` through temporary files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from hisim_jax import workload as wl
from hisim_jax.engine import Engine, EngineConfig, cache_config, size_replica
from hisim_jax.estimator import Estimator
from hisim_jax.metrics import CPU_PRICE_USD_PER_HOUR, SLO, request_frame, step_frame, summary
from hisim_jax.ops import DTYPE_BYTES
from hisim_jax.paths import write_atomic
from hisim_jax.scheduler import SchedulerConfig
from hisim_jax.specs import SpecError


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    model: str = "llama-3.1-8b"
    hardware: str = "h100-sxm"
    tp: int = 1
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    calibration: str | None = None
    # workload: a trace, or the built-in multi-turn chat
    trace: str | None = None
    trace_format: str = "mooncake"
    limit: int | None = None
    rate_scale: float = 1.0
    start_s: float | None = None
    end_s: float | None = None
    skip_bad_lines: bool = False
    seed: int = 0
    # KV cache
    l1_fraction: float = 0.88
    l2_gb: float = 0.0
    l3_gb: float = 0.0
    page_size: int = 1
    eviction: str = "lru"
    write_policy: str = "write_through"
    # scheduler (SGLang defaults)
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    max_running_requests: int = 1024
    schedule_policy: str = "fcfs"
    preemption: str = "recompute"
    prefetch_policy: str = "best_effort"
    cuda_graph_max_bs: int = 160
    step_overhead_ms: float = 0.0
    # SLOs for goodput, and prices
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    gpu_price_usd_per_hour: float | None = None
    cpu_price_usd_per_hour: float = CPU_PRICE_USD_PER_HOUR

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict) -> SimulationOptions:
        """Options from a YAML mapping (keys as the CLI flags, - or _), then ``overrides``."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise SpecError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: expected a mapping of options, got {type(doc).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in doc.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise SpecError(f"{path}: field '{key}' is not an option of simulate")
            values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.checked(values, where=str(path))

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
            except (TypeError, ValueError):
                raise SpecError(f"{where}: field '{f.name}' has an invalid value {v!r}") from None
        return cls(**out)


@dataclass(frozen=True, slots=True)
class SimulationRun:
    options: SimulationOptions
    workload: wl.Workload
    summary: dict
    requests: object  # pandas DataFrame
    steps: object  # pandas DataFrame


def build_workload(o: SimulationOptions) -> wl.Workload:
    if o.trace is None:
        w = wl.default_chat(seed=o.seed)
        return wl.select(
            w, start_s=o.start_s, end_s=o.end_s, limit=o.limit, rate_scale=o.rate_scale
        )
    return wl.load_trace(
        o.trace,
        o.trace_format,
        skip_bad_lines=o.skip_bad_lines,
        limit=o.limit,
        rate_scale=o.rate_scale,
        start_s=o.start_s,
        end_s=o.end_s,
    )


def run(o: SimulationOptions, progress=None) -> SimulationRun:
    """Simulate one replica serving the workload; ``progress(n_finished_delta, total)``."""
    t0 = time.perf_counter()
    work = build_workload(o)
    est = Estimator(o.model, o.hardware, o.tp, o.weight_dtype, o.kv_dtype, o.calibration)
    sizing = size_replica(
        est.model,
        est.hardware[0],
        o.tp,
        DTYPE_BYTES[o.weight_dtype],
        DTYPE_BYTES[o.kv_dtype],
        o.l1_fraction,
        o.l2_gb,
        o.l3_gb,
    )
    sched = SchedulerConfig(
        chunked_prefill_size=o.chunked_prefill_size,
        max_prefill_tokens=o.max_prefill_tokens,
        max_running_requests=o.max_running_requests,
        schedule_policy=o.schedule_policy,
        preemption=o.preemption,
        prefetch_policy=o.prefetch_policy,
        cuda_graph_max_bs=o.cuda_graph_max_bs,
        step_overhead_s=o.step_overhead_ms / 1e3,
    )
    cfg = EngineConfig(
        sched,
        cache_config(
            sizing, est.hardware[0], work.block_tokens, o.page_size, o.eviction, o.write_policy
        ),
        num_layers=est.model.num_layers,
        max_context=est.model.max_position_embeddings,
    )
    total = len(work.requests)
    result = Engine(cfg, est).run(
        work.requests, progress=(lambda d: progress(d, total)) if progress else None
    )
    wall = time.perf_counter() - t0
    slo = None
    if o.slo_ttft_ms is not None or o.slo_tpot_ms is not None:
        slo = SLO(
            ttft_s=o.slo_ttft_ms / 1e3 if o.slo_ttft_ms is not None else None,
            tpot_s=o.slo_tpot_ms / 1e3 if o.slo_tpot_ms is not None else None,
        )
    price = o.gpu_price_usd_per_hour or est.hardware[0].price_usd_per_hour
    summ = summary(
        result, wall, price, gpus=o.tp, slo=slo, cpu_price_usd_per_hour=o.cpu_price_usd_per_hour
    )
    summ["workload"] = {"source": work.source, **_jsonable(work.summary())}
    summ["skipped_lines"] = work.skipped_lines
    summ["replica"] = {
        "model": est.model.name,
        "hardware": est.hardware[0].name,
        "tp": o.tp,
        "l1_tokens": sizing.l1_tokens,
        "l2_tokens": sizing.l2_tokens,
        "l3_tokens": sizing.l3_tokens,
        "kv_bytes_per_token": sizing.kv_bytes_per_token,
    }
    summ["options"] = asdict(o)
    return SimulationRun(o, work, summ, request_frame(result), step_frame(result))


def _jsonable(d):
    return json.loads(json.dumps(d, default=float))


def write_outputs(run_: SimulationRun, out_dir: str | Path) -> list[Path]:
    """Write requests.csv, steps.csv and summary.json into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, write in (
        ("requests.csv", lambda p: run_.requests.to_csv(p, index=False, float_format="%.9g")),
        ("steps.csv", lambda p: run_.steps.to_csv(p, index=False, float_format="%.9g")),
        (
            "summary.json",
            lambda p: Path(p).write_text(json.dumps(run_.summary, indent=2, sort_keys=True) + "\n"),
        ),
    ):
        written.append(write_atomic(out / name, write))
    return written
