"""Triton's JIT without a GPU: every kernel launch builds the kernel for a named GPU target and
returns without running it.

The CPU interpreter runs a kernel's Python, which says nothing about what the GPU's JIT does with
it: the GPU-only code paths (bf16 dot operands, the magic-bias code conversion in inline PTX),
whether ptxas accepts the result and what it costs (registers, spills, shared memory), and which
launches compile a new variant (Triton keys its cache on constexprs and on how integer and pointer
arguments specialize). Here the launch goes through `JITFunction.run` itself, with a driver that
names the target, so the binding, the specialization and the cache key are Triton's own; only the
launch is left out. Triton's bundled ptxas builds the cubin.

Kernel modules must be imported in a process without TRITON_INTERPRET (the interpreter replaces
`@triton.jit` at import).
"""

import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

HOPPER = ("cuda", 90, 32)
"""H100/H200: (backend, compute capability, warp size)."""

HOPPER_MAX_SHARED_BYTES = 232448
"""Shared memory one block may use on sm_90 (227 KiB, opt-in): a launch needing more fails."""


@dataclass
class Build:
    """One kernel variant the JIT compiled (a launch that missed Triton's cache)."""

    kernel: str
    variant: str
    """The kernel's argument types and constexpr values: what may differ between the variants of
    one kernel the engine needs. Two builds of one variant differ only in how an argument
    specialized (an integer that is 1 or a multiple of 16, a pointer's alignment)."""
    seconds: float
    shared_bytes: int
    num_warps: int
    ptx: str


class CompileOnlyDriver:
    """The part of Triton's driver interface `JITFunction.run` uses before it launches."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


@contextmanager
def compile_only(target: tuple[str, int, int] = HOPPER):
    """Within: launches build for `target` and do not run; yields the list of builds, in order."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    builds: list[Build] = []
    original_run = JITFunction.run

    def build_only(self, *args, grid, warmup, **kwargs):
        cache = self.device_caches[0][0]
        before, start = len(cache), time.perf_counter()
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if len(cache) > before:
            source = kernel.src
            variant = repr((sorted(source.signature.items()), sorted(source.constants.items())))
            builds.append(Build(self.fn.__name__, variant, time.perf_counter() - start, kernel.metadata.shared,
                                kernel.metadata.num_warps, kernel.asm["ptx"]))
        return kernel

    previous = driver._active  # `driver.active` would look for a GPU driver, and there is none
    driver.set_active(CompileOnlyDriver(GPUTarget(*target)))
    JITFunction.run = build_only
    try:
        yield builds
    finally:
        JITFunction.run = original_run
        driver.set_active(previous)


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict[str, int]:
    """What ptxas reports building the kernel's PTX for `arch` (Triton builds sm_90a on Hopper):
    registers per thread, stack frame and spill bytes per thread."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as workdir:
        source = os.path.join(workdir, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", source, "-o",
                              os.path.join(workdir, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    figures = {
        "registers": r"Used (\d+) registers",
        "stack_frame_bytes": r"(\d+) bytes stack frame",
        "spill_store_bytes": r"(\d+) bytes spill stores",
        "spill_load_bytes": r"(\d+) bytes spill loads",
    }
    return {name: int(re.search(pattern, log).group(1)) for name, pattern in figures.items()}
