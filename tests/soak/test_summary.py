"""The soak's figures from constructed records: percentiles, outcome counts, leak verdicts, probe
divergence, GPU memory flatness, the criteria and the markdown summary."""

import pytest

from vllm_kvpress.bench.figures import KV_CACHE_USAGE, NUM_RUNNING, NUM_WAITING
from vllm_kvpress.soak import summary
from vllm_kvpress.soak.client import CANCELLED, FAILED, OK
from vllm_kvpress.soak.probes import answer_ids, compare_rounds, first_difference
from vllm_kvpress.soak.sampler import GPU_MEMORY_USED, PREEMPTIONS_TOTAL


def _outcome(status, *, e2e=None, ttft=None, stream=False, cancel=None, http=200, error=None):
    return {"status": status, "e2e_s": e2e, "ttft_s": ttft, "stream": stream, "cancel_after_chunks": cancel,
            "http_status": http, "error": error}


def test_latency_percentiles_take_ok_requests_for_e2e_and_every_first_token_for_ttft():
    outcomes = [_outcome(OK, e2e=float(v), ttft=v / 100, stream=True) for v in range(1, 101)]
    outcomes += [_outcome(CANCELLED, ttft=5.0, stream=True, cancel=3), _outcome(FAILED, http=500, error="x")]
    latency = summary.latency_figures(outcomes)
    assert latency["e2e_s"]["count"] == 100  # neither the cancelled nor the failed request
    assert latency["e2e_s"]["p50"] == pytest.approx(50.5) and latency["e2e_s"]["p99"] == pytest.approx(99.01)
    assert latency["ttft_s"]["count"] == 101 and latency["ttft_s"]["max"] == 5.0  # the cancelled one's too
    assert summary.latency_figures([_outcome(FAILED)])["e2e_s"] is None


def test_outcomes_count_failures_by_status_and_tell_cancels_apart():
    outcomes = [
        _outcome(OK),
        _outcome(OK, cancel=4),  # finished before its cancel
        _outcome(CANCELLED, cancel=0),
        _outcome(FAILED, cancel=2, http=500, error="HTTP 500: boom"),  # failed before its cancel
        _outcome(FAILED, http=500, error="HTTP 500: boom"),
        _outcome(FAILED, http=None, error="ClientConnectionError: reset"),
    ]
    counts = summary.outcome_figures(outcomes)
    assert (counts[OK], counts[CANCELLED], counts[FAILED]) == (2, 1, 3)
    assert counts["failed_not_cancelled"] == 2
    assert (counts["cancel_planned"], counts["finished_before_cancel"]) == (3, 1)
    assert counts["failures"] == [
        {"http_status": 500, "error": "HTTP 500: boom", "count": 2},
        {"http_status": None, "error": "ClientConnectionError: reset", "count": 1},
    ]


def _check(usage_after, *, in_flight=0, nudge=OK, usage_before=None):
    after = None if usage_after is None else {KV_CACHE_USAGE: usage_after, NUM_RUNNING: 0.0, NUM_WAITING: 0.0}
    before = None if usage_before is None else {KV_CACHE_USAGE: usage_before}
    return {"cycle": 0, "t_s": 1.0, "in_flight": in_flight, "before_nudge": before, "after_nudge": after,
            "nudge_status": nudge}


def test_a_leak_is_any_kv_usage_left_after_the_nudge():
    assert summary.leak_verdict(_check(0.0, usage_before=0.2)) == summary.CLEAN  # stale gauge, no leak
    assert summary.leak_verdict(_check(1e-6)) == summary.LEAKED  # one block of a large pool
    assert summary.leak_verdict(_check(0.0, in_flight=2)) == summary.INCONCLUSIVE  # requests never ended
    assert summary.leak_verdict(_check(0.0, nudge=FAILED)) == summary.INCONCLUSIVE
    assert summary.leak_verdict(_check(None)) == summary.INCONCLUSIVE  # /metrics did not answer
    leaks = summary.leak_figures([_check(0.0), _check(0.03), _check(0.0, in_flight=1)])
    assert (leaks["checks"], leaks[summary.CLEAN], leaks[summary.LEAKED], leaks[summary.INCONCLUSIVE]) == (3, 1, 1, 1)
    assert [c["kv_cache_usage"] for c in leaks["per_check"]] == [0.0, 0.03, 0.0]


