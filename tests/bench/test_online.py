"""Online mode: the load generator and server lifecycle against a fake `vllm serve` speaking
vLLM's stream format, and the parsing of vLLM's Prometheus metrics."""

import asyncio
import io
import subprocess
import sys
import time

import numpy as np
import pytest

from vllm_kvpress.bench import online, results, runner
from vllm_kvpress.bench.configs import resolve_configs
from vllm_kvpress.bench.loadgen import arrival_offsets, run_load
from vllm_kvpress.bench.workloads import make_prompts


def test_parse_metrics_reads_vllm_prometheus_text():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    # as vLLM 0.26.0's PrometheusStatLogger registers them (v1/metrics/loggers.py)
    info = Gauge("vllm:cache_config_info", "", ["block_size", "num_gpu_blocks", "engine"], registry=registry)
    info.labels(block_size="16", num_gpu_blocks="27783", engine="0").set(1)
    preemptions = Counter("vllm:num_preemptions", "", ["engine"], registry=registry)
    preemptions.labels(engine="0").inc(3)
    preemptions.labels(engine="1").inc(4)
    Counter("vllm:prefix_cache_hits", "", ["engine"], registry=registry).labels(engine="0").inc(10)
    counters, cache_info = online.parse_metrics(generate_latest(registry).decode())
    assert counters == {
        "vllm:num_preemptions": 7,
        "vllm:prefix_cache_queries": 0,
        "vllm:prefix_cache_hits": 10,
    }
    assert cache_info["num_gpu_blocks"] == "27783" and cache_info["block_size"] == "16"


def test_parse_gauges_reads_vllm_prometheus_text():
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    # as vLLM 0.26.0's PrometheusStatLogger registers them (v1/metrics/loggers.py)
    running = Gauge("vllm:num_requests_running", "", ["model_name", "engine"], registry=registry)
    running.labels(model_name="bench", engine="0").set(30)
    running.labels(model_name="bench", engine="1").set(4)
    Gauge("vllm:num_requests_waiting", "", ["engine"], registry=registry).labels(engine="0").set(2)
    usage = Gauge("vllm:kv_cache_usage_perc", "", ["engine"], registry=registry)
    usage.labels(engine="0").set(0.25)
    usage.labels(engine="1").set(0.75)
    Gauge("vllm:num_requests_waiting_by_reason", "", ["reason"], registry=registry).labels(reason="x").set(9)
    assert online.parse_gauges(generate_latest(registry).decode()) == {
        "vllm:num_requests_running": 34,
        "vllm:num_requests_waiting": 2,
        "vllm:kv_cache_usage_perc": 0.75,
    }


def test_poisson_arrivals_are_seeded_and_have_the_requested_rate():
    offsets = arrival_offsets(4000, request_rate=4.0, seed=0)
    assert offsets == arrival_offsets(4000, request_rate=4.0, seed=0)
    assert np.all(np.diff(offsets) > 0)
    assert 4000 / offsets[-1] == pytest.approx(4.0, rel=0.05)
    assert arrival_offsets(3, request_rate=float("inf"), seed=0) == [0.0, 0.0, 0.0]


@pytest.fixture
def fake_server(fake_serve_prefix, tmp_path):
    port = online.free_port()
    server = online.ServerProcess(
        argv=[*fake_serve_prefix, "model", "--port", str(port), "--max-model-len", "8704"],
        log_path=tmp_path / "server.log",
        base_url=f"http://127.0.0.1:{port}",
    )
    server.start()
    server.wait_healthy(timeout_s=60)
    yield server
    server.stop()
    assert server.process.poll() is not None  # stopped by its process group


def test_load_generator_chains_turns_and_times_every_token(fake_server, small_workloads):
    workload = small_workloads("multi-turn")[0]
    prompts = make_prompts(workload, seed=0)
    load = asyncio.run(
        run_load(
            fake_server.base_url,
            "bench",
            workload,
            prompts,
            request_rate=float("inf"),
            max_concurrency=2,
            seed=0,
        )
    )
    assert load.errors == []
    assert load.num_requests == workload.num_requests * workload.turns
    assert load.prompt_tokens == workload.num_requests * sum(workload.prompt_lens)
    assert load.output_tokens == load.num_requests * workload.output_len
    for timing in load.timings:
        assert timing.output_tokens == workload.output_len
        assert len(timing.itl_s) == workload.output_len - 1
        assert 0 < timing.ttft_s <= timing.e2e_s
        assert timing.tpot_s == pytest.approx(sum(timing.itl_s) / len(timing.itl_s))


