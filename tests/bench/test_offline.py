"""The offline worker's use of vLLM 0.26.0 objects: built from vLLM's real classes where they can
be built on CPU, so a renamed field fails here rather than on the GPU machine."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest

from vllm_kvpress.bench.figures import COUNTERS
from vllm_kvpress.bench.offline import read_counters, request_timing


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
