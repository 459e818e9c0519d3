"""The traffic plan: deterministic in its seed, request shapes within bounds, and every kind of
traffic the soak promises (edge shapes, cancels, streamed and not, bursts above the pool, idle
periods, probe rounds alone and amid the storm)."""

from dataclasses import replace

import pytest

from vllm_kvpress.soak.plan import (
    BURST,
    EDGE,
    END_ROUND,
    START_ROUND,
    STORM_ROUND,
    Idle,
    ProbeRound,
    Traffic,
    TrafficSettings,
    log_uniform_int,
    make_plan,
)

CONTEXT = 8192
POOL = 50_000
LONG = TrafficSettings(duration_s=600.0)
"""The default soak: five cycles of 120 s."""


def _plan(settings=LONG, seed=0, context=CONTEXT, pool=POOL):
    return make_plan(settings, max_model_len=context, vocab_size=49152, kv_capacity_tokens=pool, seed=seed)


def test_the_plan_is_a_function_of_its_seed():
    assert _plan(seed=0) == _plan(seed=0)
    assert _plan(seed=0).requests != _plan(seed=1).requests
    plan = _plan()
    request = plan.requests[10]
    assert plan.prompt_ids(request) == _plan().prompt_ids(request)
    assert plan.prompt_ids(request) != plan.prompt_ids(plan.requests[11])


def test_request_shapes_stay_within_the_context_and_the_limits():
    plan = _plan()
    for r in plan.requests:
        assert LONG.min_prompt_len <= r.prompt_len <= CONTEXT - 1, r
        assert 1 <= r.output_len <= LONG.max_output_len, r
        assert r.prompt_len + r.output_len <= CONTEXT, r
    for r in plan.requests[::50]:
        ids = plan.prompt_ids(r)
        assert len(ids) == r.prompt_len and 0 <= min(ids) and max(ids) < 49152


def test_lengths_cover_every_scale_and_the_edges():
    requests = _plan().requests
    prompts = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    assert min(prompts) < 100 and max(prompts) > CONTEXT / 2  # log-uniform: short and long alike
    assert min(outputs) < 10 and max(outputs) > 1000
    edges = [(r.prompt_len, r.output_len, r.stream) for r in requests if r.kind == EDGE]
    assert edges == [(50, 1, False), (CONTEXT - 1, 1, True), (50, LONG.max_output_len, True)]


def test_about_a_tenth_is_cancelled_mid_stream_and_the_rest_mixes_streamed_and_not():
    requests = _plan().requests
    cancels = [r for r in requests if r.cancel_after_chunks is not None]
    assert len(cancels) / len(requests) == pytest.approx(LONG.cancel_share, abs=0.03)
    for r in cancels:
        assert r.stream and 0 <= r.cancel_after_chunks < r.output_len  # at least one chunk left unread
    assert any(r.cancel_after_chunks == 0 for r in cancels)  # some close before the first token
    rest = [r for r in requests if r.cancel_after_chunks is None and r.kind != EDGE]
    assert sum(r.stream for r in rest) / len(rest) == pytest.approx(LONG.stream_share, abs=0.06)
    assert not any(r.cancel_after_chunks is not None for r in _plan(replace(LONG, cancel_share=0.0)).requests)


def test_every_cycle_is_traffic_with_a_burst_above_the_pool_then_idle():
    plan = _plan()
    phases = plan.phases
    assert phases[0] == START_ROUND and phases[-1] == END_ROUND
    cycles = phases[1:-1]
    assert [type(p) for p in cycles] == [Traffic, Idle] * 5
    assert sum(p.duration_s for p in cycles) == pytest.approx(LONG.duration_s)
    for traffic in cycles[::2]:
        burst = [r for r in traffic.requests if r.kind == BURST]
        assert burst and all(r.offset_s == traffic.burst_at_s for r in burst)
        assert plan.burst_tokens(traffic) >= LONG.burst_overcommit * POOL
        offsets = [r.offset_s for r in traffic.requests]
        assert offsets == sorted(offsets) and offsets[-1] < traffic.duration_s
    assert [p.duration_s for p in cycles[1::2]] == [LONG.idle_s] * 5


def test_the_storm_round_goes_out_amid_the_middle_cycle_after_its_burst():
    plan = _plan()
    traffic = [p for p in plan.phases if isinstance(p, Traffic)]
    storm = [t for t in traffic if t.probe_round_at_s is not None]
    assert [t.cycle for t in storm] == [2]
    assert storm[0].burst_at_s < storm[0].probe_round_at_s < storm[0].duration_s
    rounds = [p for p in plan.phases if isinstance(p, ProbeRound)]
    assert [(r.name, r.alone) for r in rounds] == [("start", True), ("end", True)]
    assert not STORM_ROUND.alone


def test_a_short_soak_is_one_cycle_with_a_shorter_idle_period():
    plan = _plan(replace(LONG, duration_s=30.0))
    idle = [p for p in plan.phases if isinstance(p, Idle)]
    traffic = [p for p in plan.phases if isinstance(p, Traffic)]
    assert len(idle) == len(traffic) == 1
    assert idle[0].duration_s == 15.0 and traffic[0].duration_s == 15.0
    assert traffic[0].probe_round_at_s is not None  # the only cycle is the middle one


def test_bursts_are_capped():
    plan = _plan(replace(LONG, max_burst_requests=7), pool=10**9)
    for traffic in (p for p in plan.phases if isinstance(p, Traffic)):
        assert sum(r.kind == BURST for r in traffic.requests) == 7


def test_log_uniform_integers_stay_in_range_and_spread_over_scales():
    import numpy as np

    rng = np.random.default_rng(0)
    values = [log_uniform_int(rng, 50, 8191) for _ in range(4000)]
    assert min(values) >= 50 and max(values) <= 8191
    below_500 = sum(v < 500 for v in values) / len(values)
    assert below_500 == pytest.approx(np.log(500 / 50) / np.log(8192 / 50), abs=0.03)
    assert log_uniform_int(rng, 5, 5) == 5
