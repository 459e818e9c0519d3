"""Owns the CUDA decode kernel (`csrc/decode_attention.cu`): which pages it takes, building it with
NVRTC, and launching its split pass.

The Triton decode kernel is bound by instructions, not bytes (docs/results/decode_kernel.md): Triton
moves the packed tiles between its own layouts before they reach the tensor cores. The CUDA kernel
loads each thread's mma fragments straight from the page. It is built at run time by NVRTC (the
`nvidia-cuda-nvrtc` library PyTorch ships), so it needs no CUDA toolkit and no compiled extension,
once per (page layout, GQA group, query dtype, launch shape), and cached for the process. It writes
the Triton kernel's split format; `vllm_kvpress.decode` picks the kernel and merges the splits
(`unsupported_reason` says why a layout stays on Triton).
"""

import functools
from importlib import resources

import torch

from vllm_kvpress.layout import PageLayout

KERNEL_NAME = "kvpress_decode_split"
NUM_WARPS = 4
"""Warps per CTA; each owns every NUM_WARPS-th block of the split and the CTA merges them."""
MIN_CTAS = 2
"""CTAs per multiprocessor the register budget is cut for (`__launch_bounds__`)."""
MAX_GROUP = 8
"""Query heads per KV head: the mma's N side."""
MIN_CAPABILITY = (8, 0)
"""mma.sync m16n8k16 with fp16 operands and fp32 accumulators."""


def unsupported_reason(layout: PageLayout, group: int, query_dtype: torch.dtype) -> str | None:
    """Why the CUDA kernel cannot take these pages, or None when it can.

    The limits mirror the static_asserts of the kernel source: a thread's share of a row must be
    1-4 whole words, fragments must tile the block, and GEAR's terms must fit one mma tile."""
    bits = layout.k_bits
    if layout.k_bits != layout.v_bits or bits not in (2, 4):
        return f"K/V bits {layout.k_bits}/{layout.v_bits} (the CUDA kernel takes 2 or 4, the same for K and V)"
    if query_dtype not in (torch.float16, torch.bfloat16):
        return f"query dtype {query_dtype} (fp16 or bf16)"
    if not 1 <= group <= MAX_GROUP:
        return f"{group} query heads per KV head (at most {MAX_GROUP})"
    codes_per_word = 32 // bits
    head, block = layout.head_size, layout.block_size
    if head % 16 or block % 16:
        return f"head_size {head} / block_size {block} (multiples of 16)"
    for name, length in (("head_size", head), ("block_size", block)):
        words = length // 4 // codes_per_word
        if not 1 <= words <= 4 or (length // 4) % codes_per_word:
            return f"{name} {length} at {bits} bits (a thread's quarter of a row must be 1-4 words)"
    if block * head & (block * head - 1):
        return f"block_size x head_size {block * head} (a power of two)"
    if layout.v_group_size % 16:
        return f"V group of {layout.v_group_size} channels (a multiple of 16)"
    if layout.k_stage_group_size % codes_per_word:
        return f"K staging group of {layout.k_stage_group_size} channels (a multiple of {codes_per_word})"
    if layout.rank > 1:
        return f"GEAR rank {layout.rank} (0 or 1)"
    return None


def device_unsupported_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on `device` (not CUDA, too old, no NVRTC library), or None."""
    if device.type != "cuda" or torch.version.cuda is None:
        return f"device {device} is not an NVIDIA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability} (needs {MIN_CAPABILITY} or newer)"
    return nvrtc_unavailable_reason()


def unavailable_reason(layout: PageLayout, group: int, query_dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the kernel cannot decode these pages on `device` (pages or machine), or None."""
    return unsupported_reason(layout, group, query_dtype) or device_unsupported_reason(device)


@functools.cache
def nvrtc_unavailable_reason() -> str | None:
    """Why NVRTC cannot be loaded (PyTorch's CUDA wheels bring it; a custom build may not), or None."""
    from torch.cuda._utils import _get_gpu_rtc_library

    try:
        _get_gpu_rtc_library()
    except OSError as e:
        return f"a machine without the NVRTC library ({e})"
    return None


def kernel_defines(layout: PageLayout, group: int, query_dtype: torch.dtype, num_warps: int,
                   min_ctas: int) -> tuple[str, ...]:
    """The -D options of one build: the layout's own constants (layout.py is their only source)."""
    constants = {**layout.kernel_constants, "GROUP": group, "NUM_WARPS": num_warps, "MIN_CTAS": min_ctas,
                 "Q_BF16": int(query_dtype == torch.bfloat16)}
    return tuple(f"-D{name}={value}" for name, value in sorted(constants.items()))


@functools.cache
def _source() -> str:
    return resources.files("vllm_kvpress.csrc").joinpath("decode_attention.cu").read_text()


def _nvrtc_cubin(source: str, options: list[str]) -> bytes:
    """sm_XX machine code of `source` from NVRTC. The kernel includes no headers, so unlike
    torch.cuda's own helper this needs no CUDA toolkit (no CUDA_HOME) on the machine."""
    import ctypes

    from torch.cuda._utils import _get_gpu_rtc_library

    nvrtc = _get_gpu_rtc_library()

    def check(status: int, what: str) -> None:
        if status:
            raise RuntimeError(f"NVRTC {what} failed with status {status}")

    program = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"decode_attention.cu", 0, None, None),
          "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        if status:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile the decode kernel ({' '.join(options)}):\n"
                               f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@functools.cache
