"""scripts/profile_gpu.py without a GPU: its tables parse with calibrate's own readers.

With torch installed the dry run times every path on the CPU at a tiny grid; without it (and
always with --plan-only) the plan of a GPU run is written with empty timing columns. Both are
checked here, whichever torch this machine has; bad options end with one line and exit code 2.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pandas as pd
import pytest

from hisim_jax.estimator import calibrate
from hisim_jax.estimator.batch import parse_batch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_gpu.py"
MODELS = "llama-3.1-8b,qwen2.5-1.5b"


@pytest.fixture(scope="module")
def pg():
    if not SCRIPT.is_file():
        pytest.skip("scripts/ not present")
    spec = importlib.util.spec_from_file_location("profile_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["profile_gpu"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _plan(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


def _check_tables(pg, out: Path, timed: bool) -> tuple[dict, dict]:
    """Columns, row counts against plan.json, and calibrate's readers, for either mode."""
    plan = _plan(out)
    frames = {n: pd.read_csv(out / f"{n}.csv") for n in ("gemm", "attention", "steps")}
    assert tuple(frames["gemm"].columns) == pg.GEMM_COLUMNS
    assert tuple(frames["attention"].columns) == pg.ATTN_COLUMNS
    assert tuple(frames["steps"].columns[: len(pg.STEPS_COLUMNS)]) == pg.STEPS_COLUMNS
    for name in ("gemm", "attention", "steps"):
        assert len(frames[name]) == len(plan[name]) > 0, name
    steps = calibrate.read_steps(out / "steps.csv", require_time=timed)
    assert len(steps.measured_s) == len(plan["steps"])
    assert set(frames["steps"]["model"]) == set(MODELS.split(","))
    for row in frames["steps"].itertuples():
        b = parse_batch(row.batch)
        assert (row.n_req, row.new_tokens) == (len(b), sum(n for _, n in b))
        assert row.kv_tokens == sum(c + n for c, n in b)
    if timed:  # the micro readers need times (rows under the eager floor are dropped, not bad)
        g = calibrate.read_gemm(out / "gemm.csv")
        assert len(g.m) <= len(plan["gemm"])
        # read_attention keeps rows above its eager floor only (and fails on none): the tiny
        # grid has 1024-token prefills so that some are, even on a fast CPU
        assert (frames["attention"]["ms_min"] >= calibrate.ATTN_MIN_MS).any()
        template = jax.tree.map(lambda x: x[0], steps.dims)
        a = calibrate.read_attention(out / "attention.csv", template)
        assert 0 < len(a.measured_s) <= len(plan["attention"])
        for col in ("ms", "ms_min"):
            assert (frames["gemm"][col] > 0).all() and (frames["attention"][col] > 0).all()
        assert (frames["steps"]["step_ms"] > 0).all()
    else:
        assert frames["gemm"]["ms"].isna().all() and frames["steps"]["step_ms"].isna().all()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    return plan, json.loads((out / "meta.json").read_text())


@pytest.mark.skipif(not _has_torch(), reason="torch not installed: the plan path is tested")
def test_dry_run_times_every_path_on_cpu(pg, tmp_path, capsys):
    out = tmp_path / "prof"
    argv = ["--dry-run", "--out", str(out), "--model", MODELS, "--repeats", "2", "--warmup", "1"]
    assert pg.main([*argv, "--eager"]) == 0
    plan, meta = _check_tables(pg, out, timed=True)
    assert meta["device"] == "cpu-dry-run" and meta["cuda_graphs"] is False
    steps = pd.read_csv(out / "steps.csv")
    assert set(pg.EAGER_COLUMNS) <= set(steps.columns) and (steps["eager_ms"] > 0).all()
    assert set(steps["timing"]) == {"cpu_perf_counter"}
    kinds = {"decode_uniform", "decode_mixed", "prefill", "prefill_cached", "prefill_multi"}
    assert kinds | {"mixed"} == set(steps["kind"])
    attn = pd.read_csv(out / "attention.csv")
    assert set(attn["kernel"]) == {"sdpa"}
    assert len(attn.groupby(["nq", "nkv"])) == 2  # one head shape per model
    gemm = pd.read_csv(out / "gemm.csv")
    assert set(gemm["op"]) == {"qkv", "o", "gate_up", "down", "lm_head"}
    if meta["fp8"]:
        fp8 = gemm[gemm["dtype"] == "fp8"]
        assert len(fp8) and (fp8["m"] % 16 == 0).all() and "lm_head" not in set(fp8["op"])
    device = json.loads((out / "device.json").read_text())
    assert device["device"] == "cpu-dry-run" and device["d2d_copy_GBps_read_plus_write"] > 0
    assert len(device["sustained_gemm"]) >= len(plan["device"]["sustained_gemm_mnk"])
    assert (out / "sustained.yaml").read_text().startswith("sustained:\n  hbm_bytes_per_s: ")
    pcie = pd.read_csv(out / "pcie.csv")
    assert (
        tuple(pcie.columns) == pg.PCIE_COLUMNS and list(pcie["MiB"]) == plan["device"]["pcie_MiB"]
    )
    err = capsys.readouterr().err.splitlines()
    for section in ("gemm", "attention", "steps", "device"):
        assert any(line.startswith(f"{section}: ") and "rows ->" in line for line in err)


