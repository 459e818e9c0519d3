"""Owns sampling vLLM's scheduler gauges while a workload runs: how many requests it had running
and waiting at once, and how full its KV cache was (`figures.GAUGES`).

vLLM keeps these as Prometheus gauges in the process that runs its front-end, and sets them from
the `SchedulerStats` the engine core sends with every step's outputs (v1/engine/llm_engine.py
`LLMEngine.step` -> `StatLoggerManager.record` -> `PrometheusStatLogger.record`). Offline that
process is the benchmark worker itself, whether the engine core runs in a process of its own
(`VLLM_ENABLE_V1_MULTIPROCESSING`, the default) or in-process: `LLM.generate` steps the engine on
the main thread, and `LLM.get_metrics()` (v1/metrics/reader.py `get_metrics_snapshot`) only reads
prometheus_client's registry, whose collection takes the registry's and each metric's lock, so a
sampler thread can call it while `generate` runs. Online it reads the server's `GET /metrics`.

A gauge holds the value of the last step that produced outputs, so sampling every `interval_s`
sees every level that lasts longer than that; the benchmark's batches hold their peak for many
decode steps. The largest sample is a floor of the true maximum.
"""

import threading
from collections.abc import Callable, Mapping
from typing import Self

from vllm_kvpress.bench import gpu
from vllm_kvpress.bench.gpu import SAMPLE_INTERVAL_S


class PeakGaugeSampler:
    """Calls `read()` on a thread every `interval_s` while the `with` block runs (and once at
    each end) and keeps the largest value of each gauge in `peaks`.

    `read` returns {gauge name: value} (`figures.gauge_totals`), or None where nothing could be
    read this time. A `read` that raises stops the sampling; the error is kept in `error`.
    """

    def __init__(
        self, read: Callable[[], Mapping[str, float] | None], interval_s: float = SAMPLE_INTERVAL_S
    ):
        self.read = read
        self.interval_s = interval_s
        self.peaks: dict[str, float] = {}
        self.num_samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> bool:
        if self.error is not None:
            return False
        try:
            values = self.read()
        except Exception as e:  # noqa: BLE001 - the figure is reported as unavailable, the workload goes on
            self.error = f"{type(e).__name__}: {e}"
            return False
        if values is not None:
            self.num_samples += 1
            for name, value in values.items():
                self.peaks[name] = max(self.peaks.get(name, value), value)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._sample():
                return

    def __enter__(self) -> Self:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="bench-gauge-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


USED_BYTES = "used_bytes"


def peak_memory_sampler(device_index: int = 0, interval_s: float = SAMPLE_INTERVAL_S) -> PeakGaugeSampler:
    """Samples device-level used memory (`gpu.memory_used_bytes`) the same way; its peak is
    `peaks.get(USED_BYTES)`, None without NVML."""

    def read() -> dict[str, float] | None:
        used = gpu.memory_used_bytes(device_index)
        return None if used is None else {USED_BYTES: used}

    return PeakGaugeSampler(read, interval_s)
