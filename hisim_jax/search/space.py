"""The search space: a ``space.yaml`` read into fixed options, axes, a GPU budget, SLOs and
objectives; its expansion into points (each a complete set of ``hisim simulate`` options); and
why a point cannot run (checked from the model, GPU and workload alone, never simulated).

A space file::

    model: llama-3.1-8b
    trace: ../shared/traces/mooncake_conversation_trace.jsonl   # any simulate option is fixed
    limit: 4000
    gpus: 16                         # a budget: replicas x tp <= 16 (or give `replicas`)
    slo: {ttft_p99_ms: 2000, tpot_p99_ms: 50}
    objectives: [usd_per_mtok, tokens_per_s_per_user]
    axes:
      hardware: [a100-sxm-80gb, h100-sxm, h200-sxm, b200]
      tp: [1, 2, 4]
      engine: [sglang, vllm]
      token_budget: {min: 2048, max: 16384, num: 4, scale: log}
      l2_gb: [0, 256]

Axis keys are simulate option names, plus three engine-neutral names that map to each engine's
own option: ``token_budget`` (SGLang ``chunked_prefill_size``, vLLM ``max_num_batched_tokens``),
``max_running`` (``max_running_requests`` / ``max_num_seqs``) and ``memory_fraction``
(``l1_fraction`` / ``gpu_memory_utilization``). An option of one engine given as an axis applies
to that engine's points only; the other engine's points are deduplicated.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from hisim_jax import files
from hisim_jax.simulation import ENGINE_ONLY, SimulationOptions, parse_pd, replica_kinds
from hisim_jax.specs import SpecError

# engine-neutral axis names -> (SGLang option, vLLM option)
ALIASES = {
    "token_budget": ("chunked_prefill_size", "max_num_batched_tokens"),
    "max_running": ("max_running_requests", "max_num_seqs"),
    "memory_fraction": ("l1_fraction", "gpu_memory_utilization"),
}
# options that define the workload: fixed for a whole search (one search per workload), except
# the rate, which scales arrivals only
WORKLOAD_KEYS = (
    "trace", "trace_format", "limit", "start_s", "end_s", "skip_bad_lines", "block_tokens", "seed",
)  # fmt: skip
SPACE_KEYS = ("gpus", "slo", "objectives", "fronts", "prices", "axes")

# metrics a search reports per point, and whether larger is better
METRICS = {
    "tokens_per_s_per_gpu": True,
    "tokens_per_s_per_user": True,
    "usd_per_mtok": False,
    "usd_per_mtok_total": False,
    "tokens_per_usd": True,
    "request_throughput_per_s": True,
    "goodput_req_s_per_gpu": True,
    "slo_attainment": True,
    "gpus": False,
    "hit_rate": True,
}
LATENCIES = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p90", "p99")
for _m in LATENCIES:
    for _s in STATS:
        METRICS[f"{_m}_s_{_s}"] = False
DEFAULT_OBJECTIVES = ("usd_per_mtok", "tokens_per_s_per_gpu", "tokens_per_s_per_user", "gpus")
# (x, y): aiconfigurator's and InferenceX's throughput per GPU vs per user; cost vs p99 TTFT
DEFAULT_FRONTS = (("tokens_per_s_per_user", "tokens_per_s_per_gpu"), ("ttft_s_p99", "usd_per_mtok"))


@dataclass(frozen=True, slots=True)
class SLOSpec:
    """Limits on aggregate latencies (``limits``: column -> seconds, e.g. ``ttft_s_p99``),
    per-request limits for goodput (``request_*_s``), and the share of requests that must meet
    every per-request limit (``attainment``)."""

    limits: tuple[tuple[str, float], ...] = ()
    request_ttft_s: float | None = None
    request_tpot_s: float | None = None
    request_e2e_s: float | None = None
    attainment: float | None = None

    @property
    def per_request(self) -> bool:
        return any(
            v is not None for v in (self.request_ttft_s, self.request_tpot_s, self.request_e2e_s)
        )

    def describe(self) -> str:
        parts = [f"{k} <= {v * 1e3:g} ms" for k, v in self.limits]
        for name, v in (
            ("TTFT", self.request_ttft_s), ("TPOT", self.request_tpot_s), ("E2E", self.request_e2e_s)
        ):  # fmt: skip
            if v is not None:
                parts.append(f"request {name} <= {v * 1e3:g} ms")
        if self.attainment is not None:
            parts.append(f"attainment >= {self.attainment:g}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class SearchSpace:
    base: dict  # fixed simulate options (model, workload, ...)
    axes: tuple[tuple[str, tuple], ...]  # (name, values) in file order
    gpus: int | None  # GPU budget: replicas x tp <= gpus
    slo: SLOSpec
    objectives: tuple[str, ...]
    fronts: tuple[tuple[str, str], ...]
    prices: tuple[tuple[str, float], ...] = ()  # GPU -> USD per GPU-hour, over the specs'
    where: str = "space"


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    options: dict  # simulate options (only those set), with gpus known
    axes: dict  # the axis values of this point (None where an axis does not apply)
    gpus: int
    reason: str = ""  # why it cannot run ("" = feasible)
    extra: dict = field(default_factory=dict)


def _err(where: str, msg: str) -> SpecError:
    return SpecError(f"{where}: {msg}")


PATH_KEYS = ("trace", "calibration", "estimator_table")


def read_space(path: str | Path) -> SearchSpace:
    """A space file (``read_space_doc``) as a ``SearchSpace``."""
    return space_from_dict(read_space_doc(path), str(path))


def read_space_doc(path: str | Path) -> dict:
    """A space file's mapping, its relative paths (trace, calibration, estimator_table) taken
    from the file's folder and made absolute, so the configs it writes replay from anywhere."""
    path = Path(path)
    doc = _mapping(files.read_yaml(path, "search space (YAML)", SpecError), str(path))
    for key in PATH_KEYS:
        v = doc.get(key)
        if isinstance(v, str) and not Path(v).is_absolute():
            doc[key] = str((path.parent / v).resolve())
    return doc


