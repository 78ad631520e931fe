"""Speed of the step-latency estimator on this machine's CPUs.

Measures, for Llama-3.1-8B and N random batches (1..256 requests, half with a prefill chunk
among decodes), each figure the median of ``--repeats`` timed calls after an untimed one
(compile time reported apart):
  1. the public array entry: ``Estimator.step_latency_s(RaggedBatches)`` on all GPUs of
     hardware_specs/ and on one, in batch x GPU evaluations per second (packing into buckets
     and every estimator call included; building the RaggedBatches from flat arrays, which
     checks them, timed apart);
  2. Python lists through ``Estimator.step_latency_s`` on one GPU, in batches per second
     (conversion, checks, packing and estimation included), for that mix and for 1..16
     requests per batch;
  3. one single-batch call after warm-up (the first random batch, 218 requests), through the
     public API from a list and from a RaggedBatches, and the jitted program alone;
  4. the internal entry ``step_seconds_grid`` on pre-packed arrays (the figure reported before
     the array entry existed);
  5. the speed-up over a straightforward Python loop over the same formulas (numpy, one batch
     and one GPU per iteration), timed on a subset and scaled per evaluation.

    python scripts/bench_estimator.py [--batches 10000] [--repeats 7] [--json out.json]
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

from hisim_jax import Estimator, RaggedBatches
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


def median_s(fn, repeats: int) -> float:
    return statistics.median(timed(fn, repeats))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--max-requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-batches", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    names = available_hardware()
    est = Estimator("llama-3.1-8b", names)
    one_gpu = Estimator("llama-3.1-8b", "h100-sxm")
    batches = random_batches(args.batches, args.max_requests, args.seed)
    n = len(batches)
    rb = RaggedBatches.from_batches(batches)
    result: dict = {
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "batches": n,
        "max_requests": args.max_requests,
        "requests": int(rb.sizes.sum()),
        "gpus": len(names),
    }

    # 1. the public array entry
    t0 = time.perf_counter()
    est.step_latency_s(rb)
    one_gpu.step_latency_s(rb)
    result["ragged_compile_s"] = round(time.perf_counter() - t0, 2)
    for key, e in (("ragged_8gpu", est), ("ragged_1gpu", one_gpu)):
        sec = median_s(lambda e=e: e.step_latency_s(rb), args.repeats)
        result[f"{key}_s"] = round(sec, 4)
        result[f"{key}_evals_per_s"] = round(n * len(e.hardware) / sec)
    flat = (rb.cache_len.copy(), rb.new_len.copy(), rb.sizes.copy())
    result["ragged_build_from_arrays_s"] = round(
        median_s(lambda: RaggedBatches(*flat), args.repeats), 4
    )

    # 2. Python lists
    sec = median_s(lambda: one_gpu.step_latency_s(batches), args.repeats)
    result["lists_1gpu_s"] = round(sec, 4)
    result["lists_1gpu_batches_per_s"] = round(n / sec)
    result["lists_to_ragged_s"] = round(
        median_s(lambda: RaggedBatches.from_batches(batches), args.repeats), 4
    )
    small = random_batches(n, 16, args.seed + 1)
    one_gpu.step_latency_s(small)
    sec = median_s(lambda: one_gpu.step_latency_s(small), args.repeats)
    result["lists_1gpu_1_16_requests_batches_per_s"] = round(n / sec)

    # 3. single-batch calls after warm-up
    one = [batches[0]]
    one_rb = RaggedBatches.from_batches(one)
    one_gpu.step_latency_s(one)
    result["single_call_requests"] = len(batches[0])
    result["single_call_api_us"] = round(
        median_s(lambda: one_gpu.step_latency_s(one), 500) * 1e6, 1
    )
    result["single_call_api_ragged_us"] = round(
        median_s(lambda: one_gpu.step_latency_s(one_rb), 500) * 1e6, 1
    )
    one_packed = jax.tree.map(ops._float, pack(one))
    cnm = np.zeros((3, 1, 256), est_mod._host_float())
    cnm[:, 0, : len(batches[0])] = np.stack(
        [one_packed.cache_len[0], one_packed.new_len[0], one_packed.mask[0]]
    )[:, : len(batches[0])]
    program = one_gpu._program("flat", "prefill", (1, 256))
    program(cnm)
    result["single_call_program_us"] = round(
        median_s(lambda: program(cnm).block_until_ready(), 500) * 1e6, 1
    )

    # 4. the internal entry on pre-packed arrays (one padded array per bucket)
    groups = [(idx, jax.tree.map(ops._float, b)) for idx, b in pack_by_bucket(batches)]

    def grid():
        out = np.zeros((n, len(names)))
        for idx, b in groups:
            out[idx] = np.asarray(est_mod.step_seconds_grid(est.params, est.dims, b, est.hws))
        return out

    t0 = time.perf_counter()
    grid()
    result["grid_compile_s"] = round(time.perf_counter() - t0, 2)
    vec_s = median_s(grid, args.repeats)
    result["grid_8gpu_s"] = round(vec_s, 4)
    result["grid_8gpu_evals_per_s"] = round(n * len(names) / vec_s)

    # 5. straightforward Python loop over the same formulas (numpy, eager)
    np_params = jax.tree.map(np.asarray, est.params)
    np_dims = ops.np_dims(est.dims)
    np_hws = [jax.tree.map(np.asarray, ops.hw_arrays(load_hardware(h))) for h in names]
    subset = batches[: args.loop_batches]
    t0 = time.perf_counter()
    loop_out = []
    for b in subset:
        pb = jax.tree.map(lambda x: x[0], pack([b]))
        for hw in np_hws:
            loop_out.append(float(est_mod.step_s(np_params, np_dims, pb, hw, xp=np)))
    loop_per_eval_s = (time.perf_counter() - t0) / (len(subset) * len(np_hws))
    ragged = est.step_latency_s(RaggedBatches.from_batches(subset)).reshape(-1)
    result["python_loop_evals_per_s"] = round(1.0 / loop_per_eval_s)
    result["speedup_ragged_8gpu_vs_python_loop"] = round(
        loop_per_eval_s * result["ragged_8gpu_evals_per_s"]
    )
    result["loop_vs_ragged_max_rel_diff"] = float(
        np.max(np.abs(np.asarray(loop_out) / ragged - 1.0))
    )
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
