"""The ``hisim`` command line: thin commands that parse options and call the package.

Bad input ends with a one-line ``error: ...`` on stderr and exit code 2, never a traceback:
usage errors (an unknown command or option, a value of the wrong type) as well as bad files
and values. Output paths are checked before any work; files are written to a temporary name
and renamed, so nothing already written is corrupted.
"""

from __future__ import annotations

import functools
import os
import sys
from enum import Enum
from pathlib import Path

import typer
import typer.core

from hisim_jax import files
from hisim_jax.files import write_atomic
from hisim_jax.paths import data_dir


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _click_exceptions():
    """The exceptions of the click that typer parses with: vendored as ``typer._click`` since
    typer 0.2x, the ``click`` package before."""
    vendored = getattr(typer.core, "_click", None)
    if vendored is not None:
        return vendored.exceptions
    import click

    return click.exceptions


def _aborts(exc) -> tuple:
    """Click's Abort: in its exceptions module before typer vendored click, in
    ``typer.exceptions`` since."""
    found = (
        getattr(exc, "Abort", None),
        getattr(getattr(typer, "exceptions", None), "Abort", None),
    )
    return tuple(a for a in found if a is not None)


def _given_value(param, args) -> str:
    """``, got 'VALUE'`` for the value given to option ``param`` on the command line ('' if none)."""
    opts = getattr(param, "opts", None) or []
    args = [str(a) for a in args]
    for i, a in enumerate(args):
        for opt in opts:
            if a == opt and i + 1 < len(args):
                return f", got {args[i + 1]!r}"
            if a.startswith(f"{opt}="):
                return f", got {a[len(opt) + 1 :]!r}"
    return ""


class OneLineUsageErrors(typer.core.TyperGroup):
    """Click's usage errors (unknown command or option, a missing or mistyped value) as one
    line ``error: options: ...`` with exit code 2, like every other bad input, instead of
    typer's multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        exc = _click_exceptions()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except exc.ClickException as e:
            if not standalone_mode:
                raise
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            got = _given_value(getattr(e, "param", None), sys.argv[1:] if args is None else args)
            msg = _one_line(e.format_message()).rstrip(".") + got
            typer.echo(f"error: options: {msg}{hint}", err=True)
            sys.exit(2)
        except _aborts(exc):
            if not standalone_mode:
                raise
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        except BrokenPipeError:  # the reader went away (| head): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
    # help texts print as written: a default in brackets, "[lru]", is not a rich markup tag
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=False,
    help="hisim-jax: simulate LLM serving on CPUs: step latency, engine, KV-cache tiers.",
)
validate_app = typer.Typer(add_completion=False, help="Compare predictions with measurements.")
app.add_typer(validate_app, name="validate")

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_HARDWARE = "h100-sxm"
DEFAULT_BATCH = "[[0,2048],[4096,1]]"


@app.callback()
def _setup() -> None:
    from hisim_jax.compile_cache import enable

    enable()


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _default_profiles() -> Path:
    return data_dir("data") / "profiles" / "h100"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def handles_errors(fn):
    """Turn expected input errors into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from hisim_jax.specs import SpecError

        try:
            return fn(*args, **kwargs)
        except (SpecError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _fail(msg)
        except OSError as e:  # a read or write the loaders did not foresee: still one line
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or _one_line(str(e)) or type(e).__name__}")

    return wrapper


def _check_options(**ranges) -> None:
    """``name=(value, lo, closed, hi)`` for options that must lie in a range (None: not given)."""
    from hisim_jax.simulation import range_error

    for name, (v, lo, closed, hi) in ranges.items():
        if v is not None and (why := range_error(name, v, lo, closed, hi)):
            raise ValueError(f"options: {why}")


def _engine_calibrations(hardware: list[str], engine: str) -> dict[str, str]:
    """GPU name -> its production-kernel calibration for ``engine`` (``--engine``)."""
    from hisim_jax.estimator.roofline import calibration_path
    from hisim_jax.specs import load_hardware

    names = [load_hardware(h).name for h in hardware]
    return {n: str(calibration_path(n, engine)) for n in names}


def _estimator(kind: str, *args, **kwargs):
    """The estimator backend ``kind``; a combination of options the model refuses (tp, dtypes)
    names options."""
    from hisim_jax.estimator.backends import make_estimator
    from hisim_jax.specs import SpecError

    try:
        return make_estimator(kind, *args, **kwargs)
    except SpecError:
        raise
    except ValueError as e:
        raise ValueError(f"options: {e}") from None


ESTIMATOR_HELP = (
    "Step-latency backend: roofline (fitted operator roofline), aiconfigurator (lookup in "
    "aiconfigurator-core's kernel tables; hisim-jax[aic]) or table (a fit to --estimator-table)."
)
ESTIMATOR_TABLE_HELP = "With --estimator table: measured steps.csv (model, batch, step_ms)."
EXTRAPOLATE_HELP = "With --estimator table: predict batches outside the measured steps' range."


def _estimator_options(kind: str, table: Path | None, extrapolate: bool) -> dict:
    """The backend options of --estimator, checked before any work."""
    from hisim_jax.estimator.backends import BACKENDS

    if kind not in BACKENDS:
        raise ValueError(
            f"options: field 'estimator' must be one of {', '.join(BACKENDS)}, got {kind!r}"
        )
    if (kind == "table") != (table is not None):
        raise ValueError("options: --estimator-table goes with --estimator table, and it needs one")
    return {"table": str(table), "extrapolate": extrapolate} if kind == "table" else {}


