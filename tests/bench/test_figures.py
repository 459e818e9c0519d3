"""The arithmetic of every reported figure, from made-up engine results."""

import numpy as np
import pytest

from vllm_kvpress.bench.figures import (
    KV_CACHE_USAGE,
    NUM_RUNNING,
    NUM_WAITING,
    RequestTiming,
    add_ratios_vs_bf16,
    capacity_figures,
    concurrency_figures,
    counter_deltas,
    counter_figures,
    gauge_totals,
    latency_figures,
    request_limit,
    summarize,
    throughput_figures,
)


def test_capacity_is_blocks_times_block_size_and_concurrency_divides_by_context():
    # bf16 KV of Llama-3-8B on an H100 at 0.9 utilization, as measured with the GPU kit
    figures = capacity_figures(num_gpu_blocks=27783, block_size=16, max_context_len=8512)
    assert figures["kv_capacity_tokens"] == 444528
    assert figures["max_concurrency"] == pytest.approx(444528 / 8512)
    assert 52 < figures["max_concurrency"] < 53  # why 64 long prompts do not all fit in bf16


def test_throughput_counts_prompt_and_output_tokens():
    figures = throughput_figures(
        wall_s=20.0, prompt_tokens=64 * 8000, output_tokens=64 * 512, num_requests=64
    )
    assert figures["output_tokens_per_s"] == pytest.approx(64 * 512 / 20)
    assert figures["total_tokens_per_s"] == pytest.approx(64 * 8512 / 20)
    assert figures["requests_per_s"] == pytest.approx(3.2)
    with pytest.raises(ValueError, match="positive"):
        throughput_figures(wall_s=0.0, prompt_tokens=1, output_tokens=1, num_requests=1)


def test_tpot_excludes_the_first_token():
    assert RequestTiming(ttft_s=0.5, output_tokens=11, decode_s=1.0).tpot_s == pytest.approx(0.1)
    assert RequestTiming(ttft_s=0.5, output_tokens=1, decode_s=0.0).tpot_s is None
    assert RequestTiming(ttft_s=None, output_tokens=5).tpot_s is None


def test_percentiles_match_numpy_and_skip_missing_values():
    values = list(range(1, 101))
    summary = summarize([*values, None])
    assert summary["p50"] == pytest.approx(np.percentile(values, 50)) == pytest.approx(50.5)
    assert summary["p90"] == pytest.approx(90.1) and summary["p99"] == pytest.approx(99.01)
    assert summary["count"] == 100 and summary["max"] == 100 and summary["mean"] == pytest.approx(50.5)
    assert summarize([None, None]) is None


def test_latency_figures_pool_inter_token_gaps_of_all_requests():
    timings = [
        RequestTiming(0.1, 3, 0.2, itl_s=(0.1, 0.1), e2e_s=0.3),
        RequestTiming(0.3, 3, 0.4, itl_s=(0.2, 0.2), e2e_s=0.7),
    ]
    figures = latency_figures(timings)
    assert figures["itl_s"]["count"] == 4 and figures["itl_s"]["p50"] == pytest.approx(0.15)
    assert figures["tpot_s"]["p50"] == pytest.approx(0.15)
    assert figures["ttft_s"]["max"] == pytest.approx(0.3)
    assert figures["e2e_s"]["mean"] == pytest.approx(0.5)


