"""The driver against the stand-in server: every planned request ends as the plan and the server's
faults say it must (ok, cancelled by the client, failed with its status and body), the client's
cancels really close the connection, the gauges are sampled over time, leak checks see usage left
behind, and probe rounds catch answers that change under load."""

from dataclasses import replace

import pytest

from vllm_kvpress.soak import summary
from vllm_kvpress.soak.client import CANCELLED, FAILED, OK
from vllm_kvpress.soak.driver import NUDGE_PROMPT_IDS
from vllm_kvpress.soak.probes import PROBE_MAX_TOKENS
from vllm_kvpress.soak.sampler import PREEMPTIONS_TOTAL

from .conftest import SMALL_TRAFFIC, drive, small_plan, small_probes
from .stand_in_server import INJECTED_FAILURE, StandIn


def _sparing_modulus(plan, probes) -> int:
    """A failure rule (prompt id sum divisible by it) that fails some planned requests and spares
    the probes and the nudge, so that both can be checked on their own."""
    spared = [sum(p.prompt_ids) for p in probes.probes] + [sum(NUDGE_PROMPT_IDS)]
    for modulus in range(5, 100):
        hit = [r for r in plan.requests if sum(plan.prompt_ids(r)) % modulus == 0]
        if hit and all(s % modulus for s in spared):
            return modulus
    raise AssertionError("no modulus fails a planned request and spares the probes")


@pytest.fixture(scope="module")
def storm():
    """One soak of the small plan against a stand-in that fails some requests: (plan, stand-in, record, series)."""
    plan, probes = small_plan(), small_probes()
    stand_in = StandIn(fail_modulus=_sparing_modulus(plan, probes))
    record, series = drive(stand_in, plan, probes)
    return plan, stand_in, record, series


def test_every_request_ends_as_the_plan_and_the_server_say(storm):
    plan, stand_in, record, _ = storm
    assert [o["index"] for o in record.outcomes] == [r.index for r in plan.requests]
    expected = {}
    for r in plan.requests:
        if sum(plan.prompt_ids(r)) % stand_in.fail_modulus == 0:
            expected[r.index] = FAILED
        elif r.cancel_after_chunks is not None:
            expected[r.index] = CANCELLED  # one token per chunk: the stream always has more to send
        else:
            expected[r.index] = OK
    assert {o["index"]: o["status"] for o in record.outcomes} == expected
    assert set(expected.values()) == {OK, CANCELLED, FAILED}
    for o in record.outcomes:
        if o["status"] == FAILED:
            assert o["http_status"] == 500 and INJECTED_FAILURE in o["error"]
        elif o["status"] == OK:
            assert o["output_tokens"] == o["output_len"] and o["e2e_s"] > 0
            assert (o["ttft_s"] is not None) == o["stream"]
        else:
            assert o["chunks"] == o["cancel_after_chunks"] < o["output_len"]


def test_cancelled_streams_are_closed_on_the_server(storm):
    _, stand_in, record, _ = storm
    cancelled = sum(o["status"] == CANCELLED for o in record.outcomes)
    assert cancelled > 0 and stand_in.aborted == cancelled
    assert any(o["status"] == CANCELLED and o["cancel_after_chunks"] == 0 for o in record.outcomes)


def test_gauges_are_sampled_over_time_and_preemptions_counted(storm):
    _, stand_in, record, series = storm
    times = series["t_s"]
    assert len(times) > 20 and times == sorted(times) and times[-1] >= record.wall_s * 0.9
    figures = summary.series_figures(series, warmup_end_s=record.leak_checks[0]["t_s"])
    assert figures["max_kv_cache_usage"] == 1.0  # the bursts overfill the stand-in's pool
    assert figures["max_running"] == stand_in.max_running and figures["max_waiting"] > 0
    assert stand_in.preemptions > 0 and figures["preemptions"] == stand_in.preemptions
    assert series[PREEMPTIONS_TOTAL][0] == 0
    assert figures["gpu_memory"] is None  # no GPU here


def test_after_each_idle_period_kv_usage_is_back_to_zero(storm):
    _, _, record, _ = storm
    assert [c["cycle"] for c in record.leak_checks] == [0, 1]
    leaks = summary.leak_figures(record.leak_checks)
    assert leaks[summary.CLEAN] == 2
    for check in record.leak_checks:
        assert check["in_flight"] == 0 and check["nudge_status"] == OK


def test_probe_rounds_run_alone_and_amid_the_storm_and_agree(storm):
    _, stand_in, record, _ = storm
    assert list(record.probe_rounds) == ["start", "storm", "end"]
    for probes in record.probe_rounds.values():
        assert [p["status"] for p in probes] == [OK] * 4
        assert all(len(p["answer_ids"]) == PROBE_MAX_TOKENS for p in probes)
    assert summary.probe_figures(record.probe_rounds)["divergence_rate"] == 0.0
    rounds = {e["round"]: e for e in record.events if e["event"] == "probes"}
    bursts = [e for e in record.events if e["event"] == "burst"]
    assert rounds["start"]["t_s"] < bursts[0]["t_s"] < bursts[1]["t_s"] < rounds["storm"]["t_s"] < rounds["end"]["t_s"]


def test_the_summary_of_a_record_names_the_failures(storm):
    _, _, record, series = storm
    figures = summary.summarize_record({**record.to_dict(), "series": series})
    failed = [o for o in record.outcomes if o["status"] == FAILED]
    assert figures["requests"]["failures"] == [
        {"http_status": 500, "error": failed[0]["error"][: summary.ERROR_GROUP_CHARS], "count": len(failed)}
    ]
    assert figures["verdicts"]["no_failed_requests"] is False


def test_leaks_and_load_dependent_answers_are_caught():
    plan, probes = small_plan(replace(SMALL_TRAFFIC, duration_s=1.5)), small_probes()
    stand_in = StandIn(leak_per_request=0.001, diverge_when_busy=True)
    record, series = drive(stand_in, plan, probes)
    figures = summary.summarize_record({**record.to_dict(), "series": series})
    assert figures["leak_checks"][summary.LEAKED] == 1
    # what every request but the end round's probes (after the check) left behind
    left_at_check = stand_in.leaked - len(probes.probes) * stand_in.leak_per_request
    assert figures["leak_checks"]["per_check"][0]["kv_cache_usage"] == pytest.approx(left_at_check)
    probes = figures["probes"]
    assert probes["rounds"]["storm"]["diverged"] > 0  # probes sent together change each other's tokens
    assert probes["rounds"]["end"]["diverged"] == 0  # alone again, as at the start
    assert figures["verdicts"]["kv_back_to_zero_after_idle"] is False
    assert figures["verdicts"]["probes_identical"] is False