def _echo_json(obj) -> None:
    typer.echo(files.strict_json(obj, indent=2, sort_keys=True))


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def _table(title: str, columns: list[str], rows: list[list], width: int | None = None) -> None:
    """A rich table; ``width``: at least that many columns even off a terminal (rich's
    default there is 80, which truncates a wide table's cells)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(
            c,
            justify="right" if c not in ("name", "op", "scope", "model", "kind") else "left",
            no_wrap=c in ("model", "name"),
        )
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    console = Console()
    if width and console.width < width:
        console = Console(width=width)
    console.print(t)


# ------------------------------------------------------------------------------------------------


@app.command()
@handles_errors
def estimate(
    model: str = typer.Option(DEFAULT_MODEL, help="Name in models/ or path to a HF config.json."),
    hardware: list[str] = typer.Option(
        [DEFAULT_HARDWARE],
        "--hardware",
        "-H",
        help="GPU name in hardware_specs/ or YAML path; repeatable.",
    ),
    batch: str = typer.Option(
        None, help=f"JSON list of [cache_len, new_len] (default {DEFAULT_BATCH})."
    ),
    batches: Path = typer.Option(
        None, help="CSV with columns 'model' and 'batch' (the layout of profiles' steps.csv)."
    ),
    out: Path = typer.Option(
        None, help="With --batches: write input rows + hardware + predicted_ms."
    ),
    tp: int = typer.Option(1, help="Tensor-parallel degree."),
    weight_dtype: str = typer.Option(
        None, help="bf16, fp8, fp4, mxfp4 or int4 [the checkpoint's: its quantization_config]."
    ),
    kv_dtype: str = typer.Option("bf16", help="bf16 or fp8."),
    act_dtype: str = typer.Option(
        None, help="GEMM input precision (default: fp8 with fp8/fp4 weights, i.e. W8A8; else bf16)."
    ),
    calibration: Path = typer.Option(
        None, help="Calibration JSON [the reference-step fit; with --engine, each GPU's]."
    ),
    engine: str = typer.Option(
        None, help="sglang or vllm: each GPU's production-kernel calibration for that engine."
    ),
    breakdown: bool = typer.Option(False, help="Add a per-operator table."),
    fmt: Format = typer.Option(Format.table, "--format", help="Output format."),
    estimator: str = typer.Option("roofline", help=ESTIMATOR_HELP),
    estimator_table: Path = typer.Option(None, help=ESTIMATOR_TABLE_HELP),
    extrapolate: bool = typer.Option(False, help=EXTRAPOLATE_HELP),
):
    """Predict the latency of one forward step (or of every row of a CSV of batches)."""
    from hisim_jax.estimator.batch import parse_batch

    _check_options(tp=(tp, 1, True, 1024))
    backend = _estimator_options(estimator, estimator_table, extrapolate)
    if calibration is not None and estimator != "roofline":
        raise ValueError("options: --calibration goes with --estimator roofline")
    if engine is not None:
        if engine not in ("sglang", "vllm"):
            raise ValueError(f"options: field 'engine' must be one of sglang, vllm, got {engine!r}")
        if calibration is not None or estimator != "roofline":
            raise ValueError("options: --engine picks the roofline's calibration: not with "
                             "--calibration or another --estimator")  # fmt: skip
    if calibration is not None:  # a bad file fails before a CSV of batches is read
        from hisim_jax.estimator.roofline import load_calibration

        load_calibration(calibration)
    if engine is not None:
        calibration = _engine_calibrations(hardware, engine)
    if batches is not None:
        if batch is not None:
            raise ValueError("give either --batch or --batches, not both")
        if out is not None:
            files.check_output_file(out)
        return _estimate_csv(
            batches, out, hardware, tp, weight_dtype, kv_dtype, act_dtype, calibration, fmt,
            estimator, backend,
        )  # fmt: skip
    if out is not None:
        raise ValueError("--out goes with --batches")
    parsed = parse_batch(batch or DEFAULT_BATCH, where="--batch")
    if isinstance(calibration, dict):  # --engine: one estimator per GPU, each on its own fit
        ests = [
            _estimator(estimator, model, [hw], tp, weight_dtype, kv_dtype,
                       calibration=cal, act_dtype=act_dtype)
            for hw, cal in calibration.items()
        ]  # fmt: skip
    else:
        if estimator == "roofline":
            backend = {"calibration": calibration, "act_dtype": act_dtype}
        elif estimator == "aiconfigurator":
            backend = {"act_dtype": act_dtype}
        ests = [_estimator(estimator, model, hardware, tp, weight_dtype, kv_dtype, **backend)]
    lat = [v for e in ests for v in e.step_latency_s([parsed]).reshape(1, -1)[0]]
    est = ests[0]
    per_gpu = [(e, i) for e in ests for i in range(len(e.hardware))]
    parts = [e.breakdown_s(parsed, i) for e, i in per_gpu] if breakdown else None
    est_hardware = [e.hardware[i] for e, i in per_gpu]
    rows = [
        {"model": est.model.name, "hardware": hw.name, "tp": tp, "predicted_ms": float(v) * 1e3}
        for hw, v in zip(est_hardware, lat, strict=True)
    ]
    if fmt == Format.json:
        if parts:
            for r, p in zip(rows, parts, strict=True):
                r["breakdown_ms"] = {k: v * 1e3 for k, v in p.items()}
        typer.echo(files.strict_json(rows if len(rows) > 1 else rows[0], indent=2))
    elif fmt == Format.csv:
        typer.echo("model,hardware,tp,predicted_ms")
        for r in rows:
            typer.echo(f"{r['model']},{r['hardware']},{r['tp']},{r['predicted_ms']:.6g}")
        if parts:
            typer.echo("hardware,op,ms")
            for hw, p in zip(est_hardware, parts, strict=True):
                for k, v in p.items():
                    typer.echo(f"{hw.name},{k},{v * 1e3:.6g}")
    else:
        _table(
            f"{est.model.name}, batch of {len(parsed)} requests, {sum(n for _, n in parsed)} new tokens",
            ["hardware", "tp", "predicted_ms"],
            [[r["hardware"], r["tp"], r["predicted_ms"]] for r in rows],
        )
        if parts:
            for hw, p in zip(est_hardware, parts, strict=True):
                total = sum(p.values())
                _table(
                    f"breakdown on {hw.name}",
                    ["op", "ms", "share"],
                    [[k, v * 1e3, f"{v / total:.1%}"] for k, v in p.items() if v > 0],
                )


def _estimate_csv(
    path, out, hardware, tp, weight_dtype, kv_dtype, act_dtype, calibration, fmt,
    estimator="roofline", backend=None,
):  # fmt: skip
    import pandas as pd

    from hisim_jax.estimator.backends import predict_rows
    from hisim_jax.estimator.calibrate import predict_steps_s, read_steps
    from hisim_jax.estimator.roofline import ATTENTION_BACKENDS, read_calibration
    from hisim_jax.specs import load_hardware

    rows = read_steps(
        path, False, tp=tp, weight_dtype=weight_dtype, kv_dtype=kv_dtype, act_dtype=act_dtype
    )
    hws = [load_hardware(h) for h in hardware]
    frames = []
    with _progress() as prog:
        task = prog.add_task("estimating", total=len(hws))
        for hw in hws:
            f = rows.frame.copy()
            f["hardware"] = hw.name
            if estimator == "roofline":
                cal = calibration.get(hw.name) if isinstance(calibration, dict) else calibration
                params, attention = read_calibration(cal, hw.name)
                be = ATTENTION_BACKENDS[attention]
                f["predicted_ms"] = predict_steps_s(params, rows, hw, be=be) * 1e3
            else:
                extra = {"act_dtype": act_dtype} if estimator == "aiconfigurator" else {}
                pred_s = predict_rows(
                    estimator, rows.frame, hw, tp, weight_dtype, kv_dtype, **backend, **extra
                )
                f["predicted_ms"] = pred_s * 1e3
            frames.append(f)
            prog.advance(task)
    result = pd.concat(frames, ignore_index=True)
    if out is not None:
        write_atomic(out, lambda p: result.to_csv(p, index=False))
        typer.echo(f"wrote {len(result)} rows to {out}", err=True)
    elif fmt == Format.json:
        typer.echo(result.to_json(orient="records", indent=2))
    elif fmt == Format.csv or len(result) > 40:
        typer.echo(result.to_csv(index=False), nl=False)
    else:
        cols = [c for c in ("model", "kind", "hardware", "predicted_ms") if c in result.columns]
        _table(str(path), cols, result[cols].values.tolist())


@app.command()
@handles_errors
def calibrate(
    profiles: Path = typer.Option(None, help="Folder with steps.csv (+ gemm.csv, attention.csv)."),
    hardware: str = typer.Option(DEFAULT_HARDWARE, help="The GPU the profiles were taken on."),
    out: Path = typer.Option(..., help="Calibration JSON to write."),
    iterations: int = typer.Option(1500, min=1, help="Adam steps."),
    source: str = typer.Option(
        "profiles", help="profiles (our steps.csv format) or aiconfigurator (its kernel tables)."
    ),
    system: str = typer.Option(None, help="aiconfigurator system, e.g. h100_sxm."),
    backend: str = typer.Option(None, help="aiconfigurator engine: vllm, sglang or trtllm."),
    version: str = typer.Option(None, help="aiconfigurator engine version [newest]."),
):
    """Fit the estimator's scale factors to measured profiles (or to the per-operator kernel
    tables of aiconfigurator-core, `pip install hisim-jax[aic]`) and write a calibration JSON."""
    from hisim_jax.estimator.calibrate import calibrate_dir, calibration_document
    from hisim_jax.specs import load_hardware

    files.check_output_file(out)
    if source == "aiconfigurator":
        _calibrate_aiconfigurator(system, backend, version, iterations, out)
        return
    if source != "profiles":
        raise ValueError(
            f"options: field 'source' must be profiles or aiconfigurator, got {source!r}"
        )
    hw = load_hardware(hardware)
    profiles = profiles or _default_profiles()
    with _progress() as prog:
        task = prog.add_task("fitting", total=iterations)
        result, report = calibrate_dir(
            profiles, hw, steps_n=iterations, progress=lambda i, n: prog.update(task, completed=i)
        )
    doc = calibration_document(result.params, hw, report, str(profiles), result.eager_s)
    write_atomic(
        out, lambda p: Path(p).write_text(files.strict_json(doc, indent=2, sort_keys=True) + "\n")
    )
    _table(
        f"fit on {profiles} ({report['rows']} steps)",
        ["scope", "name", "MAPE"],
        [[s, n, f"{v:.2%}"] for s, n, v in _report_rows(report)],
    )
    typer.echo(f"p90 {report['p90']:.2%}  max {report['max']:.2%}  -> {out}")


def _calibrate_aiconfigurator(system, backend, version, iterations: int, out: Path) -> None:
    from hisim_jax.estimator.aiconfigurator import calibrate_from_aiconfigurator

    if not system or not backend:
        raise ValueError("options: --source aiconfigurator needs --system and --backend")
    with _progress() as prog:
        task = prog.add_task("fitting", total=iterations)
        doc = calibrate_from_aiconfigurator(
            system, backend, version, steps_n=iterations,
            progress=lambda i, n: prog.update(task, completed=i, total=n),
        )  # fmt: skip
    write_atomic(
        out, lambda p: Path(p).write_text(files.strict_json(doc, indent=2, sort_keys=True) + "\n")
    )
    rows = [[k, v["rows"], f"{v['mape']:.2%}"] for k, v in doc["fit"].items() if "mape" in v]
    _table(
        f"{system}/{backend} {doc['version']}: fit per operator", ["table", "rows", "MAPE"], rows
    )
    typer.echo(f"-> {out}")


def _report_rows(report):
    from hisim_jax.validate.steps import report_rows

    return report_rows(report)


@validate_app.command("steps")
@handles_errors
def validate_steps_cmd(
    profile: Path = typer.Option(
        None, help="steps.csv with measured step_ms (default: shipped H100)."
    ),
    hardware: str = typer.Option(DEFAULT_HARDWARE, help="The GPU the profile was measured on."),
    calibration: Path = typer.Option(
        None, help="Calibration JSON (default: the shipped H100 fit)."
    ),
    tp: int = typer.Option(1),
    plot: Path = typer.Option(Path("validate_steps.png"), help="Predicted-vs-measured PNG."),
    out: Path = typer.Option(None, help="Also write per-row predictions as CSV."),
    fmt: Format = typer.Option(Format.table, "--format"),
    estimator: str = typer.Option("roofline", help=ESTIMATOR_HELP),
    estimator_table: Path = typer.Option(
        None, help=ESTIMATOR_TABLE_HELP + " The profile itself is in-sample."
    ),
    extrapolate: bool = typer.Option(False, help=EXTRAPOLATE_HELP),
):
    """Step-latency error against measurements: MAPE overall, per model and per kind."""
    from hisim_jax.estimator.roofline import read_calibration
    from hisim_jax.plots import predicted_vs_measured
    from hisim_jax.specs import load_hardware
    from hisim_jax.validate.steps import validate_steps

    _check_options(tp=(tp, 1, True, 1024))
    backend = _estimator_options(estimator, estimator_table, extrapolate)
    if calibration is not None and estimator != "roofline":
        raise ValueError("options: --calibration goes with --estimator roofline")
    for path in (out, plot):
        if path is not None:
            files.check_output_file(path)
    hw = load_hardware(hardware)
    profile = profile or (_default_profiles() / "steps.csv")
    if estimator == "roofline":
        params, attention = read_calibration(calibration, hw.name)
        result = validate_steps(profile, hw, params, tp=tp, attention=attention)
    else:
        result = _validate_steps_backend(profile, hw, tp, estimator, backend)
    f = result.frame
    if plot is not None:  # the plot first: a failing plot leaves no new CSV behind
        groups = f["kind"].to_numpy() if "kind" in f.columns else None
        predicted_vs_measured(  # writes through a temporary file itself
            f["measured_ms"].to_numpy(),
            f["predicted_ms"].to_numpy(),
            groups,
            plot,
            title=f"{Path(profile).name} on {hw.name}: MAPE {result.report['mape']:.1%}",
        )
    if out is not None:
        write_atomic(out, lambda p: f.to_csv(p, index=False))
    if fmt == Format.json:
        _echo_json(result.report)
    elif fmt == Format.csv:
        typer.echo("scope,name,mape")
        for s, n, v in _report_rows(result.report):
            typer.echo(f"{s},{n},{v:.6g}")
    else:
        _table(
            f"{profile} on {hw.name}: {result.report['rows']} steps",
            ["scope", "name", "MAPE"],
            [[s, n, f"{v:.2%}"] for s, n, v in _report_rows(result.report)],
        )
        typer.echo(
            f"p90 {result.report['p90']:.2%}  max {result.report['max']:.2%}  "
            f"bias {result.report['bias']:+.2%}" + (f"  plot -> {plot}" if plot else "")
        )


def _validate_steps_backend(profile, hw, tp: int, estimator: str, backend: dict):
    """``validate_steps`` with another estimator backend: one estimator per model of the
    profile, the same frame and report."""
    from hisim_jax.estimator.backends import predict_rows
    from hisim_jax.estimator.calibrate import error_report, read_steps
    from hisim_jax.validate.steps import StepValidation

    rows = read_steps(profile, require_time=True, tp=tp)
    pred_s = predict_rows(estimator, rows.frame, hw, tp, **backend)
    frame = rows.frame.copy()
    frame["predicted_ms"] = pred_s * 1e3
    frame["measured_ms"] = rows.measured_s * 1e3
    frame["error"] = pred_s / rows.measured_s - 1.0
    return StepValidation(frame, error_report(rows.frame, pred_s, rows.measured_s))


@validate_app.command("cache")
@handles_errors
def validate_cache_cmd(
    trace: Path = typer.Option(
        ..., help="Trace with prefix identity (mooncake, jsonl, csv, sharegpt)."
    ),
    trace_format: str = typer.Option("mooncake", help="mooncake, azure, jsonl, csv or sharegpt."),
    limit: int = typer.Option(None, help="Only the first N requests."),
    block_tokens: int = typer.Option(
        None, help="Tokens per prefix block of a jsonl/csv/sharegpt trace."
    ),
    l1_tokens: int = typer.Option(..., help="L1 capacity in tokens."),
    l2_tokens: int = typer.Option(0, help="L2 capacity in tokens."),
    l3_tokens: int = typer.Option(0, help="L3 capacity in tokens."),
    page_size: int = typer.Option(1, help="Page size in tokens."),
    eviction: str = typer.Option("lru", help="lru or lfu."),
    write_policy: str = typer.Option("write_through", help="write_through or write_back."),
    bytes_per_token: float = typer.Option(131072.0, help="KV bytes per token (for bytes moved)."),
    skip_bad_lines: bool = typer.Option(False),
    events: Path = typer.Option(
        None,
        help="A vLLM or SGLang KV-event log (JSON lines, one event batch per line) to set "
        "beside the replay: stored/removed blocks and hits per tier over time.",
    ),
    request_hashes: str = typer.Option(
        "block_ids", help="Events: how the trace's blocks are named in the log: block_ids or chain."
    ),
    log_start_s: float = typer.Option(None, help="Events: the log's time of the first arrival."),
    bucket_s: float = typer.Option(None, help="Events: seconds per time bucket [automatic]."),
    dp_rank: int = typer.Option(None, help="Events: only this data-parallel rank's batches."),
    reuse_reports: bool = typer.Option(
        False, help="Events: a BlockStored of a resident block counts as a reuse, not a store."
    ),
    buckets_csv: Path = typer.Option(None, help="Events: write the per-bucket comparison CSV."),
    fmt: Format = typer.Option(Format.table, "--format"),
):
    """Replay a trace through the KV cache manager alone: hit tokens per tier, prefetch volume
    and evictions for given tier capacities (no timing); with ``--events``, beside a real
    engine's KV-cache event log of the same trace."""
    from hisim_jax.serving.kvcache import KVCacheConfig
    from hisim_jax.serving.workload import load_trace
    from hisim_jax.validate.cache import replay_cache

    _check_options(
        limit=(limit, 1, True, None), block_tokens=(block_tokens, 1, True, None),
        l1_tokens=(l1_tokens, 1, True, None), l2_tokens=(l2_tokens, 0, True, None),
        l3_tokens=(l3_tokens, 0, True, None), page_size=(page_size, 1, True, None),
        bytes_per_token=(bytes_per_token, 0, False, 1e12),
    )  # fmt: skip
    extra = {"block_tokens": block_tokens} if block_tokens is not None else {}
    work = load_trace(trace, trace_format, skip_bad_lines=skip_bad_lines, limit=limit, **extra)
    try:
        cfg = KVCacheConfig(
            l1_tokens=l1_tokens, bytes_per_token=bytes_per_token, block_tokens=work.block_tokens,
            page_size=page_size, l2_tokens=l2_tokens, l3_tokens=l3_tokens, eviction=eviction,
            write_policy=write_policy,
        )  # fmt: skip
    except ValueError as e:  # an eviction or write policy it does not know
        raise ValueError(f"options: {e}") from None
    if events is not None:
        from hisim_jax.validate.kv_events import compare_kv_events

        if buckets_csv is not None:
            files.check_output_file(buckets_csv)  # before the replay
        with _progress() as prog:
            prog.add_task("replaying KV events", total=None)
            cmp = compare_kv_events(
                events, work.requests, cfg, bucket_s=bucket_s, dp_rank=dp_rank,
                request_hashes=request_hashes, reuse_reports=reuse_reports,
                log_start_s=log_start_s,
            )  # fmt: skip
        n = len(work.requests)
        _print_report(f"KV events {events} vs hisim's KV cache ({n} requests)", cmp.report, fmt)
        if buckets_csv is not None:
            files.write_atomic(buckets_csv, lambda p: cmp.buckets.to_csv(p, index=False))
        return
    report = replay_cache(work.requests, cfg)
    _print_report(f"KV cache replay of {trace} ({len(work.requests)} requests)", report, fmt)


