"""Owns the offline benchmark worker: one process, one `vllm.LLM` engine, the workloads it serves.

The runner starts `python -m vllm_kvpress.bench.offline PLAN.json` once per (configuration,
engine) so that every configuration gets a fresh process and all GPU memory back afterwards. The
worker writes, as soon as each is known,
    engine__<config>__<model>-<max_model_len>.json   capacity right after start-up
    <workload>__<config>.json                        one measurement per workload
into the plan's `rows_dir`; the runner assembles rows from whatever is there, so a crash or a
deadline kill loses only the workload in flight.

Where the figures come from (vLLM 0.26.0):
- `num_gpu_blocks`, `block_size`: `llm.llm_engine.vllm_config.cache_config`, which the engine
  core fills after profiling (v1/engine/core.py `_initialize_kv_caches`) and the front-end copies
  from its ready message (v1/engine/core_client.py `MPClient._apply_ready_response`).
- per-request timing: `RequestOutput.metrics` (`RequestStateStats`), filled only when the engine
  logs stats, hence `disable_log_stats=False`. `first_token_latency` is front-end wall time since
  the request was added; `first_token_ts`/`last_token_ts` are engine-core monotonic timestamps.
  All requests of a turn are added at once, so offline TTFT includes waiting for KV space.
- preemptions, prefix-cache hits: Prometheus counters via `llm.get_metrics()`, differenced.
- requests running / waiting at once, KV-cache usage: Prometheus gauges via `llm.get_metrics()`,
  sampled on a thread while `generate` runs (gauges.py says why that is safe); the peaks.
"""

import functools
import io
import json
import re
import sys
import time
from pathlib import Path

from vllm_kvpress.bench import gpu
from vllm_kvpress.bench.configs import offline_engine_kwargs
from vllm_kvpress.bench.figures import (
    COUNTERS,
    RequestTiming,
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
from vllm_kvpress.bench.results import engine_file_name, row_file_name, write_json
from vllm_kvpress.bench.workloads import Workload, make_prompts, next_turn_prompt, warmup_for

ECHO_PREFIX = "[bench]"
"""Lines starting with this are echoed by the runner to the terminal; the rest goes to the log."""
PROGRESS_INTERVAL_S = 30.0


class ProgressLines(io.TextIOBase):
    """A file for tqdm: each redraw (tqdm separates them with carriage returns) becomes one
    `[bench]` line, so vLLM's "Processed prompts" bar reaches the terminal through the runner."""

    def __init__(self, label: str):
        self.label = label

    def write(self, text: str) -> int:
        for redraw in re.split(r"[\r\n]+", text):
            if redraw.strip():
                print(f"{ECHO_PREFIX} {self.label}: {redraw.strip()}", flush=True)
        return len(text)


def progress_bar(label: str):
    """`use_tqdm` for `LLM.generate`: a tqdm factory writing through `ProgressLines`."""
    from tqdm import tqdm

    return functools.partial(tqdm, file=ProgressLines(label), mininterval=PROGRESS_INTERVAL_S, ncols=120)


def request_timing(output) -> RequestTiming:
    """Timing of one finished `vllm.RequestOutput`."""
    metrics = output.metrics
    num_tokens = len(output.outputs[0].token_ids)
    if metrics is None:
        return RequestTiming(ttft_s=None, output_tokens=num_tokens)
    decode_s = metrics.last_token_ts - metrics.first_token_ts if metrics.first_token_ts else None
    return RequestTiming(
        ttft_s=metrics.first_token_latency or None, output_tokens=num_tokens, decode_s=decode_s
    )


def read_counters(llm) -> dict[str, float]:
    """Current values of `figures.COUNTERS`, summed over engines and label sets."""
    from vllm.v1.metrics.reader import Counter

    totals = dict.fromkeys(COUNTERS, 0.0)
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in totals:
            totals[metric.name] += metric.value
    return totals


def read_gauges(llm) -> dict[str, float]:
    """Current values of `figures.GAUGES` (`figures.gauge_totals`); safe to call from a thread
    other than the one running `llm.generate` (gauges.py)."""
    from vllm.v1.metrics.reader import Gauge

    return gauge_totals((m.name, m.value) for m in llm.get_metrics() if isinstance(m, Gauge))


def run_workload(
    llm,
    workload: Workload,
    *,
    seed: int,
    device_index: int,
    max_num_seqs: int | None = None,
    sample_interval_s: float = gpu.SAMPLE_INTERVAL_S,
) -> dict:
    """Run every turn of `workload` and return its measured figures."""
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=workload.output_len, ignore_eos=True, temperature=0.0, detokenize=False
    )
    prompts = make_prompts(workload, seed)
    histories = prompts.first_prompts
    timings: list[RequestTiming] = []
    prompt_tokens = output_tokens = 0
    before = read_counters(llm)
    gauges = PeakGaugeSampler(functools.partial(read_gauges, llm), sample_interval_s)
    with peak_memory_sampler(device_index, sample_interval_s) as memory, gauges:
        start = time.perf_counter()
        for turn in range(workload.turns):
            label = (
                workload.name if workload.turns == 1 else f"{workload.name} turn {turn + 1}/{workload.turns}"
            )
            outputs = llm.generate(
                [{"prompt_token_ids": h} for h in histories], params, use_tqdm=progress_bar(label)
            )
            timings += [request_timing(o) for o in outputs]
            prompt_tokens += sum(len(h) for h in histories)
            output_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            if turn + 1 < workload.turns:
                histories = [
                    next_turn_prompt(h, list(o.outputs[0].token_ids), follow_ups[turn])
                    for h, o, follow_ups in zip(histories, outputs, prompts.follow_ups)
                ]
        wall_s = time.perf_counter() - start
    return {
        "throughput": throughput_figures(
            wall_s=wall_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            num_requests=workload.num_requests * workload.turns,
        ),
        "latency": latency_figures(timings),
        "counters": counter_figures(counter_deltas(before, read_counters(llm))),
        "memory": {"peak_used_bytes": memory.peaks.get(USED_BYTES)},
        "concurrency": {
            **concurrency_figures(
                gauges.peaks,
                num_samples=gauges.num_samples,
                interval_s=sample_interval_s,
                limit=request_limit(workload.num_requests, max_num_seqs),
            ),
            **({"sampler_error": gauges.error} if gauges.error else {}),
        },
    }


