"""Per-operator accuracy of hisim's kernel terms for the new layer kinds against
aiconfigurator-core's measured kernel tables (MLA, DeepSeek-shaped MoE, DeepEP all-to-all,
Gated DeltaNet, Mamba-2's conv), per engine, GPU and operator.

Two evaluations of every table row:

* ``default``: the shipped calibration (``hardware_specs/calibration/h100-sxm.json``, what an
  Estimator uses on any GPU without ``--engine``), kernel time alone, nothing refitted;
* ``logo``: leave one GPU out: the parameters the operator's timings can show
  (``aiconfigurator.LAYER_FIT_NAMES``) and the table's launch floor fitted on the engine's
  tables of every other GPU, then the held-out GPU predicted.

Errors are |predicted / measured - 1|: MAPE, p90, max, and the mean signed error (bias).
Needs the extra: ``pip install -e ".[aic]"``.

    python scripts/accuracy_kernels.py [--engines sglang vllm trtllm] [--ops mla_context ...]
        [--systems h100_sxm ...] [--steps 400] [--fit-rows 300] [--eval-rows 1500]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hisim_jax import files
from hisim_jax.estimator import aiconfigurator as aic
from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.roofline import load_calibration, params_to_dict

# columns that split an operator's held-out error into regimes (each cut into a few bins)
REGIMES = {
    "mla_context": ("heads", "batch", "new_len"),
    "mla_generation": ("heads", "batch", "cache_len"),
    "mla_bmm": ("heads", "tokens"),
    "mla_context_module": ("heads", "batch", "new_len"),
    "mla_generation_module": ("heads", "batch", "cache_len"),
    "moe_deepseek": ("ep", "tokens", "dtype"),
    "moe_wideep_context": ("ep", "tokens"),
    "moe_wideep_generation": ("ep", "tokens"),
    "a2a_ll": ("tokens", "hidden"),
    "a2a_normal": ("tokens", "hidden"),
    "a2a": ("backend", "tokens"),
    "gdn_context": ("v_heads", "batch", "new_len"),
    "gdn_generation": ("v_heads", "batch"),
    "mamba2_conv": ("phase", "batch", "new_len"),
}


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if n <= 0 or len(frame) <= n:
        return frame.reset_index(drop=True)
    return frame.sample(n=n, random_state=seed).sort_index().reset_index(drop=True)


def _pad(parts) -> int:
    """Rows every training set is padded to (so folds of nearly equal size share programs)."""
    n = sum(len(f) for _, f in parts)
    return 512 * math.ceil(n / 512)


def _predict(params, op, parts, floors=None):
    """(frame, predicted, measured) of ``parts`` in the order kernel_sets builds its rows."""
    sets = aic.kernel_sets(op, parts)
    pred, meas = aic.predict_sets(params, sets, floors)
    frame = pd.concat([f for _, f in aic.kernel_set_parts(op, parts)], ignore_index=True)
    return frame, pred, meas


def _regimes(op: str, frame: pd.DataFrame, pred, meas) -> dict:
    err = np.abs(pred / meas - 1.0)
    out = {}
    for col in REGIMES.get(op, ()):
        if col not in frame.columns:
            continue
        v = frame[col]
        if v.dtype.kind in "fi" and v.nunique() > 6:
            edges = np.unique(np.quantile(v, [0, 0.25, 0.5, 0.75, 1.0]))
            bins = pd.cut(v, edges, include_lowest=True, duplicates="drop").astype(str)
        else:
            bins = v.astype(str)
        out[col] = {
            str(k): {
                "rows": int(len(i)),
                "mape": float(np.mean(err[i])),
                "bias": float(np.mean(pred[i] / meas[i] - 1.0)),
            }
            for k, i in frame.groupby(bins.to_numpy(), sort=True).indices.items()
        }
    return out


def run_op(engine, op, systems, args, base):
    found = {}
    for s in systems:
        got = aic.layer_frame(s, engine, op)
        if got is not None:
            found[s] = got
    if not found:
        return None
    result = {"versions": {s: v for s, (v, _) in found.items()}, "per_gpu": {}}
    evals = {s: _sample(f, args.eval_rows, args.seed) for s, (_, f) in found.items()}
    fits = {s: _sample(f, args.fit_rows, args.seed) for s, (_, f) in found.items()}
    for s, frame in evals.items():
        fr, pred, meas = _predict(base, op, [(s, frame)])
        result["per_gpu"][aic.hardware_name(s)] = {"default": aic.error_stats(pred, meas)}
    if len(found) >= 2:
        names = aic.LAYER_FIT_NAMES[op]
        for s, frame in evals.items():
            t0 = time.perf_counter()
            train = [(o, f) for o, f in fits.items() if o != s]
            sets = aic.kernel_sets(op, train, pad_to=_pad(train))
            fit = cal.fit_kernel_sets(
                sets, init=base, fit_names=names, steps_n=args.steps, prior_weight=args.prior
            )
            fr, pred, meas = _predict(fit.params, op, [(s, frame)], fit.eager_s)
            gpu = aic.hardware_name(s)
            result["per_gpu"][gpu]["logo"] = aic.error_stats(pred, meas)
            result["per_gpu"][gpu]["logo_regimes"] = _regimes(op, fr, pred, meas)
            values = params_to_dict(fit.params)
            result["per_gpu"][gpu]["logo_params"] = {
                **{n: float(f"{values[n]:.4g}") for n in names},
                **{k: float(f"{v:.4g}") for k, v in fit.eager_s.items()},
            }
            print(
                f"  [{engine}] {op} held out {s}: default "
                f"{result['per_gpu'][gpu]['default']['mape'] * 100:.1f}% -> logo "
                f"{result['per_gpu'][gpu]['logo']['mape'] * 100:.1f}% "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return result


def _gpus(report: dict) -> list[str]:
    seen = {g for ops in report["engines"].values() for r in ops.values() for g in r["per_gpu"]}
    return [aic.hardware_name(s) for s in sorted(aic.SYSTEMS) if aic.hardware_name(s) in seen]


def _cell(r: dict | None) -> str:
    """``default -> held-out`` MAPE, and the held-out p90 / max, in percent."""
    if not r:
        return "—"
    d, lo = r["default"], r.get("logo")
    if lo is None:
        return f"{d['mape'] * 100:.0f} (p90 {d['p90'] * 100:.0f}, max {d['max'] * 100:.0f})"
    return (
        f"{d['mape'] * 100:.0f} → **{lo['mape'] * 100:.0f}** "
        f"({lo['p90'] * 100:.0f}, {lo['max'] * 100:.0f})"
    )


def markdown(report: dict) -> str:
    """One table per engine: operators x GPUs, each cell the default MAPE -> leave-one-GPU-out
    MAPE (leave-one-GPU-out p90, max), in percent; a GPU alone with a table has no held-out
    figure (its default MAPE, p90 and max are shown)."""
    gpus = _gpus(report)
    lines = []
    for engine, ops in report["engines"].items():
        lines += [
            f"{engine}: MAPE default → **leave-one-GPU-out** (LOGO p90, max), %",
            "",
            "| operator (version) | " + " | ".join(gpus) + " | median LOGO |",
            "|---" * (len(gpus) + 2) + "|",
        ]
        for op, res in ops.items():
            vers = ", ".join(sorted(set(res["versions"].values()), key=aic._version_key))
            logo = [r["logo"]["mape"] for r in res["per_gpu"].values() if "logo" in r]
            med = f"{np.median(logo) * 100:.0f}" if logo else "—"
            cells = [_cell(res["per_gpu"].get(g)) for g in gpus]
            lines.append(f"| {op} ({vers}) | " + " | ".join(cells) + f" | {med} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=list(aic.ENGINES))
    ap.add_argument("--ops", nargs="+", default=list(aic.LAYER_TABLES))
    ap.add_argument("--systems", nargs="+", default=sorted(aic.SYSTEMS))
    ap.add_argument("--steps", type=int, default=400, help="Adam steps per leave-one-out fit")
    ap.add_argument("--fit-rows", type=int, default=300, help="rows per GPU in a fit")
    ap.add_argument("--eval-rows", type=int, default=1500, help="rows per GPU scored (0: all)")
    ap.add_argument("--prior", type=float, default=aic.PRIOR_WEIGHT, help="pull to the priors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    for op in args.ops:
        if op not in aic.LAYER_TABLES:
            ap.error(f"operator {op!r} unknown (choose from {', '.join(aic.LAYER_TABLES)})")

    base = load_calibration()
    t0 = time.perf_counter()
    report = {
        "aiconfigurator_core": aic._package_version(),
        "command": " ".join(["python scripts/accuracy_kernels.py", *(argv or sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "engines": {},
    }
    for engine in args.engines:
        per_op = {}
        for op in args.ops:
            res = run_op(engine, op, args.systems, args, base)
            if res is not None:
                per_op[op] = res
        report["engines"][engine] = per_op
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print("\n" + markdown(report), flush=True)
    print(f"({report['wall_s']:.0f} s)")
    if args.json is not None:
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        files.write_atomic(args.json, lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
