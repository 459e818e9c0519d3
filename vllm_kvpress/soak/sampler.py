"""Owns the time series of a soak: vLLM's scheduler gauges, its preemption counter and the GPU's
used memory, read together every `SAMPLE_INTERVAL_S` for the whole soak.

One reading is one `GET /metrics` (parsed by bench/online.py: `figures.GAUGES` and the preemption
counter) plus NVML's device-level used memory (bench/gpu.py; absent without a GPU). The sampling
thread is bench's `PeakGaugeSampler`, so the peaks come with the series; `MetricsSeries` is the
reading it calls, and keeps every reading with its time. A gauge holds the value of the last
engine step (bench/gauges.py), so a level shorter than the interval can be missed.
"""

from collections.abc import Callable

from vllm_kvpress.bench import gpu
from vllm_kvpress.bench.figures import GAUGES, PREEMPTIONS
from vllm_kvpress.bench.online import http_get, parse_gauges, parse_metrics

SAMPLE_INTERVAL_S = 1.0
"""Soaks run for many minutes; one reading a second keeps hours of series small."""
METRICS_TIMEOUT_S = 5.0
PREEMPTIONS_TOTAL = PREEMPTIONS + "_total"
"""The counter's cumulative value, as Prometheus names the sample."""
GPU_MEMORY_USED = "gpu_memory_used_bytes"
SERIES = (*GAUGES, PREEMPTIONS_TOTAL, GPU_MEMORY_USED)
"""The columns of a soak's series, besides `t_s`."""


def read_server_metrics(base_url: str) -> dict[str, float] | None:
    """The gauges and the preemption counter from one GET /metrics; None if it did not answer."""
    status, text = http_get(base_url.rstrip("/") + "/metrics", timeout_s=METRICS_TIMEOUT_S)
    if status != 200:
        return None
    counters, _ = parse_metrics(text)
    return {**parse_gauges(text), PREEMPTIONS_TOTAL: counters[PREEMPTIONS]}


class MetricsSeries:
    """A reading for `PeakGaugeSampler`: server metrics and GPU memory, kept with `clock()`'s time."""

    def __init__(self, base_url: str, clock: Callable[[], float], device_index: int = 0):
        self.base_url = base_url
        self.clock = clock
        self.device_index = device_index
        self.times: list[float] = []
        self.readings: list[dict[str, float]] = []
        self.missed = 0
        """Readings where /metrics did not answer (a server that is down, or too busy for 5 s)."""

    def __call__(self) -> dict[str, float] | None:
        at = self.clock()
        values = read_server_metrics(self.base_url)
        if values is None:
            self.missed += 1
            return None
        used = gpu.memory_used_bytes(self.device_index)
        if used is not None:
            values[GPU_MEMORY_USED] = used
        self.times.append(at)
        self.readings.append(values)
        return values

    def columns(self) -> dict[str, list]:
        """{"t_s": [...], name: [...] for every name of SERIES}; None where a reading lacked it."""
        return {
            "t_s": [round(t, 3) for t in self.times],
            **{name: [r.get(name) for r in self.readings] for name in SERIES},
        }