def _print_report(title: str, report: dict, fmt: Format) -> None:
    """A flat or one-level-nested report as JSON, CSV (name,value) or a table."""
    if fmt == Format.json:
        _echo_json(report)
        return
    flat = [[k, v] for k, v in report.items() if not isinstance(v, dict)] + [
        [f"{k} {kk}", vv] for k, v in report.items() if isinstance(v, dict) for kk, vv in v.items()
    ]
    if fmt == Format.csv:
        typer.echo("name,value")
        for k, v in flat:
            typer.echo(f"{k},{v}")
    else:
        _table(title, ["name", "value"], flat)


@validate_app.command("e2e")
@handles_errors
def validate_e2e_cmd(
    run_path: Path = typer.Argument(
        ...,
        metavar="RUN",
        help="A benchmark run: an inference-perf results folder, a `vllm bench serve "
        "--save-result --save-detailed` JSON, an SGLang bench_serving JSONL, or a per-request CSV.",
    ),
    input_format: str = typer.Option(
        None, "--input-format", help="inference-perf, vllm-bench, sglang-bench or csv [detected]."
    ),
    config: Path = typer.Option(None, help="YAML of simulate options for the deployment."),
    model: str = typer.Option(None, help="Model name or config.json [from the run]."),
    hardware: str = typer.Option(None, help="GPU name or YAML [from the run]."),
    tp: int = typer.Option(None, help="Tensor-parallel degree [from the run]."),
    engine: str = typer.Option(None, help="sglang or vllm [from the run]."),
    calibration: Path = typer.Option(None, help="Calibration JSON [the GPU and engine's]."),
    estimator: str = typer.Option(None, help=ESTIMATOR_HELP + " [roofline]"),
    estimator_table: Path = typer.Option(None, help=ESTIMATOR_TABLE_HELP),
    extrapolate: bool = typer.Option(None, help=EXTRAPOLATE_HELP),
    max_num_batched_tokens: int = typer.Option(None, help="vLLM token budget [from the run]."),
    max_num_seqs: int = typer.Option(None, help="vLLM running requests cap [from the run]."),
    kv_cache_tokens: int = typer.Option(None, help="KV capacity in tokens [engine accounting]."),
    seed: int = typer.Option(None, help="Seed of rebuilt arrivals and prompt order [0]."),
    out: Path = typer.Option(
        Path("hisim-e2e"), help="Folder for e2e.csv, summary.json and CDF plots."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="How to print the comparison."),
):
    """Replay a real benchmark run through the simulator: predicted vs measured mean, p50, p90
    and p99 TTFT, TPOT, ITL and E2E, throughput, and the queueing regime of each load stage."""
    from hisim_jax.simulation import SimulationOptions
    from hisim_jax.validate.e2e import options_for, read_run, replay, report_csv, write_report

    files.check_output_dir(out)  # before the run: a folder it cannot write fails now
    given = {
        "model": model, "hardware": hardware, "tp": tp, "engine": engine,
        "calibration": str(calibration) if calibration else None,
        "estimator": estimator, "extrapolate": extrapolate,
        "estimator_table": str(estimator_table) if estimator_table else None,
        "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
        "kv_cache_tokens": kv_cache_tokens, "seed": seed,
    }  # fmt: skip
    bench = read_run(run_path, input_format, seed=seed or 0)
    base = SimulationOptions.resolve(config, given) if config else None
    explicit = [k for k, v in given.items() if v is not None]
    if base is None:
        base = SimulationOptions.checked({k: v for k, v in given.items() if v is not None})
    options = options_for(bench, base, explicit=explicit)
    report = replay(bench, options, progress=lambda msg: typer.echo(msg, err=True))
    written = write_report(report, out)
    if fmt == Format.json:
        _echo_json(report.summary())
    elif fmt == Format.csv:
        typer.echo(report_csv(report), nl=False)
    else:
        keep = (
            "ttft_mean_ms",
            "ttft_p99_ms",
            "tpot_mean_ms",
            "e2e_mean_ms",
            "request_throughput_per_s",
        )
        rows = [
            [r["stage"], r["rate"], r["metric"], _num(r["measured"]), _num(r["predicted"]),
             "" if r["error"] is None else f"{r['error']:+.1%}"]
            for r in report.rows() if r["metric"] in keep
        ]  # fmt: skip
        _table(f"{run_path} vs simulation", ["stage", "rate", "metric", "measured",
               "predicted", "error"], rows)  # fmt: skip
        for c in report.stages:
            typer.echo(
                f"stage {c.stage.index}: measured {c.measured_regime}, "
                f"predicted {c.predicted_regime}"
            )
    typer.echo("wrote " + ", ".join(str(p) for p in written), err=True)