def _mapping(doc, where: str) -> dict:
    if not isinstance(doc, dict):
        raise _err(where, f"expected a mapping (model, workload, axes, slo, ...), got {doc!r}")
    return dict(doc)


def _range_values(name: str, spec: dict, where: str) -> tuple:
    """``{min, max, step}`` or ``{min, max, num, scale: linear|log}`` as a tuple of values."""
    allowed = {"min", "max", "step", "num", "scale"}
    if extra := set(spec) - allowed:
        raise _err(where, f"axes.{name}: unknown key {sorted(extra)[0]!r} (use min, max, step or "
                          "num, scale)")  # fmt: skip
    for k in ("min", "max"):
        v = spec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _err(where, f"axes.{name}.{k} must be a finite number, got {v!r}")
    lo, hi = spec["min"], spec["max"]
    if hi < lo:
        raise _err(where, f"axes.{name}: max {hi!r} is below min {lo!r}")
    scale = spec.get("scale", "linear")
    if scale not in ("linear", "log"):
        raise _err(where, f"axes.{name}.scale must be linear or log, got {scale!r}")
    ints = all(isinstance(spec.get(k, 0), int) for k in ("min", "max", "step"))
    if ("step" in spec) == ("num" in spec):
        raise _err(where, f"axes.{name}: give exactly one of step or num")
    if "step" in spec:
        step = spec["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise _err(where, f"axes.{name}.step must be a number > 0, got {step!r}")
        if scale == "log":
            raise _err(where, f"axes.{name}: a log scale takes num, not step")
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        if n > 10_000:
            raise _err(where, f"axes.{name}: {n} values; at most 10000 per axis")
        values = [lo + i * step for i in range(n)]
    else:
        num = spec["num"]
        if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 10_000:
            raise _err(where, f"axes.{name}.num must be an integer in 1..10000, got {num!r}")
        if scale == "log":
            if lo <= 0:
                raise _err(where, f"axes.{name}: a log scale needs min > 0, got {lo!r}")
            values = list(np.geomspace(lo, hi, num))
        else:
            values = list(np.linspace(lo, hi, num))
    if ints:
        values = [int(round(v)) for v in values]
    else:
        values = [float(round(v, 12)) for v in values]
    return tuple(dict.fromkeys(values))  # unique, in order


def _slo(doc, where: str) -> SLOSpec:
    if doc is None:
        return SLOSpec()
    if not isinstance(doc, dict):
        raise _err(where, f"slo must be a mapping such as {{ttft_p99_ms: 2000}}, got {doc!r}")
    limits, request, attainment = [], {}, None
    for key, v in doc.items():
        k = str(key)
        if k == "attainment":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise _err(where, f"slo.attainment must be a share in (0, 1], got {v!r}")
            attainment = float(v)
            continue
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v > 0)
        ):
            raise _err(where, f"slo.{k} must be a number of milliseconds > 0, got {v!r}")
        parts = k.split("_")
        if len(parts) == 3 and parts[0] in LATENCIES and parts[1] in STATS and parts[2] == "ms":
            limits.append((f"{parts[0]}_s_{parts[1]}", float(v) / 1e3))
        elif len(parts) == 2 and parts[0] in ("ttft", "tpot") and parts[1] == "ms":
            request[f"request_{parts[0]}_s"] = float(v) / 1e3
        else:
            raise _err(
                where,
                f"slo.{k}: expected <metric>_<stat>_ms (metric {'/'.join(LATENCIES)}, stat "
                f"{'/'.join(STATS)}), ttft_ms/tpot_ms (per request) or attainment",
            )
    if attainment is not None and not request:
        raise _err(where, "slo.attainment needs a per-request limit (ttft_ms or tpot_ms)")
    return SLOSpec(tuple(limits), attainment=attainment, **request)


