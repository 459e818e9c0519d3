"""The CUDA decode kernel's CPU-side contract: which pages it takes, and that its source builds
with NVRTC (which needs no GPU) for every shipped configuration it takes. Its numbers are checked
against the reference on the GPU (tests/gpu/test_cuda_decode.py)."""

import re
from importlib import resources

import pytest
import torch
from helpers import layout_for

from vllm_kvpress import cuda_decode
from vllm_kvpress.decode import decode_kernel

# every shipped quantization config at both head sizes, with the GQA groups of the real models
TAKEN = [(method, bits, head, group) for method in ("kivi", "gear") for bits in (2, 4) for head, group in
         ((128, 4), (64, 3), (64, 7))]


@pytest.mark.parametrize("method,bits,head_size,group", TAKEN)
def test_the_shipped_configs_are_taken(method, bits, head_size, group):
    layout, _ = layout_for(method, head_size, bits=bits)
    assert cuda_decode.unsupported_reason(layout, group, torch.bfloat16) is None


@pytest.mark.parametrize("method,overrides,group,dtype,words", [
    ("kivi", {"bits": 8}, 4, torch.bfloat16, "bits 8/8"),
    ("kivi", {"bits": 4, "block_size": 16}, 4, torch.bfloat16, "block_size 16"),
    ("kivi", {"bits": 2, "block_size": 32}, 4, torch.bfloat16, "block_size 32"),
    ("kivi", {"bits": 4}, 9, torch.bfloat16, "9 query heads"),
    ("gear", {"bits": 4, "rank": 2}, 4, torch.bfloat16, "rank 2"),
    ("kivi", {"bits": 4}, 4, torch.float32, "query dtype"),
])
def test_pages_it_cannot_take_are_named(method, overrides, group, dtype, words):
    layout, _ = layout_for(method, 128, **overrides)
    reason = cuda_decode.unsupported_reason(layout, group, dtype)
    assert reason is not None and words in reason


def test_decode_stays_on_triton_off_the_gpu_and_says_why():
    layout, _ = layout_for("gear", 128, bits=4)
    kernel, why = decode_kernel(layout, 4, torch.bfloat16, torch.device("cpu"))
    assert kernel == "triton" and why


def test_the_defines_are_the_layout_constants_and_the_source_knows_them_all():
    layout, _ = layout_for("gear", 128, bits=4)
    defines = dict(d[2:].split("=") for d in cuda_decode.kernel_defines(layout, 4, torch.bfloat16, 4, 2))
    assert {k: int(v) for k, v in defines.items() if k in layout.kernel_constants} == layout.kernel_constants
    source = resources.files("vllm_kvpress.csrc").joinpath("decode_attention.cu").read_text()
    offline_defaults = set(re.findall(r"^#define (\w+) ", source.split("#endif")[0], re.MULTILINE))
    assert set(defines) == offline_defaults


@pytest.mark.parametrize("method,bits,head_size,group,tail_keys", [
    ("gear", 4, 128, 4, "staged"), ("kivi", 2, 64, 7, "staged"), ("gear", 2, 64, 3, "staged"),
    ("kivi", 4, 128, 1, "staged"), ("gear", 4, 128, 4, "exact"), ("kivi", 4, 64, 7, "exact"),
])
def test_the_source_builds_with_nvrtc(method, bits, head_size, group, tail_keys):
    layout, _ = layout_for(method, head_size, bits=bits, tail_keys=tail_keys)
    options = ["--gpu-architecture=sm_90", "-std=c++17",
               *cuda_decode.kernel_defines(layout, group, torch.bfloat16, cuda_decode.NUM_WARPS, cuda_decode.MIN_CTAS)]
    cubin = cuda_decode._nvrtc_cubin(cuda_decode._source(), options)
    assert cubin.startswith(b"\x7fELF")


def test_a_build_error_reports_nvrtcs_log():
    layout, _ = layout_for("gear", 4 * 32, bits=4)
    defines = [d for d in cuda_decode.kernel_defines(layout, 9, torch.bfloat16, 4, 2)]
    with pytest.raises(RuntimeError, match="at most 8 query heads"):
        cuda_decode._nvrtc_cubin(cuda_decode._source(), ["--gpu-architecture=sm_90", "-std=c++17", *defines])


def test_a_missing_nvrtc_library_keeps_decode_on_triton_with_the_reason(monkeypatch):
    import torch.cuda._utils

    def missing():
        raise OSError("libnvrtc.so: cannot open shared object file")

    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_rtc_library", missing)
    cuda_decode.nvrtc_unavailable_reason.cache_clear()
    try:
        reason = cuda_decode.nvrtc_unavailable_reason()
    finally:
        cuda_decode.nvrtc_unavailable_reason.cache_clear()
    assert reason is not None and "NVRTC" in reason and "libnvrtc.so" in reason


@pytest.mark.parametrize("variant", ["plain", "head-wise", "exact tail"])
def test_the_launch_passes_the_kernels_parameters_in_order(variant, monkeypatch):
    """The kernel is launched with a flat argument list (pointers, ints, doubles): it must match
    the parameter list of the source, plain, with head-wise packed rows and with an exact tail."""
    from vllm_kvpress.triton_kernels.exact_tail import exact_tail_buffer, tail_arguments

    source = cuda_decode._source()
    params = re.search(r"kvpress_decode_split\((.*?)\)\s*\{", source, re.S).group(1).split(",")
    wanted = ["pointer" if "*" in p else "double" if p.split()[0] == "double" else "int" for p in params]
    launched = {}
    monkeypatch.setattr(cuda_decode, "build", lambda *a, **k: lambda grid, block, args: launched.update(args=args))
    layout, _ = layout_for("kivi", 128, bits=4, tail_keys="exact" if variant == "exact tail" else "staged")
    query = torch.randn(2, 8, 128).bfloat16()
    cache = torch.zeros(4, 2, layout.bytes_per_head, dtype=torch.uint8)
    table, seq_lens = torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    buffers = tuple(torch.zeros(64) for _ in range(3))
    rows = (torch.zeros(2, 3, dtype=torch.int32), torch.tensor([0, -1], dtype=torch.int32), 1)
    tail = None
    if variant == "exact tail":
        tail = tail_arguments((exact_tail_buffer(3, 2, layout, query.dtype, "cpu"),
                               torch.tensor([2, 0], dtype=torch.int32)), layout, table)
    cuda_decode.decode_split(query, cache, table, seq_lens, layout, scale_log2=0.1, num_splits=1,
                             split_buffers=buffers, headwise=rows if variant == "head-wise" else None, tail=tail)
    kinds = ["pointer" if isinstance(a, torch.Tensor) else "double" if isinstance(a, float) else "int"
             for a in launched["args"]]
    assert kinds == wanted
    headwise_args, tail_args = launched["args"][-7:-4], launched["args"][-4:]
    if variant == "head-wise":
        assert headwise_args[0] is rows[0] and headwise_args[1] is rows[1] and headwise_args[2] == 1
    else:
        assert headwise_args[2] == 0  # no retrieval heads: the kernel reads no head-wise row
    if variant == "exact tail":
        assert tail_args[0] is tail[0] and tail_args[1:3] == [2 * 64 * 128, 64 * 128] and tail_args[3] is tail[3]