def _num(v) -> str:
    return "" if v is None else f"{v:.4g}"


@validate_app.command("scheduler")
@handles_errors
def validate_scheduler_cmd(
    log: Path = typer.Option(
        ...,
        help="Per-step log in steps.csv columns (start_s, kind, request_ids), or an SGLang "
        "server log (its 'Prefill batch' / 'Decode batch' lines).",
    ),
    config: Path = typer.Option(None, help="YAML of simulate options describing the same run."),
    trace: Path = typer.Option(None, help="The workload's trace [built-in chat]."),
    trace_format: str = typer.Option(None, help="mooncake, azure, jsonl, csv or sharegpt."),
    limit: int = typer.Option(None),
    model: str = typer.Option(None),
    hardware: str = typer.Option(None),
    schedule_policy: str = typer.Option(None),
    sessions: str = typer.Option(None, help="open or closed (see simulate)."),
    decode_log_interval: int = typer.Option(
        40, help="SGLang log: decode steps per 'Decode batch' line (its --decode-log-interval)."
    ),
    rank: str = typer.Option(None, help="SGLang log: the rank to compare (e.g. 'DP1 TP4')."),
    offset_s: float = typer.Option(None, help="SGLang log: simulated time of its first line."),
    keep_warmup: bool = typer.Option(False, help="SGLang log: keep the warm-up request."),
    records: Path = typer.Option(None, help="SGLang log: write the per-record comparison CSV."),
    fmt: Format = typer.Option(Format.table, "--format"),
):
    """Replay a scheduler log's workload through the simulator and report the differences:
    queue residency and ordering for a steps.csv log; batch sizes, token counts, queue
    lengths and running requests per step for an SGLang server log."""
    from hisim_jax.simulation import SimulationOptions, build_workload, run
    from hisim_jax.validate.scheduler import check_request_ids, compare_schedules, read_step_log
    from hisim_jax.validate.sglang_log import looks_like_sglang_log, replay_sglang_log

    given = {
        "trace": str(trace) if trace else None, "trace_format": trace_format, "limit": limit,
        "model": model, "hardware": hardware, "schedule_policy": schedule_policy,
        "sessions": sessions,
    }  # fmt: skip
    opts = SimulationOptions.resolve(config, given)
    if looks_like_sglang_log(log):
        if records is not None:
            files.check_output_file(records)  # before the run: a path it cannot write fails now
        rep = replay_sglang_log(
            log, opts, decode_log_interval=decode_log_interval, rank=rank, offset_s=offset_s,
            skip_warmup=not keep_warmup,
        )  # fmt: skip
        summary = rep.summary
        if fmt == Format.table:  # the means; --format json has every statistic
            summary = {
                k: ({s: v[s] for s in ("log_mean", "sim_mean", "abs_diff_mean") if s in v}
                    if isinstance(v, dict) else v)
                for k, v in summary.items()
            }  # fmt: skip
        _print_report(f"SGLang log {log} vs simulation", summary, fmt)
        if records is not None:
            files.write_atomic(records, lambda p: Path(p).write_text(rep.to_csv()))
        return
    logged = read_step_log(log)
    work = build_workload(opts)
    check_request_ids(logged, len(work.requests), str(log))
    result = run(opts, workload=work)
    arrivals = {r.request_id: r.arrival_s for r in result.workload.requests}
    report = compare_schedules(logged, result.steps, arrivals)
    _print_report(f"scheduler log {log} vs simulation", report, fmt)