def _metric_list(doc, key: str, where: str, default: tuple) -> tuple:
    if doc is None:
        return default
    if isinstance(doc, str):
        doc = [doc]
    if not isinstance(doc, list) or not doc:
        raise _err(where, f"{key} must be a list of metric names, got {doc!r}")
    for name in doc:
        if name not in METRICS:
            raise _err(where, f"{key}: unknown metric {name!r} (one of {', '.join(METRICS)})")
    return tuple(doc)


def _fronts(doc, where: str) -> tuple:
    if doc is None:
        return DEFAULT_FRONTS
    if not isinstance(doc, list) or not doc:
        raise _err(where, f"fronts must be a list of [x, y] metric pairs, got {doc!r}")
    out = []
    for pair in doc:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _err(where, f"fronts: each front is [x, y], got {pair!r}")
        _metric_list(pair, "fronts", where, ())
        out.append((pair[0], pair[1]))
    return tuple(out)


def _refuse_unscreened(name: str, key, where: str) -> None:
    """Options the screen's steady-state model does not know yet: a search over them would
    rank points by a screen that ignores them."""
    if name.startswith("speculative_"):
        raise _err(where, f"field '{key}': the search's screen does not model speculative "
                          "decoding yet (simulate such a deployment with hisim simulate)")  # fmt: skip