def _build(defines: tuple[str, ...], capability: tuple[int, int]):
    from torch.cuda._utils import _cuda_load_module

    arch = f"--gpu-architecture=sm_{capability[0]}{capability[1]}"
    cubin = _nvrtc_cubin(_source(), [arch, "-std=c++17", *defines])
    return _cuda_load_module(cubin, [KERNEL_NAME])[KERNEL_NAME]


@functools.cache
def build(layout: PageLayout, group: int, query_dtype: torch.dtype, device: torch.device,
          num_warps: int = NUM_WARPS, min_ctas: int = MIN_CTAS):
    """The compiled kernel for these pages (built on first use, then cached: decode calls it per
    layer and step). Call it before CUDA graph capture: building loads a module, which a capturing
    stream must not see."""
    reason = unavailable_reason(layout, group, query_dtype, device)
    if reason:
        raise ValueError(f"the CUDA decode kernel does not take {reason}")
    capability = torch.cuda.get_device_capability(device)
    return _build(kernel_defines(layout, group, query_dtype, num_warps, min_ctas), capability)


def decode_split(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 layout: PageLayout, *, scale_log2: float, num_splits: int,
                 split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 num_warps: int = NUM_WARPS, min_ctas: int = MIN_CTAS,
                 headwise: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                 tail: tuple[torch.Tensor, int, int, torch.Tensor] | None = None) -> None:
    """The split pass of `vllm_kvpress.decode.decode_attention` (same arguments, checked
    there): partial (out, max, sum) per (sequence, split, head) into `split_buffers`; `tail`: the
    exact tail's (buffer, slot stride, head stride, per-row slots), as `exact_tail.tail_arguments`
    gives them."""
    num_seqs, num_heads, _ = query.shape
    num_kv_heads = cache.shape[1]
    group = num_heads // num_kv_heads
    if query.stride(2) != 1:
        raise ValueError("query rows must be contiguous along head_size")
    kernel = build(layout, group, query.dtype, query.device, num_warps, min_ctas)
    part_out, part_max, part_sum = split_buffers
    kernel(
        grid=(num_seqs, num_kv_heads, num_splits), block=(32 * num_warps, 1, 1),
        args=[query, query.stride(0), query.stride(1), cache, cache.stride(0), cache.stride(1),
              block_table, block_table.stride(0), seq_lens, part_out, part_max, part_sum, num_splits,
              float(scale_log2),
              # no retrieval heads: the kernel never reads the two pointers (any tensor fills them)
              *(headwise if headwise is not None else (seq_lens, seq_lens, 0)),
              # no exact tail (EXACT_TAIL 0): the kernel never reads these either
              *(tail if tail is not None else (seq_lens, 0, 0, seq_lens))],
    )
