import os
import subprocess
import sys

import pytest

CHECK = (
    "import os; from hisim_jax.cores import pin_to_one_core; core = pin_to_one_core(); "
    "import threading; t = threading.Thread(target=lambda: None); t.start(); t.join(); "
    "print(core, sorted(os.sched_getaffinity(0)))"
)


def _run(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two cores",
)
def test_pins_the_process_to_one_of_its_cores_unless_turned_off():
    core, cpus = _run({"HISIM_ONE_CORE": "1"}).split(" ", 1)
    assert cpus == f"[{core}]" and int(core) in os.sched_getaffinity(0)
    assert _run({"HISIM_ONE_CORE": "0"}) == f"None {sorted(os.sched_getaffinity(0))}"


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two cores",
)
def test_pool_workers_take_successive_cores():
    cpus = sorted(os.sched_getaffinity(0))
    code = "import os; from hisim_jax.cores import pin_to_one_core; print(pin_to_one_core({}))"
    got = []
    for i in range(len(cpus) + 1):
        out = subprocess.run(
            [sys.executable, "-c", code.format(i)],
            env={**os.environ, "HISIM_ONE_CORE": "1"},
            capture_output=True,
            text=True,
        )
        got.append(int(out.stdout))
    assert got == [cpus[i % len(cpus)] for i in range(len(cpus) + 1)]
