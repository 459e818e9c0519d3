"""`vllm-kvpress soak --side-by-side` against stand-in servers started as `vllm serve` would be: every
server at once, each on its own port with its share of --gpu-memory-utilization, all driven together
and stopped at the end; a server that fails to start, an error or Ctrl-C/SIGTERM stops every one; a
memory split that cannot fit is refused before anything starts or is written."""

import json
import os
import signal
import time

import pytest

from vllm_kvpress.bench.configs import EngineOptions
from vllm_kvpress.bench.figures import KV_CACHE_USAGE
from vllm_kvpress.bench.online import ServerProcess, process_group_alive
from vllm_kvpress.errors import InputError
from vllm_kvpress.soak import runner, summary
from vllm_kvpress.soak.client import OK
from vllm_kvpress.soak.runner import RECORDS_DIR, SOAK_FILE, SUMMARY_FILE, SoakRequest, run_soak
from vllm_kvpress.soak.side_by_side import (
    CONTEXT_BYTES,
    GIB,
    START_ONE_AFTER_ANOTHER,
    START_TOGETHER,
    check_fits_gpu,
    split_memory,
)

from .conftest import small_soak_request
from .stand_in_server import COMPRESSED_POOL_FACTOR, StandIn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def side_by_side_request(tmp_path, specs, *, kv_cache_memory_bytes=None, **changes) -> SoakRequest:
    return small_soak_request(
        tmp_path, specs, "vllm-kvpress soak --side-by-side", side_by_side=True,
        engine=EngineOptions(gpu_memory_utilization=0.9, kv_cache_memory_bytes=kv_cache_memory_bytes), **changes,
    )


class StartedServers(list):
    """Every ServerProcess started while it is installed, to check afterwards that none is left."""

    def install(self, monkeypatch) -> "StartedServers":
        start = ServerProcess.start

        def recording_start(server):
            start(server)
            self.append(server)

        monkeypatch.setattr(ServerProcess, "start", recording_start)
        return self

    def alive(self) -> list[str]:
        return [s.base_url for s in self if s.process.poll() is None or process_group_alive(s.process.pid)]

    def stop(self) -> None:
        """After the test: whatever the code under test left running (none, where it passes)."""
        for server in self:
            server.stop()


@pytest.fixture
def started(monkeypatch):
    servers = StartedServers().install(monkeypatch)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("side_by_side")
    with pytest.MonkeyPatch.context() as monkeypatch:
        started = StartedServers().install(monkeypatch)
        request = side_by_side_request(tmp_path, ["gear"], kv_cache_memory_bytes=1 << 20)
        try:
            soak = run_soak(request)
        except BaseException:
            started.stop()
            raise
    yield request.out, soak, started
    started.stop()


def test_every_server_gets_its_own_port_and_its_share_of_the_gpu(soaked):
    _, soak, started = soaked
    assert soak["side_by_side"]["servers"] == 2 and soak["side_by_side"]["start"] == START_TOGETHER
    assert soak["side_by_side"]["per_server_utilization"] == 0.45 and soak["engine"]["gpu_memory_utilization"] == 0.9
    ports = set()
    for result in soak["results"]:
        argv = result["vllm_serve_argv"]
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"
        assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1 << 20)
        ports.add(argv[argv.index("--port") + 1])
    assert len(ports) == 2 and len(started) == 2


def test_both_servers_are_driven_at_once_and_each_gets_its_own_record(soaked):
    out, soak, _ = soaked
    results = {r["config"]["label"]: r for r in soak["results"]}
    assert [r["config"]["label"] for r in soak["results"]] == ["auto", "gear"]  # bf16 first, the reference
    assert {label: r["status"] for label, r in results.items()} == {"auto": "ok", "gear": "ok"}
    # each plan and record is its own server's: the stand-in serves a compressed method a larger pool
    assert results["auto"]["engine"]["kv_capacity_tokens"] == StandIn.capacity_tokens
    assert results["gear"]["engine"]["kv_capacity_tokens"] == COMPRESSED_POOL_FACTOR * StandIn.capacity_tokens
    spans = []
    for result in results.values():
        record = json.loads((out / result["record"]).read_text())
        requests = result["summary"]["requests"]
        assert requests["requests"] == result["plan"]["num_requests"] == len(record["outcomes"])
        assert requests[OK] > 0 and requests["failed_not_cancelled"] == 0
        assert result["summary"]["leak_checks"][summary.CLEAN] == 1
        assert result["summary"]["probes"]["divergence_rate"] == 0.0
        assert result["summary"]["verdicts"]["server_stayed_up"] is True
        assert max(v for v in record["series"][KV_CACHE_USAGE] if v is not None) > 0  # its own server's gauges
        assert (out / result["plot"]).read_bytes().startswith(PNG_SIGNATURE)
        sent = [o["sent_at_s"] for o in record["outcomes"] if o.get("sent_at_s") is not None]
        spans.append((min(sent), max(sent)))
    (a_first, a_last), (b_first, b_last) = spans
    assert a_first < b_last and b_first < a_last, spans  # on one time origin the two soaks overlap
    assert soak["totals"]["ran"] == 2 and soak["totals"]["bf16_divergence_rate"] == 0.0