def test_long_prompts_stream_through_the_event_parser(fake_server, small_workloads):
    # the first event repeats the prompt's ids: at 8,000 tokens longer than aiohttp's line limit
    workload = small_workloads("A")[0]
    prompts = make_prompts(workload, seed=0)
    long_prompts = type(prompts)(first_prompts=[list(range(20000))] * workload.num_requests)
    load = asyncio.run(
        run_load(
            fake_server.base_url,
            "bench",
            workload,
            long_prompts,
            request_rate=float("inf"),
            max_concurrency=None,
            seed=0,
        )
    )
    assert load.errors == [] and load.prompt_tokens == 20000 * workload.num_requests


def test_online_run_measures_each_configuration_on_its_own_server(
    tmp_path, fake_serve_prefix, bench_request, small_workloads
):
    out = io.StringIO()
    run_dir = runner.run_bench(
        bench_request(
            tmp_path,
            (),
            workloads=small_workloads("A,multi-turn"),
            mode="online",
            request_rate=50.0,
            configs=resolve_configs(["gear", 'kivi:{"bits": 2}'], baselines=["auto", "fp8"]),
            serve_prefix=fake_serve_prefix,
            out=out,
        )
    )
    rows = {(r["config"]["label"], r["workload"]["name"]): r for r in results.load_combined(run_dir)["rows"]}
    assert {k: r["status"] for k, r in rows.items()} == {
        (c, w): "failed" if c.startswith("kivi") else "ok"
        for c in ("auto", "fp8", "gear", "kivi:bits=2")
        for w in ("long-prompt", "multi-turn")
    }
    assert "kivi fails to start" in rows[("kivi:bits=2", "long-prompt")]["error"]
    fp8 = rows[("fp8", "long-prompt")]
    assert fp8["capacity"]["kv_capacity_tokens"] == 2000 * 16  # from vllm:cache_config_info
    assert fp8["ratio_vs_bf16"]["kv_capacity"] == pytest.approx(2.0)
    assert fp8["latency"]["itl_s"]["count"] > 0 and fp8["latency"]["ttft_s"]["p99"] > 0
    assert rows[("gear", "multi-turn")]["counters"]["prefix_cache_hit_rate"] == pytest.approx(0.5, abs=0.01)
    serve = rows[("gear", "long-prompt")]["engine"]["vllm_serve_argv"]
    assert serve[:3] == ["vllm", "serve", "vllm_kvpress/bench/model_configs/llama-3.1-8b"]
    assert serve[serve.index("--kv-compression") + 1] == "gear"
    assert "ITL p50 / p99 (ms)" in (run_dir / results.TABLE_FILE).read_text()
    # sampled from the server's /metrics while the load ran (the fake counts requests in flight)
    for (label, _), row in rows.items():
        if row["status"] == "ok":
            concurrency = row["concurrency"]
            assert concurrency["request_limit"] == 3 and concurrency["num_samples"] >= 2
            assert 1 <= concurrency["max_running_requests"] <= 3, (label, concurrency)
            assert concurrency["max_waiting_requests"] == 0
    assert "max running (observed)" in (run_dir / results.TABLE_FILE).read_text()


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    server = online.ServerProcess(
        argv=[sys.executable, "-c", "print('boom: no GPU'); raise SystemExit(3)"],
        log_path=tmp_path / "s.log",
        base_url="http://127.0.0.1:9",
    )
    server.start()
    with pytest.raises(online.ServerError, match="(?s)exited with code 3.*boom: no GPU"):
        server.wait_healthy(timeout_s=30)


def test_stop_ends_the_whole_process_group(tmp_path):
    child = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"
    )
    server = online.ServerProcess(
        argv=[sys.executable, "-c", child], log_path=tmp_path / "s.log", base_url=""
    )
    server.start()
    pgid = server.process.pid

    def group_members() -> list[str]:
        listing = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout
        return [
            pid
            for pid, group, state in (line.split() for line in listing.splitlines())
            if group == str(pgid) and not state.startswith("Z")
        ]

    deadline = time.monotonic() + 20
    while len(group_members()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(group_members()) == 2  # the server and its child, like vllm serve and its engine core
    server.stop()
    assert group_members() == []