def test_counters_are_differenced_per_workload():
    before = {"vllm:num_preemptions": 3, "vllm:prefix_cache_queries": 1000, "vllm:prefix_cache_hits": 100}
    after = {"vllm:num_preemptions": 5, "vllm:prefix_cache_queries": 3000, "vllm:prefix_cache_hits": 1100}
    figures = counter_figures(counter_deltas(before, after))
    assert figures["num_preemptions"] == 2
    assert figures["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert counter_figures({"vllm:prefix_cache_queries": 0})["prefix_cache_hit_rate"] is None


def test_gauges_sum_requests_over_engines_and_take_the_fullest_cache():
    samples = [
        (NUM_RUNNING, 20.0),
        (NUM_RUNNING, 7.0),  # a second engine (data parallel)
        (NUM_WAITING, 3.0),
        (KV_CACHE_USAGE, 0.5),
        (KV_CACHE_USAGE, 0.9),
        ("vllm:num_requests_waiting_by_reason", 3.0),
        ("vllm:engine_sleep_state", 1.0),
    ]
    assert gauge_totals(samples) == {NUM_RUNNING: 27.0, NUM_WAITING: 3.0, KV_CACHE_USAGE: 0.9}
    assert gauge_totals([]) == {}


def test_observed_concurrency_is_saturated_only_at_the_request_limit():
    assert request_limit(64, 256) == 64
    assert request_limit(64, 256, None) == 64  # online without --max-concurrency
    assert request_limit(300, 256, 8) == 8
    peaks = {NUM_RUNNING: 27.0, NUM_WAITING: 37.0, KV_CACHE_USAGE: 0.98}
    figures = concurrency_figures(peaks, num_samples=40, interval_s=0.25, limit=64)
    assert figures == {
        "max_running_requests": 27,
        "max_waiting_requests": 37,
        "max_kv_cache_usage": 0.98,
        "request_limit": 64,
        "saturated": False,
        "num_samples": 40,
        "sample_interval_s": 0.25,
    }
    assert concurrency_figures({NUM_RUNNING: 64.0}, num_samples=1, interval_s=0.25, limit=64)["saturated"]
    nothing = concurrency_figures({}, num_samples=0, interval_s=0.25, limit=64)
    assert nothing["max_running_requests"] is None and nothing["saturated"] is None


def _row(label, workload, tokens, output_tps, status="ok", mode="offline", running=None):
    row = {
        "config": {"label": label},
        "status": status,
        "mode": mode,
        "workload": {"name": workload, "model": "llama-3.1-8b", "max_model_len": 8704},
        "capacity": {"kv_capacity_tokens": tokens},
        "throughput": {"output_tokens_per_s": output_tps, "total_tokens_per_s": output_tps * 10},
    }
    if running is not None:
        row["concurrency"] = {"max_running_requests": running}
    return row


def test_ratios_are_taken_against_bf16_of_the_same_workload():
    rows = [
        _row("auto", "A", 444528, 1000.0, running=27),
        _row("fp8", "A", 889056, 1400.0, running=54),
        _row("auto", "B", 444528, 2000.0, status="failed"),
        _row("gear", "B", 1458000, 1500.0, running=64),
        _row("auto", "C", 444528, 800.0, mode="online"),
        _row("fp8", "C", 889056, 1200.0),
    ]
    add_ratios_vs_bf16(rows)
    assert rows[0]["ratio_vs_bf16"] == {
        "kv_capacity": 1.0,
        "max_running_requests": 1.0,
        "output_tokens_per_s": 1.0,
        "total_tokens_per_s": 1.0,
    }
    assert rows[1]["ratio_vs_bf16"]["kv_capacity"] == pytest.approx(2.0)
    assert rows[1]["ratio_vs_bf16"]["max_running_requests"] == pytest.approx(2.0)
    assert rows[1]["ratio_vs_bf16"]["output_tokens_per_s"] == pytest.approx(1.4)
    # no successful bf16 row for B, and C's bf16 row was measured in another mode
    assert rows[3]["ratio_vs_bf16"] == {
        "kv_capacity": None,
        "max_running_requests": None,
        "output_tokens_per_s": None,
        "total_tokens_per_s": None,
    }
    assert rows[5]["ratio_vs_bf16"]["kv_capacity"] is None
    # rows from before observed concurrency was measured: no ratio, the others unchanged
    old = [_row("auto", "A", 444528, 1000.0), _row("fp8", "A", 889056, 1400.0, running=54)]
    add_ratios_vs_bf16(old)
    assert old[1]["ratio_vs_bf16"]["max_running_requests"] is None
    assert old[1]["ratio_vs_bf16"]["kv_capacity"] == pytest.approx(2.0)
