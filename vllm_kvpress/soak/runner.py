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
"""

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from vllm_kvpress.bench import gpu
from vllm_kvpress.bench.configs import BF16_LABEL, BenchConfig, EngineOptions, engine_settings, serve_argv
from vllm_kvpress.bench.environment import describe_environment
from vllm_kvpress.bench.gauges import PeakGaugeSampler
from vllm_kvpress.bench.online import ServerError, ServerProcess, free_port, http_get, log_tail, parse_metrics
from vllm_kvpress.bench.results import write_json
from vllm_kvpress.bench.runner import BenchRequest
from vllm_kvpress.errors import InputError
from vllm_kvpress.soak import plots, summary
from vllm_kvpress.soak.driver import DEFAULT_DRAIN_TIMEOUT_S, Driver
from vllm_kvpress.soak.plan import TrafficSettings, make_plan
from vllm_kvpress.soak.probes import DEFAULT_DEPTHS, ProbeSet, needle_probes, random_probes
from vllm_kvpress.soak.sampler import SAMPLE_INTERVAL_S, MetricsSeries
from vllm_kvpress.soak.served_model import ServedModel

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


def soak_config(req: SoakRequest, config: BenchConfig, probes: ProbeSet) -> tuple[dict, dict | None]:
    """Serve one configuration, drive its plan, stop it: (its result for soak.json, its record or None)."""
    out = req.out_stream or sys.stdout
    settings = engine_settings(
        config, model_dir=req.model.path, max_model_len=req.max_model_len, options=req.engine
    )
    if req.model.real_weights:
        settings["load_format"] = "auto"  # the checkpoint's own weights: the probes' answers mean something
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = req.out / LOGS_DIR / f"{config.slug}.log"
    result: dict = {
        "config": config.to_dict(),
        "vllm_serve_argv": ["vllm", "serve", *serve_argv({**settings, "model": req.model.recorded_path}, port=port)],
        "log": str(log_path.relative_to(req.out)),
    }
    argv = [*req.serve_prefix, *serve_argv(settings, port=port)]
    server = ServerProcess(argv=argv, log_path=log_path, base_url=base_url)
    server.start()
    try:
        start_s = server.wait_healthy(req.start_timeout_s)
        engine = {"engine_start_s": round(start_s, 1), **_cache_info(base_url)}
        max_num_seqs = settings.get("max_num_seqs")
        # Preemption needs more running tokens than the pool holds; max_num_seqs caps how many run.
        engine["preemption_possible"] = (
            max_num_seqs is None or engine["kv_capacity_tokens"] < max_num_seqs * req.max_model_len
        )
        result["engine"] = engine
        plan = make_plan(
            req.traffic,
            max_model_len=req.max_model_len,
            vocab_size=req.model.vocab_size,
            kv_capacity_tokens=engine["kv_capacity_tokens"],
            seed=req.engine.seed,
        )
        result["plan"] = plan.to_dict()
        print(
            f"[soak] {config.label}: healthy after {start_s:.0f} s, KV pool {engine['kv_capacity_tokens']:,} tokens; "
            f"{len(plan.requests):,} requests over {req.traffic.duration_s:g} s",
            file=out,
            flush=True,
        )
        origin = time.perf_counter()
        series = MetricsSeries(base_url, lambda: time.perf_counter() - origin, req.device_index)
        bar = tqdm(
            total=len(plan.requests),
            desc=f"{config.label} requests",
            file=out,
            mininterval=PROGRESS_INTERVAL_S,
            ncols=120,
        )
        try:
            with PeakGaugeSampler(series, req.sample_interval_s):
                driver = Driver(
                    base_url,
                    plan,
                    probes,
                    origin=origin,
                    drain_timeout_s=req.drain_timeout_s,
                    on_request_done=bar.update,
                )
                record = asyncio.run(driver.run()).to_dict()
        finally:
            bar.close()
        record["series"] = series.columns()
        record["metrics_missed"] = series.missed
        record["server_exit_code"] = server.process.poll()
    except ServerError as e:  # its message ends with the server log's tail
        return {**result, "status": "failed", "error": str(e)}, None
    finally:
        server.stop()
    record["server_log_tracebacks"] = _count_tracebacks(log_path)
    record_path = req.out / RECORDS_DIR / f"{config.slug}.json"
    write_json(record_path, {"config": config.to_dict(), "plan": result["plan"], **record})
    result["record"] = str(record_path.relative_to(req.out))
    result["summary"] = summary.summarize_record(record)
    result["status"] = "ok"
    return result, record


def _write_outputs(req: SoakRequest, soak: dict) -> None:
    soak["totals"] = summary.totals(soak["results"], BF16_LABEL)
    write_json(req.out / SOAK_FILE, soak)
    (req.out / SUMMARY_FILE).write_text(summary.markdown(soak) + "\n")


def run_soak(req: SoakRequest) -> dict:
    """Soak every configuration in turn; returns what soak.json holds."""
    out = req.out_stream or sys.stdout
    probes = build_probes(req)  # before anything is written: a probe length may not fit
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
        "probes": probes.to_dict(),
        "results": [],
    }
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
        if record is not None:
            title = (
                f"{config.display_name} on {req.model.name}: vLLM gauges during the soak\n"
                f"{soak['environment'].get('gpu_name') or 'unknown GPU'}, "
                f"vLLM {soak['environment'].get('vllm_version') or '?'}"
            )
            drawn = {"series": record["series"], "events": record["events"], "summary": result["summary"]}
            result["plot"] = plots.write_gauges_plot(drawn, req.out, config.slug, title=title).name
        soak["results"].append(result)
        _write_outputs(req, soak)
        print(f"[soak] {config.label}: {_one_line(result)}", file=out, flush=True)
    print(f"[soak] results: {req.out / SUMMARY_FILE}", file=out, flush=True)
    return soak


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
