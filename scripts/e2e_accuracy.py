"""End-to-end accuracy on real benchmark runs: replay every inference-perf run folder of a data
set (by default the vLLM H100 runs in ../shared/e2e/vllm-h100/raw) and compare, per model and
load stage, the measured and predicted TTFT mean, TPOT (measured: tpot_derived = (E2E mean -
TTFT mean) / (output_len - 1)), E2E mean and request throughput, with signed errors
(predicted / measured - 1) and whether the queueing regime matches.

    python scripts/e2e_accuracy.py                       # every run, vLLM engine, a table
    python scripts/e2e_accuracy.py --runs 7b-tp1 --json  # runs whose name contains 7b-tp1
    python scripts/e2e_accuracy.py --limit-runs 2 --out runs/e2e   # + e2e_accuracy.csv/.json

Progress lines go to stderr, one per run.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hisim_jax import files  # noqa: E402
from hisim_jax.simulation import SimulationOptions  # noqa: E402
from hisim_jax.validate import e2e  # noqa: E402

DEFAULT_RAW = ROOT.parent / "shared" / "e2e" / "vllm-h100" / "raw"
COLUMNS = (
    "experiment", "model", "tp", "stage", "rate",
    "ttft_mean_ms_measured", "ttft_mean_ms_predicted", "ttft_mean_error",
    "tpot_mean_ms_measured", "tpot_mean_ms_predicted", "tpot_mean_error",
    "e2e_mean_ms_measured", "e2e_mean_ms_predicted", "e2e_mean_error",
    "request_throughput_measured", "request_throughput_predicted", "request_throughput_error",
    "requests_failed_measured", "requests_failed_predicted",
    "regime_measured", "regime_predicted", "regime_match",
)  # fmt: skip


def run_folders(raw: Path, runs: list[str] | None, limit: int | None) -> list[Path]:
    found = sorted(
        p for p in raw.iterdir() if p.is_dir() and e2e._ip_stage_files(p)
    )  # every folder with lifecycle metrics (model_configs/ has none)
    if runs:
        found = [p for p in found if any(r in p.name for r in runs)]
    return found[:limit] if limit else found


def rows_of(report: e2e.E2EReport, name: str) -> list[dict]:
    by = {(r["stage"], r["metric"]): r for r in report.rows()}
    out = []
    for c in report.stages:
        k = c.stage.index

        def trio(metric, k=k):
            r = by[k, metric]
            return r["measured"], r["predicted"], r["error"]

        row = {
            "experiment": name,
            "model": report.options.model,
            "tp": report.options.tp,
            "stage": k,
            "rate": c.stage.rate,
        }
        for col, metric in (
            ("ttft_mean_ms", "ttft_mean_ms"),
            ("tpot_mean_ms", "tpot_mean_ms"),
            ("e2e_mean_ms", "e2e_mean_ms"),
            ("request_throughput", "request_throughput_per_s"),
        ):
            m, p, err = trio(metric)
            row[f"{col}_measured"], row[f"{col}_predicted"] = m, p
            row[col.replace("_ms", "") + "_error"] = err
        row["requests_failed_measured"] = c.measured.requests_failed
        row["requests_failed_predicted"] = c.predicted.requests_failed
        row["regime_measured"], row["regime_predicted"] = c.measured_regime, c.predicted_regime
        row["regime_match"] = c.regime_match
        out.append(row)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    head = ("model", "tp", "stage", "rate", "TTFT ms m/p (err)", "TPOT ms m/p (err)",
            "E2E ms m/p (err)", "req/s m/p (err)", "regime m/p")  # fmt: skip
    lines = [head]
    for r in rows:

        def cell(col, err, r=r):
            m, p, e = r[f"{col}_measured"], r[f"{col}_predicted"], r[err]
            es = "-" if e is None else f"{e:+.0%}"
            return f"{_fmt(m)}/{_fmt(p)} ({es})"

        lines.append(
            (
                r["model"], str(r["tp"]), str(r["stage"]), _fmt(r["rate"]),
                cell("ttft_mean_ms", "ttft_mean_error"), cell("tpot_mean_ms", "tpot_mean_error"),
                cell("e2e_mean_ms", "e2e_mean_error"),
                cell("request_throughput", "request_throughput_error"),
                f"{r['regime_measured']}/{r['regime_predicted']}"
                + ("" if r["regime_match"] else " !"),
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def overall(rows: list[dict]) -> dict:
    def mape(key):
        v = [abs(r[key]) for r in rows if r[key] is not None]
        return sum(v) / len(v) if v else None

    def median(key):
        v = sorted(abs(r[key]) for r in rows if r[key] is not None)
        return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 if v else None

    ok = [r for r in rows if r["requests_failed_measured"] == 0]
    return {
        "median_abs_error": {k: median(f"{k}_error") for k in
                             ("ttft_mean", "tpot_mean", "e2e_mean", "request_throughput")},
        "points": len(rows),
        "regime_match": sum(r["regime_match"] for r in rows),
        "mean_abs_error": {k: mape(f"{k}_error") for k in
                           ("ttft_mean", "tpot_mean", "e2e_mean", "request_throughput")},
        "mean_abs_error_no_failures": {
            k: (sum(abs(r[f"{k}_error"]) for r in ok if r[f"{k}_error"] is not None) / len(ok))
            if ok else None
            for k in ("ttft_mean", "tpot_mean", "e2e_mean", "request_throughput")
        },
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="folder of run folders")
    ap.add_argument("--engine", default="vllm", choices=("vllm", "sglang"))
    ap.add_argument("--runs", default=None, help="comma-separated substrings of run names")
    ap.add_argument("--limit-runs", type=int, default=None, help="the first N runs only")
    ap.add_argument("--hardware", default=None, help="override the run's GPU")
    ap.add_argument("--calibration", default=None, help="estimator calibration JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arrivals", default="inference-perf", choices=("inference-perf", "uniform"))
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--out", type=Path, default=None, help="write e2e_accuracy.csv/.json here")
    ap.add_argument("--reports", action="store_true", help="also each run's report under --out")
    a = ap.parse_args(argv)

    have = {f.name for f in fields(SimulationOptions)}
    given = {"seed": a.seed}
    if "engine" in have:
        given["engine"] = a.engine
    elif a.engine != "sglang":
        print("note: SimulationOptions has no 'engine' yet; simulating SGLang", file=sys.stderr)
    if a.hardware:
        given["hardware"] = a.hardware
    if a.calibration:
        given["calibration"] = a.calibration
    base = SimulationOptions.checked(given)
    explicit = tuple(k for k in given if k != "seed")
    if a.out is not None:
        files.check_output_dir(a.out)

    folders = run_folders(a.raw, a.runs.split(",") if a.runs else None, a.limit_runs)
    if not folders:
        print(f"error: no run folders in {a.raw}", file=sys.stderr)
        return 2
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, folder in enumerate(folders, 1):
        t = time.perf_counter()
        run = e2e.read_run(folder, "inference-perf", seed=a.seed, arrivals=a.arrivals)
        options = e2e.options_for(run, base, explicit=explicit)
        report = e2e.replay(run, options)
        rows += rows_of(report, folder.name)
        if a.reports and a.out is not None:
            e2e.write_report(report, a.out / folder.name)
        print(
            f"[{i}/{len(folders)}] {folder.name}: {len(run.requests)} requests, "
            f"{report.simulations} simulation(s), {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    summary = {
        "raw": str(a.raw),
        "engine": a.engine,
        "arrivals": a.arrivals,
        "seed": a.seed,
        "wall_s": time.perf_counter() - t0,
        "overall": overall(rows),
        "rows": rows,
    }
    if a.json:
        print(files.strict_json(summary, indent=2))
    else:
        print_table(rows)
        o = summary["overall"]
        err = o["mean_abs_error_no_failures"]
        print(
            f"\n{o['points']} points, regime match {o['regime_match']}/{o['points']}; mean |error| "
            "over points without failures: "
            + ", ".join(f"{k} {v:.1%}" for k, v in err.items() if v is not None)
            + "; median |error| over all: "
            + ", ".join(f"{k} {v:.1%}" for k, v in o["median_abs_error"].items() if v is not None)
        )
    if a.out is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        files.write_files_atomic(
            a.out,
            {
                "e2e_accuracy.csv": lambda p: Path(p).write_text(buf.getvalue()),
                "e2e_accuracy.json": lambda p: Path(p).write_text(
                    files.strict_json(summary, indent=2) + "\n"
                ),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