def test_answers_are_compared_up_to_the_first_stop_token():
    assert answer_ids([5, 6, 2, 9, 9], stop_token_ids=[2]) == [5, 6, 2]
    assert answer_ids([5, 6, 7], stop_token_ids=[2]) == [5, 6, 7]
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_divergence_rate_counts_only_probes_answered_in_both_rounds():
    reference = {"a": [1, 2], "b": [3, 4], "c": [5, 6], "d": [7, 8], "e": None}
    other = {"a": [1, 2], "b": [3, 9], "c": [5, 6], "d": None, "e": [1]}
    comparison = compare_rounds(reference, other)
    assert comparison["compared"] == 3 and comparison["diverged"] == 1
    assert comparison["divergence_rate"] == pytest.approx(1 / 3)
    assert comparison["first_divergent_token"] == {"b": 1} and comparison["not_compared"] == ["d", "e"]
    assert compare_rounds({"a": None}, {"a": [1]})["divergence_rate"] is None


def _probe(name, answer, status=OK, found=None):
    return {"name": name, "status": status, "answer_ids": answer, "found": found}


def test_probe_figures_compare_every_round_with_the_start_round():
    rounds = {
        "start": [_probe("p1", [1, 2], found=True), _probe("p2", [3, 4], found=False)],
        "storm": [_probe("p1", [1, 5], found=False), _probe("p2", [3, 4], found=False)],
        "end": [_probe("p1", [1, 2], found=True), _probe("p2", None, status=FAILED)],
    }
    probes = summary.probe_figures(rounds)
    assert probes["rounds"]["start"] == {"answered": 2, "failed": 0, "needles_found": 1}
    assert probes["rounds"]["storm"]["diverged"] == 1 and probes["rounds"]["storm"]["needles_found"] == 0
    assert probes["rounds"]["end"]["compared"] == 1 and probes["rounds"]["end"]["failed"] == 1
    assert (probes["compared"], probes["diverged"]) == (3, 1)
    assert probes["divergence_rate"] == pytest.approx(1 / 3)


def test_gpu_memory_is_flat_after_warm_up_within_the_slack():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    gib = 1 << 30
    used = [10 * gib, 60 * gib, 60 * gib, None, 60 * gib + summary.MEMORY_FLAT_SLACK_BYTES]
    memory = summary.memory_figures(times, used, after_s=1.0)  # the rise during warm-up does not count
    assert memory["samples"] == 3 and memory["spread_bytes"] == summary.MEMORY_FLAT_SLACK_BYTES
    assert memory["flat"] is True
    used[-1] += 1
    assert summary.memory_figures(times, used, after_s=1.0)["flat"] is False
    assert summary.memory_figures(times, [None] * 5, after_s=1.0) is None  # no NVML
    assert summary.memory_figures(times, used, after_s=None) is None  # no leak check, no warm-up end


def test_series_figures_take_peaks_and_preemptions_since_the_first_sample():
    series = {
        "t_s": [0.0, 1.0, 2.0],
        KV_CACHE_USAGE: [0.0, 0.9, None],
        NUM_RUNNING: [0.0, 12.0, 3.0],
        NUM_WAITING: [0.0, 40.0, 0.0],
        PREEMPTIONS_TOTAL: [5.0, 9.0, 17.0],
        GPU_MEMORY_USED: [None, None, None],
    }
    figures = summary.series_figures(series, warmup_end_s=1.0)
    assert figures["max_kv_cache_usage"] == 0.9 and figures["max_running"] == 12.0
    assert figures["max_waiting"] == 40.0 and figures["preemptions"] == 12.0
    assert figures["gpu_memory"] is None


