"""Owns one soak invocation: for each configuration a fresh `vllm serve` (bench/online.py's
`ServerProcess`, in its own process group, stopped with everything it started), a plan sized to
the KV pool that server allocated, the driver and the sampler; then the server is stopped and the
results are rewritten, so an invocation killed from outside keeps every finished configuration.

    <out>/
        soak.json               the invocation: command, environment, settings, probes, and each
                                configuration's summary (summary.py) and criteria
        soak.md                 the same as tables (summary.markdown)
        records/<config>.json   everything measured: each request's outcome, the probe answers,
                                the leak checks, the events and the sampled series
        gauges__<config>.png    the gauges over time (plots.py)
        logs/<config>.log       the server's output (ignored by git)

Configurations run one after the other, each with the whole GPU: before the next server starts,
device memory must be back where it was (bench's runner does the same). A plan depends on the
pool (its bursts are sized in pools), so each configuration gets its own, from the same seed.

Side by side (`SoakRequest.side_by_side`), every configuration's server runs at once on the same GPU,
each on its own port with its share of the GPU's memory (side_by_side.py: the split, and whether
the servers start together or one after another). Once all answer /health, one event loop drives
every server's own plan, each with its own sampler thread, from one shared time origin; a server
that fails to start stops all of them. The records, summary and plots are the sequential mode's.
Either way, SIGTERM is turned into KeyboardInterrupt while servers run, so a killed invocation
stops its servers (their own process groups, bench/online.py) as Ctrl-C does.
"""

import asyncio
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from vllm_kvpress.bench import gpu
from vllm_kvpress.bench.configs import BF16_LABEL, BenchConfig, EngineOptions, engine_settings, serve_argv
from vllm_kvpress.bench.environment import describe_environment
from vllm_kvpress.bench.gauges import PeakGaugeSampler
from vllm_kvpress.bench.online import (
    HEALTH_POLL_S,
    ServerError,
    ServerProcess,
    free_port,
    http_get,
    log_tail,
    parse_metrics,
)
from vllm_kvpress.bench.results import write_json
from vllm_kvpress.bench.runner import BenchRequest
from vllm_kvpress.errors import InputError
from vllm_kvpress.soak import plots, summary
from vllm_kvpress.soak.driver import DEFAULT_DRAIN_TIMEOUT_S, Driver
from vllm_kvpress.soak.plan import Plan, TrafficSettings, make_plan
from vllm_kvpress.soak.probes import DEFAULT_DEPTHS, ProbeSet, needle_probes, random_probes
from vllm_kvpress.soak.sampler import SAMPLE_INTERVAL_S, MetricsSeries
from vllm_kvpress.soak.served_model import ServedModel
from vllm_kvpress.soak.side_by_side import START_TOGETHER, MemorySplit, check_fits_gpu, split_memory

SOAK_FILE = "soak.json"
SUMMARY_FILE = "soak.md"
RECORDS_DIR = "records"
LOGS_DIR = "logs"
TRACEBACK_LINE = "Traceback (most recent call last)"
PROGRESS_INTERVAL_S = 10.0


@dataclass(frozen=True)
class SoakRequest:
    model: ServedModel
    configs: list[BenchConfig]
    traffic: TrafficSettings
    out: Path
    max_model_len: int
    probe_lengths: tuple[int, ...]
    probe_depths: tuple[float, ...] = DEFAULT_DEPTHS
    engine: EngineOptions = EngineOptions()
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    start_timeout_s: float = 900.0
    sample_interval_s: float = SAMPLE_INTERVAL_S
    device_index: int = 0
    memory_release_timeout_s: float = BenchRequest.memory_release_timeout_s
    serve_prefix: tuple[str, ...] = BenchRequest.serve_prefix
    """How `vllm serve` is started: bench's, the same interpreter as this process."""
    command: str = ""
    side_by_side: bool = False
    """Every configuration's server at once on one GPU, sharing `engine.gpu_memory_utilization` (side_by_side.py)."""
    out_stream: TextIO | None = field(default=None, compare=False)
    """Where progress goes; None = sys.stdout at call time."""


