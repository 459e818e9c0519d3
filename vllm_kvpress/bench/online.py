"""Owns online mode for one configuration: start `vllm serve`, wait for /health, drive each
workload through the streaming load generator, read the server's metrics, stop the server.

The server runs in its own process group (started here, stopped here by its id), so stopping it
also ends its engine core and workers and the next configuration gets the whole GPU.
Figures read from the server (vLLM 0.26.0, `GET /metrics`, Prometheus text):
- `vllm:cache_config_info{num_gpu_blocks=..., block_size=..., kv_cache_size_tokens=...}`: an info
  gauge whose labels are `CacheConfig.metrics_info()`, set once the engine is initialized;
- `vllm:num_preemptions_total`, `vllm:prefix_cache_{queries,hits}_total`: differenced per workload;
- `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`: gauges,
  sampled on a thread while the workload runs (gauges.py); their peaks.
Output lines the server writes go to its log file only.
"""

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vllm_kvpress.bench import gpu
from vllm_kvpress.bench.configs import SERVED_MODEL_NAME
from vllm_kvpress.bench.figures import (
    COUNTERS,
    GAUGES,
    capacity_figures,
    concurrency_figures,
    counter_deltas,
    counter_figures,
    gauge_totals,
    latency_figures,
    request_limit,
    throughput_figures,
)
from vllm_kvpress.bench.gauges import USED_BYTES, PeakGaugeSampler, peak_memory_sampler
from vllm_kvpress.bench.loadgen import run_load
from vllm_kvpress.bench.results import engine_file_name, row_file_name, write_json
from vllm_kvpress.bench.workloads import Workload, make_prompts, warmup_for

HEALTH_POLL_S = 2.0
STOP_GRACE_S = 15.0
"""SIGTERM to SIGKILL; vLLM's engine core shuts down within a few seconds of SIGTERM."""


class ServerError(RuntimeError):
    """`vllm serve` exited or did not become healthy; the message ends with its log's tail."""


class ServerStartTimeout(ServerError, TimeoutError):
    """`vllm serve` was still starting when its time (or the invocation's deadline) ran out."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


@dataclass
class ServerProcess:
    argv: list[str]
    log_path: Path
    base_url: str
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until GET /health answered 200. Raises ServerError if it exits or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                raise ServerError(
                    f"vllm serve exited with code {self.process.returncode}:\n{log_tail(self.log_path)}"
                )
            if http_get(self.base_url + "/health", timeout_s=5.0)[0] == 200:
                return time.monotonic() - start
            time.sleep(HEALTH_POLL_S)
        raise ServerStartTimeout(
            f"vllm serve not healthy after {timeout_s:.0f} s:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after a grace period; returns once no
        process of the group is left (vLLM's engine core outlives the API process by seconds)."""
        if self.process is None:
            return
        stop_process_group(self.process)


def process_group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of group `pgid` exists; Linux /proc, else the leader."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_process_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """End `process` and every process in its group (it was started with start_new_session)."""
    pgid = process.pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if process.poll() is not None and not process_group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()  # reap the leader
            if process.returncode is not None and not process_group_alive(pgid):
                return
            time.sleep(0.2)


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """(counters of `figures.COUNTERS` summed over labels, labels of vllm:cache_config_info)."""
    from prometheus_client.parser import text_string_to_metric_families

    counters = dict.fromkeys(COUNTERS, 0.0)
    cache_info: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        if family.name in counters:
            counters[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "vllm:cache_config_info" and family.samples:
            cache_info = dict(family.samples[0].labels)
    return counters, cache_info


def parse_gauges(text: str) -> dict[str, float]:
    """`figures.GAUGES` from Prometheus text (`figures.gauge_totals`)."""
    from prometheus_client.parser import text_string_to_metric_families

    return gauge_totals(
        (family.name, sample.value)
        for family in text_string_to_metric_families(text)
        if family.name in GAUGES
        for sample in family.samples
        if sample.name == family.name
    )


def _read_gauges(base_url: str) -> dict[str, float] | None:
    """One reading of the server's gauges; None if /metrics did not answer this time."""
    status, text = http_get(base_url + "/metrics", timeout_s=5.0)
    return parse_gauges(text) if status == 200 else None


def _read_metrics(base_url: str) -> tuple[dict[str, float], dict[str, str]]:
    status, text = http_get(base_url + "/metrics")
    if status != 200:
        raise ServerError(f"GET /metrics answered {status}")
    return parse_metrics(text)


def _number_or_none(value: str | None, kind: type = int) -> float | int | None:
    """A label value of vllm:cache_config_info (labels are strings; unset fields read "None")."""
    return kind(float(value)) if value not in (None, "", "None") else None