def start_engine(engine_settings: dict, device_index: int):
    """Build the engine; return it with what vLLM allocated."""
    import vllm
    from vllm import LLM

    used_before = gpu.memory_used_bytes(device_index)
    start = time.perf_counter()
    llm = LLM(**offline_engine_kwargs(engine_settings))
    cache_config = llm.llm_engine.vllm_config.cache_config
    return llm, {
        "engine_start_s": time.perf_counter() - start,
        "num_gpu_blocks": cache_config.num_gpu_blocks,
        "block_size": cache_config.block_size,
        "vllm_kv_cache_size_tokens": cache_config.kv_cache_size_tokens,
        "vllm_max_concurrency_at_max_model_len": cache_config.kv_cache_max_concurrency,
        "memory_used_before_start_bytes": used_before,
        "memory_used_after_start_bytes": gpu.memory_used_bytes(device_index),
        # what this process imported, whatever package metadata the parent found
        "vllm_version": vllm.__version__,
        "torch_version": getattr(sys.modules.get("torch"), "__version__", None),  # vLLM imported it
    }


def run_plan(plan: dict) -> None:
    rows_dir = Path(plan["rows_dir"])
    slug, device_index, seed = plan["config_slug"], plan["device_index"], plan["seed"]
    workloads = [Workload.from_dict(w) for w in plan["workloads"]]
    settings = plan["engine_settings"]
    print(f"{ECHO_PREFIX} {slug}: starting vLLM for {', '.join(w.name for w in workloads)}", flush=True)
    llm, engine = start_engine(settings, device_index)
    write_json(rows_dir / engine_file_name(slug, workloads[0].model, settings["max_model_len"]), engine)
    print(
        f"{ECHO_PREFIX} {slug}: engine up in {engine['engine_start_s']:.0f} s, "
        f"{engine['num_gpu_blocks']} blocks x {engine['block_size']} tokens",
        flush=True,
    )
    sampling = {
        "max_num_seqs": settings.get("max_num_seqs"),
        "sample_interval_s": plan.get("sample_interval_s", gpu.SAMPLE_INTERVAL_S),
    }
    if plan.get("warmup", True):
        run_workload(
            llm,
            warmup_for(workloads[0].model, settings["max_model_len"]),
            seed=seed,
            device_index=device_index,
            **sampling,
        )
    for workload in workloads:
        measured = run_workload(llm, workload, seed=seed, device_index=device_index, **sampling)
        measured["capacity"] = capacity_figures(
            num_gpu_blocks=engine["num_gpu_blocks"],
            block_size=engine["block_size"],
            max_context_len=workload.max_context_len,
        )
        measured["status"] = "ok"
        write_json(rows_dir / row_file_name(workload.name, slug), measured)
        print(
            f"{ECHO_PREFIX} {slug}: {workload.name} done in {measured['throughput']['wall_s']:.0f} s, "
            f"{measured['throughput']['output_tokens_per_s']:.0f} output tok/s, "
            f"at most {measured['concurrency']['max_running_requests']} requests running",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m vllm_kvpress.bench.offline PLAN.json (written by `vllm-kvpress bench`)",
            file=sys.stderr,
        )
        return 2
    run_plan(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
