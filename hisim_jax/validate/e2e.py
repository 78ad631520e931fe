"""End to end: replay a real benchmark run through the simulator, predicted against measured.

A benchmark output is read into one normalized, frozen record (``BenchmarkRun``): what was
deployed (``Deployment``: model id, TP, engine and its batching limits, GPU where known), the
requests as the simulator takes them (``workload.Request``: arrival, lengths, prefix block ids),
the load stages, and the measured metrics per stage (``StageMetrics``: mean/p50/p90/p99 of TTFT,
TPOT, ITL and E2E in seconds, throughputs, ok/failed counts, per-request samples or published
percentile sets for CDFs). ``replay`` simulates those requests and compares stage by stage;
``write_report`` writes ``e2e.csv``, ``summary.json`` and one CDF figure per metric.

Formats (``read_run(path, fmt=None)`` detects them; ``fmt`` overrides):

- ``inference-perf``: a run folder holding inference-perf's ``*stage_<k>_lifecycle_metrics.json``
  (and ``*summary_lifecycle_metrics.json``) with the ``results_config.yaml`` (or ``config.yaml``)
  it ran and, optionally, an ``exp-config.yaml`` naming the engine settings (``model``,
  ``tensor_parallelism``, ``max_model_len``, ``max_num_batched_tokens``, ``max_num_seqs``,
  ``gpu_memory_utilization``). Only ``data.type: shared_prefix`` can be rebuilt. The workload
  follows inference-perf's source (``datagen/shared_prefix_datagen.py``,
  ``loadgen/load_generator.py``, ``loadgen/load_timer.py``):

  * prompts: ``num_groups`` × ``num_prompts_per_group``, each its group's system prompt
    followed by its own question, generated group by group and then **shuffled** with an
    unseeded ``random.shuffle``, so the real order is unknowable: we draw a permutation from
    ``seed``. Request ``j`` of every stage uses prompt ``j mod P`` of that order (each stage
    restarts at request number 0). Input length = the stage's measured ``prompt_len`` mean
    (rounded; it exceeds system + question by the BOS token and re-tokenization drift), the
    extra tokens in the unique part. Output = ``output_len`` (the runs use ``ignore_eos``).
  * prefix ids: a hash chain over ``block_tokens``-token blocks (16, vLLM's block). The
    first ``system_prompt_len // block_tokens`` blocks are the group's (the BOS token in front
    and the token the seam between system prompt and question may merge roughly cancel); every
    later block is the prompt's own, shared only with the same prompt's repeats.
  * arrivals: ``load.type: constant`` in inference-perf draws exponential gaps and rescales
    them so the stage's ``int(rate × duration)`` requests span exactly ``duration`` seconds
    (Poisson-like, not evenly spaced); ``arrivals="uniform"`` gives equal gaps instead.
    ``poisson`` load draws a Poisson count per second spread the same way. Stages run one
    after another: inference-perf waits for every request of a stage to finish, sleeps
    ``load.interval`` and starts the next one a second later. ``replay`` reproduces that wait
    from the *predicted* finish times (see ``replay``).
  * measured: TTFT and E2E (``request_latency``) from the stage files; TPOT is the derived
    ``(E2E mean − TTFT mean) / (output_len − 1)`` (inference-perf's own ``time_per_output_token``
    and ``inter_token_latency`` are per streamed chunk, about half the per-token time, so they
    are kept only under ``extra``; measured ITL is left undefined). Published percentile sets
    (min, p0.1 … p99.9, max) are the measured CDF.

- ``vllm-bench``: the JSON of ``vllm bench serve --save-result --save-detailed`` (per-request
  ``input_lens``, ``output_lens``, ``ttfts``, ``itls``, optionally ``latencies``,
  ``start_times``, ``errors``; ``request_rate``, ``burstiness``, ``model_id``). Without
  ``start_times`` the arrivals are rebuilt as vLLM draws them: gamma gaps of shape
  ``burstiness`` and mean ``1 / request_rate``, rescaled so the last lands at
  ``N / request_rate`` (``inf``: all at once), from ``seed`` (vLLM's own draw shares its global
  RNG with the dataset sampling, so it cannot be reproduced). No prefix information.
- ``sglang-bench``: SGLang ``bench_serving`` output JSONL, one JSON object per run, with
  ``--output-details`` per-request ``input_lens``, ``output_lens``, ``ttfts``, ``itls``,
  ``errors``. Every line becomes one stage (a rate sweep appended to one file replays as its
  stages, run one after another). Arrivals: exponential (gamma when ``burstiness`` is given) gaps
  at ``request_rate`` from ``seed``. E2E per request = TTFT + the sum of its ITLs.
- ``csv``: one request per row, columns ``arrival_s, input_len, output_len, ttft_ms, e2e_ms``,
  optional ``block_ids`` (space-separated integers, ``ceil(input_len / block_tokens)`` of them)
  and ``stage`` (an integer); an empty ``ttft_ms`` or ``e2e_ms`` marks a failed request.

Bad input is one ``E2EError`` line naming the file, the field and the value.
"""

from __future__ import annotations

import csv as _csv
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from hisim_jax import files
from hisim_jax.serving.workload import Request
from hisim_jax.specs import SpecError

FORMATS = ("inference-perf", "vllm-bench", "sglang-bench", "csv")
METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p90", "p99")
THROUGHPUTS = ("request_throughput_per_s", "input_tok_s", "output_tok_s")
VLLM_BLOCK_TOKENS = 16
# inference-perf: a stage starts one second after it is scheduled (time for the queue to fill)
# and the loop sleeps load.interval between stages, after the previous stage's last request.
INFERENCE_PERF_LEAD_S = 1.0
# The rebuilt workload leaves this much idle time after each stage's last arrival; an idle gap
# longer than the real drain changes nothing (the engine waits with its cache intact), and
# replay re-times later stages when a predicted stage drains later than that.
STAGE_GAP_S = 120.0
# Regime rule: a stage is "queueing" when its median TTFT exceeds this many times the run's
# unloaded TTFT (the lowest TTFT of the run: a request that found the engine idle), or when
# any of its requests failed (measured) / was rejected or ran past the client's timeout
# (predicted). Otherwise "unloaded". The median, not the mean: a few bursts of arrivals raise
# a stage's mean TTFT (Mixtral at 8 req/s: mean 64 ms, median 56 ms, fastest 20 ms) without
# a queue that lasts.
QUEUEING_TTFT_RATIO = 3.0

# Hugging Face ids of the models/ configs that carry no ``_name_or_path`` (none of ours does:
# they are the publisher's config.json files, unchanged). Lower-cased; models/README.md's
# table gives the same pairs.
HF_MODEL_STEMS = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "codellama/codellama-34b-instruct-hf": "codellama-34b-instruct",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x22b-v0.1": "mixtral-8x22b",
    "mistralai/mistral-7b-v0.1": "mistral-7b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-405b": "llama-3.1-405b",
    "meta-llama/meta-llama-3.1-405b": "llama-3.1-405b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "meta-llama/llama-3.2-3b": "llama-3.2-3b",
    "meta-llama/llama-4-scout-17b-16e-instruct": "llama-4-scout-17b-16e",
    "qwen/qwen2.5-1.5b": "qwen2.5-1.5b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "qwen/qwen2.5-14b": "qwen2.5-14b",
    "qwen/qwen2.5-32b": "qwen2.5-32b",
    "qwen/qwen2.5-72b": "qwen2.5-72b",
    "qwen/qwen3-0.6b": "qwen3-0.6b",
    "qwen/qwen3-8b": "qwen3-8b",
    "qwen/qwen3-32b": "qwen3-32b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
    "deepseek-ai/deepseek-v3": "deepseek-v3",
}
# GPU names as benchmark records spell them -> hardware_specs stems (first match wins)
GPU_STEMS = (
    (r"gb300", "gb300"),
    (r"gb200", "gb200"),
    (r"b300", "b300"),
    (r"b200", "b200"),
    (r"h200", "h200-sxm"),
    (r"h100", "h100-sxm"),  # H100 PCIe/NVL are not in hardware_specs; SXM is the default
    (r"h20\b", "h20"),
    (r"a100", "a100-sxm-80gb"),
    (r"l40s", "l40s"),
    (r"mi300x", "mi300x"),
    (r"4090", "rtx-4090"),
    (r"rtx\s*pro\s*6000", "rtx-pro-6000"),
)


