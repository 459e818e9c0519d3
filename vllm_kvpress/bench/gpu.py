"""Owns what the benchmark reads about the GPU itself: its name and device-level memory, via NVML.

Why NVML and not torch: vLLM allocates the KV cache in its engine-core process (and its workers), so
`torch.cuda.max_memory_reserved()` in the benchmark process sees none of it. NVML's
`nvmlDeviceGetMemoryInfo(...).used` is the device-wide figure nvidia-smi shows: every process,
including the CUDA contexts, the weights, the KV cache, CUDA graphs and allocator slack. The peak is
sampled (`SAMPLE_INTERVAL_S`, `gauges.peak_memory_sampler`), so a spike shorter than that can be
missed; vLLM reserves its memory up front, so the device-level figure is flat while a workload runs.

`pynvml` comes with vLLM (package nvidia-ml-py). Without a GPU every function returns None.
"""

import time
from types import ModuleType

SAMPLE_INTERVAL_S = 0.25
_nvml: ModuleType | None = None


def _nvml_module() -> ModuleType | None:
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no driver, no GPU, or no pynvml: the figures are reported as unavailable
            return None
        _nvml = pynvml
    return _nvml


def _handle(device_index: int):
    nvml = _nvml_module()
    return None if nvml is None else nvml.nvmlDeviceGetHandleByIndex(device_index)


def gpu_name(device_index: int = 0) -> str | None:
    handle = _handle(device_index)
    if handle is None:
        return None
    name = _nvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else name


def memory_used_bytes(device_index: int = 0) -> int | None:
    handle = _handle(device_index)
    return None if handle is None else int(_nvml.nvmlDeviceGetMemoryInfo(handle).used)


def memory_total_bytes(device_index: int = 0) -> int | None:
    handle = _handle(device_index)
    return None if handle is None else int(_nvml.nvmlDeviceGetMemoryInfo(handle).total)


def wait_for_memory_release(
    baseline_bytes: int | None, *, device_index: int = 0, slack_bytes: int = 1 << 30, timeout_s: float = 60.0
) -> int | None:
    """Wait until device memory falls back to within `slack_bytes` of `baseline_bytes`.

    The next configuration's vLLM profiles free memory at start-up, so memory a dying engine has
    not yet returned would shrink its KV cache and bias the comparison. Returns the last reading.
    """
    deadline = time.monotonic() + timeout_s
    used = memory_used_bytes(device_index)
    while used is not None and baseline_bytes is not None and used > baseline_bytes + slack_bytes:
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
        used = memory_used_bytes(device_index)
    return used
