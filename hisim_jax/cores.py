"""Run a serial simulation on one CPU core.

The simulator's estimator calls are tiny and strictly serial (a decode stretch is ~10^4 FLOPs).
XLA's CPU client sizes its worker pool by the cores the process may use when the client starts,
and hands each call's kernels to those workers, so with a pool spread over several cores every
call pays cross-core wake-ups worth more than its work. On the 2-core development machine a
decode-stretch call takes ~116 µs on two cores and ~47 µs on one, and the Python around it
runs faster too without migrations (scripts/bench_simulator.py, BENCHMARKS.md).
"""

from __future__ import annotations

import os

# Set to 0 to keep a simulation on every core the process may use.
ENV_VAR = "HISIM_ONE_CORE"


def _current_cpu() -> int | None:
    """The core this process last ran on (field 39 of /proc/self/stat), where the kernel's
    load balancer put it: parallel runs mostly land on different cores."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def pin_to_one_core(index: int | None = None) -> int | None:
    """Pin this process (every thread it has) to one of the cores it may use; returns that
    core, or None if nothing was done (not Linux, one core already, or HISIM_ONE_CORE=0).
    ``index``: the ``index``-th core it may use (modulo their number), as a pool's workers
    take one each; else the core it runs on now.

    Call it before JAX's first computation: the XLA pool's size is fixed then. Threads started
    later inherit the pinning."""
    if os.environ.get(ENV_VAR, "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= 1:
        return None
    current = _current_cpu()
    if index is not None:
        core = cpus[index % len(cpus)]
    else:
        core = current if current in cpus else cpus[os.getpid() % len(cpus)]
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, {core})
        except OSError:  # a thread that just ended, or a sandbox that forbids it
            pass
    return core