def run_workload_online(
    base_url: str,
    workload: Workload,
    *,
    seed: int,
    request_rate: float,
    max_concurrency: int | None,
    device_index: int,
    timeout_s: float | None,
    on_request_done=None,
    max_num_seqs: int | None = None,
    sample_interval_s: float = gpu.SAMPLE_INTERVAL_S,
) -> dict:
    prompts = make_prompts(workload, seed)
    before, _ = _read_metrics(base_url)
    gauges = PeakGaugeSampler(lambda: _read_gauges(base_url), sample_interval_s)
    with peak_memory_sampler(device_index, sample_interval_s) as memory, gauges:
        load = asyncio.run(
            asyncio.wait_for(
                run_load(
                    base_url,
                    SERVED_MODEL_NAME,
                    workload,
                    prompts,
                    request_rate=request_rate,
                    max_concurrency=max_concurrency,
                    seed=seed,
                    on_request_done=on_request_done,
                ),
                timeout=timeout_s,
            )
        )
    after, _ = _read_metrics(base_url)
    measured = {
        "latency": latency_figures(load.timings),
        "counters": counter_figures(counter_deltas(before, after)),
        "memory": {"peak_used_bytes": memory.peaks.get(USED_BYTES)},
        "concurrency": {
            **concurrency_figures(
                gauges.peaks,
                num_samples=gauges.num_samples,
                interval_s=sample_interval_s,
                limit=request_limit(workload.num_requests, max_num_seqs, max_concurrency),
            ),
            **({"sampler_error": gauges.error} if gauges.error else {}),
        },
        "failed_requests": len(load.errors),
        "errors": sorted(set(load.errors))[:5],
    }
    if load.num_requests:
        measured["throughput"] = throughput_figures(
            wall_s=load.wall_s,
            prompt_tokens=load.prompt_tokens,
            output_tokens=load.output_tokens,
            num_requests=load.num_requests,
        )
    return measured


def run_online_config(
    *,
    serve_argv: list[str],
    config_slug: str,
    workloads: list[Workload],
    max_model_len: int,
    rows_dir: Path,
    log_path: Path,
    base_url: str,
    seed: int,
    request_rate: float,
    max_concurrency: int | None,
    device_index: int,
    deadline: float | None,
    warmup: bool = True,
    start_timeout_s: float = 900.0,
    on_request_done=None,
    max_num_seqs: int | None = None,
    sample_interval_s: float = gpu.SAMPLE_INTERVAL_S,
) -> None:
    """Serve one configuration and measure `workloads` on it; rows land in `rows_dir` as they finish.

    `deadline` is a `time.monotonic()` value (None: no limit); a workload still running then is
    cancelled and raises `TimeoutError`.
    """

    def remaining() -> float | None:
        return None if deadline is None else max(1.0, deadline - time.monotonic())

    server = ServerProcess(argv=serve_argv, log_path=log_path, base_url=base_url)
    used_before = gpu.memory_used_bytes(device_index)
    server.start()
    try:
        start_s = server.wait_healthy(min(start_timeout_s, remaining() or start_timeout_s))
        _, cache_info = _read_metrics(base_url)
        engine = {
            "engine_start_s": start_s,
            "num_gpu_blocks": _number_or_none(cache_info.get("num_gpu_blocks")),
            "block_size": _number_or_none(cache_info.get("block_size")),
            "vllm_kv_cache_size_tokens": _number_or_none(cache_info.get("kv_cache_size_tokens")),
            "vllm_max_concurrency_at_max_model_len": _number_or_none(
                cache_info.get("kv_cache_max_concurrency"), float
            ),
            "memory_used_before_start_bytes": used_before,
            "memory_used_after_start_bytes": gpu.memory_used_bytes(device_index),
        }
        write_json(rows_dir / engine_file_name(config_slug, workloads[0].model, max_model_len), engine)
        if warmup:
            run_workload_online(
                base_url,
                warmup_for(workloads[0].model, max_model_len),
                seed=seed,
                request_rate=float("inf"),
                max_concurrency=None,
                device_index=device_index,
                timeout_s=remaining(),
                max_num_seqs=max_num_seqs,
                sample_interval_s=sample_interval_s,
            )
        for workload in workloads:
            measured = run_workload_online(
                base_url,
                workload,
                seed=seed,
                request_rate=request_rate,
                max_concurrency=max_concurrency,
                device_index=device_index,
                timeout_s=remaining(),
                on_request_done=on_request_done,
                max_num_seqs=max_num_seqs,
                sample_interval_s=sample_interval_s,
            )
            if engine["num_gpu_blocks"] is not None and engine["block_size"] is not None:
                measured["capacity"] = capacity_figures(
                    num_gpu_blocks=engine["num_gpu_blocks"],
                    block_size=engine["block_size"],
                    max_context_len=workload.max_context_len,
                )
            complete = "throughput" in measured and not measured["failed_requests"]
            measured["status"] = "ok" if complete else "failed"
            if not complete:
                measured["error"] = f"{measured['failed_requests']} requests failed: {measured['errors']}"
            write_json(rows_dir / row_file_name(workload.name, config_slug), measured)
    finally:
        server.stop()