def test_plan_without_torch(pg, tmp_path, monkeypatch):
    """--dry-run where torch is missing writes the full GPU plan; the tables are readable."""
    monkeypatch.setattr(pg, "import_torch", lambda: None)
    out = tmp_path / "plan"
    assert pg.main(["--dry-run", "--out", str(out), "--model", MODELS, "--eager"]) == 0
    plan, meta = _check_tables(pg, out, timed=False)
    assert meta["device"] == "plan-only" and meta["grid"] == "full"
    assert not (out / "device.json").exists()
    gemm = pd.DataFrame(plan["gemm"])
    full = pg.GRIDS["full"]
    bf16 = gemm[(gemm.dtype == "bf16") & (gemm.op == "qkv") & (gemm.model == "llama-3.1-8b")]
    assert list(bf16["m"]) == list(full.gemm_m)
    assert (gemm[gemm.op == "lm_head"]["m"] <= full.lm_head_m_max).all()
    assert (gemm[gemm.dtype == "fp8"]["m"] % 16 == 0).all()
    q = gemm[(gemm.model == "llama-3.1-8b") & (gemm.dtype == "bf16")].groupby("op").first()
    assert (q.loc["qkv", "k"], q.loc["qkv", "n"]) == (4096, 6144)
    assert (q.loc["gate_up", "n"], q.loc["down", "k"], q.loc["lm_head", "n"]) == (
        28672,
        14336,
        128256,
    )
    kv = [sum(c + n for c, n in s["batch"]) for s in plan["steps"]]
    assert max(kv) <= 262144
    # the same options plan the same batches (a seeded draw), --quick plans fewer
    again = tmp_path / "again"
    assert pg.main(["--plan-only", "--out", str(again), "--model", MODELS, "--eager"]) == 0
    assert _plan(again) == plan
    quick = tmp_path / "quick"
    assert pg.main(["--plan-only", "--quick", "--out", str(quick), "--model", MODELS]) == 0
    assert 0 < len(_plan(quick)["steps"]) < len(plan["steps"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--repeats", "0"], "field '--repeats'"),
        (["--warmup", "x"], "field '--warmup'"),
        (["--what", "gemm,flops"], "field '--what'"),
        (["--dtype", "fp32"], "field '--dtype'"),
        (["--attention", "xformers"], "field '--attention'"),
        (["--model", "no-such-model"], "field '--model'"),
        (["--model", "qwen3-30b-a3b"], "mixture-of-experts"),
        (["--lmit", "3"], "unrecognized arguments: --lmit"),
    ],
)
def test_bad_options_one_line(pg, tmp_path, capsys, args, needle):
    assert pg.main(["--plan-only", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: options: ") and needle in err


def test_bad_out_and_exit_code(tmp_path):
    """The script itself exits 2 with one line (a file where the folder should be)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--plan-only", "--out", str(blocker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "field '--out'" in res.stderr
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--plan-only"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--out" in res.stderr


def test_no_torch_without_dry_run(pg, tmp_path, monkeypatch, capsys):
    """A real run needs torch: one line saying how to get it, exit code 2, nothing written."""
    monkeypatch.setattr(pg, "import_torch", lambda: None)
    out = tmp_path / "o"
    assert pg.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install torch" in err
    assert list(out.iterdir()) == []


def test_sustained_block_loads_into_a_spec(pg, tmp_path):
    """device.json's ceilings become a ``sustained:`` block that the spec loader reads back
    (values, sources, the datasheet-peak check), leaving out what the run did not measure."""
    from hisim_jax.specs import load_hardware

    device = {
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.5.1",
        "copy_MiB": 1024,
        "d2d_copy_GBps_read_plus_write": 2970.0,
        "sustained_gemm": [
            {"dtype": "bf16", "m": 4096, "n": 4096, "k": 4096, "ms": 0.2, "TFLOPs": 700.0},
            {"dtype": "bf16", "m": 8192, "n": 8192, "k": 8192, "ms": 1.4, "TFLOPs": 775.0},
        ],
    }
    shipped = (Path(__file__).resolve().parents[1] / "hardware_specs" / "h100-sxm.yaml").read_text()
    body = shipped.split("\nsustained:")[0].rstrip("\n") + "\n"
    spec_path = tmp_path / "my-h100.yaml"
    spec_path.write_text(body + pg.sustained_yaml(device, "2026-12-02"))
    hw = load_hardware(spec_path)
    assert hw.sustained_hbm_bytes_per_s == pytest.approx(2.97e12)
    assert hw.sustained_bf16_gemm_flops_per_s == pytest.approx(7.75e14)
    assert hw.sustained_fp8_gemm_flops_per_s == 0.0  # not measured: datasheet only
    # an impossible measurement (above the datasheet peak) is the loader's one-line error
    device["sustained_gemm"][1]["TFLOPs"] = 5000.0
    spec_path.write_text(body + pg.sustained_yaml(device, "2026-12-02"))
    with pytest.raises(ValueError, match="sustained.bf16_gemm_flops_per_s"):
        load_hardware(spec_path)


def test_sustained_shapes_follow_the_table_rule(pg):
    """At the full grid every ceiling GEMM has m, n, k >= 4096 (scripts/sustained_ceilings.py)."""
    assert all(min(s) >= 4096 for s in pg.sustained_shapes(8192))