@app.command()
@handles_errors
def simulate(
    config: Path = typer.Option(None, help="YAML file of options (keys as these flags)."),
    model: str = typer.Option(None, help="Model name or config.json [llama-3.1-8b]."),
    hardware: str = typer.Option(None, help="GPU name or YAML [h100-sxm]."),
    tp: int = typer.Option(None, help="Tensor-parallel degree [1]."),
    ep: int = typer.Option(
        None, help="Expert-parallel degree: ranks the routed experts are spread over [1]."
    ),
    dp_attention: int = typer.Option(
        None,
        help="Attention data-parallel degree (SGLang --enable-dp-attention --dp N): ranks "
        "that each attend their own requests; divides --tp [1].",
    ),
    engine: str = typer.Option(
        None, help="Engine whose scheduler and defaults are simulated: sglang or vllm [sglang]."
    ),
    frontend: str = typer.Option(
        None, help="on: latencies as a client sees them (HTTP, tokenization); off: engine only."
    ),
    weight_dtype: str = typer.Option(
        None,
        help="Every linear layer in bf16, fp8, fp4, mxfp4 or int4 [the checkpoint's formats: "
        "its quantization_config].",
    ),
    kv_dtype: str = typer.Option(None, help="bf16 or fp8 [bf16]."),
    calibration: Path = typer.Option(
        None, help="Calibration JSON [the GPU's production-kernel fit, <gpu>.<engine>.json]."
    ),
    estimator: str = typer.Option(None, help=ESTIMATOR_HELP + " [roofline]"),
    estimator_table: Path = typer.Option(None, help=ESTIMATOR_TABLE_HELP),
    extrapolate: bool = typer.Option(None, help=EXTRAPOLATE_HELP),
    trace: Path = typer.Option(None, help="Trace file [built-in multi-turn chat workload]."),
    trace_format: str = typer.Option(
        None, help="mooncake, azure, jsonl, csv or sharegpt [mooncake]."
    ),
    workload: str = typer.Option(
        None, help="Built-in workload without --trace: chat or agent (coding agents) [chat]."
    ),
    sessions: str = typer.Option(
        None,
        help="closed: a session's next turn is sent its think time after the previous reply; "
        "open: at the recorded times [closed for built-in workloads, open for traces].",
    ),
    max_concurrency: int = typer.Option(
        None, help="Client requests in flight at most; others wait (bench_serving's) [no limit]."
    ),
    think_time: str = typer.Option(
        None,
        help="Built-in workloads' think/tool time: fixed:S, exponential:MEAN, "
        "lognormal:MEAN[:SIGMA] or empirical:FILE [chat exponential:10; agent TraceLab's].",
    ),
    limit: int = typer.Option(None, help="Only the first N requests."),
    rate_scale: float = typer.Option(None, help="Multiply the arrival rate [1.0]."),
    start_s: float = typer.Option(None, help="Window start, seconds after the first arrival."),
    end_s: float = typer.Option(None, help="Window end, seconds after the first arrival."),
    skip_bad_lines: bool = typer.Option(None, help="Skip and count malformed trace lines."),
    block_tokens: int = typer.Option(
        None, help="Tokens per prefix block of a jsonl/csv/sharegpt trace [512; sharegpt 64]."
    ),
    seed: int = typer.Option(
        None, help="Seed of the synthetic workload, ShareGPT arrivals, random routing [0]."
    ),
    l1_fraction: float = typer.Option(
        None,
        "--l1-fraction",
        "--mem-fraction-static",
        help="SGLang: HBM share for weights + KV (its --mem-fraction-static) [0.88].",
    ),
    gpu_memory_utilization: float = typer.Option(
        None, help="vLLM: HBM share for weights, activations + KV [0.9]."
    ),
    kv_cache_tokens: int = typer.Option(
        None, help="KV capacity in tokens per replica, overriding the memory accounting."
    ),
    l2_gb: float = typer.Option(None, help="Host-DRAM KV tier per GPU, GB [0: off]."),
    l3_gb: float = typer.Option(None, help="SSD/remote KV tier per GPU, GB [0: off]."),
    l2_gb_s: float = typer.Option(
        None, help="L1<->L2 link per GPU, GB/s [PCIe of the spec x 0.86]."
    ),
    l3_gb_s: float = typer.Option(None, help="L2<->L3 link per GPU, GB/s [SSD of the spec]."),
    page_size: int = typer.Option(None, help="KV page size in tokens [SGLang 1, vLLM 16]."),
    eviction: str = typer.Option(None, help="lru or lfu [lru]."),
    write_policy: str = typer.Option(None, help="write_through or write_back [write_through]."),
    chunked_prefill_size: int = typer.Option(None, help="SGLang: prompt tokens per chunk [8192]."),
    max_prefill_tokens: int = typer.Option(
        None, help="SGLang: prompt tokens per prefill batch [16384]."
    ),
    max_running_requests: int = typer.Option(None, help="SGLang: running requests cap [1024]."),
    max_num_batched_tokens: int = typer.Option(
        None, help="vLLM: tokens per step, decodes included [8192; 2048 below 70 GB or A100]."
    ),
    max_num_seqs: int = typer.Option(
        None, help="vLLM: running requests cap [1024; 256 below 70 GB or A100]."
    ),
    max_model_len: int = typer.Option(
        None, help="Longest prompt + output served (vLLM --max-model-len) [the model's]."
    ),
    schedule_policy: str = typer.Option(None, help="fcfs or lpm [fcfs]."),
    preemption: str = typer.Option(None, help="recompute or swap [recompute]."),
    prefetch_policy: str = typer.Option(None, help="best_effort, wait_complete or timeout."),
    cuda_graph_max_bs: int = typer.Option(
        None, help="Largest captured decode batch [SGLang 160; vLLM min(2 x seqs, 512)]."
    ),
    step_overhead_ms: float = typer.Option(None, help="CPU time per step not overlapped [0]."),
    slo_ttft_ms: float = typer.Option(None, help="TTFT SLO for goodput."),
    slo_tpot_ms: float = typer.Option(None, help="TPOT SLO for goodput."),
    gpu_price_usd_per_hour: float = typer.Option(None, help="Override the spec's GPU price."),
    cpu_price_usd_per_hour: float = typer.Option(
        None, help="CPU-hour price for the cost ratio [0.05]."
    ),
    replicas: int = typer.Option(None, help="Replicas behind the router [1]."),
    router: str = typer.Option(
        None,
        help="random, round_robin, least_loaded, power_of_two, cache_aware or bucket "
        "[cache_aware].",
    ),
    fleet: str = typer.Option(
        None, help="Mixed replicas, HARDWARE[:TP]xCOUNT,... (e.g. h100-sxm:1x6,h200-sxm:2x2)."
    ),
    bucket_bounds: str = typer.Option(None, help="Input-length bounds of --router bucket."),
    pd: str = typer.Option(None, help="Disaggregate: PREFILL:DECODE replicas (e.g. 2:6)."),
    kv_link_gb_s: float = typer.Option(None, help="Prefill->decode KV link per GPU, GB/s [45]."),
    kv_link_latency_us: float = typer.Option(None, help="KV link latency, µs [20]."),
    l3_shared_gb: float = typer.Option(
        None, help="KV store shared by all replicas, GB (replaces --l3-gb) [0: off]."
    ),
    l3_shared_gb_s: float = typer.Option(None, help="Shared store bandwidth, GB/s [25]."),
    speculative_num_steps: int = typer.Option(
        None, help="Speculative decoding: draft tokens per verify step (SGLang's) [0: off]."
    ),
    speculative_accept_rate: str = typer.Option(
        None,
        help="Chance a draft token is accepted given the ones before it were: one rate, or "
        "one per draft step (0.8,0.6,0.4) [0.7].",
    ),
    speculative_draft_layers: int = typer.Option(
        None, help="Decoder layers of the draft model [the model's MTP layers, else 1]."
    ),
    out: Path = typer.Option(
        None, help="Folder for requests.csv, steps.csv, summary.json [hisim-out]."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="How to print the summary."),
):
    """Simulate a deployment serving a workload (one replica, or many behind a router,
    optionally prefill/decode disaggregated): TTFT, TPOT, ITL, throughput, KV-cache hits."""
    from hisim_jax.simulation import SimulationOptions, read_config, run, write_outputs

    given = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in locals().items()
        if k
        not in ("config", "out", "fmt", "run", "write_outputs", "SimulationOptions", "read_config")
    }
    if config is None:
        opts = SimulationOptions.resolve(None, given)
        out = out or Path("hisim-out")
    else:  # read once: the file may also name the output folder
        values = read_config(config)
        opts = SimulationOptions.from_config(values, given, where=str(config))
        out = out or Path(values.get("out") or "hisim-out")
    files.check_output_dir(out)  # before the run: a folder it cannot write fails now
    with _progress() as prog:
        task = prog.add_task("simulating", total=None)

        def advance(delta, total):
            prog.update(task, total=total, advance=delta)

        result = run(opts, progress=advance)
    written = write_outputs(result, out)
    s = result.summary
    if fmt == Format.json:
        _echo_json(s)
        return
    if fmt == Format.csv:
        metrics = {k: v for k, v in s.items() if k not in ("options", "replica", "workload")}
        _print_report("", metrics, fmt)
        return
    rows = [
        ["requests completed", f"{s['requests_completed']} / {s['requests_total']}"],
        ["simulated / wall s", f"{s['simulated_s']:.1f} / {s['wall_s']:.1f}"],
    ]
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[name]
        if d["mean"] is not None:
            rows.append(
                [
                    name.replace("_s", " ms") + " mean/p50/p99",
                    f"{d['mean'] * 1e3:.1f} / {d['p50'] * 1e3:.1f} / {d['p99'] * 1e3:.1f}",
                ]
            )
    rows += [
        [
            "throughput in / out tok/s",
            f"{s['throughput_input_tok_s']:.0f} / {s['throughput_output_tok_s']:.0f}",
        ],
        ["cache hit rate", f"{s['cache']['hit_rate']:.1%}"],
        ["preemptions", str(s["preemptions"])],
    ]
    if s["spec_accept_length"] is not None:
        rows.append(
            [
                f"tokens per verify step (k={s['speculative_num_steps']})",
                f"{s['spec_accept_length']:.2f}",
            ]
        )
    if s["requests_rejected"]:
        rows.append(["rejected", "; ".join(f"{n} {why}" for why, n in s["rejections"].items())])
    if s["skipped_lines"]:
        rows.append(["skipped trace lines", str(s["skipped_lines"])])
    if "goodput_req_s" in s:
        rows.append(
            [
                "goodput req/s (SLO attainment)",
                f"{s['goodput_req_s']:.2f} ({s['slo_attainment']:.1%})",
            ]
        )
    c = s["cluster"]
    title = f"{s['replica']['model']} on {s['replica']['hardware']}"
    if c["replicas"] > 1:
        shape = (
            f"{c['prefill_replicas']} prefill + {c['decode_replicas']} decode"
            if c["decode_replicas"]
            else f"{c['replicas']} replicas, {opts.router}"
        )
        title = f"{s['replica']['model']}: {shape}, {c['gpus']} GPUs"
        rows += [
            [
                "hit rate min / max per replica",
                f"{c['hit_rate_min']:.1%} / {c['hit_rate_max']:.1%}",
            ],
            ["busy s max / mean", f"{c['load_imbalance_busy']:.2f}"],
        ]
    _table(title, ["name", "value"], rows)
    typer.echo(f"wrote {', '.join(str(f) for f in written)}", err=True)