class E2EError(SpecError):
    """A benchmark file that cannot be read or replayed; one line: file, field, value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# ------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True, slots=True)
class Dist:
    """Mean and percentiles of one latency, seconds (None: not measured / no samples)."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, samples: Sequence[float] | np.ndarray) -> Dist:
        x = np.asarray(samples, float)
        x = x[np.isfinite(x)]
        if len(x) == 0:
            return cls()
        q = np.quantile(x, [0.5, 0.9, 0.99])
        return cls(float(x.mean()), float(q[0]), float(q[1]), float(q[2]))


@dataclass(frozen=True, slots=True)
class Deployment:
    """What the run served, as far as its files say (None: not recorded)."""

    model_id: str | None = None  # Hugging Face id as the run names it
    tp: int | None = None
    engine: str | None = None  # "vllm" | "sglang" | ...
    gpu: str | None = None  # the GPU as the run names it
    hardware: str | None = None  # its hardware_specs stem, if we have one
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None


@dataclass(frozen=True, slots=True)
class Stage:
    """A load stage: requests arriving in ``[start_s, end_s]`` at ``rate`` per second."""

    index: int
    start_s: float
    end_s: float
    rate: float | None = None  # requested rate (None: unknown; inf: all at once)


@dataclass(frozen=True, slots=True)
class StageMetrics:
    """Metrics of one stage, seconds and per second. ``samples``: per-request values for CDFs
    (``ttft``, ``tpot``, ``e2e``; ``itl`` every gap); ``quantiles``: published
    ``(quantile, seconds)`` sets where there are no samples."""

    stage: int
    requests_ok: int
    requests_failed: int
    ttft: Dist = Dist()
    tpot: Dist = Dist()
    itl: Dist = Dist()
    e2e: Dist = Dist()
    request_throughput_per_s: float | None = None
    input_tok_s: float | None = None
    output_tok_s: float | None = None
    samples: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    quantiles: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    extra: Mapping[str, float | None] = field(default_factory=dict)

    def value(self, metric: str, stat: str | None = None) -> float | None:
        """``value("ttft", "p90")``, or a throughput: ``value("input_tok_s")``."""
        if stat is None:
            return getattr(self, metric)
        return getattr(getattr(self, metric), stat)


@dataclass(frozen=True, slots=True)
class BenchmarkRun:
    """One benchmark output, normalized. ``requests`` are sorted by arrival with
    ``request_id`` = position; ``stage_of[i]`` is request i's stage."""

    source: str
    format: str
    deployment: Deployment
    requests: tuple[Request, ...]
    stage_of: tuple[int, ...]
    stages: tuple[Stage, ...]
    measured: tuple[StageMetrics, ...]  # one per stage
    block_tokens: int = VLLM_BLOCK_TOKENS
    drain_between_stages: bool = False  # the next stage waits for the previous to finish
    stage_pause_s: float = 0.0  # pause after a stage drained (inference-perf: interval + lead)
    timeout_s: float | None = None  # client timeout seen in the measured failures
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# small readers


