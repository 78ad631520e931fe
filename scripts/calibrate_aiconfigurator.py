"""Regenerate the shipped calibrations fitted to aiconfigurator-core's kernel tables, and the
leave-one-GPU-out check of how the fitted values transfer.

For every GPU in hardware_specs/ that aiconfigurator has GEMM and attention tables for, and each
engine (vllm, sglang), writes ``hardware_specs/calibration/<gpu>.<engine>.json`` and prints the
per-operator MAPE; then fits on all GPUs but one and predicts the one left out. Needs the extra:
``pip install -e ".[aic]"``.

    python scripts/calibrate_aiconfigurator.py [--engines vllm sglang] [--systems h100_sxm ...]
        [--steps 1000] [--max-rows 4000] [--logo-steps 600] [--logo-max-rows 500] [--no-logo | --logo-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hisim_jax import files
from hisim_jax.estimator import aiconfigurator as aic

ROOT = Path(__file__).resolve().parents[1]
OPS = (
    "gemm_bf16",
    "gemm_fp8",
    "context_attention",
    "generation_attention",
    "allreduce",
    "moe_not_fitted",
)


def _write_json(path: Path, doc: dict) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    files.write_atomic(path, lambda tmp: tmp.write_text(text))


def _table(title: str, per_gpu: dict[str, dict]) -> str:
    lines = [f"{title}", "", "| GPU | " + " | ".join(OPS) + " |", "|---" * (len(OPS) + 1) + "|"]
    for gpu, fit in per_gpu.items():
        cells = [
            f"{fit[o]['mape'] * 100:.1f}% ({fit[o]['rows']})" if o in fit else "—" for o in OPS
        ]
        lines.append(f"| {gpu} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["vllm", "sglang"])
    ap.add_argument("--systems", nargs="+", default=None, help="aiconfigurator system names")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps per fit")
    ap.add_argument("--max-rows", type=int, default=4000, help="rows sampled per table")
    ap.add_argument("--logo-max-rows", type=int, default=500, help="... per table and GPU")
    ap.add_argument("--logo-steps", type=int, default=600, help="optimizer steps per LOGO fit")
    ap.add_argument("--no-logo", action="store_true", help="skip leave-one-GPU-out")
    ap.add_argument("--logo-only", action="store_true", help="only leave-one-GPU-out")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "hardware_specs" / "calibration")
    ap.add_argument("--json", type=Path, default=None, help="write every report here too")
    args = ap.parse_args(argv)

    summary: dict = {"fits": {}, "leave_one_gpu_out": {}}
    for engine in args.engines:
        chosen = args.systems or aic.available_systems(engine)
        chosen = [s for s in chosen if engine in aic.available_engines(s)]
        per_gpu = {}
        for system in [] if args.logo_only else chosen:
            t0 = time.perf_counter()
            doc = aic.calibrate_from_aiconfigurator(
                system, engine, steps_n=args.steps, max_rows=args.max_rows
            )
            gpu = aic.hardware_name(system)
            path = args.out_dir / f"{gpu}.{engine}.json"
            _write_json(path, doc)
            per_gpu[gpu] = doc["fit"]
            ops = ", ".join(
                f"{o} {doc['fit'][o]['mape'] * 100:.1f}%" for o in OPS if o in doc["fit"]
            )
            print(
                f"[{engine}] {system} -> {path.name} ({doc['version']}, "
                f"{time.perf_counter() - t0:.0f} s): {ops}",
                flush=True,
            )
        summary["fits"][engine] = per_gpu
        if per_gpu:
            print("\n" + _table(f"Per-operator MAPE, {engine} (rows)", per_gpu) + "\n", flush=True)
        if args.no_logo or len(chosen) < 2:
            continue
        t0 = time.perf_counter()
        logo = aic.leave_one_gpu_out(
            engine,
            chosen,
            steps_n=args.logo_steps,
            max_rows=args.logo_max_rows,
            progress=lambda s, engine=engine: print(f"[{engine}] held out: {s}", flush=True),
        )
        held = {aic.hardware_name(s): fit for s, fit in logo["held_out"].items()}
        summary["leave_one_gpu_out"][engine] = held
        print(
            "\n"
            + _table(f"Leave-one-GPU-out MAPE, {engine} (held-out rows)", held)
            + f"\n\n({time.perf_counter() - t0:.0f} s)\n",
            flush=True,
        )
    if args.json is not None:
        _write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
