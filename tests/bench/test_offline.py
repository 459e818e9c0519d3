"""The offline worker's use of vLLM 0.26.0 objects: built from vLLM's real classes where they can
be built on CPU, so a renamed field fails here rather than on the GPU machine."""

import dataclasses
import inspect
import threading
from types import SimpleNamespace

import pytest

from vllm_kvpress.bench.figures import COUNTERS, GAUGES, KV_CACHE_USAGE, NUM_RUNNING, NUM_WAITING
from vllm_kvpress.bench.gauges import PeakGaugeSampler
from vllm_kvpress.bench.offline import read_counters, read_gauges, request_timing


def _request_output(num_tokens: int, metrics):
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(
        index=0, text="", token_ids=list(range(num_tokens)), cumulative_logprob=None, logprobs=None
    )
    return RequestOutput(
        request_id="0",
        prompt=None,
        prompt_token_ids=[1, 2, 3],
        prompt_logprobs=None,
        outputs=[completion],
        finished=True,
        metrics=metrics,
    )


def test_request_timing_reads_vllm_request_state_stats():
    from vllm.v1.metrics.stats import RequestStateStats

    stats = RequestStateStats(
        num_generation_tokens=5,
        arrival_time=1000.0,
        first_token_ts=50.0,
        last_token_ts=50.8,
        first_token_latency=0.25,
    )
    timing = request_timing(_request_output(5, stats))
    assert timing.ttft_s == pytest.approx(0.25)
    assert timing.output_tokens == 5
    assert timing.tpot_s == pytest.approx(0.2)  # 0.8 s over 4 gaps


def test_request_timing_without_metrics_counts_tokens_only():
    timing = request_timing(_request_output(3, None))
    assert (timing.ttft_s, timing.output_tokens, timing.tpot_s) == (None, 3, None)


def test_read_counters_sums_vllm_counters_and_ignores_the_rest():
    from vllm.v1.metrics.reader import Counter, Gauge

    metrics = [
        Counter("vllm:num_preemptions", {"engine": "0"}, 2),
        Counter("vllm:num_preemptions", {"engine": "1"}, 3),
        Counter("vllm:prefix_cache_hits", {"engine": "0"}, 7),
        Gauge("vllm:prefix_cache_queries", {}, 99.0),
        Counter("vllm:request_success", {"engine": "0"}, 11),
    ]
    totals = read_counters(SimpleNamespace(get_metrics=lambda: metrics))
    assert totals == {"vllm:num_preemptions": 5, "vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 7}
    assert set(totals) == set(COUNTERS)


def test_vllm_still_names_what_the_worker_reads():
    """Capacity is read from `llm.llm_engine.vllm_config.cache_config` (see offline.py)."""
    from vllm.config.cache import CacheConfig
    from vllm.entrypoints.llm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    assert {"num_gpu_blocks", "block_size", "kv_cache_size_tokens", "kv_cache_max_concurrency"} <= fields
    assert "self.vllm_config = vllm_config" in inspect.getsource(LLMEngine.__init__)
    assert "self.llm_engine = " in inspect.getsource(LLM.__init__)
    assert "get_metrics" in dir(LLM)
    source = inspect.getsource(LLM.__init__)
    assert 'kwargs["disable_log_stats"] = True' in source  # why offline_engine_kwargs turns it off


def test_read_gauges_reads_vllm_gauges_and_ignores_the_rest():
    from vllm.v1.metrics.reader import Counter, Gauge, Histogram

    metrics = [
        Gauge(NUM_RUNNING, {"engine": "0", "model_name": "m"}, 27.0),
        Gauge(NUM_WAITING, {"engine": "0", "model_name": "m"}, 37.0),
        Gauge(KV_CACHE_USAGE, {"engine": "0", "model_name": "m"}, 0.97),
        Gauge("vllm:num_requests_waiting_by_reason", {"engine": "0", "reason": "capacity"}, 37.0),
        Counter(NUM_RUNNING, {"engine": "0"}, 99),  # only gauges count
        Histogram("vllm:time_to_first_token_seconds", {}, count=1, sum=0.1, buckets={"+Inf": 1}),
    ]
    assert read_gauges(SimpleNamespace(get_metrics=lambda: metrics)) == {
        NUM_RUNNING: 27.0,
        NUM_WAITING: 37.0,
        KV_CACHE_USAGE: 0.97,
    }


def test_read_gauges_through_vllm_metrics_snapshot():
    """What `LLM.get_metrics()` returns (v1/metrics/reader.py), from a gauge registered the way
    vLLM's PrometheusStatLogger registers it, read from a thread other than the one setting it."""
    from prometheus_client import REGISTRY, Gauge
    from vllm.v1.metrics.reader import get_metrics_snapshot

    gauge = Gauge(NUM_RUNNING, "Number of requests in model execution batches.", ["model_name", "engine"])
    try:
        gauge.labels(model_name="m", engine="0").set(5)
        gauge.labels(model_name="m", engine="1").set(2)
        seen = {}
        reader = threading.Thread(
            target=lambda: seen.update(read_gauges(SimpleNamespace(get_metrics=get_metrics_snapshot)))
        )
        reader.start()
        reader.join()
        assert seen[NUM_RUNNING] == 7.0
    finally:
        REGISTRY.unregister(gauge)


def test_vllm_still_names_the_gauges_the_sampler_reads():
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    source = inspect.getsource(PrometheusStatLogger)
    for name in GAUGES:
        assert f'name="{name}"' in source
    record = inspect.getsource(PrometheusStatLogger.record)
    assert "scheduler_stats.num_running_reqs" in record and "kv_cache_usage" in record


def test_sampler_keeps_the_peak_of_what_another_thread_sets():
    """The worker's situation: `generate` moves the gauge on the main thread, the sampler reads."""
    state = {NUM_RUNNING: 0.0, NUM_WAITING: 9.0}
    reads = {"count": 0}
    read_done = threading.Condition()

    def read():
        values = dict(state)
        with read_done:
            reads["count"] += 1
            read_done.notify_all()
        return values

    with PeakGaugeSampler(read, interval_s=0.005) as sampler:
        for running in (3.0, 12.0, 5.0, 0.0):  # admitted, the peak, finishing, done
            state.update({NUM_RUNNING: running, NUM_WAITING: max(0.0, 9.0 - running)})
            with read_done:  # two reads later, one read began after the change
                seen = reads["count"]
                assert read_done.wait_for(lambda seen=seen: reads["count"] >= seen + 2, timeout=10)
    assert sampler.peaks == {NUM_RUNNING: 12.0, NUM_WAITING: 9.0}
    assert sampler.num_samples >= 9 and sampler.error is None


def test_sampler_survives_a_failing_read_and_skips_empty_ones():
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 1:
            return None  # noqa: RET501 - e.g. /metrics did not answer this time
        raise AssertionError("Stat logging disabled")

    with PeakGaugeSampler(read, interval_s=0.005) as sampler:
        pass
    assert sampler.peaks == {} and sampler.num_samples == 0
    assert sampler.error == "AssertionError: Stat logging disabled"
    assert len(calls) == 2  # no reads after the failure
