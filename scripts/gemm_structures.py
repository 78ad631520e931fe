"""Does tile or wave quantization explain measured GEMM times? Structures of a bf16 GEMM's
kernel time, each fitted (log-space least squares, Adam) on one GPU's measured GEMMs and
reported in and out of sample.

Data: aiconfigurator-core's GEMM table of a system and engine (default H100, vLLM; thousands of
cuBLAS shapes; needs ``pip install -e ".[aic]"``), or ``--profiles`` for our eager
micro-benchmarks (data/profiles/h100/gemm.csv). Every structure shares the roofline's four
parameters (compute and stream efficiency, the blend of the non-binding side, the launch
floor); the quantized ones multiply the compute time by padded over real work:

* ``waves TMxTN``: ceil(tiles / SMs) waves of TM x TN output tiles, each SM one tile per wave;
* ``fill TMxTN``: only the under-filled case, fewer tiles than SMs;
* ``soft waves``: (ceil(x) / x)^beta, x = tiles / SMs — a kernel choice that hides part of it;
* ``best of tiles``: the least padded of five Hopper tile shapes, as a heuristic would pick;
* ``mainloop fill``: a per-tile prologue/epilogue worth k0 steps of the k loop, 1 + k0 / k.

    python scripts/gemm_structures.py [--system h100_sxm] [--engine vllm] [--rows 6000]
        [--profiles data/profiles/h100] [--folds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hisim_jax.estimator import aiconfigurator as aic
from hisim_jax.estimator import calibrate as cal
from hisim_jax.specs import load_hardware

jax.config.update("jax_enable_x64", True)
TILES = ((128, 128), (128, 256), (64, 128), (64, 64), (256, 128))


def quantizations(m, n, k, sms) -> dict[str, np.ndarray]:
    """Padded over real compute per row, per structure (1: none)."""
    out = {"roofline (none)": np.ones_like(m)}
    for tm, tn in TILES:
        tiles = np.ceil(m / tm) * np.ceil(n / tn)
        x = tiles / sms
        out[f"waves {tm}x{tn}"] = np.ceil(x) / x
        out[f"fill {tm}x{tn}"] = 1.0 / np.minimum(1.0, x)
    for tm, tn in ((128, 128), (128, 256)):
        x = np.ceil(m / tm) * np.ceil(n / tn) / sms
        for beta in (0.3, 0.5):
            out[f"soft waves {tm}x{tn} beta {beta}"] = (np.ceil(x) / x) ** beta
    out["best of tiles"] = np.min(
        [np.ceil(np.ceil(m / a) * np.ceil(n / b) / sms) * sms * a * b / (m * n) for a, b in TILES],
        axis=0,
    )
    return out


def _predict_s(x, flops, bytes_, q, k, peak, bw, k0_on):
    e, eb, blend, floor, k0 = jnp.exp(x)
    tc = flops / (peak * e) * q * (1.0 + k0_on * k0 / k)
    tm = bytes_ / (bw * eb)
    kernel = jnp.maximum(tc, tm) + blend * jnp.minimum(tc, tm)
    return (kernel**4 + floor**4) ** 0.25


def fit(rows: dict, q, k0_on: float, steps: int = 3000) -> np.ndarray:
    x = jnp.log(jnp.array([0.7, 0.8, 0.2, 10e-6, 100.0]))
    args = (rows["flops"], rows["bytes"], q, rows["k"], rows["peak"], rows["bw"], k0_on)

    def loss(x):
        return jnp.mean((jnp.log(_predict_s(x, *args)) - jnp.log(rows["t"])) ** 2)

    opt = optax.adam(0.03)
    state = opt.init(x)
    step = jax.jit(lambda x, s: _update(opt, loss, x, s))
    for _ in range(steps):
        x, state = step(x, state)
    return np.asarray(x)


def _update(opt, loss, x, state):
    g = jax.grad(loss)(x)
    upd, state = opt.update(g, state)
    return optax.apply_updates(x, upd), state


def _take(rows: dict, idx) -> dict:
    return {k: (v[idx] if np.ndim(v) else v) for k, v in rows.items()}


def evaluate(rows: dict, q: np.ndarray, k0_on: float, folds: int, seed: int) -> dict:
    n = len(rows["t"])
    order = np.random.default_rng(seed).permutation(n)
    pred = np.zeros(n)
    for test in np.array_split(order, folds):
        train = np.setdiff1d(order, test)
        x = fit(_take(rows, train), q[train], k0_on)
        r = _take(rows, test)
        args = (r["flops"], r["bytes"], q[test], r["k"], r["peak"], r["bw"], k0_on)
        pred[test] = np.asarray(_predict_s(x, *args))
    err = np.abs(pred / rows["t"] - 1.0)
    return {"cv_mape": float(err.mean()), "cv_p90": float(np.quantile(err, 0.9))}


def load_rows(args) -> tuple[dict, str]:
    if args.profiles is not None:
        g = cal.read_gemm(args.profiles / "gemm.csv")
        keep = np.asarray(g.weight_bytes) > 1.5  # bf16 only
        m, k, n = (np.asarray(a)[keep] for a in (g.m, g.k, g.n))
        t = np.asarray(g.measured_s)[keep]
        hw = load_hardware("h100-sxm")
        source = f"{args.profiles}/gemm.csv (bf16, eager)"
    else:
        _v, tables, used = aic.read_tables(args.system, args.engine, args.version)
        g = tables["gemm"]
        g = g[g["dtype"] == "bf16"]
        if len(g) > args.rows:
            g = g.sample(args.rows, random_state=args.seed)
        m, k, n, t = (g[c].to_numpy(float) for c in ("m", "k", "n", "latency_s"))
        hw = load_hardware(aic.hardware_name(args.system))
        source = f"aiconfigurator-core {args.system}/{args.engine} {used['gemm']} gemm (bf16)"
    rows = dict(
        m=m,
        k=k,
        n=n,
        t=t,
        flops=2.0 * m * k * n,
        bytes=(k * n + m * k + m * n) * 2.0,
        peak=float(hw.bf16_flops_per_s),
        bw=float(hw.hbm_bytes_per_s),
    )
    return rows | {"sms": float(hw.sm_count)}, source


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="h100_sxm")
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--version", default=None)
    ap.add_argument("--rows", type=int, default=6000, help="rows sampled from the table")
    ap.add_argument("--profiles", type=Path, default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows, source = load_rows(args)
    qs = quantizations(rows["m"], rows["n"], rows["k"], rows["sms"])
    results = {}
    for name, q in qs.items():
        results[name] = evaluate(rows, q, 0.0, args.folds, args.seed)
        print(f"{name}: {results[name]['cv_mape']:.1%}", file=sys.stderr)
    results["mainloop fill (1 + k0/k)"] = evaluate(
        rows, qs["roofline (none)"], 1.0, args.folds, args.seed
    )
    print(f"{len(rows['t'])} rows of {source}; {args.folds}-fold CV\n")
    print("| structure | CV MAPE | CV p90 |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['cv_mape']:.1%} | {r['cv_p90']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"source": source, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
