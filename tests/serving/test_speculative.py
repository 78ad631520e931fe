"""Speculative decoding (serving/speculative.py and the engine's speculative stretch): the
acceptance pattern, the speed-up bound, token and KV conservation, determinism, the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hisim_jax.cli import app
from hisim_jax.estimator.roofline import Estimator
from hisim_jax.serving.engine import Engine, EngineConfig
from hisim_jax.serving.kvcache import KVCacheConfig
from hisim_jax.serving.scheduler.base import SchedulerConfig
from hisim_jax.serving.speculative import SpeculativeConfig, stretch_seconds
from hisim_jax.serving.workload import LengthDist, Request, synthetic
from hisim_jax.simulation import SimulationOptions, draft_spec, run
from hisim_jax.specs import SpecError, load_model
from tests.serving.test_accounting import check_accounting
from tests.serving.test_engine import FakeCost, check_run, engine

# ----------------------------------------------------------------------------------------
# the acceptance pattern


@pytest.mark.parametrize("rates", [0.0, 0.3, 0.7, 1.0, (0.9, 0.6, 0.2)])
def test_each_verify_step_advances_floor_or_ceil_of_the_expected_tokens(rates):
    spec = SpeculativeConfig.of(3, rates)
    g = spec.tokens_per_step
    a = np.asarray(spec.accept_rates)
    assert g == pytest.approx(1 + a[0] + a[0] * a[1] + a[0] * a[1] * a[2])
    adv = spec.advance(0, 1000)
    assert set(adv.tolist()) <= {int(np.floor(g)), int(np.ceil(g))}
    assert adv.sum() == int(np.floor(1000 * g))  # g per step on average, no drift
    # a stretch cut anywhere continues the same pattern
    assert np.array_equal(np.concatenate([spec.advance(0, 37), spec.advance(37, 963)]), adv)


def test_bad_speculative_configs_are_refused():
    for args in ((0, (0.5,)), (2, (0.5,)), (2, (0.5, 1.5)), (2, (0.5, -0.1))):
        with pytest.raises(ValueError):
            SpeculativeConfig(*args)
    with pytest.raises(ValueError):
        SpeculativeConfig.of(2, 0.5, draft_layers=0)


# ----------------------------------------------------------------------------------------
# the engine on a fake step cost: exact token arrivals


class FakeVerifyCost(FakeCost):
    """FakeCost that also takes a RaggedBatches (the speculative stretch's ragged list)."""

    def step_latency_s(self, batches):
        if hasattr(batches, "sizes"):
            out, i = [], 0
            for n in batches.sizes.tolist():
                c, t = batches.cache_len[i : i + n], batches.new_len[i : i + n]
                out.append(2e-3 + 2e-5 * int(t.sum()) + 1e-8 * int(c.sum()))
                i += n
            return np.array(out)
        return super().step_latency_s(batches)


def spec_engine(k=3, rates=1.0, l1=60_000, **sched):
    cache = KVCacheConfig(l1_tokens=l1, bytes_per_token=1e5, block_tokens=64)
    cfg = EngineConfig(
        SchedulerConfig(**sched), cache, num_layers=32, max_context=32768,
        speculative=SpeculativeConfig.of(k, rates),
    )  # fmt: skip
    return Engine(cfg, FakeVerifyCost(), draft_cost=FakeVerifyCost())


def test_tokens_arrive_k_plus_one_at_a_time_and_the_last_step_is_clipped():
    eng = spec_engine(k=3, rates=1.0)
    res = eng.run([Request(0, 0.0, 500, 10)])
    check_run(eng, [None], res)
    s = res.states[0]
    dec = res.steps.column("kind") == "decode"
    dur = res.steps.column("duration_s")[dec]
    # 1 token from the prefill, then 4 + 4 + 1 (clipped to the output) from three verifies
    assert len(dur) == 3 and list(res.steps.column("new_tokens")[dec]) == [4, 4, 4]
    assert s.finish_s == pytest.approx(s.first_token_s + dur.sum())
    # each verify's gap is shared by the tokens it delivered, each token counted once
    want = [dur[0] / 4] * 4 + [dur[1] / 4] * 4 + [dur[2]]
    assert np.allclose(res.itl_s, want) and res.itl_s.sum() == pytest.approx(dur.sum())
    assert (res.spec_verify_steps, res.spec_tokens) == (3, 9)


def test_a_request_needs_room_for_its_last_verify():
    # prompt 200 + output 10: its last verify holds 209 tokens and writes k + 1 = 9 slots
    for l1, rejected in ((217, True), (218, False)):
        eng = spec_engine(k=8, rates=0.5, l1=l1)
        res = eng.run([Request(0, 0.0, 200, 10)])
        check_run(eng, [None], res)
        s = res.states[0]
        assert s.rejected.startswith("longer than L1 can ever hold") == rejected, s.rejected
        assert res.preemptions == 0


def test_verify_slots_never_overfill_l1_and_rejected_slots_are_freed():
    # 8 x (200 + 60) tokens fit without speculation (2080 + 8 slots at the last step); the
    # last verifies also need 8 x 9 slots, so the replica must preempt, never overfill
    reqs = [Request(i, 0.0, 200, 60) for i in range(8)]
    plain = engine(l1=2120)
    assert plain.run(reqs).preemptions == 0
    eng = spec_engine(k=8, rates=0.5, l1=2120)
    verify, free = eng._spec_tokens_of, []

    def checked(now, dur, ends, steps, log):
        ok = verify(now, dur, ends, steps, log)
        free.append(eng.cache.l1_free())
        return ok

    eng._spec_tokens_of = checked
    res = eng.run(reqs)
    check_run(eng, reqs, res)  # every request ends once; no KV leaked
    assert res.preemptions > 0 and min(free) >= 0


def test_engine_conserves_tokens_and_kv_on_a_busy_workload():
    reqs = synthetic(
        60, 40.0, input=LengthDist.fixed(800), output=LengthDist.fixed(300), seed=3
    ).requests
    for k, rates in ((1, 0.9), (3, (0.8, 0.5, 0.3)), (4, 0.0)):
        eng = spec_engine(k=k, rates=rates, l1=40_000)
        res = eng.run(reqs)
        check_run(eng, reqs, res)
        done = [s for s in res.states if not s.rejected]
        # every output token once: the prefill's first, the verifies' the rest
        assert res.spec_tokens == sum(s.req.output_len - 1 for s in done)
        assert len(res.itl_s) == res.spec_tokens
        assert res.spec_tokens / res.spec_verify_steps <= SpeculativeConfig.of(k, rates).slots


# ----------------------------------------------------------------------------------------
# whole runs with the roofline estimator


def opts(**kw):
    return SimulationOptions.checked({"limit": 50, **kw})


def test_acceptance_zero_costs_more_per_output_token():
    base = run(opts()).summary
    spec = run(opts(speculative_num_steps=3, speculative_accept_rate=0.0)).summary
    assert spec["spec_accept_length"] == 1.0
    assert spec["tpot_s"]["mean"] > base["tpot_s"]["mean"]
    assert base["spec_accept_length"] is None and base["speculative_num_steps"] == 0


def test_full_acceptance_approaches_the_speed_up_bound():
    k, ctx0, out = 3, 2000, 1 + 4 * 100  # every verify yields k + 1: no clipped last step
    work = [Request(0, 0.0, ctx0, out)]
    base = run(opts(), workload=work)
    spec = run(opts(speculative_num_steps=k, speculative_accept_rate=1.0), workload=work)
    assert spec.summary["spec_accept_length"] == k + 1
    speed_up = base.requests["tpot_s"][0] / spec.requests["tpot_s"][0]
    target = Estimator("llama-3.1-8b", "h100-sxm", engine="sglang")
    draft = Estimator(draft_spec(target.model), "h100-sxm", engine="sglang")
    c = ctx0 + out // 2  # the context halfway through the output
    decode = target.step_latency_s([[(c, 1)]])[0]
    verify = target.step_latency_s([[(c, k + 1)]])[0]
    drafts = sum(draft.step_latency_s([[(c + i, 1)]])[0] for i in range(k))
    bound = (k + 1) * decode / (verify + drafts)
    assert 1.5 < speed_up <= bound * 1.005
    assert speed_up == pytest.approx(bound, rel=0.02)


def test_a_list_of_equal_rates_is_the_scalar_rate():
    a = run(opts(speculative_num_steps=3, speculative_accept_rate=0.6))
    b = run(opts(speculative_num_steps=3, speculative_accept_rate=[0.6, 0.6, 0.6]))
    assert a.requests.to_csv() == b.requests.to_csv()
    assert a.steps.to_csv() == b.steps.to_csv()


def test_same_seed_same_outputs():
    o = opts(speculative_num_steps=3, speculative_accept_rate="0.8,0.6,0.4", seed=2)
    a, b = run(o), run(o)
    assert a.requests.to_csv(index=False) == b.requests.to_csv(index=False)
    assert a.steps.to_csv(index=False) == b.steps.to_csv(index=False)


@pytest.mark.parametrize(
    "extra",
    [
        {"l1_fraction": 0.22},  # recompute preemptions
        {"l1_fraction": 0.22, "preemption": "swap", "l2_gb": 64.0},
        {"engine": "vllm", "gpu_memory_utilization": 0.24},  # mixed steps, budget with drafts
        {"pd": "1:1"},
    ],
)
def test_requests_and_kv_are_conserved(extra):
    # open loop: the arrivals overload the replica (a closed-loop client would wait)
    r = run(opts(limit=150, rate_scale=6, speculative_num_steps=2, speculative_accept_rate=0.7,
                 sessions="open", **extra))  # fmt: skip
    req, s = r.requests, r.summary
    assert s["requests_completed"] + s["requests_rejected"] == s["requests_total"] == 150
    assert (req["rejected"] == "").all()
    if "l1_fraction" in extra or "engine" in extra:
        assert s["preemptions"] > 0
    # prefill tokens add up to the rows (a mixed step's decodes compute k + 1 tokens each)
    steps = r.steps.copy()
    mixed = steps["kind"] == "mixed"
    steps.loc[mixed, "running"] *= 3
    check_accounting(type(r)(r.options, r.workload, s, req, steps))
    assert 1 < s["spec_accept_length"] <= 1 + 0.7 + 0.49 + 1e-9


def test_stretch_costs_equal_on_padded_planes_and_ragged_lists():
    target = Estimator("llama-3.1-8b", "h100-sxm", engine="sglang")
    draft = Estimator(draft_spec(target.model, 2), "h100-sxm", engine="sglang")

    class Ragged:  # the same estimator without padded_latency_s: the ragged-list path
        def __init__(self, est):
            self.step_latency_s = est.step_latency_s

    spec = SpeculativeConfig.of(2, 0.5, 2)
    ctx = np.array([5000, 3000, 1200, 40])
    before = np.array([0, 2, 3, 5, 7])
    active = np.array([4, 4, 3, 3, 1])
    padded = np.array([4, 4, 4, 4, 1])
    a = stretch_seconds(target, draft, spec, ctx, before, active, padded)
    b = stretch_seconds(Ragged(target), Ragged(draft), spec, ctx, before, active, padded)
    assert np.allclose(a, b, rtol=1e-12)
    # by hand: step 2 verifies three requests (and a padded dummy) 3 tokens further on
    v = target.step_latency_s([[(5003, 3), (3003, 3), (1203, 3), (0, 3)]])[0]
    d = sum(draft.step_latency_s([[(5003 + i, 1), (3003 + i, 1), (1203 + i, 1), (0, 1)]])[0]
            for i in range(2))  # fmt: skip
    assert a[2] == pytest.approx(v + d, rel=1e-12)


def test_draft_layers_default_to_the_models_mtp_layers_else_one():
    llama = load_model("llama-3.1-8b")
    assert draft_spec(llama).num_layers == 1 and draft_spec(llama, 3).num_layers == 3
    assert SimulationOptions(speculative_num_steps=2).speculative(llama).draft_layers == 1


def test_option_errors_are_one_line():
    for values, fragment in (
        ({"speculative_num_steps": 3, "speculative_accept_rate": 1.2}, "must be <= 1"),
        ({"speculative_num_steps": 3, "speculative_accept_rate": "0.8,0.6"}, "one rate or 3"),
        ({"speculative_num_steps": 3, "speculative_accept_rate": "a,b"}, "invalid value"),
        ({"speculative_num_steps": 3, "speculative_accept_rate": [0.5, None, 1]}, "invalid"),
        ({"speculative_accept_rate": 0.5}, "needs speculative_num_steps >= 1"),
        ({"speculative_draft_layers": 2}, "needs speculative_num_steps >= 1"),
        ({"speculative_num_steps": 65}, "must be <= 64"),
    ):
        with pytest.raises(SpecError, match="speculative") as e:
            SimulationOptions.checked(values)
        assert fragment in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# the CLI


def test_cli_flags_end_to_end(tmp_path):
    runner = CliRunner()
    args = ["simulate", "--speculative-num-steps", "3", "--speculative-accept-rate", "0.7",
            "--limit", "50", "--out", str(tmp_path / "o"), "--format", "json"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["speculative_num_steps"] == 3 and s["options"]["speculative_accept_rate"] == 0.7
    g = 1 + 0.7 + 0.7**2 + 0.7**3
    assert s["speculative"]["expected_accept_length"] == pytest.approx(g)
    assert abs(s["spec_accept_length"] - g) < 0.1  # clipped last steps pull it a little down
    r = runner.invoke(app, [*args[:4], "0.8,0.6,0.4", *args[5:]])
    assert r.exit_code == 0, r.output
    for bad in (["--speculative-accept-rate", "0.8,0.6"], ["--speculative-num-steps", "-2"],
                ["--speculative-accept-rate", "nan"], ["--speculative-draft-layers", "0"]):  # fmt: skip
        r = runner.invoke(app, [*args[:5], *bad, "--limit", "5", "--out", str(tmp_path / "x")])
        assert r.exit_code == 2, (bad, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "speculative" in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_a_search_space_refuses_speculative_options():
    from hisim_jax.search.space import space_from_dict

    for doc in ({"speculative_num_steps": 2}, {"axes": {"speculative_accept_rate": [0.5, 0.8]}}):
        with pytest.raises(SpecError, match="does not model speculative decoding"):
            space_from_dict(doc)