def test_the_results_are_the_sequential_modes_and_say_what_the_memory_series_is(soaked):
    out, soak, _ = soaked
    assert json.loads((out / SOAK_FILE).read_text()) == soak
    assert sorted(p.name for p in (out / RECORDS_DIR).iterdir()) == ["auto.json", "gear.json"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["auto.log", "gear.log"]
    assert "sum of every server" in soak["side_by_side"]["gpu_memory_series"]
    text = (out / SUMMARY_FILE).read_text()
    assert summary.TABLE_HEADER in text and "![gauges over time: gear](gauges__gear.png)" in text
    assert "side by side on one GPU: 2 servers at once, started together" in text
    assert "the sum of all servers" in text and "split into 0.45 per server" in text


def test_every_server_is_stopped_at_the_end(soaked):
    _, _, started = soaked
    assert len(started) == 2 and started.alive() == []


@pytest.mark.parametrize("kv_cache_memory_bytes, start", [(1 << 20, START_TOGETHER), (None, START_ONE_AFTER_ANOTHER)])
def test_a_server_that_fails_to_start_stops_the_others(tmp_path, started, kv_cache_memory_bytes, start):
    request = side_by_side_request(tmp_path, ["gear", 'kivi:{"bits": 2}'], kv_cache_memory_bytes=kv_cache_memory_bytes)
    soak = run_soak(request)
    assert soak["side_by_side"]["start"] == start
    statuses = {r["config"]["label"]: r["status"] for r in soak["results"]}
    assert statuses == {"auto": "stopped", "gear": "stopped", "kivi:bits=2": "failed"}
    results = {r["config"]["label"]: r for r in soak["results"]}
    assert "kivi fails to start" in results["kivi:bits=2"]["error"]
    assert "every server is stopped when one fails to start, and kivi:bits=2 did" in results["auto"]["error"]
    assert len(started) == 3 and started.alive() == []
    assert soak["totals"]["all_criteria_met"] is False and soak["totals"]["ran"] == 0
    assert "stopped: not soaked" in (request.out / SUMMARY_FILE).read_text()


def test_one_after_another_each_server_is_healthy_before_the_next_starts(tmp_path, monkeypatch, started):
    healthy_when_next_started = []
    start = ServerProcess.start  # the recording one

    def checking_start(server):
        healthy_when_next_started.extend(s.process.poll() is None for s in started)
        start(server)

    monkeypatch.setattr(ServerProcess, "start", checking_start)
    monkeypatch.setattr(runner, "_drive_all", _raise(KeyboardInterrupt))  # starting is all this test needs
    with pytest.raises(KeyboardInterrupt):
        run_soak(side_by_side_request(tmp_path, ["gear"]))
    assert len(started) == 2 and healthy_when_next_started == [True]
    assert started.alive() == []


def _raise(exception):
    def drive_all(drivers):
        raise exception

    return drive_all


def test_ctrl_c_while_driving_stops_every_server(tmp_path, monkeypatch, started):
    monkeypatch.setattr(runner, "_drive_all", _raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_soak(side_by_side_request(tmp_path, ["gear"], kv_cache_memory_bytes=1 << 20))
    assert len(started) == 2 and started.alive() == []


def test_sigterm_while_driving_stops_every_server(tmp_path, monkeypatch, started):

    def terminated(drivers):
        # without the runner's handler SIGTERM would end this test process and leave the servers running
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not interrupt the soak")

    monkeypatch.setattr(runner, "_drive_all", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_soak(side_by_side_request(tmp_path, ["gear"], kv_cache_memory_bytes=1 << 20))
    assert len(started) == 2 and started.alive() == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_driver_that_raises_fails_its_configuration_only(tmp_path, monkeypatch, started):
    original = runner.Driver.run
    urls = []

    async def run(driver):
        urls.append(driver.base_url)
        if len(urls) == 2:
            raise RuntimeError("driver broke")
        return await original(driver)

    monkeypatch.setattr(runner.Driver, "run", run)
    soak = run_soak(side_by_side_request(tmp_path, ["gear"], kv_cache_memory_bytes=1 << 20))
    statuses = {r["config"]["label"]: r["status"] for r in soak["results"]}
    assert statuses == {"auto": "ok", "gear": "failed"}
    assert soak["results"][1]["error"].startswith("RuntimeError: driver broke")
    assert started.alive() == []


# The memory split: the arithmetic (also checked by the CLI) and the fit on the GPU, before any start.


def test_the_split_is_even_and_rounded_down():
    split = split_memory(3, 0.9, kv_cache_memory_bytes=None)
    assert split.per_server_utilization == 0.3 and split.start == START_ONE_AFTER_ANOTHER
    split = split_memory(6, 0.85, kv_cache_memory_bytes=1 << 30)
    assert split.per_server_utilization == 0.1416 and split.start == START_TOGETHER
    assert split.to_dict()["context_bytes_per_server"] == CONTEXT_BYTES


@pytest.mark.parametrize(
    "servers, total, kv, tp, message",
    [
        (2, 1.0, None, 1, "--gpu-memory-utilization 1 with --side-by-side: allowed: more than 0, less than 1"),
        (2, 0.0, None, 1, "--gpu-memory-utilization 0 with --side-by-side: allowed"),
        (2, float("nan"), None, 1, "--gpu-memory-utilization nan with --side-by-side: allowed"),
        (6, 0.1, None, 1, "--side-by-side with 6 configurations: --gpu-memory-utilization 0.1 leaves each "
                          "server 0.0166 of the GPU; allowed: at least 0.02 each, so --gpu-memory-utilization 0.12"),
        (2, 0.9, None, 2, "--side-by-side puts every server on one GPU: --tensor-parallel-size 2"),
        (2, 0.9, 0, 1, "--kv-cache-memory-bytes 0: allowed: more than 0 bytes"),
    ],
)
def test_splits_that_cannot_work_are_refused_naming_the_flags(servers, total, kv, tp, message):
    with pytest.raises(InputError) as info:
        split_memory(servers, total, kv_cache_memory_bytes=kv, tensor_parallel_size=tp)
    assert message in str(info.value)


def test_a_split_must_fit_the_gpu_with_each_servers_context():
    h100 = 80 * GIB
    check_fits_gpu(split_memory(6, 0.9, kv_cache_memory_bytes=GIB), total_bytes=h100, used_bytes=GIB)
    with pytest.raises(InputError) as info:  # 0.9 of 80 GiB + 6 contexts > the 75 GiB free
        check_fits_gpu(split_memory(6, 0.9, kv_cache_memory_bytes=None), total_bytes=h100, used_bytes=5 * GIB)
    assert "--gpu-memory-utilization 0.9 gives the servers 72.0 GiB of this 80.0 GiB GPU" in str(info.value)
    assert "only 75.0 GiB is free (5.0 GiB in use already); allowed: --gpu-memory-utilization 0.86 or less" in str(
        info.value
    )
    with pytest.raises(InputError) as info:
        check_fits_gpu(split_memory(6, 0.9, kv_cache_memory_bytes=None), total_bytes=h100, used_bytes=78 * GIB)
    assert "allowed: fewer --configs, or a GPU with more free memory" in str(info.value)
    with pytest.raises(InputError) as info:  # 0.15 of 80 GiB is 12 GiB per server
        check_fits_gpu(split_memory(6, 0.9, kv_cache_memory_bytes=12 * GIB), total_bytes=h100, used_bytes=0)
    assert "--kv-cache-memory-bytes 12884901888 (12.0 GiB) does not fit in each server's share: " \
        "--gpu-memory-utilization 0.9 / 6 servers = 0.15 of 80.0 GiB = 12.0 GiB" in str(info.value)


def test_a_split_that_does_not_fit_the_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch, started):
    monkeypatch.setattr(runner.gpu, "memory_total_bytes", lambda device_index=0: 80 * GIB)
    monkeypatch.setattr(runner.gpu, "memory_used_bytes", lambda device_index=0: 10 * GIB)
    request = side_by_side_request(tmp_path, ["gear"])
    with pytest.raises(InputError, match="--gpu-memory-utilization 0.9 gives the servers"):
        run_soak(request)
    assert not request.out.exists() and started == []