def space_from_dict(doc, where: str = "space") -> SearchSpace:
    """A ``SearchSpace`` from the mapping a space file holds; one-line errors name the key."""
    doc = _mapping(doc, where)
    known = {f.name for f in fields(SimulationOptions)}
    base, axes = {}, []
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name in SPACE_KEYS:
            continue
        if name == "out":
            raise _err(where, "field 'out': give the output folder as hisim search --out")
        if name not in known:
            raise _err(where, f"field '{key}' is not an option of simulate nor of search")
        _refuse_unscreened(name, key, where)
        base[name] = value
    raw_axes = doc.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise _err(where, f"axes must be a mapping of option -> values, got {raw_axes!r}")
    for key, spec in raw_axes.items():
        name = str(key).replace("-", "_")
        if name not in known and name not in ALIASES:
            raise _err(where, f"axes.{key} is not an option of simulate "
                              f"(nor one of {', '.join(ALIASES)})")  # fmt: skip
        _refuse_unscreened(name, f"axes.{key}", where)
        if name in WORKLOAD_KEYS:
            raise _err(where, f"axes.{key}: the workload is fixed for a search (run one search "
                              "per workload; rate_scale may vary)")  # fmt: skip
        if name in base:
            raise _err(where, f"axes.{key}: also given as a fixed option")
        if isinstance(spec, dict):
            values = _range_values(name, spec, where)
        elif isinstance(spec, list):
            if not spec:
                raise _err(where, f"axes.{key}: an empty list")
            values = tuple(dict.fromkeys(spec))
        else:
            values = (spec,)
        axes.append((name, values))
    names = [a for a, _ in axes]
    for alias, (sg, vl) in ALIASES.items():
        if alias in names and (sg in names or vl in names or sg in base or vl in base):
            raise _err(where, f"axes.{alias} and {sg}/{vl} both given; keep one")
    if "fleet" in names and {"hardware", "tp", "replicas"} & set(names):
        raise _err(where, "axes.fleet fixes hardware, tp and replicas; drop those axes")
    gpus = doc.get("gpus")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
        raise _err(where, f"gpus (a budget) must be an integer >= 1, got {gpus!r}")
    if gpus is None and "replicas" not in names and "pd" not in names and "fleet" not in names:
        base.setdefault("replicas", 1)
    prices = doc.get("prices") or {}
    if not isinstance(prices, dict):
        raise _err(where, f"prices must map a GPU to USD per GPU-hour, got {prices!r}")
    for hw, p in prices.items():
        if (
            isinstance(p, bool)
            or not isinstance(p, (int, float))
            or not (math.isfinite(p) and p >= 0)
        ):
            raise _err(where, f"prices.{hw} must be USD per GPU-hour >= 0, got {p!r}")
    space = SearchSpace(
        base=base,
        axes=tuple(axes),
        gpus=gpus,
        slo=_slo(doc.get("slo"), where),
        objectives=_metric_list(doc.get("objectives"), "objectives", where, DEFAULT_OBJECTIVES),
        fronts=_fronts(doc.get("fronts"), where),
        prices=tuple((str(k), float(v)) for k, v in prices.items()),
        where=where,
    )
    _check_values(space)
    return space


def _check_values(space: SearchSpace) -> None:
    """Every fixed option and every axis value alone must be a valid simulate option (a value
    out of range is an error of the file, not an infeasible point)."""
    try:
        SimulationOptions.checked(space.base, where=space.where)
    except SpecError as e:
        raise _err(space.where, str(e).split(": ", 1)[-1]) from None
    from hisim_jax.specs import load_hardware, load_model

    for key, load in (("model", load_model), ("hardware", load_hardware)):
        if key in space.base:  # a name that is no file fails here, not as infeasible points
            try:
                load(space.base[key])
            except SpecError as e:
                raise _err(space.where, f"field '{key}': {e}") from None
        for name, values in space.axes:
            for i, v in enumerate(values if name == key else ()):
                try:
                    load(v)
                except SpecError as e:
                    raise _err(space.where, f"axes.{name}[{i}]: {e}") from None
    engine = space.base.get("engine", "sglang")
    for name, values in space.axes:
        for i, v in enumerate(values):
            targets = ALIASES.get(name, (name,))
            for target in targets:
                eng = next((e for e, opts in ENGINE_ONLY.items() if target in opts), engine)
                trial = {**space.base, "engine": eng, target: v}
                if target == "pd" and v not in (None, "none"):
                    try:
                        trial["replicas"] = sum(parse_pd(str(v)))
                    except SpecError as e:
                        raise _err(space.where, f"axes.{name}[{i}]: {e}") from None
                try:
                    SimulationOptions.checked(trial, where="x")
                except SpecError as e:
                    why = str(e).split(": ", 1)[-1]
                    raise _err(space.where, f"axes.{name}[{i}]: {why}") from None