def build_probes(req: SoakRequest) -> ProbeSet:
    """Needles in essays where the model has a tokenizer, random token ids otherwise (probes.py)."""
    seed = req.engine.seed
    if not req.model.has_tokenizer:
        return random_probes(req.probe_lengths, len(req.probe_depths), req.model.vocab_size, seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(req.model.path)
    try:
        return needle_probes(tokenizer, req.probe_lengths, req.probe_depths, seed)
    except ValueError as e:  # a length the essays or the prompt's fixed text cannot fit
        raise InputError(f"--probe-lengths {','.join(map(str, req.probe_lengths))}: {e}") from None


def _cache_info(base_url: str) -> dict[str, int]:
    status, text = http_get(base_url + "/metrics")
    if status != 200:
        raise ServerError(f"GET /metrics answered {status}")
    _, info = parse_metrics(text)
    try:
        blocks, block_size = int(float(info["num_gpu_blocks"])), int(float(info["block_size"]))
    except (KeyError, ValueError):
        blocks = block_size = 0
    if blocks <= 0 or block_size <= 0:  # the plan's bursts are sized in pools
        raise ServerError(f"vllm:cache_config_info has no usable num_gpu_blocks/block_size: {info}")
    return {"num_gpu_blocks": blocks, "block_size": block_size, "kv_capacity_tokens": blocks * block_size}


def _count_tracebacks(log_path: Path) -> int:
    try:
        return log_path.read_text(errors="replace").count(TRACEBACK_LINE)
    except OSError:
        return 0


@dataclass
class Serving:
    """One configuration's server, from its start to its record; `result` is its entry in soak.json."""

    config: BenchConfig
    settings: dict
    server: ServerProcess
    log_path: Path
    result: dict
    start_s: float | None = None
    plan: Plan | None = None


def prepare_serving(req: SoakRequest, config: BenchConfig, port: int, gpu_memory_utilization: float | None = None):
    """The server of one configuration on `port`, not started; side by side, with its share of the GPU."""
    settings = engine_settings(
        config, model_dir=req.model.path, max_model_len=req.max_model_len, options=req.engine
    )
    if req.model.real_weights:
        settings["load_format"] = "auto"  # the checkpoint's own weights: the probes' answers mean something
    if gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = gpu_memory_utilization
    base_url = f"http://127.0.0.1:{port}"
    log_path = req.out / LOGS_DIR / f"{config.slug}.log"
    result: dict = {
        "config": config.to_dict(),
        "vllm_serve_argv": ["vllm", "serve", *serve_argv({**settings, "model": req.model.recorded_path}, port=port)],
        "log": str(log_path.relative_to(req.out)),
    }
    argv = [*req.serve_prefix, *serve_argv(settings, port=port)]
    server = ServerProcess(argv=argv, log_path=log_path, base_url=base_url)
    return Serving(config, settings, server, log_path, result)


def engine_ready(req: SoakRequest, serving: Serving, start_s: float) -> Plan:
    """Read the pool the healthy server allocated and size its plan to it (kept in `serving`)."""
    out = req.out_stream or sys.stdout
    engine = {"engine_start_s": round(start_s, 1), **_cache_info(serving.server.base_url)}
    max_num_seqs = serving.settings.get("max_num_seqs")
    # Preemption needs more running tokens than the pool holds; max_num_seqs caps how many run.
    engine["preemption_possible"] = (
        max_num_seqs is None or engine["kv_capacity_tokens"] < max_num_seqs * req.max_model_len
    )
    serving.result["engine"] = engine
    serving.start_s = start_s
    serving.plan = make_plan(
        req.traffic,
        max_model_len=req.max_model_len,
        vocab_size=req.model.vocab_size,
        kv_capacity_tokens=engine["kv_capacity_tokens"],
        seed=req.engine.seed,
    )
    serving.result["plan"] = serving.plan.to_dict()
    print(
        f"[soak] {serving.config.label}: healthy after {start_s:.0f} s, KV pool {engine['kv_capacity_tokens']:,} "
        f"tokens; {len(serving.plan.requests):,} requests over {req.traffic.duration_s:g} s",
        file=out,
        flush=True,
    )
    return serving.plan


@dataclass
class Watch:
    """What drives and observes one server: its sampled series, its progress bar and its driver."""

    series: MetricsSeries
    bar: tqdm
    driver: Driver


def watch(req: SoakRequest, serving: Serving, probes: ProbeSet, origin: float) -> Watch:
    base_url = serving.server.base_url
    series = MetricsSeries(base_url, lambda: time.perf_counter() - origin, req.device_index)
    bar = tqdm(
        total=len(serving.plan.requests),
        desc=f"{serving.config.label} requests",
        file=req.out_stream or sys.stdout,
        mininterval=PROGRESS_INTERVAL_S,
        ncols=120,
    )
    driver = Driver(
        base_url,
        serving.plan,
        probes,
        origin=origin,
        drain_timeout_s=req.drain_timeout_s,
        on_request_done=bar.update,
    )
    return Watch(series, bar, driver)


def driven_record(serving: Serving, driven: dict, series: MetricsSeries) -> dict:
    """The record of a driven plan, with the series and the server's state; taken before the server stops."""
    return {
        **driven,
        "series": series.columns(),
        "metrics_missed": series.missed,
        "server_exit_code": serving.server.process.poll(),
    }


def finish_record(req: SoakRequest, serving: Serving, record: dict) -> tuple[dict, dict]:
    """After the server stopped: count its log's tracebacks, write the record, summarize it."""
    record["server_log_tracebacks"] = _count_tracebacks(serving.log_path)
    config, result = serving.config, serving.result
    record_path = req.out / RECORDS_DIR / f"{config.slug}.json"
    write_json(record_path, {"config": config.to_dict(), "plan": result["plan"], **record})
    result["record"] = str(record_path.relative_to(req.out))
    result["summary"] = summary.summarize_record(record)
    result["status"] = "ok"
    return result, record


def soak_config(req: SoakRequest, config: BenchConfig, probes: ProbeSet) -> tuple[dict, dict | None]:
    """Serve one configuration, drive its plan, stop it: (its result for soak.json, its record or None)."""
    serving = prepare_serving(req, config, free_port())
    serving.server.start()
    try:
        engine_ready(req, serving, serving.server.wait_healthy(req.start_timeout_s))
        origin = time.perf_counter()
        watched = watch(req, serving, probes, origin)
        try:
            with PeakGaugeSampler(watched.series, req.sample_interval_s):
                driven = asyncio.run(watched.driver.run()).to_dict()
        finally:
            watched.bar.close()
        record = driven_record(serving, driven, watched.series)
    except ServerError as e:  # its message ends with the server log's tail
        return {**serving.result, "status": "failed", "error": str(e)}, None
    finally:
        serving.server.stop()
    return finish_record(req, serving, record)


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each socket stays bound until all are picked."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class StartFailed(ServerError):
    """A server side by side did not become healthy (or its pool could not be read); all are stopped."""

    def __init__(self, serving: Serving, error: BaseException):
        self.serving = serving
        super().__init__(str(error))


def _wait_all_healthy(servings: list[Serving], timeout_s: float) -> None:
    """Poll every started server's /health until all answer; the first that exits or times out raises."""
    launched = time.monotonic()
    waiting = list(servings)
    while waiting:
        for serving in list(waiting):
            process = serving.server.process
            if process.poll() is not None:
                raise StartFailed(
                    serving,
                    ServerError(f"vllm serve exited with code {process.returncode}:\n{log_tail(serving.log_path)}"),
                )
            if http_get(serving.server.base_url + "/health", timeout_s=5.0)[0] == 200:
                serving.start_s = time.monotonic() - launched
                waiting.remove(serving)
        if waiting and time.monotonic() - launched > timeout_s:
            serving = waiting[0]
            raise StartFailed(
                serving, ServerError(f"vllm serve not healthy after {timeout_s:.0f} s:\n{log_tail(serving.log_path)}")
            )
        if waiting:
            time.sleep(HEALTH_POLL_S)


def start_side_by_side(req: SoakRequest, servings: list[Serving], split: MemorySplit) -> None:
    """Start every server as `split.start` says and read each one's pool; StartFailed names the first that failed."""
    out = req.out_stream or sys.stdout

    def start(serving: Serving) -> None:
        try:
            serving.server.start()
        except Exception as e:  # e.g. the interpreter of --serve-prefix cannot be run
            raise StartFailed(serving, e) from e

    if split.start == START_TOGETHER:
        print(f"[soak] starting {len(servings)} servers together", file=out, flush=True)
        for serving in servings:
            start(serving)
        _wait_all_healthy(servings, req.start_timeout_s)
    else:
        for number, serving in enumerate(servings, 1):
            print(f"[soak] starting server {number}/{len(servings)}: {serving.config.label}", file=out, flush=True)
            start(serving)
            try:
                serving.start_s = serving.server.wait_healthy(req.start_timeout_s)
            except ServerError as e:
                raise StartFailed(serving, e) from e
    for serving in servings:
        try:
            engine_ready(req, serving, serving.start_s)
        except Exception as e:  # a pool that cannot be read: no plan for it
            raise StartFailed(serving, e) from e


def _stop_all(servings: list[Serving]) -> None:
    """Stop every server at once (each its whole process group); returns when all are gone."""
    if servings:
        with ThreadPoolExecutor(max_workers=len(servings), thread_name_prefix="soak-stop") as pool:
            list(pool.map(lambda serving: serving.server.stop(), servings))


async def _drive_all(drivers: list[Driver]) -> list:
    """Every driver's plan at once on this event loop; a driver that raises leaves the others running."""
    return await asyncio.gather(*(driver.run() for driver in drivers), return_exceptions=True)


def _failed(serving: Serving, status: str, error: str) -> tuple[dict, None]:
    return {**serving.result, "status": status, "error": error}, None


def soak_side_by_side(req: SoakRequest, split: MemorySplit, probes: ProbeSet) -> list[tuple[dict, dict | None]]:
    """Serve every configuration at once, drive all their plans together, stop them all:
    (result, record or None) per configuration, in `req.configs` order."""
    ports = _free_ports(len(req.configs))
    servings = [
        prepare_serving(req, config, port, split.per_server_utilization) for config, port in zip(req.configs, ports)
    ]
    try:
        try:
            start_side_by_side(req, servings, split)
        except StartFailed as e:
            culprit = e.serving.config.label
            stopped = (
                f"not soaked: side by side, every server is stopped when one fails to start, and {culprit} did"
            )
            return [
                _failed(s, "failed", str(e)) if s is e.serving else _failed(s, "stopped", stopped) for s in servings
            ]
        origin = time.perf_counter()  # one time axis for every record
        watches = [watch(req, serving, probes, origin) for serving in servings]
        try:
            with ExitStack() as samplers:
                for watched in watches:
                    samplers.enter_context(PeakGaugeSampler(watched.series, req.sample_interval_s))
                driven = asyncio.run(_drive_all([w.driver for w in watches]))
        finally:
            for watched in watches:
                watched.bar.close()
        records: list[dict | None] = []  # None: that driver raised, its failure is in `failures`
        failures: dict[int, tuple[dict, None]] = {}
        for i, (serving, watched, done) in enumerate(zip(servings, watches, driven)):
            if isinstance(done, BaseException):
                failures[i] = _failed(serving, "failed", f"{type(done).__name__}: {done}\n{log_tail(serving.log_path)}")
                records.append(None)
            else:
                records.append(driven_record(serving, done.to_dict(), watched.series))
    finally:
        _stop_all(servings)
    return [
        failures[i] if record is None else finish_record(req, serving, record)
        for i, (serving, record) in enumerate(zip(servings, records))
    ]


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While servers run, SIGTERM raises KeyboardInterrupt (once), so their `finally` stops them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_outputs(req: SoakRequest, soak: dict) -> None:
    soak["totals"] = summary.totals(soak["results"], BF16_LABEL)
    write_json(req.out / SOAK_FILE, soak)
    (req.out / SUMMARY_FILE).write_text(summary.markdown(soak) + "\n")


def _add_result(req: SoakRequest, soak: dict, config: BenchConfig, result: dict, record: dict | None) -> None:
    """Plot a configuration's record, add its result and rewrite soak.json and soak.md."""
    out = req.out_stream or sys.stdout
    if record is not None:
        title = (
            f"{config.display_name} on {req.model.name}: vLLM gauges during the soak\n"
            f"{soak['environment'].get('gpu_name') or 'unknown GPU'}, "
            f"vLLM {soak['environment'].get('vllm_version') or '?'}"
        )
        side = soak.get("side_by_side")
        memory_label = None
        if side:
            title += f", side by side with {side['servers'] - 1} other server(s)"
            memory_label = f"GPU memory used, whole GPU:\nsum of {side['servers']} servers (GiB)"
        drawn = {"series": record["series"], "events": record["events"], "summary": result["summary"]}
        result["plot"] = plots.write_gauges_plot(
            drawn, req.out, config.slug, title=title, memory_label=memory_label
        ).name
    soak["results"].append(result)
    _write_outputs(req, soak)
    print(f"[soak] {config.label}: {_one_line(result)}", file=out, flush=True)


def side_by_side_split(req: SoakRequest) -> MemorySplit | None:
    """The memory split of a side-by-side soak (None for one after another), checked against the GPU."""
    if not req.side_by_side:
        return None
    split = split_memory(
        len(req.configs),
        req.engine.gpu_memory_utilization,
        kv_cache_memory_bytes=req.engine.kv_cache_memory_bytes,
        tensor_parallel_size=req.engine.tensor_parallel_size,
    )
    total, used = gpu.memory_total_bytes(req.device_index), gpu.memory_used_bytes(req.device_index)
    if total is not None and used is not None:  # no GPU readings (no NVML): vLLM's own start-up check remains
        check_fits_gpu(split, total_bytes=total, used_bytes=used)
    return split


def run_soak(req: SoakRequest) -> dict:
    """Soak every configuration, in turn or side by side; returns what soak.json holds."""
    out = req.out_stream or sys.stdout
    probes = build_probes(req)  # before anything is written: a probe length may not fit
    split = side_by_side_split(req)  # so is a memory split that cannot fit
    req.out.mkdir(parents=True, exist_ok=True)
    (req.out / ".gitignore").write_text(f"{LOGS_DIR}/\n*.tmp\n")  # server logs are too large to commit
    soak = {
        "schema": summary.SCHEMA,
        "command": req.command,
        "environment": describe_environment(req.device_index),
        "model": req.model.to_dict(),
        "max_model_len": req.max_model_len,
        "seed": req.engine.seed,
        "engine": asdict(req.engine),
        "traffic": asdict(req.traffic),
        "drain_timeout_s": req.drain_timeout_s,
        "side_by_side": None if split is None else split.to_dict(),
        "probes": probes.to_dict(),
        "results": [],
    }
    with _sigterm_as_interrupt():
        if split is not None:
            labels = ", ".join(c.label for c in req.configs)
            print(
                f"[soak] side by side on one GPU: {labels} on {req.model.name}, "
                f"--gpu-memory-utilization {split.per_server_utilization:g} each; the GPU memory series is the "
                f"whole GPU's, the sum of all {split.servers} servers",
                file=out,
                flush=True,
            )
            for config, (result, record) in zip(req.configs, soak_side_by_side(req, split, probes)):
                _add_result(req, soak, config, result, record)
        else:
            _soak_in_turn(req, soak, probes)
    print(f"[soak] results: {req.out / SUMMARY_FILE}", file=out, flush=True)
    return soak


def _soak_in_turn(req: SoakRequest, soak: dict, probes: ProbeSet) -> None:
    out = req.out_stream or sys.stdout
    baseline_memory = gpu.memory_used_bytes(req.device_index)
    for number, config in enumerate(req.configs, 1):
        # The previous server's processes are gone; the driver may still be returning their memory.
        gpu.wait_for_memory_release(
            baseline_memory, device_index=req.device_index, timeout_s=req.memory_release_timeout_s
        )
        print(f"[soak] ({number}/{len(req.configs)}) {config.label} on {req.model.name}", file=out, flush=True)
        try:
            result, record = soak_config(req, config, probes)
        except Exception as e:  # one configuration's failure must not end the soak of the others
            error = f"{type(e).__name__}: {e}\n{log_tail(req.out / LOGS_DIR / f'{config.slug}.log')}"
            result, record = {"config": config.to_dict(), "status": "failed", "error": error}, None
        _add_result(req, soak, config, result, record)


def _one_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result.get('error')}"
    s = result["summary"]
    requests, leaks, probes = s["requests"], s["leak_checks"], s["probes"]
    rate = probes["divergence_rate"]
    return (
        f"{requests['ok']:,} ok / {requests['cancelled']:,} cancelled / {requests['failed']:,} failed; "
        f"leak checks {leaks['clean']}/{leaks['checks']} clean; probe divergence "
        f"{'-' if rate is None else f'{100 * rate:.1f}%'}; preemptions {s['series']['preemptions']}"
    )
