"""Accuracy of the step-latency estimator on measured steps, out of sample.

* K-fold cross-validation on steps.csv (folds shuffled with a fixed seed): each fold is fitted on
  the other steps (plus the eager GEMM/attention micro tables, which are different measurements)
  and predicts the held-out steps; errors are pooled over folds.
* Leave-one-model-out: fit on one model's steps and micro rows only, predict the other model.
* Baselines: a plain datasheet roofline (every op at max(FLOPs/peak, bytes/bandwidth), nothing
  fitted) and the uncalibrated physics priors.

    python scripts/accuracy.py [--profiles data/profiles/h100] [--folds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.attention import fa2 as attn
from hisim_jax.estimator.roofline import Params, ops
from hisim_jax.specs import load_hardware, load_model

ROOT = Path(__file__).resolve().parents[1]


def datasheet_terms(rows: cal.StepRows):
    """Per step: its requests' cached and new tokens ``(c, n)``, and the FLOPs and bytes of
    one layer's GEMMs, one layer's attention (causal: each new token attends to its cached
    prefix and earlier new tokens) and the LM head, at bf16."""
    for i in range(len(rows.measured_s)):
        d = jax.tree.map(lambda x, i=i: float(x[i]), rows.dims)
        m = np.asarray(rows.batches.mask[i]) > 0
        c = np.asarray(rows.batches.cache_len[i])[m]
        n = np.asarray(rows.batches.new_len[i])[m]
        t = n.sum()
        shapes = ops.layer_gemm_shapes(d)
        gemm = (
            sum(2 * t * k * nn for _name, k, nn in shapes),
            sum(k * nn * 2 + t * (k + nn) * 2 for _name, k, nn in shapes),
        )
        attn = (
            4 * d.q_heads * d.head_dim * np.sum(n * (c + (n + 1) / 2)),
            2 * d.kv_heads * d.head_dim * 2 * np.sum(c + n),
        )
        head = (2 * len(n) * d.hidden * d.vocab, d.hidden * d.vocab * 2)
        yield c, n, d.layers, gemm, attn, head


def datasheet_roofline_s(rows: cal.StepRows, hw) -> np.ndarray:
    """Sum over ops of max(FLOPs / peak, bytes / HBM bandwidth) at datasheet numbers."""
    out = []
    for _c, _n, layers, gemm, mixer, head in datasheet_terms(rows):
        flops = layers * (gemm[0] + mixer[0]) + head[0]
        bytes_ = layers * (gemm[1] + mixer[1]) + head[1]
        out.append(max(flops / hw.bf16_flops_per_s, bytes_ / hw.hbm_bytes_per_s))
    return np.asarray(out)


def micro_tables(profiles: Path, rows: cal.StepRows, models: set[str] | None):
    gemm = (
        cal.read_gemm(profiles / "gemm.csv", models) if (profiles / "gemm.csv").is_file() else None
    )
    attn_rows = None
    if (profiles / "attention.csv").is_file():
        heads = None
        if models is not None:
            specs = [load_model(m) for m in models]
            heads = {(s.num_heads, s.num_kv_heads) for s in specs}
        template = jax.tree.map(lambda x: x[0], rows.dims)
        attn_rows = cal.read_attention(profiles / "attention.csv", template, heads)
    return gemm, attn_rows


# Regimes the step error is split by (issue 15): fixed by the batch and the model's shape, never
# by a fitted model, so every evaluation and every change is judged on the same rows.
REGIMES = ("attention_share", "longest_context", "requests")


def regime_columns(rows: cal.StepRows, hw) -> dict[str, list[str]]:
    """Per step: its attention share at datasheet rates (attention over the whole step, both
    by max(FLOPs / peak, bytes / bandwidth)), its longest context and its request count."""
    out = {k: [] for k in REGIMES}
    for c, n, _layers, gemm, mixer, _head in datasheet_terms(rows):
        attn_s = max(mixer[0] / hw.bf16_flops_per_s, mixer[1] / hw.hbm_bytes_per_s)
        gemm_s = max(gemm[0] / hw.bf16_flops_per_s, gemm[1] / hw.hbm_bytes_per_s)
        share = attn_s / (attn_s + gemm_s)
        out["attention_share"].append(
            "attn < 25%" if share < 0.25 else "attn 25-50%" if share < 0.5 else "attn >= 50%"
        )
        longest = int(np.max(c + n))
        out["longest_context"].append(
            "ctx <= 4k" if longest <= 4096 else "ctx 4k-12k" if longest <= 12288 else "ctx > 12k"
        )
        r = len(n)
        out["requests"].append(
            "1 req" if r == 1 else "2-16 req" if r <= 16 else "17-64 req" if r <= 64 else "> 64 req"
        )
    return out


def summarize(frame, pred, meas) -> dict:
    out = cal.error_report(frame, pred, meas)
    ratio = pred / meas - 1.0
    out["per_regime"] = {
        f"{col}: {k}": {
            "rows": len(idx),
            "mape": float(np.mean(np.abs(ratio[idx]))),
            "bias": float(np.mean(ratio[idx])),
        }
        for col in REGIMES
        if col in frame.columns
        for k, idx in sorted(frame.groupby(col, sort=True).indices.items())
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=ROOT / "data/profiles/h100")
    ap.add_argument("--hardware", default="h100-sxm")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    hw = load_hardware(args.hardware)
    rows = cal.read_steps(args.profiles / "steps.csv")
    for col, values in regime_columns(rows, hw).items():
        rows.frame[col] = values
    n = len(rows.measured_s)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()

    results["datasheet_roofline"] = summarize(
        rows.frame, datasheet_roofline_s(rows, hw), rows.measured_s
    )
    results["priors_unfitted"] = summarize(
        rows.frame, cal.predict_steps_s(Params(), rows, hw), rows.measured_s
    )

    # K-fold cross-validation
    order = np.random.default_rng(args.seed).permutation(n)
    folds = np.array_split(order, args.folds)
    gemm, attn_rows = micro_tables(args.profiles, rows, None)
    pred = np.zeros(n)
    for k, test in enumerate(folds):
        train = np.setdiff1d(order, test)
        fitted = cal.fit(cal.subset(rows, train), hw, gemm, attn_rows, steps_n=args.iterations)
        pred[test] = cal.predict_steps_s(fitted.params, cal.subset(rows, test), hw)
        print(f"fold {k + 1}/{args.folds} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    results[f"cv{args.folds}"] = summarize(rows.frame, pred, rows.measured_s)

    # in-sample (all steps), for reference
    fitted = cal.fit(rows, hw, gemm, attn_rows, steps_n=args.iterations)
    results["in_sample"] = summarize(
        rows.frame, cal.predict_steps_s(fitted.params, rows, hw), rows.measured_s
    )

    # leave one model out
    models = sorted(rows.frame["model"].unique())
    lomo = np.zeros(n)
    for held in models:
        train_models = {m for m in models if m != held}
        tr = np.flatnonzero(rows.frame["model"].isin(train_models).to_numpy())
        te = np.flatnonzero((rows.frame["model"] == held).to_numpy())
        g, a = micro_tables(args.profiles, rows, train_models)
        fitted = cal.fit(cal.subset(rows, tr), hw, g, a, steps_n=args.iterations)
        sub = cal.subset(rows, te)
        lomo[te] = cal.predict_steps_s(fitted.params, sub, hw)
        results[f"lomo_predict_{held}"] = summarize(sub.frame, lomo[te], sub.measured_s)
        print(f"leave-one-model-out {held} done", file=sys.stderr)

    results["lomo_both"] = summarize(rows.frame, lomo, rows.measured_s)

    # the attention micro-benchmarks on their own: attention parameters and the eager launch
    # floor fitted on the eager FA2 calls only, 5-fold CV over them
    results.update(attention_micro(attn_rows, hw, args.folds, args.seed, args.iterations))
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["attention_backend"] = attn.FA2.name
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


ATTN_FIT = tuple(n for n in cal.FIT_NAMES if n.startswith("attn_"))


def attention_micro(a: cal.AttnRows, hw, folds: int, seed: int, iterations: int) -> dict:
    hwa = ops.hw_arrays(hw)
    meas = np.asarray(a.measured_s)
    n = len(meas)

    def predict(fitted, idx):
        sub = jax.tree.map(lambda x: x[idx] if np.ndim(x) else x, a)
        kernel = cal._attn_kernel_s(fitted.params, sub, hwa)
        return np.asarray(cal._eager_s(kernel, np.log(fitted.eager_s["eager_attn_s"])))

    def fit(idx):
        sub = jax.tree.map(lambda x: x[idx] if np.ndim(x) else x, a)
        return cal.fit(None, hw, None, sub, fit_names=ATTN_FIT, steps_n=iterations)

    order = np.random.default_rng(seed).permutation(n)
    pred = np.zeros(n)
    for test in np.array_split(order, folds):
        pred[test] = predict(fit(np.setdiff1d(order, test)), test)
    frame = pd.DataFrame(index=range(n))
    whole = fit(np.arange(n))
    out = {
        f"attention_micro_cv{folds}": summarize(frame, pred, meas),
        "attention_micro_in_sample": summarize(frame, predict(whole, np.arange(n)), meas),
    }
    out["attention_micro_params"] = {
        k: float(getattr(whole.params, k)) for k in ATTN_FIT
    } | whole.eager_s
    return out


def render(results: dict) -> str:
    lines = [
        "| evaluation | MAPE | p90 | max | " + " | ".join(KINDS) + " |",
        "|---|---|---|---|" + "---|" * len(KINDS),
    ]
    for name, r in results.items():
        if not isinstance(r, dict) or "mape" not in r:
            continue
        kinds = r.get("per_kind", {})
        cells = [f"{kinds[k]:.1%}" if k in kinds else "" for k in KINDS]
        lines.append(
            f"| {name} | {r['mape']:.1%} | {r['p90']:.1%} | {r['max']:.1%} | "
            + " | ".join(cells)
            + " |"
        )
    per_model = [
        f"{name}: " + ", ".join(f"{m} {v:.1%}" for m, v in r["per_model"].items())
        for name, r in results.items()
        if isinstance(r, dict) and "per_model" in r
    ]
    evals = [n for n in results if n.startswith("cv") or n in ("in_sample", "lomo_both")]
    keys = list(results[evals[-1]]["per_regime"]) if evals else []
    regime = [
        "| regime | rows | " + " | ".join(f"{e} MAPE / bias" for e in evals) + " |",
        "|---|---|" + "---|" * len(evals),
    ]
    for k in keys:
        cells = []
        for e in evals:
            g = results[e]["per_regime"].get(k)
            cells.append(f"{g['mape']:.1%} / {g['bias']:+.1%}" if g else "")
        rows_n = max(results[e]["per_regime"].get(k, {"rows": 0})["rows"] for e in evals)
        regime.append(f"| {k} | {rows_n} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\nper model:\n"
        + "\n".join(per_model)
        + "\n\nby regime:\n"
        + "\n".join(regime)
    )


KINDS = ("decode_uniform", "decode_mixed", "prefill", "prefill_cached", "prefill_multi", "mixed")

if __name__ == "__main__":
    sys.exit(main())