def point_id(options: dict) -> str:
    """A stable short name of a configuration: a hash of its options."""
    text = json.dumps(options, sort_keys=True, default=str)
    return "p" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _resolve(base: dict, combo: dict) -> dict:
    """Options of one combination: aliases mapped to the engine's option, other engines'
    options dropped, PD's replica count filled in."""
    opts = {**base}
    engine = combo.get("engine", base.get("engine", "sglang"))
    for name, v in combo.items():
        if name in ALIASES:
            opts[ALIASES[name][0 if engine == "sglang" else 1]] = v
        else:
            opts[name] = v
    for other, names in ENGINE_ONLY.items():
        if other != engine:
            for n in names:
                opts.pop(n, None)
    if opts.get("pd") in (None, "none", ""):
        opts.pop("pd", None)
    else:
        opts["replicas"] = sum(parse_pd(str(opts["pd"])))
    return {k: v for k, v in opts.items() if v is not None}


def _single_replica(opts: dict) -> dict:
    """A router only matters with several replicas to route to: one replica's points collapse
    onto one (its router, bucket bounds and seed left at their defaults)."""
    if int(opts.get("replicas", 1)) == 1 and not opts.get("fleet") and not opts.get("pd"):
        for k in ("router", "bucket_bounds"):
            opts.pop(k, None)
    return opts


_DEFAULT_HARDWARE = next(f.default for f in fields(SimulationOptions) if f.name == "hardware")


def expand(space: SearchSpace) -> list[Point]:
    """Every distinct configuration of the space, in axis order. With a GPU budget and no
    ``replicas`` axis, each point takes every replica count that fits the budget."""
    names = [n for n, _ in space.axes]
    grids = [vals for _, vals in space.axes]
    add_replicas = (
        space.gpus is not None
        and "replicas" not in names
        and "replicas" not in space.base
        and "fleet" not in names
        and "fleet" not in space.base
    )
    seen: dict[str, Point] = {}
    prices = dict(space.prices)
    for combo_values in itertools.product(*grids):
        combo = dict(zip(names, combo_values, strict=True))
        opts = _resolve(space.base, combo)
        counts = [None]
        if add_replicas and "pd" not in opts:
            tp = int(opts.get("tp", 1))
            counts = list(range(1, max(1, space.gpus // tp) + 1))
        for count in counts:
            o = dict(opts)
            if count is not None:
                o["replicas"] = count
            o = _single_replica(o)
            price = prices.get(str(o.get("hardware", _DEFAULT_HARDWARE)))
            if price is not None and "gpu_price_usd_per_hour" not in o and not o.get("fleet"):
                o["gpu_price_usd_per_hour"] = price  # so its config replays at that price
            gpus = _gpus(o, space.where)
            axes = {n: combo[n] for n in names}
            for alias, (sg, vl) in ALIASES.items():
                if alias in axes:
                    eng = o.get("engine", "sglang")
                    axes[alias] = o.get(sg if eng == "sglang" else vl)
            for n in names:  # an option of the other engine: not applicable here
                if n not in ALIASES and n not in o and n not in ("pd", "replicas"):
                    axes[n] = None
            if add_replicas:
                axes["replicas"] = o.get("replicas")
            pid = point_id(o)
            if pid in seen:
                continue
            reason = ""
            if space.gpus is not None and gpus > space.gpus:
                reason = f"needs {gpus} GPUs, over the budget of {space.gpus}"
            seen[pid] = Point(pid, o, axes, gpus, reason)
    return list(seen.values())


def _gpus(o: dict, where: str) -> int:
    """GPUs of a point's options: its replicas' TP degrees summed (``replica_kinds``)."""
    try:
        kinds = replica_kinds(o.get("fleet"), o.get("hardware", ""), int(o.get("tp", 1)),
                              int(o.get("replicas", 1)), o.get("pd"))  # fmt: skip
    except SpecError as e:
        raise _err(where, str(e).removeprefix("options: ")) from None
    return sum(tp for _, tp in kinds)