def _record(*, leaked=0.0, divergent=False, failed=False, exit_code=None):
    outcomes = [_outcome(OK, e2e=1.0), _outcome(CANCELLED, cancel=1, stream=True)]
    if failed:
        outcomes.append(_outcome(FAILED, http=500, error="HTTP 500: boom"))
    storm_answer = [1, 3] if divergent else [1, 2]
    return {
        "outcomes": outcomes,
        "probe_rounds": {"start": [_probe("p", [1, 2])], "storm": [_probe("p", storm_answer)]},
        "leak_checks": [_check(leaked)],
        "series": {"t_s": [0.0, 2.0], PREEMPTIONS_TOTAL: [0.0, 4.0], GPU_MEMORY_USED: [1.0, 1.0]},
        "server_exit_code": exit_code,
        "server_log_tracebacks": 0,
    }


def test_criteria_name_each_fault():
    assert summary.summarize_record(_record())["verdicts"] == {
        "server_stayed_up": True,
        "no_tracebacks_in_server_log": True,
        "no_failed_requests": True,
        "kv_back_to_zero_after_idle": True,
        "probes_identical": True,
        "gpu_memory_flat": True,
        "preempted": True,
    }
    bad = summary.summarize_record(_record(leaked=0.01, divergent=True, failed=True, exit_code=-9))["verdicts"]
    assert [k for k, v in bad.items() if v is False] == [
        "server_stayed_up",
        "no_failed_requests",
        "kv_back_to_zero_after_idle",
        "probes_identical",
    ]


def _result(label, record, kind="plugin"):
    return {
        "config": {"label": label, "kind": kind},
        "status": "ok",
        "engine": {"kv_capacity_tokens": 1000, "num_gpu_blocks": 10, "block_size": 100, "preemption_possible": True},
        "summary": summary.summarize_record(record),
        "plot": f"gauges__{label}.png",
    }


def test_divergence_within_bf16s_meets_the_criterion_and_the_markdown_says_so():
    results = [
        _result("auto", _record(divergent=True), kind="baseline"),
        _result("gear", _record(divergent=True)),
        _result("kivi:bits=2", _record(leaked=0.5)),
        {"config": {"label": "snapkv"}, "status": "failed", "error": "vllm serve exited with code 1:\nboom"},
    ]
    totals = summary.totals(results, bf16_label="auto")
    assert totals["bf16_divergence_rate"] == 1.0
    assert totals["unmet"] == {"auto": [], "gear": [], "kivi:bits=2": ["kv_back_to_zero_after_idle"]}
    assert totals["all_criteria_met"] is False and (totals["ran"], totals["configurations"]) == (3, 4)
    soak = {
        "model": {"name": "smollm2", "real_weights": True},
        "max_model_len": 8192,
        "seed": 0,
        "command": "vllm-kvpress soak --model smollm2",
        "environment": {"gpu_name": "NVIDIA H100 80GB HBM3", "vllm_version": "0.26.0"},
        "traffic": {"duration_s": 600.0, "cycle_s": 120.0, "idle_s": 15.0, "request_rate": 2.0,
                    "burst_overcommit": 1.5, "cancel_share": 0.1, "stream_share": 0.5, "min_prompt_len": 50,
                    "max_output_len": 2000},
        "probes": {"kind": "needle", "probes": [{}], "max_tokens": 32},
        "results": results,
        "totals": totals,
    }
    text = summary.markdown(soak)
    lines = text.splitlines()
    start = lines.index(summary.TABLE_HEADER)
    table = lines[start : lines.index("", start)]
    assert len(table) == 2 + len(results) and len({row.count("|") for row in table}) == 1  # one cell per column
    gear = next(row for row in table if row.startswith("| gear |"))
    assert "| 100.0% (1 of 1) |" in gear and "| 1 / 1 / 0 |" in gear
    assert "| 0 / 1 |" in next(row for row in table if row.startswith("| kivi:bits=2 |"))  # leak checks clean
    assert "| snapkv | failed: vllm serve exited with code 1: |" in text
    assert "not met: kivi:bits=2: kv back to zero after idle" in text
    assert "![gauges over time: gear](gauges__gear.png)" in text
