"""Speed of the step-latency estimator on this machine's CPUs.

Measures, for Llama-3.1-8B:
  1. vectorized throughput: N random batches (1..256 requests, mixed prefill/decode) × all GPUs
     in hardware_specs/ in one jitted call, in batch×hardware evaluations per second
     (compile time reported apart, median of repeats);
  2. the latency of one single-batch call after warm-up, through the public API and through the
     jitted entry point with pre-packed arrays;
  3. the speed-up over a straightforward Python loop over the same formulas (numpy, one batch and
     one GPU per iteration), timed on a subset and scaled per evaluation.

    python scripts/bench_estimator.py [--batches 10000] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from hisim_jax import Estimator
from hisim_jax.estimator import ops
from hisim_jax.estimator import roofline as est_mod
from hisim_jax.estimator.batch import pack, pack_by_bucket
from hisim_jax.specs import available_hardware, load_hardware


def random_batches(n: int, max_requests: int, seed: int) -> list[list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = int(rng.integers(1, max_requests + 1))
        cache = rng.integers(0, 16384, r)
        new = np.ones(r, dtype=int)
        if rng.random() < 0.5:  # a prefill chunk among decodes
            new[0] = int(rng.integers(16, 4097))
        out.append([(int(c), int(k)) for c, k in zip(cache, new, strict=True)])
    return out


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--max-requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-batches", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    names = available_hardware()
    est = Estimator("llama-3.1-8b", names)
    batches = random_batches(args.batches, args.max_requests, args.seed)
    # as Estimator.step_latency_s does: one padded array per power-of-two bucket
    groups = [(idx, jax.tree.map(ops._float, b)) for idx, b in pack_by_bucket(batches)]
    hws = est.hws

    def run():
        out = np.zeros((len(batches), len(names)))
        for idx, b in groups:
            out[idx] = np.asarray(est_mod.step_seconds_grid(est.params, est.dims, b, hws))
        return out

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    times = timed(run, args.repeats)
    evals = args.batches * len(names)
    vec_s = statistics.median(times)

    # single-batch latency after warm-up
    one = [batches[0]]
    single = Estimator("llama-3.1-8b", "h100-sxm")
    single.step_latency_s(one)
    api_us = statistics.median(timed(lambda: single.step_latency_s(one), 200)) * 1e6
    one_packed = jax.tree.map(ops._float, pack(one))
    hw1 = single.hws

    def grid_call():  # every parameter, model and GPU field a separate argument (~40 leaves)
        est_mod.step_seconds_grid(single.params, single.dims, one_packed, hw1).block_until_ready()

    # one flattened parameter vector, one batch array (what step_latency_s called until the
    # parameters were baked in as constants)
    cnm = np.stack([one_packed.cache_len, one_packed.new_len, one_packed.mask]).astype(
        est_mod._host_float()
    )
    needs = single._needs["any"]

    def flat_call():
        est_mod.step_seconds_flat(
            single._theta, cnm, single._treedef, single._shapes, single.backend, needs
        ).block_until_ready()

    # what step_latency_s calls now: the same with parameters, model and GPU baked in
    baked = single._baked("flat", "any")

    def baked_call():
        baked(cnm).block_until_ready()

    grid_call(), flat_call(), baked_call()
    raw_us = statistics.median(timed(grid_call, 500)) * 1e6
    flat_us = statistics.median(timed(flat_call, 500)) * 1e6
    baked_us = statistics.median(timed(baked_call, 500)) * 1e6

    # straightforward Python loop over the same formulas (numpy, eager)
    np_params = jax.tree.map(np.asarray, est.params)
    np_dims = ops.np_dims(est.dims)
    np_hws = [jax.tree.map(np.asarray, ops.hw_arrays(load_hardware(n))) for n in names]
    subset = batches[: args.loop_batches]
    t0 = time.perf_counter()
    loop_out = []
    for b in subset:
        pb = jax.tree.map(lambda x: x[0], pack([b]))
        for hw in np_hws:
            loop_out.append(float(est_mod.step_s(np_params, np_dims, pb, hw, xp=np)))
    loop_per_eval_s = (time.perf_counter() - t0) / (len(subset) * len(np_hws))
    vec_subset = run()[: len(subset)].reshape(-1)
    agree = float(np.max(np.abs(np.asarray(loop_out) / vec_subset - 1.0)))

    result = {
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "batches": args.batches,
        "max_requests": args.max_requests,
        "buckets": [int(b.mask.shape[1]) for _, b in groups],
        "gpus": len(names),
        "compile_s": round(compile_s, 2),
        "vectorized_s": round(vec_s, 4),
        "evals_per_s": round(evals / vec_s),
        "single_call_api_us": round(api_us, 1),
        "single_call_jit_us": round(raw_us, 1),
        "single_call_flat_jit_us": round(flat_us, 1),
        "single_call_baked_jit_us": round(baked_us, 1),
        "python_loop_evals_per_s": round(1.0 / loop_per_eval_s),
        "speedup_vs_python_loop": round(loop_per_eval_s / (vec_s / evals)),
        "loop_vs_vectorized_max_rel_diff": agree,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