def _axis_list(text: str):
    """A comma list from a flag as an axis: numbers where they read as numbers."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                out.append(part)
    return out


def _slo_flag(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--slo: expected NAME=MS pairs (ttft_p99_ms=2000,...), got {part!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--slo {key.strip()}: expected a number, got {value!r}") from None
    return out


@app.command()
@handles_errors
def search(
    space: Path = typer.Option(None, help="Space file (YAML): model, workload, axes, slo, ..."),
    out: Path = typer.Option(Path("hisim-search"), help="Output folder."),
    model: str = typer.Option(None, help="Model (fixed)."),
    trace: Path = typer.Option(None, help="Trace file [built-in chat]."),
    trace_format: str = typer.Option(None, help="Trace format [mooncake]."),
    limit: int = typer.Option(None, help="Only the first N requests of the trace."),
    gpus: int = typer.Option(None, help="GPU budget: replicas x tp <= GPUS."),
    hardware: str = typer.Option(None, help="Axis: GPUs, comma-separated."),
    tp: str = typer.Option(None, help="Axis: tensor-parallel degrees (1,2,4)."),
    replicas: str = typer.Option(None, help="Axis: replica counts [every count in the budget]."),
    engine: str = typer.Option(None, help="Axis: sglang,vllm."),
    router: str = typer.Option(None, help="Axis: router policies."),
    token_budget: str = typer.Option(
        None,
        help="Axis: chunk / step token budget (SGLang chunked_prefill_size, vLLM "
        "max_num_batched_tokens).",
    ),  # fmt: skip
    max_running: str = typer.Option(None, help="Axis: running-request caps."),
    l2_gb: str = typer.Option(None, help="Axis: host-DRAM KV tier per GPU, GB."),
    rate_scale: str = typer.Option(None, help="Axis: arrival-rate multipliers."),
    slo: str = typer.Option(None, help="SLOs, e.g. ttft_p99_ms=2000,tpot_p99_ms=50."),
    strategy: str = typer.Option("halving", help="halving (screen + simulate), grid, random."),
    max_simulations: int = typer.Option(64, help="Full-workload simulations at most."),
    jobs: int = typer.Option(0, help="Worker processes [0: every core]."),
    ray: str = typer.Option(None, "--ray", help="Run simulations on this Ray cluster (auto)."),
    cache_dir: Path = typer.Option(None, help="Simulation cache [$HISIM_CACHE_DIR/search]."),
    no_cache: bool = typer.Option(False, help="Neither read nor write the simulation cache."),
    seed: int = typer.Option(0, help="Seed of sampling and the random strategy."),
    margin: float = typer.Option(
        1.5, help="Simulate points this factor better than screened could reach a front."
    ),
    cpu_price: float = typer.Option(
        0.05, help="USD per CPU core-hour, for the evaluation cost ratio."
    ),
):
    """Search deployments for the cheapest that meet the SLOs: Pareto fronts of throughput per
    GPU vs per user and of cost vs p99 TTFT, screened analytically, confirmed by simulation."""
    from hisim_jax.search.run import SearchOptions, run_search, write_outputs
    from hisim_jax.search.space import read_space_doc, space_from_dict

    where = str(space) if space else "options"
    doc = read_space_doc(space) if space else {}
    for key, value in (("model", model), ("trace", trace), ("trace_format", trace_format),
                       ("limit", limit), ("gpus", gpus)):  # fmt: skip
        if value is not None:
            doc[key] = str(value) if isinstance(value, Path) else value
    axes = doc.get("axes") or {}
    if isinstance(axes, dict):  # else space_from_dict names the bad value
        axes = doc["axes"] = dict(axes)
        for key, value in (("hardware", hardware), ("tp", tp), ("replicas", replicas),
                           ("engine", engine), ("router", router), ("token_budget", token_budget),
                           ("max_running", max_running), ("l2_gb", l2_gb),
                           ("rate_scale", rate_scale)):  # fmt: skip
            if value is not None:
                doc.pop(key, None)
                axes[key] = _axis_list(value)
    if slo is not None:
        doc["slo"] = _slo_flag(slo)
    sp = space_from_dict(doc, where)
    opts = SearchOptions(
        strategy=strategy, max_simulations=max_simulations, jobs=jobs, ray_address=ray,
        cache_dir="" if no_cache else (str(cache_dir) if cache_dir else None), seed=seed,
        margin=margin, cpu_price_usd_per_hour=cpu_price,
    )  # fmt: skip
    files.check_output_dir(out)
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty(),
    ) as prog:  # fmt: skip
        tasks: dict = {}

        def progress(stage, done, total):
            name = "screening" if stage == "screen" else "simulating"
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=total, rate="")
            t = tasks[name]
            prog.update(t, completed=done, total=total)
            task = prog.tasks[t]
            if task.elapsed:
                prog.update(t, rate=f"{done / task.elapsed:.1f} points/s")

        result = run_search(sp, opts, progress=progress)
    written = write_outputs(result, out)
    r = result.report
    typer.echo(
        f"{r['points']} points ({r['infeasible']} infeasible), {r['screened']} screened, "
        f"{r['simulations']} simulated ({r['simulations_cached']} cached) in {r['wall_s']:.1f} s; "
        f"{r['meets_slo']} meet the SLOs on the whole workload"
    )
    rows = []
    for obj, b in result.best.items():
        rows.append([obj, b["id"] if b else "-", b["value"] if b else "none meets the SLOs"])
    _table("best configuration per objective", ["objective", "id", "value"], rows)
    typer.echo(f"wrote {', '.join(str(f) for f in written)}", err=True)


@app.command("list")
def list_cmd(
    fmt: Format = typer.Option(Format.table, "--format", help="How to print the lists."),
):
    """Models and GPUs known by name: each model's family, parameters, active parameters and
    cache bytes (bf16, TP 1: per token that grows with context, the most a request's
    windowed layers hold, the recurrent state per request); each GPU's peaks and price."""
    from hisim_jax.specs import available_hardware, available_models, load_hardware, load_model

    models = {}
    for name in available_models():
        m = load_model(name)
        models[name] = {
            "family": m.family,
            "params": m.weight_params(),
            "active_params": m.active_params(),
            "kv_bytes_per_token": m.kv_bytes_per_token(),
            "windowed_kv_bytes": m.windowed_kv_bytes(),
            "state_bytes_per_request": m.state_bytes_per_request(),
            "weight_dtype": m.weight_dtype
            if m.weight_dtype == m.expert_weight_dtype
            else f"{m.weight_dtype}/{m.expert_weight_dtype}",
            "layers": "+".join(f"{g.count}x{g.attention}/{g.mlp}" for g in m.layer_groups),
        }
    gpus = {}
    for name in available_hardware():
        h = load_hardware(name)
        gpus[name] = {
            "bf16_tflops": h.bf16_flops_per_s / 1e12,
            "hbm_gb": h.hbm_bytes / 1e9,
            "hbm_tb_s": h.hbm_bytes_per_s / 1e12,
            "price_usd_per_hour": h.price_usd_per_hour,
            # measured sustained ceilings over the peaks (None: datasheet only), the ratios
            # by which efficiencies fitted on another GPU move here
            **{f"sustained_{k}_fraction": v for k, v in h.sustained_fractions().items()},
        }
    if fmt == Format.json:
        typer.echo(files.strict_json({"models": models, "hardware": gpus}, indent=2))
        return
    if fmt == Format.csv:
        keys = list(next(iter(models.values())))
        typer.echo(",".join(["model", *keys]))
        for name, row in models.items():
            typer.echo(",".join([name, *(str(row[k]) for k in keys)]))
        return
    _table(
        "models",
        ["model", "family", "params B", "active B", "KV B/tok", "window MB", "state MB",
         "weights"],
        [
            [name, r["family"], round(r["params"] / 1e9, 1), round(r["active_params"] / 1e9, 1),
             int(r["kv_bytes_per_token"]), round(r["windowed_kv_bytes"] / 1e6),
             round(r["state_bytes_per_request"] / 1e6), r["weight_dtype"]]
            for name, r in models.items()
        ],
        width=120,
    )  # fmt: skip

    def frac(v):
        return "—" if v is None else f"{v:.2f}"

    _table(
        "hardware",
        ["name", "bf16 TFLOPS", "HBM GB", "HBM TB/s", "USD/h", "sustained GEMM / HBM"],
        [
            [name, round(r["bf16_tflops"]), round(r["hbm_gb"]), round(r["hbm_tb_s"], 2),
             r["price_usd_per_hour"],
             f"{frac(r['sustained_bf16_gemm_flops_per_s_fraction'])} / "
             f"{frac(r['sustained_hbm_bytes_per_s_fraction'])}"]
            for name, r in gpus.items()
        ],
        width=110,
    )  # fmt: skip


# serial commands: one core is faster for their many tiny estimator calls (see cores.py)
ONE_CORE_COMMANDS = frozenset({"simulate"})


def main():  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] in ONE_CORE_COMMANDS:
        from hisim_jax.cores import pin_to_one_core

        pin_to_one_core()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
