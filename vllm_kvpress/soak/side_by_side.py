"""Owns how servers side by side share one GPU (`vllm-kvpress soak --side-by-side`): the split of
`--gpu-memory-utilization` between them, and the checks that refuse a split that cannot fit.

vLLM 0.26 reads `--gpu-memory-utilization` per process, as a fraction of the whole GPU: at start-up
each engine checks that the device's free memory is at least that fraction of its total
(v1/worker/utils.py `request_memory`) and then holds about that much: weights, activations, CUDA
graphs and, unless `--kv-cache-memory-bytes` fixes it, a KV cache sized from what is left. Its CUDA
context comes on top, since the engine's start-up snapshot already counts it as used. So here the
flag is the servers' total, split evenly, and N servers fit when

    per-server share = --gpu-memory-utilization / N          (rounded down to SHARE_DECIMALS)
    N x share x GPU total + N x CONTEXT_BYTES <= GPU memory free before the first server starts

With `--kv-cache-memory-bytes` every server's pool is exactly that many bytes and vLLM does not
size it by profiling, so the servers start together; the pool must fit in the share, which also
holds the weights and activations. Without it each engine sizes its pool by profiling the device's
free memory and assumes that other processes hold still meanwhile (v1/worker/gpu_worker.py
`determine_available_memory`); a server starting beside it would not, so the servers start one
after another, each once the one before answers /health.

Nothing here imports vLLM or reads the GPU: the CLI checks the split before anything starts, and
the runner checks it against the GPU's memory (bench/gpu.py) before the first server starts.
"""

import math
from dataclasses import asdict, dataclass

from vllm_kvpress.errors import InputError

GIB = 1 << 30
CONTEXT_BYTES = 1 * GIB
"""Memory each server holds outside its share: its CUDA context (about half of this), with room."""
MIN_SERVER_SHARE = 0.02
"""The smallest per-server share accepted; below it no vLLM engine holds weights, activations and a pool."""
SHARE_DECIMALS = 4
START_TOGETHER = "together"
START_ONE_AFTER_ANOTHER = "one after another"
GPU_MEMORY_SERIES_NOTE = (
    "device-wide (NVML): with servers side by side it is the sum of every server's memory (and of "
    "anything else on the GPU), the same readings in every configuration's series"
)
KV_USAGE_NOTE = "per server: each server's own vllm:kv_cache_usage_perc from its /metrics"


@dataclass(frozen=True)
class MemorySplit:
    """How N servers side by side share one GPU; recorded in soak.json as `side_by_side`."""

    servers: int
    total_utilization: float
    """`--gpu-memory-utilization`: the share of the whole GPU the servers may hold together."""
    per_server_utilization: float
    """The `--gpu-memory-utilization` each `vllm serve` gets."""
    kv_cache_memory_bytes: int | None
    """Each server's KV pool, if fixed (`--kv-cache-memory-bytes`); None: sized by each engine."""

    @property
    def start(self) -> str:
        return START_TOGETHER if self.kv_cache_memory_bytes is not None else START_ONE_AFTER_ANOTHER

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "start": self.start,
            "context_bytes_per_server": CONTEXT_BYTES,
            "gpu_memory_series": GPU_MEMORY_SERIES_NOTE,
            "kv_cache_usage_series": KV_USAGE_NOTE,
        }


def split_memory(
    servers: int, total_utilization: float, *, kv_cache_memory_bytes: int | None, tensor_parallel_size: int = 1
) -> MemorySplit:
    """The even split of `--gpu-memory-utilization` between `servers`; InputError where it cannot work."""
    if tensor_parallel_size != 1:
        raise InputError(
            f"--side-by-side puts every server on one GPU: --tensor-parallel-size {tensor_parallel_size} "
            "is not allowed with it (allowed: 1)"
        )
    if not 0 < total_utilization < 1 or math.isnan(total_utilization):
        raise InputError(
            f"--gpu-memory-utilization {total_utilization:g} with --side-by-side: allowed: more than 0, less "
            "than 1; it is the share of the GPU all servers hold together, and each server's CUDA context "
            "comes on top"
        )
    per_server = math.floor(total_utilization / servers * 10**SHARE_DECIMALS) / 10**SHARE_DECIMALS
    if per_server < MIN_SERVER_SHARE:
        raise InputError(
            f"--side-by-side with {servers} configurations: --gpu-memory-utilization {total_utilization:g} "
            f"leaves each server {per_server:g} of the GPU; allowed: at least {MIN_SERVER_SHARE:g} each, so "
            f"--gpu-memory-utilization {MIN_SERVER_SHARE * servers:.2f} or more (less than 1), or fewer --configs"
        )
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
        raise InputError(f"--kv-cache-memory-bytes {kv_cache_memory_bytes}: allowed: more than 0 bytes")
    return MemorySplit(servers, total_utilization, per_server, kv_cache_memory_bytes)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits_gpu(split: MemorySplit, *, total_bytes: int, used_bytes: int) -> None:
    """InputError unless the split fits a GPU of `total_bytes` with `used_bytes` in use before any server."""
    free = total_bytes - used_bytes
    shares = split.servers * split.per_server_utilization * total_bytes
    contexts = split.servers * CONTEXT_BYTES
    if shares + contexts > free:
        most = math.floor(max(0.0, (free - contexts) / total_bytes) * 100) / 100
        allowed = (
            f"--gpu-memory-utilization {most:g} or less, or fewer --configs"
            if most >= MIN_SERVER_SHARE * split.servers
            else "fewer --configs, or a GPU with more free memory"
        )
        raise InputError(
            f"--side-by-side with {split.servers} configurations: --gpu-memory-utilization "
            f"{split.total_utilization:g} gives the servers {_gib(shares)} of this {_gib(total_bytes)} GPU and "
            f"each needs about {_gib(CONTEXT_BYTES)} outside its share (its CUDA context), but only "
            f"{_gib(free)} is free ({_gib(used_bytes)} in use already); allowed: {allowed}"
        )
    share_bytes = split.per_server_utilization * total_bytes
    if split.kv_cache_memory_bytes is not None and split.kv_cache_memory_bytes >= share_bytes:
        raise InputError(
            f"--kv-cache-memory-bytes {split.kv_cache_memory_bytes} ({_gib(split.kv_cache_memory_bytes)}) does "
            f"not fit in each server's share: --gpu-memory-utilization {split.total_utilization:g} / "
            f"{split.servers} servers = {split.per_server_utilization:g} of {_gib(total_bytes)} = "
            f"{_gib(share_bytes)}, which also holds the weights and activations; lower --kv-cache-memory-bytes, "
            "raise --gpu-memory-utilization, or give fewer --configs"
        )
