"""The three step-latency backends (``--estimator roofline|aiconfigurator|table``) on the same
measured steps: MAPE overall, per model and per kind of batch, as a Markdown table.

* roofline: the shipped calibration (fitted on all of these steps: in-sample), and the same
  fit (``calibrate.fit``, with the eager micro tables) redone on half of the steps to predict
  the other half (2-fold: every step predicted once by a fit that never saw it);
* aiconfigurator: aiconfigurator-core's kernel tables of an engine on the GPU (nothing is
  fitted to these steps, so every row is out of sample); needs ``hisim-jax[aic]``;
* table: the regression on measured steps, 2-fold on the same halves (the held-out half
  predicted with ``extrapolate=True``; the count of held-out steps outside the fitted half's
  range is printed), plus its in-sample figure for reference and the spread over more shuffles.

    python scripts/compare_estimators.py [--profiles data/profiles/h100] [--seed 0]
        [--shuffles 20] [--engines sglang,vllm] [--no-roofline-cv] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hisim_jax.estimator import backends as be
from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.batch import parse_batch
from hisim_jax.estimator.roofline import load_calibration
from hisim_jax.specs import SpecError, load_hardware

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("decode_uniform", "decode_mixed", "prefill", "prefill_cached", "prefill_multi", "mixed")


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def table_two_fold(frame, hw, seed: int) -> tuple[np.ndarray, int]:
    """Predictions of each half by a table fitted on the other, and how many held-out steps
    lay outside the fitted half's range."""
    pred = np.zeros(len(frame))
    outside = 0
    for train, test in (halves(len(frame), seed), halves(len(frame), seed)[::-1]):
        tr, te = frame.iloc[train], frame.iloc[test]
        pred[test] = be.predict_rows("table", te, hw, table=tr, extrapolate=True)
        for model in te["model"].unique():
            strict = be.make_estimator("table", model, hw, table=tr)
            for b in te[te["model"] == model]["batch"]:
                try:
                    strict.step_latency_s([parse_batch(str(b))])
                except be.OutOfRangeError:
                    outside += 1
    return pred, outside


def roofline_two_fold(rows, hw, profiles: Path, seed: int, iterations: int) -> np.ndarray:
    gemm = cal.read_gemm(profiles / "gemm.csv") if (profiles / "gemm.csv").is_file() else None
    attn = None
    if (profiles / "attention.csv").is_file():
        import jax

        template = jax.tree.map(lambda x: x[0], rows.dims)
        attn = cal.read_attention(profiles / "attention.csv", template)
    pred = np.zeros(len(rows.measured_s))
    a, b = halves(len(rows.measured_s), seed)
    for train, test in ((a, b), (b, a)):
        fitted = cal.fit(cal.subset(rows, train), hw, gemm, attn, steps_n=iterations)
        pred[test] = cal.predict_steps_s(fitted.params, cal.subset(rows, test), hw)
    return pred


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=ROOT / "data/profiles/h100")
    ap.add_argument("--hardware", default="h100-sxm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffles", type=int, default=20, help="table 2-fold repeats for spread")
    ap.add_argument("--engines", default="sglang,vllm", help="aiconfigurator tables to compare")
    ap.add_argument("--iterations", type=int, default=1500, help="Adam steps per roofline fit")
    ap.add_argument("--no-roofline-cv", action="store_true", help="skip the roofline refits")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    hw = load_hardware(args.hardware)
    steps = args.profiles / "steps.csv"
    rows = cal.read_steps(steps)
    frame, meas = rows.frame, rows.measured_s
    results: dict[str, dict] = {}

    def record(name, pred, **extra):
        results[name] = {**cal.error_report(frame, pred, meas), **extra}
        print(f"{name}: {results[name]['mape']:.2%} ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr)  # fmt: skip

    record("roofline, shipped calibration (in-sample)",
           cal.predict_steps_s(load_calibration(None, hw.name), rows, hw))  # fmt: skip
    if not args.no_roofline_cv:
        record("roofline, 2-fold (fit on half, predict the other)",
               roofline_two_fold(rows, hw, args.profiles, args.seed, args.iterations))  # fmt: skip
    for engine in [e for e in args.engines.split(",") if e]:
        try:
            pred = be.predict_rows("aiconfigurator", frame, hw, engine=engine)
        except SpecError as e:
            print(f"aiconfigurator {engine}: skipped ({e})", file=sys.stderr)
            continue
        first = str(frame["model"].iloc[0])
        version = be.make_estimator("aiconfigurator", first, hw, engine=engine).tables[0].version
        record(f"aiconfigurator {engine} {version} tables (nothing fitted)", pred)
    pred, outside = table_two_fold(frame, hw, args.seed)
    record("table, 2-fold (fit on half, predict the other)", pred, outside_range=outside)
    record("table, in-sample (for reference)",
           be.predict_rows("table", frame, hw, table=steps))  # fmt: skip
    spread = [
        cal.error_report(frame, table_two_fold(frame, hw, s)[0], meas)["mape"]
        for s in range(args.shuffles)
    ]
    results["table_2fold_shuffles"] = {
        "n": args.shuffles,
        "mean": float(np.mean(spread)),
        "min": float(np.min(spread)),
        "max": float(np.max(spread)),
    }
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    print(render(results, len(meas)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def render(results: dict, n: int) -> str:
    rows = {k: r for k, r in results.items() if isinstance(r, dict) and "mape" in r}
    models = sorted({m for r in rows.values() for m in r.get("per_model", {})})
    head = ["estimator", "MAPE", "p90", "max", "bias", *models, *KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [f"{r[k]:.1%}" for k in ("mape", "p90", "max")] + [f"{r['bias']:+.1%}"]
        cells += [f"{r['per_model'].get(m, float('nan')):.1%}" for m in models]
        cells += [f"{r['per_kind'].get(k, float('nan')):.1%}" for k in KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    s = results.get("table_2fold_shuffles")
    if s:
        lines.append(
            f"\ntable 2-fold over {s['n']} shuffles: MAPE {s['mean']:.1%} "
            f"(min {s['min']:.1%}, max {s['max']:.1%}); {n} steps."
        )
    for name, r in rows.items():
        if "outside_range" in r:
            lines.append(f"{name}: {r['outside_range']} held-out steps outside the fitted range.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
