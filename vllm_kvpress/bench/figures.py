"""Owns the arithmetic that turns raw measurements into the reported figures.

Everything here is a pure function of numbers (no vLLM, no clock), so each figure's definition
is tested on CPU from fake engine results:

    KV capacity (tokens)  = num_gpu_blocks x block_size           (what vLLM allocated)
    max concurrency       = KV capacity / max context of one request   (prompt + output tokens)
    max running (observed) = largest sample of vLLM's `vllm:num_requests_running` gauge while the
                             workload ran (eviction frees blocks after prefill, so it can exceed
                             the capacity quotient above)
    output tokens/s       = generated tokens / wall time of the whole batch
    total tokens/s        = (prompt + generated tokens) / wall time
    TPOT (per request)    = (time of last token - time of first token) / (output tokens - 1)
    ratios                = figure / figure of the `auto` (bf16) row, same workload and engine
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestTiming:
    """Timing of one request (one turn of a conversation), in seconds."""

    ttft_s: float | None
    """Time from the request's submission to its first generated token."""
    output_tokens: int
    decode_s: float | None = None
    """Time from the first to the last generated token."""
    itl_s: tuple[float, ...] = ()
    """Gaps between consecutive streamed chunks (online mode only)."""
    e2e_s: float | None = None
    """Time from submission to the last token (online mode only)."""

    @property
    def tpot_s(self) -> float | None:
        if self.decode_s is None or self.output_tokens < 2:
            return None
        return self.decode_s / (self.output_tokens - 1)


def summarize(values: Iterable[float | None]) -> dict[str, float] | None:
    """p50/p90/p99/mean/max and count of the values that are not None; None if there are none."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return None
    summary = {f"p{q}": float(np.percentile(data, q)) for q in PERCENTILES}
    return {**summary, "mean": float(data.mean()), "max": float(data.max()), "count": int(data.size)}


def capacity_figures(*, num_gpu_blocks: int, block_size: int, max_context_len: int) -> dict[str, float]:
    capacity_tokens = num_gpu_blocks * block_size
    return {
        "num_gpu_blocks": num_gpu_blocks,
        "block_size": block_size,
        "kv_capacity_tokens": capacity_tokens,
        # Upper bound on requests of this workload resident at once; vLLM's own "Maximum
        # concurrency" log line is the same quotient taken at max_model_len instead.
        "max_concurrency": capacity_tokens / max_context_len,
    }


def throughput_figures(
    *, wall_s: float, prompt_tokens: int, output_tokens: int, num_requests: int
) -> dict[str, float]:
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return {
        "wall_s": wall_s,
        "num_requests": num_requests,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
        "requests_per_s": num_requests / wall_s,
    }


def latency_figures(timings: Iterable[RequestTiming]) -> dict[str, dict[str, float] | None]:
    timings = list(timings)
    return {
        "ttft_s": summarize(t.ttft_s for t in timings),
        "tpot_s": summarize(t.tpot_s for t in timings),
        "itl_s": summarize(gap for t in timings for gap in t.itl_s),
        "e2e_s": summarize(t.e2e_s for t in timings),
    }


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Change of each cumulative counter over one workload (vLLM's counters never reset)."""
    return {name: after[name] - before.get(name, 0.0) for name in after}


PREEMPTIONS = "vllm:num_preemptions"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
COUNTERS = (PREEMPTIONS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS)
"""vLLM 0.26.0 Prometheus counters read before and after each workload (names without `_total`)."""


def counter_figures(deltas: Mapping[str, float]) -> dict[str, float | None]:
    queries = deltas.get(PREFIX_CACHE_QUERIES)
    hits = deltas.get(PREFIX_CACHE_HITS)
    return {
        "num_preemptions": deltas.get(PREEMPTIONS),
        "prefix_cache_queried_tokens": queries,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": (hits / queries) if queries and hits is not None else None,
    }


NUM_RUNNING = "vllm:num_requests_running"
NUM_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
GAUGES = (NUM_RUNNING, NUM_WAITING, KV_CACHE_USAGE)
"""vLLM 0.26.0 scheduler gauges sampled while a workload runs (v1/metrics/loggers.py
`PrometheusStatLogger`; set from every step's `SchedulerStats`, one label set per engine)."""


def gauge_totals(samples: Iterable[tuple[str, float]]) -> dict[str, float]:
    """One reading of `GAUGES` from (name, value) pairs of every label set: request counts are
    summed over engines, the KV-cache usage fraction is the fullest engine's."""
    totals: dict[str, float] = {}
    for name, value in samples:
        if name not in GAUGES:
            continue
        combine = max if name == KV_CACHE_USAGE else (lambda a, b: a + b)
        totals[name] = combine(totals[name], value) if name in totals else float(value)
    return totals


def request_limit(num_requests: int, *caps: int | None) -> int:
    """Most requests of a workload that can run at once whatever the KV cache holds: its requests
    (conversations), `max_num_seqs`, and online the client's `--max-concurrency`."""
    return min([num_requests, *(c for c in caps if c)])


def concurrency_figures(
    peaks: Mapping[str, float], *, num_samples: int, interval_s: float, limit: int
) -> dict[str, float | int | bool | None]:
    """What the gauge sampler saw over one workload. `saturated`: every request the workload (or
    `max_num_seqs`) allows ran at once, so the observed maximum is a floor of what the KV cache
    could hold, not its measure."""
    running = peaks.get(NUM_RUNNING)
    waiting = peaks.get(NUM_WAITING)
    return {
        "max_running_requests": None if running is None else int(running),
        "max_waiting_requests": None if waiting is None else int(waiting),
        "max_kv_cache_usage": peaks.get(KV_CACHE_USAGE),
        "request_limit": limit,
        "saturated": None if running is None else running >= limit,
        "num_samples": num_samples,
        "sample_interval_s": interval_s,
    }


RATIO_FIGURES = {
    "kv_capacity": ("capacity", "kv_capacity_tokens"),
    "max_running_requests": ("concurrency", "max_running_requests"),
    "output_tokens_per_s": ("throughput", "output_tokens_per_s"),
    "total_tokens_per_s": ("throughput", "total_tokens_per_s"),
}


def _comparable_key(row: Mapping) -> tuple:
    w = row["workload"]
    return (w["name"], w["model"], w["max_model_len"], row.get("mode"))


def add_ratios_vs_bf16(rows: list[dict], bf16_label: str = "auto") -> None:
    """Set `row["ratio_vs_bf16"]` on every row: each figure of RATIO_FIGURES divided by the same
    figure of the successful bf16 row of the same workload, engine and mode (None without one)."""
    references = {
        _comparable_key(r): r for r in rows if r["config"]["label"] == bf16_label and r.get("status") == "ok"
    }
    for row in rows:
        reference = references.get(_comparable_key(row))
        ratios: dict[str, float | None] = {}
        for name, (section, key) in RATIO_FIGURES.items():
            value = (row.get(section) or {}).get(key)
            base = (reference.get(section) or {}).get(key) if reference else None
            ratios[name] = value / base if value is not None and base else None
        row["ratio_vs_bf16"] = ratios
