"""Owns the metadata builder's host-to-device copies: from page-locked memory, so that they never
make the host wait for the GPU.

The builder runs while the GPU still executes the step before (vLLM's asynchronous scheduling). A
`non_blocking` copy from pageable memory is staged by the driver, which may wait for the stream to
drain; from pinned memory it is one DMA queued behind that step. The pinned block comes from
PyTorch's caching host allocator, which keeps it until the copy has run (as vLLM's own
`async_copy_to_gpu` does).
"""

import numpy as np
import torch


def copy_to_device(array: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """`out.copy_(array)` queued on the current stream without a host wait; `out` may be a view of
    a persistent buffer (CUDA-graph replays read it in place)."""
    host = torch.from_numpy(array)
    if out.device.type == "cuda":
        host = host.pin_memory()
    return out.copy_(host, non_blocking=True)


def to_device(array: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    """A new device tensor holding `array` as `dtype`, copied as in `copy_to_device`."""
    host = np.ascontiguousarray(array, dtype=dtype)
    return copy_to_device(host, torch.empty(host.shape, dtype=torch.from_numpy(host).dtype, device=device))
