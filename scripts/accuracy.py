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

from hisim_jax.estimator import calibrate as cal
from hisim_jax.estimator.attention import fa2 as attn
from hisim_jax.estimator.roofline import Params, ops
from hisim_jax.specs import load_hardware, load_model

ROOT = Path(__file__).resolve().parents[1]


def datasheet_roofline_s(rows: cal.StepRows, hw) -> np.ndarray:
    """Sum over ops of max(FLOPs / peak, bytes / HBM bandwidth) at datasheet numbers."""
    out = []
    for i in range(len(rows.measured_s)):
        d = jax.tree.map(lambda x, i=i: float(x[i]), rows.dims)
        m = np.asarray(rows.batches.mask[i]) > 0
        c = np.asarray(rows.batches.cache_len[i])[m]
        n = np.asarray(rows.batches.new_len[i])[m]
        t, r = n.sum(), len(n)
        flops = bytes_ = 0.0
        for _name, k, nn in ops.layer_gemm_shapes(d):
            flops += d.layers * 2 * t * k * nn
            bytes_ += d.layers * (k * nn * 2 + t * (k + nn) * 2)
        # causal attention: each new token attends to its cached prefix and earlier new tokens
        attn_flops = 4 * d.q_heads * d.head_dim * np.sum(n * (c + (n + 1) / 2))
        kv_bytes = 2 * d.kv_heads * d.head_dim * 2 * np.sum(c + n)
        flops += d.layers * attn_flops
        bytes_ += d.layers * kv_bytes
        flops += 2 * r * d.hidden * d.vocab
        bytes_ += d.hidden * d.vocab * 2
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


def summarize(frame, pred, meas) -> dict:
    return cal.error_report(frame, pred, meas)


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
    for held in models:
        train_models = {m for m in models if m != held}
        tr = np.flatnonzero(rows.frame["model"].isin(train_models).to_numpy())
        te = np.flatnonzero((rows.frame["model"] == held).to_numpy())
        g, a = micro_tables(args.profiles, rows, train_models)
        fitted = cal.fit(cal.subset(rows, tr), hw, g, a, steps_n=args.iterations)
        sub = cal.subset(rows, te)
        results[f"lomo_predict_{held}"] = summarize(
            sub.frame, cal.predict_steps_s(fitted.params, sub, hw), sub.measured_s
        )
        print(f"leave-one-model-out {held} done", file=sys.stderr)

    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["attention_backend"] = attn.FA2.name
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def render(results: dict) -> str:
    lines = [
        "| evaluation | MAPE | p90 | max | " + " | ".join(KINDS) + " |",
        "|---|---|---|---|" + "---|" * len(KINDS),
    ]
    for name, r in results.items():
        if not isinstance(r, dict):
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
    return "\n".join(lines) + "\n\nper model:\n" + "\n".join(per_model)


KINDS = ("decode_uniform", "decode_mixed", "prefill", "prefill_cached", "prefill_multi", "mixed")

if __name__ == "__main__":
    sys.exit(main())