def _h63(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _show(v: Any) -> str:
    s = repr(files.plain(v))
    return s if len(s) <= 60 else s[:57] + "..."


def _get(doc: Mapping, key: str, where: str, default: Any = ..., kinds=None) -> Any:
    if not isinstance(doc, Mapping):
        raise E2EError(f"{where}: expected a mapping, got {type(doc).__name__}")
    if key not in doc or (doc[key] is None and default is not ...):
        if default is ...:
            raise E2EError(f"{where}: field '{key}' is missing")
        return default
    return doc[key]


def _number(v: Any, key: str, where: str, lo: float | None = 0.0, inf_ok=False) -> float:
    if isinstance(v, str) and inf_ok and v.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise E2EError(f"{where}: field '{key}' must be a number, got {_show(v)}")
    f = float(v)
    if math.isnan(f) or (math.isinf(f) and not inf_ok):
        raise E2EError(f"{where}: field '{key}' must be a finite number, got {_show(v)}")
    if lo is not None and f < lo:
        raise E2EError(f"{where}: field '{key}' must be >= {lo:g}, got {_show(v)}")
    return f


def _int(v: Any, key: str, where: str, lo: int = 0) -> int:
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise E2EError(f"{where}: field '{key}' must be an integer, got {_show(v)}")
    if v < lo:
        raise E2EError(f"{where}: field '{key}' must be >= {lo}, got {v}")
    return v


def _opt_int(doc: Mapping, key: str, where: str, lo: int = 1) -> int | None:
    v = doc.get(key) if isinstance(doc, Mapping) else None
    return None if v is None else _int(v, key, where, lo)


def _list(doc: Mapping, key: str, where: str, n: int | None = None) -> list:
    v = _get(doc, key, where)
    if not isinstance(v, list):
        raise E2EError(f"{where}: field '{key}' must be a list, got {_show(v)}")
    if n is not None and len(v) != n:
        raise E2EError(f"{where}: field '{key}' has {len(v)} entries, expected {n}")
    return v


def model_stem(model_id: str | None, models_dir: Path | None = None) -> str | None:
    """The ``models/`` stem of a Hugging Face id: a config whose ``_name_or_path`` names it,
    else ``HF_MODEL_STEMS``, else a stem equal to the id's last part (lower-cased); None if
    none fits."""
    if not model_id:
        return None
    from hisim_jax.paths import data_dir

    folder = models_dir or data_dir("models")
    want = model_id.strip().lower()
    for p in sorted(folder.glob("*.json")):
        try:
            name = json.loads(p.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name.strip().lower() == want:
            return p.stem
    if want in HF_MODEL_STEMS:
        return HF_MODEL_STEMS[want]
    last = want.rsplit("/", 1)[-1]
    return last if (folder / f"{last}.json").is_file() else None


def hardware_stem(gpu: str | None) -> str | None:
    """The ``hardware_specs`` stem of a GPU name as a benchmark record spells it."""
    if not gpu:
        return None
    g = gpu.lower()
    return next((stem for pat, stem in GPU_STEMS if re.search(pat, g)), None)


# ------------------------------------------------------------------------------------------------
# (a) inference-perf

_IP_QUANTILES = (
    ("min", 0.0), ("p0.1", 0.001), ("p1", 0.01), ("p5", 0.05), ("p10", 0.1), ("p25", 0.25),
    ("median", 0.5), ("p75", 0.75), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99),
    ("p99.9", 0.999), ("max", 1.0),
)  # fmt: skip


def _ip_file(folder: Path, name: str) -> Path | None:
    for cand in (folder / f"results_{name}", folder / name, folder / "results" / name):
        if cand.is_file():
            return cand
    return None


def _ip_stage_files(folder: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for sub in (folder, folder / "results"):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            m = re.fullmatch(r"(?:results_)?stage_(\d+)_lifecycle_metrics\.json", p.name)
            if m:
                out.setdefault(int(m.group(1)), p)
    return dict(sorted(out.items()))


def _ip_dist(block: Any, key: str, where: str) -> tuple[Dist, tuple[tuple[float, float], ...]]:
    if block is None:
        return Dist(), ()
    d = _get(block, key, where, default=None)
    if d is None:
        return Dist(), ()
    w = f"{where}: {key}"
    vals = {k: _number(d[k], k, w, lo=None) for k, _ in _IP_QUANTILES if d.get(k) is not None}
    mean = _number(d["mean"], "mean", w, lo=None) if d.get("mean") is not None else None
    quantiles = tuple((q, vals[k]) for k, q in _IP_QUANTILES if k in vals)
    return Dist(mean, vals.get("median"), vals.get("p90"), vals.get("p99")), quantiles


def _ip_metrics(doc: dict, where: str, stage: int, output_len: int) -> StageMetrics:
    succ = _get(doc, "successes", where)
    fail = _get(doc, "failures", where, default={})
    n_ok = _int(_get(succ, "count", f"{where}: successes"), "count", f"{where}: successes")
    n_fail = _int(_get(fail, "count", f"{where}: failures", default=0), "count", where)
    lat = _get(succ, "latency", f"{where}: successes", default=None) if n_ok else None
    ttft, ttft_q = _ip_dist(lat, "time_to_first_token", f"{where}: successes.latency")
    e2e, e2e_q = _ip_dist(lat, "request_latency", f"{where}: successes.latency")
    tpot_ip, _ = _ip_dist(lat, "time_per_output_token", f"{where}: successes.latency")
    itl_ip, _ = _ip_dist(lat, "inter_token_latency", f"{where}: successes.latency")
    tpot = Dist()
    if e2e.mean is not None and ttft.mean is not None and output_len > 1:
        tpot = Dist(mean=(e2e.mean - ttft.mean) / (output_len - 1))
    thr = _get(succ, "throughput", f"{where}: successes", default={}) if n_ok else {}
    w = f"{where}: successes.throughput"

    def rate(key):
        v = thr.get(key) if isinstance(thr, Mapping) else None
        return None if v is None else _number(v, key, w)

    extra = {
        "tpot_ip_mean_s": tpot_ip.mean,
        "itl_ip_mean_s": itl_ip.mean,
        "output_len_measured_mean": _ip_len_mean(succ, "output_len", where),
        "prompt_len_measured_mean": _ip_len_mean(succ, "prompt_len", where),
    }
    return StageMetrics(
        stage=stage,
        requests_ok=n_ok,
        requests_failed=n_fail,
        ttft=ttft,
        tpot=tpot,
        e2e=e2e,
        request_throughput_per_s=rate("requests_per_sec"),
        input_tok_s=rate("input_tokens_per_sec"),
        output_tok_s=rate("output_tokens_per_sec"),
        quantiles={k: v for k, v in (("ttft", ttft_q), ("e2e", e2e_q)) if v},
        extra=extra,
    )


def _ip_len_mean(block: Any, key: str, where: str) -> float | None:
    d = block.get(key) if isinstance(block, Mapping) else None
    if not isinstance(d, Mapping) or d.get("mean") is None:
        return None
    return _number(d["mean"], "mean", f"{where}: successes.{key}")


def _ip_timeout_s(doc: dict, where: str) -> float | None:
    fail = doc.get("failures") or {}
    lat = fail.get("request_latency") if isinstance(fail, Mapping) else None
    if not isinstance(lat, Mapping) or lat.get("min") is None or not fail.get("count"):
        return None
    # failures that all end at one latency are the client's timeout (300.0007 s -> 300 s)
    lo = _number(lat["min"], "min", f"{where}: failures.request_latency")
    hi = _number(lat.get("max", lo), "max", f"{where}: failures.request_latency")
    return float(math.floor(lo)) if lo > 1.0 and hi - lo < 0.05 * lo else None


def _measured_gpu(folder: Path) -> str | None:
    """The GPU a measured.csv beside the run (the e2e data set's index) names for it."""
    for parent in (folder, folder.parent, folder.parent.parent):
        index = parent / "measured.csv"
        if not index.is_file():
            continue
        try:
            with index.open(encoding="utf-8", newline="") as f:
                for row in _csv.DictReader(f):
                    if row.get("experiment") == folder.name and row.get("gpu"):
                        return row["gpu"]
        except (OSError, UnicodeDecodeError, _csv.Error):
            return None
    return None


def read_inference_perf(
    path: str | Path,
    seed: int = 0,
    arrivals: str = "inference-perf",
    block_tokens: int = VLLM_BLOCK_TOKENS,
) -> BenchmarkRun:
    """A run folder of inference-perf outputs (see the module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise E2EError(f"{folder}: expected an inference-perf run folder")
    if arrivals not in ("inference-perf", "uniform"):
        raise E2EError(f"options: arrivals must be inference-perf or uniform, got {arrivals!r}")
    cfg_path = _ip_file(folder, "config.yaml")
    if cfg_path is None:
        raise E2EError(f"{folder}: no results_config.yaml (the configuration inference-perf ran)")
    cfg = files.read_yaml(cfg_path, "inference-perf config (YAML)", E2EError)
    if not isinstance(cfg, dict):
        raise E2EError(f"{cfg_path}: expected a mapping, got {type(cfg).__name__}")
    data = _get(cfg, "data", str(cfg_path))
    kind = _get(data, "type", f"{cfg_path}: data")
    if kind != "shared_prefix":
        raise E2EError(
            f"{cfg_path}: field 'data.type' must be shared_prefix (the only data set whose "
            f"prompts can be rebuilt from the config), got {_show(kind)}"
        )
    w = f"{cfg_path}: data.shared_prefix"
    sp = _get(data, "shared_prefix", f"{cfg_path}: data")
    n_groups = _int(_get(sp, "num_groups", w), "num_groups", w, 1)
    per_group = _int(_get(sp, "num_prompts_per_group", w), "num_prompts_per_group", w, 1)
    sys_len = _int(_get(sp, "system_prompt_len", w), "system_prompt_len", w, 0)
    q_len = _int(_get(sp, "question_len", w), "question_len", w, 0)
    out_len = _int(_get(sp, "output_len", w), "output_len", w, 1)
    if sys_len + q_len < 1:
        raise E2EError(f"{w}: system_prompt_len + question_len must be >= 1, got 0")
    wl_ = f"{cfg_path}: load"
    load = _get(cfg, "load", str(cfg_path))
    load_type = _get(load, "type", wl_, default="constant")
    if load_type not in ("constant", "poisson"):
        raise E2EError(f"{wl_}: field 'type' must be constant or poisson, got {_show(load_type)}")
    pause = _number(_get(load, "interval", wl_, default=1.0), "interval", wl_)
    stage_cfg = _list(load, "stages", wl_)
    if not stage_cfg:
        raise E2EError(f"{wl_}: field 'stages' is empty")
    files_by_stage = _ip_stage_files(folder)
    if not files_by_stage:
        raise E2EError(f"{folder}: no stage_<k>_lifecycle_metrics.json")
    missing = [k for k in range(len(stage_cfg)) if k not in files_by_stage]
    if missing:
        raise E2EError(f"{folder}: no lifecycle metrics for stage {missing[0]}")

    exp: dict = {}
    exp_path = folder / "exp-config.yaml"
    if exp_path.is_file():
        exp = files.read_yaml(exp_path, "experiment config (YAML)", E2EError) or {}
        if not isinstance(exp, dict):
            raise E2EError(f"{exp_path}: expected a mapping, got {type(exp).__name__}")
    server = cfg.get("server") or {}
    tok = cfg.get("tokenizer") or {}
    model_id = (
        exp.get("model") or server.get("model_name") or tok.get("pretrained_model_name_or_path")
    )
    gpu = exp.get("gpu") or exp.get("accelerator") or _measured_gpu(folder)
    ew = str(exp_path)
    gmu = exp.get("gpu_memory_utilization")
    deployment = Deployment(
        model_id=str(model_id) if model_id else None,
        tp=_opt_int(exp, "tensor_parallelism", ew) or _opt_int(exp, "tp", ew),
        engine=str(server.get("type") or "") or None,
        gpu=str(gpu) if gpu else None,
        hardware=hardware_stem(str(gpu)) if gpu else None,
        max_num_seqs=_opt_int(exp, "max_num_seqs", ew),
        max_num_batched_tokens=_opt_int(exp, "max_num_batched_tokens", ew),
        max_model_len=_opt_int(exp, "max_model_len", ew),
        gpu_memory_utilization=None if gmu is None else _number(gmu, "gpu_memory_utilization", ew),
    )

    # prompt order: inference-perf shuffles its prompts unseeded; ours is drawn from the seed
    n_prompts = n_groups * per_group
    order = np.random.default_rng([seed, 0x1F]).permutation(n_prompts)
    shared_blocks = sys_len // block_tokens
    salt = ("inference-perf", folder.name, seed)

    requests: list[Request] = []
    stage_of: list[int] = []
    stages: list[Stage] = []
    measured: list[StageMetrics] = []
    notes: list[str] = []
    timeout = None
    start = 0.0
    for k, st in enumerate(stage_cfg):
        sw = f"{wl_}.stages[{k}]"
        rate = _number(_get(st, "rate", sw), "rate", sw)
        duration = _number(_get(st, "duration", sw), "duration", sw)
        if rate <= 0 or duration <= 0:
            raise E2EError(f"{sw}: rate and duration must be > 0, got {rate:g} and {duration:g}")
        n = int(rate * duration)
        doc = files.read_json(files_by_stage[k], "inference-perf lifecycle metrics", E2EError)
        where = str(files_by_stage[k])
        measured.append(_ip_metrics(doc, where, k, out_len))
        timeout = timeout or _ip_timeout_s(doc, where)
        prompt_mean = measured[-1].extra.get("prompt_len_measured_mean")
        in_len = int(round(prompt_mean)) if prompt_mean else sys_len + q_len
        in_len = max(in_len, 1)
        rng = np.random.default_rng([seed, k])
        offsets = _ip_arrivals(n, rate, duration, load_type, arrivals, rng)
        ids_by_prompt = {}
        for j in range(n):
            p = int(order[j % n_prompts])
            if p not in ids_by_prompt:
                ids_by_prompt[p] = _shared_prefix_ids(
                    salt, p // per_group, p, in_len, shared_blocks, block_tokens
                )
            requests.append(
                Request(len(requests), start + float(offsets[j]), in_len, out_len, ids_by_prompt[p])
            )
            stage_of.append(k)
        stages.append(Stage(k, start, start + duration, rate))
        start += duration + STAGE_GAP_S
    if arrivals == "uniform":
        notes.append("arrivals: equal gaps (inference-perf's own are rescaled exponential gaps)")
    notes.append(
        "prompt order: a seeded permutation (inference-perf shuffles its prompts unseeded)"
    )
    return BenchmarkRun(
        source=str(folder),
        format="inference-perf",
        deployment=deployment,
        requests=tuple(requests),
        stage_of=tuple(stage_of),
        stages=tuple(stages),
        measured=tuple(measured),
        block_tokens=block_tokens,
        drain_between_stages=True,
        stage_pause_s=pause + INFERENCE_PERF_LEAD_S,
        timeout_s=timeout,
        notes=tuple(notes),
    )


def _ip_arrivals(n, rate, duration, load_type, arrivals, rng) -> np.ndarray:
    """Offsets within a stage, as inference-perf's ConstantLoadTimer/PoissonLoadTimer draw
    them: the first request one gap after the start."""
    if n == 0:
        return np.zeros(0)
    if arrivals == "uniform":
        return np.arange(1, n + 1) * (duration / n)
    if load_type == "constant":
        gaps = rng.exponential(1.0 / rate, n)
        return np.cumsum(gaps * (duration / gaps.sum()))
    out: list[float] = []  # poisson: a Poisson count per second, spread like "constant"
    t = 0.0
    while len(out) < n:
        c = int(rng.poisson(rate))
        if c:
            gaps = rng.exponential(1.0, c)
            out += list(t + np.cumsum(gaps / gaps.sum()))
        t += 1.0
    return np.asarray(out[:n])


def _shared_prefix_ids(salt, group, prompt, length, shared_blocks, block_tokens):
    """A hash chain: block k's id hashes block k-1's id and block k's content key."""
    ids, parent = [], 0
    for b in range(math.ceil(length / block_tokens)):
        full = (b + 1) * block_tokens <= length
        key = ("sys", group, b) if b < shared_blocks and full else ("own", prompt, b)
        parent = _h63(salt, parent, key)
        ids.append(parent)
    return tuple(ids)


# ------------------------------------------------------------------------------------------------
# (b) vllm bench serve, (c) SGLang bench_serving


def _gamma_arrivals(n: int, rate: float, burstiness: float, rng, normalize: bool) -> np.ndarray:
    if n == 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    t = np.cumsum(gaps)
    if normalize and t[-1] > 0:  # vLLM rescales so the last request goes out at N / rate
        t *= (n / rate) / t[-1]
    return t


def _per_request(doc: dict, where: str, fmt: str) -> dict:
    """Per-request fields of a vLLM or SGLang result, checked, failures marked."""
    hint = "--save-detailed" if fmt == "vllm-bench" else "--output-details"
    if "input_lens" not in doc or "ttfts" not in doc:
        raise E2EError(
            f"{where}: field 'input_lens' is missing (no per-request fields: run the "
            f"benchmark with {hint})"
        )
    inp = _list(doc, "input_lens", where)
    n = len(inp)
    if n == 0:
        raise E2EError(f"{where}: field 'input_lens' is empty (no requests)")
    outs = _list(doc, "output_lens", where, n)
    ttfts = _list(doc, "ttfts", where, n)
    itls = _list(doc, "itls", where, n) if "itls" in doc else [[] for _ in range(n)]
    errors = _list(doc, "errors", where, n) if doc.get("errors") is not None else [""] * n
    lats = _list(doc, "latencies", where, n) if doc.get("latencies") is not None else None
    starts = _list(doc, "start_times", where, n) if doc.get("start_times") is not None else None
    rec = {"input": [], "output": [], "ttft": [], "e2e": [], "itl": [], "ok": []}
    for i in range(n):
        iw = f"{where}: request {i}"
        rec["input"].append(_int(inp[i], "input_lens", iw, 0))
        rec["output"].append(_int(outs[i], "output_lens", iw, 0))
        ttft = _number(ttfts[i], "ttfts", iw)
        gaps = itls[i]
        if not isinstance(gaps, list):
            raise E2EError(f"{iw}: field 'itls' must be a list, got {_show(gaps)}")
        gaps = [_number(g, "itls", iw) for g in gaps]
        e2e = _number(lats[i], "latencies", iw) if lats is not None else ttft + sum(gaps)
        ok = not errors[i] and rec["output"][-1] > 0 and rec["input"][-1] > 0
        rec["ttft"].append(ttft)
        rec["e2e"].append(e2e)
        rec["itl"].append(gaps)
        rec["ok"].append(ok)
    if starts is not None:
        rec["start"] = [_number(s, "start_times", f"{where}: request {i}", lo=None)
                        for i, s in enumerate(starts)]  # fmt: skip
    return rec


def _sample_metrics(
    rec: dict, stage: int, span_s: float | None, doc: dict, ms_keys
) -> StageMetrics:
    """Metrics from per-request samples; the file's own aggregates win where it has them."""
    ok = np.asarray(rec["ok"], bool)
    ttft = np.asarray(rec["ttft"], float)[ok]
    e2e = np.asarray(rec["e2e"], float)[ok]
    out = np.asarray(rec["output"], float)[ok]
    inp = np.asarray(rec["input"], float)[ok]
    multi = out > 1
    tpot = (e2e[multi] - ttft[multi]) / (out[multi] - 1)
    itl = np.asarray([g for good, gaps in zip(ok, rec["itl"], strict=True) if good
                      for g in gaps], float)  # fmt: skip
    dists = {"ttft": Dist.of(ttft), "tpot": Dist.of(tpot), "itl": Dist.of(itl), "e2e": Dist.of(e2e)}
    for metric, key in ms_keys.items():  # published aggregates (ms) where the file has them
        d = dists[metric]
        vals = {}
        for stat, name in (("mean", "mean"), ("p50", "median"), ("p90", "p90"), ("p99", "p99")):
            v = doc.get(f"{name}_{key}_ms")
            vals[stat] = (
                _number(v, f"{name}_{key}_ms", "", lo=None) / 1e3 if v is not None else None
            )
        dists[metric] = Dist(*(vals[s] if vals[s] is not None else getattr(d, s) for s in STATS))
    span = span_s if span_s and span_s > 0 else None
    return StageMetrics(
        stage=stage,
        requests_ok=int(ok.sum()),
        requests_failed=int((~ok).sum()),
        **dists,
        request_throughput_per_s=len(e2e) / span if span else None,
        input_tok_s=float(inp.sum()) / span if span else None,
        output_tok_s=float(out.sum()) / span if span else None,
        samples={"ttft": tuple(ttft), "tpot": tuple(tpot), "itl": tuple(itl), "e2e": tuple(e2e)},
    )


def _bench_requests(rec, arrivals_s, start_s, first_id, block_ids=None):
    ok_out = [o for o, good in zip(rec["output"], rec["ok"], strict=True) if good]
    fallback = max(1, int(round(float(np.mean(ok_out))))) if ok_out else 1
    out = []
    for i, (a, inp, o) in enumerate(zip(arrivals_s, rec["input"], rec["output"], strict=True)):
        ids = block_ids[i] if block_ids else ()
        out.append(Request(first_id + i, start_s + float(a), max(inp, 1), o or fallback, ids))
    return out


def read_vllm_bench(path: str | Path, seed: int = 0) -> BenchmarkRun:
    """``vllm bench serve --save-result --save-detailed`` JSON (see the module docstring)."""
    p = Path(path)
    doc = files.read_json(p, "vllm bench serve result (JSON)", E2EError)
    where = str(p)
    if not isinstance(doc, dict):
        raise E2EError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    rec = _per_request(doc, where, "vllm-bench")
    n = len(rec["input"])
    rate = _number(_get(doc, "request_rate", where, default="inf"), "request_rate", where,
                   inf_ok=True)  # fmt: skip
    if rate <= 0:
        raise E2EError(f"{where}: field 'request_rate' must be > 0, got {rate:g}")
    burst = _number(_get(doc, "burstiness", where, default=1.0), "burstiness", where, inf_ok=True)
    if burst <= 0:
        raise E2EError(f"{where}: field 'burstiness' must be > 0, got {burst:g}")
    notes = []
    if "start" in rec:
        t0 = min(rec["start"])
        arr = np.asarray(rec["start"]) - t0
        notes.append("arrivals: the file's start_times")
    else:
        arr = _gamma_arrivals(n, rate, burst, np.random.default_rng(seed), normalize=True)
        notes.append(f"arrivals: rebuilt (gamma, burstiness {burst:g}, rate {rate:g}, seed {seed})")
    if doc.get("max_concurrency") is not None:
        notes.append(
            f"max_concurrency {doc['max_concurrency']} was a client-side limit; replayed open loop"
        )
    duration = doc.get("duration")
    span = _number(duration, "duration", where) if duration is not None else None
    keys = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2el"}
    m = _sample_metrics(rec, 0, span, doc, keys)
    if doc.get("request_throughput") is not None:
        span_thr = {
            "request_throughput_per_s": _number(
                doc["request_throughput"], "request_throughput", where
            ),
        }
        if doc.get("output_throughput") is not None:
            span_thr["output_tok_s"] = _number(doc["output_throughput"], "output_throughput", where)
        m = replace(m, **span_thr)
    order = np.argsort(arr, kind="stable")
    reqs = _bench_requests(rec, arr, 0.0, 0)
    reqs = [replace(reqs[i], request_id=k) for k, i in enumerate(order)]
    model_id = doc.get("model_id")
    return BenchmarkRun(
        source=where,
        format="vllm-bench",
        deployment=Deployment(model_id=str(model_id) if model_id else None, engine="vllm"),
        requests=tuple(reqs),
        stage_of=(0,) * n,
        stages=(Stage(0, float(arr.min()), float(arr.max()), rate),),
        measured=(m,),
        notes=tuple(notes),
    )


def read_sglang_bench(path: str | Path, seed: int = 0) -> BenchmarkRun:
    """SGLang ``bench_serving`` JSONL with ``--output-details`` (see the module docstring)."""
    p = Path(path)
    text = files.read_text(p, "SGLang bench_serving output (JSONL)", E2EError)
    requests: list[Request] = []
    stage_of: list[int] = []
    stages: list[Stage] = []
    measured: list[StageMetrics] = []
    model_id = None
    start = 0.0
    keys = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2e_latency"}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}: line {lineno}"
        # SGLang's bench_serving writes "request_rate": Infinity for --request-rate inf
        doc = files.loads_json(line, where, E2EError, inf_ok=("request_rate",))
        if not isinstance(doc, dict):
            raise E2EError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        k = len(stages)
        rec = _per_request(doc, where, "sglang-bench")
        n = len(rec["input"])
        rate = _number(_get(doc, "request_rate", where, default="inf"), "request_rate", where,
                       inf_ok=True)  # fmt: skip
        if rate <= 0:
            raise E2EError(f"{where}: field 'request_rate' must be > 0, got {rate:g}")
        burst = _number(_get(doc, "burstiness", where, default=1.0), "burstiness", where,
                        inf_ok=True)  # fmt: skip
        if burst <= 0:
            raise E2EError(f"{where}: field 'burstiness' must be > 0, got {burst:g}")
        # SGLang sleeps one gap before each request, the first included, and does not rescale
        arr = _gamma_arrivals(n, rate, burst, np.random.default_rng([seed, k]), normalize=False)
        duration = doc.get("duration")
        span = _number(duration, "duration", where) if duration is not None else None
        m = _sample_metrics(rec, k, span, doc, keys)
        if doc.get("request_throughput") is not None:
            m = replace(
                m,
                request_throughput_per_s=_number(
                    doc["request_throughput"], "request_throughput", where
                ),
                input_tok_s=_number(doc.get("input_throughput", 0.0), "input_throughput", where),
                output_tok_s=_number(doc.get("output_throughput", 0.0), "output_throughput", where),
            )
        measured.append(m)
        requests += _bench_requests(rec, arr, start, len(requests))
        stage_of += [k] * n
        stages.append(Stage(k, start + float(arr.min()), start + float(arr.max()), rate))
        start += float(arr.max()) + STAGE_GAP_S
        model_id = model_id or doc.get("model_id") or doc.get("model")
    if not stages:
        raise E2EError(f"{p}: empty file, expected SGLang bench_serving JSON lines")
    return BenchmarkRun(
        source=str(p),
        format="sglang-bench",
        deployment=Deployment(model_id=str(model_id) if model_id else None, engine="sglang"),
        requests=tuple(requests),
        stage_of=tuple(stage_of),
        stages=tuple(stages),
        measured=tuple(measured),
        drain_between_stages=True,
        notes=(f"arrivals: rebuilt (exponential/gamma gaps at request_rate, seed {seed})",),
    )


# ------------------------------------------------------------------------------------------------
# (d) per-request CSV

CSV_COLUMNS = ("arrival_s", "input_len", "output_len", "ttft_ms", "e2e_ms")


def _csv_number(rec: dict, key: str, where: str, lo, optional: bool) -> float | None:
    v = str(rec[key]).strip()
    if optional and v == "":
        return None
    try:
        x = float(v)
    except ValueError:
        raise E2EError(f"{where}: field '{key}' must be a number, got {v!r}") from None
    return _number(x, key, where, lo=lo)


def read_request_csv(path: str | Path, block_tokens: int = VLLM_BLOCK_TOKENS) -> BenchmarkRun:
    """A per-request CSV: ``arrival_s, input_len, output_len, ttft_ms, e2e_ms`` and optional
    ``block_ids`` (space-separated integers) and ``stage``."""
    p = Path(path)
    frame = files.read_csv(p, "per-request CSV", E2EError, dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    for col in CSV_COLUMNS:
        if col not in frame.columns:
            raise E2EError(f"{p}: missing column '{col}' (have: {', '.join(frame.columns)})")
    if frame.empty:
        raise E2EError(f"{p}: no requests (only a header)")
    rows = []
    for i, rec in enumerate(frame.to_dict("records")):
        where = f"{p}: line {i + 2}"

        def num(key, lo=0.0, optional=False, rec=rec, where=where):
            return _csv_number(rec, key, where, lo, optional)

        arrival = num("arrival_s", lo=None)
        inp = _int(str(rec["input_len"]).strip(), "input_len", where, 1)
        out = _int(str(rec["output_len"]).strip(), "output_len", where, 1)
        ttft, e2e = num("ttft_ms", optional=True), num("e2e_ms", optional=True)
        ids: tuple[int, ...] = ()
        raw = str(rec.get("block_ids", "")).strip()
        if raw:
            try:
                ids = tuple(int(t) for t in raw.split())
            except ValueError:
                raise E2EError(
                    f"{where}: field 'block_ids' must be integers separated by spaces, got {raw!r}"
                ) from None
            want = math.ceil(inp / block_tokens)
            if len(ids) != want:
                raise E2EError(
                    f"{where}: field 'block_ids' has {len(ids)} ids, expected {want} "
                    f"(ceil(input_len {inp} / block_tokens {block_tokens}))"
                )
        stage = (
            _int(str(rec["stage"]).strip(), "stage", where, 0)
            if "stage" in rec and str(rec["stage"]).strip()
            else 0
        )
        if ttft is not None and e2e is not None and e2e < ttft:
            raise E2EError(f"{where}: field 'e2e_ms' must be >= ttft_ms ({ttft:g}), got {e2e:g}")
        rows.append((arrival, inp, out, ttft, e2e, ids, stage))
    rows.sort(key=lambda r: r[0])
    stage_ids = sorted({r[6] for r in rows})
    index = {s: k for k, s in enumerate(stage_ids)}
    requests = tuple(Request(i, r[0], r[1], r[2], r[5]) for i, r in enumerate(rows))
    stage_of = tuple(index[r[6]] for r in rows)
    stages, measured = [], []
    for k, s in enumerate(stage_ids):
        mine = [r for r in rows if r[6] == s]
        ok = [r for r in mine if r[3] is not None and r[4] is not None]
        t0 = min(r[0] for r in mine)
        rec = {
            "input": [r[1] for r in mine],
            "output": [r[2] for r in mine],
            "ttft": [(r[3] or 0.0) / 1e3 for r in mine],
            "e2e": [(r[4] or 0.0) / 1e3 for r in mine],
            "itl": [[] for _ in mine],
            "ok": [r[3] is not None and r[4] is not None for r in mine],
        }
        span = max((r[0] + r[4] / 1e3 for r in ok), default=t0) - t0
        m = _sample_metrics(rec, k, span, {}, {})
        # no gaps in the file: ITL mean is the token-weighted TPOT, percentiles unknown
        outs = np.asarray([r[2] for r in ok], float)
        dec = np.asarray([(r[4] - r[3]) / 1e3 for r in ok], float)
        itl = Dist(float(dec.sum() / (outs - 1).sum())) if (outs > 1).any() else Dist()
        samples = {key: v for key, v in m.samples.items() if key != "itl"}
        measured.append(replace(m, itl=itl, samples=samples))
        stages.append(Stage(k, t0, max(r[0] for r in mine), None))
    return BenchmarkRun(
        source=str(p),
        format="csv",
        deployment=Deployment(),
        requests=requests,
        stage_of=stage_of,
        stages=tuple(stages),
        measured=tuple(measured),
        block_tokens=block_tokens,
    )


# ------------------------------------------------------------------------------------------------
# detection


def detect_format(path: str | Path) -> str:
    """Which of ``FORMATS`` a path holds (folder, extension, then the first JSON keys)."""
    p = Path(path)
    if p.is_dir():
        if _ip_stage_files(p) or _ip_file(p, "config.yaml"):
            return "inference-perf"
        raise E2EError(f"{p}: a folder without inference-perf lifecycle metrics")
    if p.suffix.lower() == ".csv":
        return "csv"
    text = files.read_text(p, "benchmark result", E2EError)
    try:  # one JSON document: vLLM's result (or a single SGLang line)
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if "mean_e2e_latency_ms" in doc and "mean_e2el_ms" not in doc:
            return "sglang-bench"
        return "vllm-bench"
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        doc = json.loads(first)
    except ValueError:
        doc = None
    if isinstance(doc, dict):  # one JSON object per line: SGLang
        return "sglang-bench"
    if _csv.Sniffer().has_header(text[:4096]) if "," in first else False:
        return "csv"
    raise E2EError(f"{p}: not a known benchmark output (give --format: {', '.join(FORMATS)})")


def read_run(
    path: str | Path,
    fmt: str | None = None,
    *,
    seed: int = 0,
    block_tokens: int = VLLM_BLOCK_TOKENS,
    arrivals: str = "inference-perf",
) -> BenchmarkRun:
    """Read a benchmark output of format ``fmt`` (None: detected)."""
    if fmt is not None and fmt not in FORMATS:
        raise E2EError(f"options: field 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    fmt = fmt or detect_format(path)
    if fmt == "inference-perf":
        return read_inference_perf(path, seed=seed, arrivals=arrivals, block_tokens=block_tokens)
    if fmt == "vllm-bench":
        return read_vllm_bench(path, seed=seed)
    if fmt == "sglang-bench":
        return read_sglang_bench(path, seed=seed)
    return read_request_csv(path, block_tokens=block_tokens)


# ------------------------------------------------------------------------------------------------
# options of the deployment


def options_for(run: BenchmarkRun, base=None, *, explicit: Sequence[str] = ()):
    """SimulationOptions for the run's deployment: ``base`` (default options if None) with
    the run's model, TP, hardware, engine and batching limits where the run records them.
    Fields named in ``explicit`` (options the user gave) keep ``base``'s value. Before the
    options gain ``engine``/``max_num_seqs``/... the limits map onto SGLang's counterparts
    (``max_running_requests``, ``chunked_prefill_size`` and ``max_prefill_tokens``,
    ``l1_fraction``)."""
    from hisim_jax.simulation import SimulationOptions

    base = base or SimulationOptions()
    have = {f.name for f in fields(SimulationOptions)}
    d = run.deployment
    values: dict[str, Any] = {}
    stem = model_stem(d.model_id)
    if stem:
        values["model"] = stem
    if d.hardware:
        values["hardware"] = d.hardware
    if d.tp:
        values["tp"] = d.tp
    values["block_tokens"] = run.block_tokens
    values["max_model_len"] = d.max_model_len
    engine = d.engine if d.engine in ("vllm", "sglang") else None
    if "engine" in have and engine:
        values["engine"] = engine
    if engine == "vllm" and "max_num_seqs" in have:
        values.update(
            max_num_seqs=d.max_num_seqs,
            max_num_batched_tokens=d.max_num_batched_tokens,
            gpu_memory_utilization=d.gpu_memory_utilization,
        )
    else:
        if d.max_num_seqs:
            values["max_running_requests"] = d.max_num_seqs
        if d.max_num_batched_tokens:
            values["chunked_prefill_size"] = d.max_num_batched_tokens
            values["max_prefill_tokens"] = d.max_num_batched_tokens
        if d.gpu_memory_utilization:
            values["l1_fraction"] = d.gpu_memory_utilization
    values = {k: v for k, v in values.items() if k in have and k not in explicit and v is not None}
    # the engine's own defaults apply to what the run does not record: an engine switch
    # drops the other engine's settings the base carried by default
    merged = {f.name: getattr(base, f.name) for f in fields(SimulationOptions)}
    merged.update(values)
    if "engine" in have and merged.get("engine") != getattr(base, "engine", None):
        from hisim_jax import simulation as sim

        for name in getattr(sim, "ENGINE_ONLY", {}).get(getattr(base, "engine", ""), ()):
            if name not in explicit and name not in values:
                merged[name] = None
    return SimulationOptions.checked(merged, where="options")


# ------------------------------------------------------------------------------------------------
# replay


@dataclass(frozen=True, slots=True)
class StageComparison:
    stage: Stage
    measured: StageMetrics
    predicted: StageMetrics
    measured_regime: str
    predicted_regime: str

    @property
    def regime_match(self) -> bool:
        return self.measured_regime == self.predicted_regime


@dataclass(frozen=True, slots=True)
class E2EReport:
    source: str
    format: str
    deployment: Deployment
    options: Any  # SimulationOptions
    stages: tuple[StageComparison, ...]
    unloaded_ttft_measured_s: float | None
    unloaded_ttft_predicted_s: float | None
    simulations: int  # simulator runs (later stages re-timed after a late drain)
    wall_s: float
    notes: tuple[str, ...] = ()

    def rows(self) -> list[dict]:
        """One row per stage × metric: measured, predicted (ms for latencies) and the signed
        relative error predicted / measured − 1 (None where either side is undefined)."""
        out = []
        for c in self.stages:
            for metric in METRICS:
                for stat in STATS:
                    m, p = c.measured.value(metric, stat), c.predicted.value(metric, stat)
                    out.append(_row(c, f"{metric}_{stat}_ms", m, p, 1e3))
            for name in THROUGHPUTS:
                out.append(_row(c, name, c.measured.value(name), c.predicted.value(name), 1.0))
            for name in ("requests_ok", "requests_failed"):
                out.append(_row(c, name, getattr(c.measured, name), getattr(c.predicted, name), 1))
        return out

    def summary(self) -> dict:
        stages = []
        for c in self.stages:
            errs = {r["metric"]: r["error"] for r in self.rows() if r["stage"] == c.stage.index}
            stages.append(
                {
                    "stage": c.stage.index,
                    "rate": c.stage.rate,
                    "start_s": c.stage.start_s,
                    "end_s": c.stage.end_s,
                    "measured": _metrics_json(c.measured),
                    "predicted": _metrics_json(c.predicted),
                    "error": errs,
                    "measured_regime": c.measured_regime,
                    "predicted_regime": c.predicted_regime,
                    "regime_match": c.regime_match,
                }
            )
        d = self.deployment
        return {
            "source": self.source,
            "format": self.format,
            "deployment": {f.name: getattr(d, f.name) for f in fields(Deployment)},
            "options": {f.name: getattr(self.options, f.name) for f in fields(self.options)},
            "unloaded_ttft_s": {
                "measured": self.unloaded_ttft_measured_s,
                "predicted": self.unloaded_ttft_predicted_s,
            },
            "regime_rule": (
                f"queueing if median TTFT > {QUEUEING_TTFT_RATIO:g} x the run's lowest TTFT, or "
                "any request failed (predicted: rejected or past the client's timeout)"
            ),
            "stages": stages,
            "simulations": self.simulations,
            "wall_s": self.wall_s,
            "notes": list(self.notes),
        }


def _row(c: StageComparison, metric: str, m, p, scale) -> dict:
    m = None if m is None else float(m) * scale
    p = None if p is None else float(p) * scale
    err = p / m - 1.0 if m not in (None, 0.0) and p is not None else None
    return {"stage": c.stage.index, "rate": c.stage.rate, "metric": metric,
            "measured": m, "predicted": p, "error": err}  # fmt: skip


def _metrics_json(m: StageMetrics) -> dict:
    out: dict[str, Any] = {"requests_ok": m.requests_ok, "requests_failed": m.requests_failed}
    for metric in METRICS:
        out[f"{metric}_s"] = {s: getattr(m.value(metric), s) for s in STATS}
    for name in THROUGHPUTS:
        out[name] = m.value(name)
    if m.extra:
        out["extra"] = dict(m.extra)
    return out


def _itl_samples(steps, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """Inter-token gaps from the step log, with weights: each step that advances decoding
    requests is one gap for each of them, lengthened by the steps since the previous such
    step (a prefill step between two decode steps stalls the decoding requests). Only steps
    starting in ``[t0, t1]`` count. An approximation of the per-token gaps: the step log does
    not say which requests each decode step advanced."""
    if steps is None or len(steps) == 0:
        return np.zeros(0), np.zeros(0)
    frame = steps
    if "replica" in frame.columns and frame["replica"].nunique() > 1:
        frame = frame[frame["replica"] == frame["replica"].iloc[0]]
    start = frame["start_s"].to_numpy(float)
    dur = frame["duration_s"].to_numpy(float)
    kind = frame["kind"].astype(str).to_numpy()
    n = frame["n_requests"].to_numpy(float)
    dec = kind != "prefill"
    gaps, weights = [], []
    pending, seen = 0.0, False
    for s, d, is_dec, k in zip(start, dur, dec, n, strict=True):
        if not is_dec:
            pending += d if seen else 0.0  # before any decode there is no gap to lengthen
            continue
        seen = True
        if t0 <= s <= t1:
            gaps.append(d + pending)
            weights.append(k)
        pending = 0.0
    return np.asarray(gaps), np.asarray(weights)


def _weighted_dist(x: np.ndarray, w: np.ndarray) -> Dist:
    ok = np.isfinite(x) & (w > 0)
    x, w = x[ok], w[ok]
    if len(x) == 0:
        return Dist()
    order = np.argsort(x)
    x, w = x[order], w[order]
    cw = np.cumsum(w) / w.sum()
    q = [float(x[min(np.searchsorted(cw, p), len(x) - 1)]) for p in (0.5, 0.9, 0.99)]
    return Dist(float((x * w).sum() / w.sum()), *q)


def _predicted_stage(frame, steps, k: int, stage: Stage, timeout_s: float | None) -> StageMetrics:
    done = frame["rejected"].astype(str) == ""
    if timeout_s is not None:
        late = frame["e2e_s"].to_numpy(float) > timeout_s
        ok_mask = done.to_numpy() & ~late
    else:
        ok_mask = done.to_numpy()
    ok = frame[ok_mask]
    ttft = ok["ttft_s"].to_numpy(float)
    e2e = ok["e2e_s"].to_numpy(float)
    out = ok["output_len"].to_numpy(float)
    tpot = ok["tpot_s"].to_numpy(float)
    tpot = tpot[np.isfinite(tpot)]
    span = float(ok["finish_s"].max() - frame["arrival_s"].min()) if len(ok) else 0.0
    t1 = float(ok["finish_s"].max()) if len(ok) else stage.end_s
    gaps, weights = _itl_samples(steps, float(frame["arrival_s"].min()), t1)
    itl = _weighted_dist(gaps, weights)
    multi = out > 1
    if multi.any():  # the mean over every gap is exact from the requests themselves
        mean = float((e2e[multi] - ttft[multi]).sum() / (out[multi] - 1).sum())
        itl = Dist(mean, itl.p50, itl.p90, itl.p99)
    return StageMetrics(
        stage=k,
        requests_ok=int(len(ok)),
        requests_failed=int(len(frame) - len(ok)),
        ttft=Dist.of(ttft),
        tpot=Dist.of(tpot),
        itl=itl,
        e2e=Dist.of(e2e),
        request_throughput_per_s=len(ok) / span if span > 0 else None,
        input_tok_s=float(ok["input_len"].sum()) / span if span > 0 else None,
        output_tok_s=float(out.sum()) / span if span > 0 else None,
        samples={"ttft": tuple(ttft), "tpot": tuple(tpot), "e2e": tuple(e2e)},
        extra={"itl_samples_from_steps": float(len(gaps))},
    )


def _lowest_ttft(metrics: Sequence[StageMetrics]) -> float | None:
    vals = []
    for m in metrics:
        if m.samples.get("ttft"):
            vals.append(min(m.samples["ttft"]))
        elif m.quantiles.get("ttft"):
            vals.append(m.quantiles["ttft"][0][1])
        elif m.ttft.p50 is not None:
            vals.append(m.ttft.p50)  # no minimum published: the median bounds it
    return min(vals) if vals else None


def regime(m: StageMetrics, unloaded_ttft_s: float | None) -> str:
    """``queueing`` or ``unloaded`` by the rule in ``QUEUEING_TTFT_RATIO``."""
    if m.requests_failed > 0:
        return "queueing"
    typical = m.ttft.p50 if m.ttft.p50 is not None else m.ttft.mean
    if typical is None or not unloaded_ttft_s:
        return "unknown"
    return "queueing" if typical > QUEUEING_TTFT_RATIO * unloaded_ttft_s else "unloaded"


def replay(
    run: BenchmarkRun,
    options,
    progress: Callable[[str], None] | None = None,
    simulate: Callable | None = None,
) -> E2EReport:
    """Simulate the run's requests with ``options`` and compare every stage.

    Stages of a run whose harness waits for each stage to drain (inference-perf, SGLang
    sweeps) are re-timed from the prediction: when a stage's last predicted finish plus the
    harness's pause falls after the next stage's start, the later stages are shifted and the
    run simulated again (at most once per stage; an idle gap longer than the drain changes
    nothing, the engine waits with its cache intact). ``simulate(options, requests)`` returns
    an object with ``requests`` and ``steps`` frames like ``simulation.run`` (the default);
    ``progress(message)`` hears each simulation."""
    import time

    from hisim_jax.simulation import run as simulation_run

    t_wall = time.perf_counter()
    sim = simulate or (lambda o, reqs: simulation_run(o, workload=reqs))
    reqs = list(run.requests)
    stage_of = np.asarray(run.stage_of)
    shift = np.zeros(len(run.stages))
    simulations = 0
    while True:
        arrivals = [r.arrival_s + shift[s] for r, s in zip(reqs, stage_of, strict=True)]
        batch = [replace(r, arrival_s=a) for r, a in zip(reqs, arrivals, strict=True)]
        if progress:
            progress(f"simulating {len(batch)} requests ({len(run.stages)} stages)")
        result = sim(options, batch)
        simulations += 1
        frame = result.requests.sort_values("request_id", kind="stable").reset_index(drop=True)
        if len(frame) != len(batch):
            raise E2EError(
                f"{run.source}: the simulation returned {len(frame)} of {len(batch)} requests"
            )
        if not run.drain_between_stages or len(run.stages) < 2:
            break
        finish = frame["finish_s"].to_numpy(float)
        late = None
        for k in range(len(run.stages) - 1):
            mine = stage_of == k
            last = np.nanmax(np.where(mine, finish, np.nan)) if mine.any() else np.nan
            if run.timeout_s is not None:  # the client gives up on a request at its timeout
                arr = np.asarray(arrivals)[mine]
                last = min(last, float(arr.max()) + run.timeout_s) if np.isfinite(last) else last
            nxt = np.asarray(arrivals)[stage_of == k + 1]
            if np.isfinite(last) and len(nxt) and last + run.stage_pause_s > nxt.min():
                late = (k, last + run.stage_pause_s - nxt.min() + 1e-6)
                break
        if late is None or simulations > len(run.stages):
            break
        shift[late[0] + 1 :] += late[1]
    steps = getattr(result, "steps", None)
    predicted = []
    for k, stage in enumerate(run.stages):
        mine = frame[stage_of == k]
        st = replace(stage, start_s=stage.start_s + shift[k], end_s=stage.end_s + shift[k])
        predicted.append(_predicted_stage(mine, steps, k, st, run.timeout_s))
    um, up = _lowest_ttft(run.measured), _lowest_ttft(predicted)
    comps = tuple(
        StageComparison(
            replace(s, start_s=s.start_s + shift[k], end_s=s.end_s + shift[k]),
            run.measured[k],
            predicted[k],
            regime(run.measured[k], um),
            regime(predicted[k], up),
        )
        for k, s in enumerate(run.stages)
    )
    return E2EReport(
        source=run.source,
        format=run.format,
        deployment=run.deployment,
        options=options,
        stages=comps,
        unloaded_ttft_measured_s=um,
        unloaded_ttft_predicted_s=up,
        simulations=simulations,
        wall_s=time.perf_counter() - t_wall,
        notes=run.notes,
    )


# ------------------------------------------------------------------------------------------------
# report files


def report_csv(report: E2EReport) -> str:
    buf = io.StringIO()
    w = _csv.writer(buf, lineterminator="\n")
    w.writerow(("stage", "rate", "metric", "measured", "predicted", "error"))
    for r in report.rows():
        w.writerow(
            [r["stage"], "" if r["rate"] is None else f"{r['rate']:g}", r["metric"]]
            + ["" if r[k] is None else f"{r[k]:.9g}" for k in ("measured", "predicted", "error")]
        )
    return buf.getvalue()


def cdf_series(report: E2EReport, metric: str) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(label, x ms, cumulative fraction, "measured"|"predicted") curves of one metric."""
    out = []
    for c in report.stages:
        tag = f"stage {c.stage.index}" + (f" ({c.stage.rate:g}/s)" if c.stage.rate else "")
        for side, m in (("measured", c.measured), ("predicted", c.predicted)):
            xs = m.samples.get(metric)
            if xs:
                x = np.sort(np.asarray(xs, float)) * 1e3
                out.append((f"{tag} {side}", x, np.arange(1, len(x) + 1) / len(x), side))
            elif m.quantiles.get(metric):
                q = np.asarray(m.quantiles[metric], float)
                out.append((f"{tag} {side} (published percentiles)", q[:, 1] * 1e3, q[:, 0], side))
    return out


def write_report(report: E2EReport, out_dir: str | Path) -> list[Path]:
    """``e2e.csv``, ``summary.json`` (strict JSON) and ``cdf_<metric>.png`` for each metric
    with a curve on either side, all moved into ``out_dir`` together."""
    from hisim_jax.plots import cdf_comparison

    writers: dict[str, Callable[[Path], Any]] = {
        "e2e.csv": lambda p: Path(p).write_text(report_csv(report), encoding="utf-8"),
        "summary.json": lambda p: Path(p).write_text(
            files.strict_json(report.summary(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        ),
    }
    for metric in METRICS:
        series = cdf_series(report, metric)
        if series:
            title = f"{Path(report.source).name}: {metric.upper()}"
            writers[f"cdf_{metric}.png"] = lambda p, s=series, t=title, m=metric: cdf_comparison(
                s, p, t, f"{m.upper()} (ms)"
            )
    return files.write_files_atomic(out_dir, writers)
